"""The errors rectonnx raises: each says what is wrong, where, and what the user can do."""

from __future__ import annotations


class RectonnxError(Exception):
    """Base class of every error rectonnx raises on purpose."""


class InvalidModelError(RectonnxError, ValueError):
    """The file or object given is not a usable ONNX classifier (unreadable, corrupt, wrong shape)."""


class UnsupportedModelError(RectonnxError, ValueError):
    """Ops on the path from the input to the logits have no backward rule.

    ``unsupported`` holds ``(op_type, node_name)`` for every such node, so one message names them all.
    """

    def __init__(self, message: str, unsupported: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.unsupported = list(unsupported or [])


class InputError(RectonnxError, ValueError):
    """A batch or target given to an explainer does not fit the model (shape, dtype, class range)."""


class ExecutionError(RectonnxError, RuntimeError):
    """onnxruntime could not load or run a graph; the message says where and what to try."""


class MissingDependencyError(RectonnxError, ImportError):
    """An optional package is not installed; the message names the extra that installs it."""


def require(module: str, extra: str, what: str, install: str | None = None):
    """``import module`` and return it, or raise MissingDependencyError naming the extra:
    ``<what> needs <module>: pip install 'rectonnx[<extra>]'`` (``install``: another command,
    for packages an extra cannot install)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        command = install or f"pip install 'rectonnx[{extra}]'"
        inner = getattr(exc, "name", None)
        broken = f" (it cannot import {inner})" if inner and \
            inner.split(".")[0] != module.split(".")[0] else ""
        raise MissingDependencyError(f"{what} needs {module}{broken}: {command}") from None
