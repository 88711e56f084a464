"""Explaining image collections: files in, attribution arrays, pictures and a manifest out.

    summary = explain_images("model.onnx", ["photos/", "more/*.jpg", "list.txt"], "maps/",
                             preprocess=Preprocess.imagenet(), method="rectgrad")

**Outputs.** The output directory mirrors the input tree below the inputs' common folder: image
``<root>/a/cat.jpg`` gives ``a/cat.npy`` (``format="npy"``, the attribution in the model input's
shape without the batch axis), or ``a/cat.npz`` (``"npz"``, compressed, key ``attribution``), or
one entry ``a/cat`` in a sharded ``shard-00000.npz`` (``"shards"``, ``shard_size`` maps per
file); with ``write_png`` also ``a/cat.png`` (heatmap, docs/maths.md, 'Visualisation') and
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
Every byte goes through ``os.write`` (:func:`write_all`), so a full disk is reported as one
(naming the directory) however it shows, short writes included; each manifest line is one
``os.write`` and is cut back if short (:class:`JsonLines`), so ``manifest.jsonl`` never holds a
torn line, and an image whose record or files fail leaves no file behind. ``failures.jsonl``
holds one line per failed input, also across resumes. Output names fit the file system's name
limit whatever the input's (:func:`fit_name`); temporary names are short hashes.

**Hostile inputs.** Only regular files are read (FIFOs, sockets and devices are listed in
``failures.jsonl`` with the reason); walks and globs visit each real directory once; the output
directory is never an input; images over ``max_pixels`` are refused and decoding threads share a
memory budget (:mod:`rectonnx.images`); the sidecar JSON is validated (:func:`sidecar`).

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
import itertools
import json
import math
import os
import shutil
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .errors import RectonnxError
from .images import (DEFAULT_MAX_PIXELS, MAX_SIDE, DecodeBudget, ImageLoadError, Preprocess,
                     iter_image_paths, load_image, resolved)

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


class SidecarWarning(UserWarning):
    """The model's sidecar JSON has something that is not used (e.g. ``classes`` of another
    length than the model's classes)."""


# -- preprocessing settings ---------------------------------------------------------------------
def sidecar_path(model) -> Path | None:
    """``model.onnx`` -> ``model.json`` when that is a file, else None."""
    if not isinstance(model, (str, Path)):
        return None
    path = Path(model).with_suffix(".json")
    return path if path.is_file() else None


def sidecar(model) -> dict:
    """The JSON next to a model file (``model.onnx`` -> ``model.json``), or {}.

    Validated, with a ValueError naming the file and the key: the file must be a JSON object;
    ``classes``, when present, a list of strings (names by class index); ``preprocess`` an object
    (its values are checked by :func:`preprocess_for`). Whether ``classes`` has one name per
    class of the model is checked where the model is known (:func:`class_names`: a warning, and
    the names are not used). Other keys are free.
    """
    path = sidecar_path(model)
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the model's sidecar JSON "
                         f"({exc.strerror if isinstance(exc, OSError) else exc})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: the model's sidecar is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the model's sidecar must be a JSON object, got a JSON "
                         f"{type(data).__name__}")
    classes = data.get("classes")
    if classes is not None and not (isinstance(classes, list)
                                    and all(isinstance(c, str) for c in classes)):
        bad = (f"a {type(classes).__name__}" if not isinstance(classes, list) else
               "an entry " + repr(next(c for c in classes if not isinstance(c, str))))
        raise ValueError(f"{path}: 'classes' must be a list of class names (strings), got {bad}")
    if not isinstance(data.get("preprocess", {}), dict):
        raise ValueError(f"{path}: 'preprocess' must be a JSON object of Preprocess fields, got "
                         f"a {type(data['preprocess']).__name__}")
    return data


def class_names(model, num_classes: int | None) -> list[str] | None:
    """The sidecar's ``classes`` when it has one name per class of the model (``num_classes``;
    None: not known, taken as is); of another length, a warning and None (the manifest then has
    no ``target_name``), never a wrong or missing name."""
    names = sidecar(model).get("classes")
    if names is not None and num_classes and len(names) != num_classes:
        warnings.warn(f"{sidecar_path(model)}: 'classes' has {len(names)} name(s) but the model "
                      f"has {num_classes} classes; class names are left out", SidecarWarning,
                      stacklevel=2)
        return None
    return names


