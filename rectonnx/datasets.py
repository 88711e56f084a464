"""Small image-classification data sets for evaluating explainers (docs/maths.md, "The
paper's network and evaluation metrics").

Two sources, both returned as a :class:`LabelledImages` value in the layout the paper's CIFAR
network takes: ``images`` float32 ``[N, 3, H, W]`` (RGB, ``uint8 / 127.5 - 1``, i.e. scaled to
``[-1, 1]``), ``labels`` int64 ``[N]`` and, where the object's pixels are known, ``masks`` bool
``[N, H, W]``.

* :func:`digits_on_photos` makes a deterministic synthetic 10-class set offline: a handwritten
  digit from scikit-learn's ``load_digits()`` (8x8 scans of 43 writers, values 0..16), upscaled
  with a cubic kernel to 14..22 px, coloured to contrast with the background under it and
  alpha-composited at a random place on a random crop (random place, scale and horizontal flip)
  of one of nine real photographs bundled with scikit-learn and scikit-image, whose intensities
  are squeezed into [0.15, 0.85] so that light (luminance >= 0.85) or dark (<= 0.15) digits
  stand out. The label is the
  digit; the object mask is exactly where the digit's alpha exceeds 0.5, which is what the
  noise-level test needs and CIFAR-10 cannot give. Pixels are quantised to uint8 before scaling,
  so an image saved as PNG and read back gives the same tensor.
* :func:`load_cifar10` reads the standard CIFAR-10 "python version" pickle directory (which
  cannot be downloaded on these machines; point it at a local copy).

numpy, scikit-learn and scikit-image are imported inside the functions, so importing
``rectonnx`` does not need them.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

DIGIT_CLASSES = tuple(str(k) for k in range(10))
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)

# load_digits() has 1797 samples; the first TRAIN_DIGITS feed split="train", the rest "test",
# so a test image never shows a digit scan that training saw.
TRAIN_DIGITS = 1300
SPLITS = ("train", "test")

# Photos bundled with scikit-learn (sample images) and scikit-image (skimage.data), all readable
# offline. Licences are listed in models/images/LICENSES.md.
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
SKIMAGE_PHOTOS = (
    "chelsea", "coffee", "astronaut", "rocket",
    "immunohistochemistry", "hubble_deep_field", "retina",
)
PHOTO_SHORT_SIDE = 96       # photos are anti-alias downscaled to this short side once
DIGIT_SIZES = (14, 22)      # inclusive range of the upscaled digit's side in pixels
CROP_FRACTION = (0.35, 1.0)  # crop side as a fraction of the (downscaled) photo's short side
BACKGROUND_RANGE = (0.15, 0.85)  # photo intensities are mapped linearly into this range
INK_LUMINANCE = 0.85        # digits are at least this light, or at most 1 - this dark


@dataclass(frozen=True, eq=False)
class LabelledImages:
    """Images ``[N, 3, H, W]`` float32 in ``[-1, 1]``, labels ``[N]`` int64, optional masks."""

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# The synthetic set is one kind of LabelledImages; the name reads better at call sites.
DigitsOnPhotos = LabelledImages


def to_uint8(images: np.ndarray) -> np.ndarray:
    """``[N, 3, H, W]`` in ``[-1, 1]`` -> ``[N, H, W, 3]`` uint8 (the inverse of the scaling)."""
    u8 = np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return u8.transpose(0, 2, 3, 1)


def from_uint8(pixels: np.ndarray) -> np.ndarray:
    """``[N, H, W, 3]`` uint8 -> ``[N, 3, H, W]`` float32 scaled to ``[-1, 1]`` (x / 127.5 - 1)."""
    n, h, w, c = pixels.shape
    x = np.empty((n, c, h, w), dtype=np.float32)
    np.divide(pixels.transpose(0, 3, 1, 2), np.float32(127.5), out=x, dtype=np.float32)
    x -= np.float32(1.0)
    return x


# ----------------------------------------------------------------------------------------------
# digits on photos
# ----------------------------------------------------------------------------------------------


def digits_on_photos(
    n: int, *, seed: int = 0, size: int = 32, split: str = "train"
) -> LabelledImages:
    """Make ``n`` digit-on-photo images (see the module docstring); deterministic in all args.

    Labels are balanced (``n // 10`` or one more per class) in a random order. ``split`` picks the
    digit scans: "train" the first 1300 of ``load_digits()``, "test" the remaining 497.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0 or size < DIGIT_SIZES[1] + 2:
        raise ValueError(f"need n >= 0 and size >= {DIGIT_SIZES[1] + 2}, got n={n}, size={size}")
    rng = np.random.default_rng([seed, SPLITS.index(split), 0xD161])
    digits, digit_labels = _digit_pool(split)

    labels = rng.permutation(np.arange(n) % 10).astype(np.int64)
    picks = _pick_digit_of_each_label(rng, labels, digit_labels)
    sides = rng.integers(DIGIT_SIZES[0], DIGIT_SIZES[1] + 1, size=n)
    alpha = _place_digits(rng, digits[picks], sides, size)

    low, high = BACKGROUND_RANGE
    background = low + (high - low) * _photo_crops(rng, n, size)
    colour = _contrasting_colours(rng, background, alpha)
    a = alpha[..., None]
    rgb = (1.0 - a) * background + a * colour[:, None, None, :]

    pixels = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
    return LabelledImages(
        images=from_uint8(pixels),
        labels=labels,
        masks=alpha > 0.5,
        class_names=DIGIT_CLASSES,
    )


@functools.lru_cache(maxsize=None)
def _digit_pool(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The split's 8x8 digit scans as float32 in [0, 1] and their labels."""
    from .errors import require

    data = require("sklearn.datasets", "evaluate", "rectonnx.datasets.digits_on_photos") \
        .load_digits()
    part = slice(0, TRAIN_DIGITS) if split == "train" else slice(TRAIN_DIGITS, None)
    images = (data.images[part] / 16.0).astype(np.float32)
    return images, data.target[part].astype(np.int64)


def _pick_digit_of_each_label(
    rng: np.random.Generator, labels: np.ndarray, digit_labels: np.ndarray
) -> np.ndarray:
    """For each wanted label, the index of a random scan of that digit."""
    picks = np.empty(labels.shape[0], dtype=np.int64)
    for k in range(10):
        wanted = np.flatnonzero(labels == k)
        pool = np.flatnonzero(digit_labels == k)
        picks[wanted] = pool[rng.integers(0, pool.size, size=wanted.size)]
    return picks


def _cubic_upscale_matrix(src: int, dst: int) -> np.ndarray:
    """``[dst, src]`` matrix that resamples a length-``src`` signal to ``dst`` (Catmull-Rom).

    Pixel centres are aligned (``x_src = (i + 0.5) * src / dst - 0.5``); samples beyond the
    edge count as 0, which matches the blank border of the digit scans.
    """
    pos = (np.arange(dst) + 0.5) * src / dst - 0.5
    dist = np.abs(pos[:, None] - np.arange(src)[None, :])
    w = np.where(
        dist <= 1,
        1.5 * dist**3 - 2.5 * dist**2 + 1,
        np.where(dist < 2, -0.5 * dist**3 + 2.5 * dist**2 - 4 * dist + 2, 0.0),
    )
    return w.astype(np.float32)


def _digit_alpha(digits: np.ndarray, side: int) -> np.ndarray:
    """Upscale ``[M, 8, 8]`` scans to ``[M, side, side]`` stroke opacities in [0, 1]."""
    m = _cubic_upscale_matrix(digits.shape[-1], side)
    ink = np.einsum("ij,njk,lk->nil", m, digits, m)
    # Scans are grey where the pen only grazed a cell: stretch so strokes are opaque inside.
    return np.clip((ink - 0.2) / 0.45, 0.0, 1.0)


def _place_digits(
    rng: np.random.Generator, digits: np.ndarray, sides: np.ndarray, size: int
) -> np.ndarray:
    """Alpha canvases ``[N, size, size]`` with each digit at a random position."""
    n = digits.shape[0]
    canvas = np.zeros((n, size, size), dtype=np.float32)
    tops = rng.random(n)
    lefts = rng.random(n)
    for side in np.unique(sides):
        idx = np.flatnonzero(sides == side)
        alpha = _digit_alpha(digits[idx], int(side))
        room = size - side + 1
        for j, i in enumerate(idx):
            t, l = int(tops[i] * room), int(lefts[i] * room)
            canvas[i, t:t + side, l:l + side] = alpha[j]
    return canvas


@functools.lru_cache(maxsize=None)
def _photo_bank() -> tuple[np.ndarray, np.ndarray]:
    """All photos downscaled to a short side of 96, zero-padded into ``[P, H, W, 3]`` float32
    in [0, 1], and their true ``(height, width)`` ``[P, 2]``."""
    from .errors import require

    what = "rectonnx.datasets.digits_on_photos"
    skimage_data = require("skimage.data", "evaluate", what)
    resize = require("skimage.transform", "evaluate", what).resize
    load_sample_images = require("sklearn.datasets", "evaluate", what).load_sample_images

    samples = load_sample_images()
    by_name = dict(zip((os.path.basename(f) for f in samples.filenames), samples.images))
    photos = [by_name[name] for name in SKLEARN_PHOTOS]
    photos += [getattr(skimage_data, name)() for name in SKIMAGE_PHOTOS]

    small = []
    for photo in photos:
        h, w = photo.shape[:2]
        scale = PHOTO_SHORT_SIDE / min(h, w)
        shape = (round(h * scale), round(w * scale))
        small.append(resize(photo[..., :3], shape, anti_aliasing=True).astype(np.float32))
    shapes = np.array([p.shape[:2] for p in small], dtype=np.int64)
    bank = np.zeros((len(small), *shapes.max(axis=0), 3), dtype=np.float32)
    for i, p in enumerate(small):
        bank[i, : p.shape[0], : p.shape[1]] = p
    return bank, shapes


def _photo_crops(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """``[N, size, size, 3]`` bilinear resamples of random square crops of random photos,
    half of them mirrored left-right."""
    bank, shapes = _photo_bank()
    which = rng.integers(0, bank.shape[0], size=n)
    h, w = shapes[which, 0], shapes[which, 1]
    side = rng.uniform(*CROP_FRACTION, size=n) * np.minimum(h, w)
    top = rng.random(n) * (h - side)
    left = rng.random(n) * (w - side)
    flip = rng.random(n) < 0.5

    t = (np.arange(size) + 0.5) / size                      # [size] in (0, 1)
    ys = top[:, None] + t[None, :] * side[:, None] - 0.5    # [N, size] source rows
    tx = np.where(flip[:, None], 1.0 - t[None, :], t[None, :])
    xs = left[:, None] + tx * side[:, None] - 0.5
    ys = np.clip(ys, 0, (h - 1)[:, None])
    xs = np.clip(xs, 0, (w - 1)[:, None])
    return _bilinear_gather(bank, which, ys, xs)


def _bilinear_gather(
    bank: np.ndarray, which: np.ndarray, ys: np.ndarray, xs: np.ndarray
) -> np.ndarray:
    """Sample ``bank[which[i]]`` at rows ``ys[i]`` x columns ``xs[i]`` bilinearly."""
    _, height, width, channels = bank.shape
    flat = bank.reshape(-1, channels)
    y0 = np.floor(ys).astype(np.int64)
    x0 = np.floor(xs).astype(np.int64)
    y1 = np.minimum(y0 + 1, height - 1)
    x1 = np.minimum(x0 + 1, width - 1)
    wy = (ys - y0).astype(np.float32)[:, :, None, None]
    wx = (xs - x0).astype(np.float32)[:, None, :, None]
    base = which[:, None, None] * height

    def at(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        return np.take(flat, (base + yy[:, :, None]) * width + xx[:, None, :], axis=0)

    top = at(y0, x0)
    top += wx * (at(y0, x1) - top)
    bottom = at(y1, x0)
    bottom += wx * (at(y1, x1) - bottom)
    top += wy * (bottom - top)
    return top


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _contrasting_colours(
    rng: np.random.Generator, background: np.ndarray, alpha: np.ndarray
) -> np.ndarray:
    """One random RGB colour per image, light on dark or dark on light backgrounds.

    The background's luminance is averaged under the digit (weighted by alpha). A random colour
    is blended towards white until its luminance is at least 0.85 where that average is below
    0.5, and scaled towards black until it is at most 0.15 elsewhere; the hue is kept. As the
    photo is squeezed into [0.15, 0.85], a light digit is never darker than any background pixel
    and a dark one never lighter, and the average contrast is at least 0.35.
    """
    weight = alpha / np.maximum(alpha.sum(axis=(1, 2), keepdims=True), 1e-6)
    under = (_luminance(background) * weight).sum(axis=(1, 2))
    colour = rng.random((background.shape[0], 3)).astype(np.float32)
    lum = _luminance(colour)[:, None]
    light = INK_LUMINANCE
    towards_white = np.clip((light - lum) / np.maximum(1.0 - lum, 1e-6), 0.0, 1.0)
    lighter = colour + towards_white * (1.0 - colour)
    darker = colour * np.minimum(1.0, (1.0 - light) / np.maximum(lum, 1e-6))
    return np.where((under < 0.5)[:, None], lighter, darker).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# CIFAR-10
# ----------------------------------------------------------------------------------------------

CIFAR10_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}


def load_cifar10(root: str | os.PathLike, split: str = "train") -> LabelledImages:
    """Read CIFAR-10's python pickles from ``root`` (``cifar-10-batches-py`` or its parent).

    Returns images scaled to [-1, 1] (``x / 127.5 - 1``, as in the paper) and no masks.
    """
    import pickle

    if split not in CIFAR10_FILES:
        raise ValueError(f"split must be one of {tuple(CIFAR10_FILES)}, got {split!r}")
    folder = _cifar10_folder(os.fspath(root), split)
    rows, labels = [], []
    for name in CIFAR10_FILES[split]:
        with open(os.path.join(folder, name), "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        rows.append(np.asarray(batch[b"data"], dtype=np.uint8))
        labels.extend(batch[b"labels"])
    pixels = np.concatenate(rows).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return LabelledImages(
        images=from_uint8(pixels),
        labels=np.asarray(labels, dtype=np.int64),
        masks=None,
        class_names=CIFAR10_CLASSES,
    )


def _cifar10_folder(root: str, split: str) -> str:
    """The folder holding the split's batch files, or a FileNotFoundError saying what is missing."""
    wanted = CIFAR10_FILES[split]
    for folder in (root, os.path.join(root, "cifar-10-batches-py")):
        if all(os.path.isfile(os.path.join(folder, name)) for name in wanted):
            return folder
    raise FileNotFoundError(
        f"no CIFAR-10 {split} data under {root!r}: expected the files {', '.join(wanted)} "
        "(the 'CIFAR-10 python version' archive, cifar-10-python.tar.gz, extracted) in that "
        "directory or in its subdirectory 'cifar-10-batches-py'"
    )
