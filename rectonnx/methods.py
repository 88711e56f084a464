"""Attribution methods as data: what happens at activations, and how the input gradient ends.

Everywhere else the backward is the exact vector-Jacobian product; a method only decides, at
each activation ``y = f(z)`` with upstream gradient ``R``, the gradient ``R_z`` (SPEC.md sec. 2):

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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping

from .builder import GraphBuilder
from .rules.base import Activation, RuleContext, Unpooled, masked
from .threshold import (DEFAULT_ALGORITHM, check_algorithm, percentile_threshold,
                        percentile_threshold_of_sparse, sparse_shortcut_applies)

if TYPE_CHECKING:
    from .baselines import Copies

ActivationRule = Callable[[RuleContext, Activation], str]
Finish = Callable[[GraphBuilder, str, str], str]


@dataclass(frozen=True)
class Method:
    """A named attribution method: its gate at activations and its finishing step; optionally
    backward rules that replace the standard ones by op type, and copies of each sample."""

    name: str
    activation: ActivationRule
    finish: Finish
    summary: str
    options: dict = field(default_factory=dict)
    rules: Mapping[str, Callable] = field(default_factory=dict)
    copies: "Copies | None" = None


# -- gates at activations ----------------------------------------------------------------------
def exact_gradient(ctx: RuleContext, act: Activation) -> str:
    return act.exact


def deconvnet_gate(ctx: RuleContext, act: Activation) -> str:
    return ctx.g.Relu(act.upstream, hint="deconvnet")


def guided_gate(ctx: RuleContext, act: Activation) -> str:
    return ctx.g.Relu(act.exact, hint="guided")


def rectified_gate(q: float, tau: float | None, threshold: str = DEFAULT_ALGORITHM,
                   q_tensor: str | None = None) -> ActivationRule:
    """RectGrad: keep the gradient where the importance score ``y R`` exceeds ``tau``
    (``threshold`` names the algorithm for the percentile; both give the same tau;
    ``q_tensor`` names a graph input that sets ``q`` at run time)."""
    def gate(ctx: RuleContext, act: Activation) -> str:
        g = ctx.g
        # f'(z) R, as R * I(f'(z) = 1) when f' is 0 or 1 (Clip): the masks then merge by And
        passed = act.upstream if act.is_relu or act.mask is not None else act.exact
        allowed = None if act.is_relu else act.mask
        sparse = tau is None and threshold == "topk" and q_tensor is None
        pooled = _pooled_threshold(ctx, act, q) if sparse else None
        if pooled is not None and act.is_relu:
            # R is a max pool's dY placed at the arg-maxes (zero elsewhere, where y R = 0 is
            # not above tau >= 0): gate dY on the pooled grid, then place it.
            unpooled, pooled_scores, cut = pooled
            return unpooled.spread(_kept(g, unpooled.dy, pooled_scores, cut))
        scores = g.Mul(act.y, act.upstream, hint="importance")
        if pooled is not None:
            cut = pooled[2]
        elif tau is None:
            cut = percentile_threshold(g, scores, ctx.shape(act.y), q, threshold, q_tensor)
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


def _pooled_threshold(ctx: RuleContext, act: Activation,
                      q: float) -> "tuple[Unpooled, str, str] | None":
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
    cut = percentile_threshold_of_sparse(g, scores, len(ctx.shape(act.y)), pooled_size, size, q)
    return unpooled, scores, cut


# -- finishing steps ---------------------------------------------------------------------------
def gradient_only(g: GraphBuilder, x: str, grad_x: str) -> str:
    return grad_x


def times_input(g: GraphBuilder, x: str, grad_x: str) -> str:
    return g.Mul(x, grad_x, hint="grad_times_input")


def positive_times_input(g: GraphBuilder, x: str, grad_x: str) -> str:
    return g.Relu(g.Mul(x, grad_x, hint="grad_times_input"), hint="positive")


SIMPLE_METHODS = {
    "saliency": Method("saliency", exact_gradient, gradient_only, "signed input gradient"),
    "grad_input": Method("grad_input", exact_gradient, times_input, "input times gradient"),
    "deconvnet": Method("deconvnet", deconvnet_gate, gradient_only,
                        "relu(R) at every activation"),
    "guided_backprop": Method("guided_backprop", guided_gate, gradient_only,
                              "gradient and upstream signal both positive"),
}
BASELINE_NAMES = ("smoothgrad", "integrated_gradients", "deeplift", "epsilon_lrp")
METHOD_NAMES = tuple(SIMPLE_METHODS) + ("rectgrad",) + BASELINE_NAMES


def rectgrad(q: float = 98.0, tau: float | None = None,
             threshold: str = DEFAULT_ALGORITHM, q_input: str | None = None) -> Method:
    """RectGrad; ``q_input`` names a graph input that sets ``q`` per sample (default ``q``)."""
    if tau is None and not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be a percentile in [0, 100], got {q}")
    if q_input is not None and tau is not None:
        raise ValueError("q as an input needs the percentile threshold (tau=None)")
    check_algorithm(threshold)
    summary = f"RectGrad, tau = {tau}" if tau is not None else f"RectGrad, q = {q}"
    return Method("rectgrad", rectified_gate(q, tau, threshold, q_input), positive_times_input,
                  summary, {"q": q, "tau": tau, "threshold": threshold, "q_input": q_input})


def get_method(name: str, *, q: float = 98.0, tau: float | None = None,
               threshold: str = DEFAULT_ALGORITHM, q_input: str | None = None,
               **options) -> Method:
    """The method called ``name``; ``q``/``tau``/``threshold``/``q_input`` parametrise RectGrad
    and ``options`` a baseline (baselines.py)."""
    if q_input is not None and name != "rectgrad":
        raise ValueError(f"q as an input is RectGrad's percentile; {name} has no q")
    if name in BASELINE_NAMES:
        from .baselines import baseline_method
        return baseline_method(name, **options)
    if options:
        raise ValueError(f"{name} has no option {', '.join(sorted(options))}")
    if name == "rectgrad":
        return rectgrad(q, tau, threshold, q_input)
    try:
        return SIMPLE_METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHOD_NAMES)}") \
            from None
