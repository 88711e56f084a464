"""RectGrad's per-layer threshold: every algorithm equals one plain TopK over all scores.

The graphs under test compute ``tau`` alone from a ``[N, M]`` (or ``[N, C, H, W]``) input of
scores; the oracles are (1) the plain TopK graph rectonnx used first (sorted TopK over all M,
then ReduceMin) and (2) numpy: sort descending and take index ``k - 1``. The data has the hard
cases: ties, zeros of both signs, all-negative, all-zero, a 1e-80..1e80 dynamic range and
subnormal numbers, and q in {0, 50, 80, 98, 99.9, 100}. Equality is bit for bit, except that a
zero threshold may come out as +0.0 or -0.0 (the two compare equal in ``s > tau``).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import rectonnx
import rectonnx.threshold as threshold
from helpers import PROVIDERS, session
from rectonnx.builder import GraphBuilder
from rectonnx.threshold import (block_select_sizes, percentile_rank, percentile_threshold)

QS = [0.0, 50.0, 80.0, 98.0, 99.9, 100.0]
KINDS = ["relu", "ties", "negative", "zeros", "wide", "subnormal", "signed_zeros", "one_block"]


def scores(kind: str, shape, rng) -> np.ndarray:
    if kind == "relu":  # s = y R with y = relu(z): half exact zeros (+0 and -0)
        s = np.maximum(rng.standard_normal(shape), 0) * rng.standard_normal(shape)
    elif kind == "ties":
        s = rng.integers(-3, 4, shape).astype(np.float64)
    elif kind == "negative":
        s = -np.abs(rng.standard_normal(shape)) - 1e-3
    elif kind == "zeros":
        s = np.zeros(shape)
    elif kind == "wide":
        s = rng.standard_normal(shape) * np.exp(rng.uniform(-184, 184, shape))
    elif kind == "subnormal":
        s = rng.standard_normal(shape) * 1e-42
    elif kind == "signed_zeros":
        s = np.where(rng.random(shape) < 0.5, -0.0, 0.0) + (rng.random(shape) < 0.01)
    elif kind == "one_block":  # all large scores packed at the start: one block holds the top
        s = -rng.random(shape)
        flat = s.reshape(shape[0], -1)
        top = min(64, flat.shape[1] // 2)
        flat[:, :top] = 10 + rng.random((shape[0], top))
    else:
        raise ValueError(kind)
    return s.astype(np.float32)


def tau_graph(shape, q: float, algorithm: str, legacy: bool = False) -> onnx.ModelProto:
    g = GraphBuilder({"s", "tau"})
    if legacy:  # rectonnx's first threshold, the reference
        flat = g.Reshape("s", g.ints([0, -1]))
        static = all(isinstance(d, int) for d in shape[1:])
        k = g.ints([percentile_rank(int(np.prod(shape[1:])), q)]) if static else \
            threshold.dynamic_rank(g, flat, q)
        top, _ = g.op("TopK", flat, k, axis=1, largest=1, sorted=1, outputs=2)
        tau = g.Reshape(g.ReduceMin(top, axes=[1], keepdims=1),
                        g.ints([-1] + [1] * (len(shape) - 1)))
    else:
        tau = percentile_threshold(g, "s", tuple(shape), q, algorithm)
    g.Identity(tau, outputs=["tau"])
    graph = helper.make_graph(g.nodes, "tau", [helper.make_tensor_value_info(
        "s", TensorProto.FLOAT, list(shape))], [helper.make_tensor_value_info(
            "tau", TensorProto.FLOAT, ["N"] + [1] * (len(shape) - 1))], g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def run(sess, s) -> np.ndarray:
    return sess.run(None, {"s": s})[0].reshape(len(s))


def assert_same_threshold(actual, expected, where):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    same_bits = actual.view(np.int32) == expected.view(np.int32)
    both_zero = (actual == 0) & (expected == 0)
    assert np.all(same_bits | both_zero), f"{where}: {actual} != {expected}"


def numpy_tau(s, q):
    flat = s.reshape(len(s), -1)
    return -np.sort(-flat, axis=1)[:, percentile_rank(flat.shape[1], q) - 1]


@pytest.mark.parametrize("algorithm", ["topk", "bisect"])
@pytest.mark.parametrize("size", [6, 4096, 8 * 768])
def test_threshold_equals_plain_topk_and_numpy(algorithm, size, rng):
    for q in QS:
        shape = ["N", size]
        model = session(tau_graph(shape, q, algorithm))
        legacy = session(tau_graph(shape, q, "", legacy=True))
        for kind in KINDS:
            s = scores(kind, (3, size), rng)
            expected = run(legacy, s)
            assert_same_threshold(expected, numpy_tau(s, q), f"legacy {kind} q{q}")
            assert_same_threshold(run(model, s), expected, f"{algorithm} M={size} {kind} q{q}")


@pytest.mark.parametrize("algorithm", ["topk", "bisect"])
def test_threshold_of_an_image_shaped_layer_and_dynamic_size(algorithm, rng):
    """[N, C, H, W] scores (the rank is kept, tau is [N, 1, 1, 1]); symbolic H, W put k in the
    graph."""
    for shape, q in [(["N", 16, 8, 8], 98.0), (["N", 16, "H", "W"], 98.0),
                     (["N", 3, "H", "W"], 50.0), (["N", 32, 16, 16], 80.0)]:
        model = session(tau_graph(shape, q, algorithm))
        legacy = session(tau_graph(shape, q, "", legacy=True))
        for kind in KINDS:
            s = scores(kind, (2, shape[1], 8 if shape[2] == "H" else shape[2],
                              8 if shape[3] == "W" else shape[3]), rng)
            out = model.run(None, {"s": s})[0]
            assert out.shape == (2, 1, 1, 1)
            assert_same_threshold(out.reshape(-1), run(legacy, s), f"{shape} {kind} q{q}")


def test_two_stage_selection_is_used_and_exact_on_adversarial_blocks(monkeypatch, rng):
    """Small layers forced through the two-stage path, many random trials: ties between block
    maxima, the whole top in one block, every block maximum equal."""
    monkeypatch.setattr(threshold, "BLOCK_SELECT_MIN", 1)
    size = 384
    for q in [2.0, 10.0, 90.0, 95.0, 98.0]:  # q < 50: the mirrored (smallest) selection
        k = percentile_rank(size, q)
        assert block_select_sizes(size, min(k, size - k + 1)) is not None
        graph = tau_graph(["N", size], q, "topk")
        assert any(n.op_type == "GatherND" for n in graph.graph.node)
        model = session(graph)
        for trial in range(20):
            s = rng.integers(-2, 3, (4, size)).astype(np.float32)  # heavy ties
            s[1] = rng.standard_normal(size)
            s[2] = np.sort(rng.standard_normal(size))[::-1]  # the top in the first blocks
            s[3] = np.repeat(rng.standard_normal(size // 8), 8) if trial % 2 else 1.0
            assert_same_threshold(run(model, s), numpy_tau(s, q), f"q{q} trial {trial}")


def test_block_sizes():
    assert block_select_sizes(64 * 112 * 112, percentile_rank(64 * 112 * 112, 98)) == \
        (64 * 112 * 112 // 8, 8)
    assert block_select_sizes(100, 3) is None          # too small to pay
    assert block_select_sizes(65537, 1311) is None     # a prime: no blocks
    for size, k in [(4096, 82), (802816, 16057), (12288, 246), (6272, 126)]:
        blocks, span = block_select_sizes(size, k)
        assert blocks * span == size and blocks > k
        assert blocks + k * span <= 0.7 * size


def test_bisect_emits_no_topk_and_topk_path_is_cheaper():
    for q in QS:
        bisect = tau_graph(["N", 4096], q, "bisect")
        assert not any(n.op_type == "TopK" for n in bisect.graph.node)
    topk = tau_graph(["N", 32768], 98.0, "topk")
    sizes = [len(n.input) and n for n in topk.graph.node if n.op_type == "TopK"]
    assert len(sizes) == 2  # two TopK over a fraction of the scores, not one over all


def test_bisect_refuses_layers_too_large_to_count_in_float32():
    with pytest.raises(ValueError, match="2\\^24"):
        percentile_threshold(GraphBuilder({"s"}), "s", ("N", 2 ** 24), 98.0, "bisect")


def test_unknown_algorithm_is_an_error():
    with pytest.raises(ValueError, match="topk, bisect"):
        rectonnx.rewrite(_tiny_model(), "rectgrad", threshold="sort")


def _tiny_model():
    from helpers import parse
    return parse('<ir_version: 8, opset_import: ["" : 17]>\n'
                 "m (float[N,6] x) => (float[N,2] logits) {\n"
                 "  y = Relu(x)\n  logits = MatMul(y, w)\n}",
                 {"w": np.arange(12, dtype=np.float32).reshape(6, 2) - 5})


# -- whole explainer graphs ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def cnn():
    import torch

    from rectonnx.converters.pytorch import export

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.SiLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(32 * 16 * 16, 10)).eval()
    return export(net, torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("q", [0.0, 30.0, 80.0, 98.0, 100.0])
def test_bisect_and_topk_explainer_graphs_give_identical_maps(cnn, q, rng):
    """The threshold algorithm changes nothing in the attribution, bit for bit (SiLU makes
    negative scores, so low q puts tau below 0)."""
    x = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
    maps = {}
    for algorithm in ("topk", "bisect"):
        graph = rectonnx.rewrite(cnn, "rectgrad", q=q, threshold=algorithm)
        ops = {n.op_type for n in graph.graph.node}
        assert ("TopK" in ops) == (algorithm == "topk" and 0 < q < 100)
        sess = session(graph)
        maps[algorithm] = sess.run(["attribution"], {graph.graph.input[0].name: x,
                                                     "target": np.array([0, 3, -1])})[0]
    np.testing.assert_array_equal(maps["topk"], maps["bisect"])
    if q < 100:
        assert (maps["topk"] > 0).any()


def test_threshold_option_through_explainer_and_cli(cnn, tmp_path, rng):
    from click.testing import CliRunner

    from rectonnx.cli import main

    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    a = rectonnx.Explainer(cnn, "rectgrad", threshold="bisect", providers=PROVIDERS)
    b = rectonnx.Explainer(cnn, "rectgrad", providers=PROVIDERS)
    assert not any(n.op_type == "TopK" for n in a.graph.graph.node)
    np.testing.assert_array_equal(a.explain(x).attribution, b.explain(x).attribution)
    source = tmp_path / "cnn.onnx"
    onnx.save(cnn, source)
    out = tmp_path / "cnn_rectgrad.onnx"
    result = CliRunner().invoke(main, ["rewrite", str(source), "-o", str(out),
                                       "--threshold", "bisect"])
    assert result.exit_code == 0, result.output
    assert not any(n.op_type == "TopK" for n in onnx.load(out).graph.node)
