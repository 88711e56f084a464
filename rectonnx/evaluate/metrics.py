r"""The numbers of the paper's quantitative comparison (Sec. 3 and 5.3), in numpy.

For attribution maps ``A`` of shape ``[N, C, H, W]`` (one per image):

* ``map2d(A) = sum_c A[:, c]``, the channel sum that the pictures show (docs/maths.md,
  'Visualisation').
* ``region_share(A, region) = sum_{region} |A| / sum |A|`` (over channels and pixels): the share
  of the absolute attribution that falls in a region, e.g. the training-occlusion patch or the
  background outside an object mask. 0 for an all-zero map. Scale-free, so methods with
  different units (gradients, gradient x input) compare; a random map puts ``|region| / (H W)``
  there on average.
* ``total_variation(A)``: with ``m = map2d(A) / max |map2d(A)|`` (0 if the map is 0),
  ``TV = sum_{i,j} |m[i+1, j] - m[i, j]| + |m[i, j+1] - m[i, j]|`` (anisotropic, the map scaled as
  it is drawn).
* ``pixel_order(A, rng)``: pixels ranked by ``map2d(A)``, most important first; ties (the zeros
  of a thresholded map) in a random order drawn from ``rng``.
* ``replace_pixels(x, order, fraction, fill, most)``: ROAR (``most=True``) replaces the
  ``round(fraction H W)`` top-ranked pixels of each image (all channels) by ``fill`` (the
  per-channel training mean); KAR (``most=False``) the bottom-ranked ones.
* ``curve_area(fractions, accuracies)``: the trapezoidal area under the accuracy curve divided
  by the span of the fractions, i.e. the curve's mean height in ``[0, 1]``. ROAR AUC is that of
  the ROAR curve; KAR AOC is ``1 - area`` of the KAR curve. Lower is better for both; a random
  ranking gives the same curve for ROAR and KAR, so its ROAR AUC + KAR AOC = 1 (as in the paper's
  Table 1: 0.5562 + 0.4438).
* ``map_change(A, B) = 0.5 sum |a - b|`` with ``a, b = map2d / sum |map2d|``: 0 for maps of the
  same shape, 1 for maps with disjoint support (class sensitivity, Sec. 5.2).
* ``nonzero_share(A)``: the share of non-zero attribution elements (sparsity of RectGrad's maps
  across ``q``, Sec. 5.1).
"""

from __future__ import annotations

import numpy as np


def map2d(attribution: np.ndarray) -> np.ndarray:
    """``[N, C, H, W] -> [N, H, W]``: the channel sum."""
    attribution = np.asarray(attribution, np.float64)
    return attribution.sum(axis=1) if attribution.ndim == 4 else attribution


def region_share(attribution: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Per image, the share of ``sum |A|`` inside ``region`` (bool ``[H, W]`` or ``[N, H, W]``)."""
    magnitude = np.abs(np.asarray(attribution, np.float64))
    if magnitude.ndim == 4:
        magnitude = magnitude.sum(axis=1)
    region = np.broadcast_to(np.asarray(region, bool), magnitude.shape)
    total = magnitude.sum(axis=(1, 2))
    inside = np.where(region, magnitude, 0.0).sum(axis=(1, 2))
    return np.divide(inside, total, out=np.zeros_like(total), where=total > 0)


def total_variation(attribution: np.ndarray) -> np.ndarray:
    """Per image, the anisotropic total variation of the channel-sum map scaled to max 1."""
    m = map2d(attribution)
    peak = np.abs(m).max(axis=(1, 2), keepdims=True)
    m = np.divide(m, peak, out=np.zeros_like(m), where=peak > 0)
    return (np.abs(np.diff(m, axis=1)).sum(axis=(1, 2)) +
            np.abs(np.diff(m, axis=2)).sum(axis=(1, 2)))


def pixel_order(attribution: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``[N, H W]`` flat pixel indices, most important first; ties broken at random."""
    scores = map2d(attribution).reshape(len(attribution), -1)
    tie_break = rng.random(scores.shape)
    return np.lexsort((tie_break, -scores), axis=1)


def replace_pixels(images: np.ndarray, order: np.ndarray, fraction: float, fill: np.ndarray,
                   most: bool = True) -> np.ndarray:
    """A copy of ``images`` ``[N, C, H, W]`` with ``round(fraction H W)`` pixels per image set to
    ``fill`` ``[C]``: the top-ranked ones (ROAR) or the bottom-ranked ones (KAR)."""
    n, c, h, w = images.shape
    count = int(round(fraction * h * w))
    picked = order[:, :count] if most else order[:, order.shape[1] - count:]
    out = images.reshape(n, c, h * w).copy()
    rows = np.arange(n)[:, None]
    for channel in range(c):
        out[rows, channel, picked] = fill[channel]
    return out.reshape(images.shape)


def curve_area(fractions, accuracies) -> float:
    """Trapezoidal area under ``accuracies(fractions)`` divided by the span of ``fractions``."""
    x = np.asarray(fractions, np.float64)
    y = np.asarray(accuracies, np.float64)
    if x.size == 1:
        return float(y[0])
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0]))


def map_change(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per image, ``0.5 || a / |a|_1 - b / |b|_1 ||_1`` of the channel-sum maps, in ``[0, 1]``."""
    def normalised(attribution):
        m = map2d(attribution).reshape(len(attribution), -1)
        total = np.abs(m).sum(axis=1, keepdims=True)
        return np.divide(m, total, out=np.zeros_like(m), where=total > 0)
    return 0.5 * np.abs(normalised(a) - normalised(b)).sum(axis=1)


def nonzero_share(attribution: np.ndarray) -> np.ndarray:
    """Per image, the share of attribution elements that are not 0."""
    flat = np.asarray(attribution).reshape(len(attribution), -1)
    return (flat != 0).mean(axis=1)
