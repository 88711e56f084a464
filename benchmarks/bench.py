"""Time the shipped models: onnxruntime inference vs. each method's explainer graph.

    python benchmarks/bench.py [--quick] [--out DIR]

Prints a Markdown table (median milliseconds per batch and per image, and the ratio to plain
inference) and writes ``bench.md`` and ``bench.json`` with the machine and versions. Numbers are
reported, never asserted. Blocks are separated by a pause because onnxruntime's worker threads
keep spinning for a moment after a run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import rectonnx
from rectonnx import models
from rectonnx.runtime import make_session

METHODS = [("saliency", {}), ("guided_backprop", {}), ("rectgrad", {"q": 98.0}),
           ("rectgrad", {"q": 98.0, "padding_trick": True, "prr": True})]


def median_ms(run, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    time.sleep(0.5)
    return statistics.median(times)


def bench_model(name: str, batches: list[int], repeats: int) -> list[dict]:
    path = models.path(name)
    source = onnx.load(str(path))
    shape = [d.dim_value for d in source.graph.input[0].type.tensor_type.shape.dim[1:]]
    forward = make_session(source, ["CPUExecutionProvider"])
    input_name = source.graph.input[0].name
    rows = []
    rng = np.random.default_rng(0)
    explainers = []
    for method, options in METHODS:
        started = time.perf_counter()
        graph = rectonnx.rewrite(path, method, **options)
        rewrite_s = time.perf_counter() - started
        explainers.append((method, options, graph, rewrite_s,
                           make_session(graph, ["CPUExecutionProvider"])))
    for batch in batches:
        x = rng.standard_normal([batch] + shape).astype(np.float32)
        target = np.full(batch, -1, np.int64)
        base = median_ms(lambda: forward.run(None, {input_name: x}), repeats)
        rows.append(dict(model=name, batch=batch, method="inference", options={},
                         ms=base, ms_per_image=base / batch, ratio=1.0,
                         nodes=len(source.graph.node)))
        for method, options, graph, rewrite_s, session in explainers:
            ms = median_ms(lambda: session.run(None, {input_name: x, "target": target}), repeats)
            rows.append(dict(model=name, batch=batch, method=method, options=options, ms=ms,
                             ms_per_image=ms / batch, ratio=ms / base,
                             nodes=len(graph.graph.node), rewrite_s=rewrite_s))
    return rows


def label(row: dict) -> str:
    extras = [k for k, v in row["options"].items() if v is True]
    return row["method"] + (f" ({', '.join(extras)})" if extras else "")


def markdown(rows: list[dict], machine: str) -> str:
    lines = [f"Machine: {machine}", "",
             "| model | batch | graph | nodes | ms / batch | ms / image | x inference |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {label(r)} | {r['nodes']} | "
                     f"{r['ms']:.1f} | {r['ms_per_image']:.2f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, small batches (CI)")
    parser.add_argument("--out", default="benchmarks/results", help="directory for bench.md/json")
    args = parser.parse_args()
    repeats = 3 if args.quick else 20
    plan = {models.PAPER_CNN: [1, 16] if args.quick else [1, 64],
            models.EFFICIENTNET_LITE0: [1] if args.quick else [1, 8]}
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, "
               f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, CPUExecutionProvider")
    rows = []
    for name, batches in plan.items():
        rows += bench_model(name, batches, repeats)
    table = markdown(rows, machine)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text(table + "\n")
    (out / "bench.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
