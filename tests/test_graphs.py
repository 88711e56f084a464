"""The graph plumbing helpers (rectonnx/graphs.py) on small graphs."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, parser

from rectonnx.graphs import (LARGE_INITIALIZER, consumers, join_light_copy, light_copy, producers,
                             prune, rename)


def _model(text: str, initializers: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    model = parser.parse_model(text)
    for name, value in (initializers or {}).items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return model


NET = """<ir_version: 8, opset_import: ["" : 17]>
net (float[N,4] x) => (float[N,4] y, float[N,4] side) {
  a = Relu(x)
  b = Mul(a, a)
  dead = Neg(a)
  side = Sigmoid(b)
  y = Add(b, w)
}"""


def _net() -> onnx.ModelProto:
    model = _model(NET, {"w": np.ones(4, np.float32)})
    model.graph.value_info.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4]))
    return model


def _ios(node):
    return list(node.input), list(node.output)


def test_producers_and_consumers():
    graph = _net().graph
    writers, readers = producers(graph), consumers(graph)
    assert {name: node.op_type for name, node in writers.items()} == {
        "a": "Relu", "b": "Mul", "dead": "Neg", "side": "Sigmoid", "y": "Add"}
    # graph order, once per reading: Mul reads a twice
    assert [n.op_type for n in readers["a"]] == ["Mul", "Mul", "Neg"]
    assert [n.op_type for n in readers["b"]] == ["Sigmoid", "Add"]
    assert [n.op_type for n in readers["w"]] == ["Add"]
    assert "y" not in readers and "x" not in writers
    # a list of nodes works too
    assert producers(list(graph.node)[:2]).keys() == {"a", "b"}


def test_empty_names_are_not_tensors():
    node = helper.make_node("Dropout", ["x", "", ""], ["y", ""])
    assert producers([node]) == {"y": node}
    assert consumers([node]) == {"x": [node]}


def test_rename_everywhere():
    model = _net()
    rename(model.graph, "b", "B")
    rename(model.graph, "y", "scores")
    rename(model.graph, "w", "weight")
    rename(model.graph, "x", "image")
    graph = model.graph
    assert [_ios(n) for n in graph.node] == [
        (["image"], ["a"]), (["a", "a"], ["B"]), (["a"], ["dead"]), (["B"], ["side"]),
        (["B", "weight"], ["scores"])]
    assert [o.name for o in graph.output] == ["scores", "side"]
    assert [i.name for i in graph.input] == ["image"]
    assert [v.name for v in graph.value_info] == ["B"]
    assert [t.name for t in graph.initializer] == ["weight"]
    onnx.checker.check_model(model)


def test_rename_in_node_inputs_only():
    graph = _net().graph
    rename(graph, "x", "copies/x", in_outputs=False, in_graph_io=False)
    rename(graph, "b", "b2", in_outputs=False, in_graph_io=False)
    assert _ios(graph.node[0]) == (["copies/x"], ["a"])
    assert _ios(graph.node[1]) == (["a", "a"], ["b"])  # the producer keeps its output
    assert _ios(graph.node[3]) == (["b2"], ["side"])
    assert [i.name for i in graph.input] == ["x"]
    assert [v.name for v in graph.value_info] == ["b"]


def test_rename_in_nodes_not_graph_io():
    graph = _net().graph
    rename(graph, "y", "batched", in_graph_io=False)
    assert _ios(graph.node[4]) == (["b", "w"], ["batched"])
    assert [o.name for o in graph.output] == ["y", "side"]


def test_prune_keeps_needed_nodes_in_order():
    nodes = list(_net().graph.node)
    assert [n.op_type for n in prune(nodes, {"y"})] == ["Relu", "Mul", "Add"]
    assert [n.op_type for n in prune(nodes, ["side", "y"])] == ["Relu", "Mul", "Sigmoid", "Add"]
    assert [n.op_type for n in prune(nodes, {"dead"})] == ["Relu", "Neg"]
    assert prune(nodes, {"x"}) == []
    assert all(a is b for a, b in zip(prune(nodes, {"y"}), [nodes[0], nodes[1], nodes[4]]))


def test_prune_ignores_empty_inputs():
    nodes = [helper.make_node("Relu", ["x"], [""]),
             helper.make_node("Clip", ["x", "", "hi"], ["y"])]
    assert prune(nodes, {"y"}) == [nodes[1]]


def _weights_model(small: int, large: int, default_input: bool = False) -> onnx.ModelProto:
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,%d] x) => (float[N,%d] y) {
      h = Add(x, s)
      w = Cast<to = 1>(W)
      y = MatMul(h, w)
    }""" % (small, large // small)
    model = _model(text, {"s": np.arange(small, dtype=np.float32),
                          "W": np.ones((small, large // small), np.float16)})
    model.metadata_props.add(key="k", value="v")
    model.graph.value_info.append(helper.make_tensor_value_info("h", TensorProto.FLOAT,
                                                                ["N", small]))
    if default_input:  # an input with a default value: an initializer of the same name
        model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT16,
                                                               [small, large // small]))
    return model


def test_light_copy_types_the_large_initializers():
    model = _weights_model(8, 8 * 1024)
    light, large = light_copy(model)
    assert [t.name for t in large] == ["W"]
    assert [t.name for t in light.graph.initializer] == ["s"]  # small ones stay, with values
    np.testing.assert_array_equal(numpy_helper.to_array(light.graph.initializer[0]),
                                  np.arange(8, dtype=np.float32))
    w = next(i for i in light.graph.input if i.name == "W").type.tensor_type
    assert w.elem_type == TensorProto.FLOAT16
    assert [d.dim_value for d in w.shape.dim] == [8, 1024]
    assert [v.name for v in light.graph.value_info] == ["h"]
    assert light.metadata_props[0].key == "k"
    assert light.ir_version == model.ir_version and light.opset_import == model.opset_import
    onnx.checker.check_model(light, full_check=True)
    assert len(model.graph.initializer) == 2 and len(model.graph.input) == 1  # untouched
    # shape inference gives the same answer on the light copy
    full = onnx.shape_inference.infer_shapes(model).graph.output[0]
    assert onnx.shape_inference.infer_shapes(light).graph.output[0] == full


def test_light_copy_limit():
    assert LARGE_INITIALIZER == 4096
    at_limit = _weights_model(8, LARGE_INITIALIZER)
    assert light_copy(at_limit)[1] == []  # not more than the limit: kept
    assert [t.name for t in light_copy(at_limit, limit=100)[1]] == ["W"]
    assert [t.name for t in light_copy(at_limit, limit=0)[1]] == ["s", "W"]


def test_light_copy_keeps_a_listed_input_once():
    model = _weights_model(8, 8 * 1024, default_input=True)
    light, large = light_copy(model)
    assert [t.name for t in large] == ["W"]
    assert [i.name for i in light.graph.input] == ["x", "W"]


def test_join_light_copy_undoes_it():
    model = _weights_model(8, 8 * 1024)
    light, large = light_copy(model)
    joined = join_light_copy(light, large)
    assert joined is light
    assert [i.name for i in joined.graph.input] == ["x"]
    assert sorted(t.name for t in joined.graph.initializer) == ["W", "s"]
    onnx.checker.check_model(joined, full_check=True)


def test_rewrite_keeps_the_q_input_with_its_default():
    """The explainer's ``q`` is a graph input with an initializer of the same name (a default);
    light_copy and the final graph keep it so."""
    from rectonnx import rewrite

    model = _model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,6] x) => (float[N,3] logits) {
      h = MatMul(x, A)
      r = Relu(h)
      logits = MatMul(r, B)
    }""", {"A": np.ones((6, 5), np.float32), "B": np.ones((5, 3), np.float32)})
    explainer = rewrite(model, "rectgrad", q=50, q_input=True)
    assert "q" in [i.name for i in explainer.graph.input]
    assert "q" in [t.name for t in explainer.graph.initializer]
    light, _ = light_copy(explainer, limit=0)
    assert [i.name for i in light.graph.input].count("q") == 1
