"""What an explainer graph says about itself: its spec, the rectonnx version and the source model.

``rewrite`` stamps every explainer graph's ``metadata_props``:

| key | value |
|---|---|
| ``rectonnx.method`` | the method name |
| ``rectonnx.spec`` | the ``ExplanationSpec`` as JSON (``spec.to_json()``) |
| ``rectonnx.version`` | the rectonnx version that wrote it |
| ``rectonnx.source_sha256`` | sha256 of the source model (its file bytes, or its serialised proto) |
| ``rectonnx.input_name``, ``rectonnx.output_name`` | the model's input and score output used |
| ``rectonnx.upcast_from`` | ``float16`` (or ``bfloat16``) for a half-precision source model |
| ``rectonnx.computes_in`` | ``float16`` or ``float32``: a half source's (option ``precision``) |
| ``rectonnx.input_kind`` | ``pixels`` for integer pixels cast to float inside the model |

``Explainer`` and ``export-triton`` given such a file read its spec instead of rewriting, and
refuse options that contradict it; ``rectonnx info`` prints the stamp.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import onnx

from .errors import InputError
from .spec import ExplanationSpec

PREFIX = "rectonnx."


def source_fingerprint(model) -> str:
    """sha256 of a model file, bytes or proto (a retrained model gets another fingerprint)."""
    digest = hashlib.sha256()
    if isinstance(model, onnx.ModelProto):
        digest.update(model.SerializeToString())
    elif isinstance(model, (bytes, bytearray)):
        digest.update(bytes(model))
    else:
        with open(model, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def version() -> str:
    from . import __version__

    return __version__


def stamp(model: onnx.ModelProto, spec: ExplanationSpec, *, source_sha256: str,
          input_name: str, output_name: str, upcast_from: str | None = None,
          computes_in: str | None = None, input_kind: str | None = None) -> None:
    """Write the metadata of the module docstring into ``model`` (replacing older entries)."""
    values = {"method": spec.method, "spec": spec.to_json(), "version": version(),
              "source_sha256": source_sha256, "input_name": input_name,
              "output_name": output_name}
    if upcast_from:
        values["upcast_from"] = upcast_from
        values["computes_in"] = computes_in or "float32"
    if input_kind:
        values["input_kind"] = input_kind
    kept = [p for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in values.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = PREFIX + key, value


@dataclass(frozen=True)
class Stamp:
    """The metadata of an explainer graph (``spec`` is None for graphs from rectonnx < 0.2,
    which recorded only the method)."""

    method: str
    spec: ExplanationSpec | None
    version: str | None
    source_sha256: str | None
    input_name: str | None
    output_name: str | None
    upcast_from: str | None = None
    computes_in: str | None = None  # half-precision source; not recorded by older versions: float32
    input_kind: str | None = None  # "pixels": integer pixels attributed at their Cast to float

    def precision_line(self) -> str | None:
        """What a half-precision source's explainer computes in, in words (None otherwise)."""
        if not self.upcast_from:
            return None
        if self.computes_in == "float16":
            return (f"  computes in float16 as the source model ({self.upcast_from}; the "
                    "percentile thresholds in float32); precision='fp32' computes in float32")
        return (f"  computes in float32: the source model is {self.upcast_from}, its weights "
                "were upcast")

    def lines(self) -> list[str]:
        return [f"explainer graph made by rectonnx {self.version or '(unknown version)'}",
                f"  spec: {self.spec.describe() if self.spec else self.method}",
                *([f"  settings: {self.spec.to_json()}"] if self.spec else []),
                f"  source model sha256: {self.source_sha256 or '(not recorded)'}",
                f"  input {self.input_name or '?'}, scores {self.output_name or '?'}",
                *([self.precision_line()] if self.upcast_from else [])]


def read_stamp(model: onnx.ModelProto) -> Stamp | None:
    """The stamp of an explainer graph, or None for any other model."""
    values = {p.key[len(PREFIX):]: p.value for p in model.metadata_props
              if p.key.startswith(PREFIX)}
    if "method" not in values:
        return None
    spec = None
    if "spec" in values:
        try:
            spec = ExplanationSpec.from_json(values["spec"])
        except ValueError as exc:
            raise InputError(f"the explainer graph's recorded spec is not valid: {exc}") \
                from None
    return Stamp(values["method"], spec, values.get("version"), values.get("source_sha256"),
                 values.get("input_name"), values.get("output_name"), values.get("upcast_from"),
                 values.get("computes_in"), values.get("input_kind"))


def explainer_graph_in(model) -> onnx.ModelProto | None:
    """``model`` itself (loaded) when it is already an explainer graph, else None."""
    from .normalize import load_model

    proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    return proto if read_stamp(proto) is not None else None


def check_agrees(stamp: Stamp, method, options: dict, where: str) -> None:
    """Refuse ``method``/``options`` that contradict an explainer graph's recorded spec."""
    if stamp.spec is None:
        if method is not None and method != stamp.method or options:
            raise InputError(f"{where} is an explainer graph of {stamp.method} made by an older "
                             "rectonnx, which did not record its options: pass no method "
                             "options, or rewrite the source model")
        return
    if isinstance(method, ExplanationSpec):  # a spec: the options its caller set
        method, options = method.method, {**{k: method.settings()[k] for k in method.given},
                                          **options}
    conflicts = stamp.spec.conflicts(method, options)
    if conflicts:
        raise InputError(f"{where} is already an explainer graph ({stamp.spec.describe()}); "
                         f"the options asked for contradict it: {'; '.join(conflicts)}. Rewrite "
                         "the source model instead, or pass no method options")


def agreeing_explainer(model, method, options: dict) -> onnx.ModelProto | None:
    """``model`` loaded when it is already an explainer graph whose recorded spec agrees with
    ``method``/``options`` (else InputError); None when it is a model to rewrite."""
    made = explainer_graph_in(model)
    if made is not None:
        check_agrees(read_stamp(made), method, options, describe_source(model))
    return made


def describe_source(model) -> str:
    return str(Path(model)) if isinstance(model, (str, Path)) else "the model"
