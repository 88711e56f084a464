"""Shipped models, sample images and the scripts that made them (installed as ``rectonnx.models``)."""
