"""The baselines (rectonnx/baselines.py) against Captum, on torch nets exported to ONNX.

* ``smoothgrad`` = Captum's ``NoiseTunnel(Saliency)`` (``nt_type="smoothgrad"``) with the noise
  draw replaced by rectonnx's embedded noise (``sample_noise``) at the per-sample sigma, so both
  average the same noisy gradients;
* ``integrated_gradients`` = Captum's ``IntegratedGradients`` for the same quadrature
  (``riemann_right``, ``riemann_trapezoid``, ``gausslegendre``), zero and random baselines;
* ``deeplift`` = Captum's ``DeepLift`` (Rescale), zero and random references, ReLU and
  LeakyReLU, a max-pool after a ReLU (where Captum, like DeepLIFT's own default, takes the
  gradient: baselines.py); summation-to-delta where it holds exactly (no max-pool);
* ``epsilon_lrp`` = Captum's ``InputXGradient`` for epsilon -> 0 (a ReLU net with BatchNorm and
  a residual add), and Captum's ``LRP`` (EpsilonRule on every layer) for a finite epsilon;
* final thresholding against its numpy definition; ``layer_outputs`` against torch autograd.

All in float64 on the Captum side, max relative error <= 1e-4 (helpers.TOLERANCE). Kinks: the
inputs are random ramps and max-pools have 2x2 windows without overlap, so no pre-activation sits
within float32 rounding of 0 and no window ties, except by a chance the tests would show.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from captum.attr import (LRP, DeepLift, InputXGradient, IntegratedGradients, NoiseTunnel,
                         Saliency)
from captum.attr._core.noise_tunnel import NoiseTunnel as NoiseTunnelClass
from captum.attr._utils.approximation_methods import approximation_parameters
from captum.attr._utils.lrp_rules import EpsilonRule
from torch import nn

import rectonnx
from helpers import (assert_close, distinct_values, explain, export, resolve_targets,
                     run_explainer)
from rectonnx.baselines import integration_parameters, sample_noise
from rectonnx.builder import GraphBuilder
from rectonnx.normalize import normalize
from rectonnx.threshold import percentile_rank

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TARGETS = [1, -1, 4]


class SmallCNN(nn.Module):
    """Conv, ReLU, 2x2 max-pool, conv, ReLU (or LeakyReLU), 2x2 average pool, dense, ReLU, dense:
    every layer its own module (Captum's hooks), the flatten functional (LRP needs no rule)."""

    def __init__(self, leaky: bool = False, max_pool: bool = True, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2) if max_pool else nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.relu2 = nn.LeakyReLU(0.1) if leaky else nn.ReLU()
        self.pool2 = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(8 * 2 * 2, 12)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(12, classes)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(torch.flatten(x, 1))))


