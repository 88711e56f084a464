"""Property-based tests (hypothesis), bounded for CI: the whole file runs in well under a minute
on two cores (derandomized, no example database; ``RECTONNX_PROPERTY_SCALE=10`` runs ten times
as many examples, e.g. nightly).

1. Random small classifiers from supported ops (Conv, Relu, Sigmoid, Tanh, MaxPool,
   AveragePool, BatchNormalization, Add, Mul, a residual branch, GlobalAveragePool, Flatten or
   Reshape, Gemm or MatMul): ``rewrite(..., "saliency")`` either succeeds and its attribution
   passes the dot-product check against float64 central differences along a random direction,
   or raises UnsupportedModelError.
2. Random option values: valid ones give an explainer graph; invalid ones raise ValueError or a
   RectonnxError whose message is one non-empty line naming the option.
3. Random file names (unicode, long, spaces) and random or corrupt image contents through
   ``rectonnx.batch.explain_images``: every input ends in manifest.jsonl or failures.jsonl and
   nothing raises.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

import rectonnx
from rectonnx import RectonnxError, UnsupportedModelError

from helpers import Reference, run_explainer

SCALE = max(1, int(os.environ.get("RECTONNX_PROPERTY_SCALE", "1")))


def bounded(examples: int):
    return settings(max_examples=examples * SCALE, deadline=None, derandomize=True,
                    database=None, suppress_health_check=[HealthCheck.too_slow,
                                                         HealthCheck.data_too_large])


# -- 1. random graphs ------------------------------------------------------------------------------
SPATIAL_LAYERS = ["conv", "conv", "relu", "relu", "sigmoid", "tanh", "maxpool", "avgpool",
                  "batchnorm", "add", "mul", "residual", "gap"]  # conv, relu: twice as likely


class Builder:
    """Nodes and initializers of a growing graph; ``shape`` is the current per-sample shape."""

    def __init__(self, rng: np.random.Generator, shape: list[int]):
        self.rng, self.shape = rng, list(shape)
        self.nodes, self.inits, self.current = [], [], "x"

    def name(self, stem: str) -> str:
        return f"{stem}{len(self.nodes)}"

    def const(self, value: np.ndarray, stem: str, dtype=np.float32) -> str:
        name = self.name(stem) + f"_{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def node(self, op: str, inputs: list[str], shape: list[int], **attrs) -> None:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        self.current, self.shape = out, list(shape)

    def normal(self, *shape, scale: float = 1.0) -> np.ndarray:
        return self.rng.standard_normal(shape) * scale


def pooled(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


@st.composite
def classifiers(draw):
    """A random classifier ``x [N, ...] -> logits [N, K]`` and its per-sample input shape."""
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    spatial = draw(st.integers(0, 3)) > 0  # images three times in four
    if spatial:
        shape = [draw(st.integers(1, 3)), draw(st.integers(3, 7)), draw(st.integers(3, 7))]
    else:
        shape = [draw(st.integers(2, 8))]
    b = Builder(rng, shape)
    for kind in draw(st.lists(st.sampled_from(SPATIAL_LAYERS), max_size=5)) if spatial else []:
        c, h, w = b.shape
        if kind == "conv":
            out, k = draw(st.integers(1, 4)), draw(st.sampled_from([1, 2, 3]))
            pad = draw(st.integers(0, k // 2)) if k > 1 else 0
            stride = draw(st.sampled_from([1, 2]))
            oh, ow = pooled(h, k, stride, pad), pooled(w, k, stride, pad)
            if min(oh, ow) < 1:
                continue
            weight = b.const(b.normal(out, c, k, k, scale=1 / math.sqrt(c * k * k)), "W")
            bias = b.const(b.normal(out, scale=0.3), "B")
            b.node("Conv", [b.current, weight, bias], [out, oh, ow], kernel_shape=[k, k],
                   pads=[pad] * 4, strides=[stride] * 2)
        elif kind in ("relu", "sigmoid", "tanh"):
            b.node(kind.capitalize() if kind != "relu" else "Relu", [b.current], b.shape)
        elif kind in ("maxpool", "avgpool"):
            k = draw(st.sampled_from([2, 3]))
            stride = draw(st.sampled_from([1, 2]))
            pad = draw(st.integers(0, k // 2)) if kind == "avgpool" else 0
            oh, ow = pooled(h, k, stride, pad), pooled(w, k, stride, pad)
            if min(oh, ow) < 1:
                continue
            attrs = dict(kernel_shape=[k, k], strides=[stride] * 2, pads=[pad] * 4)
            if kind == "avgpool":
                attrs["count_include_pad"] = int(draw(st.booleans()))
            b.node("MaxPool" if kind == "maxpool" else "AveragePool", [b.current],
                   [c, oh, ow], **attrs)
        elif kind == "batchnorm":
            stats = [b.const(1 + 0.3 * b.normal(c), "gamma"), b.const(b.normal(c, scale=0.3),
                                                                        "beta"),
                     b.const(b.normal(c, scale=0.3), "mean"),
                     b.const(0.5 + b.rng.random(c), "var")]
            b.node("BatchNormalization", [b.current, *stats], b.shape, epsilon=1e-5)
        elif kind in ("add", "mul"):
            other = b.const(b.normal(1, c, 1, 1, scale=0.5) + (kind == "mul"), "k")
            b.node(kind.capitalize(), [b.current, other], b.shape)
        elif kind == "residual":  # a tensor that feeds two nodes: cotangents are summed
            source = b.current
            b.node("Tanh", [source], b.shape)
            b.node("Add", [source, b.current], b.shape)
        elif kind == "gap":
            b.node("GlobalAveragePool", [b.current], [c, 1, 1])
    width = int(np.prod(b.shape))
    if len(b.shape) > 1:
        if draw(st.booleans()):
            b.node("Flatten", [b.current], [width], axis=1)
        else:
            b.node("Reshape", [b.current, b.const([0, -1], "shape", np.int64)], [width])
    if draw(st.booleans()):  # a hidden dense layer
        hidden = draw(st.integers(2, 6))
        b.node("Gemm", [b.current, b.const(b.normal(hidden, width, scale=1 / math.sqrt(width)),
                                           "Wh"),
                        b.const(b.normal(hidden, scale=0.3), "Bh")], [hidden], transB=1)
        b.node(draw(st.sampled_from(["Relu", "Tanh", "Sigmoid"])), [b.current], [hidden])
        width = hidden
    classes = draw(st.integers(2, 4))
    head = b.const(b.normal(width, classes, scale=1 / math.sqrt(width)), "head")
    if draw(st.booleans()):
        b.node("MatMul", [b.current, head], [classes])
    else:
        b.node("Gemm", [b.current, head, b.const(b.normal(classes, scale=0.3), "bias")],
               [classes])
    b.nodes[-1].output[0] = "logits_out"
    graph = helper.make_graph(
        b.nodes, "random", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape])],
        [helper.make_tensor_value_info("logits_out", TensorProto.FLOAT, ["N", classes])],
        b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model, shape, classes


@bounded(200)
@given(classifiers(), st.integers(0, 2 ** 32 - 1), st.integers(1, 3), st.data())
def test_random_graphs_match_central_differences(made, seed, batch, data):
    model, shape, classes = made
    try:
        explainer = rectonnx.rewrite(model, "saliency")
    except UnsupportedModelError:
        return
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *shape)).astype(np.float32)
    target = np.array(data.draw(st.lists(st.integers(-1, classes - 1), min_size=batch,
                                         max_size=batch)), np.int64)
    logits, attribution = run_explainer(explainer, x, target)
    reference = Reference(model)
    x64 = x.astype(np.float64)
    expected = reference(x64)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    chosen = np.where(target < 0, logits.argmax(axis=1), target)
    assume(all(np.sort(row)[-1] - np.sort(row)[-2] > 1e-3 for row in logits[target < 0]))
    t = rng.standard_normal(x.shape)
    eps = 1e-6
    rows = np.arange(batch)
    numeric = (reference(x64 + eps * t)[rows, chosen] - reference(x64 - eps * t)[rows, chosen]) \
        / (2 * eps)
    axes = tuple(range(1, x.ndim))
    analytic = (t * attribution.astype(np.float64)).sum(axis=axes)
    scale = np.abs(t * attribution.astype(np.float64)).sum(axis=axes)
    assert np.all(np.abs(analytic - numeric) <= 2e-4 * scale + 1e-7), \
        (analytic, numeric, [n.op_type for n in model.graph.node])


# -- 2. option values ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_cnn():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "H", "C"], ["y"])]
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in
             (("W", (4, 3, 3, 3)), ("B", (4,)), ("H", (4 * 4 * 4, 3)), ("C", (3,)))]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


percent = st.floats(0, 100, allow_nan=False)
COMMON_VALID = {
    "padding_trick": st.sampled_from([False, True]), "prr": st.booleans(),
    "final_percentile": st.one_of(st.none(), percent),
    "threshold": st.sampled_from(["topk", "bisect"]),
    "runtime": st.sampled_from(["any", "onnxruntime-cpu"]), "layer_outputs": st.booleans(),
}
METHOD_VALID = {
    "saliency": {}, "grad_input": {}, "deconvnet": {}, "guided_backprop": {},
    "rectgrad": {"q": percent, "q_input": st.booleans()},
    "smoothgrad": {"samples": st.integers(1, 3), "sigma": st.floats(0, 0.5),
                   "seed": st.integers(0, 2 ** 31)},
    "integrated_gradients": {"steps": st.integers(2, 4),
                             "baseline": st.floats(-1, 1, allow_nan=False)},
    "deeplift": {"baseline": st.floats(-1, 1, allow_nan=False)},
    "epsilon_lrp": {"epsilon": st.floats(1e-6, 1.0)},
}
INVALID = [  # (option, value): wrong for every method (or an option the method lacks)
    ("q", float("nan")), ("q", float("inf")), ("q", -1.0), ("q", 100.5), ("q", "98"),
    ("samples", 0), ("samples", 2.5), ("samples", "many"), ("sigma", -0.1),
    ("sigma", float("nan")), ("steps", 0), ("steps", 1.5), ("epsilon", 0.0), ("epsilon", -1.0),
    ("epsilon", float("inf")), ("final_percentile", 101.0), ("final_percentile", -1.0),
    ("final_percentile", float("nan")), ("threshold", "fastest"), ("threshold", None),
    ("threshold", 3), ("runtime", "gpu"), ("runtime", ""), ("padding_trick", 2),
    ("padding_trick", "sideways"), ("prr", "yes"), ("layer_outputs", "no"),
    ("bogus_option", 1), ("Q", 95.0),
]


@st.composite
def valid_options(draw):
    method = draw(st.sampled_from(sorted(METHOD_VALID)))
    domain = {**COMMON_VALID, **METHOD_VALID[method]}
    names = draw(st.lists(st.sampled_from(sorted(domain)), unique=True, max_size=4))
    return method, {name: draw(domain[name]) for name in names}


def single_line(message: str) -> bool:
    return bool(message.strip()) and "\n" not in message.strip()


@bounded(60)
@given(valid_options())
def test_valid_options_give_an_explainer_graph(tiny_cnn, chosen):
    method, options = chosen
    graph = rectonnx.rewrite(tiny_cnn, method, **options)
    outputs = [o.name for o in graph.graph.output]
    assert outputs[:2] == ["logits", "attribution"]
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    logits, attribution = run_explainer(graph, x, [-1, 1])
    assert logits.shape == (2, 3) and attribution.shape == x.shape
    assert np.isfinite(attribution).all()


@bounded(100)
@given(valid_options(), st.sampled_from(INVALID), st.booleans())
def test_invalid_options_are_one_line_errors_naming_them(tiny_cnn, chosen, bad, bad_method):
    method, options = chosen
    if bad_method:
        method, name = method + "x", method + "x"
    else:
        name, value = bad
        options = {**options, name: value}
    with pytest.raises((ValueError, RectonnxError)) as caught:
        rectonnx.rewrite(tiny_cnn, method, **options)
    message = str(caught.value)
    assert single_line(message), message
    assert name in message, message


# -- 3. file names and image contents --------------------------------------------------------------
@pytest.fixture(scope="module")
def image_model(tiny_cnn, tmp_path_factory):
    path = tmp_path_factory.mktemp("image_model") / "tiny.onnx"
    onnx.save(tiny_cnn, path)
    explainer = rectonnx.Explainer(path, "saliency", providers=["CPUExecutionProvider"])
    return path, explainer


FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".gif": "GIF",
           ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP"}
MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"BM", b"GIF89a", b"II*\x00", b"RIFF"]


def fits(stem: str, ext: str) -> bool:
    name = stem + ext
    return (not stem.startswith(".") and "/" not in stem and stem.strip() == stem
            and len(name.encode("utf-8")) <= 255)


file_names = st.tuples(
    st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\"),
            min_size=1, max_size=90).map(lambda s: s.strip()) | st.sampled_from(
        ["a" * 240, "é" * 120, "with spaces", "日本語のファイル", "emoji😀", "-rf", "~home",
         "star*", "q?mark", "[brackets]", "con", "x.txt"]),
    st.sampled_from(sorted(FORMATS)),
).filter(lambda pair: fits(*pair))


@st.composite
def image_bytes(draw, ext: str):
    kind = draw(st.sampled_from(["valid", "valid", "random", "truncated", "magic", "empty",
                                 "other_format"]))
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=64))
    if kind == "empty":
        return b""
    if kind == "magic":
        return draw(st.sampled_from(MAGIC)) + draw(st.binary(max_size=48))
    size = (draw(st.integers(1, 24)), draw(st.integers(1, 24)))
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P", "1"]))
    fmt = FORMATS[ext] if kind != "other_format" else draw(st.sampled_from(["PNG", "BMP"]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    picture = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    buffer = io.BytesIO()
    try:
        picture.convert(mode).save(buffer, format=fmt)
    except (OSError, ValueError, KeyError):  # a mode the format cannot hold
        buffer = io.BytesIO()
        picture.save(buffer, format=fmt)
    data = buffer.getvalue()
    if kind == "truncated":
        return data[:draw(st.integers(0, max(0, len(data) - 1)))]
    return data


@st.composite
def image_folders(draw):
    names = draw(st.lists(file_names, min_size=1, max_size=4,
                          unique_by=lambda pair: (pair[0] + pair[1]).casefold()))
    return [(stem + ext, draw(image_bytes(ext))) for stem, ext in names]


def write_folder(folder: Path, files) -> Path:
    folder.mkdir()
    for name, data in files:
        (folder / name).write_bytes(data)
    return folder


def outcome(out: Path) -> tuple[list[str], list[str]]:
    def inputs(name):
        path = out / name
        if not path.exists():
            return []
        return [json.loads(line)["input"] for line in path.read_text("utf-8").splitlines()
                if line.strip()]
    return inputs("manifest.jsonl"), inputs("failures.jsonl")


@bounded(60)
@given(image_folders())
def test_every_file_ends_in_the_manifest_or_the_failures(image_model, files):
    from rectonnx.batch import explain_images, preprocess_for

    path, explainer = image_model
    with tempfile.TemporaryDirectory() as root:
        folder = write_folder(Path(root) / "images", files)
        out = Path(root) / "out"
        summary = explain_images(path, [folder], out, preprocess=preprocess_for(path),
                                 method="saliency", explainer=explainer, progress=False,
                                 write_png=False, write_overlay=False, workers=1)
        explained, failed = outcome(out)
        names = sorted(os.path.basename(p) for p in explained + failed)
        assert names == sorted(name for name, _ in files), (explained, failed)
        assert len(explained) == summary.explained


@bounded(10)
@given(image_folders())
def test_the_command_line_lists_every_file_without_a_traceback(image_model, files):
    from click.testing import CliRunner

    from rectonnx.cli import main

    path, _ = image_model
    with tempfile.TemporaryDirectory() as root:
        folder = write_folder(Path(root) / "images", files)
        out = Path(root) / "out"
        result = CliRunner().invoke(main, ["explain", str(path), str(folder), "--out", str(out),
                                           "--method", "saliency", "--no-progress", "--no-png",
                                           "--device", "cpu"])
        assert result.exit_code in (0, 2), result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), \
            result.exception
        explained, failed = outcome(out)
        assert sorted(os.path.basename(p) for p in explained + failed) == \
            sorted(name for name, _ in files)
