"""Half-precision models (normalize.upcast_half_precision, precision.py).

* ``precision="fp32"``: a ``.half()`` PyTorch model exported to ONNX is explained in float32 with
  its float16 weights upcast, so the explainer equals torch autograd of the same net in float32
  with those weights; its map stays close to the map of the float32 model it was made from (the
  weights' rounding is the only difference).
* ``precision="model"`` (default): the explainer computes in float16 (input and outputs float16)
  except the percentile thresholds (float32, checked on the graph); on ``onnx.reference``,
  onnxruntime's CPU provider (with its MaxUnpool backward) and OpenVINO its map is within float16
  rounding of the float32 explainer of the same weights; where onnxruntime lacks a float16
  kernel the Explainer says to use precision="fp32" or CUDA.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from helpers import assert_close, run_explainer, torch_gradient
from rectonnx.artifact import read_stamp
from rectonnx.cli import main
from rectonnx.errors import ExecutionError, InputError

import rectonnx


def half_model(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).eval()
    x = torch.randn(3, 3, 8, 8)
    full = io.BytesIO()
    torch.onnx.export(net, (x,), full, dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}})
    half = io.BytesIO()
    torch.onnx.export(net.half(), (x.half(),), half, dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N"}})
    assert onnx.load_from_string(half.getvalue()).graph.input[0].type.tensor_type.elem_type == \
        onnx.TensorProto.FLOAT16
    return net.float(), x.numpy(), full.getvalue(), half.getvalue()


def test_a_float16_model_is_explained_in_float32_with_its_weights():
    upcast_net, x, _, half = half_model()
    graph = rectonnx.rewrite(half, "saliency", precision="fp32")
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert read_stamp(graph).upcast_from == "float16"
    x16 = x.astype(np.float16).astype(np.float32)  # the values an fp16 caller can send
    logits, attribution = run_explainer(graph, x16, [0, 1, -1])
    expected_logits, expected = torch_gradient(upcast_net, x16, [0, 1, -1])
    assert_close(logits, expected_logits, "float16 model: logits vs upcast torch")
    assert_close(attribution, expected, "float16 model: saliency vs upcast torch")
    result = rectonnx.Explainer(half, "rectgrad", precision="fp32").explain(x.astype(np.float16))
    assert result.attribution.dtype == np.float32 and (result.attribution >= 0).all()
    assert result.attribution.any()


def test_the_float16_map_stays_close_to_the_float32_models():
    _, x, full, half = half_model(1)
    for method in ("saliency", "rectgrad"):
        options = {"q": 90.0} if method == "rectgrad" else {}
        maps = [run_explainer(rectonnx.rewrite(model, method, precision="fp32", **options), x,
                              [0, 1, 2])[1]
                for model in (full, half)]
        cosine = float(maps[0].ravel() @ maps[1].ravel() /
                       (np.linalg.norm(maps[0]) * np.linalg.norm(maps[1])))
        assert cosine > 0.99, (method, cosine)


def test_info_says_an_explainer_computes_in_float32(tmp_path):
    _, _, _, half = half_model()
    path = tmp_path / "explainer.onnx"
    onnx.save(rectonnx.rewrite(half, "saliency", precision="fp32"), str(path))
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 0 and "the source model is float16" in result.output


# -- computing in float16 (precision="model") --------------------------------------------------
def reference_run(graph: onnx.ModelProto, x: np.ndarray, target) -> tuple[np.ndarray, np.ndarray]:
    """``(logits, attribution)`` by onnx.reference, fed in the graph's own input type."""
    from onnx.reference import ReferenceEvaluator

    dtype = onnx.helper.tensor_dtype_to_np_dtype(graph.graph.input[0].type.tensor_type.elem_type)
    logits, attribution = ReferenceEvaluator(graph).run(
        ["logits", "attribution"], {graph.graph.input[0].name: x.astype(dtype),
                                    "target": np.asarray(target, np.int64)})
    return logits.astype(np.float32), attribution.astype(np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def value_types(graph: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(graph).graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.input, *inferred.output, *inferred.value_info]}
    types.update({t.name: t.data_type for t in graph.graph.initializer})
    return types


