"""The command line: each command works end to end, and user errors are one line + exit 2."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import helper
from PIL import Image

from rectonnx.cli import main
from rectonnx.converters.pytorch import export


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 8 * 8, 3), torch.nn.Softmax(dim=1))
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    export(net, torch.randn(1, 3, 16, 16), path)
    return path


@pytest.fixture(scope="module")
def unsupported_file(tmp_path_factory):
    nodes = [helper.make_node("Sin", ["x"], ["a"], name="sine"),
             helper.make_node("Cos", ["a"], ["b"], name="cosine"),
             helper.make_node("MatMul", ["b", "w"], ["y"], name="dense")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 2])],
        [onnx.numpy_helper.from_array(np.ones((4, 2), np.float32), "w")])
    path = tmp_path_factory.mktemp("model") / "trig.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=8), path)
    return path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_rewrite_writes_a_loadable_explainer(model_file, tmp_path):
    out = tmp_path / "explainer.onnx"
    result = run("rewrite", model_file, "-o", out, "--method", "rectgrad", "--q", "90",
                 "--padding-trick", "--prr")
    assert result.exit_code == 0, result.output
    graph = onnx.load(out)
    onnx.checker.check_model(graph, full_check=True)
    assert [o.name for o in graph.graph.output] == ["logits", "attribution"]


@pytest.mark.parametrize("runtime,unpools", [("any", 0), ("onnxruntime-cpu", 1)])
def test_rewrite_for_a_runtime(model_file, tmp_path, runtime, unpools):
    out = tmp_path / "explainer.onnx"
    result = run("rewrite", model_file, "-o", out, "--method", "saliency", "--runtime", runtime)
    assert result.exit_code == 0, result.output
    graph = onnx.load(out)
    onnx.checker.check_model(graph, full_check=True)
    assert sum(n.op_type == "MaxUnpool" for n in graph.graph.node) == unpools


def test_info_reports_coverage(model_file, unsupported_file):
    ok = run("info", model_file)
    assert ok.exit_code == 0 and "every op on the path has a backward rule" in ok.output
    bad = run("info", unsupported_file)  # the report, then why it cannot be rewritten
    assert bad.exit_code == 2
    assert "NO  Sin x1" in bad.output and "NO  Cos x1" in bad.output
    assert bad.output.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize("args, words", [
    (["rewrite", "{trig}", "-o", "{tmp}/x.onnx"], ["Sin", "sine", "Cos", "cosine"]),
    (["info", "{garbage}"], ["not a readable ONNX model"]),
    (["rewrite", "{tmp}/missing.onnx", "-o", "{tmp}/x.onnx"], ["no such model file"]),
])
def test_user_errors_are_one_line_and_exit_2(args, words, unsupported_file, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a model at all" * 10)
    args = [a.format(trig=unsupported_file, garbage=garbage, tmp=tmp_path) for a in args]
    result = run(*args)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0]


def test_explain_directory_writes_maps_pictures_manifest_and_skips_bad_files(model_file,
                                                                              tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
            images / f"img{i}.png")
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    result = run("explain", model_file, images, "--out", out, "--preset", "minus1to1")
    assert result.exit_code == 0, result.output
    assert "explained 3 image(s)" in result.output and "skipped 1" in result.output
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["input"].split("/")[-1] for r in records] == ["img0.png", "img1.png", "img2.png"]
    for record in records:
        attribution = np.load(out / record["files"]["attribution"])
        assert attribution.shape == (3, 16, 16) and (attribution >= 0).all()  # RectGrad >= 0
        assert Image.open(out / record["files"]["heatmap"]).size == (16, 16)
        assert record["target"] == record["predicted"]
        assert 0.0 < record["probability"] <= 1.0