def _floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None


class PreprocessOverrideWarning(UserWarning):
    """Command-line preprocessing replaces different values of the model's own sidecar."""


def _warn_on_overrides(model, own: dict, settings: dict, std) -> None:
    """Warn, naming both, where options change a value the model's sidecar sets (the model was
    trained with its own preprocessing: e.g. ``--preset imagenet`` on a model that takes
    ``(x - 127) / 128`` gives wrong predictions)."""
    chosen = dict(settings)
    if std is not None:
        chosen["std"] = _floats(std)
    try:  # compare the canonical forms (a size 224 is [224, 224])
        before, after = Preprocess.from_dict(own).to_dict(), Preprocess.from_dict(chosen).to_dict()
    except (ValueError, TypeError):
        return  # the invalid value is reported where it is used
    changed = [f"{key} {before[key]} -> {after[key]}" for key in sorted(own)
               if key in before and before[key] != after.get(key)]
    if changed:
        warnings.warn(PreprocessOverrideWarning(
            f"the options replace the preprocessing of {sidecar_path(model)} ({'; '.join(changed)}): "
            "predictions are wrong unless the model was trained that way"), stacklevel=3)


def preprocess_for(model, *, size=None, resize=None, mean=None, std=None,
                   preset=None) -> Preprocess:
    """Preprocessing from the model's sidecar JSON, then a preset, then explicit options.

    Sizes are bounded (``Preprocess`` refuses a side over ``MAX_SIDE`` = 8192 px): a bad value
    in the sidecar is a ValueError naming the file and key, a bad option names the flag."""
    settings = dict(sidecar(model).get("preprocess", {}))
    try:
        Preprocess.from_dict(settings)
    except (ValueError, TypeError) as exc:
        text = str(exc).replace("Preprocess.", "preprocess.")
        if text.startswith("unknown"):
            text = "preprocess: " + text
        raise ValueError(f"{sidecar_path(model)}: {text}") from None
    for flag, value in (("--size", size), ("--resize", resize)):
        if value is not None and not 1 <= value <= MAX_SIDE:
            raise ValueError(f"{flag} must be between 1 and {MAX_SIDE} pixels, got {value}")
    own = dict(settings)
    if preset:
        settings.update(PRESETS[preset])
    if size is not None:
        settings["size"] = size
    if resize is not None:
        settings["resize"] = resize
    if mean is not None:
        settings["mean"] = _floats(mean)
    _warn_on_overrides(model, own, settings, std)
    if std is not None:
        settings["std"] = _floats(std)
    return Preprocess.from_dict(settings)


def pixel_preprocess(preprocess: Preprocess) -> Preprocess:
    """For a model that takes integer pixels (uint8) and casts them itself: the default
    preprocessing (values in [0, 1]) scaled to 0..255; a sidecar's or the flags' own scaling
    stays."""
    if preprocess.scale != 1.0 or any(m != 0 for m in preprocess.mean) or \
            any(s != 1 for s in preprocess.std):
        return preprocess
    return Preprocess.from_dict({**preprocess.to_dict(), "scale": 255.0})


def as_integer_pixels(batch: np.ndarray, dtype) -> np.ndarray:
    """Decoded (float) pixels as the integer type a model takes: rounded and clipped."""
    limits = np.iinfo(dtype)
    return np.clip(np.rint(batch), limits.min, limits.max).astype(dtype)


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


def check_max_pixels(max_pixels) -> None:
    """``max_pixels`` is None (no limit) or a whole number of at least 1."""
    if max_pixels is not None and (isinstance(max_pixels, bool) or not (
            isinstance(max_pixels, int) and max_pixels >= 1)):
        raise ValueError(f"--max-pixels must be a whole number of at least 1, got {max_pixels!r}")


