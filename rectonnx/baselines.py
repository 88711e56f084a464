r"""The baselines the paper compares RectGrad with (Sec. 5.2/5.3), as explainer graphs.

Notation as in methods.py: ``S`` is the target logit, ``x`` the input ``[N, ...]``, and at an
activation ``y = f(z)`` with upstream gradient ``R`` a method decides the gradient ``R_z``.

**Copies of each sample.** SmoothGrad, Integrated Gradients and DeepLIFT need the model on
several inputs per sample. The graph runs them in one batch: sample ``i`` becomes the ``K``
adjacent rows ``iK .. iK + K - 1`` of an ``[N K, ...]`` batch, copy 0 being the sample itself
(its logits are the graph's ``logits``, and a negative target resolves to its predicted class).
Every copy is seeded with ``one_hot(target)``; the input gradients ``R_x^(k)`` of the copies are
combined as ``G = sum_k w_k R_x^(k)`` and the method's finishing step turns ``G`` into the
attribution. The copies of a sample never depend on the other samples (the noise is a constant
of the graph), so a sample's map is the same in any batch. This needs a symbolic batch dimension.

| method | copies ``k = 1 .. K-1`` | weights ``w_0, w_k`` | attribution |
|---|---|---|---|
| ``smoothgrad`` (Smilkov et al. 2017) | ``x + sigma (max x - min x) e_k`` | ``0, 1/n`` | ``G`` |
| ``integrated_gradients`` (Sundararajan 2017) | ``b + alpha_k (x - b)`` | ``0, step_k`` | ``(x - b) G`` |
| ``deeplift`` (Shrikumar et al. 2017) | ``b`` (the reference) | ``1, 0`` | ``(x - b) G`` |

* SmoothGrad: ``n = samples`` noise tensors ``e_k ~ N(0, I)`` of one sample's shape are drawn
  once with ``numpy.random.default_rng(seed).standard_normal`` (float32) and embedded; ``max x -
  min x`` is per sample, over all its elements; the base method is saliency (Captum's
  ``NoiseTunnel(Saliency(m), nt_type="smoothgrad")`` with this noise).
* Integrated Gradients: the baseline ``b`` (default 0, else anything that broadcasts to one
  sample) and the quadrature of Captum's ``approximation_parameters(integration)`` for ``m =
  steps``: ``riemann_right`` (default; ``alpha_k = k/m``, ``step_k = 1/m``, the DeepExplain code
  the paper used), ``riemann_left``, ``riemann_middle``, ``riemann_trapezoid`` (Captum's:
  ``alpha = linspace(0, 1, m)``, steps ``1/m`` halved at both ends, which sum to ``(m-1)/m``) and
  ``gausslegendre`` (Captum's default).
* DeepLIFT, Rescale rule: at every activation ``R_z = R (y - y_b) / (z - z_b)``, the deltas
  between the sample and the reference copy (both rows of a pair get this multiplier), and
  ``R_z = f'(z) R`` where ``|z - z_b| < 1e-10``; every other op, max-pooling included, takes its
  exact vector-Jacobian product. That is the DeepLIFT authors' default for max-pooling
  (``MaxPoolDeepLiftMode.gradient``), DeepExplain's (the paper's code) and what Captum's
  ``DeepLift`` computes when a max-pool follows a ReLU: Captum hooks max-pools too, but the
  ReLU's rule then reads the gradient captured before the pool's hook rewrote it (the tests
  check ReLU -> MaxPool nets against Captum).

**epsilon-LRP** (Bach et al. 2015) runs on the sample alone. Relevance ``r_t = t G_t`` is carried
as the modified gradient ``G``: at the output of every Conv, Gemm, MatMul, MaxPool, AveragePool
and GlobalAveragePool node ("layer", output ``z`` with bias included when the node has one)
``G_z <- G_z z / (z + epsilon sgn(z))`` (``sgn(0) = 1``) before the node's exact
vector-Jacobian product, i.e. the epsilon rule ``r_i = sum_j x_i w_ij / (z_j + epsilon sgn z_j)
r_j``; activations pass relevance unchanged (``r_z = r_y``: ``R_z = R y / z``, which is ``f'(z) R``
for ReLU and LeakyReLU); other ops take their exact product; the attribution is ``x G_x`` and
the initial relevance is the target logit. This is Captum's ``LRP`` with ``EpsilonRule(epsilon)``
on every Conv/Linear/pooling module and identity on ReLU, for nets built of those modules
(BatchNorm, which Captum treats as a layer, is folded into the convolution here). With
``epsilon -> 0``
every factor ``z / (z + epsilon sgn z)`` is 1 and epsilon-LRP *is* grad * input for ReLU nets
(Ancona et al. 2018), which the tests show.

**Final thresholding** (paper Sec. 5.2, footnote 2), for any method: keep the attribution where
it exceeds its own per-sample ``p``-th percentile (RectGrad's 'nearest' percentile over all
non-batch elements, threshold.py; strict ``>``) and zero the rest; the paper uses ``p = 95``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .builder import GraphBuilder
from .errors import UnsupportedModelError
from .gates import Method, exact_gradient, gradient_only, times_input
from .graphs import rename
from .rules.base import Activation, Rule, RuleContext
from .threshold import DEFAULT_ALGORITHM, DEFAULT_RECALL, percentile_threshold

INTEGRATION_RULES = ("riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid",
                     "gausslegendre")
RESCALE_EPS = 1e-10  # DeepLIFT falls back to the gradient where |z - z_b| < this (as Captum)
LRP_LAYERS = ("Conv", "Gemm", "MatMul", "MaxPool", "AveragePool", "GlobalAveragePool")

Shape = tuple  # a static shape table entry: ints, symbolic names or None
MakeCopies = Callable[[GraphBuilder, str, Shape], str]


# ---------------------------------------------------------------------------------------------
# copies of each sample
@dataclass(frozen=True)
class Copies:
    """``count`` copies per sample (copy 0 is the sample itself) and their weights in ``G``.

    ``make(g, x, shape)`` emits copies ``1 .. count - 1`` of ``x`` as ``[N, count - 1, ...]``.
    """

    count: int
    weights: tuple[float, ...]
    make: MakeCopies = field(repr=False)

    def feed(self, norm, g: GraphBuilder, logits: str, at: str | None = None):
        """Make the forward graph run on the ``[N K, ...]`` copies and emit ``logits`` (copy 0's
        scores). Returns ``(view, stop)``: the view of ``norm`` that the walker differentiates
        (its logits, and without ``at`` its input, are the batched ones) and the batched tensor
        the backward stops at (None: the view's input). One copy: ``(norm, at)``, nothing
        emitted.

        ``at`` (layer attribution, a token model's embedding): the copies are made of that
        tensor, as Captum's Layer* methods do: the forward runs on the sample up to ``at``,
        ``at`` itself becomes the ``[N K, ...]`` stack of the sample's value and its copies, and
        the nodes after it run on the stack. When a tensor computed before ``at`` from the inputs
        is read after it too (a skip connection around it, an attention mask), every graph
        input is repeated ``K`` times instead, so that both sides have ``N K`` rows; the copy 0
        of ``at`` is then the sample's own value."""
        if self.count == 1:
            return norm, at
        x = norm.input_name
        shape = norm.shapes.get(x)
        if shape is None:
            raise UnsupportedModelError(f"the rank of input {x!r} is unknown", [])
        if isinstance(shape[0], int):
            raise UnsupportedModelError(
                f"this method runs {self.count} copies of each sample in one batch, which needs "
                f"a model with a symbolic batch dimension; input {x!r} has the fixed shape "
                f"{list(shape)}: export the model with a dynamic batch axis (e.g. "
                "rectonnx.converters.pytorch.export)", [])
        batched_logits = g.fresh("copies/logits")
        g.scope("copies")
        if at is None:
            batched_x = g.fresh("copies/input")
            # in the nodes only: the graph's input x stays, and feeds the copies
            rename(norm.graph, x, batched_x, in_outputs=False, in_graph_io=False)
            self._insert(norm, g, 0, self._stacked(g, x, shape, batched_x))
            for table in (norm.shapes, norm.elem_types):
                table[batched_x] = table.get(x)
            norm.active.add(batched_x)
            stop, view_input = None, batched_x
        else:
            stop, view_input = self._feed_at(norm, g, at), x
        rename(norm.graph, logits, batched_logits, in_graph_io=False)
        g.Gather(split_copies(g, batched_logits, self.count), g.const(np.int64(0), "copy_0"),
                 axis=1, outputs=[logits])
        for table in (norm.shapes, norm.elem_types):
            table[batched_logits] = table.get(logits)
        norm.active.add(batched_logits)
        return dataclasses.replace(norm, input_name=view_input,
                                   logits_name=batched_logits), stop

    def _stacked(self, g: GraphBuilder, t: str, shape: Shape, name: str) -> int:
        """Emit ``name = [N K, ...]``, the sample ``t`` and its copies; returns where the new
        nodes start in ``g.nodes``."""
        first = len(g.nodes)
        stacked = g.Concat(g.Unsqueeze(t, g.ints([1], "axis")), self.make(g, t, shape), axis=1,
                           hint="stacked")
        g.Identity(merge_copies(g, stacked), outputs=[name])
        return first

    @staticmethod
    def _insert(norm, g: GraphBuilder, position: int, first: int) -> None:
        """Move ``g.nodes[first:]`` into the model's graph at ``position``."""
        for i, node in enumerate(g.nodes[first:]):
            norm.graph.node.insert(position + i, node)
        del g.nodes[first:]

    def _feed_at(self, norm, g: GraphBuilder, at: str) -> str:
        """The copies made at tensor ``at`` (see ``feed``); returns the batched ``at``."""
        shape = norm.shapes.get(at)
        if shape is None:
            raise UnsupportedModelError(f"the shape of tensor {at!r} is unknown", [])
        graph = norm.graph
        batched = g.fresh(f"copies/{at}")
        written = at
        if crossing_tensors(graph, at):
            self._insert(norm, g, 0, self._repeated_inputs(norm, g))
            written = g.fresh(f"copies/{at}/repeated")
            rename(graph, at, batched, in_outputs=False, in_graph_io=False)
            rename(graph, at, written, in_graph_io=False)  # now only its producer's output
            first = len(g.nodes)
            g.Gather(split_copies(g, written, self.count), g.const(np.int64(0), "copy_0"),
                     axis=1, outputs=[at])  # the sample's own value, copy 0
            self._stacked(g, at, shape, batched)
            norm.shapes[written], norm.elem_types[written] = shape, norm.elem_types.get(at)
        else:
            rename(graph, at, batched, in_outputs=False, in_graph_io=False)
            first = self._stacked(g, at, shape, batched)
        producer = next(i for i, n in enumerate(graph.node) if written in n.output)
        self._insert(norm, g, producer + 1, first)
        norm.shapes[batched], norm.elem_types[batched] = shape, norm.elem_types.get(at)
        norm.active.add(batched)
        return batched

    def _repeated_inputs(self, norm, g: GraphBuilder) -> int:
        """Every graph input the nodes read, repeated ``K`` times per sample (``[N K, ...]``,
        under a new name in the nodes); returns where the new nodes start in ``g.nodes``."""
        graph = norm.graph
        weights = {t.name for t in graph.initializer}
        read = {name for node in graph.node for name in node.input}
        first = len(g.nodes)
        for info in graph.input:
            if info.name in weights or info.name not in read:
                continue
            shape = norm.shapes.get(info.name)
            if shape is None:
                raise UnsupportedModelError(f"the rank of input {info.name!r} is unknown", [])
            repeated = g.fresh(f"copies/{info.name}")
            rename(graph, info.name, repeated, in_outputs=False, in_graph_io=False)
            tiles = g.ints([1, self.count] + [1] * (len(shape) - 1), "tiles")
            g.Identity(merge_copies(g, g.Expand(g.Unsqueeze(info.name, g.ints([1], "axis")),
                                                tiles, hint="repeated")), outputs=[repeated])
            for table in (norm.shapes, norm.elem_types):
                table[repeated] = table.get(info.name)
        return first

    def repeat(self, g: GraphBuilder, seed: str) -> str:
        """``[N, C] -> [N K, C]``: every copy gets its sample's seed."""
        if self.count == 1:
            return seed
        g.scope("copies")
        tiled = g.Expand(g.Unsqueeze(seed, g.ints([1], "axis")),
                         g.ints([1, self.count, 1], "tiles"), hint="seed")
        return merge_copies(g, tiled)

    def combine(self, g: GraphBuilder, grads: str, rank: int) -> str:
        """``[N K, ...] -> [N, ...]``: ``sum_k w_k grads^(k)``."""
        if self.count == 1:
            return grads
        weights = np.asarray(self.weights, np.float32).reshape([1, self.count] + [1] * (rank - 1))
        weighted = g.Mul(split_copies(g, grads, self.count), g.const(weights, "weights"),
                         hint="weighted")
        return g.ReduceSum(weighted, g.ints([1], "axis"), keepdims=0, hint="combined")


def _no_copies(g: GraphBuilder, x: str, shape: Shape) -> str:
    raise AssertionError("a one-copy method is never fed")  # pragma: no cover


SINGLE = Copies(1, (1.0,), _no_copies)  # every other method: the sample alone


def merge_copies(g: GraphBuilder, t: str) -> str:
    """``[N, K, ...] -> [N K, ...]``."""
    shape = g.Concat(g.ints([-1], "minus_one"), g.Shape(t, start=2), axis=0, hint="merged_shape")
    return g.Reshape(t, shape, hint="merged")


def split_copies(g: GraphBuilder, t: str, count: int) -> str:
    """``[N K, ...] -> [N, K, ...]``."""
    shape = g.Concat(g.ints([-1, count], "split"), g.Shape(t, start=1), axis=0,
                     hint="split_shape")
    return g.Reshape(t, shape, hint="split")


def crossing_tensors(graph, at: str) -> set[str]:
    """The tensors computed from the graph's inputs without ``at`` that a node after ``at``
    reads (a skip connection around ``at``, an attention mask): with copies made at ``at``,
    these would keep ``N`` rows where the nodes after ``at`` have ``N K``."""
    weights = {t.name for t in graph.initializer}
    dynamic = {i.name for i in graph.input if i.name not in weights}
    after = {at}
    crossing = set()
    for node in graph.node:
        inputs = [name for name in node.input if name]
        if any(name in after for name in inputs):
            crossing.update(n for n in inputs if n in dynamic and n not in after)
            after.update(node.output)
        elif any(name in dynamic for name in inputs):
            dynamic.update(node.output)
    return crossing


def pair_delta(g: GraphBuilder, t: str) -> str:
    """For copies (sample, reference): ``t - t_b``, the same in both rows of the pair."""
    pairs = split_copies(g, t, 2)
    axis = g.ints([1], "axis")
    sample = g.Slice(pairs, g.ints([0], "start"), g.ints([1], "end"), axis, hint="sample")
    reference = g.Slice(pairs, g.ints([1], "start"), g.ints([2], "end"), axis, hint="reference")
    delta = g.Sub(sample, reference, hint="delta")
    return merge_copies(g, g.Concat(delta, delta, axis=1, hint="delta"))


def sample_noise(samples: int, sample_shape: tuple[int, ...], seed: int) -> np.ndarray:
    """SmoothGrad's noise ``e_1 .. e_n``: float32 ``[n, *sample_shape]``, standard normal."""
    return np.random.default_rng(seed).standard_normal((samples, *sample_shape),
                                                       dtype=np.float32)


def noisy_copies(samples: int, sigma: float, seed: int) -> MakeCopies:
    """SmoothGrad's copies ``x + sigma (max x - min x) e_k``, ``k = 1 .. samples``."""
    def make(g: GraphBuilder, x: str, shape: Shape) -> str:
        if not all(isinstance(d, int) for d in shape[1:]):
            raise UnsupportedModelError(
                f"smoothgrad embeds its noise and needs a fixed sample shape; input {x!r} has "
                f"shape {list(shape)}", [])
        noise = sample_noise(samples, tuple(shape[1:]), seed)
        axes = list(range(1, len(shape)))
        spread = g.Sub(g.ReduceMax(x, axes=axes, keepdims=1),
                       g.ReduceMin(x, axes=axes, keepdims=1), hint="range")
        scale = g.Unsqueeze(g.Mul(spread, g.scalar(sigma)), g.ints([1], "axis"), hint="sigma")
        noisy = g.Mul(scale, g.const(noise[None], "noise"), hint="noise")
        return g.Add(g.Unsqueeze(x, g.ints([1], "axis")), noisy, hint="noisy")
    return make


def path_copies(alphas, baseline: np.ndarray) -> MakeCopies:
    """Copies on the straight path ``b + alpha (x - b)``, one per ``alpha``."""
    def make(g: GraphBuilder, x: str, shape: Shape) -> str:
        check_baseline(baseline, shape)
        rank = len(shape)
        b = g.const(baseline, "baseline")
        coefficients = np.asarray(alphas, np.float32).reshape([1, -1] + [1] * (rank - 1))
        scaled = g.Mul(g.Unsqueeze(g.Sub(x, b, hint="x_minus_b"), g.ints([1], "axis")),
                       g.const(coefficients, "alphas"), hint="scaled")
        return g.Add(scaled, b, hint="path")
    return make


def check_baseline(baseline: np.ndarray, shape: Shape) -> None:
    """The baseline must broadcast to one sample ``[1, *shape[1:]]`` without growing it."""
    sample = [1] + [d if isinstance(d, int) else None for d in shape[1:]]
    fits = baseline.ndim <= len(sample) and all(
        b == 1 or s is None or b == s for b, s in zip(baseline.shape[::-1], sample[::-1]))
    if not fits:
        raise ValueError(f"the baseline has shape {list(baseline.shape)}, which does not "
                         f"broadcast to one sample of shape {sample}")


def times_difference(baseline: np.ndarray):
    """The finishing step ``(x - b) G``."""
    def finish(g: GraphBuilder, x: str, grad_x: str) -> str:
        return g.Mul(g.Sub(x, g.const(baseline, "baseline"), hint="x_minus_b"), grad_x,
                     hint="times_difference")
    return finish


def rescaled(g: GraphBuilder, numerator: str, delta_in: str, fallback: str) -> str:
    """``numerator / delta_in``, and ``fallback`` where ``|delta_in| < RESCALE_EPS``."""
    tiny = g.Less(g.Abs(delta_in), g.scalar(RESCALE_EPS), hint="tiny_delta")
    safe = g.Where(tiny, g.scalar(1.0), delta_in, hint="safe_delta")
    return g.Where(tiny, fallback, g.Div(numerator, safe), hint="rescale")


# ---------------------------------------------------------------------------------------------
# gates and rule overrides
def rescale_gate(ctx: RuleContext, act: Activation) -> str:
    """DeepLIFT's Rescale rule: ``R (y - y_b) / (z - z_b)``, ``f'(z) R`` where ``z ~ z_b``."""
    g = ctx.g
    numerator = g.Mul(act.upstream, pair_delta(g, act.y), hint="delta_out")
    return rescaled(g, numerator, pair_delta(g, act.z), act.exact)


def lrp_gate(ctx: RuleContext, act: Activation) -> str:
    """epsilon-LRP at activations: relevance passes unchanged, ``R_z = R y / z``."""
    if act.is_relu:
        return act.exact  # R y / z = I(z > 0) R
    g = ctx.g
    return rescaled(g, g.Mul(act.upstream, act.y, hint="relevance"), act.z, act.exact)


def epsilon_rule(inner: Rule, epsilon: float) -> Rule:
    """The rule ``inner`` with ``G_z <- G_z z / (z + epsilon sgn z)`` at its output ``z``."""
    def rule(ctx: RuleContext, node, grads, **attributes):
        g = ctx.g
        if grads[0] is not None:
            z = node.output[0]
            sign = g.Where(g.Less(z, g.scalar(0.0)), g.scalar(-1.0), g.scalar(1.0), hint="sign")
            ratio = g.Div(z, g.Add(z, g.Mul(sign, g.scalar(epsilon))), hint="epsilon_ratio")
            grads = [g.Mul(grads[0], ratio, hint="epsilon_rule")] + list(grads[1:])
        return inner(ctx, node, grads, **attributes)
    return rule


def final_threshold(g: GraphBuilder, attribution: str, shape: Shape, percentile: float,
                    algorithm: str = DEFAULT_ALGORITHM, recall: float = DEFAULT_RECALL) -> str:
    """Keep ``attribution`` where it exceeds its per-sample ``percentile``; zero elsewhere
    (``recall``: for ``algorithm="approx"``)."""
    g.scope("final_threshold")
    tau = percentile_threshold(g, attribution, shape, percentile, algorithm, recall=recall)
    return g.Where(g.Greater(attribution, tau), attribution, g.scalar(0.0), hint="kept")


# ---------------------------------------------------------------------------------------------
# the methods
def integration_parameters(rule: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``(alphas, step sizes)`` as Captum's ``approximation_parameters(rule)`` for ``steps``."""
    m = int(steps)
    if rule not in INTEGRATION_RULES:
        raise ValueError(f"unknown integration {rule!r}; choose one of "
                         f"{', '.join(INTEGRATION_RULES)}")
    if rule == "gausslegendre":
        if m < 1:
            raise ValueError(f"gausslegendre needs steps >= 1, got {m}")
        nodes, weights = np.polynomial.legendre.leggauss(m)
        return 0.5 * (1 + nodes), 0.5 * weights
    if m < 2:
        raise ValueError(f"{rule} needs steps >= 2, got {m}")
    sizes = np.full(m, 1.0 / m)
    if rule == "riemann_trapezoid":
        sizes[[0, -1]] /= 2
        return np.linspace(0, 1, m), sizes
    ends = {"riemann_left": (0, 1 - 1 / m), "riemann_middle": (1 / (2 * m), 1 - 1 / (2 * m)),
            "riemann_right": (1 / m, 1)}[rule]
    return np.linspace(*ends, m), sizes


def _baseline(baseline) -> np.ndarray:
    array = np.asarray(baseline, np.float32)
    if not np.isfinite(array).all():
        raise ValueError("the baseline must be finite")
    return array


def smoothgrad(samples: int = 50, sigma: float = 0.15, seed: int = 0) -> Method:
    if samples < 1 or sigma < 0:
        raise ValueError(f"smoothgrad needs samples >= 1 and sigma >= 0, got {samples}, {sigma}")
    copies = Copies(samples + 1, (0.0,) + (1.0 / samples,) * samples,
                    noisy_copies(samples, sigma, seed))
    return Method("smoothgrad", exact_gradient, gradient_only,
                  f"SmoothGrad: {samples} samples, sigma {sigma} of the range, seed {seed}",
                  {"samples": samples, "sigma": sigma, "seed": seed}, copies=copies)


def integrated_gradients(steps: int = 50, baseline=0.0,
                         integration: str = "riemann_right") -> Method:
    alphas, sizes = integration_parameters(integration, steps)
    b = _baseline(baseline)
    copies = Copies(len(alphas) + 1, (0.0,) + tuple(float(s) for s in sizes),
                    path_copies(alphas, b))
    return Method("integrated_gradients", exact_gradient, times_difference(b),
                  f"Integrated Gradients: {steps} steps ({integration})",
                  {"steps": steps, "baseline": baseline, "integration": integration},
                  copies=copies)


def deeplift(baseline=0.0) -> Method:
    b = _baseline(baseline)
    return Method("deeplift", rescale_gate, times_difference(b), "DeepLIFT (Rescale rule)",
                  {"baseline": baseline}, copies=Copies(2, (1.0, 0.0), path_copies([0.0], b)))


def epsilon_lrp(epsilon: float = 1e-4) -> Method:
    if not epsilon > 0:
        raise ValueError(f"epsilon_lrp needs epsilon > 0, got {epsilon}")
    return Method("epsilon_lrp", lrp_gate, times_input, f"epsilon-LRP, epsilon = {epsilon}",
                  {"epsilon": epsilon},
                  wraps={op: lambda inner: epsilon_rule(inner, epsilon) for op in LRP_LAYERS})

