"""threshold="approx": RectGrad's per-layer percentile from a subsample (threshold.py, docs/maths.md
'A recall-targeted approximate threshold').

* Where it falls back (fewer than APPROX_MIN_SIZE scores, or a subsample over a quarter of them)
  it is the exact threshold, bit for bit, with static and run-time sizes.
* Where it subsamples, its tau is exactly the k_s-th largest of the documented positions (a
  numpy oracle), the same for static and run-time M, in onnxruntime and onnx.reference; and on
  random scores over many seeds it keeps a share >= recall of the units the exact gate keeps in
  all but the documented <= 2.5 % of (layer, sample) draws, keeping about (r + 2 sqrt(r / MU)) k.
* Whole explainer graphs (a large layer, the pooled shortcut, final_percentile, symbolic H and
  W) pass onnx.checker, run in onnxruntime and onnx.reference and stay close to exact.
* The option is validated: recall without threshold=approx, recall out of (0, 1] and q_input
  with approx are one clear error.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import rectonnx
import rectonnx.threshold as threshold
from helpers import make_model, session
from rectonnx.builder import GraphBuilder
from rectonnx.threshold import (approx_fraction, approx_positions, approx_rank,
                                approx_sample_size, percentile_rank, percentile_threshold)


def tau_graph(shape, q: float, algorithm: str, recall: float = 0.95) -> onnx.ModelProto:
    g = GraphBuilder({"s", "tau"})
    tau = percentile_threshold(g, "s", tuple(shape), q, algorithm, recall=recall)
    g.Identity(tau, outputs=["tau"])
    model = make_model(g.nodes, [helper.make_tensor_value_info("s", TensorProto.FLOAT,
                                                                list(shape))],
                       [helper.make_tensor_value_info("tau", TensorProto.FLOAT,
                                                      ["N"] + [1] * (len(shape) - 1))],
                       g.initializers)
    onnx.checker.check_model(model, full_check=True)
    return model


def relu_scores(shape, rng) -> np.ndarray:
    """``y R`` of a ReLU layer: about half exact zeros, distinct values elsewhere."""
    return (np.maximum(rng.standard_normal(shape), 0) * rng.standard_normal(shape)).astype(
        np.float32)


def oracle_tau(flat: np.ndarray, q: float, recall: float) -> np.ndarray:
    """The documented estimate in numpy: the k_s-th largest at ``approx_positions``."""
    size = flat.shape[1]
    sample = approx_sample_size(size, approx_fraction(q))
    assert sample is not None
    rank = approx_rank(percentile_rank(size, q), size, sample, recall)
    picked = flat[:, approx_positions(size, sample)]
    return -np.sort(-picked, axis=1)[:, rank - 1]


def exact_tau(flat: np.ndarray, q: float) -> np.ndarray:
    return -np.sort(-flat, axis=1)[:, percentile_rank(flat.shape[1], q) - 1]


def test_positions_are_distinct_stratified_and_all_when_the_sample_is_everything():
    for size, sample in [(200704, 12800), (65536, 5120), (802816, 5120), (1000, 1000)]:
        positions = approx_positions(size, sample)
        assert len(positions) == sample and np.all(np.diff(positions) > 0)
        assert positions[0] >= 0 and positions[-1] < size
        strata = np.arange(sample) * size // sample
        assert np.all(positions >= strata)
    assert np.array_equal(approx_positions(777, 777), np.arange(777))
    assert approx_sample_size(threshold.APPROX_MIN_SIZE - 1, 0.5) is None
    assert approx_sample_size(20000, approx_fraction(98.0)) is None  # s = 12800 > M / 4


@pytest.mark.parametrize("shape", [["N", 6], ["N", 4096], ["N", 16, 8, 8], ["N", 20000],
                                   ["N", 16, "H", "W"]])
def test_approx_is_exact_where_it_falls_back(shape, rng):
    for q in (95.0, 98.0):
        approx, exact = session(tau_graph(shape, q, "approx")), session(tau_graph(shape, q, "topk"))
        dims = [d if isinstance(d, int) else 30 for d in shape[1:]]  # 16 x 30 x 30 = 14400
        s = relu_scores((3, *dims), rng)
        got, expected = approx.run(None, {"s": s})[0], exact.run(None, {"s": s})[0]
        assert np.array_equal(got, expected), (shape, q)
        if all(isinstance(d, int) for d in shape[1:]):  # static: no subsample in the graph
            assert not any(n.op_type == "Gather" for n in tau_graph(shape, q, "approx").graph.node)


def test_tau_is_the_documented_estimate_static_dynamic_and_reference(rng):
    q, recall = 95.0, 0.9
    s = relu_scores((2, 16, 64, 64), rng)  # M = 65536, s = 5120
    static = tau_graph(["N", 16, 64, 64], q, "approx", recall)
    dynamic = tau_graph(["N", 16, "H", "W"], q, "approx", recall)
    expected = oracle_tau(s.reshape(2, -1), q, recall)
    for model in (static, dynamic):
        assert any(n.op_type == "Gather" for n in model.graph.node)
        got = session(model).run(None, {"s": s})[0].reshape(-1)
        assert np.array_equal(got, expected)
        assert np.array_equal(ReferenceEvaluator(model).run(None, {"s": s})[0].reshape(-1),
                              expected)
    assert not np.array_equal(expected, exact_tau(s.reshape(2, -1), q))  # it does approximate


@pytest.mark.parametrize("q", [95.0, 98.0])
def test_recall_holds_over_seeds(q):
    """Per (seed, sample): share of the exact gate's units the approximate gate keeps. The bound
    is P(share < recall) <= 2.5 % per draw; the mean share is above recall and the units kept
    are about (r + 2 sqrt(r / MU)) k."""
    size = 200704  # 64 x 56 x 56, a ResNet-50 layer
    sample = approx_sample_size(size, approx_fraction(q))
    for recall in (0.8, 0.95, 1.0):
        model = session(tau_graph(["N", size], q, "approx", recall))
        shares, kept_ratio = [], []
        for seed in range(6):
            s = relu_scores((16, size), np.random.default_rng(seed))
            tau = model.run(None, {"s": s})[0].reshape(-1)
            assert np.array_equal(tau, oracle_tau(s, q, recall))
            exact = s > exact_tau(s, q)[:, None]
            approx = s > tau[:, None]
            shares += list((exact & approx).sum(1) / exact.sum(1))
            kept_ratio += list(approx.sum(1) / exact.sum(1))
        shares = np.array(shares)
        assert (shares < recall).mean() <= 0.05, (recall, shares.min())
        assert shares.mean() >= min(recall, 0.995)  # r = 1: P(share < 1) <= 2.5 %
        rank = approx_rank(percentile_rank(size, q), size, sample, recall)
        expected_ratio = rank * size / sample / percentile_rank(size, q)
        assert expected_ratio <= recall + 2.2 * math.sqrt(recall / threshold.APPROX_EXPECTED_TOP) \
            + 0.01
        assert abs(np.mean(kept_ratio) - expected_ratio) < 0.03, (recall, np.mean(kept_ratio))


# -- whole graphs ----------------------------------------------------------------------------------
def big_layer_model(height, width) -> onnx.ModelProto:
    """Conv 3->16 (a 16 x 64 x 64 ReLU layer feeding a 2x2 max pool: the pooled shortcut with
    16384 pooled scores), Conv 16->32 + ReLU (32 x 32 x 32 = 32768 scores), global pool, Gemm."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((32, 16, 3, 3)) * 0.1).astype(np.float32)
    w3 = rng.standard_normal((32, 5)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "w3"], ["logits"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", 1, ["N", 3, height, width])],
                      [helper.make_tensor_value_info("logits", 1, ["N", 5])],
                      [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                       numpy_helper.from_array(w3, "w3")])


