"""``Explainer``: an onnxruntime session of an explainer graph, with input checks and chunking.

    explainer = Explainer("model.onnx", "rectgrad", q=98, memory_budget_mb=2000)
    result = explainer.explain(batch, target=None)   # Explanation(attribution, logits, target)

Batches larger than ``batch_size`` run in chunks so memory stays bounded; ``memory_budget_mb``
lowers the chunk so that the estimated activation memory of one run fits
(``activation_bytes_per_sample``). Targets are checked against the number of classes; a
negative target means "the predicted class". A batch that fits one chunk returns onnxruntime's
own output arrays; chunks write their outputs straight into the result arrays through
onnxruntime's IO binding (no per-chunk copies, no concatenation).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import warnings
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx

from .artifact import agreeing_explainer, read_stamp
from .errors import ExecutionError, InputError, InvalidModelError
from .graphs import light_copy, prune
from .rewrite import ATTRIBUTION, LOGITS, Q, TARGET, rewrite
from .spec import ExplanationSpec, resolve


@dataclass(frozen=True)
class Explanation:
    """Per-sample attribution maps and scores of one ``explain`` call."""

    attribution: np.ndarray  # the input's shape
    logits: np.ndarray       # [N, C], before any softmax
    target: np.ndarray       # [N], the class each map explains
    layers: dict = field(default_factory=dict)  # activation node -> map (layer_outputs=True)

    @property
    def predicted(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    @property
    def probabilities(self) -> np.ndarray:
        shifted = self.logits - self.logits.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        return exp / exp.sum(axis=1, keepdims=True)


@functools.lru_cache(maxsize=1)
def cuda_usable() -> bool:
    """True when onnxruntime's CUDA provider library and the CUDA/cuDNN libraries it needs load.

    Checked with ctypes first, so a CPU-only machine with onnxruntime-gpu installed does not
    print onnxruntime's "failed to load libcublasLt" error on every session. CUDA and cuDNN
    installed as Python packages (``nvidia-*`` wheels, as with ``onnxruntime-gpu[cuda,cudnn]``)
    are not on the loader's path: then onnxruntime's ``preload_dlls`` loads them (its messages
    silenced) and the check runs again.
    """
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    library = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if not library.is_file():  # Windows or an unusual layout: let onnxruntime decide
        return True
    if _loads(library):
        return True
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime >= 1.21
    if preload is None:
        return False
    try:
        with _quiet():
            preload()
    except Exception:  # noqa: BLE001 - any failure to preload means "no CUDA here"
        return False
    return _loads(library)


def _loads(library: Path) -> bool:
    try:
        ctypes.CDLL(str(library))
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _quiet():
    """Silence Python-level prints and warnings (onnxruntime's preload reports each miss)."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), \
            contextlib.redirect_stderr(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def default_providers() -> list[str]:
    """CUDA first when it can run here (onnxruntime falls back to CPU per node), then CPU."""
    return (["CUDAExecutionProvider"] if cuda_usable() else []) + ["CPUExecutionProvider"]


def make_session(model: onnx.ModelProto, providers: Sequence[str] | None = None,
                 threads: int | None = None, *, lean_memory: bool = False,
                 spinning: bool | None = None):
    """An onnxruntime session of ``model``.

    ``lean_memory``: no memory-pattern pre-allocation, whose buffers add up to about twice the
    live activations in onnxruntime 1.31 (measured with ResNet-50 at batch 16: peak RSS 1.4 GB
    instead of 2.0 GB). ``spinning=False``: worker threads sleep right after a run instead of
    spinning for a while, which matters when other compute (PyTorch, a server) shares the CPU.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    # warnings about CPU fallback of shape ops are noise, and a failing node's error comes back
    # as the exception that Explainer turns into one message: log only fatal errors
    options.log_severity_level = 4
    if threads:
        options.intra_op_num_threads = threads
    if lean_memory:
        options.enable_mem_pattern = False
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning",
                                         "1" if spinning else "0")
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=list(providers or default_providers()))


# -- memory -------------------------------------------------------------------------------------
ELEMENT_BYTES = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.DOUBLE: 8,
                 onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2,
                 onnx.TensorProto.INT64: 8, onnx.TensorProto.INT32: 4,
                 onnx.TensorProto.BOOL: 1, onnx.TensorProto.UINT8: 1, onnx.TensorProto.INT8: 1}
ALLOCATOR_OVERHEAD = 1.3  # measured peak RSS growth / this estimate: 1.1 (ResNet-50, batch 16)


def activation_bytes_per_sample(graph: onnx.ModelProto) -> int:
    """Estimated peak activation memory of one sample of the explainer graph, in bytes.

    Shapes come from onnx shape inference (with data propagation, so Reshape targets computed
    in the graph resolve; large initializers are passed as typed inputs, so this stays fast).
    The nodes then run in order and a tensor with a batch axis is freed after its last consumer,
    as onnxruntime's sequential executor does: the largest total alive at once, per sample,
    times ``ALLOCATOR_OVERHEAD``. The weights, shared by every sample, are not counted.
    """
    light, _ = light_copy(graph)
    del light.graph.value_info[:]  # inferred afresh
    inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    data_input = next(i for i in graph.graph.input if i.name != TARGET)
    batch = data_input.type.tensor_type.shape.dim[0]
    per_sample: dict[str, int] = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor = info.type.tensor_type
        dims = tensor.shape.dim
        if not dims or dims[0] != batch:
            continue
        tail = [d.dim_value if d.HasField("dim_value") else 0 for d in dims[1:]]
        per_sample[info.name] = int(np.prod(tail)) * ELEMENT_BYTES.get(tensor.elem_type, 4)
    nodes = graph.graph.node
    last_use = {name: i for i, node in enumerate(nodes) for name in node.input}
    kept = {o.name for o in graph.graph.output}
    alive = per_sample.get(data_input.name, 0)
    peak = alive
    for i, node in enumerate(nodes):
        alive += sum(per_sample.get(name, 0) for name in node.output)
        peak = max(peak, alive)
        alive -= sum(per_sample.get(name, 0) for name in set(node.input)
                     if last_use.get(name) == i and name not in kept)
    return max(1, int(peak * ALLOCATOR_OVERHEAD))


def chunk_size_for_budget(bytes_per_sample: int, memory_budget_mb: float) -> int:
    """The most samples per run whose estimated activations fit in the budget (at least 1)."""
    if not memory_budget_mb > 0:
        raise ValueError(f"memory_budget_mb must be positive, got {memory_budget_mb}")
    return max(1, int(memory_budget_mb * 2 ** 20 // bytes_per_sample))


def check_batch_size(batch_size) -> int:
    """``batch_size`` as an int >= 1, or a ValueError naming it."""
    if isinstance(batch_size, (bool, np.bool_)) or not isinstance(batch_size, (int, np.integer)):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r} "
                         f"({type(batch_size).__name__})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size}")
    return int(batch_size)


def check_memory_budget(memory_budget_mb) -> float | None:
    """``memory_budget_mb`` as a finite float > 0 (or None), or a ValueError naming it."""
    if memory_budget_mb is None:
        return None
    if isinstance(memory_budget_mb, (bool, np.bool_)) or \
            not isinstance(memory_budget_mb, (int, float, np.integer, np.floating)):
        raise ValueError(f"memory_budget_mb must be a number of MB > 0, got "
                         f"{memory_budget_mb!r} ({type(memory_budget_mb).__name__})")
    if not (np.isfinite(memory_budget_mb) and memory_budget_mb > 0):
        raise ValueError(f"memory_budget_mb must be finite and > 0, got {memory_budget_mb}")
    return float(memory_budget_mb)


@functools.lru_cache(maxsize=1)
def onnxruntime_errors() -> tuple[type, ...]:
    """The exception classes of onnxruntime's C++ core (Fail, InvalidArgument,
    RuntimeException, ...), which derive from Exception only."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(value for value in vars(state).values()
                 if isinstance(value, type) and issubclass(value, Exception))


