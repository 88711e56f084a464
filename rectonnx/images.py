"""Loading and preprocessing images for classifiers.

A :class:`Preprocess` says how a picture becomes a model input; it is plain data and round-trips
through JSON (:meth:`Preprocess.to_dict` / :meth:`Preprocess.from_dict`). For one image::

    p  = (the source pixel values) / (2**bits - 1)        # in [0, 1]; 8-bit -> /255, 16-bit -> /65535
    p  = resize / centre-crop p                           # torchvision's Resize(resize) + CenterCrop(size)
    x  = (p * scale - mean) / std                          # per channel

``scale`` multiplies the [0, 1] values, so ``scale=255`` gives Caffe-style [0, 255] inputs;
[-1, 1] inputs are ``mean=0.5, std=0.5``. Geometry uses PIL's (antialiased) resampling on the
8-bit image, exactly as torchvision's ``Resize`` + ``CenterCrop`` + ``ToTensor`` do on a PIL image,
so the tensors match a torchvision pipeline. High-bit-depth images (``I;16``, ``I``, ``F``) are
resampled in float so no precision is lost.

Image modes: ``1``/``L`` (grayscale), ``LA``/``RGBA``/``P`` with transparency (composited onto
``Preprocess.background``, white by default, or alpha dropped when ``background=None``),
``P`` (palette), ``I;16*`` (scaled by the true bit depth: the TIFF ``BitsPerSample`` tag when
present, else 16), ``I`` (32-bit container: 16-bit data, as older Pillow versions open 16-bit
PNGs, unless values exceed 65535), ``F`` (taken as already in [0, 1]), ``CMYK``/``YCbCr``/...
(converted to RGB by PIL). The EXIF orientation is applied first. 16-bit *colour* PNGs are opened
by PIL as 8-bit RGB (a PIL limitation), so they lose their low byte.

Colour conversions: a grayscale image fed to a 3-channel model is repeated on all channels; a
colour image fed to a 1-channel model is converted with the ITU-R 601 luma weights
(0.299, 0.587, 0.114), the ones PIL's ``convert("L")`` uses, in float.

Hostile files: only regular files are read; a FIFO, socket or device is refused
(:class:`ImageLoadError`) without being opened for reading, so it never blocks. An image of more
than ``max_pixels`` pixels (:data:`DEFAULT_MAX_PIXELS`, 100 megapixels; ``--max-pixels`` on the
command line) is refused before it is decoded, unless it is a JPEG that can be decoded at 1/2,
1/4 or 1/8 scale (PIL's ``draft``) to within the limit while still covering the target size.
Images within the limit are decoded at full size, so their tensors stay exact. Pillow's own
decompression-bomb guard stays on. A :class:`DecodeBudget` shared by decoding threads bounds the
estimated bytes (:func:`decode_bytes`) being decoded at once. ``Preprocess`` sizes are at most
:data:`MAX_SIDE` pixels a side. Directory walks and globs visit each real directory once
(symlink loops end), and ``exclude`` keeps an output folder out of the inputs.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
import os
import stat
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DecodeBudget",
    "IMAGE_EXTENSIONS",
    "ImageLoadError",
    "MAX_SIDE",
    "Preprocess",
    "iter_image_paths",
    "load_batch",
    "load_image",
    "preprocess_image",
    "to_display",
    "decode_bytes",  # estimates for DecodeBudget
]

#: File extensions picked up when scanning directories and glob patterns (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)  # ITU-R 601, as PIL's convert("L")
_RESAMPLE = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
_DTYPES = ("float32", "float16", "float64")

#: Largest ``Preprocess.size`` / ``resize`` side: larger is a typo or a hostile sidecar (a
#: 60000 px target needs tens of GB per image).
MAX_SIDE = 8192
#: Default pixel limit of a decoded image (``load_image(max_pixels=...)``, ``--max-pixels``).
DEFAULT_MAX_PIXELS = 100_000_000


class ImageLoadError(ValueError):
    """A file could not be read as an image. The message is one line and names the file."""


# --------------------------------------------------------------------------------------------
# Preprocess
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocess:
    """How an image file becomes a model input (see the module docstring for the formula).

    size:       target ``(H, W)`` (an int means square); ``None`` keeps the (resized) size.
    resize:     resize the *shorter* side to this before a centre crop to ``size`` (ImageNet's
                "resize 256, crop 224"); ``None`` resizes straight to ``size`` (aspect not kept).
                If the crop would not fit, the image is scaled up just enough to cover it.
    mean, std:  per channel (length 1 or ``channels``), in the units after ``scale``.
    scale:      multiplies the [0, 1] pixel values before ``mean``/``std``.
    channels:   3 = RGB, 1 = grayscale.
    layout:     ``"NCHW"`` or ``"NHWC"``; :func:`load_image` returns CHW resp. HWC.
    dtype:      ``"float32"`` (default), ``"float16"`` or ``"float64"``.
    bgr:        reverse the channel order (Caffe-converted models).
    background: RGB colour transparent pixels are composited onto; ``None`` drops the alpha.
    resample:   PIL filter for resizing: nearest, bilinear (torchvision's default), bicubic,
                lanczos, box, hamming.
    """

    size: int | tuple[int, int] | None = None
    resize: int | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1.0
    channels: int = 3
    layout: str = "NCHW"
    dtype: str = "float32"
    bgr: bool = False
    background: tuple[int, int, int] | None = (255, 255, 255)
    resample: str = "bilinear"

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if self.size is not None:
            size = (self.size, self.size) if isinstance(self.size, (int, np.integer)) else tuple(self.size)
            if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
                raise ValueError(f"Preprocess.size must be a positive int or (H, W), got {self.size!r}")
            set_("size", (int(size[0]), int(size[1])))
            if max(self.size) > MAX_SIDE:
                raise ValueError(f"Preprocess.size must be at most {MAX_SIDE} pixels a side, got "
                                 f"{self.size[0]} x {self.size[1]}")
        if self.resize is not None and not (isinstance(self.resize, (int, np.integer)) and self.resize > 0):
            raise ValueError(f"Preprocess.resize must be a positive int or None, got {self.resize!r}")
        if self.resize is not None and self.resize > MAX_SIDE:
            raise ValueError(f"Preprocess.resize must be at most {MAX_SIDE} pixels, got {self.resize}")
        if self.channels not in (1, 3):
            raise ValueError(f"Preprocess.channels must be 1 or 3, got {self.channels!r}")
        for name in ("mean", "std"):
            v = getattr(self, name)
            v = (float(v),) if isinstance(v, (int, float, np.floating, np.integer)) else tuple(float(t) for t in v)
            if len(v) not in (1, self.channels):
                raise ValueError(f"Preprocess.{name} has {len(v)} values; need 1 or channels={self.channels}")
            set_(name, v)
        if any(s == 0 for s in self.std):
            raise ValueError(f"Preprocess.std must not contain 0, got {self.std!r}")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"Preprocess.scale must be a positive number, got {self.scale!r}")
        set_("scale", float(self.scale))
        layout = str(self.layout).upper()
        if layout not in ("NCHW", "NHWC"):
            raise ValueError(f"Preprocess.layout must be 'NCHW' or 'NHWC', got {self.layout!r}")
        set_("layout", layout)
        dtype = np.dtype(self.dtype).name
        if dtype not in _DTYPES:
            raise ValueError(f"Preprocess.dtype must be one of {_DTYPES}, got {self.dtype!r}")
        set_("dtype", dtype)
        if self.background is not None:
            bg = tuple(int(c) for c in self.background)
            if len(bg) != 3 or not all(0 <= c <= 255 for c in bg):
                raise ValueError(f"Preprocess.background must be an (R, G, B) of 0..255 or None, got {self.background!r}")
            set_("background", bg)
        if str(self.resample).lower() not in _RESAMPLE:
            raise ValueError(f"Preprocess.resample must be one of {_RESAMPLE}, got {self.resample!r}")
        set_("resample", str(self.resample).lower())

    # -- presets -------------------------------------------------------------------------
    @classmethod
    def imagenet(cls, **overrides: Any) -> "Preprocess":
        """torchvision's ImageNet evaluation transform: resize 256, crop 224, ImageNet mean/std."""
        kw: dict[str, Any] = dict(size=224, resize=256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
        kw.update(overrides)
        return cls(**kw)

    # -- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists); inverse of :meth:`from_dict`."""
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        """Build from a dict such as :meth:`to_dict` writes; missing keys take the defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown Preprocess field(s) {unknown}; known: {sorted(known)}")
        kw = dict(d)
        for k in ("size", "mean", "std", "background"):
            if isinstance(kw.get(k), list):
                kw[k] = tuple(kw[k])
        return cls(**kw)

    # -- helpers -------------------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """Shape of one preprocessed image (CHW or HWC), or None when ``size`` is None."""
        if self.size is None:
            return None
        h, w = self.size
        return (self.channels, h, w) if self.layout == "NCHW" else (h, w, self.channels)


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def _one_line(s: str) -> str:
    return " ".join(str(s).split())


_SPECIAL_FILES = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                  (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"))


def _not_regular(path: Path, mode: int) -> ImageLoadError:
    if stat.S_ISDIR(mode):
        return ImageLoadError(f"{path}: is a directory, not an image")
    kind = next((name for test, name in _SPECIAL_FILES if test(mode)), "a special file")
    return ImageLoadError(f"{path}: is {kind}, not a regular file; only regular files are read")


def _open_regular(path: Path) -> Any:
    """``path`` opened for binary reading; anything but a regular file is refused without being
    read (a FIFO would block forever, a device never end). Checked by ``stat`` before opening
    (a socket cannot be opened) and by ``fstat`` on the descriptor, opened non-blocking, after
    (no race with a rename in between)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ImageLoadError(f"{path}: no such file") from None
    except OSError as e:
        raise ImageLoadError(f"{path}: cannot open ({e.strerror or type(e).__name__})") from None
    if not stat.S_ISREG(mode):
        raise _not_regular(path, mode)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
                     | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise ImageLoadError(f"{path}: no such file") from None
    except OSError as e:
        raise ImageLoadError(f"{path}: cannot open ({e.strerror or type(e).__name__})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@contextmanager
def _reading(path: Path):
    """Every failure of PIL on ``path`` becomes a one-line ImageLoadError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        yield
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(f"{path}: not an image file (PIL cannot identify it)") from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"{path}: refused, too many pixels ({_one_line(e)}; Pillow's "
                             "decompression-bomb guard, PIL.Image.MAX_IMAGE_PIXELS)") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        reason = _one_line(e) or type(e).__name__
        raise ImageLoadError(f"{path}: cannot read image ({reason})") from e


def _megapixels(n: int) -> str:
    return f"{n / 1e6:.1f} megapixels"


def _limit_pixels(im: Any, path: Path, p: Preprocess | None, max_pixels: int | None) -> None:
    """Refuse an (opened, not yet decoded) image over ``max_pixels``, unless it is a JPEG that
    PIL can decode at 1/2, 1/4 or 1/8 scale to within the limit and still cover the size that
    ``p`` resizes to (``draft``, set here)."""
    if max_pixels is None:
        return
    w, h = im.size
    if w * h <= max_pixels:
        return
    if p is not None and getattr(im, "format", None) == "JPEG":
        new, _ = _geometry(w, h, p)
        if new is not None:
            side = max(new)  # covers the target whatever the EXIF rotation
            im.draft(None, (side, side))
            if im.width * im.height <= max_pixels:
                return
    raise ImageLoadError(
        f"{path}: refused: {w} x {h} = {_megapixels(w * h)}, more than the limit of "
        f"{_megapixels(max_pixels)} ({max_pixels} pixels; raise it with --max-pixels, or "
        "max_pixels= in Python)")


def _allow_in_pillow(max_pixels: int | None) -> None:
    """Pillow's decompression-bomb guard stays on; it is raised to ``max_pixels`` where that is
    higher, so an image the policy allows is neither warned about nor refused by Pillow."""
    from PIL import Image

    if max_pixels is not None and Image.MAX_IMAGE_PIXELS is not None \
            and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = int(max_pixels)


def _decode(im: Any, path: Path) -> tuple[Any, int | None]:
    """Fully decode and EXIF-orient an opened image: (PIL image, TIFF bits per sample or
    None)."""
    from PIL import ImageOps

    with _reading(path):
        im.load()  # decode now: truncated files fail here, not later
        try:
            ImageOps.exif_transpose(im, in_place=True)  # in place: no second copy of the pixels
        except Exception:  # broken EXIF must not make a readable image unreadable
            pass
        return im, _bits_from_tags(im)


_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "LA": 2, "La": 2, "PA": 2, "RGB": 3, "YCbCr": 3,
                    "LAB": 3, "HSV": 3}


def decode_bytes(width: int, height: int, mode: str) -> int:
    """Estimated peak bytes of decoding and preprocessing one ``width`` x ``height`` image of PIL
    ``mode``: the decoded pixels, an EXIF rotation of them, and the float32 or RGBA working
    copies (``2 * bytes per pixel + 12`` bytes a pixel)."""
    bpp = 2 if mode.startswith("I;16") else _BYTES_PER_PIXEL.get(mode, 4)
    return int(width) * int(height) * (2 * bpp + 12)


class DecodeBudget:
    """Bytes of image decoding in flight, shared by decoding threads. ``hold(n)`` waits until
    ``n`` more bytes fit in ``limit``; one image larger than the whole budget runs alone. So
    memory is bounded by the budget, not by the number of threads times the largest image."""

    def __init__(self, limit: int):
        self.limit = max(1, int(limit))
        self.used = 0
        self._free = threading.Condition()

    @classmethod
    def for_pixels(cls, max_pixels: int | None = None) -> "DecodeBudget":
        """Room for two of the largest images allowed (RGBA of ``max_pixels`` pixels)."""
        side = max_pixels or DEFAULT_MAX_PIXELS
        return cls(2 * decode_bytes(side, 1, "RGBA"))

    @contextmanager
    def hold(self, n: int):
        n = max(0, int(n))
        with self._free:
            while self.used and self.used + n > self.limit:
                self._free.wait()
            self.used += n
        try:
            yield
        finally:
            with self._free:
                self.used -= n
                self._free.notify_all()


def _bits_from_tags(im: Any) -> int | None:
    """BitsPerSample from a TIFF, if the file says it."""
    tags = getattr(im, "tag_v2", None)
    if tags is None:
        return None
    try:
        bits = tags.get(258)
        if isinstance(bits, (tuple, list)):
            bits = bits[0]
        return int(bits) if bits else None
    except Exception:
        return None


def _composite(im: Any, background: tuple[int, int, int] | None) -> Any:
    """RGBA-like image -> RGB, composited onto ``background`` (or alpha dropped)."""
    from PIL import Image

    rgba = im.convert("RGBA")
    if background is None:
        return rgba.convert("RGB")
    base = Image.new("RGBA", rgba.size, tuple(background) + (255,))
    return Image.alpha_composite(base, rgba).convert("RGB")


def _normalise_mode(im: Any, background: tuple[int, int, int] | None, where: str, bits: int | None = None) -> Any:
    """Return a PIL image in mode "RGB" or "L" (8-bit) or "F" (float gray in [0, 1])."""
    from PIL import Image

    mode = im.mode
    if mode in ("RGB", "L"):
        return im
    if mode == "1":
        return im.convert("L")
    if mode in ("LA", "La", "RGBA", "RGBa", "PA"):
        return _composite(im, background)
    if mode == "P":
        if "transparency" in im.info:
            return _composite(im, background)
        return im.convert("RGB")
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        a = np.asarray(im)
        if mode == "F":
            a = a.astype(np.float32, copy=False)
            if not np.all(np.isfinite(a)):
                raise ImageLoadError(f"{where}: float image contains NaN or infinite values")
        else:  # integers: min/max on the integers, then float64 only a slab at a time
            if a.size and a.min() < 0:
                raise ImageLoadError(f"{where}: mode {mode} image has negative values; cannot map them to [0, 1]")
            top = int(a.max()) if a.size else 0
            if not bits or bits > 32 or top > 2**bits - 1:
                bits = 16 if top <= 65535 else 32
            a = _unit_float32(a, float(2**bits - 1))
        return Image.fromarray(np.ascontiguousarray(a, dtype=np.float32))
    try:  # CMYK, YCbCr, RGBX, LAB, HSV, ...
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageLoadError(f"{where}: unsupported image mode {mode!r} ({_one_line(e)})") from None


def _unit_float32(a: np.ndarray, top: float) -> np.ndarray:
    """``clip(a / top, 0, 1)`` as float32, computed in float64 (the same numbers as one float64
    pass) but a slab of 256k pixels at a time: 4 bytes a pixel, not 3 x 8."""
    out = np.empty(a.shape, np.float32)
    rows = max(1, (1 << 18) // max(1, int(np.prod(a.shape[1:]))))
    for i in range(0, a.shape[0], rows):
        out[i:i + rows] = np.clip(a[i:i + rows] / top, 0.0, 1.0)
    return out


def _geometry(w: int, h: int, p: Preprocess) -> tuple[tuple[int, int] | None, tuple[int, int, int, int] | None]:
    """(resized (W, H) or None, crop box (left, top, right, bottom) or None) for a W x H image."""
    if p.resize is None:
        if p.size is None:
            return None, None
        th, tw = p.size
        return ((tw, th) if (tw, th) != (w, h) else None), None
    # shorter side -> resize, longer side truncated: exactly torchvision's Resize(int)
    short, long_ = (w, h) if w <= h else (h, w)
    new_short, new_long = p.resize, int(p.resize * long_ / short)
    nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
    if p.size is not None:
        th, tw = p.size
        if nw < tw or nh < th:  # crop would not fit: scale up just enough to cover it
            s = max(tw / w, th / h)
            nw, nh = max(tw, math.ceil(w * s)), max(th, math.ceil(h * s))
    new = (nw, nh) if (nw, nh) != (w, h) else None
    if p.size is None:
        return new, None
    th, tw = p.size
    top = int(round((nh - th) / 2.0))  # torchvision's CenterCrop rounding
    left = int(round((nw - tw) / 2.0))
    box = (left, top, left + tw, top + th)
    return new, (box if (nw, nh) != (tw, th) else None)


def preprocess_image(image: Any, preprocess: Preprocess, *, name: str = "<image>") -> tuple[np.ndarray, np.ndarray]:
    """Preprocess an in-memory PIL image; returns ``(array, display_rgb)`` like :func:`load_image`.

    No EXIF rotation here (:func:`load_image` does it); 16-bit data is taken as 16 bits deep.
    """
    return _preprocess(image, preprocess, name, None)


def _preprocess(image: Any, p: Preprocess, name: str, bits: int | None) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    im = _normalise_mode(image, p.background, name, bits)
    new, box = _geometry(im.width, im.height, p)
    if new is not None:
        im = im.resize(new, getattr(Image.Resampling, p.resample.upper()))
    if box is not None:
        im = im.crop(box)

    if im.mode == "F":
        gray = np.asarray(im, dtype=np.float32)
        rgb01 = np.repeat(gray[:, :, None], 3, axis=2)
        display = np.clip(np.rint(rgb01 * 255.0), 0, 255).astype(np.uint8)
        x01 = gray[:, :, None].astype(np.float64)
    else:
        u8 = np.asarray(im, dtype=np.uint8)
        if u8.ndim == 2:
            u8 = u8[:, :, None]
        display = np.ascontiguousarray(np.repeat(u8, 3, axis=2) if u8.shape[2] == 1 else u8)
        x01 = u8.astype(np.float64) / 255.0

    if p.channels == 3 and x01.shape[2] == 1:
        x01 = np.repeat(x01, 3, axis=2)
    elif p.channels == 1 and x01.shape[2] == 3:
        x01 = (x01 @ _LUMA)[:, :, None]
    if p.bgr:
        x01 = x01[:, :, ::-1]
    x = (x01 * p.scale - np.asarray(p.mean)) / np.asarray(p.std)
    if p.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x, dtype=p.dtype), display


def load_image(path: str | os.PathLike, preprocess: Preprocess, *,
               max_pixels: int | None = DEFAULT_MAX_PIXELS,
               budget: DecodeBudget | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read one image file.

    Returns ``(array, display_rgb)``: ``array`` is CHW (layout NCHW) or HWC (NHWC) in
    ``preprocess.dtype``; ``display_rgb`` is uint8 ``H x W x 3``, the same resized crop before
    normalisation (for a 1-channel model the colour crop, not its luma). Raises
    :class:`ImageLoadError` (a ``ValueError``) naming the file when it cannot be read: not a
    regular file, not an image, or more than ``max_pixels`` pixels (None: Pillow's guard only;
    a large JPEG is first decoded smaller where the target size allows, see the module
    docstring). ``budget``: a :class:`DecodeBudget` shared with other decoding threads; the
    image's :func:`decode_bytes` are held in it while it is decoded and preprocessed.
    """
    from PIL import Image

    path = Path(path)
    _allow_in_pillow(max_pixels)
    with _open_regular(path) as handle:
        with _reading(path):
            im = Image.open(handle)
        _limit_pixels(im, path, preprocess, max_pixels)
        cost = decode_bytes(im.width, im.height, im.mode)
        with budget.hold(cost) if budget is not None else nullcontext():
            im, bits = _decode(im, path)
            try:
                return _preprocess(im, preprocess, str(path), bits)
            except ImageLoadError:
                raise
            except (OSError, ValueError, MemoryError) as e:
                reason = _one_line(e) or type(e).__name__
                raise ImageLoadError(f"{path}: cannot preprocess image ({reason})") from e


def load_batch(
    paths: Iterable[str | os.PathLike], preprocess: Preprocess
) -> tuple[np.ndarray, list[np.ndarray], list[tuple[str, str]]]:
    """Load several images into one batch.

    Returns ``(batch, displays, failures)``: ``batch`` is ``[N, ...]`` for the N images that
    loaded (in the order given; skipped files leave no gap), ``displays`` their uint8 pictures,
    ``failures`` a list of ``(path, message)`` for files that could not be read (skipped, not
    fatal). With ``size=None`` all images must come out the same size, else ``ValueError``.
    """
    arrays: list[np.ndarray] = []
    displays: list[np.ndarray] = []
    failures: list[tuple[str, str]] = []
    for path in paths:
        try:
            x, d = load_image(path, preprocess)
        except ImageLoadError as e:
            failures.append((str(path), str(e)))
            continue
        if arrays and x.shape != arrays[0].shape:
            raise ValueError(
                f"{path}: preprocessed to shape {x.shape} but earlier images gave {arrays[0].shape}; "
                "set Preprocess.size so that all images come out the same size"
            )
        arrays.append(x)
        displays.append(d)
    if arrays:
        batch = np.stack(arrays)
    else:
        shape = preprocess.input_shape or ((preprocess.channels, 0, 0) if preprocess.layout == "NCHW" else (0, 0, preprocess.channels))
        batch = np.zeros((0,) + shape, dtype=preprocess.dtype)
    return batch, displays, failures


def to_display(x: np.ndarray, preprocess: Preprocess) -> np.ndarray:
    """Undo the normalisation of one model input: uint8 ``H x W x 3`` picture.

    ``x`` is CHW (layout NCHW) or HWC (NHWC) as :func:`load_image` returns it; a leading batch
    dimension of 1 is accepted. Values are clipped to [0, 1] before conversion to 0..255.
    """
    p = preprocess
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 4:
        if a.shape[0] != 1:
            raise ValueError(f"to_display takes one image; got a batch of {a.shape[0]}")
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"to_display expects a 3-D CHW/HWC array, got shape {a.shape}")
    if p.layout == "NCHW":
        a = a.transpose(1, 2, 0)
    if a.shape[2] != p.channels:
        raise ValueError(f"array has {a.shape[2]} channels ({p.layout}), preprocess expects {p.channels}")
    x01 = (a * np.asarray(p.std) + np.asarray(p.mean)) / p.scale
    if p.bgr:
        x01 = x01[:, :, ::-1]
    if x01.shape[2] == 1:
        x01 = np.repeat(x01, 3, axis=2)
    return np.clip(np.rint(x01 * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Finding files
# --------------------------------------------------------------------------------------------


def _is_image_name(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


class _Exclude:
    """Paths that are never inputs (an output folder): by resolved path and, for directories,
    by identity (``st_dev``, ``st_ino``), so no spelling or symlink gets around it."""

    def __init__(self, paths: Iterable[str | os.PathLike] = ()):
        self.roots = [resolved(os.path.expanduser(os.fspath(p))) for p in paths]
        self.dirs = set()
        for root in self.roots:
            try:
                st = os.stat(root)
            except OSError:
                continue
            self.dirs.add((st.st_dev, st.st_ino))

    def covers(self, path: Path) -> bool:
        """Whether the resolved ``path`` is an excluded path or inside one."""
        return any(path == r or r in path.parents for r in self.roots)


def resolved(path: str | os.PathLike) -> Path:
    """``Path(path).resolve()``, or the absolute path where a symlink loop stops it."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(path))


def _dir_key(path: str | os.PathLike) -> tuple[int, int] | None:
    """(st_dev, st_ino) of a directory (symlinks followed), or None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def _scan_dir(d: Path, exclude: _Exclude | None = None,
              seen: set[tuple[int, int]] | None = None) -> list[Path]:
    """Image files under ``d``, recursive, sorted; hidden files/folders (``.x``) skipped;
    symlinked folders not followed (as ``os.walk``); each real directory read once (``seen``,
    shared between scans of one source); excluded folders skipped. Non-regular files with image
    names are listed: loading them fails with the reason."""
    seen = set() if seen is None else seen
    out: list[Path] = []
    stack = [os.fspath(d)]
    while stack:
        current = stack.pop()
        key = _dir_key(current)
        if key is None or key in seen or (exclude is not None and key in exclude.dirs):
            continue
        seen.add(key)
        try:
            with os.scandir(current) as listing:
                entries = list(listing)
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()
                if is_dir and not entry.is_symlink():
                    stack.append(entry.path)
            except OSError:
                continue
            if not is_dir and _is_image_name(Path(entry.name)):
                out.append(Path(entry.path))
    return sorted(out, key=lambda q: q.as_posix())


def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


def _glob(pattern: str, exclude: _Exclude | None = None) -> list[Path]:
    """What ``glob.glob(pattern, recursive=True)`` matches (``**``: zero or more folders,
    symlinked folders followed, hidden names only for a pattern part starting with ``.``), but
    each real directory is read at most once per pattern part, so a symlink loop (``a/up ->
    ..``) ends and the work is linear in the number of directories; excluded folders skipped."""
    parts = Path(pattern).parts
    i = 0
    while i < len(parts) and not _has_magic(parts[i]):
        i += 1
    base, rest = (Path(*parts[:i]) if i else Path()), parts[i:]
    if not rest:
        return [base] if os.path.lexists(base) else []
    found: list[Path] = []
    visited: set[tuple[int, int, int]] = set()
    listings: dict[tuple[int, int], list[tuple[str, bool]]] = {}

    def listing(d: Path, key: tuple[int, int]) -> list[tuple[str, bool]]:
        if key not in listings:
            try:
                with os.scandir(d) as it:
                    entries = []
                    for e in it:
                        try:
                            entries.append((e.name, e.is_dir()))
                        except OSError:
                            entries.append((e.name, False))
            except OSError:
                entries = []
            listings[key] = sorted(entries)
        return listings[key]

    def walk(d: Path, k: int) -> None:
        key = _dir_key(d)
        if key is None or (key + (k,)) in visited or (exclude is not None and key in exclude.dirs):
            return
        visited.add(key + (k,))
        part, last = rest[k], k == len(rest) - 1
        if part == "**":
            if last:
                found.append(d)
            else:
                walk(d, k + 1)  # zero folders
            for name, is_dir in listing(d, key):
                if is_dir and not name.startswith("."):
                    walk(d / name, k)
            return
        if _has_magic(part):
            names = [n for n, _ in listing(d, key) if not n.startswith(".") or part.startswith(".")]
            names = fnmatch.filter(names, part)
        else:
            names = [part]
        for name in names:
            child = d / name
            if last:
                if os.path.lexists(child):
                    found.append(child)
            else:
                walk(child, k + 1)

    walk(base, 0)
    return found


def _expand(source: Path, origin: str, seen_lists: set[Path],
            exclude: _Exclude | None = None) -> list[Path]:
    """Expand one source; ``origin`` says where it came from, for error messages."""
    s = str(source)
    if source.is_dir():
        found = _scan_dir(source, exclude)
        if not found:
            raise FileNotFoundError(f"{origin}directory {s} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
        return found
    if source.exists():  # a file; a FIFO, socket or device too (loading it fails with the reason)
        if source.is_file() and source.suffix.lower() == ".txt":
            return _read_list(source, seen_lists, exclude)
        return [source]
    if _has_magic(s):
        matches = sorted(_glob(s, exclude), key=str)
        if not matches:
            raise FileNotFoundError(f"{origin}pattern {s!r} matches no files")
        out: list[Path] = []
        scanned: set[tuple[int, int]] = set()
        for mp in matches:
            if mp.is_dir():
                out.extend(_scan_dir(mp, exclude, scanned))
            elif mp.exists() and _is_image_name(mp):
                out.append(mp)
        if not out:
            raise FileNotFoundError(
                f"{origin}pattern {s!r} matches {len(matches)} path(s) but no image files ({', '.join(IMAGE_EXTENSIONS)})"
            )
        return out
    raise FileNotFoundError(f"{origin}{s}: no such file or directory")


def _read_list(list_file: Path, seen_lists: set[Path], exclude: _Exclude | None = None) -> list[Path]:
    key = list_file.resolve()
    if key in seen_lists:
        raise ValueError(f"list file {list_file} includes itself (directly or through another list)")
    seen_lists = seen_lists | {key}
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"list file {list_file}: cannot read it ({_one_line(e)})") from None
    out: list[Path] = []
    base = list_file.parent
    for lineno, line in enumerate(text.splitlines(), 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        p = Path(os.path.expanduser(entry))
        if not p.is_absolute():
            p = base / p
        out.extend(_expand(p, f"{list_file}:{lineno}: ", seen_lists, exclude))
    if not out:
        raise FileNotFoundError(f"list file {list_file} lists no images")
    return out


def iter_image_paths(sources: str | os.PathLike | Iterable[str | os.PathLike], *,
                     exclude: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Resolve ``sources`` into a deterministic, duplicate-free list of image paths.

    Each source is a file (taken as is, whatever its extension), a directory (searched
    recursively for :data:`IMAGE_EXTENSIONS`, sorted, hidden files and folders skipped), a glob
    pattern (``**`` allowed; matched image files, matched directories scanned), or a ``.txt``
    list file (one source per line, relative to the list file; blank lines and ``#`` comments
    ignored). Order: sources in the order given, each one's files sorted; a file reached twice
    (same resolved path) is kept at its first place. The work is done eagerly, so a source that
    matches nothing raises ``FileNotFoundError`` naming it before any image is loaded.

    Walks and globs read each real directory once (symlink loops end). Files that are not
    regular (FIFOs, sockets, devices) are listed, never opened: :func:`load_image` refuses them
    with the reason. Nothing at or under an ``exclude`` path (an output folder) is ever listed,
    whichever way it is reached.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    skip = _Exclude(exclude)
    out: list[Path] = []
    seen: set[Path] = set()
    n = 0
    for src in sources:
        n += 1
        for p in _expand(Path(os.path.expanduser(os.fspath(src))), "", set(), skip):
            key = resolved(p)
            if skip.covers(key):
                continue
            if key not in seen:
                seen.add(key)
                out.append(p)
    if n == 0:
        raise ValueError("no image sources given")
    return out
