"""Backward rules of the smooth and piecewise unit-wise activations beyond the ReLU family.

Each rule forms the exact product ``f'(z) * dY`` and hands it to the method's gate
(``base.gated``), exactly as Relu/LeakyRelu/Clip do in activation.py. With ``y = f(z)``:

* Sigmoid:              ``f' = y (1 - y)``
* Tanh:                 ``f' = 1 - y^2``
* Softplus:             ``f' = sigmoid(z)``
* Softsign:             ``f' = 1 / (1 + |z|)^2``
* Elu(alpha):           ``f' = 1 if z > 0 else y + alpha``
* Selu(alpha, gamma):   ``f' = gamma if z > 0 else y + gamma alpha``
* Celu(alpha):          ``f' = 1 if z > 0 else y / alpha + 1``
* ThresholdedRelu(a):   ``f' = I(z > a)``
* PRelu(slope):         ``f' = 1 if z > 0 else slope``; ``dslope = unbroadcast(dY z I(z <= 0))``
* HardSigmoid(a, b):    ``f' = a I(0 < a z + b < 1)``
* HardSwish:            ``f' = 0 (z < -3), z / 3 + 1/2 (-3 < z < 3), 1 (z > 3)``
* Gelu, exact:          ``f = z Phi(z)``, ``f' = Phi(z) + z phi(z)`` (``Phi``, ``phi``: the normal
                        CDF and density)
* Gelu, tanh:           ``f = z (1 + t) / 2``, ``t = tanh(c (z + 0.044715 z^3))``,
                        ``c = sqrt(2/pi)``,
                        ``f' = (1 + t) / 2 + z (1 - t^2) c (1 + 0.134145 z^2) / 2``
* Swish(alpha) / SiLU:  ``f = z s``, ``s = sigmoid(alpha z)``, ``f' = s (1 + alpha z (1 - s))``
* Mish:                 ``f = z tanh(softplus(z))``, ``f' = t + z (1 - t^2) sigmoid(z)``

Which ops are activations (gated by the method): the unit-wise nonlinearities ``y = f(z)``
above and Relu/LeakyRelu/Clip. Gelu, Swish/SiLU and Mish reach the walker as ONE node even though
opset 17 has no such op: the normaliser recognises their scalar formulas (``z * 0.5 * (1 +
Erf(z / sqrt 2))`` as torch exports it, ``z * Sigmoid(z)``, ...) and hands the walker one
composite node named after the newer ONNX op, so the unit is gated once; the forward graph keeps
the exporter's own nodes. Not activations (exact vector-Jacobian products, never gated): Erf,
Exp, Log, Sqrt, Pow, ... (elementwise.py), Softmax, LayerNormalization and LRN
(normalization.py), pooling, reductions, resizing.

What the gates mean here: ``deconvnet`` passes ``relu(dY)``; ``guided_backprop`` passes
``relu(f'(z) dY)``, which for a monotone ``f`` (``f' >= 0``) is ``f'(z) relu(dY)``; for the
non-monotone Gelu, Swish, Mish and HardSwish, where ``f' < 0`` for some negative ``z`` (e.g.
``z < -0.75`` for Gelu), it passes negative upstream signal there. RectGrad keeps
``f'(z) dY`` where ``y dY > tau`` (docs/maths.md, 'Activations other than ReLU').
"""

from __future__ import annotations

import math

from .base import RuleContext, gated, rule

GELU_TANH_C = math.sqrt(2.0 / math.pi)
GELU_TANH_K = 0.044715


def _times(ctx: RuleContext, dy: str, slope: str, hint: str) -> str:
    return ctx.g.Mul(dy, slope, hint=hint)


@rule("Sigmoid")
def sigmoid_backward(ctx: RuleContext, node, grads):
    (dy,) = grads
    g = ctx.g
    y = node.output[0]
    slope = g.Mul(y, g.Sub(g.scalar(1.0), y), hint="sigmoid_slope")
    return [gated(ctx, node, dy, _times(ctx, dy, slope, "sigmoid_grad"))]


@rule("Tanh")
def tanh_backward(ctx: RuleContext, node, grads):
    (dy,) = grads
    g = ctx.g
    y = node.output[0]
    slope = g.Sub(g.scalar(1.0), g.Mul(y, y), hint="tanh_slope")
    return [gated(ctx, node, dy, _times(ctx, dy, slope, "tanh_grad"))]


@rule("Softplus")
def softplus_backward(ctx: RuleContext, node, grads):
    (dy,) = grads
    slope = ctx.g.Sigmoid(node.input[0], hint="softplus_slope")
    return [gated(ctx, node, dy, _times(ctx, dy, slope, "softplus_grad"))]


@rule("Softsign")
def softsign_backward(ctx: RuleContext, node, grads):
    (dy,) = grads
    g = ctx.g
    denominator = g.Add(g.scalar(1.0), g.Abs(node.input[0]))
    exact = g.Div(dy, g.Mul(denominator, denominator), hint="softsign_grad")
    return [gated(ctx, node, dy, exact)]


def _positive_or(ctx: RuleContext, node, dy: str, positive_slope: float, negative_slope: str,
                 hint: str, threshold: float = 0.0) -> str:
    g = ctx.g
    above = g.Greater(node.input[0], g.scalar(threshold))
    positive = dy if positive_slope == 1.0 else g.Mul(dy, g.scalar(positive_slope))
    return g.Where(above, positive, g.Mul(dy, negative_slope), hint=hint)


@rule("Elu")
def elu_backward(ctx: RuleContext, node, grads, *, alpha):
    (dy,) = grads
    g = ctx.g
    negative = g.Add(node.output[0], g.scalar(alpha), hint="elu_slope")
    return [gated(ctx, node, dy, _positive_or(ctx, node, dy, 1.0, negative, "elu_grad"))]


