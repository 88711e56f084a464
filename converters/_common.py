"""What every converter shares: importing the framework with an error that says what to install
(``rectonnx.errors.require``), naming the batch axis, and checking and saving the result."""

from __future__ import annotations

from pathlib import Path

import onnx

from ..errors import require  # noqa: F401  (the converters import it from here)


def name_batch_axis(model: onnx.ModelProto, name: str = "N") -> None:
    """Give the first axis of every graph input and output the one symbolic name ``name``."""
    for info in [*model.graph.input, *model.graph.output]:
        dims = info.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = name


def finish(model: onnx.ModelProto, path: str | Path | None) -> onnx.ModelProto:
    """Check ``model`` with ``onnx.checker``, save it to ``path`` if given, and return it."""
    onnx.checker.check_model(model)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(path))
    return model
