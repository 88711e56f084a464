"""Framework-to-ONNX export helpers (installed as ``rectonnx.converters``)."""
