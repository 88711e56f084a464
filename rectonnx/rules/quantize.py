"""Backward rules of quantization (QDQ int8 models, e.g. ``onnxruntime.quantization``'s
``quantize_static`` in QDQ format): a straight-through gradient, clipped to the representable
range, as torch's ``fake_quantize_per_tensor_affine`` backward computes it.

With ``q = QuantizeLinear(x) = clamp(round(x / s) + zp, qmin, qmax)`` and the real value
``y = DequantizeLinear(q) = (q - zp) s``:

* DequantizeLinear:  ``dq = dY s`` (the gradient carried on the integer tensor, as a float).
* QuantizeLinear:    ``R = dq / s`` (the gradient of the real value ``y``) and
  ``dx = R I(qmin <= round(x / s) + zp <= qmax)`` (the straight-through estimator; ``round``
  half to even, as both torch and ONNX round).

A quantization range that starts at 0 (``zp = qmin``, e.g. zero point -128 for int8) is where
``quantize_static`` folded a ReLU into the quantizer: ``y = max(0, ...)``. There the rule hands
the method an activation, ``Activation(z = x, y = y, upstream = R, exact = R * inside,
mask = inside)``, so saliency keeps the clipped straight-through gradient and RectGrad gates
where the ReLU was, with ``I(y R > tau) R`` and the range mask (as at a Clip). Elsewhere (the
input's quantizer, after an Add) the straight-through gradient passes ungated. Per-axis
scales broadcast along ``axis``. Constant weights, blocked ones included, never reach these
rules: normalize.dequantize_constant_weights turns them into float initializers.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from .base import Activation, RuleContext, rule

INTEGER_RANGES = {TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255),
                  TensorProto.INT16: (-32768, 32767), TensorProto.UINT16: (0, 65535),
                  TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15)}


def _along_axis(ctx: RuleContext, param: str, like: str, axis: int | None, node) -> str:
    """A scale or zero point reshaped to broadcast against ``like`` (per-axis: ``[1, C, 1..]``)."""
    value = ctx.constant(param)
    shape = ctx.shape(param)
    size = int(np.prod(value.shape)) if value is not None else \
        (int(np.prod(shape)) if shape is not None and all(isinstance(d, int) for d in shape)
         else None)
    if size == 1 or (value is not None and value.ndim == 0):
        return param
    rank = ctx.rank(like, node)
    axis = (axis if axis is not None else 1) % rank
    target = [1] * rank
    target[axis] = -1
    return ctx.g.Reshape(param, ctx.g.ints(target, "per_axis"), hint="per_axis")


def _float(ctx: RuleContext, name: str) -> str:
    return ctx.g.Cast(name, to=TensorProto.FLOAT, hint="as_float")


@rule("DequantizeLinear")
def dequantize_linear_backward(ctx: RuleContext, node, grads, *, axis=None, block_size=None,
                               **_):
    (dy,) = grads
    if block_size:
        raise ctx_unsupported(node, "blocked quantization (block_size) of a computed tensor "
                              "has no rule (blocked constant weights are dequantized)")
    scale = _along_axis(ctx, node.input[1], node.input[0], axis, node)
    return [ctx.g.Mul(dy, scale, hint="dq")] + [None] * (len(node.input) - 1)


@rule("QuantizeLinear")
def quantize_linear_backward(ctx: RuleContext, node, grads, *, axis=None, saturate=None,
                             block_size=None, **_):
    (dq,) = grads
    g = ctx.g
    if block_size:
        raise ctx_unsupported(node, "blocked quantization (block_size) of a computed tensor "
                              "has no rule (blocked constant weights are dequantized)")
    x, q = node.input[0], node.output[0]
    has_zero_point = len(node.input) > 2 and bool(node.input[2])
    element = _output_type(ctx, node)
    if element not in INTEGER_RANGES:
        raise ctx_unsupported(node, f"quantizes to {TensorProto.DataType.Name(element)}; "
                              "only integer types have a rule")
    low, high = INTEGER_RANGES[element]
    scale = _along_axis(ctx, node.input[1], x, axis, node)
    zero = _float(ctx, _along_axis(ctx, node.input[2], x, axis, node)) if has_zero_point \
        else g.scalar(0.0)
    upstream = g.Div(dq, scale, hint="real_grad")
    level = g.Add(g.Round(g.Div(x, scale), hint="levels"), zero, hint="levels")
    inside = g.And(g.GreaterOrEqual(level, g.scalar(float(low))),
                   g.LessOrEqual(level, g.scalar(float(high))), hint="in_range")
    exact = g.Mul(upstream, g.Cast(inside, to=TensorProto.FLOAT), hint="straight_through")
    if not _starts_at_zero(ctx, node, low):
        return [exact] + [None] * (len(node.input) - 1)
    real = g.Mul(g.Sub(_float(ctx, q), zero), scale, hint="real_value")
    ctx.shapes[real] = ctx.shape(q) or ctx.shape(x)  # the gate thresholds it per sample
    act = Activation(z=x, y=real, upstream=upstream, exact=exact, is_relu=False, mask=inside)
    return [ctx.activation(ctx, act)] + [None] * (len(node.input) - 1)


def _output_type(ctx: RuleContext, node) -> int:
    if len(node.input) > 2 and node.input[2]:
        value = ctx.constant(node.input[2])
        if value is not None:
            return helper.np_dtype_to_tensor_dtype(value.dtype)
    return TensorProto.UINT8  # the operator's default without a zero point


def _starts_at_zero(ctx: RuleContext, node, low: int) -> bool:
    """Whether the representable real range is ``[0, ...]``: every zero point is ``qmin``."""
    if len(node.input) < 3 or not node.input[2]:
        return low == 0
    value = ctx.constant(node.input[2])
    return value is not None and bool(np.all(value == low))


def ctx_unsupported(node, why: str):
    from ..errors import UnsupportedModelError

    return UnsupportedModelError(f"{node.op_type} node {node.name!r}: {why}",
                                 [(node.op_type, node.name)])
