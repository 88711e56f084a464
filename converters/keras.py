"""Keras 3 (TensorFlow backend) -> ONNX for ``rectonnx.rewrite``: tf2onnx, dynamic batch.

    from rectonnx.converters.keras import export
    export(model, "model.onnx")                          # a Sequential/functional keras.Model
    export(model, "model.onnx", input_shape=(32, 32, 3))  # a subclassed model: shape without N

The model is traced as ``tf.function(lambda x: model(x, training=False))`` (BatchNorm uses its
moving statistics, Dropout is off) and converted by ``tf2onnx.convert.from_function``:
``tf2onnx.convert.from_keras`` does not work with Keras 3 (it looks up Keras 2 tensor names). The
input keeps Keras' own layout: for ``channels_last`` images it is NHWC, tf2onnx puts the
Transposes to NCHW inside the graph, and so the attribution comes back NHWC too. Needs
TensorFlow, Keras 3 and tf2onnx (the ``keras`` extra: ``pip install 'rectonnx[keras]'``).
"""

from __future__ import annotations

from pathlib import Path

import onnx

from ._common import finish, name_batch_axis, require

DEFAULT_OPSET = 17
WHAT = "rectonnx.converters.keras"


def export(model, path: str | Path | None = None, *, input_shape: tuple[int, ...] | None = None,
           input_name: str = "input", output_name: str = "logits",
           opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Export ``model`` (a ``keras.Model``) and return the ONNX model; save it if ``path``.

    ``input_shape`` is the shape of one sample (no batch axis); by default the model's own
    input shape. The batch axis of the ONNX model is symbolic (``N``).
    """
    keras = require("keras", "keras", WHAT)
    tf = require("tensorflow", "keras", WHAT)
    tf2onnx = require("tf2onnx", "keras", WHAT)
    if not isinstance(model, keras.Model):
        raise TypeError(f"expected a keras.Model, got {type(model).__name__}")
    if keras.backend.backend() != "tensorflow":
        raise ValueError(f"Keras runs on the {keras.backend.backend()!r} backend; tf2onnx needs "
                         "TensorFlow: set KERAS_BACKEND=tensorflow before importing keras")
    if input_shape is None:
        inputs = getattr(model, "inputs", None) or []
        if len(inputs) != 1:
            raise ValueError("the model has no single known input (a subclassed model?): "
                             "pass input_shape=(H, W, C), the shape of one sample")
        input_shape = tuple(inputs[0].shape[1:])
    spec = tf.TensorSpec([None, *input_shape], tf.float32, name=input_name)
    function = tf.function(lambda x: {output_name: model(x, training=False)})
    proto, _ = tf2onnx.convert.from_function(function, input_signature=[spec], opset=opset)
    name_batch_axis(proto)
    return finish(proto, path)