def onnxruntime_reason(exc: BaseException) -> str:
    """The useful part of an onnxruntime error: the failing node and its status message,
    without the C++ source location."""
    import re

    text = " ".join(str(exc).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"\S+\.(?:h|cc|cpp):\d+ [\w:~<>]+\([^()]*\) ", "", text)
    match = re.search(r"running (\w+) node\. Name:'([^']*)' Status Message: ?(.*)", text)
    if match:
        op, name, status = match.groups()
        text = f"{op} node {name!r}" + (f": {status}" if status.strip() else " failed")
    return text[:400] + (" ..." if len(text) > 400 else "")


def _forward_only(graph: onnx.ModelProto) -> onnx.ModelProto:
    """The explainer graph cut down to what ``logits`` needs: the model's own forward pass."""
    kept = prune(graph.graph.node, [LOGITS])
    needed = {LOGITS} | {i for node in kept for i in node.input if i}
    logits = next(o for o in graph.graph.output if o.name == LOGITS)
    inputs = [i for i in graph.graph.input if i.name in needed]
    initializers = [t for t in graph.graph.initializer if t.name in needed]
    forward = onnx.helper.make_graph(kept, "forward", inputs, [logits], initializers)
    return onnx.helper.make_model(forward, opset_imports=list(graph.opset_import),
                                  ir_version=graph.ir_version)


