"""RectGrad's per-layer threshold ``tau_l`` (docs/maths.md, 'The percentile threshold').

For importance scores ``s = y * R`` of one layer and sample with ``M`` elements, ``tau`` is the
``k``-th largest score with ``k = round_half_even((M - 1) (1 - q/100)) + 1`` (float64): exactly
TensorFlow's ``percentile(s, q, interpolation='nearest')`` of the authors' code. The percentile is
per sample, over all non-batch elements, never across the batch. A unit is kept when
``s > tau`` (strict).

Two exact algorithms compute the same ``tau`` (equal as float32 values; ``0.0`` and ``-0.0``,
which compare equal in ``s > tau``, may differ in sign bit):

* ``"topk"`` (default, fastest on CPU): the k-th largest by TopK. With ``M`` static and large, a
  two-stage selection does it on a fraction of the elements: cut the ``M`` scores into ``B``
  blocks of ``L``, take the ``k`` blocks with the largest maxima, and the k-th largest of those
  ``k L`` scores is the k-th largest of all (``block_select_sizes`` says why). TopK runs on about
  ``M / L + k L`` instead of ``M`` elements (``2 sqrt(k M)`` at best, 28 % of ``M`` at q = 98).
  When ``k > M / 2`` the mirror image (k-th largest = (M - k + 1)-th smallest) is used.
* ``"bisect"`` (TensorRT-safe: no TopK, whose K TensorRT caps at 3840): by counting. With
  ``P = #(s > 0)`` and ``Z = #(s == 0)``: tau > 0 is the k-th largest positive score when
  ``k <= P``; tau = 0 when ``P < k <= P + Z``; else tau = -(the (M - k + 1)-th largest of
  ``-s`` among the negative scores). The r-th largest positive float32 ``v`` is found bit by bit:
  9 halvings find its binade ``2^E`` (the largest power of two with ``#(u >= 2^E) >= r``), 23
  more its mantissa, each step one ``count(u >= candidate)``; every candidate ``2^E + i ulp(E)``
  is exactly representable, so the result is exact. Counts are float32 sums of 0/1, exact for
  ``M < 2^24`` elements per sample. About 35 elementwise passes: slower than TopK on CPU.

One algorithm is approximate (docs/maths.md, 'A recall-targeted approximate threshold'):

* ``"approx"``: ``tau`` from a subsample. For a rank ``k`` among ``M`` scores it takes
  ``s = ceil(MU M / k)`` scores per sample (``MU = APPROX_EXPECTED_TOP``: about ``MU`` of them are
  among the top ``k``), one from each of ``s`` equal strata of the flattened scores at an offset
  from a golden-ratio (Weyl) sequence (``approx_positions``: all-integer, the same in numpy and
  the graph, no aliasing with the layer's width or channels), and returns the ``k_s``-th largest
  of the subsample with ``mu = k s / M`` and
  ``k_s = min(s, ceil(r mu + Z sqrt(r mu)) + 1)``, ``r = recall``, ``Z = APPROX_Z = 2``.
  The bound: let ``e = #(score > tau)`` be the units the exact gate keeps and ``m = ceil(r e)``.
  If the approximate gate keeps fewer than ``r e`` of them, its ``tau'`` is at least the m-th
  largest of those, so the subsample holds ``>= k_s`` of the top ``m <= r k`` scores (when the
  scores above ``tau`` are distinct). For a subsample whose positions do not depend on the
  values (a uniform random one; the stratified one for i.i.d. scores) that count is
  hypergeometric with mean ``<= r mu`` and variance ``<= r mu``, and ``k_s`` is its mean plus
  2 standard deviations plus 1: ``P(recall < r) <= 2.5 %`` per layer and sample (the exact
  hypergeometric tail is 1.5-2.0 % for q in 95..99.5, M in 150k..800k, r in 0.5..1), so for
  ``r < 1`` the expected recall exceeds ``r``. In exchange the gate keeps about ``k_s M / s ~ (r + Z
  sqrt(r / MU)) k`` units (1.08 k at r = 0.95): a few more, the next most important. Below
  ``APPROX_MIN_SIZE`` scores, or where ``s > M / APPROX_SAMPLE_RATIO``, the subsample saves
  nothing and the exact ``"topk"`` threshold is used (equal bit for bit). With ``M`` known only
  at run time the same rule (``s`` from ``q``) and the fallback are evaluated in the graph.
"""

