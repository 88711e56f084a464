"""Backward rules of the linear and elementwise-arithmetic ops (exact vector-Jacobian products).

With ``dY`` the gradient of the output:

* Conv ``Y = W * X``:          ``dX = ConvTranspose(dY, W)`` with the same strides, pads,
  dilations and group, and the output_padding that restores X's size. For stride 1 with a
  constant weight, emitted as the equal and faster ``Conv(dY, W')``, ``W'`` = ``W`` flipped with
  in/out channels swapped (geometry.flipped_kernel), except when X has fewer than
  ``FEW_CHANNELS`` channels (an RGB input): onnxruntime pads a Conv's output channels to its
  NCHWc block of 8 or 16, and the ConvTranspose is then faster.
  With spatial sizes known only at run time (symbolic H, W), the ConvTranspose has only the
  begin pads (for SAME padding computed from ``Shape(X)``) and its result is fitted to
  ``Shape(X)``.
* The padding trick (``padding_trick_conv``, a rule override the method registry installs):
  ``dY`` is first multiplied by a mask. ``"exact"``: 0 at output positions whose receptive
  field covers padding (with run-time sizes: ``Conv(ones, ones_kernel) == prod(kernel)``);
  ``"border"`` (the authors' code): 0 on a one-position border of every convolution whose
  output has TensorFlow's SAME size ``ceil(n / s)`` (geometry.border_mask). When ``dY`` is a
  gate's ``x * Cast(b)`` (a ReLU/Clip mask or RectGrad's) and the mask is a constant, it is
  folded into the gate as ``x * Cast(b & mask)`` (``_fold_into_gate``; bit-equal): a boolean
  And instead of a float Mul over the gradient (EfficientNet-Lite0 RectGrad 0.98-0.99x the
  time, interleaved A/B).
* Gemm ``Y = a A' B' + b C``:  ``dA' = a dY B'^T``, ``dB' = a A'^T dY``, ``dC = unbroadcast(b dY)``.
* MatMul ``Y = A B``:           ``dA = unbroadcast(dY B^T)``, ``dB = unbroadcast(A^T dY)``.
* Add/Sub/Sum:                  ``dA = unbroadcast(dY)``, ``dB = unbroadcast(+-dY)``.
* Mul:                          ``dA = unbroadcast(dY B)``, ``dB = unbroadcast(dY A)``.
* Div ``Y = A / B``:            ``dA = unbroadcast(dY / B)``, ``dB = unbroadcast(-dY Y / B)``.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from ..errors import UnsupportedModelError
from ..geometry import (border_mask, conv_transpose_geometry, explicit_pads, flipped_kernel,
                        flipped_kernel_pads, padding_trick_mask)
from .base import Rule, RuleContext, rule, unsupported_input


@rule("Conv")
def conv_backward(ctx: RuleContext, node, grads, *, auto_pad, dilations, group, kernel_shape,
                  pads, strides):
    (dy,) = grads
    x, w = node.input[0], node.input[1]
    if ctx.is_active(w):
        raise unsupported_input(node, 1, "(the weight) depends on the data input")
    rank = ctx.rank(x, node) - 2
    kernel = list(kernel_shape or ctx.static_shape(w, node, slice(2, None)))
    strides = list(strides or [1] * rank)
    dilations = list(dilations or [1] * rank)
    if not ctx.has_static_sizes(x, node.output[0]):
        return [_conv_backward_dynamic(ctx, node, dy, kernel=kernel, strides=strides,
                                       dilations=dilations, pads=pads, auto_pad=auto_pad,
                                       group=group)] + [None] * (len(node.input) - 1)
    in_sizes = ctx.static_shape(x, node, slice(2, None))
    out_sizes = ctx.static_shape(node.output[0], node, slice(2, None))
    pads = explicit_pads(auto_pad, pads, in_sizes, kernel, strides, dilations)
    g = ctx.g
    weight = ctx.constant(w)
    flipped_pads = flipped_kernel_plan(in_sizes, out_sizes, kernel, strides, dilations, pads)
    if weight is not None and flipped_pads is not None and not _few_channels(weight, group):
        dx = g.Conv(dy, g.const(flipped_kernel(weight, group), "w_flipped"), pads=flipped_pads,
                    dilations=dilations, group=group, kernel_shape=kernel, hint="dx")
    else:
        geometry = conv_transpose_geometry(in_sizes, out_sizes, kernel, strides, dilations, pads)
        dx = g.ConvTranspose(dy, _backward_weight(ctx, w), strides=strides, pads=geometry.pads,
                             dilations=dilations, group=group, kernel_shape=kernel,
                             output_padding=geometry.output_padding, hint="dx")
        if geometry.needs_extra:
            dx = g.Pad(dx, g.ints([0] * (rank + 2) + [0, 0] + geometry.extra_end, "pads"),
                       hint="dx")
    return [dx] + [None] * (len(node.input) - 1)


FEW_CHANNELS = 8  # onnxruntime's smallest NCHWc block (AVX2; 16 with AVX-512)


def _few_channels(weight: np.ndarray, group: int) -> bool:
    """Whether ``dX`` has so few channels that ConvTranspose beats the flipped-kernel Conv:
    measured on an RGB first layer (32 -> 3 channels, 3x3, stride 1) 1.2-1.8x in isolation
    (benchmarks/micro.py), and it reads the NCHW gradient without a reorder."""
    return group == 1 and weight.shape[1] < FEW_CHANNELS


def _backward_weight(ctx: RuleContext, w: str) -> str:
    """The weight for the ConvTranspose: its own constant where it can be, because one
    initializer feeding both a Conv and a ConvTranspose has been miscompiled by OpenVINO."""
    weight = ctx.constant(w)
    return ctx.g.const(weight, "w_transpose") if weight is not None else w


def _conv_backward_dynamic(ctx: RuleContext, node, dy: str, *, kernel, strides, dilations, pads,
                           auto_pad, group) -> str:
    """``dX`` of a convolution whose spatial sizes are known only at run time.

    ``ConvTranspose(dy, W)`` with the begin pads ``b`` (explicit, or computed from ``Shape(X)``
    for SAME padding), fitted to ``Shape(X)`` (``RuleContext.fit_to_shape_of``): input positions
    past the transpose's end are read by no window (gradient 0), those in the end padding are
    cut. With the padding trick, ``dy`` is first masked where the window reads padding: a Conv of
    ones over ``Shape(X)`` with a ones kernel counts the real taps of each window, and the mask
    is ``count == prod(kernel)``.
    """
    g = ctx.g
    x, w = node.input[0], node.input[1]
    rank = len(kernel)
    same = auto_pad in ("SAME_UPPER", "SAME_LOWER")
    explicit = None if same else explicit_pads(auto_pad, pads, [None] * rank, kernel, strides,
                                               dilations)
    weight = ctx.constant(w)
    if weight is not None and all(s == 1 for s in strides) and not same \
            and not _few_channels(weight, group):
        # Stride 1: the output is X's size minus (k - 1) d plus the pads, whatever X's size, so
        # the flipped-kernel Conv needs no fitting.
        reach = [(k - 1) * d for k, d in zip(kernel, dilations)]
        flipped_pads = [r - b for r, b in zip(reach, explicit[:rank])] + \
                       [r - e for r, e in zip(reach, explicit[rank:])]
        if min(flipped_pads) >= 0:
            return g.Conv(dy, g.const(flipped_kernel(weight, group), "w_flipped"),
                          pads=flipped_pads, dilations=dilations, group=group,
                          kernel_shape=kernel, hint="dx")
    begin_pads = list(explicit[:rank]) if not same else [0] * rank
    spread = g.ConvTranspose(dy, _backward_weight(ctx, w), strides=strides,
                             pads=begin_pads + [0] * rank, dilations=dilations, group=group,
                             kernel_shape=kernel, hint="spread")
    begins = ctx.same_pad_begins(x, kernel, strides, dilations, auto_pad) if same else None
    return ctx.fit_to_shape_of(spread, x, begins=begins)


def padding_trick_conv(mode: str, inner: Rule = conv_backward) -> Rule:
    """The Conv rule ``inner`` with the padding trick ``mode`` ("exact" or "border") applied to
    the output gradient first (module docstring)."""
    def rule_with_padding_trick(ctx: RuleContext, node, grads, **attributes):
        (dy,) = grads
        mask = _padding_trick_mask(ctx, node, mode, **attributes)
        if mask is not None and not _fold_into_gate(ctx, dy, mask):
            dy = ctx.g.Mul(dy, mask, hint="masked")
        return inner(ctx, node, [dy], **attributes)
    return rule_with_padding_trick


FOLD_PADDING_MASK = True  # fold a constant padding-trick mask into the gate's boolean mask


def _fold_into_gate(ctx: RuleContext, dy: str, mask: str) -> bool:
    """Apply the constant 0/1 ``mask`` to ``dy`` inside the gate that just made it, if it can.

    When ``dy = x * CastLike(b, x)`` (``base.masked``: the ReLU/Clip derivative or a method's
    gate) and neither ``dy`` nor the cast has another consumer, ``x * Cast(b) * m`` is
    ``x * Cast(b & m)`` bit for bit (both are ``x`` or ``x * 0``, the same signed zero or NaN):
    an And of booleans then replaces a float Mul over the whole gradient. Returns whether it
    did (the nodes are rewired in place)."""
    g = ctx.g
    if not FOLD_PADDING_MASK:
        return False
    values = next((numpy_helper.to_array(t) for t in g.initializers if t.name == mask), None)
    if values is None or not np.all((values == 0) | (values == 1)):
        return False
    producers = {out: n for n in g.nodes for out in n.output}
    product = producers.get(dy)
    if product is None or product.op_type != "Mul" or len(product.input) != 2:
        return False
    cast = producers.get(product.input[1])
    if cast is None or cast.op_type != "CastLike" or cast.input[1] != product.input[0]:
        return False
    uses = [i for n in g.nodes for i in n.input]
    if uses.count(cast.output[0]) != 1 or dy in uses:
        return False
    g.initializers[:] = [t for t in g.initializers if t.name != mask]  # only this rule used it
    inside = g.const(values.astype(bool), "padding_trick_inside")
    both = g.And(cast.input[0], inside, hint="keep_inside")
    g.nodes.insert(g.nodes.index(cast), g.nodes.pop())
    cast.input[0] = both
    return True


def _padding_trick_mask(ctx: RuleContext, node, mode: str, *, auto_pad, dilations, group,
                        kernel_shape, pads, strides) -> str | None:
    """The mask of ``node``'s output gradient under the padding trick, or None (no mask)."""
    g = ctx.g
    x, w = node.input[0], node.input[1]
    rank = ctx.rank(x, node) - 2
    kernel = list(kernel_shape or ctx.static_shape(w, node, slice(2, None)))
    strides = list(strides or [1] * rank)
    dilations = list(dilations or [1] * rank)
    same = auto_pad in ("SAME_UPPER", "SAME_LOWER")
    if ctx.has_static_sizes(x, node.output[0]):
        in_sizes = ctx.static_shape(x, node, slice(2, None))
        out_sizes = ctx.static_shape(node.output[0], node, slice(2, None))
        if mode == "border":
            mask = border_mask(in_sizes, out_sizes, strides)
        else:
            explicit = explicit_pads(auto_pad, pads, in_sizes, kernel, strides, dilations)
            mask = padding_trick_mask(in_sizes, out_sizes, kernel, strides, dilations,
                                      explicit) if any(explicit) else None
        if mask is None:
            return None
        if not mask.any():
            ctx.warn(f"the padding trick ({mode}) zeroes the whole output gradient of Conv "
                     f"node {node.name!r} (every {'x'.join(map(str, out_sizes))} output "
                     "position reads padding at this input size), so the map is zero "
                     "wherever it depends on that layer: use a larger input or "
                     "padding_trick=False")
        return g.const(mask, "padding_trick_mask")
    if mode == "border":
        raise UnsupportedModelError(
            f"Conv node {node.name!r}: padding_trick='border' decides from the spatial sizes "
            "whether a convolution is SAME-shaped, and this model's sizes are known only at run "
            "time: export it with a fixed image size, or use padding_trick='exact'",
            [(node.op_type, node.name)])
    explicit = None if same else explicit_pads(auto_pad, pads, [None] * rank, kernel, strides,
                                               dilations)
    if not same and not any(explicit):
        return None
    # run-time sizes: a Conv of ones with a ones kernel counts each window's real taps
    spatial = g.Slice(g.Shape(x), g.ints([2], "start"), g.ints([rank + 2], "end"))
    ones = g.ConstantOfShape(g.Concat(g.ints([1, 1], "one_one"), spatial, axis=0),
                             value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]),
                             hint="ones")
    window = {"auto_pad": auto_pad} if same else {"pads": explicit}
    taps = g.Conv(ones, g.const(np.ones([1, 1] + kernel, np.float32), "ones_kernel"),
                  kernel_shape=kernel, strides=strides, dilations=dilations, hint="taps",
                  **window)
    return g.Cast(g.Equal(taps, g.scalar(float(np.prod(kernel)))), to=TensorProto.FLOAT,
                  hint="padding_trick_mask")


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