class Explainer:
    """Rewrites ``model`` once and runs the explainer graph on numpy batches."""

    def __init__(self, model, method: "str | ExplanationSpec | None" = None, *,
                 providers: Sequence[str] | None = None, batch_size: int = 32,
                 input_name: str | None = None, output_name: str | None = None,
                 threads: int | None = None, memory_budget_mb: float | None = None,
                 io_binding: bool = True, spinning: bool | None = None, **options):
        """``method`` and ``options``: a method name (default rectgrad) and its options, or an
        ``ExplanationSpec`` (see ``rectonnx.rewrite``); ``self.spec`` is what was built.
        ``model`` may be an explainer graph made before (``rectonnx rewrite``): it then runs as
        it is, and method options that contradict its recorded spec are an error.
        ``memory_budget_mb``: cap the samples per run so the estimated activation memory fits
        (and run onnxruntime without memory patterns). ``io_binding``: write chunked outputs
        straight into the result arrays. ``spinning=False``: onnxruntime's threads sleep after
        each run (when other compute shares the CPU). On the CPU provider alone the graph may
        use ops tuned for it (``runtime="onnxruntime-cpu"``, the same attribution) unless
        ``runtime`` is given; with any other provider it is the portable graph."""
        providers = list(providers or default_providers())
        graph = agreeing_explainer(model, method, options)
        if graph is None:
            spec = resolve(method, **options)
            if providers == ["CPUExecutionProvider"] and "runtime" not in spec.given:
                spec = spec.replace(runtime="onnxruntime-cpu")
            graph = rewrite(model, spec, input_name=input_name, output_name=output_name)
        self._setup(graph, providers=providers, batch_size=batch_size, threads=threads,
                    memory_budget_mb=memory_budget_mb, io_binding=io_binding, spinning=spinning)

    @classmethod
    def from_graph(cls, graph, *, providers: Sequence[str] | None = None, batch_size: int = 32,
                   threads: int | None = None, memory_budget_mb: float | None = None,
                   io_binding: bool = True, spinning: bool | None = None) -> "Explainer":
        """An Explainer of an explainer graph made before (``rectonnx.rewrite`` or ``rectonnx
        rewrite``): a ``ModelProto`` or a path; no rewrite happens."""
        if not isinstance(graph, onnx.ModelProto):
            graph = onnx.load(str(graph))
        made = cls.__new__(cls)
        made._setup(graph, providers=providers, batch_size=batch_size, threads=threads,
                    memory_budget_mb=memory_budget_mb, io_binding=io_binding, spinning=spinning)
        return made

    def _setup(self, graph: onnx.ModelProto, *, providers, batch_size: int,
               threads, memory_budget_mb, io_binding: bool, spinning) -> None:
        inputs = [i.name for i in graph.graph.input]
        outputs = [o.name for o in graph.graph.output]
        if TARGET not in inputs or {LOGITS, ATTRIBUTION} - set(outputs):
            raise InputError(f"not an explainer graph: inputs {inputs}, outputs {outputs}; "
                             "use Explainer(model, ...) to rewrite a classifier")
        made = read_stamp(graph)
        method = made.method if made is not None else "unknown"
        self.spec = made.spec if made is not None else None
        self.input_names = inputs
        self.layer_names = [o for o in outputs if o.startswith(ATTRIBUTION + "/")]
        batch_size = check_batch_size(batch_size)
        memory_budget_mb = check_memory_budget(memory_budget_mb)
        logits_dims = next(o for o in graph.graph.output
                           if o.name == LOGITS).type.tensor_type.shape.dim
        if len(logits_dims) == 2 and logits_dims[1].HasField("dim_value") and \
                logits_dims[1].dim_value == 0:
            raise InvalidModelError("the scores (logits) have 0 classes: there is no class to "
                                    "explain")
        self.method = method
        self.graph = graph
        try:
            self.session = make_session(graph, providers, threads,
                                        lean_memory=memory_budget_mb is not None,
                                        spinning=spinning)
        except onnxruntime_errors() as exc:
            half = _half_failure(graph, onnxruntime_reason(exc))
            if half is not None:
                raise half from None
            raise ExecutionError(f"onnxruntime cannot load the explainer graph: "
                                 f"{onnxruntime_reason(exc)}") from None
        self.io_binding = io_binding
        self.memory_budget_mb = memory_budget_mb
        self.bytes_per_sample: int | None = None
        if memory_budget_mb is not None:
            self.bytes_per_sample = activation_bytes_per_sample(graph)
            batch_size = min(batch_size, chunk_size_for_budget(self.bytes_per_sample,
                                                               memory_budget_mb))
        data_input = next(i for i in graph.graph.input if i.name != TARGET)
        self.input_name = data_input.name
        self._input_dtype = onnx.helper.tensor_dtype_to_np_dtype(
            data_input.type.tensor_type.elem_type)
        # integer input: pixels cast to float inside the model (uint8 images), or a token
        # model's ids (attributed at their embedding)
        self.integer_pixels = self._input_dtype.kind in "iu" and made is not None and \
            made.input_kind == "pixels"
        self.token_input = self._input_dtype.kind in "iu" and not self.integer_pixels
        # the model's other inputs (a token model's attention mask, token type ids): one row
        # per sample, given to explain() by name
        self.other_inputs = {
            i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
            for i in graph.graph.input if i.name not in (self.input_name, TARGET, Q)}
        self.input_shape = tuple(d.dim_value if d.HasField("dim_value") else None
                                 for d in data_input.type.tensor_type.shape.dim)
        logits = next(o for o in graph.graph.output if o.name == LOGITS)
        attribution = next(o for o in graph.graph.output if o.name == ATTRIBUTION)
        self._dtypes = {name: onnx.helper.tensor_dtype_to_np_dtype(o.type.tensor_type.elem_type)
                        for name, o in ((LOGITS, logits), (ATTRIBUTION, attribution))}
        logits_dims = logits.type.tensor_type.shape.dim
        self.num_classes = (logits_dims[1].dim_value or None) if len(logits_dims) == 2 else None
        # per-sample attribution shape when it is not the input's (layer attribution, CAM maps)
        dims = attribution.type.tensor_type.shape.dim
        self._attribution_shape = tuple(d.dim_value for d in dims[1:]) if dims and all(
            d.HasField("dim_value") for d in dims[1:]) else None
        fixed_batch = self.input_shape[0] if self.input_shape else None
        self.batch_size = fixed_batch or batch_size

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    @property
    def input_dtype(self) -> np.dtype:
        """The numpy type of the graph's data input (float32; float16 for a float16 model
        computed in float16; an integer type for token ids or integer pixels)."""
        return self._input_dtype

    # -- checks ---------------------------------------------------------------------------------
    def check_batch(self, x) -> np.ndarray:
        x = np.asarray(x)
        if getattr(self, "token_input", False):
            return self._check_ids(x)
        if getattr(self, "integer_pixels", False):
            return self._check_shape(self._check_pixels(x))
        if x.dtype.kind in "iub":
            raise InputError(f"the batch has integer dtype {x.dtype}; the model takes float32 "
                             "values: scale/normalise the pixels first (see rectonnx.images)")
        if x.dtype.kind != "f":
            raise InputError(f"the batch has dtype {x.dtype}; expected float32")
        # the graph's own input type: float32, or float16 for a float16 model computed in
        # float16 (precision="model", precision.py)
        given, x = x, self._check_shape(x.astype(getattr(self, "_input_dtype", np.float32),
                                                 copy=False))
        if x.size and not (np.isfinite(x.min()) and np.isfinite(x.max())):  # NaN propagates
            bad = np.flatnonzero(~np.isfinite(x).all(axis=tuple(range(1, x.ndim))))[:10]
            if x.dtype == np.float16 and np.isfinite(given[bad]).all():
                raise InputError(
                    f"samples {bad.tolist()} hold values beyond float16's range (|x| <= 65504): "
                    "this explainer computes in float16 as the float16 model does; scale the "
                    "input as the model expects, or explain in float32 (precision='fp32')")
            raise InputError(f"samples {bad.tolist()} contain NaN or Inf")
        return x

    def _check_pixels(self, x: np.ndarray) -> np.ndarray:
        """Integer pixels (a model that casts its integer input to float): integers within the
        input type's range, in that type."""
        dtype = self._input_dtype
        if x.dtype.kind not in "iu":
            limits = np.iinfo(dtype)
            raise InputError(f"the batch has dtype {x.dtype}; this model takes integer pixel "
                             f"values ({dtype.name}, {limits.min}..{limits.max}) and casts them "
                             "to float itself: pass the image's integer values (rectonnx "
                             "explain does this from image files)")
        limits = np.iinfo(dtype)
        if x.size and (x.min() < limits.min or x.max() > limits.max):
            raise InputError(f"the batch holds values outside {dtype.name}'s range "
                             f"{limits.min}..{limits.max}")
        return x.astype(dtype, copy=False)

    def _check_shape(self, x: np.ndarray) -> np.ndarray:
        """The batch against the input's shape (a single sample is a clear error)."""
        expected = self.input_shape
        if len(expected) == x.ndim + 1 and all(
                e is None or e == s for e, s in zip(expected[1:], x.shape)):
            raise InputError(f"got one sample of shape {list(x.shape)}; pass a batch "
                             f"(x[None]) of shape {_shape_text(expected)}")
        if x.ndim != len(expected) or any(e is not None and e != s
                                          for e, s in zip(expected[1:], x.shape[1:])):
            raise InputError(f"the batch has shape {list(x.shape)}; the model expects "
                             f"{_shape_text(expected)} (N = batch)")
        return np.ascontiguousarray(x)

    def _check_ids(self, x: np.ndarray) -> np.ndarray:
        """A token model's batch: integer ids ``[N, T]`` (the graph's integer type)."""
        if x.dtype.kind not in "iu":
            raise InputError(f"the batch has dtype {x.dtype}; this model takes integer token "
                             f"ids (input {self.input_name!r})")
        expected = self.input_shape
        if x.ndim != len(expected) or any(e is not None and e != s
                                          for e, s in zip(expected[1:], x.shape[1:])):
            raise InputError(f"the batch has shape {list(x.shape)}; the model expects token "
                             f"ids {_shape_text(expected)} (N = batch)")
        if x.size and x.min() < 0:
            raise InputError("the batch holds negative token ids")
        return np.ascontiguousarray(x.astype(self._input_dtype, copy=False))

    def check_other_inputs(self, given: Mapping, count: int) -> dict[str, np.ndarray]:
        """The model's other inputs (``other_inputs``), each with ``count`` rows, in the
        graph's dtype; a missing or unknown one is an InputError."""
        unknown = sorted(set(given) - set(self.other_inputs))
        if unknown:
            raise InputError(f"the explainer graph has no input {', '.join(unknown)}; its other "
                             f"inputs: {', '.join(self.other_inputs) or 'none'}")
        missing = [name for name in self.other_inputs if name not in given]
        if missing:
            raise InputError(f"give the model's other input(s) {', '.join(missing)} by name: "
                             f"explain(x, target, {missing[0]}=...)")
        feeds = {}
        for name, dtype in self.other_inputs.items():
            value = np.asarray(given[name])
            if value.ndim == 0 or len(value) != count:
                raise InputError(f"input {name!r} has shape {list(value.shape)}; expected one "
                                 f"row per sample ({count})")
            if dtype.kind in "iu" and value.dtype.kind not in "iub":
                raise InputError(f"input {name!r} has dtype {value.dtype}; the model takes "
                                 f"{dtype}")
            feeds[name] = np.ascontiguousarray(value.astype(dtype, copy=False))
        return feeds

    def check_target(self, target, count: int) -> np.ndarray:
        """``target`` (None, one class, or one per sample; negative = the predicted class) as
        int64 ``[count]``. Floats must be whole numbers within int64, and classes below the
        model's class count (checked again on the scores when the count is dynamic)."""
        if target is None:
            return np.full(count, -1, dtype=np.int64)
        array = np.asarray(target)
        if array.dtype.kind == "f":
            if not np.isfinite(array).all():
                raise InputError(f"target must be integer class indices, got "
                                 f"{array[~np.isfinite(array)][:5].tolist()} (NaN or infinite)")
            if not np.all(array == np.round(array)):
                wrong = array[array != np.round(array)]
                raise InputError(f"target must be integer class indices, got non-integral "
                                 f"{wrong[:5].tolist()}")
            if (np.abs(array) >= 2.0 ** 63).any():
                raise InputError(f"target {array[np.abs(array) >= 2.0 ** 63][:5].tolist()} out "
                                 "of range: class indices must fit in int64")
            array = array.astype(np.int64)
        if array.dtype.kind == "u" and (array > np.iinfo(np.int64).max).any():
            raise InputError(f"target {array[array > np.iinfo(np.int64).max][:5].tolist()} out "
                             "of range: class indices must fit in int64")
        if array.dtype.kind not in "iu":
            raise InputError(f"target must be integer class indices, got dtype {array.dtype}")
        if array.ndim == 0:
            array = np.full(count, int(array), dtype=np.int64)
        if array.shape != (count,):
            raise InputError(f"target has shape {list(array.shape)}; expected [{count}] "
                             "(one class per sample) or a single int")
        if self.num_classes is not None and (array >= self.num_classes).any():
            wrong = array[array >= self.num_classes]
            raise InputError(f"target {wrong[:5].tolist()} out of range: the model has "
                             f"{self.num_classes} classes (0..{self.num_classes - 1}; "
                             "negative = predicted class)")
        return array.astype(np.int64)

    # -- running ----------------------------------------------------------------------------------
    def explain(self, x, target=None, *, q=None, progress: bool = False,
                **other_inputs) -> Explanation:
        """Attribution maps and logits for the batch ``x`` (shape ``[N, ...]`` as the model).
        ``q``: RectGrad's percentile for this call (a number or one per sample), for graphs
        made with ``q_input=True``. Graphs made with ``layer_outputs=True`` also return the
        maps at every activation (``Explanation.layers``).

        A token model takes integer ids ``[N, T]`` and its other inputs by name
        (``explain(ids, target, attention_mask=mask)``, names as ``other_inputs``), or one
        dict of every input (``explain({"input_ids": ids, "attention_mask": mask})``, a
        tokenizer's batch); its attribution is per token (``[N, T]``, option
        ``token_reduction``)."""
        if isinstance(x, Mapping):
            if self.input_name not in x:
                raise InputError(f"the dict of inputs has no {self.input_name!r} (keys: "
                                 f"{', '.join(map(str, x))})")
            other_inputs = {**{k: v for k, v in x.items() if k != self.input_name},
                            **other_inputs}
            x = x[self.input_name]
        x = self.check_batch(x)
        targets = self.check_target(target, len(x))
        if self.other_inputs or other_inputs:
            extra = self.check_other_inputs(other_inputs, len(x))
            return self._explain_all_outputs(x, targets, q, extra)
        if q is not None or self.layer_names:
            return self._explain_all_outputs(x, targets, q)
        if 0 < len(x) <= self.batch_size and self.input_shape[0] in (None, len(x)):
            # one run: onnxruntime's own output arrays are the result (binding outputs to
            # arrays of ours cost 0.2 ms per call at batch 1 and saved nothing here)
            try:
                logits, attribution = self.session.run([LOGITS, ATTRIBUTION],
                                                       {self.input_name: x, TARGET: targets})
            except onnxruntime_errors() as exc:
                raise self._run_failure(exc, x) from None
            self._check_scores(logits, targets)
            return _explanation(attribution, logits, targets)
        per_sample = self._attribution_shape or x.shape[1:]  # unknown: the input's
        attribution = np.empty((len(x), *per_sample), self._dtypes[ATTRIBUTION])
        logits = None if self.num_classes is None else \
            np.empty((len(x), self.num_classes), self._dtypes[LOGITS])
        starts = range(0, len(x), self.batch_size)
        if progress:
            from tqdm import tqdm
            starts = tqdm(starts, total=len(starts), unit="batch", desc=self.method)
        for start in starts:
            stop = min(start + self.batch_size, len(x))
            chunk_logits = self._run_chunk(x[start:stop], targets[start:stop],
                                           attribution[start:stop],
                                           None if logits is None else logits[start:stop])
            if logits is None:  # the class count is only known now
                logits = np.empty((len(x),) + chunk_logits.shape[1:], chunk_logits.dtype)
            if chunk_logits is not None:
                logits[start:stop] = chunk_logits
        if logits is None:
            logits = np.zeros((0, 0), self._dtypes[LOGITS])
        elif len(x):
            self._check_scores(logits, targets)
        return _explanation(attribution, logits, targets)

    def _explain_all_outputs(self, x: np.ndarray, targets: np.ndarray, q,
                             extra: Mapping[str, np.ndarray] | None = None) -> Explanation:
        """``explain`` with the ``q`` input fed and/or the layer outputs read, and the model's
        other inputs (``extra``, per sample) fed (chunks are concatenated; no IO binding)."""
        feeds = {}
        if q is not None:
            if Q not in self.input_names:
                raise InputError("this explainer graph has no q input: make it with "
                                 "q_input=True (rectgrad) to set q per call")
            values = np.asarray(q, np.float64).reshape(-1)
            if values.size not in (1, len(x)) or not np.isfinite(values).all() or \
                    ((values < 0) | (values > 100)).any():
                raise InputError(f"q must be one percentile in [0, 100] or one per sample "
                                 f"({len(x)}), got {q!r}")
            feeds[Q] = values
        names = [LOGITS, ATTRIBUTION, *self.layer_names]
        parts: list[list[np.ndarray]] = [[] for _ in names]
        for start in range(0, len(x), self.batch_size):
            stop = min(start + self.batch_size, len(x))
            chunk_feeds = {self.input_name: x[start:stop], TARGET: targets[start:stop]}
            chunk_feeds.update({k: v[start:stop] for k, v in (extra or {}).items()})
            if Q in feeds:
                chunk_feeds[Q] = feeds[Q] if feeds[Q].size == 1 else feeds[Q][start:stop]
            try:
                outputs = self.session.run(names, chunk_feeds)
            except onnxruntime_errors() as exc:
                raise self._run_failure(exc, x[start:stop]) from None
            for collected, output in zip(parts, outputs):
                collected.append(output)
        logits, attribution, *layers = [np.concatenate(p) for p in parts]
        self._check_scores(logits, targets)
        result = _explanation(attribution, logits, targets)
        return dataclasses.replace(result, layers={
            name[len(ATTRIBUTION) + 1:]: value.astype(np.float32) if value.dtype == np.float16
            else value for name, value in zip(self.layer_names, layers)})

    def _check_scores(self, logits: np.ndarray, targets: np.ndarray) -> None:
        """Targets against the class count of the scores (a dynamic count is known now)."""
        classes = logits.shape[1] if logits.ndim == 2 else None
        if classes == 0:
            raise InvalidModelError(f"the model returned scores of shape {list(logits.shape)}: "
                                    "0 classes, there is no class to explain")
        if classes is not None and (targets >= classes).any():
            wrong = targets[targets >= classes]
            raise InputError(f"target {wrong[:5].tolist()} out of range: the model has "
                             f"{classes} classes (0..{classes - 1}; negative = predicted class)")

    def _run_failure(self, exc: BaseException, batch: np.ndarray) -> Exception:
        """The error to raise when onnxruntime fails on ``batch``: the model's own forward
        pass is run alone to tell a model that cannot take this batch (e.g. a batch size fixed
        inside it) from a scores tensor without classes or an explainer-graph failure."""
        reason = onnxruntime_reason(exc)
        shape = list(batch.shape)
        half = _half_failure(self.graph, reason)
        if half is not None:
            return half
        if "allocat" in reason.lower():
            return ExecutionError(f"onnxruntime ran out of memory on a batch of shape {shape} "
                                  f"({reason}); use a smaller batch_size (--batch-size) or a "
                                  "memory budget (--memory-budget)")
        if self.other_inputs or self.token_input:  # the forward pass needs them all
            return ExecutionError(f"onnxruntime failed on a batch of shape {shape}: {reason}"
                                  + (" (token ids beyond the vocabulary?)"
                                     if self.token_input and "indices" in reason else ""))
        try:
            forward = make_session(_forward_only(self.graph), ["CPUExecutionProvider"], 1)
        except onnxruntime_errors():
            forward = None
        if forward is not None:
            try:
                logits = forward.run([LOGITS], {self.input_name: batch})[0]
            except onnxruntime_errors():
                alone = None
                if len(batch) > 1:
                    try:
                        alone = forward.run([LOGITS], {self.input_name: batch[:1]})[0]
                    except onnxruntime_errors():
                        pass
                if alone is not None:
                    return ExecutionError(
                        f"the model cannot run on a batch of {len(batch)} ({reason}), but runs "
                        "on one sample: a batch size of 1 is fixed inside the graph; use "
                        "batch_size=1 (--batch-size 1) or re-export the model with a dynamic "
                        "batch axis")
                return ExecutionError(f"the model itself cannot run on a batch of shape "
                                      f"{shape} ({reason}); check the input size and "
                                      "preprocessing the model expects")
            if logits.ndim == 2 and logits.shape[1] == 0:
                return InvalidModelError(f"the model returned scores of shape "
                                         f"{list(logits.shape)}: 0 classes, there is no class "
                                         "to explain")
        return ExecutionError(f"onnxruntime could not run the explainer graph on a batch of "
                              f"shape {shape} ({reason}); the model's forward pass runs, so "
                              "this is a rectonnx bug: please report it with the model")

    def _run_chunk(self, chunk: np.ndarray, targets: np.ndarray, attribution_out: np.ndarray,
                   logits_out: np.ndarray | None) -> np.ndarray | None:
        """Run one chunk; fill ``attribution_out`` (and ``logits_out``, or return the logits)."""
        real = len(chunk)
        fixed = self.input_shape[0]
        if fixed is not None and real < fixed:  # a model with a fixed batch size: pad the chunk
            chunk = np.concatenate([chunk, np.zeros((fixed - real,) + chunk.shape[1:],
                                                    chunk.dtype)])
            targets = np.concatenate([targets, np.full(fixed - real, -1, np.int64)])
        padded = len(chunk) != real
        if self.io_binding and logits_out is not None and not padded:
            binding = self.session.io_binding()
            binding.bind_cpu_input(self.input_name, chunk)
            binding.bind_cpu_input(TARGET, np.ascontiguousarray(targets))
            for name, out in ((ATTRIBUTION, attribution_out), (LOGITS, logits_out)):
                binding.bind_output(name, "cpu", 0, out.dtype, list(out.shape),
                                    out.ctypes.data)
            try:
                self.session.run_with_iobinding(binding)
            except (RuntimeError, *onnxruntime_errors()) as exc:  # "Error in execution: ..."
                raise self._run_failure(exc, chunk) from None
            return None
        try:
            logits, attribution = self.session.run(
                [LOGITS, ATTRIBUTION], {self.input_name: chunk, TARGET: targets})
        except onnxruntime_errors() as exc:
            raise self._run_failure(exc, chunk) from None
        attribution_out[...] = attribution[:real]
        return logits[:real]


