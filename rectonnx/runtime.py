"""``Explainer``: an onnxruntime session of an explainer graph, with input checks and chunking.

    explainer = Explainer("model.onnx", method="rectgrad", q=98)
    result = explainer.explain(batch, target=None)   # Explanation(attribution, logits, target)

Batches larger than ``batch_size`` run in chunks so memory stays bounded; targets are checked
against the number of classes; a negative target means "the predicted class".
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx

from .errors import InputError
from .rewrite import ATTRIBUTION, LOGITS, TARGET, rewrite

@dataclass(frozen=True)
class Explanation:
    """Per-sample attribution maps and scores of one ``explain`` call."""

    attribution: np.ndarray  # the input's shape
    logits: np.ndarray       # [N, C], before any softmax
    target: np.ndarray       # [N], the class each map explains

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
    print onnxruntime's "failed to load libcublasLt" error on every session.
    """
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    library = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if not library.is_file():  # Windows or an unusual layout: let onnxruntime decide
        return True
    try:
        ctypes.CDLL(str(library))
    except OSError:
        return False
    return True


def default_providers() -> list[str]:
    """CUDA first when it can run here (onnxruntime falls back to CPU per node), then CPU."""
    return (["CUDAExecutionProvider"] if cuda_usable() else []) + ["CPUExecutionProvider"]


def make_session(model: onnx.ModelProto, providers: Sequence[str] | None = None,
                 threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about CPU fallback of shape ops are noise
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=list(providers or default_providers()))


class Explainer:
    """Rewrites ``model`` once and runs the explainer graph on numpy batches."""

    def __init__(self, model, method: str = "rectgrad", *, q: float = 98.0,
                 tau: float | None = None, padding_trick: bool = False, prr: bool = False,
                 providers: Sequence[str] | None = None, batch_size: int = 32,
                 input_name: str | None = None, output_name: str | None = None,
                 threads: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.method = method
        self.graph = rewrite(model, method, q=q, tau=tau, padding_trick=padding_trick, prr=prr,
                             input_name=input_name, output_name=output_name)
        self.session = make_session(self.graph, providers, threads)
        data_input = self.graph.graph.input[0]
        self.input_name = data_input.name
        self.input_shape = tuple(d.dim_value if d.HasField("dim_value") else None
                                 for d in data_input.type.tensor_type.shape.dim)
        logits_dims = self.graph.graph.output[0].type.tensor_type.shape.dim
        self.num_classes = (logits_dims[1].dim_value or None) if len(logits_dims) == 2 else None
        fixed_batch = self.input_shape[0] if self.input_shape else None
        self.batch_size = fixed_batch or batch_size

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    # -- checks ---------------------------------------------------------------------------------
    def check_batch(self, x) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype.kind in "iub":
            raise InputError(f"the batch has integer dtype {x.dtype}; the model takes float32 "
                             "values: scale/normalise the pixels first (see rectonnx.images)")
        if x.dtype.kind != "f":
            raise InputError(f"the batch has dtype {x.dtype}; expected float32")
        x = x.astype(np.float32, copy=False)
        expected = self.input_shape
        if len(expected) == x.ndim + 1 and all(
                e is None or e == s for e, s in zip(expected[1:], x.shape)):
            raise InputError(f"got one sample of shape {list(x.shape)}; pass a batch "
                             f"(x[None]) of shape {_shape_text(expected)}")
        if x.ndim != len(expected) or any(e is not None and e != s
                                          for e, s in zip(expected[1:], x.shape[1:])):
            raise InputError(f"the batch has shape {list(x.shape)}; the model expects "
                             f"{_shape_text(expected)} (N = batch)")
        bad = ~np.isfinite(x).all(axis=tuple(range(1, x.ndim)))
        if bad.any():
            raise InputError(f"samples {np.flatnonzero(bad)[:10].tolist()} contain NaN or Inf")
        return np.ascontiguousarray(x)

    def check_target(self, target, count: int) -> np.ndarray:
        if target is None:
            return np.full(count, -1, dtype=np.int64)
        array = np.asarray(target)
        if array.dtype.kind == "f" and np.all(array == np.round(array)):
            array = array.astype(np.int64)
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
    def explain(self, x, target=None, *, progress: bool = False) -> Explanation:
        """Attribution maps and logits for the batch ``x`` (shape ``[N, ...]`` as the model)."""
        x = self.check_batch(x)
        targets = self.check_target(target, len(x))
        chunks = list(self._run_chunks(x, targets, progress))
        if not chunks:
            empty_logits = np.zeros((0, self.num_classes or 0), np.float32)
            return Explanation(np.zeros_like(x), empty_logits, targets)
        attribution = np.concatenate([c[0] for c in chunks])
        logits = np.concatenate([c[1] for c in chunks])
        resolved = np.where(targets < 0, logits.argmax(axis=1), targets)
        return Explanation(attribution, logits, resolved)

    def _run_chunks(self, x: np.ndarray, targets: np.ndarray,
                    progress: bool) -> Iterable[tuple[np.ndarray, np.ndarray]]:
        step = self.batch_size
        fixed = self.input_shape[0] is not None
        starts = range(0, len(x), step)
        if progress:
            from tqdm import tqdm
            starts = tqdm(starts, total=len(starts), unit="batch", desc=self.method)
        for start in starts:
            chunk, chunk_targets = x[start:start + step], targets[start:start + step]
            real = len(chunk)
            if fixed and real < step:  # a model with a fixed batch size: pad the last chunk
                chunk = np.concatenate([chunk, np.zeros((step - real,) + chunk.shape[1:],
                                                        chunk.dtype)])
                chunk_targets = np.concatenate([chunk_targets,
                                                np.full(step - real, -1, np.int64)])
            logits, attribution = self.session.run(
                [LOGITS, ATTRIBUTION], {self.input_name: chunk, TARGET: chunk_targets})
            yield attribution[:real], logits[:real]


def _shape_text(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("N" if i == 0 and d is None else str(d if d is not None else "?")
                           for i, d in enumerate(shape)) + "]"
