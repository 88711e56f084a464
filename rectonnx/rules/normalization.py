"""Backward rules of the normalisations: LRN, Softmax/LogSoftmax inside a model, LayerNorm.

None of them is an activation: the backward is the exact vector-Jacobian product, never gated.

* LRN (size n, alpha, beta, bias) over channels, window ``W(c) = [c - lo, c + hi]`` with
  ``lo = floor((n - 1) / 2)``, ``hi = ceil((n - 1) / 2)``:
  ``d_c = bias + alpha / n sum_{i in W(c)} X_i^2``, ``Y_c = X_c / d_c^beta``, so
  ``dX_i = dY_i / d_i^beta - (2 alpha beta / n) X_i sum_{c : i in W(c)} dY_c Y_c / d_c``.
  The channel-window sums are a Conv with a ``[n, 1, ..]`` kernel of ones over the channel axis
  (pads ``(lo, hi)`` forward, mirrored ``(hi, lo)`` for the transpose): no static sizes.
* Softmax along ``axis``:     ``dX = Y (dY - sum_axis(dY Y))``
* LogSoftmax along ``axis``:  ``dX = dY - exp(Y) sum_axis(dY)``
* LayerNormalization over the axes from ``axis`` on, ``r = 1 / sqrt(var + eps)``,
  ``Xh = (X - mean) r``, ``Y = Xh scale + B``, ``G = dY scale``:
  ``dX = r (G - mean(G) - Xh mean(G Xh))``, ``dscale = unbroadcast(dY Xh)``,
  ``dB = unbroadcast(dY)`` (means over the normalised axes). InstanceNormalization is the same
  over the spatial axes with a per-channel scale (torch's GroupNorm exports as one, between
  reshapes). LayerNorm's decomposed form (ReduceMean,
  Sub, Pow, Sqrt, Div as exporters write it) needs no rule of its own: each op has one.
"""

from __future__ import annotations

import numpy as np

from .base import RuleContext, rule, unsupported_input


def channel_window_sum(ctx: RuleContext, node, t: str, begin: int, end: int, size: int) -> str:
    """``out_c = sum_{i = c - begin}^{c + end} t_i`` along axis 1 (zero outside the channels)."""
    g = ctx.g
    rank = ctx.rank(node.input[0], node)
    lifted = g.Unsqueeze(t, g.ints([1], "axes"), hint="channels_as_space")  # [N, 1, C, ...]
    spatial = rank - 1
    kernel = np.ones([1, 1, size] + [1] * (spatial - 1), np.float32)
    summed = g.Conv(lifted, g.const(kernel, "window"), kernel_shape=list(kernel.shape[2:]),
                    pads=[begin] + [0] * (spatial - 1) + [end] + [0] * (spatial - 1),
                    hint="window_sum")
    return g.Squeeze(summed, g.ints([1], "axes"), hint="window_sum")


@rule("LRN")
def lrn_backward(ctx: RuleContext, node, grads, *, alpha, beta, bias, size):
    (dy,) = grads
    g = ctx.g
    x, y = node.input[0], node.output[0]
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    square_sum = channel_window_sum(ctx, node, g.Mul(x, x), lo, hi, size)
    d = g.Add(g.Mul(square_sum, g.scalar(alpha / size)), g.scalar(bias), hint="lrn_denominator")
    direct = g.Div(dy, g.Pow(d, g.scalar(beta)), hint="direct")
    spread = channel_window_sum(ctx, node, g.Div(g.Mul(dy, y), d), hi, lo, size)
    cross = g.Mul(g.Mul(x, spread), g.scalar(2.0 * alpha * beta / size), hint="cross")
    return [g.Sub(direct, cross, hint="dx")]


@rule("Softmax")
def softmax_backward(ctx: RuleContext, node, grads, *, axis):
    (dy,) = grads
    g = ctx.g
    y = node.output[0]
    inner = g.ReduceSum(g.Mul(dy, y), g.ints([axis], "axes"), keepdims=1, hint="inner")
    return [g.Mul(y, g.Sub(dy, inner), hint="dx")]


@rule("LogSoftmax")
def log_softmax_backward(ctx: RuleContext, node, grads, *, axis):
    (dy,) = grads
    g = ctx.g
    total = g.ReduceSum(dy, g.ints([axis], "axes"), keepdims=1, hint="total")
    return [g.Sub(dy, g.Mul(g.Exp(node.output[0]), total), hint="dx")]


def normalised_backward(ctx: RuleContext, node, dy: str, x: str, scale: str, axes: list[int],
                        epsilon: float) -> tuple[str, str]:
    """``(dX, Xh)`` of ``Y = Xh scale + B`` normalised over ``axes`` (LayerNorm formula)."""
    g = ctx.g
    mean = g.ReduceMean(x, axes=axes, keepdims=1, hint="mean")
    centred = g.Sub(x, mean, hint="centred")
    variance = g.ReduceMean(g.Mul(centred, centred), axes=axes, keepdims=1, hint="variance")
    inv_std = g.Reciprocal(g.Sqrt(g.Add(variance, g.scalar(epsilon))), hint="inv_std")
    normalised = g.Mul(centred, inv_std, hint="normalised")
    scaled = g.Mul(dy, scale, hint="scaled")
    mean_scaled = g.ReduceMean(scaled, axes=axes, keepdims=1)
    mean_product = g.ReduceMean(g.Mul(scaled, normalised), axes=axes, keepdims=1)
    dx = g.Mul(inv_std, g.Sub(g.Sub(scaled, mean_scaled), g.Mul(normalised, mean_product)),
               hint="dx")
    return dx, normalised


@rule("LayerNormalization")
def layer_norm_backward(ctx: RuleContext, node, grads, *, axis, epsilon, stash_type):
    dy = grads[0]
    if any(grad is not None for grad in grads[1:]):
        raise unsupported_input(node, 0, "feeds the Mean/InvStdDev outputs of "
                                "LayerNormalization into the scores; not supported")
    x, scale = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else ""
    y = node.output[0]
    rank = ctx.rank(x, node)
    dx, normalised = normalised_backward(ctx, node, dy, x, scale,
                                         list(range(axis % rank, rank)), epsilon)
    out = [dx, None] + [None] * (len(node.input) - 2)
    if ctx.is_active(scale):
        out[1] = ctx.unbroadcast(ctx.g.Mul(dy, normalised, hint="dscale"), scale, y)
    if bias and ctx.is_active(bias):
        out[2] = ctx.unbroadcast(dy, bias, y)
    return out


@rule("InstanceNormalization")
def instance_norm_backward(ctx: RuleContext, node, grads, *, epsilon):
    (dy,) = grads
    x, scale, bias = node.input
    for index, name in ((1, scale), (2, bias)):
        if ctx.is_active(name):
            raise unsupported_input(node, index, "depends on the data input")
    rank = ctx.rank(x, node)
    per_channel = ctx.g.Reshape(scale, ctx.g.ints([-1] + [1] * (rank - 2), "per_channel"))
    dx, _ = normalised_backward(ctx, node, dy, x, per_channel, list(range(2, rank)), epsilon)
    return [dx, None, None]
