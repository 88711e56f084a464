"""Hard inputs: whatever a user can plausibly give ends in a result or in one clear error (on the
command line: one ``error: ...`` line and exit status 2), never a traceback.

Covered: corrupt, truncated, empty and non-ONNX model files; models with several inputs or
outputs; unsupported ops; uint8 image inputs; NaN/Inf pixels; empty batches, a batch of one and
of thousands; images of mixed sizes and modes (grayscale, RGBA, palette, 1-bit, 16-bit, CMYK,
float); unreadable image files in a directory; targets out of range. (A full disk is in
test_batch.py.)
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper, parser
from PIL import Image

import rectonnx
from rectonnx import InputError, InvalidModelError, UnsupportedModelError
from helpers import cli, one_line_error
from rectonnx.converters.pytorch import export


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 3-channel and a 1-channel CNN on 16 x 16 images (4 classes)."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    paths = {}
    for channels in (3, 1):
        net = torch.nn.Sequential(torch.nn.Conv2d(channels, 4, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                                  torch.nn.Linear(4 * 8 * 8, 4))
        paths[channels] = root / f"net{channels}.onnx"
        export(net, torch.randn(1, channels, 16, 16), paths[channels])
    return paths


run = cli  # rectonnx ARGS through click's test runner (helpers.cli)


# -- model files ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, words", [
    ("garbage", ["not a readable ONNX model"]),
    ("truncated", ["not a readable ONNX model", "is the file complete?"]),
    ("empty", ["not an ONNX model"]),
    ("picture", ["not a readable ONNX model"]),
    ("missing", ["no such model file"]),
])
def test_broken_model_files(models, tmp_path, kind, words):
    path = tmp_path / "model.onnx"
    data = models[3].read_bytes()
    content = {"garbage": b"\x00\xffnot a model" * 50, "truncated": data[:len(data) // 2],
               "empty": b"", "picture": None, "missing": None}[kind]
    if kind == "picture":
        Image.new("RGB", (8, 8)).save(tmp_path / "p.png")
        path.write_bytes((tmp_path / "p.png").read_bytes())
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(InvalidModelError):
        rectonnx.rewrite(path)
    Image.new("RGB", (16, 16)).save(tmp_path / "img.png")
    for args in (["explain", path, tmp_path / "img.png", "--out", tmp_path / "out"],
                 ["export-triton", path, "--repo", tmp_path / "repo"],
                 ["rewrite", path, "-o", tmp_path / "x.onnx"]):
        one_line_error(run(*args), *words)
    assert not (tmp_path / "out").exists() and not (tmp_path / "repo").exists()


def two_input_model(scores_use_both: bool) -> onnx.ModelProto:
    body = "a = Mul(x, m)\n r = Relu(a)" if scores_use_both else "r = Relu(x)"
    model = parser.parse_model(f'''<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4] x, float[N,4] m) => (float[N,3] y, float[N,4] z) {{
            {body}
            y = MatMul(r, w)
            z = Relu(m)
        }}''')
    model.graph.initializer.append(numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32), "w"))
    return model


def test_several_inputs_and_outputs_are_chosen_or_asked_for(tmp_path):
    model = two_input_model(scores_use_both=False)
    with pytest.raises(InvalidModelError, match=r"2 outputs \['y', 'z'\].*output_name="):
        rectonnx.rewrite(model)
    with pytest.raises(InvalidModelError, match=r"2 data inputs \['x', 'm'\].*input_name="):
        rectonnx.rewrite(model, output_name="y")
    with pytest.raises(InvalidModelError, match=r"no input 'image'; inputs: \['x', 'm'\]"):
        rectonnx.rewrite(model, input_name="image", output_name="y")
    graph = rectonnx.rewrite(model, input_name="x", output_name="y")
    assert [i.name for i in graph.graph.input] == ["x", "target"]
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    result = rectonnx.Explainer(model, "saliency", input_name="x", output_name="y").explain(x)
    w = numpy_helper.to_array(model.graph.initializer[0])
    expected = (x > 0) * w[:, result.target].T  # d y[t] / d x for y = relu(x) @ w
    np.testing.assert_allclose(result.attribution, expected, rtol=1e-6)
    path = tmp_path / "two.onnx"
    onnx.save(model, path)
    one_line_error(run("rewrite", path, "-o", tmp_path / "x.onnx"), "2 outputs",
                   "output_name")
    ok = run("rewrite", path, "-o", tmp_path / "x.onnx", "--input-name", "x",
             "--output-name", "y")
    assert ok.exit_code == 0, ok.output


def test_scores_that_depend_on_a_second_input_are_refused(tmp_path):
    model = two_input_model(scores_use_both=True)
    with pytest.raises(InvalidModelError):
        rectonnx.rewrite(model, input_name="x", output_name="y")
    path = tmp_path / "both.onnx"
    onnx.save(model, path)
    one_line_error(run("rewrite", path, "-o", tmp_path / "x.onnx", "--input-name", "x",
                       "--output-name", "y"))


def test_unsupported_ops_are_named_all_at_once(tmp_path):
    model = parser.parse_model('''<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4] x) => (float[N,3] y) {
            a = Sin(x)
            b = Cos(a)
            y = MatMul(b, w)
        }''')
    model.graph.initializer.append(numpy_helper.from_array(np.ones((4, 3), np.float32), "w"))
    with pytest.raises(UnsupportedModelError) as caught:
        rectonnx.rewrite(model)
    assert {op for op, _ in caught.value.unsupported} == {"Sin", "Cos"}
    path = tmp_path / "trig.onnx"
    onnx.save(model, path)
    Image.new("RGB", (4, 4)).save(tmp_path / "img.png")
    one_line_error(run("explain", path, tmp_path / "img.png", "--out", tmp_path / "out"),
                   "Sin", "Cos")
    one_line_error(run("export-triton", path, "--repo", tmp_path / "repo"), "Sin", "Cos")


def test_uint8_inputs_are_explained_at_their_cast_or_refused(models, tmp_path):
    """A uint8 input that only a Cast to float reads is explained at the Cast's output
    (tests/test_integer_pixels.py); one read otherwise cannot be differentiated: a clear error
    naming its type; a uint8 *batch* for a float model is refused too."""
    cast = parser.parse_model('''<ir_version: 8, opset_import: ["" : 17]>
        g (uint8[N,4] x) => (float[N,3] y) {
            f = Cast<to=1>(x)
            r = Relu(f)
            y = MatMul(r, w)
        }''')
    cast.graph.initializer.append(numpy_helper.from_array(np.ones((4, 3), np.float32), "w"))
    saliency = rectonnx.Explainer(cast, "saliency").explain(np.array([[0, 1, 2, 255]],
                                                                     np.uint8), [0])
    np.testing.assert_array_equal(saliency.attribution, [[0, 1, 1, 1]])  # the ReLU at 0
    model = parser.parse_model('''<ir_version: 8, opset_import: ["" : 17]>
        g (uint8[N,4] x) => (float[N,3] y) {
            s = Add(x, x)
            f = Cast<to=1>(s)
            y = MatMul(f, w)
        }''')
    model.graph.initializer.append(numpy_helper.from_array(np.ones((4, 3), np.float32), "w"))
    with pytest.raises(InvalidModelError, match="UINT8; rectonnx explains float32 inputs"):
        rectonnx.rewrite(model)
    path = tmp_path / "u8.onnx"
    onnx.save(model, path)
    Image.new("RGB", (4, 4)).save(tmp_path / "img.png")
    one_line_error(run("explain", path, tmp_path / "img.png", "--out", tmp_path / "out"),
                   "UINT8", "float")
    explainer = rectonnx.Explainer(models[3])
    with pytest.raises(InputError, match="integer dtype uint8.*scale/normalise"):
        explainer.explain(np.zeros((2, 3, 16, 16), np.uint8))


# -- batches ---------------------------------------------------------------------------------
def test_nan_and_inf_pixels_are_refused_by_sample(models):
    explainer = rectonnx.Explainer(models[3])
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    x[1, 0, 2, 3] = np.nan
    x[3, 2, 0, 0] = -np.inf
    with pytest.raises(InputError, match=r"samples \[1, 3\] contain NaN or Inf"):
        explainer.explain(x)


def test_empty_batch_one_sample_and_thousands(models):
    explainer = rectonnx.Explainer(models[3], batch_size=256)
    empty = explainer.explain(np.zeros((0, 3, 16, 16), np.float32))
    assert empty.attribution.shape == (0, 3, 16, 16) and empty.logits.shape == (0, 4)
    x = np.random.default_rng(0).standard_normal((3000, 3, 16, 16)).astype(np.float32)
    many = explainer.explain(x)
    assert many.attribution.shape == x.shape and np.isfinite(many.attribution).all()
    for i in (0, 1234, 2999):  # per-sample maps: the batch around a sample changes nothing
        alone = explainer.explain(x[i:i + 1])
        np.testing.assert_allclose(many.attribution[i], alone.attribution[0], rtol=0,
                                   atol=1e-6 * np.abs(alone.attribution).max())
        assert many.target[i] == alone.target[0]


def test_targets_out_of_range(models, tmp_path):
    explainer = rectonnx.Explainer(models[3])
    x = np.zeros((2, 3, 16, 16), np.float32)
    with pytest.raises(InputError, match=r"target \[4\] out of range: the model has 4 classes"):
        explainer.explain(x, [0, 4])
    with pytest.raises(InputError, match="target must be integer"):
        explainer.explain(x, [0.5, 1])
    assert (explainer.explain(x, -3).target == explainer.explain(x).target).all()
    Image.new("RGB", (16, 16)).save(tmp_path / "img.png")
    one_line_error(run("explain", models[3], tmp_path / "img.png", "--out", tmp_path / "out",
                       "--target", "7"), "out of range", "4 classes")
    assert not (tmp_path / "out").exists()  # checked before any image is read


# -- image files -------------------------------------------------------------------------------
def write_mixed_images(folder) -> dict[str, str]:
    """Pictures in every mode a user may have, of different sizes; name -> mode."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (30, 20, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "rgb.jpg")
    Image.fromarray(rgb[:, :, 0]).save(folder / "gray.png")
    rgba = np.concatenate([rgb, rng.integers(0, 255, (30, 20, 1), dtype=np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.gif")
    Image.fromarray(rgb[:, :, 0] > 128).save(folder / "bits.png")
    Image.fromarray((rng.integers(0, 65535, (12, 40))).astype(np.uint16)).save(folder / "deep.png")
    Image.fromarray(rng.integers(0, 65535, (40, 12), dtype=np.uint16)).save(folder / "deep.tif")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rng.random((9, 9)).astype(np.float32)).save(folder / "float.tif")
    Image.fromarray(rgb[:1, :1]).save(folder / "one_pixel.bmp")
    Image.fromarray(np.repeat(rgb[:1], 300, axis=0)[:, :1].copy()).save(folder / "sliver.webp")
    return {p.name: Image.open(p).mode for p in sorted(folder.iterdir())}


def write_unreadable_files(folder) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "_good.png"
    Image.new("RGB", (16, 16), "red").save(good)
    data = good.read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("this is not a picture")
    nan = np.full((8, 8), np.nan, np.float32)
    Image.fromarray(nan).save(folder / "nan.tif")
    good.unlink()
    return ["truncated.png", "empty.jpg", "text.png", "nan.tif"]


@pytest.mark.parametrize("channels", [3, 1])
def test_mixed_sizes_and_modes_are_all_explained(models, tmp_path, channels):
    modes = write_mixed_images(tmp_path / "images")
    assert {"RGB", "L", "RGBA", "P", "1", "I;16", "CMYK", "F"} <= set(modes.values())
    bad = write_unreadable_files(tmp_path / "images" / "broken")
    out = tmp_path / "out"
    result = run("explain", models[channels], tmp_path / "images", "--out", out, "--format",
                 "npz", "--no-progress")
    assert result.exit_code == 0, result.output
    assert f"explained {len(modes)} image(s)" in result.output
    assert f"skipped {len(bad)} unreadable file(s)" in result.output
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["input"].rsplit("/", 1)[1] for r in rows) == sorted(modes)
    for row in rows:
        attribution = np.load(out / row["files"]["attribution"])["attribution"]
        assert attribution.shape == (channels, 16, 16) and np.isfinite(attribution).all()
        assert (out / row["files"]["overlay"]).is_file()
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["input"].rsplit("/", 1)[1] for f in failures) == sorted(bad)
    assert all(f["error"] for f in failures)


def test_nothing_readable_and_nothing_found(models, tmp_path):
    write_unreadable_files(tmp_path / "broken")
    result = run("explain", models[3], tmp_path / "broken", "--out", tmp_path / "out",
                 "--no-progress")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "explained 0 image(s)" in result.output and "skipped 4" in result.output
    (tmp_path / "nothing").mkdir()
    one_line_error(run("explain", models[3], tmp_path / "nothing", "--out", tmp_path / "o2"),
                   "contains no images")
    one_line_error(run("explain", models[3], tmp_path / "nope/*.jpg", "--out", tmp_path / "o3"),
                   "matches no files")
    one_line_error(run("explain", models[3], tmp_path / "broken", "--out", tmp_path / "o4",
                       "--memory-budget", "lots"), "expected a size")
