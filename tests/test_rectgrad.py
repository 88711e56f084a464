"""RectGrad (docs/maths.md, 'The RectGrad gate', and the paper's App. C, D, E) on explainer graphs.

* the percentile rank ``k = round_half_even((M - 1)(1 - q/100)) + 1`` and hand-computed cases
  where half-even and half-up rounding, or per-sample and per-batch thresholds, disagree;
* a slow literal re-implementation in torch (float64): one autograd Function per ReLU that sorts
  the scores ``y R`` of each sample in descending order and takes index
  ``round_half_even((M - 1)(1 - q/100))`` as ``tau``, strict ``>``; the padding trick as the
  authors' 1-pixel border mask; PRR as the authors' ``avg_pool`` / ``avg_pool_grad`` listing;
* claims 1 and 2 of the paper (Sec. 4.2), checked on the ONNX graphs;
* the padding trick and PRR on cases small enough to compute by hand.

Kinks: thresholding is discontinuous, so the float32 graph and the float64 oracle could only
disagree when two scores of one layer are within float32 rounding of each other or of ``tau``;
inputs are evenly spaced random ramps and the weights random, which keeps distinct scores far
apart relative to float32 precision (the tests would show a flip as an O(1) error).
"""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import (assert_close, distinct_values, explain, export, parse, resolve_targets,
                     run_explainer)
from rectonnx.gates import Method, positive_times_input
from rectonnx.threshold import percentile_rank

import rectonnx


# -- the percentile rank -------------------------------------------------------------------
def test_percentile_rank_literal_formula():
    for m in [1, 2, 5, 6, 16, 17, 18, 100, 384, 510, 512, 4096]:
        for q in [0, 10, 20, 25, 50, 75, 80, 90, 95, 97.5, 98, 99, 100]:
            expected = round((m - 1) * (1 - q / 100)) + 1  # Python's round: half to even
            assert percentile_rank(m, q) == expected, (m, q)
            assert 1 <= percentile_rank(m, q) <= m


def test_percentile_rank_rounds_half_to_even():
    assert percentile_rank(6, 50) == 3     # 5 * 0.5 = 2.5 -> 2 (half-up would give 3)
    assert percentile_rank(18, 50) == 9    # 8.5 -> 8
    assert percentile_rank(4, 50) == 3     # 1.5 -> 2
    assert percentile_rank(512, 98) == 11  # 10.22 -> 10
    assert percentile_rank(10, 0) == 10    # the smallest score
    assert percentile_rank(10, 100) == 1   # the largest score


@pytest.mark.parametrize("q", [-1.0, 100.5])
def test_percentile_out_of_range_is_an_error(q):
    with pytest.raises(ValueError):
        percentile_rank(10, q)
    with pytest.raises(ValueError):
        rectonnx.get_method("rectgrad", q=q)


# -- hand-computed RectGrad ----------------------------------------------------------------
#   x = [3, -1, 2, 5, 1, 4]  ->  y = relu(x) = [3, 0, 2, 5, 1, 4]
#   R = dS/dy = head[:, 0] = [1, -2, -1, 0.5, 2, 1]
#   scores s = y R = [3, 0, -2, 2.5, 2, 4]; descending: 4, 3, 2.5, 2, 0, -2
HAND_X = np.array([3, -1, 2, 5, 1, 4], np.float32)
HAND_HEAD = np.array([[1, 0], [-2, 1], [-1, 1], [0.5, 1], [2, 1], [1, 1]], np.float32)


def hand_model():
    return parse('<ir_version: 8, opset_import: ["" : 17]>\n'
                 "hand (float[N,6] x) => (float[N,2] logits) {\n"
                 "  y = Relu(x)\n  logits = MatMul(y, head)\n}", {"head": HAND_HEAD})


@pytest.mark.parametrize("options,expected", [
    # q = 50: k = round(2.5) + 1 = 3 -> tau = 2.5, strict: only the scores 3 and 4 pass
    ({"q": 50.0}, [3, 0, 0, 0, 0, 4]),
    # q = 20: k = round(4) + 1 = 5 -> tau = 0: the positive scores pass
    ({"q": 20.0}, [3, 0, 0, 2.5, 2, 4]),
    ({"tau": 0.0}, [3, 0, 0, 2.5, 2, 4]),
    # q = 0: tau = min = -2; the dead unit (y = 0, s = 0 > -2) passes R = -2, x R = 2 > 0
    ({"q": 0.0}, [3, 2, 0, 2.5, 2, 4]),
    # q = 100: tau = max = 4, nothing is strictly above it
    ({"q": 100.0}, [0, 0, 0, 0, 0, 0]),
    ({"tau": 2.2}, [3, 0, 0, 2.5, 0, 4]),
])
def test_rectgrad_hand_computed(options, expected):
    _, attribution = explain(hand_model(), HAND_X[None], [0], "rectgrad", **options)
    np.testing.assert_allclose(attribution[0], expected, rtol=1e-6, atol=0)


