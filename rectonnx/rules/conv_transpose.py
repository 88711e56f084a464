"""Backward rule of ConvTranspose inside a model (exact; its adjoint is a convolution).

``Y = ConvTranspose(X, W)`` with strides ``s``, dilations ``d``, group, begin pads ``b`` writes
``W[m, c, t] X[m, i]`` to output position ``i s - b + t d``; so

    ``dX = Conv(dY, W, strides=s, dilations=d, group, pads=(b, e'))``

with the same weight (``[C_in, C_out / group, k...]`` read by Conv as ``[M, C / group, k...]``)
and an end pad ``e' = max(0, (m - 1) s + K - b - L)`` (``m`` input and ``L`` output length,
``K = (k - 1) d + 1``) that lets the last window reach the last position it wrote to. With
explicit pads ``(b, e)`` and ``output_padding p`` this is ``max(0, e - p)``: no static sizes. With
``output_shape`` or ``auto_pad`` the begin pads follow the ONNX spec from static sizes:
``total = s (m - 1) + p + K - L``, ``b = total // 2`` for SAME_UPPER and ``total - total // 2``
otherwise. ``dB = sum of dY over all axes but 1``.
"""

from __future__ import annotations

from .base import RuleContext, rule, unsupported_input


@rule("ConvTranspose")
def conv_transpose_backward(ctx: RuleContext, node, grads, *, auto_pad, dilations, group,
                            kernel_shape, output_padding, output_shape, pads, strides):
    (dy,) = grads
    x, w = node.input[0], node.input[1]
    if ctx.is_active(w):
        raise unsupported_input(node, 1, "(the weight) depends on the data input")
    w_shape = ctx.static_shape(w, node)
    rank = len(w_shape) - 2
    kernel = list(kernel_shape or w_shape[2:])
    strides = list(strides or [1] * rank)
    dilations = list(dilations or [1] * rank)
    output_padding = list(output_padding or [0] * rank)
    effective = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    if output_shape or auto_pad not in ("NOTSET", ""):
        in_sizes = ctx.static_shape(x, node, slice(2, None))
        out_sizes = ctx.static_shape(node.output[0], node, slice(2, None))
        begins = []
        for m, length, s, p, k in zip(in_sizes, out_sizes, strides, output_padding, effective):
            total = s * (m - 1) + p + k - length
            begins.append(total // 2 if auto_pad == "SAME_UPPER" else total - total // 2)
        if auto_pad == "VALID":
            begins = [0] * rank
        ends = [max(0, (m - 1) * s + k - b - length) for m, s, k, b, length in
                zip(in_sizes, strides, effective, begins, out_sizes)]
    else:
        pads = list(pads or [0] * (2 * rank))
        begins = pads[:rank]
        ends = [max(0, e - p) for e, p in zip(pads[rank:], output_padding)]
    g = ctx.g
    dx = g.Conv(dy, w, strides=strides, dilations=dilations, group=group, kernel_shape=kernel,
                pads=begins + ends, hint="dx")
    out = [dx, None] + [None] * (len(node.input) - 2)
    if len(node.input) > 2 and node.input[2] and ctx.is_active(node.input[2]):
        out_rank = rank + 2
        axes = [a for a in range(out_rank) if a != 1]
        out[2] = g.ReduceSum(dy, g.ints(axes, "axes"), keepdims=0, hint="db")
    return out
