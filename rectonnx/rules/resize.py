"""Backward rule of Resize (and of Upsample, which the opset conversion turns into Resize).

For fixed scales or sizes every Resize mode (nearest, linear, cubic; any coordinate
transformation, nearest_mode, exclude_outside) is linear in ``X`` and separable: along each
resized axis ``a`` it is a matrix ``A_a`` (``out x in``), ``Y = X x_a A_a`` for all axes. So

    ``dX = dY x_a A_a^T`` for every resized axis ``a`` (the order does not matter).

Nothing of the runtime's interpolation is re-implemented: the graph computes ``A_a^T`` by
applying the node's own Resize (same attributes, same scale or size along ``a``) to the identity
``I_in`` laid out as ``[1, 1, in, in]`` and resized along its last axis: row ``j`` is the resize
of the basis vector ``e_j``, i.e. column ``j`` of ``A_a``. The weights are therefore the very
float32 numbers the forward pass used, and the rule is exact for whatever the runtime does; the
contraction is one MatMul per axis. Sizes may be dynamic (the identity is built with EyeLike).

``tf_crop_and_resize`` is affine, not linear (``extrapolation_value`` outside the crop): refused.
"""

from __future__ import annotations

import numpy as np

from .base import RuleContext, rule, unsupported_input


def _present(ctx: RuleContext, node, index: int) -> bool:
    if len(node.input) <= index or not node.input[index]:
        return False
    constant = ctx.constant(node.input[index])
    return constant is None or constant.size > 0


def _resized_axes(ctx: RuleContext, node, rank: int, use_scales: bool) -> list[int]:
    x, y = node.input[0], node.output[0]
    if use_scales:
        scales = ctx.constant(node.input[2])
        if scales is not None:
            return [a for a in range(rank) if float(scales[a]) != 1.0]
    in_shape, out_shape = ctx.shape(x), ctx.shape(y)
    if in_shape is not None and out_shape is not None and not use_scales:
        return [a for a in range(rank)
                if not (isinstance(in_shape[a], int) and in_shape[a] == out_shape[a])]
    return list(range(2, rank))


def resize_matrix(ctx: RuleContext, node, axis: int, use_scales: bool, attributes: dict) -> str:
    """``A_axis^T`` (``[in, out]``) computed by the node's own Resize applied to the identity."""
    g = ctx.g
    x = node.input[0]
    n_in = ctx.dim(x, axis)
    if isinstance(n_in, int):
        identity = g.const(np.eye(n_in, dtype=np.float32)[None, None], "identity")
        n_in_tensor = g.ints([n_in], "in_size")
    else:
        n_in_tensor = n_in
        square = g.ConstantOfShape(g.Concat(n_in, n_in, axis=0), hint="square")
        identity = g.Unsqueeze(g.EyeLike(square, dtype=1), g.ints([0, 1], "axes"),
                               hint="identity")
    if use_scales:
        scales = ctx.constant(node.input[2])
        if scales is not None:
            along = g.const(np.asarray([1, 1, 1, scales[axis]], np.float32), "scales")
        else:
            along = g.Concat(g.const(np.ones(3, np.float32), "ones"),
                             g.Gather(node.input[2], g.ints([axis], "axis"), axis=0),
                             axis=0, hint="scales")
        resized = g.Resize(identity, "", along, **attributes, hint="resize_matrix")
    else:
        sizes = ctx.constant(node.input[3])
        out = g.ints([int(sizes[axis])], "out_size") if sizes is not None else \
            g.Gather(node.input[3], g.ints([axis], "axis"), axis=0)
        along = g.Concat(g.ints([1, 1], "ones"), n_in_tensor, out, axis=0, hint="sizes")
        resized = g.Resize(identity, "", "", along, **attributes, hint="resize_matrix")
    return g.Squeeze(resized, g.ints([0, 1], "axes"), hint="resize_matrix")  # [in, out]


@rule("Resize")
def resize_backward(ctx: RuleContext, node, grads, **attributes):
    (dy,) = grads
    g = ctx.g
    if attributes.get("coordinate_transformation_mode") == "tf_crop_and_resize":
        raise unsupported_input(node, 0, "is resized with tf_crop_and_resize, which is affine "
                                "(extrapolation_value), not linear; not supported")
    for index in (1, 2, 3):
        if index < len(node.input) and node.input[index] and ctx.is_active(node.input[index]):
            raise unsupported_input(node, index, "depends on the data input")
    rank = ctx.rank(node.input[0], node)
    use_scales = _present(ctx, node, 2)
    if not use_scales and not _present(ctx, node, 3):
        raise unsupported_input(node, 0, "is resized with neither scales nor sizes")
    attributes = {k: v for k, v in attributes.items() if v is not None}
    dx = dy
    for axis in _resized_axes(ctx, node, rank, use_scales):
        matrix = resize_matrix(ctx, node, axis, use_scales, attributes)
        if axis == rank - 1:
            dx = g.MatMul(dx, g.Transpose(matrix, perm=[1, 0]), hint="dx")
            continue
        perm = list(range(rank))
        perm[axis], perm[rank - 1] = rank - 1, axis
        moved = g.Transpose(dx, perm=perm, hint="axis_last")
        dx = g.Transpose(g.MatMul(moved, g.Transpose(matrix, perm=[1, 0])), perm=perm, hint="dx")
    return [dx] + [None] * (len(node.input) - 1)
