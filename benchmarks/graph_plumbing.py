"""rectonnx.graphs (hand-written, on protobuf) against onnx-ir and onnx-graphsurgeon.

    pip install onnx-ir onnx-graphsurgeon   # not dependencies of rectonnx
    python benchmarks/graph_plumbing.py [--repeats 7] [effnet] [resnet50]

For EfficientNet-Lite0 (models/) and ResNet-50 (onnx's light model with random weights,
tests/zoo.py), in ms, best and median of ``repeats``:

* identity elimination: the model with an Identity after every Conv, rectonnx's
  ``remove_identities`` vs onnx-ir's ``IdentityEliminationPass`` vs graphsurgeon (rewire +
  ``cleanup``), the libraries with and without converting the protobuf to their IR and back;
* unused-node removal: the RectGrad (``q_input=True``) explainer before pruning,
  ``graphs.prune`` vs ``RemoveUnusedNodesPass`` vs graphsurgeon's ``cleanup``;
* renaming the logits tensor: ``graphs.rename`` vs setting the name of the IR value/tensor;

and whether each library keeps ``q``, a graph input with an initializer of the same name (its
default), as an input with its default. Results are checked to be the same graphs.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import sys
import time
import warnings
from pathlib import Path

import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import onnx_graphsurgeon as gs  # noqa: E402
import onnx_ir as ir  # noqa: E402
import onnx_ir.passes.common as common  # noqa: E402

from rectonnx import graphs  # noqa: E402
from rectonnx.normalize import normalize, remove_identities  # noqa: E402

from zoo import zoo_model  # noqa: E402

rewrite_module = importlib.import_module("rectonnx.rewrite")


def timed(fn, setup, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        argument = setup()
        start = time.perf_counter()
        fn(argument)
        times.append(time.perf_counter() - start)
    return min(times) * 1e3, statistics.median(times) * 1e3


def with_identities(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with an Identity after every Conv (as some exporters leave them)."""
    model = copy.deepcopy(model)
    outputs = {o.name for o in model.graph.output}
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        if node.op_type == "Conv" and node.output[0] not in outputs:
            name = node.output[0]
            node.output[0] = name + "/pre_identity"
            nodes.append(onnx.helper.make_node("Identity", [node.output[0]], [name]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def unpruned_explainer(model: onnx.ModelProto):
    """The RectGrad explainer (q_input) and the same graph before ``assemble`` prunes it."""
    seen = {}
    prune, assemble = rewrite_module.prune, rewrite_module.assemble

    def spy_prune(nodes, outputs):
        seen["nodes"], seen["outputs"] = list(nodes), set(outputs)
        return prune(nodes, outputs)

    def spy_assemble(norm, g, *args, **kwargs):
        seen["initializers"] = list(norm.graph.initializer) + list(g.initializers)
        return assemble(norm, g, *args, **kwargs)

    rewrite_module.prune, rewrite_module.assemble = spy_prune, spy_assemble
    try:
        explainer = rewrite_module.rewrite(model, "rectgrad", q_input=True)
    finally:
        rewrite_module.prune, rewrite_module.assemble = prune, assemble
    graph = explainer.graph
    known = {t.name for t in seen["initializers"]}
    initializers = seen["initializers"] + [t for t in graph.initializer if t.name not in known]
    full = onnx.helper.make_graph(seen["nodes"], "unpruned", list(graph.input),
                                  list(graph.output), initializers)
    return explainer, onnx.helper.make_model(full, opset_imports=list(explainer.opset_import),
                                             ir_version=explainer.ir_version), seen["outputs"]


def ir_pass(model, make_pass):
    value = ir.from_proto(model)
    make_pass()(value)
    return ir.to_proto(value)


def gs_identities(model):
    graph = gs.import_onnx(model)
    for node in [n for n in graph.nodes if n.op == "Identity"]:
        source, result = node.inputs[0], node.outputs[0]
        if result in graph.outputs:
            continue
        for reader in list(result.outputs):
            reader.inputs[reader.inputs.index(result)] = source
        node.outputs.clear()
    graph.cleanup()
    return gs.export_onnx(graph)


def gs_cleanup(model):
    graph = gs.import_onnx(model)
    graph.cleanup()
    return gs.export_onnx(graph)


def ir_rename(model, old):
    value = ir.from_proto(model)
    next(v for n in value.graph for v in n.outputs if v.name == old).name = "logits"
    return ir.to_proto(value)


def gs_rename(model, old):
    graph = gs.import_onnx(model)
    graph.tensors()[old].name = "logits"
    return gs.export_onnx(graph)


def outputs_of(model):
    return [(list(n.input), list(n.output)) for n in model.graph.node]


def measure(name: str, model: onnx.ModelProto, repeats: int) -> onnx.ModelProto:
    identities = with_identities(model)
    explainer, unpruned, outputs = unpruned_explainer(model)
    norm = normalize(model)
    logits = norm.logits_name
    print(f"== {name}: {sum(n.op_type == 'Identity' for n in identities.graph.node)} Identity "
          f"nodes added; explainer {len(unpruned.graph.node)} nodes before pruning, "
          f"{len(explainer.graph.node)} after")
    mine = copy.deepcopy(identities)
    remove_identities(mine.graph)
    kept = graphs.prune(unpruned.graph.node, outputs)
    print("   same result: identity (onnx-ir)",
          outputs_of(mine) == outputs_of(ir_pass(identities, common.IdentityEliminationPass)),
          "| prune (onnx-ir, graphsurgeon)",
          [n.output[0] for n in kept] == [n.output[0] for n in ir_pass(
              unpruned, common.RemoveUnusedNodesPass).graph.node],
          [n.output[0] for n in kept] == [n.output[0] for n in gs_cleanup(unpruned).graph.node])
    rows = [
        ("protobuf -> onnx-ir -> protobuf (explainer)",
         lambda m: ir.to_proto(ir.from_proto(m)), lambda: unpruned),
        ("protobuf -> graphsurgeon -> protobuf (explainer)",
         lambda m: gs.export_onnx(gs.import_onnx(m)), lambda: unpruned),
        ("identity: rectonnx remove_identities",
         lambda m: remove_identities(m.graph), lambda: copy.deepcopy(identities)),
        ("identity: onnx-ir IdentityEliminationPass, with conversion",
         lambda m: ir_pass(m, common.IdentityEliminationPass), lambda: identities),
        ("identity: onnx-ir IdentityEliminationPass alone",
         lambda m: common.IdentityEliminationPass()(m), lambda: ir.from_proto(identities)),
        ("identity: graphsurgeon rewire + cleanup, with conversion",
         gs_identities, lambda: identities),
        ("prune: rectonnx graphs.prune",
         lambda nodes: graphs.prune(nodes, outputs), lambda: list(unpruned.graph.node)),
        ("prune: onnx-ir RemoveUnusedNodesPass, with conversion",
         lambda m: ir_pass(m, common.RemoveUnusedNodesPass), lambda: unpruned),
        ("prune: onnx-ir RemoveUnusedNodesPass alone",
         lambda m: common.RemoveUnusedNodesPass()(m), lambda: ir.from_proto(unpruned)),
        ("prune: graphsurgeon cleanup, with conversion", gs_cleanup, lambda: unpruned),
        ("prune: graphsurgeon cleanup alone",
         lambda g: g.cleanup(), lambda: gs.import_onnx(unpruned)),
        ("rename: rectonnx graphs.rename",
         lambda m: graphs.rename(m.graph, logits, "logits"), lambda: copy.deepcopy(norm.model)),
        ("rename: onnx-ir Value.name, with conversion",
         lambda m: ir_rename(m, logits), lambda: norm.model),
        ("rename: graphsurgeon Tensor.name, with conversion",
         lambda m: gs_rename(m, logits), lambda: norm.model),
    ]
    for label, fn, setup in rows:
        best, median = timed(fn, setup, repeats)
        print(f"   {label:<58} best {best:8.2f} ms   median {median:8.2f} ms")
    return explainer


def q_kept(explainer: onnx.ModelProto) -> None:
    def state(model):
        return ("input" if "q" in [i.name for i in model.graph.input] else "NOT an input",
                "default" if "q" in [t.name for t in model.graph.initializer] else "no default")

    print("== q (an input with a default) after each tool")
    print("   rectonnx explainer:", state(explainer))
    for label, make_pass in [("round trip", None), ("RemoveUnusedNodesPass",
                             common.RemoveUnusedNodesPass),
                             ("IdentityEliminationPass", common.IdentityEliminationPass),
                             ("TopologicalSortPass", common.TopologicalSortPass),
                             ("LiftConstantsToInitializersPass",
                              common.LiftConstantsToInitializersPass),
                             ("NameFixPass", common.NameFixPass)]:
        model = ir.to_proto(ir.from_proto(explainer)) if make_pass is None else \
            ir_pass(explainer, make_pass)
        print(f"   onnx-ir {label}:", state(model))
    print("   graphsurgeon round trip:", state(gs.export_onnx(gs.import_onnx(explainer))))
    print("   graphsurgeon cleanup:", state(gs_cleanup(explainer)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["effnet", "resnet50"])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    explainer = None
    for name in args.models:
        model = onnx.load(str(HERE.parent / "models" / "efficientnet_lite0.onnx")) \
            if name == "effnet" else zoo_model(name)
        explainer = measure(name, model, args.repeats)
    if explainer is not None:
        q_kept(explainer)


if __name__ == "__main__":
    main()
