"""Explaining image collections: files in, attribution arrays, pictures and a manifest out.

    summary = explain_images("model.onnx", ["photos/", "more/*.jpg", "list.txt"], "maps/",
                             preprocess=Preprocess.imagenet(), method="rectgrad")

**Outputs.** The output directory mirrors the input tree below the inputs' common folder: image
``<root>/a/cat.jpg`` gives ``a/cat.npy`` (``format="npy"``, the attribution in the model input's
shape without the batch axis), or ``a/cat.npz`` (``"npz"``, compressed, key ``attribution``), or
one entry ``a/cat`` in a sharded ``shard-00000.npz`` (``"shards"``, ``shard_size`` maps per
file); with ``write_png`` also ``a/cat.png`` (heatmap, SPEC.md section 3) and
``a/cat_overlay.png``. Two inputs that would share a name get ``_2``, ``_3``, ... appended.
``manifest.jsonl`` holds one JSON line per finished image: ``input`` (absolute path),
``target``, ``predicted``, ``score`` (the target's logit), ``probability``, ``method`` and
``files`` (paths relative to the output directory; ``key`` names the entry in a shard).
``run.json`` records the settings; ``failures.jsonl`` the files that could not be read (skipped,
reported, the run goes on).

**Resumable and atomic.** Every file is written to ``.rectonnx-tmp/`` and moved into place with
``os.replace``; a manifest line is appended (and flushed) only after all files of its image
exist, so an interrupted run loses nothing it has finished and never leaves a half-written file
under a final name. A re-run with the same settings skips every image already in the manifest
(a different model or settings is an error, not a silent mix). A lock file keeps two runs out of
one directory. A full disk ends the run with one clear message; finished outputs stay intact.

**Throughput.** Image decoding runs in a thread pool ``chunks_ahead`` chunks ahead of inference,
and a writer thread compresses and writes results while the next chunk runs, so the explainer is
rarely idle. ``memory_budget`` (bytes) sizes the chunks so the explainer graph's activations
fit (the Explainer's estimate). It runs on CUDA when onnxruntime can use it
(``device="auto"``), with onnxruntime's threads sleeping between runs, since decoding and
writing share the CPU.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .errors import RectonnxError
from .images import ImageLoadError, Preprocess, iter_image_paths, load_image

PRESETS = {
    "imagenet": dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "minus1to1": dict(mean=(0.5,), std=(0.5,)),
    "unit": dict(mean=(0.0,), std=(1.0,)),
}
FORMATS = ("npy", "npz", "shards")
DEVICES = ("auto", "cpu", "cuda")
MANIFEST, SETTINGS, FAILURES = "manifest.jsonl", "run.json", "failures.jsonl"
TMP_DIR, LOCK_FILE = ".rectonnx-tmp", ".rectonnx.lock"
DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class OutputError(RectonnxError):
    """Results could not be written (disk full, no permission, the directory is in use)."""


# -- preprocessing settings ---------------------------------------------------------------------
def sidecar(model) -> dict:
    """The JSON next to a model file (``model.onnx`` -> ``model.json``), or {}."""
    if not isinstance(model, (str, Path)):
        return {}
    path = Path(model).with_suffix(".json")
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None


def preprocess_for(model, *, size=None, resize=None, mean=None, std=None,
                   preset=None) -> Preprocess:
    """Preprocessing from the model's sidecar JSON, then a preset, then explicit options."""
    settings = dict(sidecar(model).get("preprocess", {}))
    if preset:
        settings.update(PRESETS[preset])
    if size is not None:
        settings["size"] = size
    if resize is not None:
        settings["resize"] = resize
    if mean is not None:
        settings["mean"] = _floats(mean)
    if std is not None:
        settings["std"] = _floats(std)
    return Preprocess.from_dict(settings)


def fit_preprocess_to_model(preprocess: Preprocess,
                            input_shape: Sequence[int | None]) -> Preprocess:
    """Take the image size and channel count from the model's input where they are fixed."""
    if len(input_shape) != 4:
        return preprocess
    settings = preprocess.to_dict()
    channels = input_shape[1] if preprocess.layout == "NCHW" else input_shape[3]
    if channels in (1, 3) and channels != preprocess.channels:
        settings["channels"] = channels
        for key in ("mean", "std"):  # per-channel values of the other count cannot carry over
            if len(settings[key]) not in (1, channels):
                raise ValueError(f"the model takes {channels}-channel images but --{key} has "
                                 f"{len(settings[key])} values")
    spatial = input_shape[2:] if preprocess.layout == "NCHW" else input_shape[1:3]
    if preprocess.size is None and all(spatial):
        settings["size"] = list(spatial)
    return Preprocess.from_dict(settings)


