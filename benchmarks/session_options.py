"""onnxruntime session options against the paper CNN's inference and RectGrad explainer graphs.

    python benchmarks/session_options.py [--quick] [--out DIR] [--rounds N] [--burst N]

The shipped paper CNN (models/paper_cnn_digits.onnx) at batch 1 on one of its own images, as
onnxruntime inference and as the RectGrad q = 98 explainer graph a CPU user gets
(``rectonnx.Explainer(model, "rectgrad", q=98, padding_trick=False)``, runtime
"onnxruntime-cpu"), on the CPU provider:

* node counts of each graph as built and after onnxruntime's optimiser at each
  ``graph_optimization_level`` (the optimised model saved with
  ``SessionOptions.optimized_model_filepath``), and what in it could still go: Constant,
  Identity and Shape nodes, Cast pairs (a Cast of a Cast), onnxruntime's NCHWc reorders;
* time for every combination of ``graph_optimization_level`` (DISABLE_ALL, BASIC, EXTENDED,
  ALL), ``session.set_denormal_as_zero`` (off/on), ``execution_mode`` (sequential/parallel),
  ``intra_op_num_threads`` (1, 2) and ``session.intra_op.allow_spinning`` (and the inter-op
  pool's, for parallel mode; on/off): the best setting for inference and for the explainer side
  by side, the explainer / inference ratio at each one's best, and each option's effect (the
  median ratio over the pairs of settings that differ only in it);
* whether dropping what can go changes the explainer's time: the graph with the batch fixed
  at 1 (so onnxruntime folds the Shape chains into constants), the graph pre-optimised by
  onnxruntime (BASIC: constants folded, Identity gone; or ALL, loaded with optimisation off).

Timing: each contender's sample is the mean of a burst of ``--burst`` calls; rounds are
interleaved (the contenders' order shuffled each round), the median over rounds is reported.
After a contender whose worker threads spin, a 0.35 s pause lets them go to sleep
(onnxruntime's threads spin for a while after a run and would steal the CPU from the next
contender); 0.02 s after the others. Writes ``session_options.md`` and ``.json`` to ``--out``.
Numbers are reported, never asserted.
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import load_average, machine, save  # noqa: E402

Q = 98.0
LEVELS = {"DISABLE_ALL": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
          "BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
FACTORS = ("level", "denormal_as_zero", "mode", "threads", "spinning")
SPIN_PAUSE_S, PAUSE_S = 0.35, 0.02


# -- sessions ----------------------------------------------------------------------------------
def options_for(level="ALL", denormal_as_zero=False, mode="sequential", threads=2,
                spinning=False, saved: str | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = LEVELS[level]
    options.execution_mode = (ort.ExecutionMode.ORT_PARALLEL if mode == "parallel"
                              else ort.ExecutionMode.ORT_SEQUENTIAL)
    options.intra_op_num_threads = threads
    if mode == "parallel":
        options.inter_op_num_threads = threads
        options.add_session_config_entry("session.inter_op.allow_spinning",
                                         "1" if spinning else "0")
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if denormal_as_zero:
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
    if saved:
        options.optimized_model_filepath = saved
    return options


def session(model: onnx.ModelProto, **setting) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), options_for(**setting),
                                providers=["CPUExecutionProvider"])


def optimised(model: onnx.ModelProto, level: str) -> onnx.ModelProto:
    """The model as onnxruntime's optimiser at ``level`` leaves it (saved by onnxruntime)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "optimised.onnx")
        ort.InferenceSession(model.SerializeToString(), options_for(level, saved=path),
                             providers=["CPUExecutionProvider"])
        return onnx.load(path)


def removable(model: onnx.ModelProto) -> dict:
    """What a clean-up pass could still drop from ``model``."""
    producers = {out: node for node in model.graph.node for out in node.output}
    ops = [node.op_type for node in model.graph.node]
    return dict(nodes=len(ops), constant=ops.count("Constant"), identity=ops.count("Identity"),
                shape=ops.count("Shape"),
                cast_pairs=sum(1 for node in model.graph.node if node.op_type == "Cast"
                               and node.input[0] in producers
                               and producers[node.input[0]].op_type == "Cast"),
                casts=ops.count("Cast") + ops.count("CastLike"),
                nchwc_reorders=sum(1 for node in model.graph.node
                                   if node.op_type.startswith("Reorder")))