from __future__ import annotations

import math
import weakref

import numpy as np
from onnx import TensorProto

from .builder import GraphBuilder

ALGORITHMS = ("topk", "bisect", "approx")
DEFAULT_ALGORITHM = "topk"
DEFAULT_RECALL = 0.95     # threshold="approx": the share of the exact gate's units to keep
APPROX_MIN_SIZE = 16384   # below this many scores per sample "approx" is exact
APPROX_SAMPLE_RATIO = 4   # ... and where the subsample would be over 1/4 of the scores
APPROX_EXPECTED_TOP = 256  # MU: how many of the exact top k the subsample holds on average
APPROX_Z = 2.0            # standard deviations of margin in the subsample's rank
BLOCK_SELECT_MIN = 4096  # below this many scores per sample a single TopK is as fast
COUNT_LIMIT = 2 ** 24    # float32 counts are exact below this


def percentile_rank(num_elements: int, q: float) -> int:
    """``k`` such that the ``q``-th percentile ('nearest') is the ``k``-th largest of ``M``."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100], got {q}")
    return int(np.round(np.float64(num_elements - 1) * (1.0 - np.float64(q) / 100.0))) + 1


def check_algorithm(algorithm: str) -> str:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown threshold algorithm {algorithm!r}; choose one of "
                         f"{', '.join(ALGORITHMS)}")
    return algorithm


def percentile_threshold(g: GraphBuilder, scores: str, shape: tuple | None, q: float,
                         algorithm: str = DEFAULT_ALGORITHM, q_tensor: str | None = None,
                         recall: float = DEFAULT_RECALL) -> str:
    """Per-sample threshold, shaped ``[N, 1, ..., 1]`` to broadcast against ``scores``.

    Every intermediate keeps the activation's rank (``[N, X, 1, ..., 1]``), reducing over axis
    1 with keepdims, so the result needs no final Reshape. With ``q_tensor`` (a float64 tensor
    of percentiles, ``[1]`` or one per sample ``[N]``) the percentile is read at run time and
    ``k`` computed per sample in the graph; ``q`` is then only the default for NaN entries.
    ``recall`` is used by ``algorithm="approx"`` only (which takes no ``q_tensor``).
    """
    check_algorithm(algorithm)
    rank = len(shape) if shape is not None else None
    if rank is None:
        raise ValueError("the rank of the activation must be known to threshold it per sample")
    tail = shape[1:]
    size = int(np.prod(tail)) if all(isinstance(d, int) for d in tail) else None
    ones = [1] * (rank - 2)
    if algorithm == "approx":
        if q_tensor is not None:
            raise ValueError("threshold='approx' needs a fixed q, not a q input")
        if approx_applies(size, q):
            flat = g.Reshape(scores, g.ints([0, -1], "per_sample"), hint="scores_flat")
            tau = approx_threshold(g, flat, size, q, recall)
            return g.Reshape(tau, g.ints([-1, 1] + ones, "broadcast"), hint="tau")
        algorithm = "topk"  # where the subsample saves nothing: exact
    if q_tensor is not None:
        flat = g.Reshape(scores, g.ints([0, -1], "per_sample"), hint="scores_flat")
        k = rank_from_tensor(g, flat, q_tensor, q)
        if algorithm == "bisect":
            tau = kth_largest_by_counting(g, flat, size, q, k=g.Cast(k, to=TensorProto.FLOAT))
        else:
            tau = kth_largest_per_row(g, flat, k)
        return g.Reshape(tau, g.ints([-1, 1] + ones, "broadcast"), hint="tau")
    if algorithm == "bisect":
        if size is not None and size >= COUNT_LIMIT:
            raise ValueError(f"threshold='bisect' counts in float32 and needs fewer than 2^24 "
                             f"elements per sample; this layer has {size}: use 'topk'")
        flat = g.Reshape(scores, g.ints([0, -1], "per_sample"), hint="scores_flat")
        tau = kth_largest_by_counting(g, flat, size, q)
        return g.Reshape(tau, g.ints([-1, 1] + ones, "broadcast"), hint="tau")
    if size is not None:
        tau = kth_largest_static(g, scores, max(rank, 2), size, percentile_rank(size, q))
        return tau if rank >= 2 else g.Reshape(tau, g.ints([-1], "broadcast"), hint="tau")
    # M is only known at run time: the same formula, in the graph
    flat = g.Reshape(scores, g.ints([0, -1] + ones, "per_sample"), hint="scores_flat")
    top, _ = g.op("TopK", flat, dynamic_rank(g, flat, q), axis=1, largest=1, sorted=0,
                  outputs=2, hint="top")
    return g.ReduceMin(top, axes=[1], keepdims=1, hint="tau")


def sparse_shortcut_applies(size: int, dense_size: int, q: float) -> bool:
    """Whether ``percentile_threshold_of_sparse`` may stand for the percentile of
    ``dense_size`` scores of which all but ``size`` are zero."""
    k = percentile_rank(dense_size, q)
    return k <= size and k <= dense_size - size


def percentile_threshold_of_sparse(g: GraphBuilder, pooled_scores: str, rank: int, size: int,
                                   dense_size: int, q: float, algorithm: str = DEFAULT_ALGORITHM,
                                   recall: float = DEFAULT_RECALL) -> str:
    """The threshold of ``dense_size`` scores per sample of which all but the ``size`` scores
    ``pooled_scores`` (``Y * dY`` of a max pool's gradient, ``RuleContext.unpooled``) are zero,
    from those only; only where ``sparse_shortcut_applies``.

    With ``k`` the rank for ``dense_size``: if ``k <= size`` and at least ``k`` scores are zero
    (``k <= dense_size - size``), the k-th largest of all is the k-th largest of the ``size``
    scores when that is positive, else 0 (the zeros then reach rank ``k``):
    ``max(kth(pooled), 0)``, equal in ``s > tau``. TopK runs on ``size`` scores, not
    ``dense_size``. With ``algorithm="approx"`` the k-th largest of the pooled scores is
    estimated from a subsample of them (``approx_kth_largest``, same rank rule and bound).
    """
    if not sparse_shortcut_applies(size, dense_size, q):
        raise ValueError(f"the sparse percentile needs k <= {size} pooled scores and k zeros")
    k = percentile_rank(dense_size, q)
    sample = approx_sample_size(size, k / size) if algorithm == "approx" else None
    if sample is not None:
        flat = g.Reshape(pooled_scores, g.ints([0, size], "per_sample"), hint="scores_flat")
        kth = g.Reshape(approx_kth_static(g, flat, size, k, sample, recall),
                        g.ints([-1, 1] + [1] * (max(rank, 2) - 2), "broadcast"), hint="tau")
    else:
        kth = kth_largest_static(g, pooled_scores, max(rank, 2), size, k)
    return g.Max(kth, g.scalar(0.0), hint="tau")


def dynamic_rank(g: GraphBuilder, flat: str, q: float) -> str:
    """``k`` as an int64 ``[1]`` tensor computed from the run-time ``M`` (Round is half-even)."""
    m = g.Gather(g.Shape(flat), g.ints([1], "index"), axis=0, hint="m")
    m_minus_1 = g.Cast(g.Sub(m, g.ints([1], "one")), to=TensorProto.DOUBLE)
    fraction = g.const(np.array([1.0 - q / 100.0], np.float64), "fraction")
    return g.Add(g.Cast(g.Round(g.Mul(m_minus_1, fraction)), to=TensorProto.INT64),
                 g.ints([1], "one"), hint="k")


def rank_from_tensor(g: GraphBuilder, flat: str, q: str, default: float) -> str:
    """``k = round_half_even((M - 1)(1 - q/100)) + 1`` per sample, int64 ``[N, 1]``, from the
    float64 tensor ``q`` (``[1]`` or ``[N]``; clipped to [0, 100], NaN means ``default``).
    The same float64 arithmetic as ``percentile_rank``, so ``k`` is the same."""
    shape = g.Shape(flat, hint="shape")
    m = g.Gather(shape, g.ints([1], "index"), axis=0, hint="m")
    m_minus_1 = g.Cast(g.Sub(m, g.ints([1], "one")), to=TensorProto.DOUBLE)
    q = g.Cast(q, to=TensorProto.DOUBLE, hint="q")
    q = g.Where(g.IsNaN(q), g.const(np.float64(default), "q_default"), q, hint="q")
    q = g.Clip(q, g.const(np.float64(0.0), "q_min"), g.const(np.float64(100.0), "q_max"))
    fraction = g.Sub(g.const(np.float64(1.0), "one"), g.Div(q, g.const(np.float64(100.0),
                                                                       "hundred")))
    k = g.Add(g.Cast(g.Round(g.Mul(m_minus_1, fraction)), to=TensorProto.INT64),
              g.ints([1], "one"), hint="k")
    rows = g.Concat(g.Gather(shape, g.ints([0], "index"), axis=0), g.ints([1], "one"), axis=0)
    return g.Expand(g.Reshape(k, g.ints([-1, 1], "column")), rows, hint="k")


def kth_largest_per_row(g: GraphBuilder, flat: str, k: str) -> str:
    """``[N, 1]``: the ``k[n]``-th largest of row ``n`` of ``flat`` ``[N, M]`` (``k`` int64
    ``[N, 1]``, ``1 <= k <= M``): one sorted TopK to the largest ``k``, then a gather per row."""
    most = g.ReduceMax(g.Reshape(k, g.ints([-1], "flat")), axes=[0], keepdims=1, hint="k_max")
    top, _ = g.op("TopK", flat, most, axis=1, largest=1, sorted=1, outputs=2, hint="top")
    return g.GatherElements(top, g.Sub(k, g.ints([1], "one")), axis=1, hint="tau")


# -- TopK -----------------------------------------------------------------------------------------
PREFERRED_BLOCKS = (8, 16, 4)  # measured fastest on ResNet-50 and paper-CNN layers


def block_select_sizes(size: int, k: int) -> tuple[int, int] | None:
    """``(B, L)`` with ``B L = M`` for the two-stage selection, or None when it does not pay.

    Why it is exact: let ``t`` be the k-th largest block maximum, ``S`` the union of the ``k``
    blocks with the largest maxima and ``tau`` the k-th largest score. ``S`` is a subset, so its
    k-th largest is ``<= tau``. If ``t >= tau``, the ``k`` maxima in ``S`` are all ``>= tau``; if
    ``t < tau``, every block outside ``S`` has its maximum ``<= t < tau``, so all the (at least
    ``k``) scores ``>= tau`` lie in ``S``. Either way ``S`` holds ``k`` scores ``>= tau``: its
    k-th largest is ``tau``. Ties between block maxima may be broken in any way.

    TopK then runs on ``B + k L`` scores; ``L`` is a power of two near the optimum
    ``sqrt(M / k)`` when one fits (vectorised maxima), else the best divisor of ``M``.
    """
    if size < BLOCK_SELECT_MIN or k < 2:
        return None

    def work(length: int) -> int:
        return size // length + k * length

    fitting = [n for n in range(2, size // (k + 1) + 1) if size % n == 0]
    if not fitting:
        return None
    length = min(fitting, key=work)
    preferred = [n for n in PREFERRED_BLOCKS if n in fitting and work(n) <= 1.1 * work(length)]
    if preferred:
        length = preferred[0]
    if work(length) > 0.7 * size:
        return None
    return size // length, length


def kth_largest_static(g: GraphBuilder, scores: str, rank: int, size: int, k: int) -> str:
    """``[N, 1, ..., 1]``: the k-th largest of each sample of ``scores`` (``size`` per sample)."""
    ones = [1] * (rank - 2)
    flat = g.Reshape(scores, g.ints([0, size] + ones, "per_sample"), hint="scores_flat")
    if k == 1:
        return g.ReduceMax(flat, axes=[1], keepdims=1, hint="tau")
    if k == size:
        return g.ReduceMin(flat, axes=[1], keepdims=1, hint="tau")
    largest = k <= size - k + 1
    count = k if largest else size - k + 1  # k-th largest = (M - k + 1)-th smallest
    extreme, opposite = ("ReduceMax", "ReduceMin") if largest else ("ReduceMin", "ReduceMax")
    candidates, total = flat, size
    sizes = block_select_sizes(size, count)
    if sizes is not None:
        blocks, span = sizes
        grid = g.Reshape(scores, g.ints([0, blocks, span], "blocks"), hint="blocks")
        heads = g.op(extreme, grid, axes=[2], keepdims=1, hint="block_extreme")  # [N, B, 1]
        _, chosen = g.op("TopK", heads, g.ints([count], "k"), axis=1, largest=int(largest),
                         sorted=0, outputs=2, hint="chosen_blocks")  # [N, k, 1]
        picked = g.GatherND(grid, chosen, batch_dims=1, hint="candidates")  # [N, k, L]
        total = count * span
        candidates = g.Reshape(picked, g.ints([0, total] + ones, "flat"), hint="candidates")
    if count == total:
        return g.op(opposite, candidates, axes=[1], keepdims=1, hint="tau")
    top, _ = g.op("TopK", candidates, g.ints([count], "k"), axis=1, largest=int(largest),
                  sorted=0, outputs=2, hint="top")
    return g.op(opposite, top, axes=[1], keepdims=1, hint="tau")


# -- counting (no TopK) ---------------------------------------------------------------------------
MIN_EXPONENT, MAX_EXPONENT = -149, 127  # float32: smallest subnormal 2^-149, largest binade 2^127
EXPONENT_STEPS = 9                      # 2^9 >= 277 binades
MANTISSA_STEPS = 23


def _binade_tables() -> tuple[np.ndarray, np.ndarray]:
    """2^E and the spacing of float32 values in [2^E, 2^(E+1)), for E = -149 + index
    (index 0..511; past 2^127 the table holds +inf, which no finite score reaches)."""
    exponents = np.arange(512) + MIN_EXPONENT
    valid = exponents <= MAX_EXPONENT
    base = np.where(valid, np.ldexp(1.0, np.minimum(exponents, MAX_EXPONENT)), np.inf)
    spacing = np.ldexp(1.0, np.maximum(np.minimum(exponents, MAX_EXPONENT) - 23, MIN_EXPONENT))
    return base.astype(np.float32), np.where(valid, spacing, np.inf).astype(np.float32)


def _count_at_least(g: GraphBuilder, values: str, threshold: str, hint: str) -> str:
    """``[N, 1]`` float32: how many entries of each row are ``>= threshold`` (``[N, 1]``)."""
    hits = g.Cast(g.GreaterOrEqual(values, threshold), to=TensorProto.FLOAT, hint=hint)
    return g.ReduceSum(hits, g.ints([1], "axes"), keepdims=1, hint=hint)


def kth_largest_by_counting(g: GraphBuilder, flat: str, size: int | None, q: float,
                            k: str | None = None) -> str:
    """``[N, 1]``: the k-th largest of each row, by counting only (no TopK, no sort); ``k``
    (float ``[N, 1]``) overrides the rank that ``q`` gives."""
    zero = g.scalar(0.0)
    if k is not None:
        m = g.scalar(float(size), hint="m") if size is not None else \
            g.Cast(g.Gather(g.Shape(flat), g.ints([1], "index"), axis=0), to=TensorProto.FLOAT,
                   hint="m")
    elif size is not None:
        k = g.scalar(float(percentile_rank(size, q)), hint="k")
        m = g.scalar(float(size), hint="m")
    else:
        k = g.Cast(dynamic_rank(g, flat, q), to=TensorProto.FLOAT, hint="k")
        m = g.Cast(g.Gather(g.Shape(flat), g.ints([1], "index"), axis=0), to=TensorProto.FLOAT,
                   hint="m")
    ones = g.ints([1], "axes")
    positive = g.ReduceSum(g.Cast(g.Greater(flat, zero), to=TensorProto.FLOAT), ones,
                           keepdims=1, hint="positive")
    non_negative = _count_at_least(g, flat, zero, "non_negative")
    tau_positive = g.LessOrEqual(k, positive, hint="tau_positive")
    tau_zero = g.LessOrEqual(k, non_negative, hint="tau_zero")
    # tau < 0: the (M - k + 1)-th largest of -s among the negative scores
    negate = g.Not(tau_zero, hint="tau_negative")
    values = g.Where(negate, g.Neg(flat), flat, hint="magnitudes")
    rank = g.Where(negate, g.Add(g.Sub(m, k), g.scalar(1.0)), k, hint="rank")
    found = _rth_largest_positive(g, values, rank)
    signed = g.Where(negate, g.Neg(found), found, hint="signed")
    return g.Where(tau_positive, found, g.Where(tau_zero, zero, signed), hint="tau")


def _rth_largest_positive(g: GraphBuilder, values: str, rank: str) -> str:
    """``[N, 1]``: the r-th largest positive entry of each row (when there are ``>= r``)."""
    base_table, spacing_table = _binade_tables()
    bases = g.const(base_table, "binade_base")
    spacings = g.const(spacing_table, "binade_spacing")

    def enough(candidate: str, hint: str) -> str:
        return g.GreaterOrEqual(_count_at_least(g, values, candidate, hint), rank, hint=hint)

    def lookup(table: str, index: str) -> str:
        return g.Gather(table, g.Cast(index, to=TensorProto.INT32), axis=0, hint="lookup")

    index = g.const(np.zeros([1, 1], np.float32), "binade")  # 2^-149: every positive is >= it
    for step in reversed(range(EXPONENT_STEPS)):
        candidate = g.Add(index, g.scalar(float(2 ** step)), hint="binade")
        index = g.Where(enough(lookup(bases, candidate), "binade_count"), candidate, index,
                        hint="binade")
    base, spacing = lookup(bases, index), lookup(spacings, index)
    mantissa = g.const(np.zeros([1, 1], np.float32), "mantissa")
    for step in reversed(range(MANTISSA_STEPS)):
        candidate = g.Add(mantissa, g.scalar(float(2 ** step)), hint="mantissa")
        value = g.Add(base, g.Mul(candidate, spacing), hint="candidate")
        mantissa = g.Where(enough(value, "mantissa_count"), candidate, mantissa, hint="mantissa")
    return g.Add(base, g.Mul(mantissa, spacing), hint="found")


# -- subsample (approximate) ----------------------------------------------------------------------
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
_SHARED_POSITIONS: "weakref.WeakKeyDictionary[GraphBuilder, dict]" = weakref.WeakKeyDictionary()


def approx_sample_size(size: int, fraction: float) -> int | None:
    """``s = ceil(MU / fraction)``, the subsample of ``size`` scores when a ``fraction`` of them
    is to be found (``1 - q/100``, or ``k / M`` for the pooled scores); None where "approx" is
    exact: fewer than ``APPROX_MIN_SIZE`` scores, or ``s > M / APPROX_SAMPLE_RATIO``."""
    if size < APPROX_MIN_SIZE or not fraction > 0.0:
        return None
    sample = math.ceil(APPROX_EXPECTED_TOP / fraction)
    return sample if sample * APPROX_SAMPLE_RATIO <= size else None


def approx_fraction(q: float) -> float:
    """``1 - q/100`` in float64, as ``percentile_rank`` evaluates it."""
    return float(1.0 - np.float64(q) / 100.0)


def approx_rank(k: int, size: int, sample: int, recall: float) -> int:
    """``k_s = min(s, ceil(r mu + Z sqrt(r mu)) + 1)``, ``mu = k s / M`` (float64; the graph
    evaluates the same operations in the same order for a run-time ``M``)."""
    mu = float(k) * float(sample) / float(size)
    target = float(recall) * mu
    return int(min(sample, max(1, math.ceil(target + APPROX_Z * math.sqrt(target)) + 1)))


def weyl_step(sample: int) -> int:
    """The step ``G`` of the offsets ``(j G) mod s``: near ``s (sqrt 5 - 1) / 2`` and coprime to
    ``s``, so the ``s`` offsets are a permutation of ``0 .. s - 1``."""
    step = max(1, round(sample * GOLDEN))
    while math.gcd(step, sample) != 1:
        step += 1
    return step


def approx_positions(size: int, sample: int) -> np.ndarray:
    """The subsample's positions in the flattened scores (numpy; the graph computes the same):
    stratum ``j`` is ``[b_j, b_(j+1))`` with ``b_j = floor(j M / s)``, and the position is
    ``b_j + floor(w_j ((j G) mod s) / s)`` with ``w_j = b_(j+1) - b_j``. Distinct, increasing;
    with ``s = M`` every position once."""
    j = np.arange(sample, dtype=np.int64)
    start = j * size // sample
    width = (j + 1) * size // sample - start
    return start + width * (j * weyl_step(sample) % sample) // sample


def _positions(g: GraphBuilder, size: str, sample: str, step: int) -> str:
    """``approx_positions`` in the graph: int64 ``[s]`` from int64 scalars ``M`` and ``s``."""
    j = g.Range(g.const(np.int64(0), "zero"), sample, g.const(np.int64(1), "one"), hint="j")
    start = g.Div(g.Mul(j, size), sample, hint="stratum")
    end = g.Div(g.Mul(g.Add(j, g.const(np.int64(1), "one")), size), sample, hint="stratum_end")
    offset = g.Mod(g.Mul(j, g.const(np.int64(step), "weyl_step")), sample, hint="offset")
    return g.Add(start, g.Div(g.Mul(g.Sub(end, start), offset), sample), hint="positions")


def approx_kth_static(g: GraphBuilder, flat: str, size: int, k: int, sample: int,
                      recall: float) -> str:
    """``[N, 1]``: the ``k_s``-th largest of the ``sample`` scores at ``approx_positions`` of
    each row of ``flat`` ``[N, size]``."""
    shared = _SHARED_POSITIONS.setdefault(g, {})
    if (size, sample) not in shared:  # one constant per layer size (int32: half the bytes)
        positions = approx_positions(size, sample)
        shared[size, sample] = g.const(positions.astype(np.int32 if size < 2 ** 31 else
                                                        np.int64), "sample_positions")
    picked = g.Gather(flat, shared[size, sample], axis=1, hint="sample")
    return kth_largest_static(g, picked, 2, sample, approx_rank(k, size, sample, recall))


def approx_applies(size: int | None, q: float) -> bool:
    """Whether ``approx_threshold`` subsamples (for a run-time ``M``: may, at some ``M``)."""
    return approx_sample_size(2 ** 62 if size is None else size, approx_fraction(q)) is not None


def approx_threshold(g: GraphBuilder, flat: str, size: int | None, q: float,
                     recall: float) -> str:
    """``[N, 1]``: the subsample estimate of the q-th percentile of each row of ``flat``
    ``[N, M]`` (module docstring), where ``approx_applies``. With ``size`` None (``M`` known
    at run time) ``s`` is the same (it depends on ``q`` only), and ``k``, ``k_s`` and the
    fallback are computed in the graph; the fallback gathers all ``M`` scores and takes the
    exact k-th largest."""
    if not approx_applies(size, q):
        raise ValueError(f"no subsample for q = {q:g} and {size} scores: use the exact threshold")
    sample = approx_sample_size(2 ** 62, approx_fraction(q))
    if size is not None:
        return approx_kth_static(g, flat, size, percentile_rank(size, q), sample, recall)
    double = TensorProto.DOUBLE

    def number(value: float, hint: str) -> str:
        return g.const(np.array([value], np.float64), hint)

    m = g.Gather(g.Shape(flat), g.ints([1], "index"), axis=0, hint="m")  # int64 [1]
    k = dynamic_rank(g, flat, q)
    m_d, k_d, s_d = g.Cast(m, to=double), g.Cast(k, to=double), number(float(sample), "sample")
    exact = g.Or(g.Less(m_d, number(float(APPROX_MIN_SIZE), "least")),
                 g.Greater(g.Mul(s_d, number(float(APPROX_SAMPLE_RATIO), "ratio")), m_d),
                 hint="exact")
    # approx_rank, the same float64 operations in the same order
    target = g.Mul(number(float(recall), "recall"), g.Div(g.Mul(k_d, s_d), m_d), hint="target")
    rank_d = g.Add(g.Ceil(g.Add(target, g.Mul(number(APPROX_Z, "z"), g.Sqrt(target)))),
                   number(1.0, "one"), hint="k_sample")
    rank_d = g.Min(g.Max(rank_d, number(1.0, "one")), s_d)
    sample_size = g.Where(exact, m, g.ints([sample], "sample"), hint="sample_size")
    rank = g.Where(exact, k, g.Cast(rank_d, to=TensorProto.INT64), hint="k_sample")
    scalar = g.ints([], "scalar")
    positions = _positions(g, g.Reshape(m, scalar), g.Reshape(sample_size, scalar),
                           weyl_step(sample))
    picked = g.Gather(flat, positions, axis=1, hint="sample")
    top, _ = g.op("TopK", picked, rank, axis=1, largest=1, sorted=0, outputs=2, hint="top")
    return g.ReduceMin(top, axes=[1], keepdims=1, hint="tau")
