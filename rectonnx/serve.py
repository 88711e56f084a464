"""Deploying the explainer graph: a Triton Inference Server model repository entry.

    export_triton("model.onnx", "repo/", "rectgrad", q=98, max_batch_size=32)

writes ``repo/<name>/<version>/model.onnx`` (the explainer graph) and ``repo/<name>/config.pbtxt``
for Triton's onnxruntime backend (``platform: "onnxruntime_onnx"``) with dynamic batching. The
config lists every graph input and output with Triton's data type and dims; with
``max_batch_size > 0`` the dims leave out the batch axis, and per-sample inputs of shape ``[N]``
(``target``) are declared ``dims: [1]`` with ``reshape: { shape: [] }``, so a client sends
``[B, 1]`` and the model sees ``[B]``. Graph inputs that have an initializer of the same name are
inputs with defaults (ONNX IR >= 4): Triton lists them ``optional: true``, so a request may leave
them out. With batching every input is batched, so such settings must be per sample (``[N]``,
the default broadcast from ``[1]``).

A model exported with a fixed batch size cannot be batched by Triton: it gets
``max_batch_size: 0`` and full dims, and the summary says so.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import TensorProto

from .artifact import agreeing_explainer, read_stamp
from .errors import RectonnxError
from .spec import ExplanationSpec, resolve

TRITON_TYPES = {
    TensorProto.BOOL: "TYPE_BOOL", TensorProto.UINT8: "TYPE_UINT8",
    TensorProto.UINT16: "TYPE_UINT16", TensorProto.UINT32: "TYPE_UINT32",
    TensorProto.UINT64: "TYPE_UINT64", TensorProto.INT8: "TYPE_INT8",
    TensorProto.INT16: "TYPE_INT16", TensorProto.INT32: "TYPE_INT32",
    TensorProto.INT64: "TYPE_INT64", TensorProto.FLOAT16: "TYPE_FP16",
    TensorProto.FLOAT: "TYPE_FP32", TensorProto.DOUBLE: "TYPE_FP64",
    TensorProto.STRING: "TYPE_STRING", TensorProto.BFLOAT16: "TYPE_BF16",
}
PLATFORM = "onnxruntime_onnx"
EXTERNAL_DATA_LIMIT = 1_800_000_000  # bytes; protobuf cannot hold a model over 2 GiB


class ExportError(RectonnxError):
    """The explainer graph cannot be written as a Triton model (or the target exists)."""


@dataclass
class TensorSpec:
    """One Triton input or output: name, data type, dims (without the batch axis if batched)."""

    name: str
    data_type: str
    dims: list[int]
    reshape: list[int] | None = None
    optional: bool = False

    def pbtxt(self) -> str:
        parts = [f'name: "{self.name}"', f"data_type: {self.data_type}",
                 f"dims: [ {', '.join(str(d) for d in self.dims)} ]"]
        if self.reshape is not None:
            shape = ", ".join(str(d) for d in self.reshape)
            parts.append(f"reshape: {{ shape: [{f' {shape} ' if shape else ' '}] }}")
        if self.optional:
            parts.append("optional: true")
        return "  {\n" + "".join(f"    {p}\n" for p in parts) + "  }"


@dataclass
class TritonConfig:
    """The parts of Triton's ModelConfig that rectonnx writes."""

    name: str
    max_batch_size: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_queue_delay_us: int = 1000
    preferred_batch_sizes: list[int] = field(default_factory=list)
    instance_kind: str = "auto"
    instance_count: int = 1
    notes: list[str] = field(default_factory=list)

    def pbtxt(self) -> str:
        lines = [f'name: "{self.name}"', f'platform: "{PLATFORM}"',
                 f"max_batch_size: {self.max_batch_size}",
                 "input [\n" + ",\n".join(t.pbtxt() for t in self.inputs) + "\n]",
                 "output [\n" + ",\n".join(t.pbtxt() for t in self.outputs) + "\n]"]
        if self.max_batch_size > 0:
            body = [f"  max_queue_delay_microseconds: {self.max_queue_delay_us}"]
            if self.preferred_batch_sizes:
                sizes = ", ".join(str(s) for s in self.preferred_batch_sizes)
                body.insert(0, f"  preferred_batch_size: [ {sizes} ]")
            lines.append("dynamic_batching {\n" + "\n".join(body) + "\n}")
        if self.instance_kind != "auto":
            kind = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}[self.instance_kind]
            lines.append(f"instance_group [\n  {{\n    count: {self.instance_count}\n"
                         f"    kind: {kind}\n  }}\n]")
        elif self.instance_count != 1:
            lines.append(f"instance_group [\n  {{\n    count: {self.instance_count}\n  }}\n]")
        return "\n".join(lines) + "\n"


