"""Writing files so that a reader sees the old content or the new one, never a part.

``atomic_write_bytes(path, data)`` writes a temporary file in the same directory (a short name,
whatever the length of ``path``'s), flushes and fsyncs it, renames it over ``path``
(``os.replace``, atomic on POSIX and Windows) and fsyncs the directory, so the rename survives
a power cut. On any failure, an interrupt included, the temporary file is removed and ``path``
is as it was; a process killed outright leaves at most a ``.rectonnx-*.tmp`` file beside it.

``save_model_atomic(model, path)`` saves an ONNX model that way; a model too large for one
protobuf (over ``EXTERNAL_DATA_LIMIT`` bytes) is saved with its large tensors in
``<name>.data`` beside it, written the same way: an existing ``.data`` file is replaced, never
appended to (``onnx.save`` appends, so saving twice doubled the file).
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

import onnx

EXTERNAL_DATA_LIMIT = 1_800_000_000  # bytes; protobuf cannot hold a model over 2 GiB
EXTERNAL_TENSOR_BYTES = 1024  # tensors at least this large go to the .data file (as onnx.save)
CHUNK = 64 * 2 ** 20  # bytes per write call (os.write takes at most about 2 GiB at once)


def _write(fd: int, data) -> None:
    """Write all of ``data`` to the file descriptor ``fd``."""
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view[:CHUNK])
        view = view[written:]


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory: renames there are durable already
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary(path: Path) -> tuple[int, Path]:
    """A new file beside ``path`` with a short name (``path``'s own may be near 255 bytes)."""
    try:
        kept = stat.S_IMODE(path.stat().st_mode)  # a replaced file keeps its permissions
    except OSError:
        kept = None  # a new file: 0o666 less the umask, as open() gives
    while True:
        tmp = path.with_name(f".rectonnx-{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                         0o666)
        except FileExistsError:
            continue
        if kept is not None:
            try:
                os.chmod(tmp, kept)
            except OSError:
                pass
        return fd, tmp


def _write_temporary(path: Path, chunks) -> Path:
    """Write ``chunks`` (bytes-like objects) to a new, fsynced temporary file beside ``path``."""
    fd, tmp = _temporary(path)
    try:
        try:
            for chunk in chunks:
                _write(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        _remove(tmp)
        raise
    return tmp


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def atomic_write_bytes(path, data) -> None:
    """Replace ``path``'s content by ``data`` (bytes, or str written as UTF-8) atomically."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = _write_temporary(path, [data])
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_directory(path.parent)


def save_model_atomic(model: onnx.ModelProto, path, *, external_data: bool | None = None,
                      location: str | None = None) -> list[Path]:
    """Save ``model`` to ``path`` atomically; return the files written.

    ``external_data``: None (default) puts the large tensors in ``location`` (default
    ``<path name>.data``, beside ``path``) only when the model is over ``EXTERNAL_DATA_LIMIT``
    bytes. The data file is complete and fsynced before the model that points at it replaces
    ``path``; an existing data file is replaced, not appended to. ``model`` is left as it was.
    """
    path = Path(path)
    if external_data is None:
        external_data = model.ByteSize() > EXTERNAL_DATA_LIMIT
    if not external_data:
        atomic_write_bytes(path, model.SerializeToString())
        return [path]
    location = location or f"{path.name}.data"
    if Path(location).name != location or location in (".", ".."):
        raise ValueError(f"external data location {location!r}: a file name beside the model "
                         "is expected")
    data_path = path.with_name(location)
    moved = _move_to_external(model, location)
    try:
        data_tmp = _write_temporary(data_path, (raw for _, raw, _ in moved))
        try:
            model_tmp = _write_temporary(path, [model.SerializeToString()])
        except BaseException:
            _remove(data_tmp)
            raise
    finally:
        _restore(moved)
    try:
        os.replace(data_tmp, data_path)
        os.replace(model_tmp, path)
    except BaseException:
        _remove(data_tmp)
        _remove(model_tmp)
        raise
    _fsync_directory(path.parent)
    return [path, data_path]


def _move_to_external(model: onnx.ModelProto, location: str) -> list[tuple]:
    """Point every large raw tensor of ``model`` at ``location`` (offsets in file order) and
    take its bytes out; returns ``(tensor, bytes, had data_location)`` in file order, for
    ``_restore``."""
    from onnx.external_data_helper import _get_all_tensors

    moved, offset = [], 0
    for tensor in _get_all_tensors(model):
        if not tensor.HasField("raw_data") or len(tensor.raw_data) < EXTERNAL_TENSOR_BYTES:
            continue
        raw, had_location = tensor.raw_data, tensor.HasField("data_location")
        tensor.ClearField("raw_data")
        del tensor.external_data[:]
        for key, value in (("location", location), ("offset", str(offset)),
                           ("length", str(len(raw)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensor.data_location = onnx.TensorProto.EXTERNAL
        moved.append((tensor, raw, had_location))
        offset += len(raw)
    return moved


def _restore(moved: list[tuple]) -> None:
    for tensor, raw, had_location in moved:
        del tensor.external_data[:]
        tensor.ClearField("data_location")
        if had_location:
            tensor.data_location = onnx.TensorProto.DEFAULT
        tensor.raw_data = raw
