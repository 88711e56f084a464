"""Per-architecture numbers for the nine model-zoo graphs of the ``onnx`` package.

    python benchmarks/zoo_report.py [--full] [--out DIR] [--models alexnet,resnet50]

Each architecture (``tests/zoo.py``: the graph from ``onnx/backend/test/data/light`` with
seeded random weights; at the input size the tests use, or 224 px with ``--full``) is
rewritten for every method, and the report gives, per architecture:

* the source graph (opset, nodes as shipped, input shape), the forward nodes after
  normalisation, and the explainer's node count for saliency and for RectGrad;
* the rewrite time (median of the five methods, seconds);
* whether the explainer's batch is symbolic (the sources have a fixed batch of 1);
* the saliency check: the explainer graph run in float64 against central differences of the
  source model's scores in float64 along a random direction (the dot-product check,
  ``|<t, grad> - FD| / |FD|``), and the same for onnxruntime's float32 run; the smaller of the
  steps 1e-7 and 1e-8 (a 224-pixel VGG-19 crosses ReLU kinks at 1e-7: 1.7e-4 there, 6e-7 at
  1e-8), both kept in zoo.json.

Numbers are reported, never asserted (``tests/test_zoo.py`` asserts). Writes ``zoo.md`` and
``zoo.json`` to ``--out`` (default: the current directory).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import rectonnx  # noqa: E402
from rectonnx.normalize import normalize  # noqa: E402

from helpers import dot_product_check, rel_err, run_explainer  # noqa: E402
from zoo import ZOO, ZooReference, input_shape, load_light, run_in_float64, zoo_model  # noqa: E402

METHODS = ["saliency", "grad_input", "deconvnet", "guided_backprop", "rectgrad"]
TARGETS = [-1, 7]
FD_STEPS = (1e-7, 1e-8)  # kinks want a small step, float64 round-off a large one: both shown


def report(name: str, full: bool) -> dict:
    size = 224 if full else None
    model = zoo_model(name, size=size)
    shipped = load_light(name)
    x = np.random.default_rng(1).standard_normal([len(TARGETS), *input_shape(model)[1:]]) \
        .astype(np.float32)
    forward = len(normalize(model).model.graph.node)
    times, explainers = [], {}
    for method in METHODS:
        start = time.perf_counter()
        explainers[method] = rectonnx.rewrite(model, method)
        times.append(time.perf_counter() - start)
    saliency = explainers["saliency"]
    for method, explainer in explainers.items():
        run_explainer(explainer, x, TARGETS)  # every method runs
    _, float32 = run_explainer(saliency, x, TARGETS)
    exact = run_in_float64(saliency, x, TARGETS)
    reference = ZooReference(model)
    direction = np.random.default_rng(2).standard_normal(x.shape)  # the check's t
    fd64, fd32 = {}, {}
    for step in FD_STEPS:
        lhs, rhs = dot_product_check(reference, x, TARGETS, exact, np.random.default_rng(2),
                                     eps=step)
        fd64[step] = rel_err(lhs, rhs)
        fd32[step] = rel_err((direction * float32).sum(axis=(1, 2, 3)), rhs)
    batch = saliency.graph.input[0].type.tensor_type.shape.dim[0]
    return {
        "architecture": name,
        "opset": shipped.opset_import[0].version,
        "ir_version": shipped.ir_version,
        "input": list(input_shape(model)),
        "shipped_nodes": len(shipped.graph.node),
        "forward_nodes": forward,
        "saliency_nodes": len(saliency.graph.node),
        "rectgrad_nodes": len(explainers["rectgrad"].graph.node),
        "rewrite_s": statistics.median(times),
        "batch": batch.dim_param or batch.dim_value,
        "fd_error_float64": min(fd64.values()),
        "fd_error_float32": min(fd32.values()),
        "fd_error_by_step": {f"{k:g}": {"float64": fd64[k], "float32": fd32[k]}
                             for k in FD_STEPS},
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| architecture | input | nodes shipped / forward | explainer nodes saliency / "
             "rectgrad | rewrite s | batch | FD error float64 graph / float32 run |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['architecture']} | {'x'.join(map(str, r['input'][1:]))} | "
            f"{r['shipped_nodes']} / {r['forward_nodes']} | "
            f"{r['saliency_nodes']} / {r['rectgrad_nodes']} | {r['rewrite_s']:.2f} | "
            f"{r['batch']} | {r['fd_error_float64']:.1e} / {r['fd_error_float32']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every model at 224 x 224")
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--models", default=",".join(ZOO))
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        rows.append(report(name, args.full))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    text = markdown(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "zoo.md").write_text(text + "\n")
    (args.out / "zoo.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
