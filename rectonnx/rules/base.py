"""Registry, rule context and the helpers every rule shares (unbroadcasting, static shapes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from ..builder import GraphBuilder
from ..errors import UnsupportedModelError
from ..geometry import unbroadcast_axes

Rule = Callable[..., list]
RULES: dict[str, Rule] = {}


def rule(*op_types: str):
    """Register the decorated function as the backward rule of ``op_types``."""
    def register(function: Rule) -> Rule:
        for op_type in op_types:
            RULES[op_type] = function
        return function
    return register


def node_attributes(node: onnx.NodeProto, opset: int) -> dict:
    """All attributes of the op's schema: the node's value, else the default (None if none).

    Composite activations that the normaliser recognises (normalize.fuse_composites) are named
    after ops newer than the target opset (Gelu 20, Swish 24, Mish 18): their first schema.
    """
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain or "")
    except onnx.defs.SchemaError:
        schema = onnx.defs.get_schema(node.op_type, onnx.defs.onnx_opset_version(),
                                      node.domain or "")
    values = {}
    for name, spec in schema.attributes.items():
        default = spec.default_value
        values[name] = (helper.get_attribute_value(default)
                        if default.type != onnx.AttributeProto.UNDEFINED else None)
    for attribute in node.attribute:
        values[attribute.name] = helper.get_attribute_value(attribute)
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in values.items()}


@dataclass(frozen=True)
class Activation:
    """What a method needs at an activation ``y = f(z)`` with upstream gradient ``upstream``.

    ``exact`` is the true vector-Jacobian product ``f'(z) * upstream``; ``is_relu`` marks a
    plain ReLU, where RectGrad uses the paper's rule without the ``f'(z)`` factor. ``mask``,
    when set, is the boolean ``f'(z) == 1`` of an activation whose ``f'`` is 0 or 1 (Clip), so
    that ``exact = upstream * mask`` and a method may fold it into its own mask.
    """

    z: str
    y: str
    upstream: str
    exact: str
    is_relu: bool
    mask: str | None = None


@dataclass(frozen=True)
class Unpooled:
    """A gradient ``dX = MaxUnpool(dY, Indices)`` (or its scatter form) of a max pool
    ``Y = MaxPool(X)`` whose windows cannot overlap: it is ``dY[o]`` at the arg-max of each
    window ``o`` and zero elsewhere, so ``X * dX`` holds the values ``Y * dY`` and zeros.
    ``spread(g)`` emits the same placement of another pooled-size gradient ``g``."""

    x: str
    y: str
    dy: str
    spread: Callable[[str], str]


class RuleContext:
    """Everything a rule may read: static shapes, constants, the method's gate at activations
    (``activation``) and its rule overrides by op type (``overrides``); and the builder."""

    def __init__(self, builder: GraphBuilder, shapes: dict, constants: dict[str, np.ndarray],
                 active: set[str], activation: Callable[["RuleContext", "Activation"], str], *,
                 overrides: Mapping[str, Rule] | None = None, opset: int,
                 max_unpool: bool = False):
        self.g = builder
        self.shapes = shapes
        self.constants = constants
        self.active = active
        self.activation = activation
        self.overrides = dict(overrides or {})
        self.opset = opset
        self.max_unpool = max_unpool  # MaxUnpool for disjoint max pools (onnxruntime CPU only)
        # gradient name -> how it came out of a max pool with disjoint windows (rules/pool.py)
        self.unpooled: dict[str, "Unpooled"] = {}
        self.warnings: list[str] = []  # for the user, e.g. layers whose gate closes entirely

    def rule_for(self, op_type: str) -> Rule:
        """The backward rule of ``op_type``: the method's override, else the table's."""
        return self.overrides.get(op_type) or RULES[op_type]

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    # -- facts about forward tensors -------------------------------------------------------------
    def shape(self, name: str) -> tuple | None:
        return self.shapes.get(name)

    def static_shape(self, name: str, node: onnx.NodeProto, dims: slice = slice(None)) -> list[int]:
        """The dims of ``name`` (a slice of them) as ints, or a clear error naming the node."""
        shape = self.shapes.get(name)
        picked = None if shape is None else list(shape[dims])
        if picked is None or not all(isinstance(d, int) for d in picked):
            raise UnsupportedModelError(
                f"{node.op_type} node {node.name!r}: the backward needs static sizes of "
                f"{name!r} (got {list(shape) if shape else 'unknown'}); export the model with a "
                "fixed image size", [(node.op_type, node.name)])
        return picked

    def has_static_sizes(self, *names: str) -> bool:
        """Whether the spatial sizes (axes 2 on) of every tensor in ``names`` are known ints."""
        shapes = [self.shapes.get(name) for name in names]
        return all(shape is not None and all(isinstance(d, int) for d in shape[2:])
                   for shape in shapes)

    def sample_size(self, name: str) -> int | None:
        """Elements per sample of ``name`` (all axes but the batch), when they are static."""
        shape = self.shapes.get(name)
        if shape is None or not all(isinstance(d, int) for d in shape[1:]):
            return None
        return int(np.prod(shape[1:]))

    def unpooled_from(self, grad: str, x: str) -> "Unpooled | None":
        """The disjoint max pool of ``x`` whose placed gradient is ``grad`` (so ``x`` feeds
        only that pool), else None."""
        unpooled = self.unpooled.get(grad)
        return unpooled if unpooled is not None and unpooled.x == x else None

    def constant(self, name: str) -> np.ndarray | None:
        return self.constants.get(name) if name else None

    def is_active(self, name: str) -> bool:
        return name in self.active

    def rank(self, name: str, node: onnx.NodeProto) -> int:
        """The rank of ``name``, or a clear error naming the node."""
        shape = self.shapes.get(name)
        if shape is None:
            raise UnsupportedModelError(
                f"{node.op_type} node {node.name!r}: the backward needs the rank of {name!r}, "
                "which shape inference could not tell", [(node.op_type, node.name)])
        return len(shape)

    def dim(self, name: str, axis: int) -> int | str:
        """Size of ``name`` along ``axis``: an int when static, else an int64 ``[1]`` tensor."""
        shape = self.shapes.get(name)
        if shape is not None and isinstance(shape[axis], int):
            return shape[axis]
        g = self.g
        return g.Gather(g.Shape(name), g.ints([axis], "axis"), axis=0, hint="dim")

    # -- shared emitting helpers ------------------------------------------------------------
    def unbroadcast(self, grad: str, operand: str, result: str,
                    grad_shape: tuple | None = None) -> str:
        """``grad`` (shaped like ``result``, or ``grad_shape``) summed to ``operand``'s shape."""
        in_shape = self.shape(operand)
        out_shape = grad_shape if grad_shape is not None else self.shape(result)
        if in_shape is not None and out_shape is not None and tuple(in_shape) == tuple(out_shape) \
                and all(d is not None for d in in_shape):
            return grad
        axes = None if in_shape is None or out_shape is None else unbroadcast_axes(in_shape,
                                                                                    out_shape)
        if axes is None:
            if in_shape is None or out_shape is None or len(in_shape) > len(out_shape):
                raise UnsupportedModelError(
                    f"cannot tell how {operand!r} {in_shape} broadcasts to {result!r} "
                    f"{out_shape}", [])
            return self._unbroadcast_at_run_time(grad, operand, len(out_shape) - len(in_shape))
        g = self.g
        summed = g.ReduceSum(grad, g.ints(axes, "axes"), keepdims=1, hint="unbroadcast") \
            if axes else grad
        return g.reshape_like(summed, operand, hint="unbroadcast")

    def _unbroadcast_at_run_time(self, grad: str, operand: str, lead: int) -> str:
        """``unbroadcast`` when the sizes are only known at run time (ranks are known): sum over
        the axes where the operand, left-padded with ``lead`` ones, has size 1."""
        g = self.g
        dims = g.Shape(operand, hint="operand_shape")
        if lead:
            dims = g.Concat(g.ints([1] * lead, "leading_ones"), dims, axis=0)
        axes = g.Reshape(g.NonZero(g.Equal(dims, g.ints([1], "one"))), g.ints([-1], "flat"),
                         hint="broadcast_axes")
        summed = g.ReduceSum(grad, axes, keepdims=1, noop_with_empty_axes=1, hint="unbroadcast")
        return g.reshape_like(summed, operand, hint="unbroadcast")

    def same_pad_begins(self, x: str, kernel: Sequence[int], strides: Sequence[int],
                        dilations: Sequence[int], auto_pad: str) -> str:
        """The begin pads of ``auto_pad`` SAME_UPPER/SAME_LOWER for the run-time sizes of ``x``
        (an int64 ``[r]`` tensor; ``geometry.explicit_pads`` is the static version):
        ``total = max(0, (ceil(n / s) - 1) s + K - n)``, begin ``total // 2`` (UPPER) or
        ``total - total // 2`` (LOWER)."""
        g = self.g
        rank = len(kernel)
        n = g.Slice(g.Shape(x), g.ints([2], "start"), g.ints([2 + rank], "end"), hint="sizes")
        s = g.ints(list(strides), "strides")
        effective = g.ints([(k - 1) * d + 1 for k, d in zip(kernel, dilations)], "effective")
        out = g.Div(g.Sub(g.Add(n, s), g.ints([1] * rank, "ones")), s, hint="out_sizes")
        needed = g.Sub(g.Add(g.Mul(g.Sub(out, g.ints([1] * rank, "ones")), s), effective), n)
        total = g.Max(needed, g.ints([0] * rank, "zeros"), hint="total_pads")
        half = g.Div(total, g.ints([2] * rank, "twos"))
        return half if auto_pad == "SAME_UPPER" else g.Sub(total, half, hint="begins")

    def fit_to_shape_of(self, grad: str, like: str, begins: Sequence[int] | str | None = None,
                        first_axis: int = 2) -> str:
        """``grad`` cut to the run-time shape of ``like`` on the axes from ``first_axis`` on.

        On each of those axes, the output keeps ``grad[begin : begin + size]`` (``size`` from
        ``Shape(like)``) and, where ``grad`` is too short, is zero-padded at the end. ``begins``
        are int offsets or an int64 tensor (one entry per axis; default 0).

        The input-gradient of a convolution whose spatial sizes are dynamic (pads ``(b, e)``):
        ``fit_to_shape_of(ConvTranspose(dy, W, pads=b + [0] * r, ...), x)``, or, when ``b`` is
        only known at run time (SAME padding), ``fit_to_shape_of(ConvTranspose(dy, W), x, b)``,
        in both cases without output_padding: windows never reach the input positions past the
        ConvTranspose's end (their gradient is 0: padded) and the positions in the end padding
        are cut. With static sizes ``conv_transpose_geometry`` does it without this step.
        """
        g = self.g
        rank = len(self.shape(like) or self.shape(grad) or ())
        if rank == 0:
            raise UnsupportedModelError(f"fit_to_shape_of: unknown rank of {like!r}", [])
        axes = list(range(first_axis, rank))
        target = g.Slice(g.Shape(like), g.ints([first_axis], "start"), g.ints([rank], "end"),
                         hint="target_size")
        if begins is None:
            begins = [0] * len(axes)
        starts = begins if isinstance(begins, str) else g.ints(list(begins), "begins")
        have = g.Sub(g.Slice(g.Shape(grad), g.ints([first_axis], "start"), g.ints([rank], "end")),
                     starts, hint="available")
        short = g.Max(g.Sub(target, have), g.ints([0] * len(axes), "zeros"), hint="shortfall")
        pads = g.Concat(g.ints([0] * rank, "no_begin_pads"),
                        g.ints([0] * first_axis, "no_pads"), short, axis=0, hint="pads")
        padded = g.Pad(grad, pads, hint="padded")
        return g.Slice(padded, starts, g.Add(starts, target), g.ints(axes, "axes"), hint="fitted")

    def ensure_output(self, node: onnx.NodeProto, index: int, hint: str) -> str:
        """The name of the forward node's output ``index``, adding the output if it is unused."""
        while len(node.output) <= index:
            node.output.append("")
        if not node.output[index]:
            node.output[index] = self.g.fresh(hint)
        return node.output[index]


def masked(g: GraphBuilder, x: str, mask: str, hint: str) -> str:
    """``x * I(mask)`` for a boolean ``mask``: Cast + Mul runs 1.4-1.8x faster than Where in
    onnxruntime (benchmarks/micro.py)."""
    return g.Mul(x, g.CastLike(mask, x, hint="keep"), hint=hint)


def gated(ctx: RuleContext, node: onnx.NodeProto, upstream: str, exact: str,
          is_relu: bool = False) -> str:
    """The method's gradient at the activation ``node`` (``y = f(z)``, one input, one output)
    whose exact vector-Jacobian product is ``exact``."""
    act = Activation(z=node.input[0], y=node.output[0], upstream=upstream, exact=exact,
                     is_relu=is_relu)
    return ctx.activation(ctx, act)


def unsupported_input(node: onnx.NodeProto, input_index: int, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{node.op_type} node {node.name!r}: input {input_index} ({node.input[input_index]!r}) "
        f"{why}", [(node.op_type, node.name)])


def none_for(rest: Sequence) -> list:
    return [None] * len(rest)
