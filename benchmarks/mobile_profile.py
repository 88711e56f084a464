"""Per-op profile of the shipped EfficientNet-Lite0: inference, saliency and RectGrad (q = 98).

    python benchmarks/mobile_profile.py [--batches 1 8] [--runs 20] [--out benchmarks/results]

Builds the explainers with rectonnx's defaults (``rectonnx.rewrite(model, "rectgrad")`` and
``"saliency"``), runs each with onnxruntime's profiler (``SessionOptions.enable_profiling``,
2 threads, spinning off) for ``runs`` runs after warm-up, and takes the median run of every
node (robust to other work on the machine). Nodes are attributed to

* ``forward``: the model's own nodes (and what onnxruntime fused them into);
* ``threshold``: the percentile nodes of a RectGrad gate (``importance`` scores, block maxima,
  TopKs, GatherND, ReduceMin; node names ``grad/<activation>/<hint>``, see builder.py);
* ``gate``: the masks at activations (Clip/ReLU derivative, RectGrad's compare, And, cast, Mul);
* ``backward``: everything else under ``grad/`` (convolution input gradients, padding-trick
  masks, sums), plus the ``seed`` and ``attribution`` scopes;
* ``layout``: onnxruntime's NCHWc reorders (ReorderInput/ReorderOutput nodes it inserts) of
  gradients into and out of the backward convolutions; ``layout (activations)``: those of
  forward activations, which the gates read in NCHW (the fused NCHWc forward of plain
  inference needs none of them).

Kernel time is the wall time of each node as the profiler reports it (``dur`` of the
``*_kernel_time`` events, median over the runs), so the sum is close to the wall time of a
run. Writes ``mobile_profile.md`` (and ``.json``) to ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import rectonnx
from rectonnx import models

THRESHOLD_HINTS = ("importance", "blocks", "block_extreme", "chosen_blocks", "candidates",
                   "top", "tau", "scores_flat", "pooled_importance", "flat", "sample")
GATE_HINTS = ("greater", "less", "and", "keep", "keep_inside", "rectgrad", "clip_grad",
              "relu_grad", "cast",
              "guided", "deconvnet")


def hint_of(name: str) -> str:
    """The builder hint of a node name ``grad/<scope>/<hint>_node[_n]``."""
    last = name.rsplit("/", 1)[-1]
    base = last.split("_node")[0]
    return base


def category(name: str, op: str, forward_names: set[str]) -> str:
    """The part of the graph a profiled node belongs to (module docstring). onnxruntime names a
    node it converts to NCHWc after its output tensor plus ``_nchwc``, which for a backward node
    is ``grad/<scope>/<hint>``, and its reorders after the tensor they convert."""
    if op in ("ReorderInput", "ReorderOutput"):
        return "layout"
    if name.endswith("_nchwc"):
        name = name[: -len("_nchwc")]
    if name in forward_names:
        return "forward"
    if name.startswith("grad/"):
        stem = hint_of(name).rstrip("0123456789_")
        if stem in THRESHOLD_HINTS:
            return "threshold"
        if stem in GATE_HINTS:
            return "gate"
        return "backward"
    if name.startswith(("seed", "attribution")):
        return "backward"
    if op == "Cast":  # onnxruntime turns the gates' CastLike into a Cast of its own name
        return "gate"
    return "forward" if name.startswith("/") else "other"


def profile(model: onnx.ModelProto, feeds: dict, runs: int, warmup: int = 3,
            forward_names: set[str] | None = None) -> dict:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_profiling = True
    folder = tempfile.mkdtemp(prefix="mobile_profile_")
    options.profile_file_prefix = os.path.join(folder, "prof")
    options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    # which tensor each reorder converts: a forward activation (read by the gates in NCHW)
    # or a gradient going into / out of a backward convolution
    optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
    reorders = {n.name: n.input[0] for n in optimized.graph.node
                if n.op_type in ("ReorderInput", "ReorderOutput")}
    for _ in range(warmup):
        session.run(None, feeds)
    walls = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, feeds)
        walls.append((time.perf_counter() - started) * 1000)
        time.sleep(0.01)
    events = json.loads(Path(session.end_profiling()).read_text())
    shutil.rmtree(folder, ignore_errors=True)  # the profile and the optimised model
    # the profiler also times the warm-up runs: keep the last `runs` of them
    run_events = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    start = run_events[-runs]["ts"] if len(run_events) >= runs else 0
    forward_names = forward_names or set()
    per_node: dict[str, dict] = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < start:
            continue
        name = e["name"][: -len("_kernel_time")]
        op = e.get("args", {}).get("op_name", "?")
        if name not in per_node:
            kind = category(name, op, forward_names)
            if kind == "layout" and name in reorders:
                converted = reorders[name].removesuffix("_nchwc")
                kind = "layout" if converted.startswith(("grad/", "seed", "attribution")) \
                    else "layout (activations)"
            per_node[name] = {"op": op, "us": [], "category": kind}
        entry = per_node[name]
        entry["us"].append(e["dur"])
    for entry in per_node.values():  # the median run of each node: robust to a busy machine
        entry["ms"] = float(np.median(entry.pop("us"))) / 1000.0
    return {"wall_ms": float(np.median(walls)), "nodes": per_node}


def summarise(result: dict) -> dict:
    by_category = collections.Counter()
    by_op = collections.Counter()
    by_category_op = collections.Counter()
    for entry in result["nodes"].values():
        by_category[entry["category"]] += entry["ms"]
        by_op[entry["op"]] += entry["ms"]
        by_category_op[entry["category"], entry["op"]] += entry["ms"]
    return {"categories": dict(by_category), "ops": dict(by_op),
            "category_ops": {f"{c}/{o}": v for (c, o), v in by_category_op.items()}}


def explainers(model: onnx.ModelProto) -> dict[str, onnx.ModelProto]:
    return {"inference": model,
            "saliency": rectonnx.rewrite(model, "saliency"),
            "rectgrad q=98": rectonnx.rewrite(model, "rectgrad")}


def feeds_for(graph: onnx.ModelProto, x: np.ndarray) -> dict:
    feeds = {graph.graph.input[0].name: x}
    if any(i.name == "target" for i in graph.graph.input):
        feeds["target"] = np.zeros(len(x), np.int64)
    return feeds


def markdown(report: dict, top: int) -> str:
    lines = ["# EfficientNet-Lite0 (shipped): onnxruntime profile per op", "",
             f"{report['when']}, onnxruntime {report['onnxruntime']}, 2 threads, spinning off, "
             f"1-minute load average {report['load_before']:.1f} before and "
             f"{report['load_after']:.1f} after (other work shared the machine; the medians "
             "per node are robust to it, compare inference with a quiet run); "
             f"{report['runs']} profiled runs per graph, ms per run (each node's median run, "
             "summed). "
             "Categories: forward = the model's nodes, backward = convolution input gradients and "
             "other vector-Jacobian products, gate = activation masks (derivative, RectGrad "
             "compare/And/cast/Mul), threshold = the percentile nodes (scores, block maxima, "
             "TopKs, GatherND, ReduceMin), layout = NCHWc reorders of gradients around the "
             "backward convolutions, layout (activations) = reorders of forward activations "
             "to NCHW for the gates.", ""]
    for batch, graphs in report["batches"].items():
        lines += [f"## Batch {batch}", "",
                  "| graph | nodes run | wall ms (median) | kernel sum | forward | "
                  "layout (activations) | backward | gate | threshold | layout | other |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in graphs.items():
            c = r["summary"]["categories"]
            total = sum(c.values())
            cells = " | ".join(f"{c.get(k, 0.0):.2f}" for k in
                               ("forward", "layout (activations)", "backward", "gate",
                                "threshold", "layout", "other"))
            lines.append(f"| {name} | {len(r['nodes'])} | {r['wall_ms']:.2f} | {total:.2f} | "
                         f"{cells} |")
        lines += ["", "Wall minus kernel sum is time between kernels (onnxruntime's per-node "
                  "overhead, thread wake-ups with spinning off, the profiler itself).", ""]
        for name, r in graphs.items():
            lines += [f"### {name}, batch {batch}: per category and op type (ms)", "",
                      "| category / op | ms | share |", "|---|---|---|"]
            total = sum(r["summary"]["categories"].values())
            for key, ms in sorted(r["summary"]["category_ops"].items(), key=lambda kv: -kv[1]):
                if ms < 0.01 * total and ms < 0.05:
                    continue
                lines.append(f"| {key} | {ms:.3f} | {100 * ms / total:.1f} % |")
            lines += ["", f"Top {top} nodes:", "", "| node | op | category | ms |",
                      "|---|---|---|---|"]
            ranked = sorted(r["nodes"].items(), key=lambda kv: -kv[1]["ms"])[:top]
            for node, e in ranked:
                lines.append(f"| `{node}` | {e['op']} | {e['category']} | {e['ms']:.3f} |")
            lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    model = onnx.load(str(models.path(models.EFFICIENTNET_LITE0)))
    forward_names = {n.name for n in model.graph.node}
    graphs = explainers(model)
    rng = np.random.default_rng(0)
    report = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "onnxruntime": ort.__version__, "runs": args.runs, "batches": {},
              "load_before": os.getloadavg()[0]}
    for batch in args.batches:
        x = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)
        report["batches"][batch] = {}
        for name, graph in graphs.items():
            r = profile(graph, feeds_for(graph, x), args.runs, forward_names=forward_names)
            r["summary"] = summarise(r)
            report["batches"][batch][name] = r
            c = r["summary"]["categories"]
            print(f"batch {batch} {name}: wall {r['wall_ms']:.2f} ms; " +
                  ", ".join(f"{k} {v:.2f}" for k, v in sorted(c.items(), key=lambda kv: -kv[1])),
                  flush=True)
    report["load_after"] = os.getloadavg()[0]
    table = markdown(report, args.top)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mobile_profile.md").write_text(table + "\n")
    for graphs in report["batches"].values():  # the JSON keeps the summary and the top nodes
        for r in graphs.values():
            ranked = sorted(r.pop("nodes").items(), key=lambda kv: -kv[1]["ms"])
            r["top_nodes"] = dict(ranked[:50])
            r["nodes_run"] = len(ranked)
    (out / "mobile_profile.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