def parse_bytes(text: str | int | None, flag: str = "--memory-budget") -> int | None:
    """``"2GB"``, ``"512M"``, ``"1.5GiB"`` or a plain number of bytes -> int (None stays None).

    Refuses (ValueError naming ``flag``) what is not a finite size of at least one byte:
    ``inf``, ``nan``, zero, negative sizes and fractions of a byte such as ``0.1B``."""
    if text is None:
        return None
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 1:
            raise ValueError(f"{flag} must be at least 1 byte, got {text!r}")
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
        raise ValueError(f"{flag}: expected a size such as 2GB or 512MiB, got {text!r}") from None
    if not math.isfinite(size):
        raise ValueError(f"{flag} must be a finite size such as 2GB, got {text!r}")
    if size < 1:
        raise ValueError(f"{flag} must be at least 1 byte, got {text!r}")
    return int(size)


# -- files ------------------------------------------------------------------------------------
def write_all(fd: int, data) -> None:
    """``os.write`` until every byte is written: a short write is retried, and a write that
    writes nothing is a full disk (ENOSPC), never a silent loss."""
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.ENOSPC, "No space left on device (a write wrote nothing)")
        view = view[written:]


class _FileWriter(io.RawIOBase):
    """A binary file on a raw descriptor for the writers (numpy, PIL, zipfile): every byte goes
    through :func:`write_all` (so short writes and ENOSPC are seen with their errno). Not a
    ``BufferedWriter``, so numpy cannot ``tofile`` past it (its C stdio writes report a full disk
    as "3072 requested and 992 written", without an errno). Seekable (zipfile rewrites headers);
    buffered in 1 MiB."""

    def __init__(self, fd: int):
        super().__init__()
        self.fd = fd
        self._buffer = bytearray()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        self._buffer += data
        if len(self._buffer) >= 1 << 20:
            self.flush()
        return size

    def flush(self) -> None:
        if self._buffer:
            write_all(self.fd, self._buffer)
            self._buffer.clear()

    def tell(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_CUR) + len(self._buffer)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.flush()
        return os.lseek(self.fd, offset, whence)

    def discard(self) -> None:
        """Forget what is buffered (the file is being abandoned)."""
        self._buffer.clear()


class OutputDir:
    """The output directory: atomic writes, the lock, and disk errors turned into OutputError.

    Temporary files are named ``<pid>-<n>-<hash>.tmp`` whatever the final name, so a long input
    name cannot push them past the file system's name limit (:attr:`name_max`)."""

    def __init__(self, root: Path, *, fsync: bool = False):
        self.root = Path(root)
        self.fsync = fsync
        self.tmp = self.root / TMP_DIR
        self._lock = None
        self._counter = itertools.count(1)

    @property
    def name_max(self) -> int:
        """The longest file name (bytes) the output's file system takes (255 when unknown)."""
        try:
            return int(os.pathconf(self.root, "PC_NAME_MAX"))
        except (OSError, ValueError, AttributeError):
            return 255

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
        try:
            self.tmp.mkdir(exist_ok=True)
        except OSError as exc:
            self.close()
            raise self.error(exc, self.tmp) from None
        return self

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _no_space(self) -> bool:
        try:
            return os.statvfs(self.root).f_bavail == 0
        except (OSError, AttributeError):
            return False

    def error(self, exc: OSError, path: Path) -> OutputError:
        """The OutputError of ``exc``; ``disk_full`` on it says whether freeing space helps.

        A full disk is named as such whichever way it shows (ENOSPC, EDQUOT, or an errno-less
        error of a short write while the file system has no space left); a name over the file
        system's limit is named as that, never as a full disk."""
        if exc.errno in DISK_FULL or (exc.errno is None and self._no_space()):
            error = OutputError(f"disk full while writing {path} (no space left in {self.root})")
            error.disk_full = True
            return error
        if exc.errno == errno.ENAMETOOLONG:
            longest = max((len(os.fsencode(part)) for part in Path(path).parts), default=0)
            error = OutputError(f"cannot write {path}: file name too long ({longest} bytes; the "
                                f"file system of {self.root} allows {self.name_max})")
        else:
            reason = exc.strerror or str(exc) or type(exc).__name__
            error = OutputError(f"cannot write {path}: {reason}")
        error.disk_full = False
        return error

    def write(self, relative: str, write: Callable[[io.RawIOBase], None]) -> str:
        """Write ``root/relative`` atomically (temp file, then ``os.replace``); returns it."""
        final = self.root / relative
        digest = hashlib.sha256(os.fsencode(relative)).hexdigest()[:12]
        tmp = self.tmp / f"{os.getpid()}-{next(self._counter)}-{digest}.tmp"
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0),
                         0o666)
            handle = _FileWriter(fd)
            try:
                write(handle)
                handle.flush()
                if self.fsync:
                    os.fsync(fd)
            except BaseException:
                handle.discard()
                raise
            finally:
                handle.close()
                os.close(fd)
            os.replace(tmp, final)
        except OSError as exc:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise self.error(exc, final) from None
        except BaseException:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise
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


