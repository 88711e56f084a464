"""Backward rules of pooling.

* MaxPool, exact: the forward node also emits its Indices (flat positions in the input) and
  ``dX = ScatterElements(zeros, Indices, dY, reduction="add")``, so overlapping windows add up.
  Windows that cannot overlap (stride >= kernel, no dilation) never repeat an index, and
  ``dX = MaxUnpool(dY, Indices, Shape(X))`` is the same sum, 8 % faster on the paper's CNN in
  onnxruntime's CPU provider; emitted only for ``runtime="onnxruntime-cpu"`` (OpenVINO has no
  MaxUnpool). Either way the gradient is noted in ``RuleContext.unpooled``, with the placement
  as a function: RectGrad then takes the percentile from the pooled scores and gates before the
  placement (gates._pooled_threshold), the ReLU below masks on the pooled grid
  (activation.relu_backward).
* MaxPool with the proportional redistribution rule (paper App. C.2, option ``prr``; the
  override ``prr_max_pool_backward`` that the method registry installs):
  ``z = AveragePool(X) + 1e-10``, ``c = AveragePool^T(dY / z)``, ``dX = X c`` — the gradient is
  spread over each window in proportion to the activations.
* AveragePool: ``Y[o] = sum_{i in window(o), i real} X[i] / div[o]``, so
  ``dX = ConvTranspose_ones(dY / div)``. ``1 / div[o]`` is computed as
  ``AveragePool(ones)[o] / real[o]`` with ``real[o]`` the number of real (non-padding) positions
  in the window, so the rule agrees with whatever divisor convention the runtime uses for
  count_include_pad and ceil mode. With dynamic spatial sizes the counts are computed in the
  graph (a Conv of ones) and the spread is fitted to ``Shape(X)`` (``RuleContext.fit_to_shape_of``).
* GlobalAveragePool: ``dX = Expand(dY / (H W), Shape(X))``.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from ..geometry import conv_transpose_geometry, explicit_pads, valid_counts
from .base import RuleContext, Unpooled, rule, unsupported_input

PRR_EPSILON = 1e-10


def average_pool_transpose(ctx: RuleContext, node, dy: str, x: str, *, kernel, strides, pads,
                           ceil_mode: int, count_include_pad: int) -> str:
    """The exact backward of AveragePool(kernel, strides, pads, ...) applied to ``dy``."""
    if not ctx.has_static_sizes(x, node.output[0]):
        return _average_pool_transpose_dynamic(ctx, node, dy, x, kernel=kernel, strides=strides,
                                               pads=pads, ceil_mode=ceil_mode,
                                               count_include_pad=count_include_pad)
    g = ctx.g
    in_sizes = ctx.static_shape(x, node, slice(2, None))
    out_sizes = ctx.static_shape(node.output[0], node, slice(2, None))
    rank = len(in_sizes)
    ones = g.const(np.ones([1, 1] + in_sizes, np.float32), "ones")
    per_window = g.AveragePool(ones, kernel_shape=kernel, strides=strides, pads=pads,
                               ceil_mode=ceil_mode, count_include_pad=count_include_pad,
                               hint="inverse_divisor")
    real = valid_counts(in_sizes, out_sizes, kernel, strides, pads)
    weight = g.Div(per_window, g.const(np.maximum(real, 1.0), "real_counts"), hint="weight")
    scaled = g.Mul(dy, weight, hint="scaled")
    per_channel = g.Reshape(scaled, g.ints([-1, 1] + out_sizes, "shape"), hint="per_channel")
    geometry = conv_transpose_geometry(in_sizes, out_sizes, kernel, strides, [1] * rank, pads)
    spread = g.ConvTranspose(per_channel, g.const(np.ones([1, 1] + list(kernel), np.float32),
                                                  "ones_kernel"),
                             strides=strides, pads=geometry.pads, kernel_shape=kernel,
                             output_padding=geometry.output_padding, hint="spread")
    if geometry.needs_extra:
        spread = g.Pad(spread, g.ints([0] * (rank + 2) + [0, 0] + geometry.extra_end, "pads"),
                       hint="spread")
    return g.reshape_like(spread, x, hint="dx")


def _average_pool_transpose_dynamic(ctx: RuleContext, node, dy: str, x: str, *, kernel, strides,
                                    pads, ceil_mode: int, count_include_pad: int) -> str:
    """``average_pool_transpose`` for dynamic spatial sizes: the same formula, with the window
    counts computed in the graph (a Conv of ones, extended by ``s - 1`` at the end in ceil mode
    and cut to the pool's output size) and the spread fitted to ``Shape(X)``."""
    g = ctx.g
    rank = len(kernel)
    spatial = g.Slice(g.Shape(x), g.ints([2], "start"), g.ints([rank + 2], "end"))
    out_spatial = g.Slice(g.Shape(node.output[0]), g.ints([2], "start"),
                          g.ints([rank + 2], "end"))
    ones = g.ConstantOfShape(g.Concat(g.ints([1, 1], "one_one"), spatial, axis=0), hint="ones",
                             value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]))
    per_window = g.AveragePool(ones, kernel_shape=kernel, strides=strides, pads=pads,
                               ceil_mode=ceil_mode, count_include_pad=count_include_pad,
                               hint="inverse_divisor")
    ones_kernel = g.const(np.ones([1, 1] + list(kernel), np.float32), "ones_kernel")
    ceil_extra = [s - 1 if ceil_mode else 0 for s in strides]
    counted = g.Conv(ones, ones_kernel, kernel_shape=kernel, strides=strides,
                     pads=list(pads[:rank]) + [e + c for e, c in zip(pads[rank:], ceil_extra)],
                     hint="real_counts")
    real = g.Slice(counted, g.ints([0] * rank, "starts"), out_spatial,
                   g.ints(range(2, rank + 2), "axes"), hint="real_counts")
    weight = g.Div(per_window, g.Max(real, g.scalar(1.0)), hint="weight")
    scaled = g.Mul(dy, weight, hint="scaled")
    per_channel = g.Reshape(scaled, g.Concat(g.ints([-1, 1], "shape"), out_spatial, axis=0),
                            hint="per_channel")
    spread = g.ConvTranspose(per_channel, ones_kernel, strides=strides, kernel_shape=kernel,
                             pads=list(pads[:rank]) + [0] * rank, hint="spread")
    return g.reshape_like(ctx.fit_to_shape_of(spread, x), x, hint="dx")


