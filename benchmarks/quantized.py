"""QDQ int8 models: the explainer of a model quantized by onnxruntime against the float model's.

    python benchmarks/quantized.py [--out DIR]

Quantizes the shipped models with ``onnxruntime.quantization.quantize_static`` (QDQ format, int8
activations, per-channel int8 weights, calibrated on the shipped images), rewrites both the float and the
quantized model with saliency, guided backprop and RectGrad (q = 98, padding trick), runs them
on the shipped images in onnxruntime and prints, per method: how often the two predict the same
class, and, both explaining the float model's predicted class, the cosine similarity of the two
maps per image (median and minimum) and the overlap of their top 5 % pixels. Writes ``quantized.md`` and ``quantized.json``.
The quantized explainer's backward is the straight-through estimator clipped to the
representable range (rectonnx/rules/quantize.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import rectonnx  # noqa: E402
from rectonnx.batch import preprocess_for  # noqa: E402
from rectonnx.images import load_image  # noqa: E402

MODELS = {"paper_cnn_digits": "digits_*.png", "efficientnet_lite0": "*.jpg"}
METHODS = ("saliency", "guided_backprop", "rectgrad")


def shipped_batch(model: Path, pattern: str) -> np.ndarray:
    preprocess = preprocess_for(model)
    files = sorted((ROOT / "models" / "images").glob(pattern))
    return np.stack([load_image(path, preprocess)[0] for path in files])


def quantize(model: Path, batch: np.ndarray, target: Path, fmt: str = "QDQ") -> Path:
    """``quantize_static`` into ``target`` in format ``fmt`` ("QDQ" or "QOperator"; int8,
    per-channel weights), calibrated on ``batch`` one image at a time."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    name = onnx.load(str(model)).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{name: batch[i:i + 1]} for i in range(len(batch))])

        def get_next(self):
            return next(self.feeds, None)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(str(model), str(target), Reader(), quant_format=QuantFormat[fmt],
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        per_channel=True)
    return target


def run(graph, batch: np.ndarray, target=None) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    target = np.full(len(batch), -1, np.int64) if target is None else target
    logits, attribution = session.run(["logits", "attribution"], {
        session.get_inputs()[0].name: batch, "target": target})
    return logits, attribution


def top_overlap(a: np.ndarray, b: np.ndarray, share: float = 0.05) -> float:
    k = max(1, int(round(share * a.size)))
    top_a = set(np.argsort(a.ravel())[-k:])
    top_b = set(np.argsort(b.ravel())[-k:])
    return len(top_a & top_b) / k


def compare(model: Path, pattern: str, out: Path) -> list[dict]:
    batch = shipped_batch(model, pattern)
    quantized = quantize(model, batch, out / f"{model.stem}_qdq.onnx")
    rows = []
    for method in METHODS:
        float_logits, float_maps = run(rectonnx.rewrite(model, method), batch)
        # both explain the float model's predicted class
        int8_logits, int8_maps = run(rectonnx.rewrite(quantized, method), batch,
                                     float_logits.argmax(1).astype(np.int64))
        cosines = [float(a.ravel() @ b.ravel() / max(np.linalg.norm(a) * np.linalg.norm(b),
                                                     1e-30))
                   for a, b in zip(int8_maps, float_maps)]
        overlaps = [top_overlap(a, b) for a, b in zip(int8_maps, float_maps)]
        rows.append({"model": model.stem, "method": method, "images": len(batch),
                     "same_prediction": float(np.mean(float_logits.argmax(1) ==
                                                      int8_logits.argmax(1))),
                     "cosine_median": float(np.median(cosines)),
                     "cosine_min": float(np.min(cosines)),
                     "top5_overlap_median": float(np.median(overlaps))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, pattern in MODELS.items():
            rows += compare(ROOT / "models" / f"{name}.onnx", pattern, Path(tmp))
    lines = ["| model | method | images | same prediction | cosine median (min) | "
             "top-5 % overlap median |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['method']} | {r['images']} | {r['same_prediction']:.2f} | "
              f"{r['cosine_median']:.3f} ({r['cosine_min']:.3f}) | "
              f"{r['top5_overlap_median']:.2f} |" for r in rows]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quantized.md").write_text("# QDQ int8 explainers vs float (benchmarks/quantized.py)"
                                      "\n\n" + text + "\n")
    (out / "quantized.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
