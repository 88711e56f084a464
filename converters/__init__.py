"""Framework-to-ONNX export helpers (installed as ``rectonnx.converters``): ``pytorch``, ``keras``,
``jax`` and ``sklearn``. Each ``export(...)`` returns an ``onnx.ModelProto`` ready for
``rectonnx.rewrite`` (and saves it when given a path); each needs its framework's extra."""
