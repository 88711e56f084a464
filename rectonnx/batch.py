"""Explaining image files: preprocessing settings, batches of files in, maps and pictures out.

For each image ``<stem>`` the output directory gets ``<stem>.npy`` (the attribution, the model
input's shape without the batch axis), ``<stem>.png`` (heatmap, SPEC.md section 3) and
``<stem>_overlay.png``, and one line in ``manifest.jsonl`` (input, target, predicted class,
score, files). Unreadable images are skipped and reported; the run goes on.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .images import Preprocess, iter_image_paths, load_batch
from .runtime import Explainer

PRESETS = {
    "imagenet": dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "minus1to1": dict(mean=(0.5,), std=(0.5,)),
    "unit": dict(mean=(0.0,), std=(1.0,)),
}


def sidecar(model) -> dict:
    """The JSON next to a model file (``model.onnx`` -> ``model.json``), or {}."""
    if not isinstance(model, (str, Path)):
        return {}
    path = Path(model).with_suffix(".json")
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None


def preprocess_for(model, *, size=None, resize=None, mean=None, std=None,
                   preset=None) -> Preprocess:
    """Preprocessing from the model's sidecar JSON, then a preset, then explicit options."""
    settings = dict(sidecar(model).get("preprocess", {}))
    if preset:
        settings.update(PRESETS[preset])
    if size is not None:
        settings["size"] = size
    if resize is not None:
        settings["resize"] = resize
    if mean is not None:
        settings["mean"] = _floats(mean)
    if std is not None:
        settings["std"] = _floats(std)
    return Preprocess.from_dict(settings)


@dataclass
class Summary:
    out_dir: Path
    explained: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def text(self) -> str:
        rate = self.explained / self.seconds if self.seconds else 0.0
        lines = [f"explained {self.explained} image(s) in {self.seconds:.1f} s "
                 f"({rate:.1f} images/s); outputs in {self.out_dir}"]
        if self.failures:
            lines.append(f"skipped {len(self.failures)} unreadable file(s):")
            lines += [f"  {message}" for _, message in self.failures[:20]]
        return "\n".join(lines)


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, n = path.stem, 1
    while stem in used:
        n += 1
        stem = f"{path.stem}_{n}"
    used.add(stem)
    return stem


def explain_images(model, sources, out_dir, *, preprocess: Preprocess, method="rectgrad",
                   q=98.0, tau=None, padding_trick=False, prr=False, input_name=None,
                   output_name=None, target=-1, batch_size=16, write_png=True,
                   write_overlay=True, progress=True) -> Summary:
    from tqdm import tqdm

    from .visualize import heatmap_rgb, overlay_rgb, save_png

    paths = iter_image_paths(sources)
    explainer = Explainer(model, method, q=q, tau=tau, padding_trick=padding_trick, prr=prr,
                          input_name=input_name, output_name=output_name, batch_size=batch_size)
    if preprocess.size is None and len(explainer.input_shape) == 4:
        spatial = explainer.input_shape[2:] if preprocess.layout == "NCHW" else \
            explainer.input_shape[1:3]
        if all(spatial):
            preprocess = Preprocess.from_dict({**preprocess.to_dict(), "size": list(spatial)})
    classes = sidecar(model).get("classes")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = Summary(out)
    used: set[str] = set()
    started = time.perf_counter()
    with open(out / "manifest.jsonl", "a") as manifest, \
            tqdm(total=len(paths), unit="img", desc=f"{method}", disable=not progress) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            batch, displays, failures = load_batch(chunk, preprocess)
            summary.failures += failures
            if len(batch):
                result = explainer.explain(batch, target)
                loaded = [p for p in chunk if str(p) not in {f for f, _ in failures}]
                for i, path in enumerate(loaded):
                    stem = _unique_stem(Path(path), used)
                    files = {"attribution": f"{stem}.npy"}
                    np.save(out / files["attribution"], result.attribution[i])
                    sample = result.attribution[i]
                    channel_axis = "CHW" if preprocess.layout == "NCHW" else "HWC"
                    if write_png:
                        files["heatmap"] = f"{stem}.png"
                        save_png(out / files["heatmap"], heatmap_rgb(sample, layout=channel_axis))
                    if write_overlay:
                        files["overlay"] = f"{stem}_overlay.png"
                        save_png(out / files["overlay"],
                                 overlay_rgb(displays[i], sample, layout=channel_axis))
                    predicted = int(result.predicted[i])
                    record = {"input": str(path), "target": int(result.target[i]),
                              "predicted": predicted,
                              "score": float(result.logits[i, result.target[i]]),
                              "probability": float(result.probabilities[i, result.target[i]]),
                              "method": method, "files": files}
                    if classes:
                        record["target_name"] = classes[int(result.target[i])]
                    manifest.write(json.dumps(record) + "\n")
                    summary.explained += 1
            bar.update(len(chunk))
    summary.seconds = time.perf_counter() - started
    return summary