def _explanation(attribution: np.ndarray, logits: np.ndarray,
                 targets: np.ndarray) -> Explanation:
    """The result of ``explain``: negative targets become the predicted class; a float16
    graph's outputs are returned as float32 (the same values)."""
    attribution, logits = (a.astype(np.float32) if a.dtype == np.float16 else a
                           for a in (attribution, logits))
    resolved = np.where(targets < 0, logits.argmax(axis=1), targets) if len(targets) else targets
    return Explanation(attribution, logits, resolved)


def _half_failure(graph: onnx.ModelProto, reason: str) -> ExecutionError | None:
    """The error for an onnxruntime failure of a graph that computes in float16 for lack of a
    float16 kernel (the CPU provider of onnxruntime 1.31 has no float16 ScatterElements with
    reduction 'add', which the portable max-pool backward uses); None for other failures."""
    made = read_stamp(graph)
    if made is None or made.computes_in != "float16":
        return None
    if not any(word in reason for word in ("MLFloat16", "float16", "NOT_IMPLEMENTED",
                                           "Could not find an implementation")):
        return None
    return ExecutionError(
        f"onnxruntime cannot run this explainer graph in float16 ({reason}): it computes in "
        "float16 as the float16 model does (precision='model'), and this execution provider "
        "lacks a float16 kernel. Use precision='fp32' (--precision fp32: computes in float32 "
        "with the weights upcast), the CUDAExecutionProvider, or on the CPU provider "
        "runtime='onnxruntime-cpu' (its max-pool backward runs in float16)")


def _shape_text(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("N" if i == 0 and d is None else str(d if d is not None else "?")
                           for i, d in enumerate(shape)) + "]"