def _window(ctx, node, x, kernel_shape, strides, pads, auto_pad, dilations=None):
    rank = len(kernel_shape)
    strides = list(strides or [1] * rank)
    dilations = list(dilations or [1] * rank)
    in_sizes = ctx.static_shape(x, node, slice(2, None)) \
        if auto_pad in ("SAME_UPPER", "SAME_LOWER") else [None] * rank
    pads = explicit_pads(auto_pad, pads, in_sizes, kernel_shape, strides, dilations)
    return list(kernel_shape), strides, pads, dilations


@rule("AveragePool")
def average_pool_backward(ctx: RuleContext, node, grads, *, auto_pad, ceil_mode,
                          count_include_pad, kernel_shape, pads, strides, dilations=None):
    (dy,) = grads
    x = node.input[0]
    if dilations and any(d != 1 for d in dilations):
        raise unsupported_input(node, 0, "is pooled with dilations; not supported")
    kernel, strides, pads, _ = _window(ctx, node, x, kernel_shape, strides, pads, auto_pad)
    return [average_pool_transpose(ctx, node, dy, x, kernel=kernel, strides=strides, pads=pads,
                                   ceil_mode=ceil_mode, count_include_pad=count_include_pad)]


@rule("MaxPool")
def max_pool_backward(ctx: RuleContext, node, grads, *, auto_pad, ceil_mode, dilations,
                      kernel_shape, pads, storage_order, strides):
    dy = grads[0]
    x = node.input[0]
    g = ctx.g
    if storage_order:
        raise unsupported_input(node, 0, "is max-pooled with storage_order=1; not supported")
    indices = ctx.ensure_output(node, 1, f"{node.name or node.output[0]}/indices")
    rank = len(kernel_shape)
    disjoint = all(d == 1 for d in dilations or [1] * rank) and \
        all(s >= k for s, k in zip(strides or [1] * rank, kernel_shape))
    unpool_pads = _unpool_pads(ctx, node, x, kernel_shape, strides, pads, auto_pad,
                               ceil_mode) if disjoint and ctx.max_unpool else None

    def spread(pooled_grad: str) -> str:
        """Each window's gradient added at its arg-max: ``dX`` for ``dY = pooled_grad``."""
        if unpool_pads is not None:
            # disjoint windows: no index repeats, so placing each dY at its index is the sum
            return g.MaxUnpool(pooled_grad, indices, g.Shape(x), kernel_shape=kernel_shape,
                               strides=strides or [1] * rank, pads=unpool_pads, hint="dx")
        flat_size = g.Reshape(g.Size(x), g.ints([1], "shape"), hint="size")
        zeros = g.ConstantOfShape(flat_size, hint="zeros",
                                  value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
        flat = g.ints([-1], "flat")
        scattered = g.ScatterElements(zeros, g.Reshape(indices, flat),
                                      g.Reshape(pooled_grad, flat), axis=0, reduction="add",
                                      hint="dx")
        return g.reshape_like(scattered, x, hint="dx")

    dx = spread(dy)
    if disjoint:
        ctx.unpooled[dx] = Unpooled(x, node.output[0], dy, spread)
    return [dx]



def prr_max_pool_backward(ctx: RuleContext, node, grads, *, auto_pad, ceil_mode, dilations,
                          kernel_shape, pads, storage_order, strides):
    """The proportional redistribution rule (``prr=True``, a rule override the method registry
    installs for MaxPool): ``z = AveragePool(x) + eps``, ``dX = x * AveragePool^T(dY / z)``."""
    dy = grads[0]
    x = node.input[0]
    g = ctx.g
    kernel, strides, pads, dilations = _window(ctx, node, x, kernel_shape, strides, pads,
                                               auto_pad, dilations)
    if any(d != 1 for d in dilations):
        raise unsupported_input(node, 0, "is max-pooled with dilations; the proportional "
                                "redistribution rule needs an undilated pool")
    z = g.AveragePool(x, kernel_shape=kernel, strides=strides, pads=pads, ceil_mode=ceil_mode,
                      count_include_pad=0, hint="prr_mean")
    z = g.Add(z, g.scalar(PRR_EPSILON), hint="prr_mean")
    share = average_pool_transpose(ctx, node, g.Div(dy, z, hint="prr_ratio"), x,
                                   kernel=kernel, strides=strides, pads=pads,
                                   ceil_mode=ceil_mode, count_include_pad=0)
    return [g.Mul(x, share, hint="dx")] + [None] * (len(node.input) - 1)

def _unpool_pads(ctx: RuleContext, node, x, kernel_shape, strides, pads, auto_pad,
                 ceil_mode) -> list[int] | None:
    """MaxUnpool ``pads`` for a pool whose windows cannot overlap, or None when none fit.

    MaxUnpool's pads only size its default output, ``(out - 1) s + k - pads``, which
    onnxruntime requires to be at most the given ``Shape(X)`` (and each pad below the kernel):
    exactly the excess with static sizes, else the pool's own pads (enough in floor mode; ceil
    mode then scatters).
    """
    rank = len(kernel_shape)
    strides = list(strides or [1] * rank)
    if ctx.has_static_sizes(x, node.output[0]):
        in_sizes = ctx.static_shape(x, node, slice(2, None))
        out_sizes = ctx.static_shape(node.output[0], node, slice(2, None))
        excess = [max(0, (o - 1) * s + k - i)
                  for i, o, s, k in zip(in_sizes, out_sizes, strides, kernel_shape)]
    elif ceil_mode or auto_pad not in ("", "NOTSET"):
        return None
    else:
        window_pads = list(pads or [0] * (2 * rank))
        excess = [b + e for b, e in zip(window_pads[:rank], window_pads[rank:])]
    # onnxruntime wants each pad below the kernel: split the excess between both ends
    begins = [min(e, k - 1) for e, k in zip(excess, kernel_shape)]
    ends = [e - b for e, b in zip(excess, begins)]
    if any(e >= k for e, k in zip(ends, kernel_shape)):
        return None
    return begins + ends


@rule("GlobalAveragePool")
def global_average_pool_backward(ctx: RuleContext, node, grads):
    (dy,) = grads
    g = ctx.g
    x = node.input[0]
    if ctx.has_static_sizes(x):
        count = g.scalar(float(np.prod(ctx.shape(x)[2:])))
    else:
        spatial = g.Slice(g.Shape(x), g.ints([2], "start"), g.ints([2 ** 62], "end"))
        count = g.Cast(g.ReduceProd(spatial, keepdims=0), to=TensorProto.FLOAT, hint="count")
    return [g.Expand(g.Div(dy, count), g.Shape(x), hint="dx")]
