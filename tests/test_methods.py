"""The gradient methods against Captum, and every method's rule against a literal numpy oracle.

* Captum (float64) on torch models exported to ONNX (TorchScript exporter, dynamic batch):
  ``Saliency(abs=False)`` = saliency, ``InputXGradient`` = grad_input, ``GuidedBackprop`` =
  guided_backprop, ``Deconvolution`` = deconvnet (docs/maths.md, 'The methods', defines them
  exactly so).
  The nets have BatchNorm (folded into Conv by the exporter, and one standalone after a ReLU),
  residual adds, max- and average-pooling and a dense head; every ReLU is its own ``nn.ReLU``
  module so Captum's hooks see each one. Max relative error <= 1e-4.
* A literal numpy re-statement of the table in docs/maths.md, 'The methods', for a two-layer
  perceptron with ReLU, LeakyReLU and ReLU6 (Clip), so the methods' behaviour at non-ReLU
  activations is pinned too.

Kinks: the random inputs and weights put no pre-activation within 1e-6 of 0 (asserted for the
perceptron). In ``PoolThenReLU`` the max-pools come before the ReLUs, so no max-pool window ties.
``ReLUThenPool`` keeps the usual order, where all-zero windows after a ReLU do tie: only
deconvnet passes a signal into such a window (relu(R) ignores the forward pass), and which zero
gets it is the runtime's tie-break; onnxruntime's CPU MaxPool and torch both pick the first
element of the window, so deconvnet is compared there too.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from captum.attr import Deconvolution, GuidedBackprop, InputXGradient, Saliency
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from helpers import (assert_close, distinct_values, explain, export, make_model,
                     resolve_targets)

pytestmark = pytest.mark.filterwarnings("ignore:Setting backward hooks:UserWarning")

CAPTUM = {
    "saliency": lambda m: Saliency(m),
    "grad_input": lambda m: InputXGradient(m),
    "guided_backprop": lambda m: GuidedBackprop(m),
    "deconvnet": lambda m: Deconvolution(m),
}


class Residual(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()

    def forward(self, x):
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + x)


class PoolThenReLU(nn.Module):
    """Stem conv + BN, a residual block, max-pool, a strided conv, average-pool, BN after a
    ReLU (not foldable), and a two-layer dense head."""

    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(6)
        self.pool1 = nn.MaxPool2d(2)
        self.relu1 = nn.ReLU()
        self.block = Residual(6)
        self.conv = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.pool2 = nn.MaxPool2d(3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.bn = nn.BatchNorm2d(8)
        self.avg = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(8, 12)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(12, classes)

    def forward(self, x):
        x = self.relu1(self.pool1(self.stem_bn(self.stem(x))))
        x = self.block(x)
        x = self.bn(self.relu2(self.pool2(self.conv(x))))
        x = torch.flatten(self.avg(x), 1)
        return self.fc2(self.relu3(self.fc1(x)))


class ReLUThenPool(nn.Module):
    """The usual order: conv, BN, ReLU, pool; a residual block; global average pool."""

    def __init__(self, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.block = Residual(6)
        self.pool2 = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        self.conv2 = nn.Conv2d(6, 8, 3)
        self.relu2 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.block(x))
        x = self.gap(self.relu2(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


def randomise_batch_norms(module: nn.Module) -> nn.Module:
    for sub in module.modules():
        if isinstance(sub, nn.BatchNorm2d):
            sub.running_mean.uniform_(-0.5, 0.5)
            sub.running_var.uniform_(0.5, 2.0)
            sub.weight.data.uniform_(0.5, 1.5)
            sub.bias.data.uniform_(-0.3, 0.3)
    return module.eval()


def captum_attribution(module, method, x, target):
    module64 = copy.deepcopy(module).double().eval()
    inputs = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    with torch.no_grad():
        logits = module64(inputs).numpy()
    target = resolve_targets(logits, target)
    kwargs = {"abs": False} if method == "saliency" else {}
    result = CAPTUM[method](module64).attribute(inputs, target=target.tolist(), **kwargs)
    return logits, result.detach().numpy()


NETS = {"pool_then_relu": (PoolThenReLU, (3, 16, 16)),
        "relu_then_pool": (ReLUThenPool, (3, 12, 12))}
CASES = [(net, method) for net in NETS for method in CAPTUM]


def check_against_captum(net, method, seed, batch=3):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    factory, shape = NETS[net]
    module = randomise_batch_norms(factory())
    x = distinct_values((batch, *shape), rng, -2.0, 2.0)
    target = [1, -1, 4][:batch]
    model = export(module, torch.from_numpy(x))
    logits, attribution = explain(model, x, target, method)
    expected_logits, expected = captum_attribution(module, method, x, target)
    where = f"{net}/{method}/seed{seed}"
    assert_close(logits, expected_logits, "forward logits vs torch", where=where)
    assert np.abs(attribution).max() > 0
    assert_close(attribution, expected, f"{method} vs Captum", where=where)


@pytest.mark.parametrize("net,method", CASES)
def test_against_captum(net, method):
    check_against_captum(net, method, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("net,method", CASES)
def test_against_captum_more_seeds(net, method, seed):
    check_against_captum(net, method, seed)


def test_methods_differ_on_the_same_net():
    """The four methods are four different maps (a method switch that silently fell back to
    the plain gradient would pass each Captum test only by accident)."""
    torch.manual_seed(0)
    module = randomise_batch_norms(PoolThenReLU())
    x = distinct_values((2, 3, 16, 16), np.random.default_rng(0), -2.0, 2.0)
    model = export(module, torch.from_numpy(x))
    maps = {m: explain(model, x, [1, 2], m)[1] for m in CAPTUM}
    for a in maps:
        for b in maps:
            if a < b:
                assert not np.allclose(maps[a], maps[b]), (a, b)


# -- literal oracle of every method on a perceptron with three kinds of activation ----------
ACTIVATIONS = {
    "relu": ("Relu", {}, lambda z: np.maximum(z, 0), lambda z: (z > 0) * 1.0),
    "leaky_relu": ("LeakyRelu", {"alpha": 0.2}, lambda z: np.where(z > 0, z, 0.2 * z),
                   lambda z: np.where(z > 0, 1.0, 0.2)),
    "relu6": ("Clip", {}, lambda z: np.clip(z, 0, 6), lambda z: ((z > 0) & (z < 6)) * 1.0),
}


def perceptron(activation, rng, d_in=12, hidden=16, classes=4):
    op, attrs, _, _ = ACTIVATIONS[activation]
    w1 = rng.standard_normal((d_in, hidden)) * 2.0
    b1 = rng.standard_normal(hidden)
    w2 = rng.standard_normal((hidden, classes))
    inputs = ["h"] + (["lo", "hi"] if op == "Clip" else [])
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
             helper.make_node(op, inputs, ["a"], **attrs),
             helper.make_node("MatMul", ["a", "w2"], ["scores"])]
    inits = [numpy_helper.from_array(v.astype(np.float32), n)
             for n, v in (("w1", w1), ("b1", b1), ("w2", w2))]
    inits += [numpy_helper.from_array(np.float32(v), n) for n, v in (("lo", 0.0), ("hi", 6.0))]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                             ["N", d_in])],
                       [helper.make_tensor_value_info("scores", TensorProto.FLOAT,
                                                      ["N", classes])],
                       [i for i in inits if i.name in {n for node in nodes for n in node.input}])
    params = [p.astype(np.float32).astype(np.float64) for p in (w1, b1, w2)]
    return model, params


def literal_method(method, activation, params, x, target, tau=None):
    """docs/maths.md, 'The methods', one line per method, for ``logits = f(x w1 + b1) w2``."""
    w1, b1, w2 = params
    _, _, f, f_prime = ACTIVATIONS[activation]
    x = np.asarray(x, np.float64)
    z = x @ w1 + b1
    y = f(z)
    logits = y @ w2
    target = resolve_targets(logits, target)
    upstream = w2[:, target].T                     # R = dS/dy
    exact = f_prime(z) * upstream
    if method in ("saliency", "grad_input"):
        r_z = exact
    elif method == "deconvnet":
        r_z = np.maximum(upstream, 0)
    elif method == "guided_backprop":
        r_z = (z > 0) * (upstream > 0) * upstream if activation == "relu" else \
            np.maximum(exact, 0)
    elif method == "rectgrad":                     # constant tau; the paper's rule at ReLU
        passed = upstream if activation == "relu" else exact
        r_z = (y * upstream > tau) * passed
    r_x = r_z @ w1.T
    if method == "grad_input":
        return x * r_x
    if method == "rectgrad":
        return np.maximum(x * r_x, 0)
    return r_x


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_rectgrad_negative_tau_keeps_the_derivative(activation, rng):
    """With tau < 0 the gate also passes units whose score ``y R`` is 0 or slightly negative,
    e.g. ReLU6 units at 0 (z < 0), where only ``f'(z) = 0`` (the Clip mask that RectGrad
    folds into its own by And) zeroes the gradient."""
    model, params = perceptron(activation, rng)
    x = distinct_values((5, 12), rng, -3.0, 3.0)
    target = [0, 3, -1, 2, 1]
    tau = -0.05
    _, attribution = explain(model, x, target, "rectgrad", tau=tau)
    expected = literal_method("rectgrad", activation, params, x, target, tau=tau)
    z = x.astype(np.float64) @ params[0] + params[1]
    assert (z < 0).any() and np.abs(expected).max() > 0
    assert_close(attribution, expected, "rectgrad tau < 0 vs literal numpy", where=activation)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("method", ["saliency", "grad_input", "deconvnet", "guided_backprop",
                                    "rectgrad"])
def test_methods_literal_on_a_perceptron(method, activation, rng):
    model, params = perceptron(activation, rng)
    x = distinct_values((5, 12), rng, -3.0, 3.0)
    target = [0, 3, -1, 2, 1]
    z = x.astype(np.float64) @ params[0] + params[1]
    assert np.abs(z).min() > 1e-6 and np.abs(z - 6).min() > 1e-6  # away from kinks
    options = {"tau": 0.05} if method == "rectgrad" else {}
    _, attribution = explain(model, x, target, method, **options)
    expected = literal_method(method, activation, params, x, target, tau=0.05)
    assert np.abs(expected).max() > 0
    assert_close(attribution, expected, "methods vs literal numpy", where=f"{method}/{activation}")


def test_relu6_is_saturated_in_the_data():
    """The ReLU6 perceptron really has units above 6 and below 0 (else the Clip case is moot)."""
    rng = np.random.default_rng(0)
    _, params = perceptron("relu6", rng)
    x = distinct_values((5, 12), rng, -3.0, 3.0)
    z = x.astype(np.float64) @ params[0] + params[1]
    assert (z > 6).any() and (z < 0).any() and ((z > 0) & (z < 6)).any()