def parse_bytes(text: str | int | None) -> int | None:
    """``"2GB"``, ``"512M"``, ``"1.5GiB"`` or a plain number of bytes -> int (None stays None)."""
    if text is None or isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "K": 2**10, "KB": 10**3, "KIB": 2**10, "M": 2**20, "MB": 10**6,
             "MIB": 2**20, "G": 2**30, "GB": 10**9, "GIB": 2**30, "T": 2**40, "TB": 10**12,
             "TIB": 2**40}
    value = str(text).strip().upper().replace(" ", "")
    number = value.rstrip("KMGTIB")
    unit = value[len(number):]
    try:
        size = float(number) * units[unit]
    except (ValueError, KeyError):
        raise ValueError(f"expected a size such as 2GB or 512MiB, got {text!r}") from None
    if size <= 0:
        raise ValueError(f"a memory budget must be positive, got {text!r}")
    return int(size)


# -- files ------------------------------------------------------------------------------------
class OutputDir:
    """The output directory: atomic writes, the lock, and disk errors turned into OutputError."""

    def __init__(self, root: Path, *, fsync: bool = False):
        self.root = Path(root)
        self.fsync = fsync
        self.tmp = self.root / TMP_DIR
        self._lock = None
        self._counter = 0

    def open(self) -> "OutputDir":
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.root / LOCK_FILE, "a")
        except OSError as exc:
            raise self.error(exc, self.root) from None
        try:
            import fcntl
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            pass
        except OSError:
            self._lock.close()
            raise OutputError(f"{self.root} is in use by another rectonnx run (lock "
                              f"{LOCK_FILE}); wait for it or choose another output directory")
        shutil.rmtree(self.tmp, ignore_errors=True)  # leftovers of an interrupted run
        self.tmp.mkdir(exist_ok=True)
        return self

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def error(self, exc: OSError, path: Path) -> OutputError:
        if exc.errno in DISK_FULL:
            return OutputError(f"disk full while writing {path}")
        reason = exc.strerror or str(exc) or type(exc).__name__
        return OutputError(f"cannot write {path}: {reason}")

    def write(self, relative: str, write: Callable[[io.BufferedWriter], None]) -> str:
        """Write ``root/relative`` atomically (temp file, then ``os.replace``); returns it."""
        final = self.root / relative
        self._counter += 1
        tmp = self.tmp / f"{os.getpid()}-{self._counter}-{final.name}"
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as handle:
                write(handle)
                handle.flush()
                if self.fsync:
                    os.fsync(handle.fileno())
            os.replace(tmp, final)
        except OSError as exc:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise self.error(exc, final) from None
        return relative

    def __enter__(self) -> "OutputDir":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


def write_npy(array: np.ndarray) -> Callable:
    return lambda handle: np.save(handle, array, allow_pickle=False)


def write_npz(arrays: dict[str, np.ndarray]) -> Callable:
    return lambda handle: np.savez_compressed(handle, **arrays)


def write_png(rgb: np.ndarray) -> Callable:
    from PIL import Image

    return lambda handle: Image.fromarray(np.ascontiguousarray(rgb)).save(
        handle, format="PNG", compress_level=1)  # 2.5x faster than 6, files ~15 % larger


