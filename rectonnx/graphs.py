"""Graph plumbing in one place: pure onnx + numpy helpers on ``GraphProto`` / ``ModelProto``.

* ``producers(graph)``, ``consumers(graph)``: tensor name -> the node that writes it / the nodes
  that read it (``graph`` may also be a list of nodes); empty names (absent optional inputs and
  outputs) are left out;
* ``rename(graph, old, new, *, in_outputs=True, in_graph_io=True)``: rename a tensor in the
  nodes' inputs, their outputs (``in_outputs``) and the graph's inputs, outputs, value_info and
  initializers (``in_graph_io``);
* ``prune(nodes, outputs)``: the nodes that ``outputs`` need, in their original order;
* ``light_copy(model, limit)``: a shallow copy whose initializers of more than ``limit``
  elements (``LARGE_INITIALIZER``) are graph inputs of the same type and shape, for onnx's
  whole-model tools (checker, version converter, shape inference), which then give the same
  answer without serialising hundreds of MB; ``join_light_copy`` undoes it.

onnx-ir (``onnx_ir.passes.common``) and onnx-graphsurgeon were measured against these helpers
on EfficientNet-Lite0 and ResNet-50 (benchmarks/graph_plumbing.py): rectonnx works on protobuf
throughout, and with the conversion to their IR and back each operation took longer than
here (identity elimination 1.3-4 times, pruning 20-60 times, a rename 50-180 times);
graphsurgeon also turns ``q`` (a graph input with a default) into a constant.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx
from onnx import helper

# Initializers with more elements than this are left out of the light copy (typed inputs
# instead). Shape inference reads the values of small constants only (shapes, axes, sizes,
# repeats: a few elements), so any limit above those gives the same inferred shapes; 4096
# elements (16 KB of float32) keeps every such constant and drops every real weight.
LARGE_INITIALIZER = 4096

Nodes = Iterable[onnx.NodeProto]


def _nodes(graph: onnx.GraphProto | Nodes) -> Nodes:
    return graph.node if isinstance(graph, onnx.GraphProto) else graph


def producers(graph: onnx.GraphProto | Nodes) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that writes it."""
    return {name: node for node in _nodes(graph) for name in node.output if name}


def consumers(graph: onnx.GraphProto | Nodes) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it, in graph order, once per reading (a node that
    reads a tensor twice is listed twice)."""
    table: dict[str, list[onnx.NodeProto]] = {}
    for node in _nodes(graph):
        for name in node.input:
            if name:
                table.setdefault(name, []).append(node)
    return table


def rename(graph: onnx.GraphProto, old: str, new: str, *, in_outputs: bool = True,
           in_graph_io: bool = True) -> None:
    """Rename tensor ``old`` to ``new`` in place: always in the nodes' inputs; in their outputs
    if ``in_outputs``; in the graph's inputs, outputs, value_info and initializers if
    ``in_graph_io`` (off: e.g. to let a new node compute a graph input's tensor under another
    name). Subgraphs are not entered."""
    for node in graph.node:
        for names in ((node.input, node.output) if in_outputs else (node.input,)):
            for i, name in enumerate(names):
                if name == old:
                    names[i] = new
    if not in_graph_io:
        return
    for collection in (graph.input, graph.output, graph.value_info, graph.initializer):
        for entry in collection:
            if entry.name == old:
                entry.name = new


def prune(nodes: Nodes, outputs: Iterable[str]) -> list[onnx.NodeProto]:
    """Keep the nodes that ``outputs`` need, in their original (topological) order."""
    needed = set(outputs)
    kept = []
    for node in reversed(list(nodes)):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    kept.reverse()
    return kept


def is_large(tensor: onnx.TensorProto, limit: int = LARGE_INITIALIZER) -> bool:
    """Whether ``tensor`` has more than ``limit`` elements."""
    return float(np.prod(tensor.dims, dtype=np.float64)) > limit


def light_copy(model: onnx.ModelProto, limit: int = LARGE_INITIALIZER
               ) -> tuple[onnx.ModelProto, list[onnx.TensorProto]]:
    """``(light, large)``: a shallow copy of ``model`` whose initializers of more than
    ``limit`` elements are graph inputs of the same type and shape (one already listed as an
    input, a default value, just loses its initializer), and those initializers. The nodes,
    value_info, opsets, IR version, metadata and functions are kept."""
    graph = model.graph
    small, large = [], []
    for tensor in graph.initializer:
        (large if is_large(tensor, limit) else small).append(tensor)
    listed = {i.name for i in graph.input}
    inputs = list(graph.input) + [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                  for t in large if t.name not in listed]
    light_graph = helper.make_graph(list(graph.node), graph.name, inputs, list(graph.output),
                                    small, value_info=list(graph.value_info))
    light = helper.make_model(light_graph, opset_imports=list(model.opset_import),
                              ir_version=model.ir_version)
    light.metadata_props.extend(model.metadata_props)
    light.functions.extend(model.functions)
    return light, large


def join_light_copy(light: onnx.ModelProto, large: list[onnx.TensorProto]) -> onnx.ModelProto:
    """Undo ``light_copy`` on ``light`` (in place; returns it): the large initializers are
    initializers again and no longer graph inputs. For a model none of whose large initializers
    was a graph input too (normalize drops those inputs first): such an input would go."""
    names = {t.name for t in large}
    inputs = [i for i in light.graph.input if i.name not in names]
    del light.graph.input[:]
    light.graph.input.extend(inputs)
    light.graph.initializer.extend(large)
    return light
