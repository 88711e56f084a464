"""threshold="approx" against the exact RectGrad threshold: speed and how close the maps are.

    python benchmarks/approx.py [--quick] [--out DIR] [--recall R]
        [--models paper_cnn_digits,efficientnet_lite0,resnet50]

Per model (the shipped ``models/paper_cnn_digits.onnx`` and ``models/efficientnet_lite0.onnx``,
ResNet-50 with random weights from benchmarks/nets.py) and q in (95, 98), with RectGrad's
``padding_trick=False`` (saliency has none) and the default ``recall=0.95``:

* speed at batch 1 and 8: onnxruntime inference, saliency, exact RectGrad (``threshold="topk"``)
  and ``threshold="approx"`` (ms, median over interleaved rounds, 2 threads, sessions with
  ``session.intra_op.allow_spinning = 0``, as benchmarks/bench.py measures);
* the gate masks: every RectGrad gate's ``I(y R > tau)`` is made a graph output (the Greater
  node that reads an ``importance`` score), and per layer the share of the units the exact gate
  keeps that the approximate graph's gate keeps too ("recovered": end to end, so a layer's
  upstream gradient already carries the differences of the layers above), its worst and median
  over layers and samples, and how many units the approximate gate keeps per exact one;
* the attribution against exact: cosine similarity and the overlap of the top 5 % values.

Inputs: the shipped models' own images (models/images, their sidecar preprocessing), random
normal images for ResNet-50. Numbers are reported, never asserted; ``--quick`` (CI smoke) runs
the paper CNN and EfficientNet-Lite0 at batch 1 with 2 rounds in well under a minute. Writes
``approx.md`` and ``approx.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import rectonnx  # noqa: E402
from bench import CPU_TIMES, interleaved, load_average, machine, save  # noqa: E402
from rectonnx.runtime import make_session  # noqa: E402
from rectonnx.threshold import (APPROX_EXPECTED_TOP, APPROX_MIN_SIZE,  # noqa: E402
                                APPROX_SAMPLE_RATIO, DEFAULT_RECALL, approx_fraction,
                                approx_positions, approx_rank, approx_sample_size,
                                percentile_rank)

QS = (95.0, 98.0)
THREADS = 2
SHIPPED = {"paper_cnn_digits": ("paper_cnn_digits.onnx", "digits_*.png"),
           "efficientnet_lite0": ("efficientnet_lite0.onnx", "*.jpg")}


# -- models and inputs ---------------------------------------------------------------------------
def load(name: str, batch: int) -> tuple[onnx.ModelProto, np.ndarray]:
    """The model and ``batch`` inputs for it."""
    if name in SHIPPED:
        from rectonnx.batch import preprocess_for
        from rectonnx.images import load_image

        file, pattern = SHIPPED[name]
        path = ROOT / "models" / file
        preprocess = preprocess_for(path)
        images = sorted((ROOT / "models" / "images").glob(pattern))
        x = np.stack([load_image(images[i % len(images)], preprocess)[0] for i in range(batch)])
        return onnx.load(str(path)), x.astype(np.float32)
    import nets

    _, model, shape = nets.build(name)
    return model, nets.random_batch(shape, batch)


def graph(model: onnx.ModelProto, method: str, **options) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return rectonnx.rewrite(model, method, **options)


def session(explainer: onnx.ModelProto):
    return make_session(explainer, ["CPUExecutionProvider"], THREADS, spinning=False)


# -- gate masks ------------------------------------------------------------------------------------
def with_gate_outputs(explainer: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str],
                                                            list[str]]:
    """A copy whose every RectGrad gate mask (Greater(importance, tau)) is also an output,
    and so are the gate's scores (``importance``; ``pooled_importance`` under the pooled
    shortcut): ``(copy, masks, scores)``."""
    producers = {out: node for node in explainer.graph.node for out in node.output}
    nodes = [node for node in explainer.graph.node if node.op_type == "Greater"
             and node.input[0] in producers and producers[node.input[0]].op_type == "Mul"
             and "importance" in node.input[0]]
    gates, scores = [n.output[0] for n in nodes], [n.input[0] for n in nodes]
    copy = onnx.ModelProto()
    copy.CopyFrom(explainer)
    for name, kind in [(g, onnx.TensorProto.BOOL) for g in gates] + \
            [(s, onnx.TensorProto.FLOAT) for s in scores]:
        copy.graph.output.append(onnx.helper.make_tensor_value_info(name, kind, None))
    return copy, gates, scores


def isolated_recall(scores: np.ndarray, exact_mask: np.ndarray, q: float,
                    recall: float) -> list[float] | None:
    """Per sample: the share of the exact gate's units that the approximate threshold of the
    same scores keeps (the numpy twin of threshold.approx_threshold); None where the layer
    falls back to exact."""
    flat = scores.reshape(len(scores), -1)
    size = flat.shape[1]
    sample = approx_sample_size(size, approx_fraction(q))
    if sample is None:
        return None
    rank = approx_rank(percentile_rank(size, q), size, sample, recall)
    picked = flat[:, approx_positions(size, sample)]
    tau = -np.sort(-picked, axis=1)[:, rank - 1]
    kept, exact = flat > tau[:, None], exact_mask.reshape(len(flat), -1)
    return [float((kept[n] & exact[n]).sum() / exact[n].sum()) for n in range(len(flat))
            if exact[n].any()]


def compare(model, x, q: float, recall: float) -> dict:
    """Gate masks and attribution of approx against exact RectGrad on the batch ``x``."""
    feeds_target = np.full(len(x), -1, np.int64)
    runs = {}
    for algorithm in ("topk", "approx"):
        options = {"recall": recall} if algorithm == "approx" else {}
        explainer, gates, scores = with_gate_outputs(graph(
            model, "rectgrad", q=q, padding_trick=False, threshold=algorithm, **options))
        sess = session(explainer)
        feeds = {explainer.graph.input[0].name: x, "target": feeds_target}
        outputs = sess.run(["attribution", *gates, *scores], feeds)
        runs[algorithm] = (outputs[0], outputs[1:1 + len(gates)], sum(
            n.op_type == "Gather" and "sample" in n.output[0] for n in explainer.graph.node),
            list(zip(scores, outputs[1 + len(gates):])))
    exact_map, exact_masks, _, exact_scores = runs["topk"]
    approx_map, approx_masks, sampled, _ = runs["approx"]
    assert len(exact_masks) == len(approx_masks)
    isolated = []  # the threshold alone, on the exact graph's scores (not the pooled ones)
    for (name, values), mask in zip(exact_scores, exact_masks):
        shares = None if "pooled" in name else isolated_recall(values, mask, q, recall)
        isolated += shares or []
    recovered, extra = [], []
    for e, a in zip(exact_masks, approx_masks):
        e, a = e.reshape(len(x), -1), a.reshape(len(x), -1)
        for n in range(len(x)):
            if e[n].sum() == 0:
                continue
            recovered.append(float((e[n] & a[n]).sum() / e[n].sum()))
            extra.append(float(a[n].sum() / e[n].sum()))
    flat_e, flat_a = exact_map.reshape(len(x), -1), approx_map.reshape(len(x), -1)
    cos = (flat_e * flat_a).sum(1) / (np.linalg.norm(flat_e, axis=1) *
                                       np.linalg.norm(flat_a, axis=1) + 1e-30)
    top = max(1, int(round(0.05 * flat_e.shape[1])))
    overlap = []
    for n in range(len(x)):
        te = set(np.argpartition(-flat_e[n], top - 1)[:top])
        ta = set(np.argpartition(-flat_a[n], top - 1)[:top])
        overlap.append(len(te & ta) / top)
    return dict(gated_layers=len(exact_masks), subsampled_layers=sampled,
                isolated_worst=min(isolated, default=float("nan")),
                isolated_median=statistics.median(isolated) if isolated else float("nan"),
                isolated_below_recall=sum(v < recall for v in isolated),
                isolated_draws=len(isolated),
                recovered_worst=min(recovered), recovered_median=statistics.median(recovered),
                kept_per_exact_median=statistics.median(extra), kept_per_exact_max=max(extra),
                cosine_min=float(cos.min()), cosine_median=float(np.median(cos)),
                top5_overlap_min=min(overlap), top5_overlap_median=statistics.median(overlap),
                samples=len(x))


# -- speed -----------------------------------------------------------------------------------------
def speed(name: str, model, batches, rounds: int, warmup: int, recall: float) -> list[dict]:
    built = {"saliency": graph(model, "saliency")}
    for q in QS:
        built[f"rectgrad q={q:g} exact"] = graph(model, "rectgrad", q=q, padding_trick=False)
        built[f"rectgrad q={q:g} approx"] = graph(model, "rectgrad", q=q, padding_trick=False,
                                                 threshold="approx", recall=recall)
    sessions = {label: session(g) for label, g in built.items()}
    forward = make_session(model, ["CPUExecutionProvider"], THREADS, spinning=False)
    input_name = model.graph.input[0].name
    rows = []
    for batch in batches:
        _, x = load(name, batch)
        target = np.full(batch, -1, np.int64)
        contenders = {"onnxruntime inference": lambda: forward.run(None, {input_name: x})}
        for label, sess in sessions.items():
            feeds = {input_name: x, "target": target}
            contenders[label] = lambda sess=sess, feeds=feeds: sess.run(["attribution"], feeds)
        times = interleaved(contenders, rounds, warmup)
        reference = statistics.median(times["onnxruntime inference"])
        cpu_reference = statistics.median(CPU_TIMES["onnxruntime inference"])
        for label, values in times.items():
            median = statistics.median(values)
            cpu = statistics.median(CPU_TIMES[label])
            rows.append(dict(model=name, batch=batch, contender=label, ms=median,
                             best_ms=min(values), worst_ms=max(values),
                             x_inference=median / reference, cpu_ms=cpu,
                             cpu_x_inference=cpu / cpu_reference, rounds=len(values)))
    return rows


# -- report ----------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Machine: {m.get('cpu', m['machine'])} ({m.get('simd', '?')}), {m['cores']} cores; "
             f"onnxruntime {m['onnxruntime']}, {THREADS} threads, no spinning; {m['date']}. "
             f"Load average before/after: {report['load_before']} / {report['load_after']}. "
             f"approx: recall = {report['recall']}, subsample of about "
             f"{APPROX_EXPECTED_TOP} / (1 - q/100) scores, exact below {APPROX_MIN_SIZE} scores "
             f"or where the subsample is over 1/{APPROX_SAMPLE_RATIO} of them.", "",
             "### Speed (median over interleaved rounds; best-worst; CPU ms = process CPU "
             "time, all threads, which a busy machine inflates less than wall time)", "",
             "| model | batch | contender | ms | best-worst ms | x inference | x exact | CPU ms "
             "| CPU x inference | CPU x exact |", "|---|---|---|---|---|---|---|---|---|---|"]
    by_key = {(r["model"], r["batch"], r["contender"]): r for r in report["speed"]}
    for r in report["speed"]:
        exact = by_key.get((r["model"], r["batch"], r["contender"].replace("approx", "exact")))
        ratio, cpu_ratio = ("", "")
        if "approx" in r["contender"] and exact:
            ratio = f"{r['ms'] / exact['ms']:.2f}"
            cpu_ratio = f"{r['cpu_ms'] / exact['cpu_ms']:.2f}"
        lines.append(f"| {r['model']} | {r['batch']} | {r['contender']} | {r['ms']:.1f} | "
                     f"{r['best_ms']:.1f}-{r['worst_ms']:.1f} | {r['x_inference']:.2f} | "
                     f"{ratio} | {r['cpu_ms']:.1f} | {r['cpu_x_inference']:.2f} | "
                     f"{cpu_ratio} |")
    lines += ["", "### approx against exact RectGrad", "",
              "Recovered: the share of the units an exact gate keeps that the approximate "
              "keeps too, per (layer, sample). Alone: the approximate threshold of the exact "
              "graph's own scores at each subsampled layer (the bound: below recall in <= 2.5 % "
              "of draws). End to end: the approximate graph's gate, whose upstream gradient "
              "already differs where the layers above differed.", "",
              "| model | q | gated layers | subsampled | alone: worst / median / draws below "
              "recall | end to end: worst | median | kept / exact median (max) | cosine min "
              "(median) | top-5 % overlap min (median) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["accuracy"]:
        lines.append(f"| {r['model']} | {r['q']:g} | {r['gated_layers']} | "
                     f"{r['subsampled_layers']} | " + (
                         f"{r['isolated_worst']:.3f} / {r['isolated_median']:.3f} / "
                         f"{r['isolated_below_recall']} of {r['isolated_draws']}"
                         if r["isolated_draws"] else "(exact: none subsampled)") +
                     f" | {r['recovered_worst']:.3f} | "
                     f"{r['recovered_median']:.3f} | {r['kept_per_exact_median']:.3f} "
                     f"({r['kept_per_exact_max']:.2f}) | {r['cosine_min']:.4f} "
                     f"({r['cosine_median']:.4f}) | {r['top5_overlap_min']:.3f} "
                     f"({r['top5_overlap_median']:.3f}) |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke: paper CNN and EfficientNet-Lite0, batch 1, 2 rounds")
    parser.add_argument("--out", default="benchmarks/results", help="folder for approx.md/json")
    parser.add_argument("--models", default=None,
                        help="comma-separated: paper_cnn_digits, efficientnet_lite0, resnet50")
    parser.add_argument("--recall", type=float, default=DEFAULT_RECALL)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    names = [n for n in (args.models or ("paper_cnn_digits,efficientnet_lite0" if args.quick
                                         else "paper_cnn_digits,efficientnet_lite0,resnet50")
                         ).split(",") if n]
    batches = [1] if args.quick else [1, 8]
    rounds, warmup = (args.rounds or 2, 1) if args.quick else (args.rounds or 7, 1)
    report = dict(machine=machine(), load_before=load_average(), quick=args.quick,
                  recall=args.recall, speed=[], accuracy=[])
    started = time.perf_counter()
    for name in names:
        print(f"[approx] {name}", file=sys.stderr, flush=True)
        model, x = load(name, 2 if args.quick else 4)
        for q in QS:
            report["accuracy"].append(dict(model=name, q=q, **compare(model, x, q, args.recall)))
        report["speed"] += speed(name, model, batches, rounds, warmup, args.recall)
    report["load_after"] = load_average()
    report["seconds"] = time.perf_counter() - started
    table = markdown(report)
    print(table)
    save(Path(args.out), "approx", table, report)


if __name__ == "__main__":
    main()