@rule("Selu")
def selu_backward(ctx: RuleContext, node, grads, *, alpha, gamma):
    (dy,) = grads
    g = ctx.g
    negative = g.Add(node.output[0], g.scalar(alpha * gamma), hint="selu_slope")
    return [gated(ctx, node, dy, _positive_or(ctx, node, dy, gamma, negative, "selu_grad"))]


@rule("Celu")
def celu_backward(ctx: RuleContext, node, grads, *, alpha):
    (dy,) = grads
    g = ctx.g
    negative = g.Add(g.Div(node.output[0], g.scalar(alpha)), g.scalar(1.0), hint="celu_slope")
    return [gated(ctx, node, dy, _positive_or(ctx, node, dy, 1.0, negative, "celu_grad"))]


@rule("ThresholdedRelu")
def thresholded_relu_backward(ctx: RuleContext, node, grads, *, alpha):
    (dy,) = grads
    g = ctx.g
    exact = g.Where(g.Greater(node.input[0], g.scalar(alpha)), dy, g.scalar(0.0),
                    hint="thresholded_relu_grad")
    return [gated(ctx, node, dy, exact)]


@rule("PRelu")
def prelu_backward(ctx: RuleContext, node, grads):
    (dy,) = grads
    g = ctx.g
    z, slope = node.input
    exact = _positive_or(ctx, node, dy, 1.0, slope, "prelu_grad")
    out = [gated(ctx, node, dy, exact), None]
    if ctx.is_active(slope):
        below = g.Where(g.Greater(z, g.scalar(0.0)), g.scalar(0.0), g.Mul(dy, z), hint="dslope")
        out[1] = ctx.unbroadcast(below, slope, node.output[0])
    return out


@rule("HardSigmoid")
def hard_sigmoid_backward(ctx: RuleContext, node, grads, *, alpha, beta):
    (dy,) = grads
    g = ctx.g
    inner = g.Add(g.Mul(node.input[0], g.scalar(alpha)), g.scalar(beta))
    inside = g.And(g.Greater(inner, g.scalar(0.0)), g.Less(inner, g.scalar(1.0)))
    exact = g.Where(inside, g.Mul(dy, g.scalar(alpha)), g.scalar(0.0), hint="hard_sigmoid_grad")
    return [gated(ctx, node, dy, exact)]


@rule("HardSwish")
def hard_swish_backward(ctx: RuleContext, node, grads):
    (dy,) = grads
    g = ctx.g
    z = node.input[0]
    middle = g.Add(g.Div(z, g.scalar(3.0)), g.scalar(0.5))
    slope = g.Where(g.Less(z, g.scalar(-3.0)), g.scalar(0.0),
                    g.Where(g.Greater(z, g.scalar(3.0)), g.scalar(1.0), middle),
                    hint="hard_swish_slope")
    return [gated(ctx, node, dy, _times(ctx, dy, slope, "hard_swish_grad"))]


@rule("Gelu")
def gelu_backward(ctx: RuleContext, node, grads, *, approximate):
    (dy,) = grads
    g = ctx.g
    z = node.input[0]
    if approximate == "tanh":
        z2 = g.Mul(z, z)
        inner = g.Mul(g.Add(z, g.Mul(g.Mul(z2, z), g.scalar(GELU_TANH_K))),
                      g.scalar(GELU_TANH_C))
        t = g.Tanh(inner, hint="gelu_tanh")
        d_inner = g.Mul(g.Add(g.scalar(1.0), g.Mul(z2, g.scalar(3.0 * GELU_TANH_K))),
                        g.scalar(GELU_TANH_C))
        slope = g.Mul(g.Add(g.Add(g.scalar(1.0), t),
                            g.Mul(g.Mul(z, g.Sub(g.scalar(1.0), g.Mul(t, t))), d_inner)),
                      g.scalar(0.5), hint="gelu_slope")
    else:
        cdf = g.Mul(g.Add(g.scalar(1.0), g.Erf(g.Mul(z, g.scalar(1.0 / math.sqrt(2.0))))),
                    g.scalar(0.5), hint="normal_cdf")
        pdf = g.Mul(g.Exp(g.Mul(g.Mul(z, z), g.scalar(-0.5))),
                    g.scalar(1.0 / math.sqrt(2.0 * math.pi)), hint="normal_pdf")
        slope = g.Add(cdf, g.Mul(z, pdf), hint="gelu_slope")
    return [gated(ctx, node, dy, _times(ctx, dy, slope, "gelu_grad"))]


@rule("Swish")
def swish_backward(ctx: RuleContext, node, grads, *, alpha):
    (dy,) = grads
    g = ctx.g
    z = node.input[0]
    scaled = z if alpha == 1.0 else g.Mul(z, g.scalar(alpha))
    s = g.Sigmoid(scaled, hint="swish_sigmoid")
    slope = g.Mul(s, g.Add(g.scalar(1.0), g.Mul(scaled, g.Sub(g.scalar(1.0), s))),
                  hint="swish_slope")
    return [gated(ctx, node, dy, _times(ctx, dy, slope, "swish_grad"))]


@rule("Mish")
def mish_backward(ctx: RuleContext, node, grads):
    (dy,) = grads
    g = ctx.g
    z = node.input[0]
    t = g.Tanh(g.Softplus(z), hint="mish_tanh")
    slope = g.Add(t, g.Mul(g.Mul(z, g.Sub(g.scalar(1.0), g.Mul(t, t))), g.Sigmoid(z)),
                  hint="mish_slope")
    return [gated(ctx, node, dy, _times(ctx, dy, slope, "mish_grad"))]
