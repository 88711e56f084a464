"""The reverse walk: visit the path from input to logits backwards, apply each node's rule, and
sum the cotangents of tensors that feed several nodes (``R_t = sum over consumers``)."""

from __future__ import annotations

import onnx

from .errors import UnsupportedModelError
from .normalize import NormalizedModel
from .rules import RULES, RuleContext, node_attributes


def unsupported_nodes(norm: NormalizedModel) -> list[tuple[str, str]]:
    """``(op_type, node name)`` of every node on the path without a backward rule."""
    return [(n.op_type, n.name or n.output[0]) for n in norm.path_nodes
            if n.op_type not in RULES or n.domain not in ("", "ai.onnx")]


def check_supported(norm: NormalizedModel) -> None:
    missing = unsupported_nodes(norm)
    if missing:
        listing = ", ".join(f"{op} (node {name!r})" for op, name in missing)
        ops = sorted({op for op, _ in missing})
        raise UnsupportedModelError(
            f"{len(missing)} node(s) between the input and the logits have no backward rule: "
            f"{listing}. Unsupported op types: {', '.join(ops)}. Run `rectonnx info MODEL` for "
            "the full coverage report.", missing)


def _sum(ctx: RuleContext, grads: list[str]) -> str:
    return grads[0] if len(grads) == 1 else ctx.g.Sum(*grads, hint="accumulated")


def backpropagate(norm: NormalizedModel, ctx: RuleContext, seed: str) -> str:
    """The gradient of the seeded logits with respect to the data input, as a tensor name."""
    pending: dict[str, list[str]] = {norm.logits_name: [seed]}
    for node in reversed(norm.path_nodes):
        if not any(o in pending for o in node.output):
            continue
        out_grads = [(_sum(ctx, pending.pop(o)) if o in pending else None) for o in node.output]
        ctx.g.scope(f"grad/{node.name or node.output[0]}")
        attributes = node_attributes(node, ctx.opset)
        backward = ctx.rule_for(node.op_type)
        input_grads = backward(ctx, node, out_grads, **attributes)
        if len(input_grads) != len(node.input):
            raise AssertionError(f"rule of {node.op_type} returned {len(input_grads)} gradients "
                                 f"for {len(node.input)} inputs")
        for name, grad in zip(node.input, input_grads):
            if not ctx.is_active(name):
                continue
            if grad is None:
                raise UnsupportedModelError(
                    f"{node.op_type} node {node.name!r}: no gradient for input {name!r}, which "
                    "depends on the data input", [(node.op_type, node.name)])
            pending.setdefault(name, []).append(grad)
    ctx.g.scope("grad/input")
    return _sum(ctx, pending[norm.input_name])


def node_names_filled(graph: onnx.GraphProto) -> None:
    """Give every unnamed node a unique name (error messages and emitted names use them)."""
    taken = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type.lower()}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
