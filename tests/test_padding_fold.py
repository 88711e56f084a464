"""The padding-trick mask folded into the gate's boolean mask (rules/linear._fold_into_gate).

``dY * Cast(b) * m`` and ``dY * Cast(b & m)`` are equal bit for bit, so the folded graph must
give the same attribution as the one with the separate Mul, and the right one against torch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, distinct_values, explain, parse, run_explainer

import rectonnx
import rectonnx.rules.linear as linear


def conv_relu6_model(rng, h=6, w=7, channels=3, group=1):
    """x [N,3,h,w] -> Conv 3x3 pad 1 -> Clip(0, 6) -> Conv 3x3 pad 1 -> Clip -> MatMul head."""
    w1 = rng.standard_normal((channels, channels // group, 3, 3)).astype(np.float32) * 2
    w2 = rng.standard_normal((channels, channels // group, 3, 3)).astype(np.float32)
    head = rng.standard_normal((channels * h * w, 4)).astype(np.float32)
    model = parse('<ir_version: 8, opset_import: ["" : 17]>\n'
                  f"pf (float[N,{channels},{h},{w}] x) => (float[N,4] logits) {{\n"
                  f"  a = Conv <pads = [1, 1, 1, 1], group = {group}> (x, w1)\n"
                  "  b = Clip(a, low, high)\n"
                  f"  c = Conv <pads = [1, 1, 1, 1], group = {group}> (b, w2)\n"
                  "  d = Clip(c, low, high)\n"
                  "  f = Flatten(d)\n  logits = MatMul(f, head)\n}",
                  {"w1": w1, "w2": w2, "head": head, "low": np.array(0.0, np.float32),
                   "high": np.array(6.0, np.float32)})
    return model, (w1, w2, head)


def _graph(model, method, fold, monkeypatch, **options):
    monkeypatch.setattr(linear, "FOLD_PADDING_MASK", fold)
    return rectonnx.rewrite(model, method, **options)


@pytest.mark.parametrize("method,options", [("saliency", {"padding_trick": True}),
                                            ("rectgrad", {}),
                                            ("rectgrad", {"q": 80.0, "padding_trick": "border"}),
                                            ("guided_backprop", {"padding_trick": True})])
@pytest.mark.parametrize("group", [1, 3])
def test_fold_is_bit_equal_to_the_separate_mask(method, options, group, rng, monkeypatch):
    model, _ = conv_relu6_model(rng, group=group)
    x = distinct_values((2, 3, 6, 7), rng, -2.0, 2.0)
    folded = _graph(model, method, True, monkeypatch, **options)
    plain = _graph(model, method, False, monkeypatch, **options)
    target = [1, 3]
    a = run_explainer(folded, x, target)[1]
    b = run_explainer(plain, x, target)[1]
    np.testing.assert_array_equal(a, b)
    ands = [n for n in folded.graph.node if n.op_type == "And" and "keep_inside" in n.name]
    muls = [n for n in folded.graph.node if n.op_type == "Mul" and "/masked" in n.name]
    if method == "guided_backprop":  # Relu(exact) is no masked product: the Mul stays
        assert not ands and muls
    else:
        assert len(ands) == 2 and not muls
        assert not [t for t in folded.graph.initializer if "padding_trick_mask" in t.name]


def test_folded_saliency_against_torch(rng, monkeypatch):
    """Saliency with the padding trick: dX of each conv from dY * I(0 < y < 6) * mask."""
    model, (w1, w2, head) = conv_relu6_model(rng)
    x = distinct_values((2, 3, 6, 7), rng, -2.0, 2.0)
    target = [0, 2]
    monkeypatch.setattr(linear, "FOLD_PADDING_MASK", True)
    _, attribution = explain(model, x, target, "saliency", padding_trick=True)
    inputs = torch.tensor(x.astype(np.float64), requires_grad=True)
    border = torch.zeros(1, 1, 6, 7, dtype=torch.float64)
    border[..., 1:-1, 1:-1] = 1.0  # 3x3, pad 1: the outputs whose window reads no padding

    class Masked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value):
            return value

        @staticmethod
        def backward(ctx, grad):
            return grad * border

    def relu6(value):
        return torch.clamp(value, 0.0, 6.0)

    a = F.conv2d(inputs, torch.from_numpy(w1.astype(np.float64)), padding=1)
    c = F.conv2d(relu6(Masked.apply(a)), torch.from_numpy(w2.astype(np.float64)), padding=1)
    logits = relu6(Masked.apply(c)).flatten(1) @ torch.from_numpy(head.astype(np.float64))
    seed = torch.zeros_like(logits)
    seed[0, target[0]] = seed[1, target[1]] = 1.0
    (expected,) = torch.autograd.grad(logits, inputs, seed)
    assert_close(attribution, expected.numpy(), "folded padding trick vs torch")
