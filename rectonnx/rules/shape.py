"""Backward rules of the shape ops: the gradient takes the inverse shape op.

* Reshape, Flatten, Squeeze, Unsqueeze: ``dX = Reshape(dY, Shape(X))``.
* Transpose with ``perm``:              ``dX = Transpose(dY, argsort(perm))``.
* Concat along ``axis``:                ``dX_i = Slice(dY, offset_i, offset_i + size_i, axis)``.
* Pad (constant mode) with pads p:      ``dX = Slice(dY, p_begin, -p_end)`` (negative pads, which
  crop, are undone by zero padding).
"""

from __future__ import annotations

import numpy as np

from .base import RuleContext, rule, unsupported_input


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape_backward(ctx: RuleContext, node, grads, **_attributes):
    (dy,) = grads
    dx = ctx.g.reshape_like(dy, node.input[0], hint="dx")
    return [dx] + [None] * (len(node.input) - 1)


@rule("Transpose")
def transpose_backward(ctx: RuleContext, node, grads, *, perm):
    (dy,) = grads
    if perm is None:
        shape = ctx.shape(node.input[0])
        if shape is None:
            raise unsupported_input(node, 0, "has unknown rank (Transpose without perm)")
        perm = list(reversed(range(len(shape))))
    return [ctx.g.Transpose(dy, perm=[int(i) for i in np.argsort(perm)], hint="dx")]


@rule("Concat")
def concat_backward(ctx: RuleContext, node, grads, *, axis):
    (dy,) = grads
    g = ctx.g
    rank = len(ctx.shape(node.output[0]) or ())
    if axis < 0:
        axis += rank
    sizes = [(ctx.shape(name) or [None] * rank)[axis] for name in node.input]
    axes = g.ints([axis], "axis")
    out = []
    if all(isinstance(s, int) for s in sizes):
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        for i, name in enumerate(node.input):
            out.append(g.Slice(dy, g.ints([offsets[i]], "start"), g.ints([offsets[i + 1]], "end"),
                               axes, hint="dx") if ctx.is_active(name) else None)
        return out
    start = g.ints([0], "start")
    for name in node.input:
        size = g.Gather(g.Shape(name), g.ints([axis], "axis"), axis=0, hint="size")
        end = g.Add(start, size, hint="end")
        out.append(g.Slice(dy, start, end, axes, hint="dx") if ctx.is_active(name) else None)
        start = end
    return out


@rule("Pad")
def pad_backward(ctx: RuleContext, node, grads, *, mode):
    (dy,) = grads
    if mode != "constant":
        raise unsupported_input(node, 0, f"is padded in mode {mode!r}; only constant padding "
                                "has a backward rule")
    g = ctx.g
    pads = ctx.constant(node.input[1])
    rest = [None] * (len(node.input) - 1)
    if pads is None:
        return [g.Pad(dy, g.Neg(node.input[1]), hint="dx")] + rest
    pads = pads.astype(np.int64)
    rank = len(pads) // 2
    begin, end = pads[:rank], pads[rank:]
    starts = np.maximum(begin, 0)
    ends = np.where(end > 0, -end, np.iinfo(np.int64).max)
    dx = g.Slice(dy, g.ints(starts, "starts"), g.ints(ends, "ends"), g.ints(range(rank), "axes"),
                 hint="dx")
    if (pads < 0).any():
        dx = g.Pad(dx, g.ints(np.maximum(-pads, 0), "pads"), hint="dx")
    return [dx] + rest
