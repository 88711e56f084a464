"""PyTorch -> ONNX for ``rectonnx.rewrite``: the legacy TorchScript exporter, dynamic batch.

    from rectonnx.converters.pytorch import export
    export(model, torch.randn(1, 3, 224, 224), "model.onnx")

The module is put in eval mode (BatchNorm uses running statistics, Dropout is off), the batch
axis is symbolic, and the file is checked by ``onnx.checker``. Needs ``torch`` (the ``torch``
extra); rectonnx itself does not.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import onnx

from ._common import finish, require

DEFAULT_OPSET = 17


def export(model, example_input, path: str | Path | None = None, *, input_name: str = "input",
           output_name: str = "logits", opset: int = DEFAULT_OPSET,
           dynamic_batch: bool = True) -> onnx.ModelProto:
    """Export ``model`` (a ``torch.nn.Module``) and return the ONNX model; save it if ``path``."""
    torch = require("torch", "torch", "rectonnx.converters.pytorch")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    buffer = io.BytesIO()
    axes = {input_name: {0: "N"}, output_name: {0: "N"}} if dynamic_batch else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
            torch.onnx.export(model, (example_input,), buffer, dynamo=False, opset_version=opset,
                              input_names=[input_name], output_names=[output_name],
                              dynamic_axes=axes, do_constant_folding=True)
    finally:
        model.train(was_training)
    return finish(onnx.load_from_string(buffer.getvalue()), path)
