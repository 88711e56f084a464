"""Backward rules of the linear and elementwise-arithmetic ops (exact vector-Jacobian products).

With ``dY`` the gradient of the output:

* Conv ``Y = W * X``:          ``dX = ConvTranspose(dY, W)`` with the same strides, pads,
  dilations and group, and the output_padding that restores X's size. For stride 1 with a
  constant weight, emitted as the equal and faster ``Conv(dY, W')``, ``W'`` = ``W`` flipped with
  in/out channels swapped (geometry.flipped_kernel). With the padding trick,
  ``dY`` is first multiplied by the mask that zeroes output positions reading padding.
* Gemm ``Y = a A' B' + b C``:  ``dA' = a dY B'^T``, ``dB' = a A'^T dY``, ``dC = unbroadcast(b dY)``.
* MatMul ``Y = A B``:           ``dA = unbroadcast(dY B^T)``, ``dB = unbroadcast(A^T dY)``.
* Add/Sub/Sum:                  ``dA = unbroadcast(dY)``, ``dB = unbroadcast(+-dY)``.
* Mul:                          ``dA = unbroadcast(dY B)``, ``dB = unbroadcast(dY A)``.
* Div ``Y = A / B``:            ``dA = unbroadcast(dY / B)``, ``dB = unbroadcast(-dY Y / B)``.
"""

from __future__ import annotations

from ..geometry import (conv_transpose_geometry, explicit_pads, flipped_kernel,
                        flipped_kernel_pads, padding_trick_mask)
from .base import RuleContext, rule, unsupported_input


@rule("Conv")
def conv_backward(ctx: RuleContext, node, grads, *, auto_pad, dilations, group, kernel_shape,
                  pads, strides):
    (dy,) = grads
    x, w = node.input[0], node.input[1]
    if ctx.is_active(w):
        raise unsupported_input(node, 1, "(the weight) depends on the data input")
    in_sizes = ctx.static_shape(x, node, slice(2, None))
    out_sizes = ctx.static_shape(node.output[0], node, slice(2, None))
    rank = len(in_sizes)
    kernel = list(kernel_shape or ctx.static_shape(w, node, slice(2, None)))
    strides = list(strides or [1] * rank)
    dilations = list(dilations or [1] * rank)
    pads = explicit_pads(auto_pad, pads, in_sizes, kernel, strides, dilations)
    g = ctx.g
    if ctx.padding_trick and any(pads):
        mask = padding_trick_mask(in_sizes, out_sizes, kernel, strides, dilations, pads)
        dy = g.Mul(dy, g.const(mask, "padding_trick_mask"), hint="masked")
    weight = ctx.constant(w)
    flipped_pads = flipped_kernel_plan(in_sizes, out_sizes, kernel, strides, dilations, pads)
    if weight is not None and flipped_pads is not None:
        dx = g.Conv(dy, g.const(flipped_kernel(weight, group), "w_flipped"), pads=flipped_pads,
                    dilations=dilations, group=group, kernel_shape=kernel, hint="dx")
    else:
        # The backward weight is its own constant where it can be: one initializer feeding both
        # a Conv and a ConvTranspose has been miscompiled by OpenVINO.
        w_back = g.const(weight, "w_transpose") if weight is not None else w
        geometry = conv_transpose_geometry(in_sizes, out_sizes, kernel, strides, dilations, pads)
        dx = g.ConvTranspose(dy, w_back, strides=strides, pads=geometry.pads,
                             dilations=dilations, group=group, kernel_shape=kernel,
                             output_padding=geometry.output_padding, hint="dx")
        if geometry.needs_extra:
            dx = g.Pad(dx, g.ints([0] * (rank + 2) + [0, 0] + geometry.extra_end, "pads"),
                       hint="dx")
    return [dx] + [None] * (len(node.input) - 1)


def flipped_kernel_plan(in_sizes, out_sizes, kernel, strides, dilations, pads):
    """Pads of the stride-1 Conv that computes ``dX``, or None to use ConvTranspose.

    Stride 1 only: onnxruntime 1.31 (CPU) runs 3x3 kernels 20-40 % faster as a Conv than as a
    ConvTranspose and 1x1 kernels alike; for stride 2 the polyphase Conv (+ DepthToSpace) was
    slower than ConvTranspose (benchmarks/micro.py).
    """
    if any(s != 1 for s in strides):
        return None
    rank = len(in_sizes)
    axes = [flipped_kernel_pads(in_sizes[i], out_sizes[i], kernel[i], dilations[i], pads[i])
            for i in range(rank)]
    if any(a is None for a in axes):
        return None
    return [a[0] for a in axes] + [a[1] for a in axes]