class JsonLines:
    """An append-only JSON-lines file whose lines are never torn: each line goes out in one
    ``os.write`` of the whole line, and a failed or short write is cut back (``ftruncate``) to
    the length before it, then raised as ENOSPC (a short write to a regular file means the disk
    is full)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: int | None = None

    def append(self, record: dict, *, fsync: bool = False) -> None:
        line = (json.dumps(record) + "\n").encode("utf-8")
        if self.fd is None:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                              | getattr(os, "O_BINARY", 0), 0o666)
        before = os.fstat(self.fd).st_size
        try:
            written = os.write(self.fd, line)
            if written != len(line):
                raise OSError(errno.ENOSPC, f"No space left on device (wrote {written} of "
                                            f"{len(line)} bytes)")
            if fsync:
                os.fsync(self.fd)
        except OSError:
            try:
                os.ftruncate(self.fd, before)
            except OSError:
                pass
            raise

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def read_json_lines(path: Path) -> tuple[list[dict], int]:
    """(the records of the whole lines of ``path``, its length without a torn last line)."""
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    records = []
    for line in data[:keep].splitlines():
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # a line torn by an earlier crash
        if isinstance(record, dict) and isinstance(record.get("input"), str):
            records.append(record)
    return records, keep


class Manifest:
    """``manifest.jsonl``: one JSON line per finished image; the index of what is done."""

    def __init__(self, path: Path, output: OutputDir):
        self.path = Path(path)
        self.output = output
        self.done: dict[str, dict] = {}
        self.appended = 0  # records written by this run
        self._lines = JsonLines(self.path)

    def load(self) -> "Manifest":
        """Read finished records; a torn last line (the run was killed mid-write) is cut off."""
        if not self.path.is_file():
            return self
        records, keep = read_json_lines(self.path)
        for record in records:  # a torn line's image is done again
            self.done[record["input"]] = record
        if keep != self.path.stat().st_size:
            try:
                os.truncate(self.path, keep)
            except OSError as exc:
                raise self.output.error(exc, self.path) from None
        return self

    def taken_files(self) -> set[str]:
        names = set()
        for record in self.done.values():
            names.update(v for k, v in record.get("files", {}).items() if k != "key")
        return names

    def append(self, records: Iterable[dict]) -> None:
        """Append records, each line whole or not at all (:class:`JsonLines`)."""
        for record in records:
            try:
                self._lines.append(record, fsync=self.output.fsync)
            except OSError as exc:
                raise self.output.error(exc, self.path) from None
            self.done[record["input"]] = record
            self.appended += 1

    def close(self) -> None:
        self._lines.close()


def append_jsonl(path: Path, records: Iterable[dict]) -> None:
    lines = JsonLines(path)
    try:
        for record in records:
            lines.append(record)
    finally:
        lines.close()


# -- the job ------------------------------------------------------------------------------------
@dataclass
class Item:
    """One image: where it is and the name (relative, without extension) of its outputs."""

    path: Path
    key: str   # absolute path, the manifest's ``input``
    name: str  # e.g. ``a/cat``


def model_fingerprint(model) -> str:
    """sha256 of the model file or proto (a retrained model must not resume an old run)."""
    from .artifact import source_fingerprint

    return source_fingerprint(model)


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


def fit_name(name: str, limit: int = 255, reserve: int = 0) -> str:
    """``name``, or, when its bytes plus ``reserve`` (a suffix to come) exceed ``limit``, its
    head cut at a character boundary + ``~`` + 16 hex digits of the whole name's sha256: short
    enough for the file system, and still one name per input name."""
    raw = os.fsencode(name)
    if len(raw) + reserve <= limit:
        return name
    tag = "~" + hashlib.sha256(raw).hexdigest()[:16]
    keep = max(0, limit - reserve - len(tag))
    head = name
    while len(os.fsencode(head)) > keep:
        head = head[:-1]
    return head + tag


def plan_items(paths: Sequence[Path], taken: set[str], fmt: str,
               write_png: bool, write_overlay: bool, name_max: int = 255) -> list[Item]:
    """Output names mirroring the tree below the inputs' common folder, never colliding; a name
    too long for the file system (``name_max`` bytes with its longest suffix) is shortened by
    :func:`fit_name`."""
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
    reserve = max(len(os.fsencode(s)) for s in suffixes)
    for path, absolute in zip(paths, resolved):
        relative = absolute.relative_to(root).with_suffix("")
        folders = [fit_name(part, name_max) for part in relative.parts[:-1]]

        def candidate(n: int) -> str:
            stem = relative.name if n == 1 else f"{relative.name}_{n}"
            return "/".join(folders + [fit_name(stem, name_max, reserve)])

        name, n = candidate(1), 1
        while any(name + s in taken for s in suffixes):
            n += 1
            name = candidate(n)
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


def _spatial_size(attribution: np.ndarray, layout: str) -> tuple[int, ...]:
    """The height and width of one image's map (``layout`` CHW or HWC); a layer attribution
    (option wrt) has its layer's, which may differ from the image's (no overlay then)."""
    if attribution.ndim == 2:
        return attribution.shape
    return attribution.shape[1:] if layout == "CHW" else attribution.shape[:2]


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
        if self.classes and len(self.classes) != len(logits):  # a model of unknown class count
            warnings.warn(f"'classes' has {len(self.classes)} name(s) but the model has "
                          f"{len(logits)} classes; class names are left out", SidecarWarning,
                          stacklevel=2)
            self.classes = None
        if self.classes:
            record["target_name"] = self.classes[int(target)]
        return record

    def add(self, item: Item, attribution: np.ndarray, logits: np.ndarray, target: int,
            display: np.ndarray | None, layers: dict | None = None) -> list[dict]:
        """Write one image's files; returns the manifest records now safe to append.

        The record is made first, so an image whose record fails leaves no file; a write that
        fails removes the files of that image already written (no file outside the manifest)."""
        from .visualize import heatmap_rgb, overlay_rgb

        files: dict[str, str] = {}
        record = self.record(item, attribution, logits, target, files)  # files filled below
        try:
            if self.fmt == "npy":
                files["attribution"] = self.output.write(f"{item.name}.npy",
                                                         write_npy(attribution))
            elif self.fmt == "npz":
                files["attribution"] = self.output.write(
                    f"{item.name}.npz", write_npz({"attribution": attribution}))
            if layers:  # layer_outputs: the map at every activation, one compressed file
                files["layers"] = self.output.write(f"{item.name}_layers.npz",
                                                    write_npz(layers))
            drawable = attribution.ndim in (2, 3)  # a layer attribution (wrt) may be any rank
            if self.write_png and drawable:
                files["heatmap"] = self.output.write(
                    f"{item.name}.png", write_png(heatmap_rgb(attribution, layout=self.layout)))
            if self.write_overlay and display is not None and drawable and \
                    _spatial_size(attribution, self.layout) == display.shape[:2]:
                files["overlay"] = self.output.write(
                    f"{item.name}_overlay.png",
                    write_png(overlay_rgb(display, attribution, layout=self.layout)))
        except BaseException:
            for name in files.values():
                try:
                    (self.output.root / name).unlink()
                except OSError:
                    pass
            raise
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


def load_item(item: Item, preprocess: Preprocess, keep_display: bool, *,
              max_pixels: int | None = DEFAULT_MAX_PIXELS, budget: DecodeBudget | None = None):
    """(array, display) or the ImageLoadError message, never an exception for a bad file, never
    an empty message. ``max_pixels`` and ``budget``: as for :func:`~rectonnx.images.load_image`."""
    try:
        array, display = load_image(item.path, preprocess, max_pixels=max_pixels, budget=budget)
    except ImageLoadError as exc:
        return str(exc) or f"{item.path}: cannot read image ({type(exc).__name__})"
    except MemoryError as exc:
        return (f"{item.path}: out of memory while decoding "
                f"({' '.join(str(exc).split()) or type(exc).__name__}); lower --max-pixels or "
                "--workers")
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


def job_settings(model, *, spec, input_name, output_name, target, preprocess: Preprocess,
                 fmt: str) -> dict:
    """What decides the results; a resumed run must match (``model`` is only informative).
    ``spec``: the explainer's ``ExplanationSpec``, recorded option by option (its ``runtime``
    is left out: it changes no result), or None for a graph that recorded no spec."""
    recorded = {k: v for k, v in spec.to_dict().items() if k != "runtime"} \
        if spec is not None else {"method": "unknown"}
    return {"model": os.path.abspath(model) if isinstance(model, (str, Path)) else "<in memory>",
            "model_sha256": model_fingerprint(model), **recorded,
            "input_name": input_name, "output_name": output_name,
            "target": target, "preprocess": preprocess.to_dict(), "format": fmt}


class Job:
    """An output directory opened for one run: lock, settings, manifest, and what is left."""

    def __init__(self, out_dir, paths: Sequence[Path], settings: dict, *, fmt: str,
                 write_png: bool, write_overlay: bool, fsync: bool = False):
        self.output = OutputDir(Path(out_dir), fsync=fsync)
        inside = resolved(out_dir)  # the output folder and what is in it are never inputs
        self.paths = [p for p in paths if not (resolved(p) == inside
                                               or inside in resolved(p).parents)]
        self.settings = settings
        self.fmt, self.write_png, self.write_overlay = fmt, write_png, write_overlay

    def __enter__(self) -> "Job":
        self.output.open()
        try:
            check_settings(self.output.root, self.settings, self.output)
            self.manifest = Manifest(self.output.root / MANIFEST, self.output).load()
            self.failed = self._load_failures()
        except BaseException:
            self.output.close()
            raise
        todo = [p for p in self.paths if os.path.abspath(p) not in self.manifest.done]
        self.resumed = len(self.paths) - len(todo)
        self.items = plan_items(todo, self.manifest.taken_files(), self.fmt, self.write_png,
                                self.write_overlay, self.output.name_max)
        return self

    def __exit__(self, kind, exc, trace) -> None:
        self.manifest.close()
        self.output.close()
        if isinstance(exc, OutputError) and "re-run" not in str(exc):
            fix = "free space" if getattr(exc, "disk_full", False) else "fix the output directory"
            raise OutputError(f"{exc}; the {len(self.manifest.done)} image(s) listed in "
                              f"{self.output.root / MANIFEST} are complete: {fix} and re-run "
                              "the same command to resume") from None

    def _load_failures(self) -> set[str]:
        """Inputs already in ``failures.jsonl``; the file is compacted first (atomically) to one
        line per input (the latest), without torn lines or inputs the manifest has since."""
        path = self.output.root / FAILURES
        if not path.is_file():
            return set()
        records, keep = read_json_lines(path)
        latest = {r["input"]: r for r in records if r["input"] not in self.manifest.done}
        if len(latest) != len(records) or keep != path.stat().st_size:
            text = "".join(json.dumps(r) + "\n" for r in latest.values()).encode("utf-8")
            self.output.write(FAILURES, lambda handle: handle.write(text))
        return set(latest)

    def record_failures(self, failures: list[tuple[Item, str]], summary: "Summary") -> None:
        """Report failures; ``failures.jsonl`` gets one line per input (not again on resume)."""
        if failures:
            summary.failures += [(str(item.path), message) for item, message in failures]
            new = {item.key: message or f"{item.path}: cannot read this file"
                   for item, message in failures if item.key not in self.failed}
            try:
                append_jsonl(self.output.root / FAILURES,
                             [{"input": key, "error": m} for key, m in new.items()])
            except OSError as exc:
                raise self.output.error(exc, self.output.root / FAILURES) from None
            self.failed.update(new)


def explain_images(model, sources, out_dir, *, preprocess: Preprocess, method=None,
                   input_name=None, output_name=None, target=-1, batch_size=16,
                   memory_budget=None, fmt="npy", shard_size=256, write_png=True,
                   write_overlay=True, device="auto", workers=None,
                   max_pixels=DEFAULT_MAX_PIXELS, chunks_ahead=2,
                   fsync=False, progress=True, explainer=None,
                   **options) -> Summary:
    """Explain every image in ``sources`` (files, directories, globs, ``.txt`` lists).

    ``method`` and ``options``: the explanation, as for ``rectonnx.rewrite`` (a method name
    and its options, or an ``ExplanationSpec``); ``model`` may be an explainer graph.
    See the module docstring for the outputs, resuming and atomicity. ``target``: one class for
    all images (negative = each image's predicted class). ``batch_size``: images per chunk;
    ``memory_budget`` (bytes or ``"2GB"``) lowers it so the activations fit. ``workers``:
    decoding threads (default: the CPU count, at most 8). ``max_pixels``: larger images are
    refused (listed in ``failures.jsonl``; None: Pillow's guard only), and the decoding threads
    together hold at most about two such images' decoding memory (a
    :class:`~rectonnx.images.DecodeBudget`). ``out_dir`` and anything in it are never inputs.
    The sidecar JSON is validated first (:func:`sidecar`, :func:`class_names`). ``explainer``: a ready
    :class:`~rectonnx.runtime.Explainer` for the same model and settings (saves the rewrite).
    Raises OutputError when results cannot be written; unreadable images are skipped.
    """
    from tqdm import tqdm

    from .runtime import Explainer

    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
    check_max_pixels(max_pixels)
    paths = iter_image_paths(sources, exclude=[out_dir])
    budget = parse_bytes(memory_budget)
    sidecar(model)  # a malformed sidecar fails before the model is rewritten
    if explainer is None:
        explainer = Explainer(model, method, input_name=input_name, output_name=output_name,
                              batch_size=batch_size, **options,
                              providers=providers_for(device),
                              memory_budget_mb=budget / 2**20 if budget else None,
                              spinning=False)
    explainer.check_target(target, 1)  # a class out of range fails before any image is read
    classes = class_names(model, getattr(explainer, "num_classes", None))
    batch_size = min(batch_size, explainer.batch_size)  # the Explainer fits it to the budget
    preprocess = fit_preprocess_to_model(preprocess, explainer.input_shape)
    if explainer.integer_pixels:
        preprocess = pixel_preprocess(preprocess)
    settings = job_settings(model, spec=explainer.spec, input_name=input_name,
                            output_name=output_name, target=target, preprocess=preprocess,
                            fmt=fmt)
    method = explainer.method
    device_name = explainer.providers[0].replace("ExecutionProvider", "")
    summary = Summary(Path(out_dir), device=device_name)
    started = time.perf_counter()
    with Job(out_dir, paths, settings, fmt=fmt, write_png=write_png,
             write_overlay=write_overlay, fsync=fsync) as job:
        summary.resumed = job.resumed
        writer = ResultWriter(job.output, job.manifest, fmt=fmt, shard_size=shard_size,
                              layout=preprocess.layout, method=method,
                              classes=classes, write_png=write_png,
                              write_overlay=write_overlay)
        chunks = [job.items[i:i + batch_size] for i in range(0, len(job.items), batch_size)]
        decoding = DecodeBudget.for_pixels(max_pixels)  # shared by the decoding threads

        def load(item):
            return load_item(item, preprocess, write_overlay, max_pixels=max_pixels,
                             budget=decoding)

        def finish(results) -> None:  # on the writer thread; each line right after its files
            for item, display, attribution, logits, chosen, layers in results:
                job.manifest.append(writer.add(item, attribution, logits, chosen, display,
                                               layers))

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
    model's spatial size is dynamic); (item, display, attribution, logits, target, layers) in
    order (``layers``: the maps at every activation when the graph has them, else {})."""
    groups: dict[tuple, list] = {}
    for index, (item, (array, display)) in enumerate(loaded):
        groups.setdefault(array.shape, []).append((index, item, array, display))
    out = []
    for members in groups.values():
        batch = np.stack([m[2] for m in members])
        if getattr(explainer, "integer_pixels", False):
            batch = as_integer_pixels(batch, explainer.input_dtype)
        result = explainer.explain(batch, target)
        for i, (index, item, _, display) in enumerate(members):
            out.append((index, item, display, result.attribution[i], result.logits[i],
                        int(result.target[i]),
                        {name: value[i] for name, value in result.layers.items()}))
    return [row[1:] for row in sorted(out, key=lambda row: row[0])]
