"""Backward rules of elementwise maths that is not an activation (exact, never gated).

These appear inside decomposed normalisations (LayerNorm as ReduceMean/Sub/Pow/Sqrt/Div),
inside Gelu forms the normaliser did not fuse, and in attention scaling. With ``dY`` the
gradient of ``Y``:

* Neg:          ``dX = -dY``
* Exp:          ``dX = dY Y``
* Log:          ``dX = dY / X``
* Sqrt:         ``dX = dY / (2 Y)``
* Reciprocal:   ``dX = -dY Y^2``
* Abs:          ``dX = dY sign(X)``
* Erf:          ``dX = dY 2 / sqrt(pi) exp(-X^2)``
* Pow(A, B):    ``dA = unbroadcast(dY B A^(B - 1))``, ``dB = unbroadcast(dY Y log A)``
                (``dB`` needs ``A > 0``; a constant exponent, the usual case, has no ``dB``)
* Cast, CastLike (float to float): ``dX = CastLike(dY, X)``: the gradient passes, cast back
* Where(C, A, B) (C boolean, never active): ``dA = unbroadcast(Where(C, dY, 0))``,
                ``dB = unbroadcast(Where(C, 0, dY))``
"""

from __future__ import annotations

import math

import numpy as np

from .base import RuleContext, rule


@rule("Neg")
def neg_backward(ctx: RuleContext, node, grads):
    (dy,) = grads
    return [ctx.g.Neg(dy, hint="dx")]


@rule("Exp")
def exp_backward(ctx: RuleContext, node, grads):
    (dy,) = grads
    return [ctx.g.Mul(dy, node.output[0], hint="dx")]


@rule("Log")
def log_backward(ctx: RuleContext, node, grads):
    (dy,) = grads
    return [ctx.g.Div(dy, node.input[0], hint="dx")]


@rule("Sqrt")
def sqrt_backward(ctx: RuleContext, node, grads):
    (dy,) = grads
    g = ctx.g
    return [g.Div(g.Mul(dy, g.scalar(0.5)), node.output[0], hint="dx")]


@rule("Reciprocal")
def reciprocal_backward(ctx: RuleContext, node, grads):
    (dy,) = grads
    g = ctx.g
    y = node.output[0]
    return [g.Neg(g.Mul(dy, g.Mul(y, y)), hint="dx")]


@rule("Abs")
def abs_backward(ctx: RuleContext, node, grads):
    (dy,) = grads
    return [ctx.g.Mul(dy, ctx.g.Sign(node.input[0]), hint="dx")]


@rule("Erf")
def erf_backward(ctx: RuleContext, node, grads):
    (dy,) = grads
    g = ctx.g
    x = node.input[0]
    density = g.Mul(g.Exp(g.Neg(g.Mul(x, x))), g.scalar(2.0 / math.sqrt(math.pi)),
                    hint="erf_slope")
    return [g.Mul(dy, density, hint="dx")]


@rule("Pow")
def pow_backward(ctx: RuleContext, node, grads):
    (dy,) = grads
    g = ctx.g
    a, b = node.input
    y = node.output[0]
    out = [None, None]
    if ctx.is_active(a):
        exponent = ctx.constant(b)
        if exponent is not None and exponent.size == 1:
            e = float(exponent.reshape(()))
            if e == 1.0:
                slope = None
            elif e == 2.0:
                slope = g.Mul(a, g.scalar(2.0), hint="pow_slope")
            else:
                slope = g.Mul(g.Pow(a, g.scalar(e - 1.0)), g.scalar(e), hint="pow_slope")
        else:
            b_float = b if exponent is None else g.const(exponent.astype(np.float32), "exponent")
            slope = g.Mul(g.Pow(a, g.Sub(b_float, g.scalar(1.0))), b_float, hint="pow_slope")
        da = dy if slope is None else g.Mul(dy, slope, hint="da")
        out[0] = ctx.unbroadcast(da, a, y)
    if ctx.is_active(b):
        out[1] = ctx.unbroadcast(g.Mul(g.Mul(dy, y), g.Log(a), hint="db"), b, y)
    return out


@rule("Cast")
def cast_backward(ctx: RuleContext, node, grads, **_attributes):
    (dy,) = grads
    return [ctx.g.CastLike(dy, node.input[0], hint="dx")]


@rule("CastLike")
def cast_like_backward(ctx: RuleContext, node, grads, **_attributes):
    (dy,) = grads
    return [ctx.g.CastLike(dy, node.input[0], hint="dx"), None]


@rule("Where")
def where_backward(ctx: RuleContext, node, grads):
    (dy,) = grads
    g = ctx.g
    condition, a, b = node.input
    y = node.output[0]
    zero = g.CastLike(g.scalar(0.0), dy)
    out = [None, None, None]
    if ctx.is_active(a):
        out[1] = ctx.unbroadcast(g.Where(condition, dy, zero, hint="da"), a, y)
    if ctx.is_active(b):
        out[2] = ctx.unbroadcast(g.Where(condition, zero, dy, hint="db"), b, y)
    return out
