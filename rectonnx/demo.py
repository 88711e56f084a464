"""``rectonnx demo``: the methods side by side on the shipped models and photos (paper Fig. 1).

Writes one PNG grid per model (rows = images, columns = methods) and prints the time per image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .batch import preprocess_for
from .images import load_batch
from .runtime import Explainer


@dataclass(frozen=True)
class Column:
    title: str
    method: str
    options: dict


COLUMNS = (
    Column("Saliency", "saliency", {}),
    Column("Grad * Input", "grad_input", {}),
    Column("Deconvnet", "deconvnet", {}),
    Column("Guided BP", "guided_backprop", {}),
    Column("Grad-CAM", "gradcam", {}),
    Column("RectGrad q=98", "rectgrad", {"q": 98.0, "padding_trick": True}),
    Column("RectGrad + PRR", "rectgrad", {"q": 98.0, "padding_trick": True, "prr": True}),
)


@dataclass(frozen=True)
class DemoCase:
    model: str         # shipped model name
    images: str        # glob in the shipped images folder
    title: str
    columns: tuple[Column, ...] = COLUMNS


CASES = (
    DemoCase("paper_cnn_digits", "digits_*.png",
             "Paper CNN on digits-on-photos (32x32), explaining the predicted class"),
    DemoCase("efficientnet_lite0", "*.jpg",
             "EfficientNet-Lite0 (ImageNet, pretrained) on real photos, predicted class",
             tuple(c for c in COLUMNS if not c.options.get("prr"))),  # no max-pool: PRR = RectGrad
)


def _label(classes, index: int, probability: float) -> str:
    name = classes[index] if classes and index < len(classes) else str(index)
    name = name.split(",")[0]
    return f"{name} ({probability:.2f})"


def run_case(case: DemoCase, out_dir: Path) -> Iterator[str]:
    from . import models  # noqa: F401  (rectonnx.models: shipped files)
    from .models import images, info, path
    from .visualize import method_grid_many

    model_file = path(case.model)
    preprocess = preprocess_for(model_file)
    batch, displays, failures = load_batch(images(case.images), preprocess)
    if not len(batch):
        raise FileNotFoundError(f"no sample images for {case.model} ({case.images})")
    classes = info(case.model).get("classes")
    maps: dict[str, np.ndarray] = {}
    result = None
    for column in case.columns:
        explainer = Explainer(model_file, column.method, **column.options)
        explainer.explain(batch[:1])  # warm-up
        started = time.perf_counter()
        result = explainer.explain(batch)
        per_image = (time.perf_counter() - started) / len(batch) * 1000
        maps[column.title] = result.attribution
        yield f"  {column.title:<16} {per_image:7.1f} ms/image"
    rows = []
    for i, display in enumerate(displays):
        label = _label(classes, int(result.target[i]), float(result.probabilities[i].max()))
        rows.append((display, {title: m[i] for title, m in maps.items()}, label))
    target = out_dir / f"{case.model}_methods.png"
    method_grid_many(rows, target, case.title)
    yield f"  wrote {target}"


def run_demo(out_dir: Path) -> Iterator[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        yield f"{case.title}:"
        yield from run_case(case, out_dir)
