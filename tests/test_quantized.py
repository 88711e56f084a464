"""QDQ int8 models (rules/quantize.py): the straight-through gradient clipped to the range.

* A tiny QDQ net against torch's ``fake_quantize_per_tensor_affine``, whose backward is that
  estimator: saliency equals torch autograd; RectGrad with tau = 0 gates where the quantizer
  folded the ReLU (zero point = qmin) and equals a literal torch version (a hook ``I(y g > 0)``
  on the fake-quantized activation).
* The shipped paper CNN quantized by ``onnxruntime.quantization.quantize_static`` (QDQ,
  per-channel weights): the explainer's logits equal onnxruntime's run of the quantized model,
  and its maps agree with the float model's (benchmarks/quantized.py measures more).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from helpers import assert_close, make_model, run_explainer, session

import rectonnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from quantized import quantize, shipped_batch  # noqa: E402  (benchmarks/quantized.py)
S0, S1 = 0.05, 0.04  # input quantizer (zero point 0), hidden quantizer (zero point -128: a ReLU)


def tiny_qdq(rng):
    w1 = rng.normal(0, 0.5, (8, 16)).astype(np.float32)
    w2 = rng.normal(0, 0.5, (16, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(np.float32(S0), "s0"),
             numpy_helper.from_array(np.int8(0), "z0"),
             numpy_helper.from_array(np.float32(S1), "s1"),
             numpy_helper.from_array(np.int8(-128), "z1")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s0", "z0"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s0", "z0"], ["xd"]),
             helper.make_node("MatMul", ["xd", "w1"], ["h"]),
             helper.make_node("QuantizeLinear", ["h", "s1", "z1"], ["hq"]),
             helper.make_node("DequantizeLinear", ["hq", "s1", "z1"], ["hd"]),
             helper.make_node("MatMul", ["hd", "w2"], ["logits"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                       [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
                       inits)
    return model, w1, w2


def torch_attribution(w1, w2, x, target, *, gate_tau0: bool):
    xt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    xd = torch.fake_quantize_per_tensor_affine(xt, S0, 0, -128, 127)
    h = xd @ torch.from_numpy(w1)
    hd = torch.fake_quantize_per_tensor_affine(h, S1, -128, -128, 127)
    if gate_tau0:
        hd.register_hook(lambda g: g * ((hd.detach() * g) > 0))
    logits = hd @ torch.from_numpy(w2)
    logits[torch.arange(len(target)), torch.as_tensor(target)].sum().backward()
    return logits.detach().numpy(), xt.grad.numpy()


def test_qdq_saliency_and_rectgrad_equal_torch_fake_quantize(rng):
    model, w1, w2 = tiny_qdq(rng)
    # values that stay away from rounding ties and fall both inside and outside the input range
    x = (np.round(rng.uniform(-9, 9, (6, 8)) / S0) * S0 + 0.3 * S0).astype(np.float32)
    target = np.array([0, 1, 2, 0, 1, 2])
    torch_logits, expected = torch_attribution(w1, w2, x, target, gate_tau0=False)
    logits, saliency = run_explainer(rectonnx.rewrite(model, "saliency"), x, target)
    assert_close(logits, torch_logits, "QDQ logits vs torch fake_quantize", tol=1e-5)
    assert_close(saliency, expected, "QDQ saliency vs torch fake_quantize backward", tol=1e-5)
    outside = np.abs(x) > 127 * S0
    assert outside.any() and not saliency[outside].any()  # clipped outside the range
    _, literal = torch_attribution(w1, w2, x, target, gate_tau0=True)
    _, rect = run_explainer(rectonnx.rewrite(model, "rectgrad", tau=0.0), x, target)
    assert_close(rect, np.maximum(x * literal, 0), "QDQ rectgrad (tau 0) vs literal torch",
                 tol=1e-5)
    assert not np.allclose(literal, expected)  # the gate at the folded ReLU did something


def digits_batch():
    model = ROOT / "models" / "paper_cnn_digits.onnx"
    return model, shipped_batch(model, "digits_*.png")


@pytest.fixture(scope="module")
def quantized_paper_cnn(tmp_path_factory):
    model, batch = digits_batch()
    target = tmp_path_factory.mktemp("qdq") / "paper_cnn_qdq.onnx"
    return model, quantize(model, batch, target, "QDQ"), batch


def cosine(a, b):
    return float(a.ravel() @ b.ravel() / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("method", ["saliency", "rectgrad"])
def test_quantize_static_models_are_explained(quantized_paper_cnn, method):
    model, quantized, batch = quantized_paper_cnn
    proto = onnx.load(str(quantized))
    assert not any(n.op_type == "Relu" for n in proto.graph.node)  # folded into the quantizers
    explainer = rectonnx.rewrite(quantized, method)
    logits, maps = run_explainer(explainer, batch, [-1] * len(batch))
    reference = session(proto).run(None, {"input": batch})[0]
    assert_close(logits, reference, "QDQ explainer logits vs onnxruntime QDQ model", tol=1e-5)
    float_logits, float_maps = run_explainer(rectonnx.rewrite(model, method), batch,
                                             [-1] * len(batch))
    assert (logits.argmax(1) == float_logits.argmax(1)).all()
    # measured 0.983 (saliency) and 0.985 (rectgrad) median on these six images
    assert min(cosine(a, b) for a, b in zip(maps, float_maps)) > 0.9


def test_blocked_int4_weights_are_dequantized(rng):
    """Opset 21 blocked quantization (``block_size``; int4 weight-only, as for LLM MatMuls):
    the constant weight becomes ``(w - zp) * scale`` with each scale and zero point repeated
    over its block; the explainer's logits equal onnxruntime's run of the blocked model and
    its gradient equals that of the float weight (a float model with it, torch autograd)."""
    w = rng.integers(-8, 8, (8, 5)).astype(np.int8)  # [K, C]: blocks of 4 along K (axis 0)
    scale = rng.uniform(0.05, 0.2, (2, 5)).astype(np.float32)
    zero = rng.integers(-2, 2, (2, 5)).astype(np.int8)
    int4 = [helper.make_tensor(name, TensorProto.INT4, v.shape, v.flatten().tolist())
            for name, v in (("w", w), ("z", zero))]
    nodes = [helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wf"], axis=0,
                              block_size=4),
             helper.make_node("MatMul", ["x", "wf"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    graph = helper.make_graph(
        nodes, "blocked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [*int4, numpy_helper.from_array(scale, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    x = rng.normal(size=(4, 8)).astype(np.float32)
    target = np.array([0, 1, 4, 2])
    logits, attribution = run_explainer(rectonnx.rewrite(model, "saliency"), x, target)
    assert_close(logits, session(model).run(None, {"x": x})[0],
                 "onnxruntime (blocked int4 model)")
    real = torch.tensor((w - np.repeat(zero, 4, 0)) * np.repeat(scale, 4, 0),
                        dtype=torch.float64)
    inputs = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    torch.relu(inputs @ real)[torch.arange(4), torch.as_tensor(target)].sum().backward()
    assert_close(attribution, inputs.grad.numpy(), "torch autograd (blocked int4 weights)")
    wrong = helper.make_graph(nodes, "blocked", list(graph.input), list(graph.output),
                              [*int4, numpy_helper.from_array(scale[:1], "s")])
    with pytest.raises(ValueError, match="block_size 4"):
        rectonnx.rewrite(helper.make_model(wrong, opset_imports=[helper.make_opsetid("", 21)],
                                           ir_version=10), "saliency")


def test_qoperator_models_are_their_qdq_models(quantized_paper_cnn, tmp_path):
    """QOperator int8 models (QLinearConv, QGemm, int8 MaxPool/Flatten: the model zoo's
    format) become QDQ models (qoperator.py): on the paper CNN the explainer's logits equal
    onnxruntime's run of the QOperator model and its maps those of the QDQ model of the same
    quantization."""
    from rectonnx.normalize import normalize
    from rectonnx.qoperator import QOPERATOR_OPS

    model, qdq, batch = quantized_paper_cnn
    qop = quantize(model, batch, tmp_path / "paper_cnn_qop.onnx", "QOperator")
    ops = {n.op_type for n in onnx.load(str(qop)).graph.node}
    assert {"QLinearConv", "QGemm", "MaxPool"} <= ops and "Conv" not in ops
    assert not {n.op_type for n in normalize(qop).graph.node} & QOPERATOR_OPS
    reference = session(onnx.load(str(qop))).run(None, {"input": batch})[0]
    for method in ("saliency", "rectgrad"):
        logits, maps = run_explainer(rectonnx.rewrite(qop, method), batch, [-1] * len(batch))
        assert_close(logits, reference, "QOperator explainer logits vs onnxruntime", tol=1e-5)
        _, qdq_maps = run_explainer(rectonnx.rewrite(qdq, method), batch, logits.argmax(1))
        assert_close(maps, qdq_maps, f"QOperator vs QDQ maps ({method})", tol=1e-5)


def test_qoperator_efficientnet_with_its_adds_and_pooling(tmp_path):
    """EfficientNet-Lite0 in QOperator format adds QLinearAdd and QLinearGlobalAveragePool
    (com.microsoft): the predictions of onnxruntime's integer kernels (whose requantization
    rounds differently: logits within 3 % of their range) and a finite RectGrad map."""
    model = ROOT / "models" / "efficientnet_lite0.onnx"
    batch = shipped_batch(model, "*.jpg")
    qop = quantize(model, batch, tmp_path / "lite0_qop.onnx", "QOperator")
    ops = {n.op_type for n in onnx.load(str(qop)).graph.node}
    assert {"QLinearAdd", "QLinearGlobalAveragePool", "QLinearConv"} <= ops
    proto = onnx.load(str(qop))
    reference = session(proto).run(None, {proto.graph.input[0].name: batch})[0]
    logits, maps = run_explainer(rectonnx.rewrite(qop, "rectgrad"), batch, [-1] * len(batch))
    top3 = np.argsort(-reference, axis=1)[:, :3]  # near-ties may swap by one quantum
    assert all(p in row for p, row in zip(logits.argmax(1), top3))
    assert np.abs(logits - reference).max() <= 0.03 * np.ptp(reference)
    assert np.isfinite(maps).all() and (maps >= 0).all() and maps.max() > 0