FLOAT16_TOLERANCE = 1e-2  # max |a - b| / max |b|: a few float16 ulps of the map's largest value


def test_a_float16_model_computes_in_float16_by_default():
    upcast_net, x, _, half = half_model()
    graph = rectonnx.rewrite(half, "saliency")
    types = value_types(graph)
    assert [types[i.name] for i in graph.graph.input] == [onnx.TensorProto.FLOAT16,
                                                          onnx.TensorProto.INT64]
    assert {types[o.name] for o in graph.graph.output} == {onnx.TensorProto.FLOAT16}
    made = read_stamp(graph)
    assert made.upcast_from == "float16" and made.computes_in == "float16"
    assert made.spec.precision == "model"
    # no float32 tensor is left in a graph without thresholds
    assert onnx.TensorProto.FLOAT not in set(types.values())
    x16 = x.astype(np.float16)
    logits, attribution = reference_run(graph, x16, [0, 1, -1])
    expected_logits, expected = torch_gradient(upcast_net, x16.astype(np.float32), [0, 1, -1])
    scale = np.abs(expected).max()
    assert np.abs(attribution - expected).max() <= FLOAT16_TOLERANCE * scale
    assert np.abs(logits - expected_logits).max() <= FLOAT16_TOLERANCE * \
        np.abs(expected_logits).max()
    assert cosine(attribution, expected) > 0.9999


def test_the_float16_rectgrad_map_matches_the_float32_one():
    _, x, _, half = half_model(1)
    x16 = x.astype(np.float16)
    for options in ({"q": 90.0}, {"q": 90.0, "threshold": "bisect"},
                    {"q": 90.0, "final_percentile": 90.0}, {"tau": 1e-4}):
        map16, map32 = (reference_run(rectonnx.rewrite(half, "rectgrad", precision=precision,
                                                       **options), x16, [0, 1, 2])[1]
                        for precision in ("model", "fp32"))
        assert cosine(map16, map32) > 0.999, options
        # the gate keeps (almost) the same units: the maps' supports agree
        assert np.mean((map16 > 0) == (map32 > 0)) > 0.99, options


def test_the_thresholds_compute_in_float32():
    _, _, _, half = half_model()
    for options in ({}, {"threshold": "bisect"}, {"threshold": "approx", "q": 95.0},
                    {"final_percentile": 95.0}, {"q_input": True}):
        graph = rectonnx.rewrite(half, "rectgrad", **options)
        types = value_types(graph)
        selections = [n for n in graph.graph.node if n.op_type in ("TopK", "ReduceSum")
                      and n.name.startswith(("grad/", "final_threshold/"))]
        comparisons = [n for n in graph.graph.node if n.op_type == "Greater"]
        assert comparisons, options
        for node in selections + comparisons:
            assert all(types[i] == onnx.TensorProto.FLOAT for i in node.input[:2] if i and
                       types.get(i) in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)), \
                (options, node.name)
        # the forward and backward pass compute in float16: every Conv and ConvTranspose
        assert all(types[n.input[0]] == onnx.TensorProto.FLOAT16 for n in graph.graph.node
                   if n.op_type in ("Conv", "ConvTranspose"))
    from rectonnx.precision import threshold_nodes

    assert threshold_nodes(rectonnx.rewrite(half, "saliency", precision="fp32").graph) == set()


def test_precision_fp32_is_the_float32_graph():
    _, x, full, half = half_model()
    graph = rectonnx.rewrite(half, "rectgrad", precision="fp32")
    assert all(t.data_type != onnx.TensorProto.FLOAT16 for t in graph.graph.initializer)
    assert read_stamp(graph).computes_in == "float32"
    # a float32 model ignores the option: the same graph
    same = [rectonnx.rewrite(full, "rectgrad", precision=p).graph for p in ("model", "fp32")]
    assert same[0].SerializeToString() == same[1].SerializeToString()
    assert read_stamp(rectonnx.rewrite(full, "rectgrad")).computes_in is None