def cosine(a, b) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(np.min((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


@pytest.mark.parametrize("dims", [(64, 64), ("H", "W")])
def test_explainer_graph_runs_everywhere_and_stays_close(dims):
    model = big_layer_model(*dims)
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    target = np.array([-1, -1], np.int64)
    graph = rectonnx.rewrite(model, "rectgrad", q=95, threshold="approx", padding_trick=False)
    onnx.checker.check_model(graph, full_check=True)
    assert sum(n.op_type == "Gather" and "sample" in n.output[0] for n in graph.graph.node) >= \
        (2 if dims == (64, 64) else 1)  # the pooled layer (static only) and the 32 x 32 x 32
    feeds = {"x": x, "target": target}
    got = session(graph).run(["attribution"], feeds)[0]
    reference = ReferenceEvaluator(graph).run(["attribution"], feeds)[0]
    np.testing.assert_allclose(reference, got, rtol=1e-4, atol=1e-6 * np.abs(got).max())
    exact = session(rectonnx.rewrite(model, "rectgrad", q=95, padding_trick=False)).run(
        ["attribution"], feeds)[0]
    assert np.abs(got).max() > 0 and cosine(got, exact) > 0.9


def test_final_percentile_with_approx_keeps_about_the_top_share():
    model = big_layer_model(128, 128)  # the input: 3 x 128 x 128 = 49152 values per sample
    x = np.random.default_rng(2).standard_normal((2, 3, 128, 128)).astype(np.float32)
    feeds = {"x": x, "target": np.array([0, 1], np.int64)}
    maps = {}
    for algorithm in ("topk", "approx"):
        graph = rectonnx.rewrite(model, "saliency", final_percentile=95.0, threshold=algorithm)
        maps[algorithm] = session(graph).run(["attribution"], feeds)[0].reshape(2, -1)
    exact, approx = maps["topk"] != 0, maps["approx"] != 0
    assert np.all((exact & approx).sum(1) >= 0.95 * exact.sum(1))
    assert np.all(approx.sum(1) <= 1.2 * exact.sum(1))


# -- the option ------------------------------------------------------------------------------------
@pytest.mark.parametrize("options,words", [
    ({"recall": 0.9}, "recall only applies to threshold=approx"),
    ({"threshold": "bisect", "recall": 0.9}, "recall only applies"),
    ({"threshold": "approx", "recall": 0.0}, "option recall"),
    ({"threshold": "approx", "recall": 1.5}, "option recall"),
    ({"threshold": "approx", "recall": float("nan")}, "option recall"),
    ({"threshold": "approx", "q_input": True}, "q_input"),
])
def test_the_option_is_validated(options, words):
    with pytest.raises(ValueError, match=words) as caught:
        rectonnx.ExplanationSpec("rectgrad", **options)
    assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match=words):
        rectonnx.rewrite(big_layer_model(8, 8), "rectgrad", **options)
    spec = rectonnx.ExplanationSpec("saliency", threshold="approx", recall=1.0)
    assert spec.recall == 1.0 and "recall=1" in spec.describe()
    assert "recall" not in rectonnx.ExplanationSpec("rectgrad").describe()
