"""Backward rules of the reductions (exact, never gated).

With ``A`` the reduced axes (all axes when none are given, unless ``noop_with_empty_axes``) and
``E(t)`` = ``t`` with the reduced axes put back (Unsqueeze when ``keepdims = 0``) and expanded to
``Shape(X)``:

* ReduceSum:               ``dX = E(dY)``
* ReduceMean:              ``dX = E(dY) / |A|`` (``|A|`` = number of reduced elements; computed
                           in the graph when the sizes are dynamic)
* ReduceMax / ReduceMin:   ``dX = E(dY) M / sum_A(M)`` with ``M = I(X == E(Y))``: the gradient
                           goes to the extreme element, split evenly between ties (as
                           ``torch.amax`` does)
* GlobalMaxPool:           ReduceMax over the spatial axes with ``keepdims = 1``
"""

from __future__ import annotations

from onnx import TensorProto

from .base import RuleContext, rule, unsupported_input


def reduced_axes(ctx: RuleContext, node, axes) -> list[int] | None:
    """The non-negative reduced axes, None for "no reduction" (empty + noop_with_empty_axes)."""
    rank = ctx.rank(node.input[0], node)
    if axes is None and len(node.input) > 1 and node.input[1]:
        constant = ctx.constant(node.input[1])
        if constant is None:
            raise unsupported_input(node, 1, "(the axes) is not a constant; the backward needs "
                                    "to know the reduced axes")
        axes = [int(a) for a in constant.reshape(-1)]
    return sorted(a % rank for a in axes) if axes else list(range(rank))


def spread_back(ctx: RuleContext, node, dy: str, axes: list[int], keepdims: int) -> str:
    """``dy`` with the reduced ``axes`` put back and expanded to the input's shape."""
    g = ctx.g
    kept = dy if keepdims else g.Unsqueeze(dy, g.ints(axes, "axes"), hint="kept")
    return g.Expand(kept, g.Shape(node.input[0]), hint="spread")


def _is_noop(node, axes, noop_with_empty_axes) -> bool:
    return bool(noop_with_empty_axes) and not axes and \
        not (len(node.input) > 1 and node.input[1])


def _reduced_count(ctx: RuleContext, x: str, axes: list[int]) -> str:
    g = ctx.g
    shape = ctx.shape(x)
    sizes = [shape[a] for a in axes] if shape is not None else [None]
    if all(isinstance(s, int) for s in sizes):
        count = 1
        for s in sizes:
            count *= s
        return g.scalar(float(count), hint="count")
    picked = g.Gather(g.Shape(x), g.ints(axes, "axes"), axis=0)
    return g.Cast(g.ReduceProd(picked, keepdims=0), to=TensorProto.FLOAT, hint="count")


@rule("ReduceSum")
def reduce_sum_backward(ctx: RuleContext, node, grads, *, keepdims, noop_with_empty_axes):
    (dy,) = grads
    rest = [None] * (len(node.input) - 1)
    if _is_noop(node, None, noop_with_empty_axes):
        return [dy] + rest
    axes = reduced_axes(ctx, node, None)
    return [spread_back(ctx, node, dy, axes, keepdims)] + rest


@rule("ReduceMean")
def reduce_mean_backward(ctx: RuleContext, node, grads, *, axes=None, keepdims,
                         noop_with_empty_axes=0):
    (dy,) = grads
    rest = [None] * (len(node.input) - 1)
    if _is_noop(node, axes, noop_with_empty_axes):
        return [dy] + rest
    axes = reduced_axes(ctx, node, axes)
    g = ctx.g
    scaled = g.Div(dy, _reduced_count(ctx, node.input[0], axes), hint="mean_grad")
    return [spread_back(ctx, node, scaled, axes, keepdims)] + rest


def extreme_backward(ctx: RuleContext, node, dy: str, axes: list[int], keepdims: int) -> str:
    g = ctx.g
    x = node.input[0]
    y = spread_back(ctx, node, node.output[0], axes, keepdims)
    hits = g.Cast(g.Equal(x, y), to=TensorProto.FLOAT, hint="argmax_mask")
    ties = g.ReduceSum(hits, g.ints(axes, "axes"), keepdims=1, hint="ties")
    share = g.Div(hits, ties, hint="share")
    return g.Mul(spread_back(ctx, node, dy, axes, keepdims), share, hint="dx")


@rule("ReduceMax", "ReduceMin")
def reduce_extreme_backward(ctx: RuleContext, node, grads, *, axes=None, keepdims,
                            noop_with_empty_axes=0, **_attributes):
    (dy,) = grads
    rest = [None] * (len(node.input) - 1)
    if _is_noop(node, axes, noop_with_empty_axes):
        return [dy] + rest
    axes = reduced_axes(ctx, node, axes)
    return [extreme_backward(ctx, node, dy, axes, keepdims)] + rest


@rule("GlobalMaxPool")
def global_max_pool_backward(ctx: RuleContext, node, grads):
    (dy,) = grads
    rank = ctx.rank(node.input[0], node)
    return [extreme_backward(ctx, node, dy, list(range(2, rank)), keepdims=1)]
