"""int8 models in the QOperator format (``quantize_static(..., quant_format=QOperator)``, the
ONNX model zoo's int8 models) rewritten into the QDQ format the backward rules know
(rules/quantize.py), before anything else reads the graph.

A QOperator node computes on integers what a float op computes between a dequantization of its
inputs and a quantization of its output. With ``DQ(q; s, z) = (q - z) s`` and ``Q(y; s, z) =
clamp(round(y / s) + z)``, each node becomes that float op between ``DequantizeLinear`` and
``QuantizeLinear`` nodes with the node's own scales and zero points:

| QOperator node | float op | notes |
|---|---|---|
| ``QLinearConv`` | ``Conv`` | weight scale per tensor or per output channel (axis 0); int32 bias ``b`` is ``b s_x s_w`` |
| ``QLinearMatMul`` | ``MatMul`` | ``B``'s scale per tensor or per column (last axis) |
| ``QGemm`` (com.microsoft) | ``Gemm`` | ``alpha`` 1; int32 ``C`` is ``C s_a s_b``; no ``y_scale``: float output |
| ``QLinearAdd``, ``QLinearMul`` (com.microsoft) | ``Add``, ``Mul`` | |
| ``QLinearGlobalAveragePool``, ``QLinearAveragePool`` (com.microsoft) | ``GlobalAveragePool``, ``AveragePool`` | channels-first only |
| ``QLinearLeakyRelu``, ``QLinearSigmoid`` (com.microsoft) | ``LeakyRelu``, ``Sigmoid`` | |
| ``QLinearConcat`` (com.microsoft) | ``Concat`` | |

Ops that run on the integers themselves and commute with the dequantization (``DQ(op(q)) =
op(DQ(q))`` for ``s > 0``: ``MaxPool``, ``Flatten``, ``Reshape``, ``Transpose``, ``Squeeze``,
``Unsqueeze``, ``Identity``) read the dequantized tensor and their output is quantized again
with their input's scale and zero point, which is exact. The weights' ``DequantizeLinear`` then
folds into float initializers (normalize.dequantize_constant_weights), so the result is the
QDQ model of the same quantization: the explainer's logits are the float re-statement of the
integer kernels (onnxruntime's requantization rounds once per output, the same as ``Q(op(...))``
up to float rounding of the accumulation).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import UnsupportedModelError

# op -> (float op, positions of the (tensor, scale, zero point) input triples, output scale and
# zero point positions or None) for the element-wise / pooling family
_SIMPLE = {
    "QLinearAdd": ("Add", [(0, 1, 2), (3, 4, 5)], (6, 7)),
    "QLinearMul": ("Mul", [(0, 1, 2), (3, 4, 5)], (6, 7)),
    "QLinearGlobalAveragePool": ("GlobalAveragePool", [(0, 1, 2)], (3, 4)),
    "QLinearAveragePool": ("AveragePool", [(0, 1, 2)], (3, 4)),
    "QLinearLeakyRelu": ("LeakyRelu", [(0, 1, 2)], (3, 4)),
    "QLinearSigmoid": ("Sigmoid", [(0, 1, 2)], (3, 4)),
}
QOPERATOR_OPS = {"QLinearConv", "QLinearMatMul", "QGemm", "QLinearConcat", *_SIMPLE}
COMMUTING_OPS = {"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
                 "Identity"}


def has_qoperator_nodes(graph: onnx.GraphProto) -> bool:
    return any(n.op_type in QOPERATOR_OPS for n in graph.node)


def qoperator_to_qdq(graph: onnx.GraphProto) -> bool:
    """Rewrite ``graph``'s QOperator nodes in place (see the module docstring); returns whether
    there were any."""
    if not has_qoperator_nodes(graph):
        return False
    rewriter = _Rewriter(graph)
    for node in list(graph.node):
        rewriter.visit(node)
    del graph.node[:]
    graph.node.extend(rewriter.nodes)
    graph.initializer.extend(rewriter.constants)
    return True


class _Rewriter:
    def __init__(self, graph: onnx.GraphProto):
        self.values = {t.name: t for t in graph.initializer}
        self.taken = {name for n in graph.node for name in [*n.input, *n.output]}
        self.taken |= set(self.values) | {i.name for i in graph.input}
        self.nodes: list[onnx.NodeProto] = []
        self.constants: list[onnx.TensorProto] = []
        self.quantized: dict[str, tuple[str, str]] = {}  # integer tensor -> (scale, zero point)
        self.count = 0

    def fresh(self, base: str) -> str:
        while True:
            self.count += 1
            name = f"{base}/qdq_{self.count}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def emit(self, op: str, inputs, outputs=None, name: str = "", **attributes) -> str:
        outputs = outputs or [self.fresh(name or op)]
        self.nodes.append(helper.make_node(op, list(inputs), outputs,
                                           name=self.fresh(f"{name or op}_node"),
                                           **attributes))
        return outputs[0]

    def dequantized(self, q: str, scale: str, zero: str, base: str, axis: int | None = None
                    ) -> str:
        extra = {} if axis is None else {"axis": axis}
        return self.emit("DequantizeLinear", [q, scale, zero], name=f"{base}/dequantized",
                         **extra)

    def quantize(self, y: str, out: str, scale: str, zero: str) -> None:
        self.emit("QuantizeLinear", [y, scale, zero], [out])
        self.quantized[out] = (scale, zero)

    def constant(self, name: str, node) -> np.ndarray:
        if name not in self.values:
            raise UnsupportedModelError(
                f"{node.op_type} node {node.name or node.output[0]!r}: its scale {name!r} is "
                "not a constant; only constant quantization parameters are supported",
                [(node.op_type, node.name)])
        return numpy_helper.to_array(self.values[name])

    def bias(self, node, bias: str, *scales: str) -> str:
        """An int32 bias as float: ``DQ(b; prod(scales), 0)`` folded now (constant)."""
        value = self.constant(bias, node).astype(np.float64)
        scale = np.ones(1)
        for name in scales:
            scale = scale * self.constant(name, node).astype(np.float64).reshape(-1)
        name = self.fresh(f"{bias}/float")
        self.constants.append(numpy_helper.from_array((value * scale).astype(np.float32), name))
        return name

    def visit(self, node: onnx.NodeProto) -> None:
        op, ins = node.op_type, list(node.input)
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        base = node.name or node.output[0]
        if op == "QuantizeLinear":
            self.nodes.append(node)
            self.quantized[node.output[0]] = (ins[1], ins[2] if len(ins) > 2 else "")
        elif op == "QLinearConv":
            x = self.dequantized(ins[0], ins[1], ins[2], base)
            w = self.dequantized(ins[3], ins[4], ins[5], base, axis=0)
            inputs = [x, w] + ([self.bias(node, ins[8], ins[1], ins[4])]
                               if len(ins) > 8 and ins[8] else [])
            y = self.emit("Conv", inputs, name=base, **attributes)
            self.quantize(y, node.output[0], ins[6], ins[7])
        elif op == "QLinearMatMul":
            a = self.dequantized(ins[0], ins[1], ins[2], base)
            b = self.dequantized(ins[3], ins[4], ins[5], base, axis=-1)
            self.quantize(self.emit("MatMul", [a, b], name=base), node.output[0], ins[6],
                          ins[7])
        elif op == "QGemm":
            if attributes.get("alpha", 1.0) != 1.0:
                raise UnsupportedModelError(f"QGemm node {base!r} has alpha != 1",
                                            [(op, node.name)])
            a = self.dequantized(ins[0], ins[1], ins[2], base)
            b = self.dequantized(ins[3], ins[4], ins[5], base,
                                 axis=0 if attributes.get("transB", 0) else 1)
            inputs = [a, b] + ([self.bias(node, ins[6], ins[1], ins[4])]
                               if len(ins) > 6 and ins[6] else [])
            gemm = {k: v for k, v in attributes.items() if k in ("transA", "transB")}
            if len(ins) > 7 and ins[7]:
                y = self.emit("Gemm", inputs, name=base, **gemm)
                self.quantize(y, node.output[0], ins[7], ins[8] if len(ins) > 8 else "")
            else:
                self.emit("Gemm", inputs, [node.output[0]], name=base, **gemm)
        elif op in _SIMPLE:
            float_op, triples, (out_scale, out_zero) = _SIMPLE[op]
            if attributes.pop("channels_last", 0):
                raise UnsupportedModelError(f"{op} node {base!r} is channels-last",
                                            [(op, node.name)])
            inputs = [self.dequantized(ins[t], ins[s], ins[z], base) for t, s, z in triples]
            y = self.emit(float_op, inputs, name=base, **attributes)
            self.quantize(y, node.output[0], ins[out_scale], ins[out_zero])
        elif op == "QLinearConcat":
            inputs = [self.dequantized(ins[i], ins[i + 1], ins[i + 2], base)
                      for i in range(2, len(ins), 3)]
            y = self.emit("Concat", inputs, name=base, **attributes)
            self.quantize(y, node.output[0], ins[0], ins[1])
        elif op in COMMUTING_OPS and ins and ins[0] in self.quantized:
            if any(node.output[1:]):  # MaxPool's Indices
                raise UnsupportedModelError(f"{op} node {base!r} on integers with several "
                                            "outputs", [(op, node.name)])
            scale, zero = self.quantized[ins[0]]
            x = self.dequantized(ins[0], scale, zero, base)
            y = self.emit(op, [x, *ins[1:]], name=f"{node.output[0]}/float", **attributes)
            self.quantize(y, node.output[0], scale, zero)
        else:
            self.nodes.append(node)


__all__ = ["qoperator_to_qdq", "has_qoperator_nodes", "QOPERATOR_OPS", "COMMUTING_OPS"]
