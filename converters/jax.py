"""JAX / Flax -> ONNX for ``rectonnx.rewrite``: jax2onnx, dynamic batch.

    from rectonnx.converters.jax import export
    export(model, (32, 32, 3), "model.onnx")        # a flax.nnx.Module, NHWC as Flax has it
    export(lambda x: net.apply(variables, x, train=False), (32, 32, 3), "model.onnx")  # Linen

``function`` is any JAX callable from one float32 batch ``[N, *input_shape]`` to the class
scores ``[N, C]``; it is traced by ``jax2onnx.to_onnx`` with a symbolic batch axis ``N``. A
``flax.nnx.Module`` is exported from a clone in eval mode (BatchNorm uses running averages,
Dropout is off); a Linen model's ``apply`` must be given its eval flags by the caller. The input
keeps the function's own layout (NHWC for Flax convolutions) and so does the attribution.
jax2onnx 0.17 patches Flax's pooling functions with keyword-only versions while it traces: write
``nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))``, not ``max_pool(x, (2, 2), ...)``.

Install: ``pip install 'rectonnx[jax]'`` and then ``pip install --no-deps jax2onnx==0.17.1``:
jax2onnx declares a dependency on the CPU build of ``onnxruntime``, which would overwrite the
files of rectonnx's ``onnxruntime-gpu`` (same package directory); the ``jax`` extra lists
everything else that jax2onnx imports.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from ._common import finish, require

DEFAULT_OPSET = 17
INSTALL = "pip install 'rectonnx[jax]' && pip install --no-deps jax2onnx==0.17.1"


def export(function, input_shape: tuple[int, ...], path: str | Path | None = None, *,
           input_name: str = "input", output_name: str = "logits",
           opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Export ``function`` (a Flax NNX module or a JAX callable) for inputs of one sample's
    shape ``input_shape`` and return the ONNX model; save it if ``path``."""
    jax2onnx = require("jax2onnx", "jax", "rectonnx.converters.jax", INSTALL)
    nnx = require("flax.nnx", "jax", "rectonnx.converters.jax", INSTALL)
    if not callable(function):
        raise TypeError(f"expected a flax.nnx.Module or a JAX function, got "
                        f"{type(function).__name__}")
    if isinstance(function, nnx.Module):
        function = nnx.clone(function)
        function.eval()
    serde = logging.getLogger("onnx_ir.serde")  # "value type ... not known": shape constants'
    level = serde.level                          # value_info left out, harmless
    serde.setLevel(logging.ERROR)
    try:
        proto = jax2onnx.to_onnx(function, [("N", *input_shape)], opset=opset,
                                 input_names=[input_name], output_names=[output_name])
    finally:
        serde.setLevel(level)
    return finish(proto, path)
