"""Grad-CAM's explainer graph against plain onnxruntime inference on EfficientNet-Lite0 (CPU).

    python benchmarks/cam_speed.py [THREADS]      # THREADS: intra-op threads (0: onnxruntime's)

Sessions have ``session.intra_op.allow_spinning = 0``. For batch 1 and 8 the model, its
``gradcam`` graph and its ``saliency`` graph (the full backward, for scale) run in interleaved
blocks (0.5 s pause before each, two warm-up runs, then 20 or 8 timed runs); the median of the
block medians is reported with their range. Grad-CAM's backward stops at the default layer,
so it adds only the head's backward, one ReduceMean/ReduceSum and the Resize to the input.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import rectonnx

MODEL = Path(__file__).resolve().parents[1] / "models" / "efficientnet_lite0.onnx"


def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 4
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def main(threads: int = 0, blocks: int = 9) -> None:
    plain = session(onnx.load(str(MODEL)), threads)
    data = plain.get_inputs()[0].name
    graphs = {m: session(rectonnx.rewrite(MODEL, m), threads) for m in ("gradcam", "saliency")}
    rng = np.random.default_rng(0)
    for n in (1, 8):
        x = rng.random((n, 3, 224, 224), dtype=np.float32) * 2 - 1
        target = -np.ones(n, np.int64)
        runs = {"inference": lambda: plain.run(None, {data: x})}
        for method, s in graphs.items():
            runs[method] = lambda s=s: s.run(None, {data: x, "target": target})
        medians: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(blocks):
            for name, run in runs.items():
                time.sleep(0.5)
                run()
                run()
                times = []
                for _ in range(20 if n == 1 else 8):
                    start = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - start)
                medians[name].append(statistics.median(times))
        base = statistics.median(medians["inference"])
        for name, values in medians.items():
            median = statistics.median(values)
            print(f"batch {n}  {name:10s} {median * 1e3:8.2f} ms  (blocks {min(values) * 1e3:.2f}"
                  f"..{max(values) * 1e3:.2f})  x{median / base:.2f} of inference", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