def test_rectgrad_threshold_is_per_sample():
    """Sample 2 is sample 1 times 10: per sample, the same units pass (tau scales with it);
    a threshold over the whole batch would keep nothing of sample 1 at q = 50."""
    x = np.stack([HAND_X, 10 * HAND_X, HAND_X])
    _, attribution = explain(hand_model(), x, [0, 0, 1], "rectgrad", q=50.0)
    np.testing.assert_allclose(attribution[0], [3, 0, 0, 0, 0, 4], rtol=1e-6)
    np.testing.assert_allclose(attribution[1], [30, 0, 0, 0, 0, 40], rtol=1e-6)
    # target 1: R = [0, 1, 1, 1, 1, 1], s = [0, 0, 2, 5, 1, 4] -> tau = 2 (3rd largest)
    np.testing.assert_allclose(attribution[2], [0, 0, 0, 5, 0, 4], rtol=1e-6)


def test_rectgrad_dynamic_layer_size_computes_k_in_the_graph():
    """With symbolic spatial sizes, M and k are computed in the graph (Round is half-even):
    at M = 2*3*3 = 18, q = 50 gives index round(8.5) = 8, the 9th largest."""
    model = parse('<ir_version: 8, opset_import: ["" : 17]>\n'
                  "dyn (float[N,2,H,W] x) => (float[N,3] logits) {\n"
                  "  r = Relu(x)\n  sq = Mul(r, r)\n  g = GlobalAveragePool(sq)\n"
                  "  f = Flatten(g)\n  logits = MatMul(f, w)\n}",
                  {"w": np.array([[1.0, -1.0, 0.5], [2.0, 0.5, -1.0]], np.float32)})
    explainer = rectonnx.rewrite(model, "rectgrad", q=50.0)
    assert any(n.op_type == "Round" for n in explainer.graph.node)
    rng = np.random.default_rng(0)
    w = np.array([[1.0, -1.0, 0.5], [2.0, 0.5, -1.0]])
    for size, q in [(3, 50.0), (5, 50.0), (4, 90.0), (3, 0.0)]:
        x = distinct_values((2, 2, size, size), rng, -2, 2)
        _, attribution = run_explainer(rectonnx.rewrite(model, "rectgrad", q=q), x, [0, 2])
        x64 = x.astype(np.float64)
        r = np.maximum(x64, 0)
        upstream = 2 * r * w[:, [0, 2]].T[:, :, None, None] / size ** 2
        scores = (r * upstream).reshape(2, -1)
        index = round((scores.shape[1] - 1) * (1 - q / 100))
        tau = -np.sort(-scores, axis=1)[:, index]
        keep = scores > tau[:, None]
        expected = np.maximum(x64 * (keep.reshape(x.shape) * upstream), 0)
        assert np.abs(expected).max() > 0
        assert_close(attribution, expected, "rectgrad vs literal (dynamic M)",
                     where=f"{size}x{size}/q{q}")


# -- the literal torch re-implementation -----------------------------------------------------
def literal_percentile(scores: torch.Tensor, q: float) -> torch.Tensor:
    """The q-th percentile of each sample, TensorFlow 'nearest': sort descending, take index
    round_half_even((M - 1)(1 - q/100))."""
    flat = scores.reshape(len(scores), -1)
    index = round((flat.shape[1] - 1) * (1 - q / 100))
    ordered = torch.sort(flat, dim=1, descending=True).values
    return ordered[:, index].reshape(-1, *[1] * (scores.dim() - 1))


def rectgrad_rule(q=None, tau=None):
    """The paper's eq. 4: R_z = I(y R > tau) R, tau constant or the per-sample percentile."""
    def rule(y, upstream):
        scores = y * upstream
        threshold = literal_percentile(scores, q) if tau is None else tau
        return (scores > threshold) * upstream
    return rule


def epsilon_rule(eps=1e-6):
    """Claim 1's rule: R_z = I((a + eps) R > 0) R."""
    return lambda y, upstream: ((y + eps) * upstream > 0) * upstream


class RuledReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, rule):
        y = z.clamp_min(0)
        ctx.save_for_backward(y)
        ctx.rule = rule
        return y

    @staticmethod
    def backward(ctx, upstream):
        (y,) = ctx.saved_tensors
        return ctx.rule(y, upstream), None


class BorderMask(torch.autograd.Function):
    """The authors' padding trick (App. D.2) for a 3x3 SAME conv: zero the 1-pixel border of the
    gradient of the conv output."""

    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        mask = torch.zeros_like(grad)
        mask[..., 1:-1, 1:-1] = 1
        return grad * mask


class PRRMaxPool(torch.autograd.Function):
    """The authors' PRR (App. D.3): z = avg_pool(x) + 1e-10, c = avg_pool_grad(R / z), x c."""

    @staticmethod
    def forward(ctx, x, kernel):
        ctx.save_for_backward(x)
        ctx.kernel = kernel
        return F.max_pool2d(x, kernel)

    @staticmethod
    def backward(ctx, upstream):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            probe = x.detach().requires_grad_()
            z = F.avg_pool2d(probe, ctx.kernel)
            (c,) = torch.autograd.grad(z, probe, upstream / (z.detach() + 1e-10))
        return x * c, None


class PaperCNN(nn.Module):
    """The paper's CIFAR CNN, scaled down: conv3x3-conv3x3-maxpool2-conv3x3-maxpool2-dense-dense."""

    def __init__(self, classes=5):
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(3, 6, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(6, 6, 3, padding=1), nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv3, self.relu3 = nn.Conv2d(6, 8, 3, padding=1), nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc1, self.relu4 = nn.Linear(8 * 2 * 2, 64), nn.ReLU()
        self.fc2 = nn.Linear(64, classes)

    def forward(self, x):
        x = self.pool1(self.relu2(self.conv2(self.relu1(self.conv1(x)))))
        x = self.pool2(self.relu3(self.conv3(x)))
        return self.fc2(self.relu4(self.fc1(torch.flatten(x, 1))))


def literal_attribution(net: PaperCNN, x, target, rule, *, padding_trick=False, prr=False,
                        finish="rectgrad"):
    """The net re-run functionally in float64 with the method's rules; returns the attribution
    (``relu(x R_x)`` for rectgrad, ``R_x`` for the gradient-only finish)."""
    p = {name: t.detach().double() for name, t in net.named_parameters()}
    inputs = torch.tensor(np.asarray(x, np.float64), requires_grad=True)

    def conv(name, h):
        out = F.conv2d(h, p[f"{name}.weight"], p[f"{name}.bias"], padding=1)
        return BorderMask.apply(out) if padding_trick else out

    def relu(h):
        return RuledReLU.apply(h, rule)

    def pool(h):
        return PRRMaxPool.apply(h, 2) if prr else F.max_pool2d(h, 2)

    h = pool(relu(conv("conv2", relu(conv("conv1", inputs)))))
    h = pool(relu(conv("conv3", h)))
    h = relu(F.linear(torch.flatten(h, 1), p["fc1.weight"], p["fc1.bias"]))
    logits = F.linear(h, p["fc2.weight"], p["fc2.bias"])
    target = resolve_targets(logits.detach().numpy(), target)
    logits[torch.arange(len(target)), torch.as_tensor(target)].sum().backward()
    grad = inputs.grad.numpy()
    x64 = inputs.detach().numpy()
    return np.maximum(x64 * grad, 0) if finish == "rectgrad" else grad


@pytest.fixture(scope="module")
def paper_cnn():
    torch.manual_seed(0)
    net = PaperCNN().eval()
    x = distinct_values((4, 3, 8, 8), np.random.default_rng(0), -1.0, 1.0)
    return net, x, export(net, torch.from_numpy(x))


TARGETS = [0, 3, -1, 2]


def check_rectgrad(paper_cnn, where, rule, **options):
    options = {"padding_trick": False, **options}  # RectGrad's default is the paper's trick
    net, x, model = paper_cnn
    _, attribution = explain(model, x, TARGETS, "rectgrad", **options)
    expected = literal_attribution(net, x, TARGETS, rule, padding_trick=options.get(
        "padding_trick", False), prr=options.get("prr", False))
    assert_close(attribution, expected, "rectgrad vs literal torch", where=where)
    return attribution, expected


@pytest.mark.parametrize("q", [0.0, 50.0, 90.0, 98.0, 100.0])
def test_rectgrad_percentile_against_literal(paper_cnn, q):
    attribution, expected = check_rectgrad(paper_cnn, f"q{q}", rectgrad_rule(q=q), q=q)
    if q == 100.0:  # nothing is strictly above the largest score
        assert not expected.any() and not attribution.any()
    else:
        assert (expected > 0).any()


@pytest.mark.parametrize("q", [50.0, 90.0, 98.0])
@pytest.mark.parametrize("padding_trick,prr", [(True, False), (False, True), (True, True)])
def test_rectgrad_percentile_with_options_against_literal(paper_cnn, q, padding_trick, prr):
    _, expected = check_rectgrad(paper_cnn, f"q{q}/pt{padding_trick}/prr{prr}",
                                 rectgrad_rule(q=q), q=q, padding_trick=padding_trick, prr=prr)
    assert (expected > 0).any()


@pytest.mark.parametrize("q", [76.0, 90.0, 98.0, 100.0])
@pytest.mark.parametrize("padding_trick", [False, True])
@pytest.mark.parametrize("runtime", ["any", "onnxruntime-cpu"])
def test_rectgrad_threshold_from_pooled_scores(paper_cnn, monkeypatch, q, padding_trick,
                                               runtime):
    """ReLUs that feed only a 2x2 max pool take their percentile from the pooled scores
    ``Y * dY`` (4x fewer; gates._pooled_threshold) and gate ``dY`` before placing it at the
    arg-maxes (scatter for runtime="any", MaxUnpool for onnxruntime-cpu): the same attribution,
    to the bit, as the full-size percentile and gate, and the literal torch one. At q = 76
    (k = 93 of 384, pooled 96) the k-th pooled score is negative and the threshold 0 on every
    sample: the other branch."""
    net, x, model = paper_cnn
    explainer = rectonnx.rewrite(model, "rectgrad", q=q, padding_trick=padding_trick,
                                 runtime=runtime)
    names = [n.name for n in explainer.graph.node]
    assert sum("pooled_importance" in n for n in names) == 2
    assert sum("/importance" in n for n in names) == 2  # the 2 pooled ReLUs gate at pool size
    _, fast = run_explainer(explainer, x, TARGETS)
    monkeypatch.setattr(importlib.import_module("rectonnx.gates"), "_pooled_threshold",
                        lambda *args: None)
    full_size = rectonnx.rewrite(model, "rectgrad", q=q, padding_trick=padding_trick,
                                 runtime=runtime)
    names = [n.name for n in full_size.graph.node]
    assert not any("pooled_importance" in n for n in names)
    assert sum("/importance" in n for n in names) == 4
    _, slow = run_explainer(full_size, x, TARGETS)
    np.testing.assert_array_equal(fast, slow)
    expected = literal_attribution(net, x, TARGETS, rectgrad_rule(q=q),
                                   padding_trick=padding_trick)
    assert_close(fast, expected, "rectgrad (pooled percentile) vs literal torch", where=f"q{q}")


@pytest.mark.parametrize("method", ["saliency", "guided_backprop", "rectgrad"])
@pytest.mark.parametrize("runtime", ["any", "onnxruntime-cpu"])
def test_relu_mask_on_the_pooled_grid(paper_cnn, monkeypatch, method, runtime):
    """A ReLU feeding only a 2x2 max pool masks the pooled gradient by ``Y > 0`` before placing
    it (rules/activation.py): bit-equal to masking the placed gradient by ``y > 0``, and equal to
    torch autograd for saliency."""
    net, x, model = paper_cnn
    explainer = rectonnx.rewrite(model, method, runtime=runtime)
    pools = {n.output[0] for n in explainer.graph.node if n.op_type == "MaxPool"}
    masks = [n for n in explainer.graph.node if n.op_type == "Greater"]
    if method != "rectgrad":  # RectGrad's own gate replaces the ReLU mask (pruned)
        assert sum(n.input[0] in pools for n in masks) == 2
    _, fast = run_explainer(explainer, x, TARGETS)
    pool_rules = importlib.import_module("rectonnx.rules.pool")
    monkeypatch.setattr(pool_rules, "Unpooled", lambda *args: type("NotNoted", (), {"x": None}))
    full_size = rectonnx.rewrite(model, method, runtime=runtime)
    masks = [n for n in full_size.graph.node if n.op_type == "Greater"]
    assert not any(n.input[0] in pools for n in masks)
    _, slow = run_explainer(full_size, x, TARGETS)
    np.testing.assert_array_equal(fast, slow)
    if method == "saliency":
        inputs = torch.from_numpy(x).requires_grad_(True)
        logits = net(inputs)
        chosen = torch.as_tensor(resolve_targets(logits.detach().numpy(), TARGETS))
        logits.gather(1, chosen[:, None]).sum().backward()
        assert_close(fast, inputs.grad.numpy(), "pooled ReLU mask saliency vs torch autograd",
                     where=runtime)


@pytest.mark.parametrize("tau", [0.0, 1e-3, -1e-3])
def test_rectgrad_constant_tau_against_literal(paper_cnn, tau):
    check_rectgrad(paper_cnn, f"tau{tau}", rectgrad_rule(tau=tau), tau=tau)


def test_rectgrad_options_change_the_map(paper_cnn):
    """The padding trick and PRR really act on this net (else their tests are vacuous)."""
    _, x, model = paper_cnn
    base = explain(model, x, TARGETS, "rectgrad", q=90.0, padding_trick=False)[1]
    for options in ({"padding_trick": True}, {"padding_trick": False, "prr": True}):
        assert not np.allclose(base, explain(model, x, TARGETS, "rectgrad", q=90.0,
                                             **options)[1]), options
    default = explain(model, x, TARGETS, "rectgrad", q=90.0)[1]  # the paper's padding trick
    assert np.array_equal(default, explain(model, x, TARGETS, "rectgrad", q=90.0,
                                           padding_trick="exact")[1])


def test_rectgrad_batch_equals_samples_one_by_one(paper_cnn):
    _, x, model = paper_cnn
    explainer = rectonnx.rewrite(model, "rectgrad", q=90.0, padding_trick=True, prr=True)
    logits, batch = run_explainer(explainer, x, TARGETS)
    for i in range(len(x)):
        target = [TARGETS[i] if TARGETS[i] >= 0 else int(logits[i].argmax())]
        _, single = run_explainer(explainer, x[i:i + 1], target)
        np.testing.assert_allclose(single[0], batch[i], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("q", [0.0, 50.0, 90.0, 98.0])
def test_rectgrad_more_seeds(seed, q):
    torch.manual_seed(seed)
    net = PaperCNN().eval()
    x = distinct_values((4, 3, 8, 8), np.random.default_rng(seed), -1.0, 1.0)
    check_rectgrad((net, x, export(net, torch.from_numpy(x))), f"seed{seed}/q{q}",
                   rectgrad_rule(q=q), q=q, padding_trick=True, prr=True)


# -- claims 1 and 2 (paper Sec. 4.2, App. E) on the ONNX graphs ----------------------------
def with_method(monkeypatch, method: Method):
    """Make ``rectonnx.rewrite`` build ``method`` (a method is data: a gate and a finish) with
    the spec's rule overrides (padding trick, PRR)."""
    module = importlib.import_module("rectonnx.rewrite")
    built = module.build
    monkeypatch.setattr(module, "build", lambda spec: dataclasses.replace(
        built(spec), name=method.name, activation=method.activation, finish=method.finish))


def epsilon_gate(eps):
    def gate(ctx, act):
        g = ctx.g
        shifted = g.Add(act.y, g.scalar(eps), hint="a_plus_eps")
        keep = g.Greater(g.Mul(shifted, act.upstream), g.scalar(0.0))
        return g.Where(keep, act.upstream, g.scalar(0.0), hint="claim1")
    return gate


@pytest.mark.parametrize("options", [{"padding_trick": False},
                                     {"padding_trick": True, "prr": True}])
def test_claim1_deconvnet_times_input_is_rectgrad_with_epsilon_rule(paper_cnn, monkeypatch,
                                                                    options):
    """relu(deconvnet * x) == RectGrad with R_z = I((a + eps) R > 0) R, both as ONNX graphs, and
    against the literal torch re-implementation of that rule."""
    net, x, model = paper_cnn
    _, deconv = explain(model, x, TARGETS, "deconvnet", **options)
    thresholded = np.maximum(deconv * x, 0)
    literal = literal_attribution(net, x, TARGETS, epsilon_rule(1e-6), **options)
    assert (literal > 0).any()
    assert_close(thresholded, literal, "claim 1 (deconvnet) vs literal torch")
    with_method(monkeypatch, Method("rectgrad_epsilon", epsilon_gate(1e-6), positive_times_input,
                                    "claim 1"))
    _, rect = explain(model, x, TARGETS, "rectgrad", **options)
    assert_close(rect, thresholded, "claim 1 graph vs graph", tol=1e-6)


@pytest.mark.parametrize("options", [{"padding_trick": False},
                                     {"padding_trick": True, "prr": True}])
def test_claim2_guided_backprop_times_input_is_rectgrad_with_tau_0(paper_cnn, options):
    net, x, model = paper_cnn
    _, guided = explain(model, x, TARGETS, "guided_backprop", **options)
    thresholded = np.maximum(guided * x, 0)
    _, rect = explain(model, x, TARGETS, "rectgrad", tau=0.0, **options)
    assert (rect > 0).any()
    assert_close(rect, thresholded, "claim 2 graph vs graph", tol=1e-6)
    literal = literal_attribution(net, x, TARGETS, rectgrad_rule(tau=0.0), **options)
    assert_close(thresholded, literal, "claim 2 (guided) vs literal torch")


# -- padding trick and PRR by hand -----------------------------------------------------------
def conv_sum_model(kernel: int, pads: int, strides: int = 1, size: int = 4, head=None):
    """x [N,1,size,size] -> Conv(all-ones kernel) -> Flatten -> MatMul(head) -> logits [N,1]."""
    weight = np.ones((1, 1, kernel, kernel), np.float32)
    out = (size + 2 * pads - kernel) // strides + 1
    head = np.ones((out * out, 1), np.float32) if head is None else head
    return parse('<ir_version: 8, opset_import: ["" : 17]>\n'
                 f"pt (float[N,1,{size},{size}] x) => (float[N,1] logits) {{\n"
                 f"  y = Conv <pads = [{pads}, {pads}, {pads}, {pads}], strides = [{strides},"
                 f" {strides}]> (x, w)\n  f = Flatten(y)\n  logits = MatMul(f, head)\n}}",
                 {"w": weight, "head": head})


def test_padding_trick_by_hand_3x3_same():
    """logit = sum of a 3x3 all-ones SAME conv on 4x4. With the trick only the 4 interior
    outputs pass gradient; input pixel (i, j) sees as many of them as its 3x3 neighbourhood
    holds: [1, 2, 2, 1] per axis. Without the trick every output counts: [2, 3, 3, 2]."""
    x = np.ones((1, 1, 4, 4), np.float32)
    _, masked = explain(conv_sum_model(3, 1), x, [0], "saliency", padding_trick=True)
    _, plain = explain(conv_sum_model(3, 1), x, [0], "saliency")
    np.testing.assert_array_equal(masked[0, 0], [[1, 2, 2, 1], [2, 4, 4, 2], [2, 4, 4, 2],
                                                 [1, 2, 2, 1]])
    np.testing.assert_array_equal(plain[0, 0], [[4, 6, 6, 4], [6, 9, 9, 6], [6, 9, 9, 6],
                                                [4, 6, 6, 4]])
    # RectGrad with positive inputs and no ReLU: relu(x * R_x) = x * masked gradient
    x2 = np.full((1, 1, 4, 4), 0.5, np.float32)
    _, rect = explain(conv_sum_model(3, 1), x2, [0], "rectgrad", q=98.0, padding_trick=True)
    np.testing.assert_array_equal(rect, 0.5 * masked)


def test_padding_trick_by_hand_5x5_and_strided():
    x = np.ones((1, 1, 6, 6), np.float32)
    # 5x5 kernel, pad 2 on 6x6: only outputs 2..3 per axis read no padding (a 2-pixel border)
    _, masked = explain(conv_sum_model(5, 2, size=6), x, [0], "saliency", padding_trick=True)
    per_axis = np.array([1, 2, 2, 2, 2, 1])  # outputs {2, 3} within distance 2 of i
    np.testing.assert_array_equal(masked[0, 0], np.outer(per_axis, per_axis))
    # 3x3, stride 2, pad 1 on 4x4: outputs 0 and 1 read rows -1..1 and 1..3; only output
    # (1, 1) is inside. head weight 3 on it: the gradient is 3 on rows/cols 1..3.
    head = np.array([[1.0], [1.0], [1.0], [3.0]], np.float32)
    _, strided = explain(conv_sum_model(3, 1, strides=2, head=head), np.ones((1, 1, 4, 4),
                                                                             np.float32),
                         [0], "saliency", padding_trick=True)
    expected = np.zeros((4, 4))
    expected[1:, 1:] = 3.0
    np.testing.assert_array_equal(strided[0, 0], expected)


def test_padding_trick_leaves_unpadded_convs_alone():
    x = np.ones((1, 1, 4, 4), np.float32)
    head = np.arange(1, 5, dtype=np.float32)[:, None]
    a = explain(conv_sum_model(3, 0, head=head), x, [0], "saliency", padding_trick=True)[1]
    b = explain(conv_sum_model(3, 0, head=head), x, [0], "saliency")[1]
    np.testing.assert_array_equal(a, b)


PRR_X = np.array([[1, 2, 5, 5],
                  [3, 4, 1, 9],
                  [2, 2, 6, 1],
                  [4, 8, 3, 2]], np.float32)


def pool_model(head, size=4, attrs="kernel_shape = [2, 2], strides = [2, 2]"):
    return parse('<ir_version: 8, opset_import: ["" : 17]>\n'
                 f"prr (float[N,1,{size},{size}] x) => (float[N,1] logits) {{\n"
                 f"  y = MaxPool <{attrs}> (x)\n  f = Flatten(y)\n  logits = MatMul(f, head)\n}}",
                 {"head": np.asarray(head, np.float32).reshape(-1, 1)})


def test_prr_by_hand_2x2():
    """dY = [[1, 2], [-1, 0.5]]. PRR: z = mean(window) + 1e-10, c = AvgPool backward of dY / z
    (each of the 4 positions gets dY / z / 4), dX = x c = x dY / sum(window): the window's
    gradient is shared in proportion to the activations and sums to dY. (The exact max-pool
    gradient would put dY on the maximum alone; ties, as 5 and 5 here, do not matter.)"""
    _, attribution = explain(pool_model([1, 2, -1, 0.5]), PRR_X[None, None], [0], "saliency",
                             prr=True)
    # window sums: 10, 20, 16, 12
    expected = np.array([[1 / 10, 2 / 10, 2 * 5 / 20, 2 * 5 / 20],
                         [3 / 10, 4 / 10, 2 * 1 / 20, 2 * 9 / 20],
                         [-2 / 16, -2 / 16, 0.5 * 6 / 12, 0.5 * 1 / 12],
                         [-4 / 16, -8 / 16, 0.5 * 3 / 12, 0.5 * 2 / 12]])
    np.testing.assert_allclose(attribution[0, 0], expected, rtol=1e-6)
    _, exact = explain(pool_model([1, 2, -1, 0.5]), PRR_X[None, None], [0], "saliency")
    assert np.count_nonzero(exact) == 4


def literal_prr(x, dy, kernel, stride, pad):
    """Window by window: dX[i] += x[i] dY[o] / (mean_o + 1e-10) / count_o over the real
    (non-padding) positions of each window (AveragePool with count_include_pad = 0). ``pad`` is
    the padding at the start of each axis; windows past the end (ceil mode, end padding) are cut
    to the real positions."""
    kernel, stride, pad = (np.broadcast_to(v, 2) for v in (kernel, stride, pad))
    dx = np.zeros_like(x, dtype=np.float64)
    for oi in range(dy.shape[0]):
        for oj in range(dy.shape[1]):
            rows = [r for r in range(oi * stride[0] - pad[0], oi * stride[0] - pad[0] + kernel[0])
                    if 0 <= r < x.shape[0]]
            cols = [c for c in range(oj * stride[1] - pad[1], oj * stride[1] - pad[1] + kernel[1])
                    if 0 <= c < x.shape[1]]
            window = x[np.ix_(rows, cols)]
            count = window.size
            z = window.sum() / count + 1e-10
            dx[np.ix_(rows, cols)] += window * dy[oi, oj] / z / count
    return dx


PRR_POOLS = {
    # attrs, input size, kernel, strides, begin pads, output size
    "3x3_s2_pad1_overlapping": ("kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]",
                                7, 3, 2, 1, 4),
    "2x2_ceil_mode": ("kernel_shape = [2, 2], strides = [2, 2], ceil_mode = 1", 7, 2, 2, 0, 4),
    "3x3_s2_pad1_ceil_mode": ("kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1],"
                              " ceil_mode = 1", 8, 3, 2, 1, 5),
    "asymmetric_pads": ("kernel_shape = [3, 2], strides = [2, 1], pads = [0, 1, 2, 0]",
                        6, (3, 2), (2, 1), (0, 1), (3, 6)),
    "same_upper": ('kernel_shape = [2, 2], strides = [2, 2], auto_pad = "SAME_UPPER"',
                   7, 2, 2, 0, 4),
    "same_lower": ('kernel_shape = [3, 3], strides = [2, 2], auto_pad = "SAME_LOWER"',
                   6, 3, 2, 1, 3),
}


@pytest.mark.parametrize("name", sorted(PRR_POOLS))
def test_prr_against_literal_and_conserves(name, rng):
    attrs, size, kernel, strides, begin, out = PRR_POOLS[name]
    out = np.broadcast_to(out, 2)
    x = distinct_values((1, 1, size, size), rng, 0.1, 2.0)
    head = rng.standard_normal(int(np.prod(out)))
    model = pool_model(head, size=size, attrs=attrs)
    _, attribution = explain(model, x, [0], "saliency", prr=True)
    expected = literal_prr(x[0, 0].astype(np.float64), head.reshape(out), kernel, strides, begin)
    assert_close(attribution[0, 0], expected, "PRR vs literal numpy", where=name)
    # for positive activations every window hands on exactly its dY
    np.testing.assert_allclose(attribution.sum(), head.astype(np.float32).sum(), rtol=1e-5)


def test_prr_refuses_dilated_pools():
    model = pool_model(np.ones(25), size=7, attrs="kernel_shape = [2, 2], dilations = [2, 2],"
                                                  " strides = [1, 1]")
    explain(model, np.ones((1, 1, 7, 7), np.float32), [0], "saliency")  # exact rule: fine
    with pytest.raises(rectonnx.UnsupportedModelError, match="dilation"):
        rectonnx.rewrite(model, "rectgrad", prr=True)


# -- the padding trick on any convolution, against a brute-force mask -------------------------
PADDED_CONVS = {
    # attrs, input (H, W), kernel (kh, kw), torch pads (left, right, top, bottom), stride, dilation
    "3x3_same": ("pads = [1, 1, 1, 1]", (6, 6), (3, 3), (1, 1, 1, 1), 1, 1),
    "5x5_pad2": ("pads = [2, 2, 2, 2]", (7, 6), (5, 5), (2, 2, 2, 2), 1, 1),
    "asymmetric_strided": ("pads = [0, 2, 1, 0], strides = [2, 2]", (7, 8), (3, 3),
                           (2, 0, 0, 1), 2, 1),
    "dilated": ("pads = [2, 2, 2, 2], dilations = [2, 2]", (7, 7), (3, 3), (2, 2, 2, 2), 1, 2),
    "same_upper_even_kernel": ('auto_pad = "SAME_UPPER", strides = [2, 2]', (7, 7), (4, 4),
                               (1, 2, 1, 2), 2, 1),
    "same_lower_even_kernel": ('auto_pad = "SAME_LOWER"', (6, 6), (2, 2), (1, 0, 1, 0), 1, 1),
}


@pytest.mark.parametrize("name", sorted(PADDED_CONVS))
def test_padding_trick_against_brute_force(name, rng):
    """Masked gradient = conv backward of dY * mask, with mask = 1 where the window reads only
    real input, found by convolving the zero-padded indicator of real pixels (torch, float64)."""
    attrs, (h, w), (kh, kw), pads, stride, dilation = PADDED_CONVS[name]
    weight = rng.standard_normal((3, 2, kh, kw)).astype(np.float32)
    x = distinct_values((2, 2, h, w), rng)
    weight64 = torch.from_numpy(weight.astype(np.float64))
    inputs = torch.tensor(x.astype(np.float64), requires_grad=True)
    y = F.conv2d(F.pad(inputs, pads), weight64, stride=stride, dilation=dilation)
    real = F.pad(torch.ones(1, 1, h, w, dtype=torch.float64), pads)
    covered = F.conv2d(real, torch.ones(1, 1, kh, kw, dtype=torch.float64), stride=stride,
                       dilation=dilation)
    mask = (covered == kh * kw).double()
    assert 0 < mask.sum() < mask.numel()
    head = rng.standard_normal((y[0].numel(), 3)).astype(np.float32)
    model = parse('<ir_version: 8, opset_import: ["" : 17]>\n'
                  f"pt (float[N,2,{h},{w}] x) => (float[N,3] logits) {{\n"
                  f"  y = Conv <{attrs}> (x, w)\n  f = Flatten(y)\n  logits = MatMul(f, head)\n}}",
                  {"w": weight, "head": head})
    target = [0, 2]
    seed = torch.from_numpy(head.astype(np.float64))[:, target].T.reshape(y.shape)
    (expected,) = torch.autograd.grad(y, inputs, seed * mask)
    _, attribution = explain(model, x, target, "saliency", padding_trick=True)
    assert_close(attribution, expected.numpy(), "padding trick vs brute force", where=name)