def _dims(info: onnx.ValueInfoProto) -> list[int | str]:
    """Static dims as ints, symbolic or unknown ones as their name (or "")."""
    return [d.dim_value if d.HasField("dim_value") else d.dim_param
            for d in info.type.tensor_type.shape.dim]


def _data_type(info: onnx.ValueInfoProto) -> str:
    elem = info.type.tensor_type.elem_type
    if elem not in TRITON_TYPES:
        raise ExportError(f"tensor {info.name!r} has element type "
                          f"{TensorProto.DataType.Name(elem)}, which Triton has no type for")
    return TRITON_TYPES[elem]


def _triton_dim(d: int | str) -> int:
    return d if isinstance(d, int) and d > 0 else -1


def triton_config(graph: onnx.ModelProto, name: str, *, max_batch_size: int = 32,
                  max_queue_delay_us: int = 1000, preferred_batch_sizes=(),
                  instance_kind: str = "auto", instance_count: int = 1) -> TritonConfig:
    """Triton's view of an explainer graph: which tensors, their types and dims, batching."""
    if max_batch_size < 0:
        raise ValueError(f"max_batch_size must be >= 0, got {max_batch_size}")
    if instance_kind not in ("auto", "cpu", "gpu"):
        raise ValueError(f"instance_kind must be auto, cpu or gpu, got {instance_kind!r}")
    inputs = list(graph.graph.input)
    if not inputs:
        raise ExportError("the graph has no inputs")
    defaults = {t.name for t in graph.graph.initializer}
    batch = _dims(inputs[0])[0] if _dims(inputs[0]) else None
    notes = []
    if max_batch_size > 0 and isinstance(batch, int) and batch > 0:
        notes.append(f"the model has a fixed batch size of {batch}, so Triton cannot batch "
                     "requests (max_batch_size: 0); re-export it with a dynamic batch axis to "
                     "batch")
        max_batch_size = 0

    def spec(info: onnx.ValueInfoProto, optional: bool = False) -> TensorSpec:
        dims = _dims(info)
        data_type = _data_type(info)
        if max_batch_size == 0:
            return TensorSpec(info.name, data_type, [_triton_dim(d) for d in dims] or [1],
                              [] if not dims else None, optional)
        if not dims or (isinstance(dims[0], int) and dims[0] > 0):
            raise ExportError(f"tensor {info.name!r} has shape {dims}: with max_batch_size > 0 "
                              "every input and output needs a leading (dynamic) batch axis; "
                              "use max_batch_size=0")
        tail = [_triton_dim(d) for d in dims[1:]]
        if not tail:  # [N] -> Triton wants at least one dim: [1], reshaped to [] per item
            return TensorSpec(info.name, data_type, [1], [], optional)
        return TensorSpec(info.name, data_type, tail, None, optional)

    return TritonConfig(
        name=name, max_batch_size=max_batch_size,
        inputs=[spec(i, i.name in defaults) for i in inputs],
        outputs=[spec(o) for o in graph.graph.output],
        max_queue_delay_us=max_queue_delay_us,
        preferred_batch_sizes=[s for s in preferred_batch_sizes if 0 < s <= max_batch_size],
        instance_kind=instance_kind, instance_count=instance_count, notes=notes)