def fixed_batch(model: onnx.ModelProto, batch: int = 1) -> onnx.ModelProto:
    """A copy whose inputs and outputs have the batch dimension fixed (Shape chains fold)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for value in list(copy.graph.input) + list(copy.graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims) and not dims[0].dim_value:
            dims[0].dim_value = batch
    del copy.graph.value_info[:]
    return copy


# -- timing ------------------------------------------------------------------------------------
def timed(contenders: dict, rounds: int, warmup: int, burst: int, spinning: set,
          label: str) -> dict[str, list[float]]:
    """ms per call (mean of a burst) per contender and round; rounds interleaved, shuffled."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    shuffle = random.Random(0)
    started = time.perf_counter()
    for round_index in range(warmup + rounds):
        if round_index == 1:
            per_round = time.perf_counter() - started
            print(f"[session_options] {label}: {per_round:.1f} s a round, about "
                  f"{per_round * (warmup + rounds - 1):.0f} s to go", file=sys.stderr,
                  flush=True)
        shuffle.shuffle(order)
        for name in order:
            run = contenders[name]
            begin = time.perf_counter()
            for _ in range(burst):
                run()
            elapsed = (time.perf_counter() - begin) * 1000 / burst
            if round_index >= warmup:
                times[name].append(elapsed)
            time.sleep(SPIN_PAUSE_S if name in spinning else PAUSE_S)
    return times


def settings(quick: bool) -> list[dict]:
    levels = ("DISABLE_ALL", "ALL") if quick else tuple(LEVELS)
    return [dict(level=level, denormal_as_zero=denormal, mode=mode, threads=threads,
                 spinning=spin)
            for level, denormal, mode, threads, spin in itertools.product(
                levels, (False, True), ("sequential", "parallel"), (1, 2), (False, True))]


def key(setting: dict) -> str:
    return (f"{setting['level']}, denormal {'on' if setting['denormal_as_zero'] else 'off'}, "
            f"{setting['mode']}, {setting['threads']} thread{'s' if setting['threads'] > 1 else ''}"
            f", spinning {'on' if setting['spinning'] else 'off'}")


def spins(setting: dict) -> bool:
    return setting["spinning"] and (setting["threads"] > 1 or setting["mode"] == "parallel")


def effects(rows: list[dict], column: str) -> list[dict]:
    """Per option and value: the median over setting pairs differing only in that option of
    ms(value) / ms(the first value)."""
    found = []
    index = {tuple(r["setting"][f] for f in FACTORS): r[column] for r in rows}
    for position, factor in enumerate(FACTORS):
        values = sorted({r["setting"][factor] for r in rows}, key=lambda v: (str(type(v)), v))
        base = {"level": "ALL", "mode": "sequential"}.get(factor, values[0])
        for value in values:
            if value == base:
                continue
            ratios = []
            for combo, ms in index.items():
                if combo[position] != value:
                    continue
                other = combo[:position] + (base,) + combo[position + 1:]
                if other in index:
                    ratios.append(ms / index[other])
            if ratios:
                found.append(dict(option=factor, value=value, against=base,
                                  median_ratio=statistics.median(ratios),
                                  min_ratio=min(ratios), max_ratio=max(ratios),
                                  pairs=len(ratios)))
    return found


