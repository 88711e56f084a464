r"""Intervals and significance for the evaluation's numbers, in numpy (scipy for the t quantile).

* ``t_interval(values)``: the mean and the 95 % Student-t interval ``mean -+ t_{0.975, n-1} s /
  sqrt(n)`` over independent repeats (ROAR/KAR: the networks trained per point, which differ in
  their seed). None for the bounds when there is one value.
* ``bootstrap_interval(values, rng)``: the mean and the 95 % percentile-bootstrap interval of the
  mean over per-image values (``resamples`` resamples of the images with replacement).
* ``paired_difference(a, b, rng)``: the 95 % percentile-bootstrap interval of ``mean(a - b)`` over
  the same images (paired: each image counts once for both methods); ``significant`` when the
  interval excludes 0.
* ``paired_t(a, b)``: the 95 % t-interval of ``mean(a - b)`` over paired repeats (repeat ``k`` of
  two methods shares the seed ``k``); ``significant`` when it excludes 0.

Every random draw comes from a generator seeded from the run's seed, so a rerun gives the same
intervals.
"""

from __future__ import annotations

import math

import numpy as np

LEVEL = 0.95
RESAMPLES = 1000


def t_quantile(df: int, level: float = LEVEL) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


def t_interval(values, level: float = LEVEL) -> dict:
    v = np.asarray([x for x in values if x is not None], np.float64)
    if v.size == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = float(v.mean())
    if v.size < 2:
        return {"mean": mean, "low": None, "high": None, "n": int(v.size)}
    half = t_quantile(v.size - 1, level) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": int(v.size)}


def bootstrap_means(values, rng: np.random.Generator, resamples: int = RESAMPLES) -> np.ndarray:
    v = np.asarray(values, np.float64)
    picks = rng.integers(0, v.size, (resamples, v.size))
    return v[picks].mean(axis=1)


def bootstrap_interval(values, rng: np.random.Generator, resamples: int = RESAMPLES,
                       level: float = LEVEL) -> dict:
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    means = bootstrap_means(v, rng, resamples)
    low, high = np.quantile(means, [0.5 - level / 2, 0.5 + level / 2])
    return {"mean": float(v.mean()), "low": float(low), "high": float(high), "n": int(v.size)}


def paired_difference(a, b, rng: np.random.Generator, resamples: int = RESAMPLES,
                      level: float = LEVEL) -> dict:
    """Bootstrap interval of ``mean(a - b)`` over paired per-image values."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    out = bootstrap_interval(d, rng, resamples, level)
    out["significant"] = bool(out["low"] is not None and (out["low"] > 0 or out["high"] < 0))
    return out


def paired_t(a, b, level: float = LEVEL) -> dict:
    """t-interval of ``mean(a - b)`` over paired repeats."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    out = t_interval(d, level)
    out["significant"] = bool(out["low"] is not None and (out["low"] > 0 or out["high"] < 0))
    return out


def seeded(seed: int, *salt: int) -> np.random.Generator:
    return np.random.default_rng([seed, 0x57A7, *salt])