def test_the_explainer_runs_float16_graphs_on_the_cpu_provider():
    _, x, _, half = half_model(2)
    explainer = rectonnx.Explainer(half, "rectgrad", providers=["CPUExecutionProvider"])
    assert explainer.spec.runtime == "onnxruntime-cpu"  # MaxUnpool: a float16 kernel on CPU
    result = explainer.explain(x, [0, 1, 2])  # a float32 batch is cast to float16
    assert result.attribution.dtype == np.float32 and result.logits.dtype == np.float32
    reference = reference_run(explainer.graph, x.astype(np.float16), [0, 1, 2])[1]
    assert np.abs(result.attribution - reference).max() <= \
        FLOAT16_TOLERANCE * np.abs(reference).max()
    # a float32 value float16 cannot hold is one clear error, not "NaN or Inf"
    big = x.copy()
    big[1, 0, 0, 0] = 1e5
    with pytest.raises(InputError, match=r"samples \[1\] hold values beyond float16's range"):
        explainer.explain(big)
    # the portable graph's max-pool backward (ScatterElements 'add') has no float16 CPU kernel
    portable = rectonnx.Explainer(half, "rectgrad", providers=["CPUExecutionProvider"],
                                  runtime="any")
    with pytest.raises(ExecutionError, match=r"precision='fp32'.*CUDA") as caught:
        portable.explain(x)
    assert "Traceback" not in str(caught.value)


def test_openvino_runs_the_float16_graph():
    ov = pytest.importorskip("openvino")
    _, x, _, half = half_model(3)
    graph = rectonnx.rewrite(half, "rectgrad", q=90.0)
    reference = reference_run(graph, x.astype(np.float16), [0, 1, 2])[1]
    core = ov.Core()
    compiled = core.compile_model(core.read_model(graph.SerializeToString()), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f16"})
    out = compiled({"x": x.astype(np.float16), "target": np.array([0, 1, 2])})
    attribution = np.asarray(out[compiled.output("attribution")], np.float32)
    assert cosine(attribution, reference) > 0.999


def bfloat16_model() -> bytes:
    """A 2-layer MLP with bfloat16 weights and input (MatMul, Add, Relu take bfloat16)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def bf16(name, shape):
        values = rng.standard_normal(shape).astype(np.float32)
        tensor = numpy_helper.from_array(values, name)
        return helper.make_tensor(name, TensorProto.BFLOAT16, shape,
                                  onnx.numpy_helper.to_array(tensor).ravel().tolist())

    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Add", ["h", "b1"], ["z"]),
             helper.make_node("Relu", ["z"], ["a"]),
             helper.make_node("MatMul", ["a", "w2"], ["y"])]
    graph = helper.make_graph(
        nodes, "bf16", [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["N", 3])],
        [bf16("w1", [6, 8]), bf16("b1", [8]), bf16("w2", [8, 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_a_bfloat16_model_computes_in_float32_with_a_warning():
    from rectonnx.precision import PrecisionWarning

    with pytest.warns(PrecisionWarning, match="float32"):
        graph = rectonnx.rewrite(bfloat16_model(), "saliency")
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert read_stamp(graph).computes_in == "float32"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        rectonnx.rewrite(bfloat16_model(), "saliency", precision="fp32")


def test_info_says_the_explainer_computes_in_float16(tmp_path):
    _, _, _, half = half_model()
    model = tmp_path / "half.onnx"
    model.write_bytes(half)
    result = CliRunner().invoke(main, ["info", str(model)])
    assert result.exit_code == 0 and "computes in float16 as deployed" in result.output
    path = tmp_path / "explainer.onnx"
    onnx.save(rectonnx.rewrite(half, "rectgrad"), str(path))
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 0 and "computes in float16 as the source model" in result.output


def test_rectonnx_explain_saves_float32_maps_of_a_float16_model(tmp_path):
    from PIL import Image

    _, _, _, half = half_model()
    model = tmp_path / "half.onnx"
    model.write_bytes(half)
    rng = np.random.default_rng(0)
    images = []
    for i in range(2):
        images.append(tmp_path / f"im{i}.png")
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(images[-1])
    result = CliRunner().invoke(main, ["explain", str(model), *map(str, images), "--out",
                                       str(tmp_path / "maps"), "--no-png", "--no-progress",
                                       "--method", "saliency", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    saved = np.load(tmp_path / "maps" / "im0.npy")
    assert saved.dtype == np.float32 and saved.shape == (3, 8, 8) and np.abs(saved).max() > 0
