"""The reverse walk: visit the path from input to logits backwards, apply each node's rule, and
sum the cotangents of tensors that feed several nodes (``R_t = sum over consumers``).

The walk may stop at an intermediate tensor ``wrt`` instead of the input (layer attribution,
Grad-CAM): it then visits only the nodes between ``wrt`` and the logits (``path_between``), and
tensors that do not depend on ``wrt`` (a residual branch from before it) are held constant.
"""

from __future__ import annotations

import onnx

from .errors import UnsupportedModelError
from .normalize import NormalizedModel
from .options import OptionError
from .rules import RULES, RuleContext, node_attributes


def path_between(norm: NormalizedModel, wrt: str | None = None,
                 option: str = "wrt") -> tuple[set[str], list[onnx.NodeProto]]:
    """The active tensors and the path nodes (topological order) between ``wrt`` and the
    logits: the tensors that depend on ``wrt`` and lead to the logits, and their producers.
    ``wrt`` None or the input: the whole path (``norm.active``, ``norm.path_nodes``). A name
    that is not a float tensor between the input and the logits of the normalised graph is an
    ``OptionError`` naming ``option``."""
    if wrt is None or wrt == norm.input_name:
        return norm.active, norm.path_nodes
    if wrt not in norm.active:
        raise OptionError(
            f"option {option} = {wrt!r} is not allowed: the normalised model has no float "
            f"tensor of that name between input {norm.input_name!r} and the logits (tensor "
            "names are those of the ONNX graph, after BatchNorm folding and Identity removal; "
            "`rectonnx info MODEL` names the default CAM layer)")
    reached = {wrt}
    path = []
    for node in norm.path_nodes:
        if any(name in reached for name in node.input):
            path.append(node)
            reached.update(o for o in node.output if o in norm.active)
    return reached, path


def unsupported_nodes(norm: NormalizedModel, wrt: str | None = None) -> list[tuple[str, str]]:
    """``(op_type, node name)`` of every node on the path (from ``wrt``, default the input)
    without a backward rule."""
    return [(n.op_type, n.name or n.output[0]) for n in path_between(norm, wrt)[1]
            if n.op_type not in RULES or n.domain not in ("", "ai.onnx")]


def check_supported(norm: NormalizedModel, wrt: str | None = None) -> None:
    missing = unsupported_nodes(norm, wrt)
    if missing:
        listing = ", ".join(f"{op} (node {name!r})" for op, name in missing)
        ops = sorted({op for op, _ in missing})
        start = "the input" if wrt is None else repr(wrt)
        raise UnsupportedModelError(
            f"{len(missing)} node(s) between {start} and the logits have no backward rule: "
            f"{listing}. Unsupported op types: {', '.join(ops)}. Run `rectonnx info MODEL` for "
            "the full coverage report.", missing)


def _sum(ctx: RuleContext, grads: list[str]) -> str:
    return grads[0] if len(grads) == 1 else ctx.g.Sum(*grads, hint="accumulated")


def backpropagate(norm: NormalizedModel, ctx: RuleContext, seed: str,
                  wrt: str | None = None) -> str:
    """The gradient of the seeded logits with respect to ``wrt`` (default: the data input), as
    a tensor name; only the nodes between ``wrt`` and the logits are differentiated."""
    active, path = path_between(norm, wrt)
    target = norm.input_name if wrt is None else wrt
    saved, ctx.active = ctx.active, active
    try:
        return _walk(norm, ctx, seed, path, target)
    finally:
        ctx.active = saved


def _walk(norm: NormalizedModel, ctx: RuleContext, seed: str, path: list[onnx.NodeProto],
          target: str) -> str:
    pending: dict[str, list[str]] = {norm.logits_name: [seed]}
    for node in reversed(path):
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
    ctx.g.scope("grad/input" if target == norm.input_name else "grad/wrt")
    return _sum(ctx, pending[target])


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
