"""Shipped models, sample images and the scripts that made them (installed as ``rectonnx.models``).

``path(name)`` gives a shipped model file, ``info(name)`` its sidecar JSON (preprocessing,
classes, accuracy), ``images(pattern)`` the shipped sample images.
"""

from __future__ import annotations

import json
from pathlib import Path

DIRECTORY = Path(__file__).resolve().parent
PAPER_CNN = "paper_cnn_digits"
EFFICIENTNET_LITE0 = "efficientnet_lite0"


def path(name: str) -> Path:
    """The ``.onnx`` file of a shipped model (``paper_cnn_digits``, ``efficientnet_lite0``)."""
    file = DIRECTORY / f"{name}.onnx"
    if not file.is_file():
        shipped = sorted(p.stem for p in DIRECTORY.glob("*.onnx"))
        raise FileNotFoundError(f"no shipped model {name!r}; shipped: {', '.join(shipped)}")
    return file


def info(name: str) -> dict:
    file = DIRECTORY / f"{name}.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def images(pattern: str = "*") -> list[Path]:
    return sorted(p for p in (DIRECTORY / "images").glob(pattern)
                  if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
