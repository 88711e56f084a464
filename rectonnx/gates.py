"""The parts methods are made of: what happens at activations, and how the input gradient ends.

methods.py puts them together into the registry of named methods.

Everywhere else the backward is the exact vector-Jacobian product; a method only decides, at
each activation ``y = f(z)`` with upstream gradient ``R``, the gradient ``R_z`` (docs/maths.md, "The methods"):

| method          | ``R_z``                                  | attribution            | source |
|-----------------|------------------------------------------|------------------------|--------|
| saliency        | ``f'(z) R`` (exact)                      | ``R_x``                | Simonyan et al. 2014 |
| grad_input      | exact                                    | ``x R_x``              | Shrikumar et al. 2016 |
| deconvnet       | ``relu(R)``                              | ``R_x``                | Zeiler & Fergus 2014 |
| guided_backprop | ``relu(f'(z) R)`` = ``I(z>0) I(R>0) R``  | ``R_x``                | Springenberg et al. 2015 |
| rectgrad        | ``I(y R > tau) R`` (ReLU; others also    | ``relu(x R_x)``        | Kim et al., RectGrad, eq. 4 |
|                 | times ``f'(z)``)                         |                        |        |

``guided_backprop`` uses ``relu(f'(z) R)``: ``f'(z) relu(R)`` for the monotone activations
(``f' >= 0``: ReLU family, Sigmoid, Tanh, ELU, Softplus, ...); for the non-monotone Gelu, SiLU,
Mish and HardSwish it also passes negative ``R`` where ``f'(z) < 0`` (rules/nonlinear.py lists
which ops are gated activations). RectGrad's ``tau`` is a constant or the per-sample ``q``-th
percentile of ``y R`` (threshold.py). Matches the authors' code: strict ``>``, per-sample
percentile, no extra ReLU mask, final ``x * R_x`` thresholded at 0. Departs on purpose: non-ReLU
activations keep ``f'(z)`` (their code ignores e.g. ReLU6 saturation).

The paper's baselines (smoothgrad, integrated_gradients, deeplift, epsilon_lrp) are in
baselines.py: they also override the backward of some ops (``rules``) or run several copies of
each sample (``copies``).

**Vanishing maps.** With ``M`` scores per sample and ``k = percentile_rank(M, q)``, ``k = 1``
makes tau the layer's maximum, which no score exceeds (strict ``>``): the gate closes the layer
and the whole map is zero. At ``q = 98`` this is any gated layer of 25 or fewer units. The gate
reports such layers (``RuleContext.warn``) and ``rewrite`` warns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .builder import GraphBuilder
from .rules.base import Activation, Rule, RuleContext, Unpooled, masked
from .threshold import (DEFAULT_ALGORITHM, DEFAULT_RECALL, percentile_rank,
                        percentile_threshold, percentile_threshold_of_sparse,
                        sparse_shortcut_applies)

ActivationRule = Callable[[RuleContext, Activation], str]
Finish = Callable[[GraphBuilder, str, str], str]


@dataclass(frozen=True)
class Method:
    """A method ready to build a graph: its gate at activations and its finishing step;
    ``wraps``: per op type, a function that takes the backward rule below it and returns the
    rule to use (a method's own rules, e.g. epsilon-LRP's at Conv; the settings' overrides,
    the padding trick and PRR, come below them, methods.build); ``copies``: copies of each
    sample (``baselines.Copies``; None: the sample alone); ``wrt``: the tensor the backward
    stops at and ``finish`` receives as ``x`` (None: the data input; layer attribution);
    ``cam``: a class activation map (cam.py): the backward stops at ``wrt`` (None: the default
    CAM layer), ``finish`` returns ``[N, 1, h, w]`` and rewrite resizes it to the input."""

    name: str
    activation: ActivationRule
    finish: Finish
    summary: str
    options: dict = field(default_factory=dict)
    wraps: Mapping[str, Callable[[Rule], Rule]] = field(default_factory=dict)
    copies: Any = None
    wrt: str | None = None
    cam: bool = False


# -- gates at activations ----------------------------------------------------------------------
def exact_gradient(ctx: RuleContext, act: Activation) -> str:
    return act.exact


def deconvnet_gate(ctx: RuleContext, act: Activation) -> str:
    return ctx.g.Relu(act.upstream, hint="deconvnet")


def guided_gate(ctx: RuleContext, act: Activation) -> str:
    return ctx.g.Relu(act.exact, hint="guided")


def rectified_gate(q: float, tau: float | None, threshold: str = DEFAULT_ALGORITHM,
                   q_tensor: str | None = None,
                   recall: float = DEFAULT_RECALL) -> ActivationRule:
    """RectGrad: keep the gradient where the importance score ``y R`` exceeds ``tau``
    (``threshold`` names the algorithm for the percentile: topk and bisect give the same tau,
    approx estimates it from a subsample keeping a share ``recall`` of the exact gate's units;
    ``q_tensor`` names a graph input that sets ``q`` at run time)."""
    def gate(ctx: RuleContext, act: Activation) -> str:
        g = ctx.g
        # f'(z) R, as R * I(f'(z) = 1) when f' is 0 or 1 (Clip): the masks then merge by And
        passed = act.upstream if act.is_relu or act.mask is not None else act.exact
        allowed = None if act.is_relu else act.mask
        if tau is None:
            size = ctx.sample_size(act.y)
            if size is not None and percentile_rank(size, q) == 1:
                ctx.warn(f"RectGrad layer {act.y!r} has {size} units per sample, too few "
                         f"for q = {q:g}: its threshold is the layer's maximum, which no unit "
                         "exceeds, so nothing passes it and the map is zero wherever it depends "
                         f"on that layer (use q <= {_largest_q_passing(size):g}, or tau)")
        sparse = tau is None and threshold in ("topk", "approx") and q_tensor is None
        pooled = _pooled_threshold(ctx, act, q, threshold, recall) if sparse else None
        if pooled is not None and act.is_relu:
            # R is a max pool's dY placed at the arg-maxes (zero elsewhere, where y R = 0 is
            # not above tau >= 0): gate dY on the pooled grid, then place it.
            unpooled, pooled_scores, cut = pooled
            return unpooled.spread(_kept(g, unpooled.dy, pooled_scores, cut))
        scores = g.Mul(act.y, act.upstream, hint="importance")
        if pooled is not None:
            cut = pooled[2]
        elif tau is None:
            cut = percentile_threshold(g, scores, ctx.shape(act.y), q, threshold, q_tensor,
                                       recall)
        else:
            cut = g.scalar(tau, hint="tau")
        return _kept(g, passed, scores, cut, allowed)
    return gate


def _kept(g: GraphBuilder, passed: str, scores: str, cut: str, allowed: str | None = None) -> str:
    """``passed * I(scores > cut)``, and ``allowed`` (a boolean mask) when given."""
    above = g.Greater(scores, cut)
    if allowed is not None:
        above = g.And(allowed, above)
    return masked(g, passed, above, hint="rectgrad")


def _pooled_threshold(ctx: RuleContext, act: Activation, q: float,
                      threshold: str = DEFAULT_ALGORITHM,
                      recall: float = DEFAULT_RECALL) -> "tuple[Unpooled, str, str] | None":
    """When ``y`` feeds only a max pool with disjoint windows: the pool, its scores ``Y * dY``
    and the percentile taken from them (threshold.percentile_threshold_of_sparse); else None."""
    unpooled = ctx.unpooled_from(act.upstream, act.y)
    if unpooled is None:
        return None
    size, pooled_size = ctx.sample_size(act.y), ctx.sample_size(unpooled.y)
    if size is None or pooled_size is None or \
            not sparse_shortcut_applies(pooled_size, size, q):
        return None
    g = ctx.g
    scores = g.Mul(unpooled.y, unpooled.dy, hint="pooled_importance")
    cut = percentile_threshold_of_sparse(g, scores, len(ctx.shape(act.y)), pooled_size, size, q,
                                         threshold, recall)
    return unpooled, scores, cut


# -- finishing steps ---------------------------------------------------------------------------
def gradient_only(g: GraphBuilder, x: str, grad_x: str) -> str:
    return grad_x


def times_input(g: GraphBuilder, x: str, grad_x: str) -> str:
    return g.Mul(x, grad_x, hint="grad_times_input")


def positive_times_input(g: GraphBuilder, x: str, grad_x: str) -> str:
    return g.Relu(g.Mul(x, grad_x, hint="grad_times_input"), hint="positive")


def _largest_q_passing(size: int) -> float:
    """The largest q (in steps of 0.5) whose rank is above 1 for ``size`` scores."""
    q = 100.0
    while q > 0 and percentile_rank(size, q) == 1:
        q -= 0.5
    return q
