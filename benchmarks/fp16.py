"""float16 explainers as deployed: the map computed in float16 against the float32 map of the same
weights (issue 15; rectonnx/precision.py).

    python benchmarks/fp16.py [--out DIR] [--reference-images N]

The shipped float32 models (paper CNN, EfficientNet-Lite0) are converted to float16 with
onnxruntime's ``convert_float_to_float16`` (``keep_io_types=False``: weights, input and output in
float16). Each float16 model is rewritten twice for RectGrad (q = 98, padding trick;
the ``runtime="onnxruntime-cpu"`` graph for onnxruntime, whose MaxUnpool max-pool backward runs
in float16 there, and the portable ``runtime="any"`` graph for the others):
``precision="model"`` (computes in float16; the percentile thresholds in float32) and
``precision="fp32"`` (the same float16-rounded weights upcast, computes in float32). Both also
return the gradient reaching every activation and the activation itself, from which the gate
``I(y R > tau)`` of every RectGrad layer is recomputed (``tau`` = the k-th largest ``y R`` of
the layer and sample, threshold.percentile_rank).

The float32 map (onnxruntime CPU, float32) is the yardstick; the float16 graph runs on
``onnx.reference`` (slow: the first 2 images of EfficientNet-Lite0), onnxruntime's CPU provider
and OpenVINO's CPU plugin (``INFERENCE_PRECISION_HINT`` f16; the table shows the precision it
reports: bfloat16 on a CPU without float16 arithmetic). Per model and runtime, over the images
(each explains the class the float32 graph predicts):

* cosine: the cosine similarity of the float16 and float32 maps (mean and minimum);
* top 5 %: the share of the float32 map's top 5 % pixels that are in the float16 map's top 5 %;
* gate: the share of the units the float32 gates keep that the float16 gates keep too, and the
  share of all units on which the two gates agree (kept or closed).

Prints a Markdown table and writes ``fp16.md``. Timings are not the point (a loaded 2-core VM).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import rectonnx  # noqa: E402
from rectonnx.batch import preprocess_for  # noqa: E402
from rectonnx.images import load_image  # noqa: E402
from rectonnx.precision import BUILDER_SCOPES  # noqa: E402
from rectonnx.threshold import percentile_rank  # noqa: E402

MODELS = {"paper_cnn_digits": "digits_*.png", "efficientnet_lite0": "*.jpg"}
SLOW_ON_REFERENCE = {"efficientnet_lite0"}  # about a minute per image in onnx.reference
Q = 98.0


def half_model(path: Path) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(onnx.load(str(path)), keep_io_types=False)


def shipped_batch(model: Path, pattern: str) -> np.ndarray:
    preprocess = preprocess_for(model)
    files = sorted((ROOT / "models" / "images").glob(pattern))
    return np.stack([load_image(path, preprocess)[0] for path in files])


def with_activations(graph: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The explainer graph that also returns every gated activation ``y`` (layer -> tensor)."""
    forward = {n.name.strip("/"): n for n in graph.graph.node
               if not n.name.startswith(BUILDER_SCOPES)}
    layers = {}
    for output in graph.graph.output:
        if output.name.startswith("attribution/"):
            layer = output.name[len("attribution/"):]
            layers[layer] = forward[layer].output[0]
    elem = graph.graph.output[0].type.tensor_type.elem_type
    extended = onnx.ModelProto.FromString(graph.SerializeToString())
    known = {o.name for o in extended.graph.output}
    extended.graph.output.extend(helper.make_tensor_value_info(t, elem, None)
                                 for t in layers.values() if t not in known)
    return extended, layers


class Runner:
    """One runtime: ``run(graph, x, target) -> {output name: float32 array}``."""

    def __init__(self, name: str):
        self.name = name
        self.actual = ""  # the precision the runtime reports it computes in

    def run(self, graph: onnx.ModelProto, x: np.ndarray, target: np.ndarray) -> dict:
        dtype = helper.tensor_dtype_to_np_dtype(graph.graph.input[0].type.tensor_type.elem_type)
        feeds = {graph.graph.input[0].name: x.astype(dtype), "target": target}
        names = [o.name for o in graph.graph.output]
        if self.name == "onnx.reference":
            from onnx.reference import ReferenceEvaluator

            outputs = ReferenceEvaluator(graph).run(names, feeds)
        elif self.name == "onnxruntime CPU":
            import onnxruntime as ort

            session = ort.InferenceSession(graph.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
            outputs = session.run(names, feeds)
        else:
            import openvino as ov

            core = ov.Core()
            half = dtype == np.float16
            compiled = core.compile_model(core.read_model(graph.SerializeToString()), "CPU",
                                          {"INFERENCE_PRECISION_HINT": "f16" if half else "f32"})
            if half:
                reported = compiled.get_property("INFERENCE_PRECISION_HINT")
                self.actual = f"computes in {getattr(reported, 'type_name', reported)}"
            result = compiled(feeds)
            outputs = [result[compiled.output(name)] for name in names]
        return {name: np.asarray(value, np.float32) for name, value in zip(names, outputs)}


def gates(outputs: dict, layers: dict[str, str], half: bool) -> dict[str, np.ndarray]:
    """Per layer, the units RectGrad keeps: ``y R > tau`` per sample (scores computed in the
    graph's precision)."""
    kept = {}
    for layer, tensor in layers.items():
        y, r = outputs[tensor], outputs[f"attribution/{layer}"]
        scores = (y.astype(np.float16) * r.astype(np.float16)).astype(np.float32) if half \
            else y * r
        flat = scores.reshape(len(scores), -1)
        k = percentile_rank(flat.shape[1], Q)
        tau = -np.sort(-flat, axis=1)[:, k - 1:k]
        kept[layer] = flat > tau
    return kept


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norm) if norm else float("nan")


