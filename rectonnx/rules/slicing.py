"""Backward rules of the ops that pick, split or repeat parts of a tensor (exact, never gated).

* Slice:    ``dX`` = zeros with ``dY`` written back at the sliced positions. With constant
            starts/ends, unit steps and static sizes that is one ``Pad``; otherwise, per sliced
            axis, the positions are ``Slice(Range(0, n), start, end, step)`` computed in the
            graph (so ONNX's own clamping rules apply) and ``dY`` is scattered back
            (``ScatterElements``): any steps, negative ones included, and dynamic sizes.
* Split:    ``dX = Concat(dY_1, ..., dY_k)`` along the split axis, zeros for unused outputs.
* Expand:   ``dX = unbroadcast(dY)`` (sum over the broadcast axes).
* Tile:     ``dY`` reshaped to ``[r_0, d_0, r_1, d_1, ...]`` and summed over the ``r`` axes.
* Gather:   ``dX = ScatterElements(zeros, I, dY, axis, reduction="add")`` with the indices
            ``I`` broadcast along the other axes (repeated indices add up; negative ones wrap).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from .base import RuleContext, rule, unsupported_input

INT64_MAX = np.iinfo(np.int64).max


def _zeros(ctx: RuleContext, shape: str, hint: str = "zeros") -> str:
    return ctx.g.ConstantOfShape(shape, hint=hint,
                                 value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))


def _slice_parameters(ctx: RuleContext, node, rank: int):
    """Constant (starts, ends, axes, steps) as int lists, or None when any is dynamic."""
    values = []
    for index in range(1, 5):
        name = node.input[index] if index < len(node.input) else ""
        if not name:
            values.append(None)
            continue
        constant = ctx.constant(name)
        if constant is None:
            return None
        values.append([int(v) for v in constant.reshape(-1)])
    starts, ends, axes, steps = values
    axes = [a % rank for a in (axes if axes is not None else range(len(starts)))]
    steps = steps if steps is not None else [1] * len(starts)
    return starts, ends, axes, steps


@rule("Slice")
def slice_backward(ctx: RuleContext, node, grads):
    (dy,) = grads
    g = ctx.g
    x = node.input[0]
    rank = ctx.rank(x, node)
    rest = [None] * (len(node.input) - 1)
    for index in range(1, len(node.input)):
        if node.input[index] and ctx.is_active(node.input[index]):
            raise unsupported_input(node, index, "depends on the data input")
    shape = ctx.shape(x)
    params = _slice_parameters(ctx, node, rank)
    if params is not None:
        starts, ends, axes, steps = params
        if all(s == 1 for s in steps) and all(isinstance(shape[a], int) for a in axes):
            pads = [0] * (2 * rank)
            for start, end, axis in zip(starts, ends, axes):
                begin, stop, _ = slice(start, end, 1).indices(shape[axis])
                length = max(0, stop - begin)
                pads[axis], pads[rank + axis] = begin, shape[axis] - begin - length
            return [g.Pad(dy, g.ints(pads, "pads"), hint="dx")] + rest
    return [_scatter_back(ctx, node, dy, rank)] + rest


def _scatter_back(ctx: RuleContext, node, dy: str, rank: int) -> str:
    """Undo the slice one axis at a time: scatter ``dy`` into zeros at the sliced positions."""
    g = ctx.g
    starts, ends = node.input[1], node.input[2]
    axes_name = node.input[3] if len(node.input) > 3 and node.input[3] else None
    steps_name = node.input[4] if len(node.input) > 4 and node.input[4] else None
    count = (ctx.shape(starts) or [None])[0]
    if not isinstance(count, int):
        raise unsupported_input(node, 1, "(starts) has an unknown length")
    axes = list(range(count))
    if axes_name is not None:
        constant = ctx.constant(axes_name)
        if constant is None:
            raise unsupported_input(node, 3, "(axes) is not a constant")
        axes = [int(a) % rank for a in constant.reshape(-1)]
    full_shape = g.Shape(node.input[0], hint="input_shape")
    zero, one = g.const(0, "zero", dtype=np.int64), g.const(1, "one", dtype=np.int64)
    grad = dy
    for i, axis in enumerate(axes):
        pick = g.ints([i], "entry")
        step = g.Gather(steps_name, pick, axis=0) if steps_name else g.ints([1], "step")
        n = g.Gather(full_shape, g.ints([axis], "axis"), axis=0, hint="length")
        every = g.Range(zero, g.Squeeze(n, g.ints([0], "axes")), one, hint="every_position")
        positions = g.Slice(every, g.Gather(starts, pick, axis=0), g.Gather(ends, pick, axis=0),
                            g.ints([0], "axes"), step, hint="positions")
        along = [1] * rank
        along[axis] = -1
        grad_shape = g.Shape(grad)
        indices = g.Expand(g.Reshape(positions, g.ints(along, "along")), grad_shape,
                           hint="indices")
        zeros = _zeros(ctx, _replace_entry(ctx, grad_shape, axis, n, rank))
        grad = g.ScatterElements(zeros, indices, grad, axis=axis, hint="dx")
    return grad


def _replace_entry(ctx: RuleContext, shape: str, axis: int, value: str, rank: int) -> str:
    g = ctx.g
    parts = []
    if axis > 0:
        parts.append(g.Slice(shape, g.ints([0], "start"), g.ints([axis], "end")))
    parts.append(value)
    if axis < rank - 1:
        parts.append(g.Slice(shape, g.ints([axis + 1], "start"), g.ints([rank], "end")))
    return parts[0] if len(parts) == 1 else g.Concat(*parts, axis=0, hint="shape")


@rule("Split")
def split_backward(ctx: RuleContext, node, grads, *, axis, **_attributes):
    g = ctx.g
    parts = [grad if grad is not None else _zeros(ctx, g.Shape(out), "unused_part")
             for grad, out in zip(grads, node.output)]
    dx = parts[0] if len(parts) == 1 else g.Concat(*parts, axis=axis, hint="dx")
    return [dx] + [None] * (len(node.input) - 1)


@rule("Expand")
def expand_backward(ctx: RuleContext, node, grads):
    (dy,) = grads
    return [ctx.unbroadcast(dy, node.input[0], node.output[0]), None]


@rule("Tile")
def tile_backward(ctx: RuleContext, node, grads):
    (dy,) = grads
    g = ctx.g
    x, repeats_name = node.input
    repeats = ctx.constant(repeats_name)
    if repeats is None:
        raise unsupported_input(node, 1, "(repeats) is not a constant")
    repeats = [int(r) for r in repeats.reshape(-1)]
    shape = ctx.shape(x)
    if shape is not None and all(isinstance(d, int) for d in shape):
        split = g.ints([v for r, d in zip(repeats, shape) for v in (r, d)], "tiles")
    else:
        parts = []
        for axis, r in enumerate(repeats):
            parts += [g.ints([r], "repeat"), g.Gather(g.Shape(x), g.ints([axis], "axis"), axis=0)]
        split = g.Concat(*parts, axis=0, hint="tiles")
    tiles = g.Reshape(dy, split, hint="tiles")
    summed = g.ReduceSum(tiles, g.ints(range(0, 2 * len(repeats), 2), "axes"), keepdims=0,
                         hint="dx")
    return [summed, None]


@rule("Gather")
def gather_backward(ctx: RuleContext, node, grads, *, axis):
    (dy,) = grads
    g = ctx.g
    data, indices = node.input
    if ctx.is_active(indices):
        raise unsupported_input(node, 1, "(the indices) depends on the data input")
    rank = ctx.rank(data, node)
    axis %= rank
    shape = g.Shape(data, hint="data_shape")
    n = g.Gather(shape, g.ints([axis], "axis"), axis=0, hint="length")
    flat = g.Reshape(indices, g.ints([-1], "flat"), hint="indices")
    flat = g.Where(g.Less(flat, g.const([0], "zero", dtype=np.int64)), g.Add(flat, n), flat,
                   hint="indices")
    pieces = []
    if axis > 0:
        pieces.append(g.Slice(shape, g.ints([0], "start"), g.ints([axis], "end")))
    pieces.append(g.ints([-1], "gathered"))
    if axis < rank - 1:
        pieces.append(g.Slice(shape, g.ints([axis + 1], "start"), g.ints([rank], "end")))
    grouped = g.Reshape(dy, g.Concat(*pieces, axis=0), hint="grouped")
    along = [1] * rank
    along[axis] = -1
    spread = g.Expand(g.Reshape(flat, g.ints(along, "along")), g.Shape(grouped), hint="indices")
    dx = g.ScatterElements(_zeros(ctx, shape), spread, grouped, axis=axis, reduction="add",
                           hint="dx")
    return [dx, None]
