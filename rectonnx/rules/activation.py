"""Backward rules of the activations: the exact product ``f'(z) * dY``, then the method's gate.

* Relu:       ``f'(z) = I(z > 0)``; when the ReLU feeds only a max pool with disjoint windows
  (``RuleContext.unpooled``), ``spread(dY_pool * I(Y > 0))``: the mask on the pooled grid.
* LeakyRelu:  ``f'(z) = 1 if z > 0 else alpha``
* Clip:       ``f'(z) = I(min < z < max)`` (ReLU6 is Clip(0, 6); strict, as PyTorch's ReLU6)

The masks read the output ``y``, not ``z``: ``z > 0 <=> y > 0`` for ReLU and
``min < z < max <=> min < y < max`` for Clip, so the same mask, and the forward graph then
never needs ``z`` besides the activation, which lets onnxruntime fuse Conv + Relu/Clip.

The method (``saliency``, ``guided_backprop``, ``rectgrad`` ...) then decides the gradient that
flows to ``z`` from ``Activation(z, y, dY, exact, is_relu, mask)`` (``mask``: Clip's boolean
``min < y < max``, which RectGrad merges into its own mask by And instead of a second product).
"""

from __future__ import annotations

from .base import Activation, RuleContext, masked, rule


def _gated(ctx: RuleContext, node, dy: str, exact: str, is_relu: bool,
           mask: str | None = None) -> str:
    act = Activation(z=node.input[0], y=node.output[0], upstream=dy, exact=exact,
                     is_relu=is_relu, mask=mask)
    return ctx.activation(ctx, act)


@rule("Relu")
def relu_backward(ctx: RuleContext, node, grads):
    (dy,) = grads
    g = ctx.g
    unpooled = ctx.unpooled_from(dy, node.output[0])
    if unpooled is not None:
        # dY is a max pool's gradient, nonzero only at arg-maxes, where y = Y: mask the pooled
        # gradient by Y > 0, then place it (the same numbers, on a 4x smaller grid for 2x2)
        pooled = masked(g, unpooled.dy, g.Greater(unpooled.y, g.scalar(0.0)), hint="relu_grad")
        exact = unpooled.spread(pooled)
    else:
        exact = masked(g, dy, g.Greater(node.output[0], g.scalar(0.0)), hint="relu_grad")
    return [_gated(ctx, node, dy, exact, is_relu=True)]


@rule("LeakyRelu")
def leaky_relu_backward(ctx: RuleContext, node, grads, *, alpha):
    (dy,) = grads
    g = ctx.g
    z = node.input[0]
    exact = g.Where(g.Greater(z, g.scalar(0.0)), dy, g.Mul(dy, g.scalar(alpha)),
                    hint="leaky_relu_grad")
    return [_gated(ctx, node, dy, exact, is_relu=False)]


@rule("Clip")
def clip_backward(ctx: RuleContext, node, grads):
    (dy,) = grads
    g = ctx.g
    y = node.output[0]
    low = node.input[1] if len(node.input) > 1 and node.input[1] else None
    high = node.input[2] if len(node.input) > 2 and node.input[2] else None
    inside = None
    if low is not None:
        inside = g.Greater(y, low)
    if high is not None:
        below = g.Less(y, high)
        inside = below if inside is None else g.And(inside, below)
    exact = dy if inside is None else masked(g, dy, inside, hint="clip_grad")
    return [_gated(ctx, node, dy, exact, is_relu=False, mask=inside)] + \
        [None] * (len(node.input) - 1)