def top_overlap(a: np.ndarray, b: np.ndarray, share: float = 0.05) -> float:
    """Share of ``b``'s top ``share`` pixels (summed over channels) in ``a``'s."""
    pa, pb = (np.abs(m).sum(0).ravel() if m.ndim == 3 else np.abs(m).ravel() for m in (a, b))
    k = max(1, int(round(share * pa.size)))
    return len(np.intersect1d(np.argsort(-pa)[:k], np.argsort(-pb)[:k])) / k


def measure(name: str, pattern: str, runtimes: list[str], reference_images: int) -> list[dict]:
    path = ROOT / "models" / f"{name}.onnx"
    half = half_model(path)
    x = shipped_batch(path, pattern).astype(np.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graphs = {(p, r): with_activations(rectonnx.rewrite(half, "rectgrad", precision=p,
                                                            runtime=r, layer_outputs=True))
                  for p, r in (("model", "any"), ("model", "onnxruntime-cpu"),
                               ("fp32", "onnxruntime-cpu"))}
    layers = graphs["fp32", "onnxruntime-cpu"][1]
    baseline = Runner("onnxruntime CPU").run(graphs["fp32", "onnxruntime-cpu"][0],
                                              x.astype(np.float32), np.full(len(x), -1, np.int64))
    target = baseline["logits"].argmax(1)
    base_gates = gates(baseline, layers, half=False)
    rows = []
    for runtime in runtimes:
        runner = Runner(runtime)
        slow = runtime == "onnx.reference" and name in SLOW_ON_REFERENCE
        count = min(len(x), reference_images) if slow else len(x)
        start = time.perf_counter()
        try:
            # onnxruntime's CPU provider runs the MaxUnpool graph; the others the portable one
            graph = graphs["model", "onnxruntime-cpu" if runtime == "onnxruntime CPU" else "any"]
            outputs = runner.run(graph[0], x[:count], target[:count])
        except Exception as exc:  # a runtime that cannot run the float16 graph
            rows.append({"model": name, "runtime": runtime, "images": count,
                         "error": " ".join(str(exc).split())[:160]})
            continue
        seconds = time.perf_counter() - start
        maps16, maps32 = outputs["attribution"], baseline["attribution"][:count]
        cosines = [cosine(a, b) for a, b in zip(maps16, maps32)]
        overlaps = [top_overlap(a, b) for a, b in zip(maps16, maps32)]
        kept16 = gates(outputs, layers, half=True)
        both = sum(int((kept16[l] & base_gates[l][:count]).sum()) for l in layers)
        kept = sum(int(base_gates[l][:count].sum()) for l in layers)
        agree = sum(int((kept16[l] == base_gates[l][:count]).sum()) for l in layers)
        units = sum(kept16[l].size for l in layers)
        same_class = float(np.mean(outputs["logits"].argmax(1) == target[:count]))
        rows.append({"model": name, "runtime": runtime + (f" ({runner.actual})"
                                                          if runner.actual else ""),
                     "images": count, "cos_mean": float(np.mean(cosines)),
                     "cos_min": float(np.min(cosines)), "top5": float(np.mean(overlaps)),
                     "gate_recall": both / max(kept, 1), "gate_agree": agree / max(units, 1),
                     "same_class": same_class, "seconds": seconds})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | runtime (float16 graph) | images | cosine mean (min) | top 5 % overlap "
             "| gate: fp32-kept units kept | gate: units agreeing | same class | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['runtime']} | {r['images']} | fails: "
                         f"{r['error']} | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['runtime']} | {r['images']} | {r['cos_mean']:.4f} "
                     f"({r['cos_min']:.4f}) | {r['top5']:.3f} | {r['gate_recall']:.4f} | "
                     f"{r['gate_agree']:.5f} | {r['same_class']:.2f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--reference-images", type=int, default=2,
                        help="images onnx.reference explains of EfficientNet-Lite0 (slow)")
    parser.add_argument("--runtimes", default="onnx.reference,onnxruntime CPU,openvino CPU")
    args = parser.parse_args()
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    rows = []
    for name, pattern in MODELS.items():
        rows += measure(name, pattern, runtimes, args.reference_images)
        print(f"{name}: done", file=sys.stderr)
    import onnxruntime
    try:
        import openvino
        ov_version = openvino.__version__
    except ImportError:
        ov_version = "not installed"
    text = (
        "# float16 explainers against float32 (benchmarks/fp16.py)\n\n"
        "RectGrad (q = 98, padding trick) of the shipped models converted to float16 "
        "(onnxruntime's `convert_float_to_float16`, `keep_io_types=False`): the map of the "
        "explainer that computes in float16 (`precision=\"model\"`, thresholds in float32) "
        "against the float32 map of the same float16 weights (`precision=\"fp32\"`, "
        "onnxruntime CPU), both explaining the class the float32 graph predicts. Gate: "
        "RectGrad's per-layer gates `y R > tau` recomputed from the graphs' activations and "
        "layer gradients (`layer_outputs=True`).\n\n"
        f"Machine: 2-core AMD EPYC (AVX-512), no GPU; onnxruntime {onnxruntime.__version__}, "
        f"onnx {onnx.__version__}, OpenVINO {ov_version}. OpenVINO, asked for f16, reports "
        "computing in bfloat16 on this CPU (no float16 arithmetic units). Seconds: one run of "
        "the float16 graph over the images, compilation included (a shared, loaded VM; not a "
        "speed measurement).\n\n"
        + table(rows) + "\n")
    print(table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fp16.md").write_text(text)


if __name__ == "__main__":
    main()
