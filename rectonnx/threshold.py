"""RectGrad's per-layer threshold ``tau_l`` (SPEC.md section 2).

For importance scores ``s = y * R`` of one layer and sample with ``M`` elements, ``tau`` is the
``k``-th largest score with ``k = round_half_even((M - 1) (1 - q/100)) + 1`` (float64): exactly
TensorFlow's ``percentile(s, q, interpolation='nearest')`` of the authors' code. The percentile is
per sample, over all non-batch elements, never across the batch. A unit is kept when
``s > tau`` (strict).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .builder import GraphBuilder


def percentile_rank(num_elements: int, q: float) -> int:
    """``k`` such that the ``q``-th percentile ('nearest') is the ``k``-th largest of ``M``."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100], got {q}")
    return int(np.round(np.float64(num_elements - 1) * (1.0 - np.float64(q) / 100.0))) + 1


def percentile_threshold(g: GraphBuilder, scores: str, shape: tuple | None, q: float) -> str:
    """Per-sample threshold, shaped ``[N, 1, ..., 1]`` to broadcast against ``scores``."""
    rank = len(shape) if shape is not None else None
    if rank is None:
        raise ValueError("the rank of the activation must be known to threshold it per sample")
    flat = g.Reshape(scores, g.ints([0, -1], "per_sample"), hint="scores_flat")
    tail = shape[1:]
    if all(isinstance(d, int) for d in tail):
        k = g.ints([percentile_rank(int(np.prod(tail)), q)], "k")
    else:  # M is only known at run time: the same formula, in the graph
        m = g.Gather(g.Shape(flat), g.ints([1], "index"), axis=0, hint="m")
        m_minus_1 = g.Cast(g.Sub(m, g.ints([1], "one")), to=TensorProto.DOUBLE)
        fraction = g.const(np.array([1.0 - q / 100.0], np.float64), "fraction")
        k = g.Add(g.Cast(g.Round(g.Mul(m_minus_1, fraction)), to=TensorProto.INT64),
                  g.ints([1], "one"), hint="k")
    top, _ = g.op("TopK", flat, k, axis=1, largest=1, sorted=1, outputs=2, hint="top")
    tau = g.ReduceMin(top, axes=[1], keepdims=1, hint="tau")
    return g.Reshape(tau, g.ints([-1] + [1] * (rank - 1), "broadcast"), hint="tau")
