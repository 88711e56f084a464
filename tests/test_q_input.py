"""RectGrad's percentile as a graph input with a default (``rewrite(..., q_input=True)``):
one graph serves every ``q``, per request and per sample, and gives exactly the maps of the
graph built for that ``q``."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx.reference import ReferenceEvaluator

import rectonnx
from rectonnx.cli import main
from rectonnx.serve import parse_config

from helpers import export


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(8 * 8 * 8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    return export(net.eval(), torch.randn(1, 3, 16, 16))


X = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
TARGET = np.array([-1, 2, 4], np.int64)


def run(graph, **extra):
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["logits", "attribution"], {"x": X, "target": TARGET, **extra})[1]


@pytest.mark.parametrize("threshold", ["topk", "bisect"])
def test_every_q_matches_the_graph_built_for_it(model, threshold):
    graph = rectonnx.rewrite(model, "rectgrad", q=98.0, q_input=True, threshold=threshold)
    assert [i.name for i in graph.graph.input] == ["x", "target", "q"]
    np.testing.assert_array_equal(run(graph), run(rectonnx.rewrite(model, q=98.0,
                                                                   threshold=threshold)))
    for q in (0.0, 37.5, 80.0, 99.0, 100.0):
        static = run(rectonnx.rewrite(model, q=q, threshold=threshold))
        np.testing.assert_array_equal(run(graph, q=np.array([q])), static)
    per_sample = np.array([10.0, 98.0, 60.0])
    mixed = run(graph, q=per_sample)
    for i, q in enumerate(per_sample):
        np.testing.assert_array_equal(mixed[i], run(rectonnx.rewrite(model, q=q,
                                                                     threshold=threshold))[i])


def test_out_of_range_and_nan_q(model):
    graph = rectonnx.rewrite(model, q=90.0, q_input=True)
    np.testing.assert_array_equal(run(graph, q=np.array([150.0])),
                                  run(rectonnx.rewrite(model, q=100.0)))
    np.testing.assert_array_equal(run(graph, q=np.array([-5.0])),
                                  run(rectonnx.rewrite(model, q=0.0)))
    np.testing.assert_array_equal(run(graph, q=np.array([np.nan, 50.0, np.nan]))[[0, 2]],
                                  run(rectonnx.rewrite(model, q=90.0))[[0, 2]])


def test_reference_evaluator_agrees_and_options_are_checked(model):
    graph = rectonnx.rewrite(model, q=98.0, q_input=True)
    reference = ReferenceEvaluator(graph)
    for extra in ({}, {"q": np.array([70.0, 98.0, 99.5])}):
        expected = run(graph, **extra)
        got = reference.run(["attribution"], {"x": X, "target": TARGET, **extra})[0]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    with pytest.raises(ValueError, match="saliency has no option q"):
        rectonnx.rewrite(model, "saliency", q_input=True)
    with pytest.raises(ValueError, match="q_input makes q a graph input"):
        rectonnx.rewrite(model, tau=0.0, q_input=True)


def test_triton_lists_q_as_an_optional_per_sample_input(model, tmp_path):
    pytest.importorskip("tritonclient")
    onnx.save(model, tmp_path / "m.onnx")
    result = CliRunner().invoke(main, ["export-triton", str(tmp_path / "m.onnx"), "--repo",
                                       str(tmp_path / "repo"), "--name", "m", "--q-input",
                                       "--max-batch-size", "8"])
    assert result.exit_code == 0, result.output
    config = parse_config((tmp_path / "repo" / "m" / "config.pbtxt").read_text())
    q = next(t for t in config.input if t.name == "q")
    assert q.optional and list(q.dims) == [1] and q.HasField("reshape")
    assert q.data_type == 12  # TYPE_FP64


def test_cli_rewrite_writes_a_graph_with_q_as_input(model, tmp_path):
    onnx.save(model, tmp_path / "m.onnx")
    out = tmp_path / "explainer.onnx"
    result = CliRunner().invoke(main, ["rewrite", str(tmp_path / "m.onnx"), "-o", str(out),
                                       "--q", "95", "--q-input"])
    assert result.exit_code == 0, result.output
    graph = onnx.load(out)
    assert [i.name for i in graph.graph.input] == ["x", "target", "q"]
    np.testing.assert_array_equal(run(graph), run(rectonnx.rewrite(model, q=95.0)))
    np.testing.assert_array_equal(run(graph, q=np.array([50.0])),
                                  run(rectonnx.rewrite(model, q=50.0)))
    refused = CliRunner().invoke(main, ["rewrite", str(tmp_path / "m.onnx"), "-o", str(out),
                                        "--method", "saliency", "--q-input"])
    assert refused.exit_code == 2 and "saliency has no option q" in refused.output
