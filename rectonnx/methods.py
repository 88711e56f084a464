"""The registry of attribution methods: one entry per method, and the options every method takes.

A method entry is data (Zennit's composites are the model): its name, a one-line summary, its
own options (``options.Option``: type, range, default, help), its defaults for the common options
(RectGrad defaults to the paper's padding trick), a check across its options, and ``make``, which
turns validated settings into a ``gates.Method`` (the gate at activations, the finishing step,
rule wrappers and copies of each sample). ``build(spec)`` adds the settings' rule overrides
below the method's own: the padding trick wraps the Conv rule and the proportional
redistribution rule replaces the MaxPool rule (rules/linear.py, rules/pool.py), so no rule reads a
flag. The maths of each method: gates.py, baselines.py and docs/maths.md.

| method | what it returns | source |
|---|---|---|
| saliency | the signed input gradient | Simonyan et al. 2014 |
| grad_input | input times gradient | Shrikumar et al. 2016 |
| deconvnet | ``relu(R)`` at every activation | Zeiler & Fergus 2014 |
| guided_backprop | gradient and upstream signal both positive | Springenberg et al. 2015 |
| rectgrad | ``I(y R > tau) R`` at activations, ``relu(x R_x)`` | Kim et al. 2019 |
| smoothgrad | saliency averaged over noisy copies | Smilkov et al. 2017 |
| integrated_gradients | path integral from a baseline | Sundararajan et al. 2017 |
| deeplift | Rescale rule against a baseline | Shrikumar et al. 2017 |
| epsilon_lrp | the epsilon rule of layer-wise relevance | Bach et al. 2015 |
| gradcam | ``relu(sum_k mean_ij(dS/dA_k) A_k)`` at a layer, resized | Selvaraju et al. 2017 |
| gradcam++ | Grad-CAM with the closed-form ``alpha`` weights | Chattopadhay et al. 2018 |
| layercam | ``relu(sum_k relu(dS/dA_k) A_k)``, resized | Jiang et al. 2021 |

Option ``wrt`` (saliency, grad_input, rectgrad, smoothgrad, integrated_gradients, deeplift):
the attribution with respect to an intermediate tensor instead of the input (its shape;
Captum's ``LayerGradient``, ``LayerGradientXActivation``, ``LayerIntegratedGradients``,
``LayerDeepLift``); the backward walks only from the logits to that tensor. The methods with
copies make them at that tensor (the path from the baseline, the noise: taken there, the
baseline given at that tensor; baselines.Copies.feed). The CAM
methods (cam.py) take ``layer`` (default: the last 4-D activation before the global pooling or
flatten) and return ``[N, 1, H, W]`` maps at the input's spatial size.

Token models (integer ids): the backward stops at the embedding output (or ``wrt``) and the
common option ``token_reduction`` reduces ``[N, T, D]`` to ``[N, T]`` (``token_reduction()``;
docs/maths.md, 'Token models'); the methods that run copies make them at that embedding output
(Integrated Gradients from a baseline embedding, 0 by default, as Captum's
``LayerIntegratedGradients`` on the embedding layer).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from . import baselines, cam
from .gates import (Method, deconvnet_gate, exact_gradient, gradient_only, guided_gate,
                    positive_times_input, rectified_gate, times_input)
from .options import Option, OptionError
from .rules.base import RULES, Rule
from .rules.linear import padding_trick_conv
from .rules.pool import prr_max_pool_backward
from .threshold import ALGORITHMS, DEFAULT_ALGORITHM, DEFAULT_RECALL

if TYPE_CHECKING:
    from .spec import ExplanationSpec

RUNTIMES = ("any", "onnxruntime-cpu")
TOKEN_REDUCTIONS = ("auto", "norm", "sum", "none")
PRECISIONS = ("model", "fp32")
# methods whose attribution multiplies by the input: per token, their sum over the embedding
# dimension ("gradient dot input", as Google's LIT does); the others take the L2 norm
TIMES_INPUT_METHODS = frozenset({"grad_input", "rectgrad", "integrated_gradients", "deeplift",
                                 "epsilon_lrp"})


def token_reduction(method: str, setting: str) -> str:
    """The reduction over the embedding dimension that ``setting`` means for ``method``."""
    if setting != "auto":
        return setting
    return "sum" if method in TIMES_INPUT_METHODS else "norm"

# -- options every method takes ------------------------------------------------------------------
COMMON_OPTIONS = (
    Option("padding_trick", "padding", False,
           "Zero the gradient of a convolution's output where its receptive field covers "
           "padding: 'exact' (every kernel and stride) or 'border' (the RectGrad authors' "
           "one-pixel border of every SAME-shaped convolution); RectGrad defaults to 'exact', "
           "the paper's setting."),
    Option("prr", "bool", False,
           "Max-pool backward by the proportional redistribution rule (paper App. C.2)."),
    Option("final_percentile", "float", None,
           "Keep the attribution above this per-sample percentile and zero the rest (the "
           "paper's final thresholding uses 95).", low=0.0, high=100.0, nullable=True),
    Option("threshold", "choice", DEFAULT_ALGORITHM,
           "Percentile algorithm of RectGrad's gate and the final threshold: topk is fastest "
           "on CPU; bisect uses no TopK (TensorRT-safe), same result; approx estimates each "
           "percentile from a subsample of large layers (see recall).", choices=ALGORITHMS),
    Option("recall", "float", DEFAULT_RECALL,
           "threshold=approx only: the share of the units the exact threshold keeps that the "
           "approximate one keeps too (per layer and sample, with probability >= 97.5 %); "
           "a higher recall keeps more extra units.", low=0.0, high=1.0, open_low=True),
    Option("layer_outputs", "bool", False,
           "Also output attribution/<node>: the method's gradient at every activation's "
           "output (the paper's Figure 6)."),
    Option("runtime", "choice", "any",
           "Which runtimes the graph targets: 'any' uses ops every tested runtime runs; "
           "'onnxruntime-cpu' may also use MaxUnpool (faster there, absent from OpenVINO). "
           "Same attribution.", choices=RUNTIMES),
    Option("token_reduction", "choice", "auto",
           "Token models only (integer token ids, attributed at the embedding output "
           "[N, T, D]): the per-token score [N, T] is the L2 norm over D ('norm') or the sum "
           "over D ('sum', gradient dot input); 'auto' is sum for the methods that multiply "
           "by the input (grad_input, rectgrad, ...) and norm for the others; 'none' keeps "
           "[N, T, D]. Ignored for other models.", choices=TOKEN_REDUCTIONS),
    Option("precision", "choice", "model",
           "float16 models only: 'model' computes the forward and backward pass in float16 as "
           "deployed (the percentile thresholds in float32; the graph takes and returns "
           "float16), 'fp32' upcasts the weights and computes in float32. bfloat16 models "
           "compute in float32. Ignored for float32 models.", choices=PRECISIONS),
)

# -- the methods' own options ----------------------------------------------------------------------
Q = Option("q", "float", 98.0, "RectGrad: the per-layer percentile of importance scores that "
           "a unit must exceed.", low=0.0, high=100.0)
TAU = Option("tau", "float", None, "RectGrad: a constant threshold instead of the percentile q.",
             nullable=True)
Q_INPUT = Option("q_input", "bool", False,
                 "RectGrad: make q an optional graph input (float64, [1] or one per sample) "
                 "whose default is q: one artifact serves every q.")
SAMPLES = Option("samples", "int", 50, "SmoothGrad: noisy copies per image.", low=1,
                 high=100_000)
SIGMA = Option("sigma", "float", 0.15, "SmoothGrad: noise standard deviation as a fraction of "
               "each image's value range.", low=0.0)
SEED = Option("seed", "int", 0, "SmoothGrad: seed of the noise (embedded in the graph).", low=0,
              high=2 ** 63 - 1)
STEPS = Option("steps", "int", 50, "Integrated Gradients: integration steps.", low=1,
               high=100_000)
BASELINE = Option("baseline", "baseline", 0.0, "Integrated Gradients and DeepLIFT: the "
                  "reference input (a number, or in Python an array that broadcasts to one "
                  "sample).")
INTEGRATION = Option("integration", "choice", "riemann_right", "Integrated Gradients: the "
                     "quadrature rule (riemann_right is the paper's code, gausslegendre "
                     "Captum's default).", choices=baselines.INTEGRATION_RULES)
EPSILON = Option("epsilon", "float", 1e-4, "epsilon-LRP: the stabiliser epsilon.", low=0.0,
                 open_low=True)
WRT = Option("wrt", "text", None, "Layer attribution: the name of the (normalised) graph's "
             "tensor to attribute to instead of the input; the attribution has its shape "
             "(smoothgrad, integrated_gradients, deeplift: their copies are made at that "
             "tensor, the baseline is given there).", nullable=True)
LAYER = Option("layer", "text", None, "Grad-CAM family: the 4-D feature map [N, K, h, w] "
               "(a tensor name) the map is computed at; default: the last one before the "
               "global pooling or flatten (`rectonnx info` names it).", nullable=True)


@dataclass(frozen=True)
class MethodEntry:
    """One registered method: ``make(settings) -> gates.Method`` from validated settings
    (a dict holding every option the method takes); ``defaults`` overrides the default of a
    common option; ``check(settings, given)`` rejects combinations (``given``: the options the
    caller set)."""

    name: str
    summary: str
    make: Callable[[Mapping[str, Any]], Method]
    options: tuple[Option, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[Mapping[str, Any], set], None] | None = None

    def all_options(self) -> tuple[Option, ...]:
        return self.options + COMMON_OPTIONS

    def default(self, option: Option):
        return self.defaults.get(option.name, option.default)


def _simple(name: str, gate, finish, summary: str,
            options: tuple[Option, ...] = ()) -> MethodEntry:
    return MethodEntry(name, summary,
                       lambda s: Method(name, gate, finish, summary, wrt=s.get("wrt")), options)


def _cam(name: str, summary: str) -> MethodEntry:
    return MethodEntry(name, summary, lambda s: Method(
        name, exact_gradient, cam.FINISHES[name], summary, wrt=s["layer"], cam=True), (LAYER,))


def _make_rectgrad(s: Mapping[str, Any]) -> Method:
    q, tau = s["q"], s["tau"]
    q_tensor = "q" if s["q_input"] else None
    summary = f"RectGrad, tau = {tau:g}" if tau is not None else f"RectGrad, q = {q:g}"
    return Method("rectgrad", rectified_gate(q, tau, s["threshold"], q_tensor, s["recall"]),
                  positive_times_input, summary, {"q": q, "tau": tau}, wrt=s["wrt"])


def _at_wrt(make: Callable[[Mapping[str, Any]], Method]) -> Callable[[Mapping[str, Any]], Method]:
    """``make`` with the setting ``wrt`` passed on to the method."""
    return lambda s: dataclasses.replace(make(s), wrt=s["wrt"])


def _check_rectgrad(s: Mapping[str, Any], given: set) -> None:
    if s["tau"] is not None and "q" in given:
        raise OptionError("rectgrad takes either q (a percentile) or tau (a constant "
                          "threshold), not both")
    if s["tau"] is not None and s["q_input"]:
        raise OptionError("q_input makes q a graph input, which needs the percentile "
                          "threshold: drop tau")


def check_common(s: Mapping[str, Any], given: set) -> None:
    """Reject contradictions among the common options (every method; spec.py calls it)."""
    if "recall" in given and s["threshold"] != "approx":
        raise OptionError(f"option recall only applies to threshold=approx (threshold is "
                          f"{s['threshold']}): drop recall or set threshold=approx")
    if s["threshold"] == "approx" and s.get("q_input"):
        raise OptionError("threshold=approx needs a fixed q: it does not take q_input (use "
                          "threshold=topk with q_input)")


def _check_integration(s: Mapping[str, Any], given: set) -> None:
    least = 1 if s["integration"] == "gausslegendre" else 2
    if s["steps"] < least:
        raise OptionError(f"option steps = {s['steps']} is not allowed: {s['integration']} "
                          f"needs steps >= {least}")


METHODS: dict[str, MethodEntry] = {entry.name: entry for entry in (
    _simple("saliency", exact_gradient, gradient_only, "signed input gradient", (WRT,)),
    _simple("grad_input", exact_gradient, times_input, "input times gradient", (WRT,)),
    _simple("deconvnet", deconvnet_gate, gradient_only, "relu(R) at every activation"),
    _simple("guided_backprop", guided_gate, gradient_only,
            "gradient and upstream signal both positive"),
    MethodEntry("rectgrad", "Rectified Gradient: units whose importance y R exceeds a "
                "per-layer percentile", _make_rectgrad, (Q, TAU, Q_INPUT, WRT),
                defaults={"padding_trick": "exact"}, check=_check_rectgrad),
    MethodEntry("smoothgrad", "saliency averaged over noisy copies",
                _at_wrt(lambda s: baselines.smoothgrad(s["samples"], s["sigma"], s["seed"])),
                (SAMPLES, SIGMA, SEED, WRT)),
    MethodEntry("integrated_gradients", "path integral of the gradient from a baseline",
                _at_wrt(lambda s: baselines.integrated_gradients(s["steps"], s["baseline"],
                                                                 s["integration"])),
                (STEPS, BASELINE, INTEGRATION, WRT), check=_check_integration),
    MethodEntry("deeplift", "DeepLIFT, Rescale rule against a baseline",
                _at_wrt(lambda s: baselines.deeplift(s["baseline"])), (BASELINE, WRT)),
    MethodEntry("epsilon_lrp", "layer-wise relevance, epsilon rule",
                lambda s: baselines.epsilon_lrp(s["epsilon"]), (EPSILON,)),
    _cam("gradcam", "Grad-CAM: channels weighted by their mean gradient at a layer"),
    _cam("gradcam++", "Grad-CAM++: channels weighted by the closed-form alpha"),
    _cam("layercam", "Layer-CAM: every position weighted by its positive gradient"),
)}
METHOD_NAMES = tuple(METHODS)


def all_options() -> dict[str, Option]:
    """Every declared option once, by name (each method's in order, then the common ones)."""
    table: dict[str, Option] = {}
    for entry in METHODS.values():
        for option in entry.options:
            table.setdefault(option.name, option)
    for option in COMMON_OPTIONS:
        table[option.name] = option
    return table


def methods_taking(name: str) -> tuple[str, ...]:
    """The methods that take option ``name`` (every method for a common option)."""
    return tuple(m for m, entry in METHODS.items()
                 if any(o.name == name for o in entry.all_options()))


def entry(name: str) -> MethodEntry:
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise OptionError(f"unknown method {name!r}; choose one of "
                          f"{', '.join(METHOD_NAMES)}") from None


def build(spec: "ExplanationSpec") -> Method:
    """The ``gates.Method`` of a validated spec, with the settings' rule overrides below the
    method's own rule wrappers (``Method.wraps``)."""
    settings = spec.settings()
    method = entry(spec.method).make(settings)
    below: dict[str, Callable[[Rule], Rule]] = {}
    if settings["prr"]:
        below["MaxPool"] = lambda inner: prr_max_pool_backward
    if settings["padding_trick"]:
        mode = settings["padding_trick"]
        below["Conv"] = lambda inner: padding_trick_conv(mode, inner)
    return dataclasses.replace(method, options=settings, wraps=_stacked(below, method.wraps))


def _stacked(first: Mapping[str, Callable[[Rule], Rule]],
             then: Mapping[str, Callable[[Rule], Rule]]) -> dict[str, Callable[[Rule], Rule]]:
    """Wrappers that apply ``first`` and then ``then`` per op type."""
    stacked = dict(first)
    for op, wrap in then.items():
        if op in stacked:
            stacked[op] = lambda inner, a=stacked[op], b=wrap: b(a(inner))
        else:
            stacked[op] = wrap
    return stacked


def rules_of(method: Method) -> dict[str, Rule]:
    """The concrete backward rules a method replaces: its wrappers applied to the table."""
    return {op: wrap(RULES[op]) for op, wrap in method.wraps.items()}