@rule("Gemm")
def gemm_backward(ctx: RuleContext, node, grads, *, alpha, beta, transA, transB):
    (dy,) = grads
    g = ctx.g
    a, b = node.input[0], node.input[1]
    c = node.input[2] if len(node.input) > 2 else ""
    out = [None] * len(node.input)
    if ctx.is_active(a):
        # dA' = alpha dY B'^T; B'^T = B when transB else B^T.
        da = g.Gemm(dy, b, alpha=alpha, transB=0 if transB else 1, hint="da")
        out[0] = g.Transpose(da, perm=[1, 0], hint="da") if transA else da
    if ctx.is_active(b):
        # dB' = alpha A'^T dY
        db = g.Gemm(a, dy, alpha=alpha, transA=0 if transA else 1, hint="db")
        out[1] = g.Transpose(db, perm=[1, 0], hint="db") if transB else db
    if c and ctx.is_active(c):
        scaled = dy if beta == 1.0 else g.Mul(dy, g.scalar(beta), hint="dc")
        out[2] = ctx.unbroadcast(scaled, c, node.output[0])
    return out


def _swap_last_two(ctx: RuleContext, name: str, node, index: int) -> str:
    shape = ctx.shape(name)
    if shape is None or len(shape) < 2:
        raise unsupported_input(node, index, "is not a matrix (rank < 2); MatMul of vectors is "
                                "not supported")
    rank = len(shape)
    constant = ctx.constant(name)
    if constant is not None:
        return ctx.g.const(constant.swapaxes(-1, -2).copy(), "transposed")
    return ctx.g.Transpose(name, perm=list(range(rank - 2)) + [rank - 1, rank - 2],
                           hint="transposed")


@rule("MatMul")
def matmul_backward(ctx: RuleContext, node, grads):
    (dy,) = grads
    a, b = node.input
    y = node.output[0]
    g = ctx.g
    out = [None, None]
    batch = tuple((ctx.shape(y) or (None, None))[:-2])
    if ctx.is_active(a):
        da = g.MatMul(dy, _swap_last_two(ctx, b, node, 1), hint="da")
        out[0] = ctx.unbroadcast(da, a, y, batch + tuple((ctx.shape(a) or (None, None))[-2:]))
    if ctx.is_active(b):
        db = g.MatMul(_swap_last_two(ctx, a, node, 0), dy, hint="db")
        out[1] = ctx.unbroadcast(db, b, y, batch + tuple((ctx.shape(b) or (None, None))[-2:]))
    return out


@rule("Add", "Sum")
def sum_backward(ctx: RuleContext, node, grads):
    (dy,) = grads
    return [ctx.unbroadcast(dy, name, node.output[0]) if ctx.is_active(name) else None
            for name in node.input]


@rule("Sub")
def sub_backward(ctx: RuleContext, node, grads):
    (dy,) = grads
    a, b = node.input
    y = node.output[0]
    return [ctx.unbroadcast(dy, a, y) if ctx.is_active(a) else None,
            ctx.unbroadcast(ctx.g.Neg(dy, hint="db"), b, y) if ctx.is_active(b) else None]


@rule("Mul")
def mul_backward(ctx: RuleContext, node, grads):
    (dy,) = grads
    a, b = node.input
    y = node.output[0]
    g = ctx.g
    return [ctx.unbroadcast(g.Mul(dy, b, hint="da"), a, y) if ctx.is_active(a) else None,
            ctx.unbroadcast(g.Mul(dy, a, hint="db"), b, y) if ctx.is_active(b) else None]


@rule("Div")
def div_backward(ctx: RuleContext, node, grads):
    (dy,) = grads
    a, b = node.input
    y = node.output[0]
    g = ctx.g
    out = [None, None]
    if ctx.is_active(a):
        out[0] = ctx.unbroadcast(g.Div(dy, b, hint="da"), a, y)
    if ctx.is_active(b):
        out[1] = ctx.unbroadcast(g.Neg(g.Div(g.Mul(dy, y), b), hint="db"), b, y)
    return out
