"""Composite activations: unit-wise formulas that exporters spell with several nodes.

Opset 17 has no Gelu, Swish (SiLU) or Mish op, so exporters write them out: torch's GELU is
``Mul(Mul(z, Add(Erf(Div(z, 1.414..)), 1)), 0.5)``, SiLU is ``Mul(z, Sigmoid(z))``, Mish is
``Mul(z, Tanh(Softplus(z)))``, and other exporters order the same factors differently. For the
attribution methods such a unit is ONE activation ``y = f(z)``: RectGrad must gate it once, with
importance ``y R`` (gating its inner Sigmoid or Erf alone would be a different method).

``fuse_composites`` finds them by what they compute, not by how they are spelt: around each
Erf/Tanh/Sigmoid on the path it takes a candidate input ``z`` and the nodes that compute a
function of ``z`` alone (Add/Sub/Mul/Div/Pow/Erf/Tanh/Sigmoid/Softplus/Neg/Exp with scalar
constants), takes a candidate output ``y`` whose inner tensors are used nowhere else, and
evaluates that little graph (``onnx.reference``) on ``z`` in [-5, 5]. If it equals Gelu (exact
or tanh form), Swish(alpha) or Mish there, the walker gets one node ``Gelu(z) -> y`` (or Swish,
Mish) in place of those nodes, named after the newer ONNX op (rules/nonlinear.py). The forward
graph itself is left exactly as exported.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graphs import consumers, producers

SCALAR_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "Erf", "Tanh", "Sigmoid", "Softplus", "Neg",
              "Exp"}
CORES = {"Erf", "Tanh", "Sigmoid"}
PROBE = np.linspace(-5.0, 5.0, 41).astype(np.float32)
ROOT_SEARCH_DEPTH = 6


def _erf(z):
    return np.vectorize(math.erf)(z)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _known(z: np.ndarray, y: np.ndarray) -> tuple[str, dict] | None:
    """The activation ``y = f(z)`` matches on the probe points, with its attributes."""
    z = z.astype(np.float64)

    def close(expected):
        return np.all(np.abs(y - expected) <= 1e-5 * (1.0 + np.abs(expected)))

    if close(0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))):
        return "Gelu", {"approximate": "none"}
    if close(0.5 * z * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))):
        return "Gelu", {"approximate": "tanh"}
    if close(z * np.tanh(np.log1p(np.exp(z)))):
        return "Mish", {}
    at_one = float(y[np.argmin(np.abs(z - 1.0))])
    if 0.0 < at_one < 1.0:
        alpha = math.log(at_one / (1.0 - at_one))
        if 0.0 < alpha <= 10.0 and close(z * _sigmoid(alpha * z)):
            # the probe runs in float32: 1.0000003 is SiLU's alpha = 1 (the rule's fast path)
            alpha = round(alpha, 5) if abs(alpha - round(alpha, 5)) < 1e-5 else alpha
            return "Swish", {"alpha": float(alpha)}
    return None


class _Graph:
    def __init__(self, graph: onnx.GraphProto, path_nodes, constants):
        self.nodes = list(path_nodes)
        self.order = {id(n): i for i, n in enumerate(self.nodes)}
        self.producer = producers(self.nodes)
        self.consumers = consumers(graph)
        self.outputs = {o.name for o in graph.output}
        self.constants = constants

    def is_scalar_constant(self, name: str) -> bool:
        value = self.constants.get(name)
        return value is not None and value.size == 1 and value.dtype.kind in "fi"

    def is_scalar_op(self, node) -> bool:
        return node.op_type in SCALAR_OPS and node.domain in ("", "ai.onnx") and \
            len(node.output) == 1 and not node.attribute

    def roots(self, core) -> list[str]:
        """Candidate inputs ``z`` of a composite around ``core``, nearest first."""
        found, frontier = [], [core.input[0]]
        for _ in range(ROOT_SEARCH_DEPTH):
            following = []
            for name in frontier:
                if name in found or self.is_scalar_constant(name):
                    continue
                found.append(name)
                node = self.producer.get(name)
                if node is not None and self.is_scalar_op(node):
                    following += [i for i in node.input if not self.is_scalar_constant(i)]
            frontier = following
        return found

    def closure(self, root: str) -> list:
        """Path nodes (in order) that compute a function of ``root`` alone."""
        inside, values = [], {root}
        start = self.order[id(self.producer[root])] + 1 if root in self.producer else 0
        for node in self.nodes[start:]:
            if not self.is_scalar_op(node):
                continue
            if all(i in values or self.is_scalar_constant(i) for i in node.input) and \
                    any(i in values for i in node.input):
                inside.append(node)
                values.add(node.output[0])
        return inside

    def composite(self, root: str, closure: list, core):
        """``(kind, attributes, nodes, y)`` for the smallest matching output, or None."""
        for last, node in enumerate(closure):
            y = node.output[0]
            needed, members = {y}, []
            for candidate in reversed(closure[:last + 1]):
                if candidate.output[0] in needed:
                    members.append(candidate)
                    needed.update(candidate.input)
            members.reverse()
            if core not in members:
                continue
            inner = [m.output[0] for m in members if m.output[0] != y]
            member_ids = {id(m) for m in members}
            if any(name in self.outputs or
                   any(id(c) not in member_ids for c in self.consumers.get(name, []))
                   for name in inner):
                continue
            kind = _known(PROBE, self.evaluate(root, members, y))
            if kind is not None:
                return kind[0], kind[1], members, y
        return None

    def evaluate(self, root: str, members: list, y: str) -> np.ndarray:
        from onnx.reference import ReferenceEvaluator

        used = {i for m in members for i in m.input if i in self.constants}
        inits = [numpy_helper.from_array(self.constants[name].astype(np.float32), name)
                 for name in used]
        graph = helper.make_graph(
            [helper.make_node(m.op_type, list(m.input), list(m.output)) for m in members],
            "probe", [helper.make_tensor_value_info(root, TensorProto.FLOAT, [len(PROBE)])],
            [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                  ir_version=8)
        try:
            out = ReferenceEvaluator(model).run(None, {root: PROBE})[0]
        except Exception:  # a shape the probe cannot take: not a unit-wise function
            return np.full(len(PROBE), np.nan)
        out = np.asarray(out, np.float64).reshape(-1)
        return out if out.size == len(PROBE) else np.full(len(PROBE), np.nan)


def fuse_composites(graph: onnx.GraphProto, path_nodes: list,
                    constants: dict[str, np.ndarray]) -> list:
    """``path_nodes`` with each recognised composite activation replaced by one node."""
    view = _Graph(graph, path_nodes, constants)
    replaced: dict[int, onnx.NodeProto] = {}  # id(last member) -> composite node
    dropped: set[int] = set()
    for core in path_nodes:
        if core.op_type not in CORES or id(core) in dropped:
            continue
        for root in view.roots(core):
            found = view.composite(root, view.closure(root), core)
            if found is None:
                continue
            kind, attributes, members, y = found
            if any(id(m) in dropped for m in members):
                break
            dropped.update(id(m) for m in members)
            replaced[id(members[-1])] = helper.make_node(kind, [root], [y],
                                                         name=f"{kind.lower()}:{y}",
                                                         **attributes)
            break
    if not replaced:
        return path_nodes
    return [replaced.get(id(n), n) for n in path_nodes
            if id(n) in replaced or id(n) not in dropped]