# -- the run -----------------------------------------------------------------------------------
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke: levels DISABLE_ALL and ALL only, 2 rounds, bursts of 5")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--burst", type=int, default=None)
    args = parser.parse_args(argv)
    rounds, warmup = (args.rounds or 2, 1) if args.quick else (args.rounds or 7, 1)
    burst = args.burst or (5 if args.quick else 20)
    started = time.perf_counter()

    import approx
    from rectonnx import models
    from rectonnx.runtime import Explainer

    model, x = approx.load(models.PAPER_CNN, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explainer = Explainer(model, "rectgrad", q=Q, padding_trick=False,
                              providers=["CPUExecutionProvider"], spinning=False).graph
    input_name = model.graph.input[0].name
    target = np.full(1, -1, np.int64)
    graphs = {"inference": (model, {input_name: x}),
              "RectGrad explainer": (explainer, {input_name: x, "target": target})}
    report = dict(machine=machine(), load_before=load_average(), quick=args.quick,
                  rounds=rounds, burst=burst, nodes=[], grid=[], cleanup=[], effects={})

    # node counts before and after onnxruntime's optimiser
    for label, (graph, _) in graphs.items():
        row = dict(graph=label, built=removable(graph))
        for level in LEVELS:
            row[level] = removable(optimised(graph, level))
        report["nodes"].append(row)

    # the grid of session options
    grid = settings(args.quick)
    contenders, spinning = {}, set()
    for setting in grid:
        for label, (graph, feeds) in graphs.items():
            name = f"{label} | {key(setting)}"
            sess = session(graph, **setting)
            contenders[name] = lambda sess=sess, feeds=feeds: sess.run(None, feeds)
            if spins(setting):
                spinning.add(name)
    times = timed(contenders, rounds, warmup, burst, spinning, "session options grid")
    for setting in grid:
        row = dict(setting=setting, key=key(setting))
        for label in graphs:
            values = times[f"{label} | {key(setting)}"]
            row[label] = statistics.median(values)
            row[f"{label} best"] = min(values)
        row["ratio"] = row["RectGrad explainer"] / row["inference"]
        report["grid"].append(row)
    del contenders
    for label in graphs:
        report["effects"][label] = effects(report["grid"], label)
    report["effects"]["ratio"] = effects(report["grid"], "ratio")

    # dropping what can go: the explainer graph cleaned up in several ways
    time.sleep(1.0)
    best = min(report["grid"], key=lambda r: r["RectGrad explainer"])["setting"]
    feeds = graphs["RectGrad explainer"][1]
    fixed = fixed_batch(explainer)
    graphs_by_variant = {
        "as built (ALL at load)": (explainer, "ALL"),
        "batch fixed at 1 (Shape chains fold)": (fixed, "ALL"),
        "pre-optimised BASIC, then ALL at load": (optimised(explainer, "BASIC"), "ALL"),
        "batch fixed at 1, pre-optimised BASIC, then ALL": (optimised(fixed, "BASIC"), "ALL"),
        "pre-optimised ALL, loaded with DISABLE_ALL": (optimised(explainer, "ALL"),
                                                      "DISABLE_ALL"),
    }
    bases = {"the explainer's best setting": best, "rectonnx's sessions": dict(
        level="ALL", denormal_as_zero=False, mode="sequential", threads=2, spinning=False)}
    variants = {f"{label}, {where}": (graph, dict(base, level=level))
                for where, base in bases.items()
                for label, (graph, level) in graphs_by_variant.items()}
    reference_map = None
    contenders, spinning = {}, set()
    for label, (graph, setting) in variants.items():
        sess = session(graph, **setting)
        attribution = sess.run(["attribution"], feeds)[0]
        if reference_map is None:
            reference_map = attribution
        same = bool(np.allclose(attribution, reference_map, rtol=1e-5,
                                atol=1e-6 * float(np.abs(reference_map).max())))
        contenders[label] = lambda sess=sess: sess.run(None, feeds)
        if spins(setting):
            spinning.add(label)
        report["cleanup"].append(dict(variant=label, setting=key(setting), same_map=same,
                                      **{f"after_{k}": v for k, v in removable(
                                          optimised(graph, setting["level"])
                                          if setting["level"] != "DISABLE_ALL" else graph
                                      ).items()}))
    times = timed(contenders, rounds * 3, warmup, burst, spinning, "clean-up variants")
    for row in report["cleanup"]:
        values = times[row["variant"]]
        where = next(w for w in bases if row["variant"].endswith(w))
        base = statistics.median(times[f"as built (ALL at load), {where}"])
        row.update(ms=statistics.median(values), best_ms=min(values),
                   vs_built=statistics.median(values) / base)
    report["load_after"] = load_average()
    report["seconds"] = time.perf_counter() - started
    table = markdown(report)
    print(table)
    save(Path(args.out), "session_options", table, report)


# -- report ------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Machine: {m.get('cpu', m['machine'])} ({m.get('simd', '?')}), {m['cores']} cores; "
             f"onnxruntime {m['onnxruntime']} (CPUExecutionProvider); {m['date']}. Load average "
             f"before/after: {report['load_before']} / {report['load_after']}. "
             f"{report['rounds']} interleaved rounds (shuffled), each sample the mean of "
             f"{report['burst']} calls; median ms per call. Run time "
             f"{report['seconds'] / 60:.1f} min." + (" (--quick)" if report["quick"] else ""),
             "", "Paper CNN (models/paper_cnn_digits.onnx), batch 1; the explainer is RectGrad "
             f"q = {Q:g} as `rectonnx.Explainer` builds it for the CPU provider.", ""]
    lines += ["### Nodes, as built and after onnxruntime's optimiser (saved optimized model)", "",
              "| graph | as built | DISABLE_ALL | BASIC | EXTENDED | ALL | left after ALL: "
              "Constant / Identity / Shape / Cast pairs / Casts / NCHWc reorders |",
              "|---|---|---|---|---|---|---|"]
    for r in report["nodes"]:
        a = r["ALL"]
        lines.append(f"| {r['graph']} | {r['built']['nodes']} | {r['DISABLE_ALL']['nodes']} | "
                     f"{r['BASIC']['nodes']} | {r['EXTENDED']['nodes']} | {a['nodes']} | "
                     f"{a['constant']} / {a['identity']} / {a['shape']} / {a['cast_pairs']} / "
                     f"{a['casts']} / {a['nchwc_reorders']} |")
    grid = report["grid"]
    best_inf = min(grid, key=lambda r: r["inference"])
    best_exp = min(grid, key=lambda r: r["RectGrad explainer"])
    default = next((r for r in grid if r["setting"] == dict(
        level="ALL", denormal_as_zero=False, mode="sequential", threads=2, spinning=True)), None)
    rectonnx_default = next((r for r in grid if r["setting"] == dict(
        level="ALL", denormal_as_zero=False, mode="sequential", threads=2, spinning=False)), None)
    lines += ["", "### Best settings side by side", "",
              "| | setting | inference ms | explainer ms | explainer / inference |",
              "|---|---|---|---|---|"]
    for label, r in (("best for inference", best_inf), ("best for the explainer", best_exp),
                     ("onnxruntime's defaults (ALL, 2 threads, spinning on)", default),
                     ("rectonnx's sessions (ALL, 2 threads, spinning off)", rectonnx_default)):
        if r:
            lines.append(f"| {label} | {r['key']} | {r['inference']:.3f} | "
                         f"{r['RectGrad explainer']:.3f} | {r['ratio']:.2f} |")
    lines += ["", f"Explainer at its best / inference at its best: "
              f"{best_exp['RectGrad explainer'] / best_inf['inference']:.2f} "
              f"({best_exp['RectGrad explainer']:.3f} / {best_inf['inference']:.3f} ms)."]
    # the fastest round of each setting: what the settings allow when the machine is quiet
    fast_inf = min(grid, key=lambda r: r["inference best"])
    fast_exp = min(grid, key=lambda r: r["RectGrad explainer best"])
    lines += [f"By each setting's fastest round instead of the median (less hit by a busy "
              f"machine): best for inference {fast_inf['key']} ({fast_inf['inference best']:.3f} "
              f"ms), best for the explainer {fast_exp['key']} "
              f"({fast_exp['RectGrad explainer best']:.3f} ms), ratio "
              f"{fast_exp['RectGrad explainer best'] / fast_inf['inference best']:.2f}."]
    lines += ["", "### Each option's effect (median over the pairs of settings that differ only "
              "in it: ms with the value / ms with the other; < 1 = faster)", "",
              "| option | value | against | inference | explainer | explainer / inference "
              "ratio | pairs |", "|---|---|---|---|---|---|---|"]
    by = {label: {(e["option"], str(e["value"])): e for e in report["effects"][label]}
          for label in report["effects"]}
    for e in report["effects"]["inference"]:
        k = (e["option"], str(e["value"]))
        x, ratio = by["RectGrad explainer"].get(k), by["ratio"].get(k)

        def cell(found):
            return (f"{found['median_ratio']:.2f} ({found['min_ratio']:.2f}-"
                    f"{found['max_ratio']:.2f})") if found else ""
        lines.append(f"| {e['option']} | {e['value']} | {e['against']} | {cell(e)} | {cell(x)} | "
                     f"{cell(ratio)} | {e['pairs']} |")
    lines += ["", "### Every setting (sorted by the explainer's time)", "",
              "| setting | inference ms | explainer ms | explainer / inference |",
              "|---|---|---|---|"]
    for r in sorted(grid, key=lambda r: r["RectGrad explainer"]):
        lines.append(f"| {r['key']} | {r['inference']:.3f} | {r['RectGrad explainer']:.3f} | "
                     f"{r['ratio']:.2f} |")
    lines += ["", "### Dropping what can go from the explainer graph (at the explainer's best "
              "setting and at rectonnx's; x as built: against the graph as built at the same "
              "setting)", "",
              "| variant | session | ms | best ms | x as built | same map | nodes run | "
              "Shape / Identity / Constant / Cast pairs left |",
              "|---|---|---|---|---|---|---|---|"]
    for r in report["cleanup"]:
        lines.append(f"| {r['variant']} | {r['setting']} | {r['ms']:.3f} | {r['best_ms']:.3f} | "
                     f"{r['vs_built']:.2f} | {r['same_map']} | {r['after_nodes']} | "
                     f"{r['after_shape']} / {r['after_identity']} / {r['after_constant']} / "
                     f"{r['after_cast_pairs']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