@dataclass
class Exported:
    model_file: Path
    config_file: Path
    config: TritonConfig

    def summary(self) -> str:
        def describe(t: TensorSpec) -> str:
            extra = " (optional)" if t.optional else ""
            return f"  {t.name}: {t.data_type[5:]} {t.dims}{extra}"

        lines = [f"model {self.config.name!r}: max_batch_size {self.config.max_batch_size}"
                 + (", dynamic batching" if self.config.max_batch_size else ""), "inputs:"]
        lines += [describe(t) for t in self.config.inputs] + ["outputs:"]
        lines += [describe(t) for t in self.config.outputs]
        lines += [f"note: {n}" for n in self.config.notes]
        return "\n".join(lines)


def model_name(model, method: str) -> str:
    stem = Path(model).stem if isinstance(model, (str, os.PathLike)) else "model"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{stem}_{method}")


def check_model_name(name: str) -> str:
    """``name`` if Triton can use it as a model directory, else a ValueError saying why."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name {name!r} is empty; give a name of letters, digits, '_', "
                         "'.', '-' (or leave --name out for the default)")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", ".."):
        raise ValueError(f"model name {name!r}: use letters, digits, '_', '.', '-' only "
                         "(no '/', spaces, '..')")
    return name


def _config_change(old: str, new: str) -> str | None:
    """None when two config.pbtxt texts are the same, else their first differing lines as
    ``old -> new``."""
    import difflib

    old_lines = [line.strip() for line in old.strip().splitlines()]
    new_lines = [line.strip() for line in new.strip().splitlines()]
    if old_lines == new_lines:
        return None
    changes = []
    matcher = difflib.SequenceMatcher(None, old_lines, new_lines, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        before, after = old_lines[i1:i2], new_lines[j1:j2]
        width = max(len(before), len(after))
        changes += [f"{before[k] if k < len(before) else '(nothing)'} -> "
                    f"{after[k] if k < len(after) else '(nothing)'}" for k in range(width)]
    return "; ".join(changes[:2]) + ("; ..." if len(changes) > 2 else "")


def write_entry(graph: onnx.ModelProto, config: TritonConfig, repo, version: int, *,
                overwrite: bool = False) -> Exported:
    """Write ``repo/<name>/<version>/model.onnx`` and ``repo/<name>/config.pbtxt``, each
    atomically (fileio). Without ``overwrite``, an existing version is refused, and so is a
    ``config.pbtxt`` that would change (every version of the model shares it); a new version
    with the same config is fine. Large graphs keep their weights in ``model.onnx.data``."""
    from .fileio import atomic_write_bytes, save_model_atomic

    directory = Path(repo) / check_model_name(config.name)
    version_dir = directory / str(version)
    model_file, config_file = version_dir / "model.onnx", directory / "config.pbtxt"
    text = config.pbtxt()
    if model_file.exists() and not overwrite:
        raise ExportError(f"{model_file} exists; pick another --version or --name, or pass "
                          "--force to replace it")
    try:
        old = config_file.read_text() if config_file.is_file() else None
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"cannot read {config_file}: {exc}") from None
    change = None if old is None else _config_change(old, text)
    if change is not None and not overwrite:
        raise ExportError(f"{config_file} exists with another configuration, shared by every "
                          f"version of {config.name!r} ({change}); pass --force to replace it, "
                          "or export under another --name")
    data_file = version_dir / "model.onnx.data"
    try:
        version_dir.mkdir(parents=True, exist_ok=True)
        external = graph.ByteSize() > EXTERNAL_DATA_LIMIT  # weights beside it, as Triton allows
        save_model_atomic(graph, model_file, external_data=external, location=data_file.name)
        if not external and data_file.exists():  # left by an earlier, larger export
            data_file.unlink()
        if old is None or change is not None:
            atomic_write_bytes(config_file, text)
    except OSError as exc:
        raise ExportError(f"cannot write the model repository under {directory}: "
                          f"{exc.strerror or exc}") from None
    return Exported(model_file, config_file, config)


def export_triton(model, repo, method: "str | ExplanationSpec | None" = None, *,
                  name: str | None = None, version: int = 1, input_name: str | None = None,
                  output_name: str | None = None, max_batch_size: int = 32,
                  max_queue_delay_us: int = 1000, preferred_batch_sizes=(),
                  instance_kind: str = "auto", instance_count: int = 1,
                  overwrite: bool = False, graph: onnx.ModelProto | None = None,
                  **options) -> Exported:
    """Rewrite ``model`` with ``method`` and its options (as ``rectonnx.rewrite``; an
    ``ExplanationSpec`` works too) and write a Triton entry. When ``model`` is already an
    explainer graph (or ``graph`` is given) it is written as it is, and options that contradict
    its recorded spec are an error. ``q_input=True``: RectGrad's percentile becomes an optional
    per-request input ``q`` (FP64, default ``q``), so one deployed model serves every
    percentile."""
    from .rewrite import rewrite

    if version < 1:
        raise ValueError(f"the version must be >= 1, got {version}")
    if name is not None:
        check_model_name(name)  # before the rewrite
    if graph is None:
        graph = agreeing_explainer(model, method, options)
    if graph is None:
        spec = resolve(method, **options)
        graph = rewrite(model, spec, input_name=input_name, output_name=output_name)
    made = read_stamp(graph)
    name = model_name(model, made.method if made else "explainer") if name is None else name
    check_model_name(name)
    config = triton_config(graph, name, max_batch_size=max_batch_size,
                           max_queue_delay_us=max_queue_delay_us,
                           preferred_batch_sizes=preferred_batch_sizes,
                           instance_kind=instance_kind, instance_count=instance_count)
    return write_entry(graph, config, repo, version, overwrite=overwrite)


# -- other runtimes ------------------------------------------------------------------------------
def portable(graph: onnx.ModelProto) -> onnx.ModelProto:
    """The same explainer graph with every all-constant subgraph evaluated once (a copy).

    Equal results everywhere (inputs with defaults stay inputs); needed by OpenVINO 2026.4,
    whose CPU plugin cannot compile a Pooling node with a constant input (the AveragePool
    backward's ``AveragePool(ones)``).
    For OpenVINO also compile with ``{"INFERENCE_PRECISION_HINT": "f32"}``: its default on CPUs
    with bfloat16 units is bf16, which changes attributions by about 10 %.
    """
    import copy

    from .normalize import fold_constants

    folded = copy.deepcopy(graph)
    inputs = {i.name for i in folded.graph.input}
    defaults = [t for t in folded.graph.initializer if t.name in inputs]  # stay inputs
    kept = [t for t in folded.graph.initializer if t.name not in inputs]
    del folded.graph.initializer[:]
    folded.graph.initializer.extend(kept)
    fold_constants(folded)
    folded.graph.initializer.extend(defaults)
    return folded


# -- Triton's schema ---------------------------------------------------------------------------
def model_config_schema():
    """Triton's ``model_config_pb2`` module from the ``tritonclient`` package, or None.

    It lives in ``tritonclient/grpc/``, whose package ``__init__`` needs the grpc extra; the
    generated module itself needs only protobuf, so it is loaded from its file.
    """
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        return None
    import sys

    module_name = "rectonnx_triton_model_config_pb2"
    if module_name in sys.modules:
        return sys.modules[module_name]
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(module)
    sys.modules[module_name] = module
    return module


def parse_config(text: str):
    """Parse ``config.pbtxt`` text into Triton's ``ModelConfig`` (needs ``tritonclient``; without
    it a MissingDependencyError, an ImportError, names the ``serve`` extra)."""
    from google.protobuf import text_format

    from .errors import MissingDependencyError

    schema = model_config_schema()
    if schema is None:
        raise MissingDependencyError("Triton's model config schema needs tritonclient: "
                                     "pip install 'rectonnx[serve]'")
    return text_format.Parse(text, schema.ModelConfig())


def validate_config(text: str):
    """Check ``config.pbtxt`` text against Triton's own ``ModelConfig`` schema and return the
    parsed config; ExportError with the parse error when it does not follow the schema
    (MissingDependencyError without ``tritonclient``: ``model_config_schema()`` is None)."""
    from google.protobuf import text_format

    try:
        return parse_config(text)
    except text_format.ParseError as exc:
        raise ExportError(f"config.pbtxt does not follow Triton's model config schema: "
                          f"{' '.join(str(exc).split())}") from None