class ResidualBN(nn.Module):
    """Conv + BatchNorm (folded by the exporter), a residual add, global average pool."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        a = self.relu1(self.bn1(self.conv1(x)))
        b = self.relu2(self.conv2(a) + a)
        return self.fc(torch.flatten(self.gap(self.pool(b)), 1))


def setup(factory=SmallCNN, seed=0, shape=(3, 3, 8, 8), **kwargs):
    torch.manual_seed(seed)
    module = factory(**kwargs).eval()
    for sub in module.modules():
        if isinstance(sub, nn.BatchNorm2d):
            sub.running_mean.uniform_(-0.5, 0.5)
            sub.running_var.uniform_(0.5, 2.0)
    x = distinct_values(shape, np.random.default_rng(seed), -1.0, 1.0)
    return module, x, export(module, torch.from_numpy(x))


def double(module):
    return copy.deepcopy(module).double().eval()


def targets_of(module, x, target):
    with torch.no_grad():
        logits = double(module)(torch.from_numpy(x.astype(np.float64))).numpy()
    return resolve_targets(logits, target)


def check(model, x, method, expected, oracle, where, **options):
    _, attribution = explain(model, x, TARGETS, method, **options)
    assert np.abs(expected).max() > 0
    assert_close(attribution, expected, oracle, where=where)
    return attribution


# -- SmoothGrad --------------------------------------------------------------------------------
def captum_smoothgrad(module, x, target, samples, sigma, seed, monkeypatch):
    """Captum's NoiseTunnel(Saliency) with rectonnx's noise and per-sample sigma."""
    noise = torch.from_numpy(sample_noise(samples, x.shape[1:], seed).astype(np.float64))

    def add_noise(inputs, stdev, nt_samples):
        spread = inputs.flatten(1).max(1).values - inputs.flatten(1).min(1).values
        scale = (sigma * spread).reshape(-1, 1, *([1] * (inputs.dim() - 1)))
        noisy = inputs.unsqueeze(1) + scale * noise.unsqueeze(0)
        return noisy.reshape(-1, *inputs.shape[1:])

    monkeypatch.setattr(NoiseTunnelClass, "_add_noise_to_input", staticmethod(add_noise))
    inputs = torch.from_numpy(x.astype(np.float64))
    tunnel = NoiseTunnel(Saliency(double(module)))
    result = tunnel.attribute(inputs, nt_type="smoothgrad", nt_samples=samples, stdevs=1.0,
                              target=targets_of(module, x, target).tolist(), abs=False)
    return result.detach().numpy()


@pytest.mark.parametrize("samples,sigma,seed", [(8, 0.15, 0), (5, 0.3, 7)])
def test_smoothgrad_is_captum_noise_tunnel_with_the_same_noise(samples, sigma, seed,
                                                              monkeypatch):
    module, x, model = setup()
    expected = captum_smoothgrad(module, x, TARGETS, samples, sigma, seed, monkeypatch)
    check(model, x, "smoothgrad", expected, "smoothgrad vs Captum NoiseTunnel",
          f"n{samples}/sigma{sigma}", samples=samples, sigma=sigma, seed=seed)
    _, saliency = explain(model, x, TARGETS, "saliency")
    assert not np.allclose(saliency, expected, rtol=1e-2)  # the noise matters


def test_smoothgrad_noise_is_reproducible_and_batch_independent():
    _, x, model = setup()
    graph = rectonnx.rewrite(model, "smoothgrad", samples=6, seed=3)
    logits, batch = run_explainer(graph, x, TARGETS)
    _, again = run_explainer(rectonnx.rewrite(model, "smoothgrad", samples=6, seed=3), x,
                             TARGETS)
    np.testing.assert_array_equal(batch, again)
    for i in range(len(x)):
        target = [TARGETS[i] if TARGETS[i] >= 0 else int(logits[i].argmax())]
        _, single = run_explainer(graph, x[i:i + 1], target)
        np.testing.assert_allclose(single[0], batch[i], rtol=1e-5, atol=1e-7)
    _, other_seed = explain(model, x, TARGETS, "smoothgrad", samples=6, seed=4)
    assert not np.allclose(other_seed, batch)


# -- Integrated Gradients ------------------------------------------------------------------------
@pytest.mark.parametrize("integration", ["riemann_right", "riemann_left", "riemann_middle",
                                         "riemann_trapezoid", "gausslegendre"])
def test_integration_parameters_are_captums(integration):
    for steps in (2, 5, 16):
        alphas, sizes = integration_parameters(integration, steps)
        step_sizes, alpha_fn = approximation_parameters(integration)
        np.testing.assert_allclose(alphas, alpha_fn(steps), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(sizes, step_sizes(steps), rtol=1e-12)


@pytest.mark.parametrize("integration,steps", [("riemann_right", 8), ("riemann_trapezoid", 6),
                                               ("gausslegendre", 5)])
@pytest.mark.parametrize("random_baseline", [False, True])
def test_integrated_gradients_against_captum(integration, steps, random_baseline):
    module, x, model = setup()
    baseline = (np.random.default_rng(1).uniform(-0.5, 0.5, (1, *x.shape[1:])).astype(np.float32)
                if random_baseline else 0.0)
    ig = IntegratedGradients(double(module))
    expected = ig.attribute(torch.from_numpy(x.astype(np.float64)),
                            baselines=torch.as_tensor(np.asarray(baseline, np.float64)).expand(
                                x.shape) if random_baseline else 0.0,
                            target=targets_of(module, x, TARGETS).tolist(), n_steps=steps,
                            method=integration).detach().numpy()
    check(model, x, "integrated_gradients", expected, "integrated_gradients vs Captum",
          f"{integration}/{'random' if random_baseline else 'zero'}", steps=steps,
          baseline=baseline, integration=integration)


def test_integrated_gradients_completeness():
    """With many steps, sum of IG = S(x) - S(b) (Sundararajan et al.'s completeness axiom)."""
    module, x, model = setup()
    logits, attribution = explain(model, x, TARGETS, "integrated_gradients", steps=300,
                                  integration="riemann_middle")
    with torch.no_grad():
        at_zero = double(module)(torch.zeros((1, *x.shape[1:]), dtype=torch.float64)).numpy()
    target = resolve_targets(logits, TARGETS)
    rows = np.arange(len(x))
    np.testing.assert_allclose(attribution.sum(axis=(1, 2, 3)),
                               logits[rows, target] - at_zero[0, target], rtol=2e-2, atol=1e-3)


# -- DeepLIFT -----------------------------------------------------------------------------------
@pytest.mark.parametrize("leaky", [False, True])
@pytest.mark.parametrize("random_baseline", [False, True])
def test_deeplift_against_captum(leaky, random_baseline):
    module, x, model = setup(leaky=leaky)
    baseline = (np.random.default_rng(2).uniform(-0.5, 0.5, (1, *x.shape[1:])).astype(np.float32)
                if random_baseline else 0.0)
    reference = torch.as_tensor(np.asarray(baseline, np.float64)).expand(x.shape) \
        if random_baseline else torch.zeros(x.shape, dtype=torch.float64)
    expected = DeepLift(double(module)).attribute(
        torch.from_numpy(x.astype(np.float64)), baselines=reference,
        target=targets_of(module, x, TARGETS).tolist()).detach().numpy()
    attribution = check(model, x, "deeplift", expected, "deeplift vs Captum DeepLift",
                        f"{'leaky' if leaky else 'relu'}/"
                        f"{'random' if random_baseline else 'zero'}", baseline=baseline)
    _, grad_input = explain(model, x, TARGETS, "grad_input")
    assert not np.allclose(attribution, grad_input, rtol=1e-2)  # the Rescale rule matters


def test_deeplift_summation_to_delta():
    """DeepLIFT's attributions sum to S(x) - S(b) (Shrikumar et al.'s property; exact for nets
    of linear ops and activations, so the max-pool is an average pool here)."""
    module, x, model = setup(leaky=True, max_pool=False)
    baseline = np.random.default_rng(3).uniform(-0.5, 0.5, (1, *x.shape[1:])).astype(np.float32)
    logits, attribution = explain(model, x, TARGETS, "deeplift", baseline=baseline)
    with torch.no_grad():
        at_b = double(module)(torch.from_numpy(baseline.astype(np.float64))).numpy()
    target = resolve_targets(logits, TARGETS)
    np.testing.assert_allclose(attribution.sum(axis=(1, 2, 3)),
                               logits[np.arange(len(x)), target] - at_b[0, target],
                               rtol=1e-4, atol=1e-5)


# -- epsilon-LRP ----------------------------------------------------------------------------------
@pytest.mark.parametrize("factory", [SmallCNN, ResidualBN])
def test_epsilon_lrp_is_grad_times_input_for_relu_nets(factory):
    """Ancona et al. 2018: for ReLU nets and epsilon -> 0, epsilon-LRP = grad * input."""
    module, x, model = setup(factory, shape=(3, 3, 8, 8))
    expected = InputXGradient(double(module)).attribute(
        torch.from_numpy(x.astype(np.float64)),
        target=targets_of(module, x, TARGETS).tolist()).detach().numpy()
    check(model, x, "epsilon_lrp", expected, "epsilon_lrp (eps->0) vs Captum InputXGradient",
          factory.__name__, epsilon=1e-9)


def test_epsilon_lrp_against_captum_lrp():
    """A finite epsilon: Captum's LRP with EpsilonRule(epsilon) on every layer."""
    epsilon = 0.5
    module, x, model = setup()
    module64 = double(module)
    for sub in module64.modules():
        if isinstance(sub, (nn.Conv2d, nn.Linear, nn.MaxPool2d, nn.AvgPool2d)):
            sub.rule = EpsilonRule(epsilon)
    expected = LRP(module64).attribute(torch.from_numpy(x.astype(np.float64)),
                                       target=targets_of(module, x, TARGETS).tolist())
    attribution = check(model, x, "epsilon_lrp", expected.detach().numpy(),
                        "epsilon_lrp vs Captum LRP", f"epsilon{epsilon}", epsilon=epsilon)
    _, grad_input = explain(model, x, TARGETS, "grad_input")
    assert not np.allclose(attribution, grad_input, rtol=1e-2)  # epsilon matters here


# -- final thresholding, layer outputs -------------------------------------------------------------
@pytest.mark.parametrize("method,options", [("saliency", {}), ("grad_input", {}),
                                            ("integrated_gradients", {"steps": 4}),
                                            ("rectgrad", {"q": 90.0})])
@pytest.mark.parametrize("percentile", [95.0, 50.0])
def test_final_thresholding(method, options, percentile):
    """Keep values strictly above the per-sample 'nearest' percentile (threshold.py's rank)."""
    _, x, model = setup()
    _, plain = explain(model, x, TARGETS, method, **options)
    _, kept = explain(model, x, TARGETS, method, final_percentile=percentile, **options)
    for i in range(len(x)):
        flat = np.sort(plain[i].ravel())[::-1]
        tau = flat[percentile_rank(flat.size, percentile) - 1]
        np.testing.assert_array_equal(kept[i], np.where(plain[i] > tau, plain[i], 0))
    kept_count = (kept != 0).reshape(len(x), -1).sum(axis=1)
    assert (kept_count <= percentile_rank(plain[0].size, percentile) - 1).all()


def test_layer_outputs_are_the_hidden_gradients():
    """``layer_outputs=True`` adds the gradient reaching each activation's output, in forward
    order; for saliency that is torch's gradient of the target logit at the ReLU outputs."""
    module, x, model = setup()
    graph = rectonnx.rewrite(model, "saliency", layer_outputs=True)
    names = [o.name for o in graph.graph.output]
    assert names[:2] == ["logits", "attribution"] and len(names) == 5
    assert all(n.startswith("attribution/") for n in names[2:])
    from helpers import session
    outputs = session(graph).run(None, {graph.graph.input[0].name: x,
                                        "target": np.asarray(TARGETS, np.int64)})
    module64 = double(module)
    hidden = []
    def keep(module, inputs, output):
        output.retain_grad()
        hidden.append(output)

    for relu in (module64.relu1, module64.relu2, module64.relu3):
        relu.register_forward_hook(keep)
    logits = module64(torch.from_numpy(x.astype(np.float64)))
    target = resolve_targets(logits.detach().numpy(), TARGETS)
    logits[torch.arange(len(x)), torch.as_tensor(target)].sum().backward()
    for got, tensor, name in zip(outputs[2:], hidden, names[2:]):
        assert_close(got, tensor.grad.numpy(), "layer outputs vs torch autograd", where=name)
    sg = rectonnx.rewrite(model, "smoothgrad", samples=3, layer_outputs=True)
    shapes = [o.shape for o in session(sg).run(None, {sg.graph.input[0].name: x,
                                                      "target": np.asarray(TARGETS, np.int64)})]
    assert shapes[2:] == [t.shape for t in hidden]


# -- the contract and the errors ----------------------------------------------------------------
@pytest.mark.parametrize("method", ["smoothgrad", "integrated_gradients", "deeplift",
                                    "epsilon_lrp"])
def test_baselines_keep_the_contract(method):
    """Logits are the clean input's; a negative target is its predicted class; one output of the
    input's shape per sample, whatever the batch."""
    module, x, model = setup()
    options = {"samples": 4} if method == "smoothgrad" else \
        {"steps": 4} if method == "integrated_gradients" else {}
    graph = rectonnx.rewrite(model, method, **options)
    assert [o.name for o in graph.graph.output] == ["logits", "attribution"]
    logits, attribution = run_explainer(graph, x, [-1, -1, -1])
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
    _, explicit = run_explainer(graph, x, logits.argmax(axis=1))
    np.testing.assert_array_equal(attribution, explicit)
    _, one = run_explainer(graph, x[1:2], [int(logits[1].argmax())])
    np.testing.assert_allclose(one[0], attribution[1], rtol=1e-5, atol=1e-7)


def test_baseline_errors_are_clear():
    _, x, model = setup()
    with pytest.raises(ValueError, match="smoothgrad has no option steps"):
        rectonnx.rewrite(model, "smoothgrad", steps=3)
    with pytest.raises(ValueError, match="saliency has no option samples"):
        rectonnx.rewrite(model, "saliency", samples=3)
    with pytest.raises(ValueError, match="option integration"):
        rectonnx.rewrite(model, "integrated_gradients", integration="simpson")
    with pytest.raises(ValueError, match="does not broadcast"):
        rectonnx.rewrite(model, "deeplift", baseline=np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="option epsilon"):
        rectonnx.rewrite(model, "epsilon_lrp", epsilon=0.0)
    with pytest.raises(ValueError, match="final_percentile"):
        rectonnx.rewrite(model, "saliency", final_percentile=101)
    norm = normalize(model)
    norm.shapes[norm.input_name] = (1, 3, 8, 8)  # a batch the normaliser could not free
    with pytest.raises(rectonnx.UnsupportedModelError, match="symbolic batch dimension"):
        rectonnx.get_method("deeplift").copies.feed(norm, GraphBuilder(set()), "logits")