class Manifest:
    """``manifest.jsonl``: one JSON line per finished image; the index of what is done."""

    def __init__(self, path: Path, output: OutputDir):
        self.path = Path(path)
        self.output = output
        self.done: dict[str, dict] = {}
        self.appended = 0  # records written by this run
        self._handle = None

    def load(self) -> "Manifest":
        """Read finished records; a torn last line (the run was killed mid-write) is cut off."""
        if not self.path.is_file():
            return self
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1
        for line in data[:keep].splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by an earlier crash: that image is done again
            if isinstance(record, dict) and "input" in record:
                self.done[record["input"]] = record
        if keep != len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(keep)
        return self

    def taken_files(self) -> set[str]:
        names = set()
        for record in self.done.values():
            names.update(v for k, v in record.get("files", {}).items() if k != "key")
        return names

    def append(self, records: Iterable[dict]) -> None:
        text = "".join(json.dumps(r) + "\n" for r in records)
        if not text:
            return
        try:
            if self._handle is None:
                self._handle = open(self.path, "a")
            self._handle.write(text)
            self._handle.flush()
            if self.output.fsync:
                os.fsync(self._handle.fileno())
        except OSError as exc:
            raise self.output.error(exc, self.path) from None
        for record in records:
            self.done[record["input"]] = record
        self.appended += len(records)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def append_jsonl(path: Path, records: Iterable[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    if text:
        with open(path, "a") as handle:
            handle.write(text)


# -- the job ------------------------------------------------------------------------------------
@dataclass
class Item:
    """One image: where it is and the name (relative, without extension) of its outputs."""

    path: Path
    key: str   # absolute path, the manifest's ``input``
    name: str  # e.g. ``a/cat``


def model_fingerprint(model) -> str:
    """sha256 of the model file or proto (a retrained model must not resume an old run)."""
    import onnx

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


def check_settings(out: Path, settings: dict, output: OutputDir) -> None:
    """Write ``run.json``, or check that a resumed run uses the same settings."""
    path = out / SETTINGS
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if isinstance(previous, dict):
            changed = sorted(k for k in set(previous) | set(settings)
                             if k != "model" and previous.get(k) != settings.get(k))
            if changed:
                detail = ", ".join(f"{k}: {previous.get(k)!r} -> {settings.get(k)!r}"
                                   for k in changed if k != "model_sha256")
                if "model_sha256" in changed:
                    detail = "the model file changed" + (f"; {detail}" if detail else "")
                raise OutputError(f"{out} holds results of other settings ({detail}); use "
                                  "another output directory, or delete it to start over")
            return
    output.write(SETTINGS, lambda h: h.write(json.dumps(settings, indent=1).encode()))


def plan_items(paths: Sequence[Path], taken: set[str], fmt: str,
               write_png: bool, write_overlay: bool) -> list[Item]:
    """Output names mirroring the tree below the inputs' common folder, never colliding."""
    resolved = [Path(os.path.abspath(p)) for p in paths]
    if not resolved:
        return []
    root = Path(os.path.commonpath([str(p.parent) for p in resolved]))
    taken = set(taken)
    items = []
    suffixes = [".npz" if fmt == "shards" else f".{fmt}"]
    if write_png:
        suffixes.append(".png")
    if write_overlay:
        suffixes.append("_overlay.png")
    for path, absolute in zip(paths, resolved):
        base = absolute.relative_to(root).with_suffix("").as_posix()
        name, n = base, 1
        while any(name + s in taken for s in suffixes):
            n += 1
            name = f"{base}_{n}"
        taken.update(name + s for s in suffixes)
        items.append(Item(Path(path), str(absolute), name))
    return items


@dataclass
class Summary:
    out_dir: Path
    explained: int = 0
    resumed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    device: str = ""

    @property
    def rate(self) -> float:
        return self.explained / self.seconds if self.seconds else 0.0

    def text(self) -> str:
        lines = [f"explained {self.explained} image(s) in {self.seconds:.1f} s "
                 f"({self.rate:.1f} images/s{', ' + self.device if self.device else ''}); "
                 f"outputs in {self.out_dir}"]
        if self.resumed:
            lines.append(f"{self.resumed} image(s) were already done (manifest), skipped")
        if self.failures:
            lines.append(f"skipped {len(self.failures)} unreadable file(s) "
                         f"(listed in {FAILURES}):")
            lines += [f"  {message}" for _, message in self.failures[:20]]
            if len(self.failures) > 20:
                lines.append(f"  ... and {len(self.failures) - 20} more")
        return "\n".join(lines)


class ResultWriter:
    """Turns explained images into files and manifest lines (in the order they come)."""

    def __init__(self, output: OutputDir, manifest: Manifest | None, *, fmt: str,
                 shard_size: int, layout: str, method: str, classes=None,
                 write_png: bool = True, write_overlay: bool = True,
                 shard_name: Callable[[], str] | None = None):
        if fmt not in FORMATS:
            raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
        self.output, self.manifest = output, manifest
        self.fmt, self.shard_size = fmt, max(1, int(shard_size))
        self.layout = "CHW" if layout == "NCHW" else "HWC"
        self.method, self.classes = method, classes
        self.write_png, self.write_overlay = write_png, write_overlay
        self.shard_name = shard_name or self._numbered_shards()
        self._shard: dict[str, np.ndarray] = {}     # entry name -> attribution
        self._shard_records: list[tuple[str, dict]] = []

    def _numbered_shards(self) -> Callable[[], str]:
        """``shard-00000.npz``, ``shard-00001.npz``, ... after those already there."""
        used = [int(p.stem[6:]) for p in self.output.root.glob("shard-*.npz")
                if p.stem[6:].isdigit()] if self.fmt == "shards" else []
        counter = iter(range(max(used, default=-1) + 1, 1 << 62))
        return lambda: f"shard-{next(counter):05d}.npz"

    def record(self, item: Item, attribution, logits, target: int, files: dict) -> dict:
        shifted = np.exp(logits - logits.max())
        record = {"input": item.key, "target": int(target), "predicted": int(logits.argmax()),
                  "score": float(logits[target]),
                  "probability": float(shifted[target] / shifted.sum()),
                  "method": self.method, "files": files}
        if self.classes:
            record["target_name"] = self.classes[int(target)]
        return record

    def add(self, item: Item, attribution: np.ndarray, logits: np.ndarray, target: int,
            display: np.ndarray | None) -> list[dict]:
        """Write one image's files; returns the manifest records now safe to append."""
        from .visualize import heatmap_rgb, overlay_rgb

        files: dict[str, str] = {}
        if self.fmt == "npy":
            files["attribution"] = self.output.write(f"{item.name}.npy", write_npy(attribution))
        elif self.fmt == "npz":
            files["attribution"] = self.output.write(
                f"{item.name}.npz", write_npz({"attribution": attribution}))
        if self.write_png:
            files["heatmap"] = self.output.write(
                f"{item.name}.png", write_png(heatmap_rgb(attribution, layout=self.layout)))
        if self.write_overlay and display is not None:
            files["overlay"] = self.output.write(
                f"{item.name}_overlay.png",
                write_png(overlay_rgb(display, attribution, layout=self.layout)))
        record = self.record(item, attribution, logits, target, files)
        if self.fmt != "shards":
            return [record]
        self._shard[item.name] = attribution
        self._shard_records.append((item.name, record))
        return self.flush() if len(self._shard) >= self.shard_size else []

    def flush(self) -> list[dict]:
        """Write the pending shard (if any); returns its records."""
        if not self._shard:
            return []
        name = self.output.write(self.shard_name(), write_npz(self._shard))
        records = []
        for key, record in self._shard_records:
            record["files"] = {"attribution": name, "key": key, **record["files"]}
            records.append(record)
        self._shard, self._shard_records = {}, []
        return records


class _Pipeline:
    """Decode ahead in a thread pool; write behind in one thread; bounded queues both ways."""

    def __init__(self, workers: int, chunks_ahead: int):
        self.loader = ThreadPoolExecutor(max(1, workers), thread_name_prefix="rectonnx-load")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="rectonnx-write")
        self.chunks_ahead = max(1, chunks_ahead)
        self.writes: deque[Future] = deque()

    def load(self, chunks: Iterable[list[Item]], load: Callable) -> Iterator[list]:
        queue: deque[list[tuple[Item, Future]]] = deque()
        chunks = iter(chunks)

        def fill():
            while len(queue) < self.chunks_ahead + 1:
                chunk = next(chunks, None)
                if chunk is None:
                    return
                queue.append([(item, self.loader.submit(load, item)) for item in chunk])

        fill()
        while queue:
            chunk = queue.popleft()
            fill()
            yield [(item, future.result()) for item, future in chunk]

    def write(self, function: Callable, *args) -> None:
        """Queue a write; re-raise the first write error; keep at most two chunks queued."""
        self.writes.append(self.writer.submit(function, *args))
        while self.writes and (self.writes[0].done() or len(self.writes) > 2):
            self.writes.popleft().result()

    def drain(self) -> None:
        while self.writes:
            self.writes.popleft().result()

    def close(self) -> None:
        for future in self.writes:
            future.cancel()
        self.loader.shutdown(wait=True, cancel_futures=True)
        self.writer.shutdown(wait=True, cancel_futures=True)


def load_item(item: Item, preprocess: Preprocess, keep_display: bool):
    """(array, display) or the ImageLoadError message, never an exception for a bad file."""
    try:
        array, display = load_image(item.path, preprocess)
    except ImageLoadError as exc:
        return str(exc)
    if not np.isfinite(array).all():
        return f"{item.path}: the preprocessed image contains NaN or infinite values"
    return array, (display if keep_display else None)


def providers_for(device: str) -> list[str] | None:
    """onnxruntime providers for ``device`` (auto: CUDA when usable, else CPU)."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return None
    if device == "cpu":
        return ["CPUExecutionProvider"]
    from .runtime import cuda_usable

    if not cuda_usable():
        raise RectonnxError("device 'cuda' asked for, but onnxruntime cannot use CUDA here "
                            "(onnxruntime-gpu with CUDA 12/13 and cuDNN 9 needed); use "
                            "--device cpu or auto")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def job_settings(model, *, method, q, tau, padding_trick, prr, input_name, output_name,
                 target, preprocess: Preprocess, fmt: str) -> dict:
    """What decides the results; a resumed run must match (``model`` is only informative)."""
    return {"model": os.path.abspath(model) if isinstance(model, (str, Path)) else "<in memory>",
            "model_sha256": model_fingerprint(model), "method": method,
            "q": q if method == "rectgrad" and tau is None else None,
            "tau": tau if method == "rectgrad" else None, "padding_trick": padding_trick,
            "prr": prr, "input_name": input_name, "output_name": output_name,
            "target": target, "preprocess": preprocess.to_dict(), "format": fmt}


class Job:
    """An output directory opened for one run: lock, settings, manifest, and what is left."""

    def __init__(self, out_dir, paths: Sequence[Path], settings: dict, *, fmt: str,
                 write_png: bool, write_overlay: bool, fsync: bool = False):
        self.output = OutputDir(Path(out_dir), fsync=fsync)
        self.paths, self.settings = list(paths), settings
        self.fmt, self.write_png, self.write_overlay = fmt, write_png, write_overlay

    def __enter__(self) -> "Job":
        self.output.open()
        try:
            check_settings(self.output.root, self.settings, self.output)
            self.manifest = Manifest(self.output.root / MANIFEST, self.output).load()
        except BaseException:
            self.output.close()
            raise
        todo = [p for p in self.paths if os.path.abspath(p) not in self.manifest.done]
        self.resumed = len(self.paths) - len(todo)
        self.items = plan_items(todo, self.manifest.taken_files(), self.fmt, self.write_png,
                                self.write_overlay)
        return self

    def __exit__(self, kind, exc, trace) -> None:
        self.manifest.close()
        self.output.close()
        if isinstance(exc, OutputError) and "re-run" not in str(exc):
            raise OutputError(f"{exc}; the {len(self.manifest.done)} image(s) listed in "
                              f"{self.output.root / MANIFEST} are complete: free space or fix "
                              "the output directory and re-run the same command to "
                              "resume") from None

    def record_failures(self, failures: list[tuple[Item, str]], summary: "Summary") -> None:
        if failures:
            summary.failures += [(str(item.path), message) for item, message in failures]
            try:
                append_jsonl(self.output.root / FAILURES,
                             [{"input": item.key, "error": m} for item, m in failures])
            except OSError as exc:
                raise self.output.error(exc, self.output.root / FAILURES) from None


def explain_images(model, sources, out_dir, *, preprocess: Preprocess, method="rectgrad",
                   q=98.0, tau=None, padding_trick=False, prr=False, input_name=None,
                   output_name=None, threshold="topk", target=-1, batch_size=16,
                   memory_budget=None, fmt="npy", shard_size=256, write_png=True,
                   write_overlay=True, device="auto", workers=None, chunks_ahead=2,
                   fsync=False, progress=True, explainer=None) -> Summary:
    """Explain every image in ``sources`` (files, directories, globs, ``.txt`` lists).

    See the module docstring for the outputs, resuming and atomicity. ``target``: one class for
    all images (negative = each image's predicted class). ``batch_size``: images per chunk;
    ``memory_budget`` (bytes or ``"2GB"``) lowers it so the activations fit. ``workers``:
    decoding threads (default: the CPU count, at most 8). ``explainer``: a ready
    :class:`~rectonnx.runtime.Explainer` for the same model and settings (saves the rewrite).
    Raises OutputError when results cannot be written; unreadable images are skipped.
    """
    from tqdm import tqdm

    from .runtime import Explainer

    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
    paths = iter_image_paths(sources)
    budget = parse_bytes(memory_budget)
    if explainer is None:
        explainer = Explainer(model, method, q=q, tau=tau, padding_trick=padding_trick, prr=prr,
                              input_name=input_name, output_name=output_name,
                              threshold=threshold, batch_size=batch_size,
                              providers=providers_for(device),
                              memory_budget_mb=budget / 2**20 if budget else None,
                              spinning=False)
    explainer.check_target(target, 1)  # a class out of range fails before any image is read
    batch_size = min(batch_size, explainer.batch_size)  # the Explainer fits it to the budget
    preprocess = fit_preprocess_to_model(preprocess, explainer.input_shape)
    settings = job_settings(model, method=method, q=q, tau=tau, padding_trick=padding_trick,
                            prr=prr, input_name=input_name, output_name=output_name,
                            target=target, preprocess=preprocess, fmt=fmt)
    device_name = explainer.providers[0].replace("ExecutionProvider", "")
    summary = Summary(Path(out_dir), device=device_name)
    started = time.perf_counter()
    with Job(out_dir, paths, settings, fmt=fmt, write_png=write_png,
             write_overlay=write_overlay, fsync=fsync) as job:
        summary.resumed = job.resumed
        writer = ResultWriter(job.output, job.manifest, fmt=fmt, shard_size=shard_size,
                              layout=preprocess.layout, method=method,
                              classes=sidecar(model).get("classes"), write_png=write_png,
                              write_overlay=write_overlay)
        chunks = [job.items[i:i + batch_size] for i in range(0, len(job.items), batch_size)]

        def load(item):
            return load_item(item, preprocess, write_overlay)

        def finish(results) -> None:  # on the writer thread; each line right after its files
            for item, display, attribution, logits, chosen in results:
                job.manifest.append(writer.add(item, attribution, logits, chosen, display))

        pipeline = _Pipeline(workers or min(8, os.cpu_count() or 1), chunks_ahead)
        bar = tqdm(total=len(job.items), unit="img", desc=method, disable=not progress,
                   smoothing=0.1)
        try:
            for chunk in pipeline.load(chunks, load):
                loaded = [(item, r) for item, r in chunk if not isinstance(r, str)]
                job.record_failures([(item, r) for item, r in chunk if isinstance(r, str)],
                                    summary)
                pipeline.write(finish, list(_explain_groups(explainer, loaded, target)))
                bar.update(len(chunk))
                if summary.failures:
                    bar.set_postfix(skipped=len(summary.failures), refresh=False)
            pipeline.drain()
            job.manifest.append(writer.flush())
        except KeyboardInterrupt:  # keep what is computed: finish the queued writes
            try:
                pipeline.drain()
                job.manifest.append(writer.flush())
            finally:
                summary.explained = job.manifest.appended
            raise
        finally:
            bar.close()
            pipeline.close()
        summary.explained = job.manifest.appended
    summary.seconds = time.perf_counter() - started
    return summary


def _explain_groups(explainer, loaded: list, target) -> list[tuple]:
    """Explain loaded images, batching those of equal shape together (mixed sizes work when the
    model's spatial size is dynamic); (item, display, attribution, logits, target) in order."""
    groups: dict[tuple, list] = {}
    for index, (item, (array, display)) in enumerate(loaded):
        groups.setdefault(array.shape, []).append((index, item, array, display))
    out = []
    for members in groups.values():
        result = explainer.explain(np.stack([m[2] for m in members]), target)
        for i, (index, item, _, display) in enumerate(members):
            out.append((index, item, display, result.attribution[i], result.logits[i],
                        int(result.target[i])))
    return [row[1:] for row in sorted(out, key=lambda row: row[0])]
