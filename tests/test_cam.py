"""The Grad-CAM family and layer attribution (cam.py, walker.path_between) against their oracles.

* ``gradcam`` = Captum's ``LayerGradCam(model, layer).attribute(x, target,
  relu_attributions=True)`` then ``LayerAttribution.interpolate(map, (H, W), "bilinear")``
  (float64 torch), on a small CNN and on a ResNet-like net with a residual add, at the default
  layer and at a layer inside the residual block (the skip branch from before it is held
  constant).
* ``gradcam++`` and ``layercam`` = a literal torch statement of their formulas (docs/maths.md),
  with ``g`` from torch autograd at the layer.
* ``wrt``: saliency, grad_input and rectgrad at an intermediate tensor, the first two against
  Captum's ``LayerGradientXActivation`` (``multiply_by_inputs=False``: the layer gradient);
  integrated gradients and DeepLIFT against Captum's ``LayerIntegratedGradients`` and
  ``LayerDeepLift`` (inside a residual block, whose skip branch crosses the layer, and where
  nothing crosses), SmoothGrad against its definition at the layer (torch autograd).
* The backward stops at the layer: no gradient node for anything before it.
* The default layer of the shipped models, and ``rectonnx info`` naming it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerAttribution, LayerGradCam, LayerGradientXActivation
from click.testing import CliRunner
from torch import nn

import rectonnx
from helpers import assert_close, explain, export, run_explainer
from rectonnx.cam import default_cam_layer
from rectonnx.cli import main
from rectonnx.normalize import normalize
from test_methods import Residual

pytestmark = pytest.mark.filterwarnings("ignore:Setting backward hooks:UserWarning")
ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
TARGETS = [3, -1, 0, 5]


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 6)

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class SmallResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.relu = nn.ReLU()
        self.block = Residual(8)
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        x = self.block(self.relu(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


def _randomised(module: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    module = module.eval()
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return module


@pytest.fixture(scope="module")
def nets():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(len(TARGETS), 3, 12, 12)).astype(np.float32)
    built = {}
    for name, cls, seed in (("cnn", SmallCNN, 1), ("resnet", SmallResNet, 2)):
        module = _randomised(cls(), seed)
        built[name] = (module, export(module, x[:1]))
    return built, x


def tensor_of(model, node_name: str) -> str:
    """The ONNX output of the node ``node_name`` (the exporter names nodes by module path)."""
    return next(n.output[0] for n in model.graph.node if n.name == node_name)


def targets_of(module, x) -> np.ndarray:
    with torch.no_grad():
        logits = module.double()(torch.tensor(x, dtype=torch.float64)).numpy()
    module.float()
    return np.where(np.asarray(TARGETS) < 0, logits.argmax(1), TARGETS)


def captum_gradcam(module, layer, x, targets) -> np.ndarray:
    module = copy.deepcopy(module).double()
    layer = dict(module.named_modules())[layer]
    inputs = torch.tensor(x, dtype=torch.float64)
    cam = LayerGradCam(module, layer).attribute(inputs, target=torch.as_tensor(targets),
                                                 relu_attributions=True)
    return LayerAttribution.interpolate(cam, tuple(x.shape[2:]),
                                        interpolate_mode="bilinear").detach().numpy()


def torch_layer(module, layer, x, targets):
    """``(A, dS/dA)`` at module ``layer`` by torch autograd, float64."""
    module = copy.deepcopy(module).double()
    seen = {}

    def hook(_, __, out):
        out.retain_grad()
        seen["a"] = out

    dict(module.named_modules())[layer].register_forward_hook(hook)
    logits = module(torch.tensor(x, dtype=torch.float64))
    logits[torch.arange(len(targets)), torch.as_tensor(targets)].sum().backward()
    return seen["a"].detach(), seen["a"].grad


def literal_cam(method, a, g, size) -> np.ndarray:
    """docs/maths.md, 'Class activation maps', stated literally."""
    if method == "gradcam++":
        g2, g3 = g ** 2, g ** 3
        total = a.sum(dim=(2, 3), keepdim=True)
        alpha = g2 / (2 * g2 + total * g3)
        alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
        weights = (alpha * torch.relu(g)).sum(dim=(2, 3), keepdim=True)
        cam = torch.relu((weights * a).sum(dim=1, keepdim=True))
    elif method == "layercam":
        cam = torch.relu((torch.relu(g) * a).sum(dim=1, keepdim=True))
    else:
        cam = torch.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1, keepdim=True))
    return F.interpolate(cam, size, mode="bilinear", align_corners=False).numpy()


CAM_LAYERS = [("cnn", "relu2", "/relu2/Relu", True),
              ("resnet", "block", "/block/relu2/Relu", True),
              ("resnet", "block.relu1", "/block/relu1/Relu", False)]


@pytest.mark.parametrize("net,layer,node,is_default", CAM_LAYERS)
def test_gradcam_equals_captum(nets, net, layer, node, is_default):
    built, x = nets
    module, model = built[net]
    tensor = tensor_of(model, node)
    assert (default_cam_layer(normalize(model)) == tensor) == is_default
    targets = targets_of(module, x)
    expected = captum_gradcam(module, layer, x, targets)
    _, attribution = explain(model, x, TARGETS, "gradcam", layer=tensor)
    assert attribution.shape == (len(x), 1, *x.shape[2:])
    assert_close(attribution, expected, "gradcam vs Captum LayerGradCam", TOL, f"{net}/{layer}")
    if is_default:
        _, by_default = explain(model, x, TARGETS, "gradcam")
        np.testing.assert_array_equal(by_default, attribution)


@pytest.mark.parametrize("method", ["gradcam++", "layercam"])
@pytest.mark.parametrize("net,layer,node,is_default", CAM_LAYERS)
def test_gradcam_plus_plus_and_layercam_equal_their_formulas(nets, method, net, layer, node,
                                                              is_default):
    built, x = nets
    module, model = built[net]
    targets = targets_of(module, x)
    a, g = torch_layer(module, layer, x, targets)
    expected = literal_cam(method, a, g, tuple(x.shape[2:]))
    assert np.abs(expected).max() > 0
    _, attribution = explain(model, x, TARGETS, method, layer=tensor_of(model, node))
    assert_close(attribution, expected, f"{method} vs literal torch", TOL, f"{net}/{layer}")
    # the literal gradcam oracle agrees with Captum (the oracles check each other)
    if method == "layercam":
        assert_close(literal_cam("gradcam", a, g, tuple(x.shape[2:])),
                     captum_gradcam(module, layer, x, targets), "literal gradcam vs Captum",
                     1e-12, f"{net}/{layer}")


@pytest.mark.parametrize("method,times", [("saliency", False), ("grad_input", True)])
@pytest.mark.parametrize("net,layer,node", [("cnn", "relu1", "/relu1/Relu"),
                                            ("resnet", "block.relu1", "/block/relu1/Relu")])
def test_layer_attribution_equals_captum(nets, method, times, net, layer, node):
    built, x = nets
    module, model = built[net]
    targets = targets_of(module, x)
    double = copy.deepcopy(module).double()
    captum = LayerGradientXActivation(double, dict(double.named_modules())[layer],
                                      multiply_by_inputs=times)
    expected = captum.attribute(
        torch.tensor(x, dtype=torch.float64), target=torch.as_tensor(targets))
    expected = expected.detach().numpy()
    _, attribution = explain(model, x, TARGETS, method, wrt=tensor_of(model, node))
    assert attribution.shape == expected.shape
    assert_close(attribution, expected, f"layer {method} vs Captum", TOL, f"{net}/{layer}")


def layer_value(module, layer, x) -> torch.Tensor:
    """Module ``layer``'s output on ``x`` (float64)."""
    seen = {}
    handle = layer.register_forward_hook(lambda _, __, out: seen.__setitem__("a", out.detach()))
    with torch.no_grad():
        module(torch.as_tensor(x, dtype=torch.float64))
    handle.remove()
    return seen["a"]


# the residual net's layers: inside the block (its skip branch crosses the layer, so every
# input is repeated per copy) and the block's stem ReLU (nothing crosses: copies made there)
LAYERS = [("resnet", "block.relu1", "/block/relu1/Relu"), ("resnet", "relu", "/relu/Relu"),
          ("cnn", "relu1", "/relu1/Relu")]


@pytest.mark.parametrize("net,layer,node", LAYERS)
def test_layer_integrated_gradients_and_deeplift_equal_captum(nets, net, layer, node):
    """Captum's LayerIntegratedGradients and LayerDeepLift take a baseline of the input and
    use the layer's value on it; rectonnx takes the baseline at the layer: that value."""
    from captum.attr import DeepLift, LayerDeepLift, LayerIntegratedGradients

    built, x = nets
    module, model = built[net]
    targets = torch.as_tensor(targets_of(module, x))
    double = copy.deepcopy(module).double()
    at = dict(double.named_modules())[layer]
    zero = torch.zeros((1, *x.shape[1:]), dtype=torch.float64)
    baseline = layer_value(double, at, zero).numpy().astype(np.float32)
    inputs = torch.tensor(x, dtype=torch.float64)
    for integration, captum_method in (("riemann_right", "riemann_right"),
                                       ("gausslegendre", "gausslegendre")):
        expected = LayerIntegratedGradients(double, at).attribute(
            inputs, baselines=zero, target=targets, n_steps=8,
            method=captum_method).detach().numpy()
        _, got = explain(model, x, TARGETS, "integrated_gradients", wrt=tensor_of(model, node),
                         steps=8, baseline=baseline, integration=integration)
        assert_close(got, expected, "Captum LayerIntegratedGradients", TOL,
                     f"{net}/{layer}/{integration}")
    _, got = explain(model, x, TARGETS, "deeplift", wrt=tensor_of(model, node),
                     baseline=baseline)
    if layer != "block.relu1":
        expected = LayerDeepLift(double, at).attribute(inputs, baselines=zero,
                                                       target=targets).detach().numpy()
        assert_close(got, expected, "Captum LayerDeepLift", TOL, f"{net}/{layer}")
    else:  # the skip branch crosses the layer: held at the sample, as LayerIntegratedGradients
        # does (Captum's LayerDeepLift would run it on the input baseline): Captum's DeepLift
        # of the net after the layer, with the layer's output as its input
        class After(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = double

            def forward(self, value, image):
                handle = at.register_forward_hook(lambda _, __, out: value)
                try:
                    return self.net(image)
                finally:
                    handle.remove()

        expected = DeepLift(After()).attribute(
            layer_value(double, at, inputs), baselines=torch.as_tensor(baseline).double(),
            target=targets, additional_forward_args=(inputs,)).detach().numpy()
        assert_close(got, expected, "Captum DeepLift of the net after the layer", TOL,
                     f"{net}/{layer}")


@pytest.mark.parametrize("net,layer,node", LAYERS[:2])
def test_layer_smoothgrad_is_its_definition_at_the_layer(nets, net, layer, node):
    """SmoothGrad at a layer: the mean gradient at ``A + sigma (max A - min A) e_k`` (the
    layer's own value range per sample, rectonnx's embedded noise), by torch autograd with the
    layer's output replaced."""
    from rectonnx.baselines import sample_noise

    built, x = nets
    module, model = built[net]
    targets = torch.as_tensor(targets_of(module, x))
    double = copy.deepcopy(module).double()
    at = dict(double.named_modules())[layer]
    inputs = torch.tensor(x, dtype=torch.float64)
    a = layer_value(double, at, inputs)
    samples, sigma = 3, 0.2
    noise = torch.as_tensor(sample_noise(samples, tuple(a.shape[1:]), 7), dtype=torch.float64)
    spread = (a.amax(dim=(1, 2, 3)) - a.amin(dim=(1, 2, 3))).reshape(-1, 1, 1, 1)
    total = torch.zeros_like(a)
    for k in range(samples):
        noisy = (a + sigma * spread * noise[k]).requires_grad_(True)
        handle = at.register_forward_hook(lambda _, __, out, t=noisy: t)
        logits = double(inputs)
        handle.remove()
        logits[torch.arange(len(x)), targets].sum().backward()
        total += noisy.grad / samples
    _, got = explain(model, x, TARGETS, "smoothgrad", wrt=tensor_of(model, node),
                     samples=samples, sigma=sigma, seed=7)
    assert_close(got, total.numpy(), "torch autograd (SmoothGrad at a layer)", TOL,
                 f"{net}/{layer}")


def test_copies_at_a_layer_refuse_the_scores_tensor(nets):
    built, _ = nets
    _, model = built["cnn"]
    scores = model.graph.output[0].name
    with pytest.raises(ValueError, match="scores tensor itself"):
        rectonnx.rewrite(model, "integrated_gradients", wrt=scores)


def test_layer_rectgrad_is_relu_of_activation_times_its_gradient(nets):
    """At the residual block's output no activation lies between the layer and the logits, so
    RectGrad's attribution there is ``relu(A dS/dA)`` (torch autograd); inside the block the
    gate at the block's last ReLU runs and the map keeps the layer's shape."""
    built, x = nets
    module, model = built["resnet"]
    targets = targets_of(module, x)
    a, g = torch_layer(module, "block", x, targets)
    _, attribution = explain(model, x, TARGETS, "rectgrad",
                             wrt=tensor_of(model, "/block/relu2/Relu"))
    assert_close(attribution, torch.relu(a * g).numpy(), "layer rectgrad vs torch", TOL)
    inner = tensor_of(model, "/block/relu1/Relu")
    _, gated = explain(model, x, TARGETS, "rectgrad", q=50.0, wrt=inner)
    assert gated.shape == (len(x), 8, 6, 6) and gated.any() and (gated >= 0).all()


class ChannelsLast(nn.Module):
    """A Keras-like net: NHWC images, NCHW convolutions between two Transposes, and a global
    average over axes 1 and 2 of the channels-last feature map."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        a = self.relu2(self.conv2(self.relu1(self.conv1(x.permute(0, 3, 1, 2)))))
        return self.fc(a.permute(0, 2, 3, 1).mean(dim=(1, 2)))


def test_channels_last_models_get_maps_in_their_layout():
    module = _randomised(ChannelsLast(), 3)
    x = np.random.default_rng(5).normal(size=(len(TARGETS), 12, 14, 3)).astype(np.float32)
    model = export(module, x[:1])
    layer = default_cam_layer(normalize(model))
    transpose = next(n for n in model.graph.node if n.output[0] == layer)
    assert transpose.op_type == "Transpose"  # the [N, h, w, K] map before the pooling
    logits, cam = explain(model, x, TARGETS, "gradcam")
    assert cam.shape == (len(TARGETS), 12, 14, 1)
    chosen = np.where(np.asarray(TARGETS) < 0, logits.argmax(1), TARGETS)
    double = copy.deepcopy(module).double()
    expected = LayerGradCam(double, double.relu2).attribute(
        torch.tensor(x, dtype=torch.float64), target=torch.as_tensor(chosen),
        relu_attributions=True)
    expected = LayerAttribution.interpolate(expected, (12, 14), interpolate_mode="bilinear")
    assert_close(cam, expected.detach().numpy().transpose(0, 2, 3, 1),
                 "Captum LayerGradCam (channels-last)", TOL)
    channels_first = tensor_of(model, "/relu2/Relu")
    for method in ("gradcam++", "layercam"):
        _, default = explain(model, x, TARGETS, method)
        _, named = explain(model, x, TARGETS, method, layer=channels_first)
        assert_close(default, named, f"{method} at the NCHW layer", TOL)


def test_the_backward_stops_at_the_layer(nets):
    built, x = nets
    _, model = built["cnn"]
    graph = rectonnx.rewrite(model, "gradcam")  # the layer is after every convolution
    assert not [n for n in graph.graph.node if n.op_type == "ConvTranspose"]
    assert [n.op_type for n in graph.graph.node].count("Resize") == 1
    graph = rectonnx.rewrite(model, "saliency", wrt=tensor_of(model, "/relu1/Relu"))
    assert [n.op_type for n in graph.graph.node].count("ConvTranspose") == 1  # conv2 only
    out = next(o for o in graph.graph.output if o.name == "attribution")
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == \
        ["N", 8, 12, 12]


def test_layer_outputs_and_final_threshold_keep_the_attribution_shape():
    model = ROOT / "models" / "paper_cnn_digits.onnx"
    x = np.random.default_rng(4).random((3, 3, 32, 32), dtype=np.float32)
    for method, options, shape in (
            ("rectgrad", {"wrt": "/6/Relu_output_0", "layer_outputs": True}, (64, 16, 16)),
            ("layercam", {"layer_outputs": True}, (1, 32, 32)),
            ("gradcam", {"final_percentile": 90.0}, (1, 32, 32))):
        result = rectonnx.Explainer(rectonnx.rewrite(model, method, **options),
                                    batch_size=2).explain(x)
        assert result.attribution.shape == (3, *shape) and result.attribution.any()
        if options.get("layer_outputs"):
            assert result.layers and "12/Relu" in result.layers


def test_bad_layers_are_one_clear_error(nets):
    built, _ = nets
    _, model = built["cnn"]
    with pytest.raises(ValueError, match="option layer = 'nope'"):
        rectonnx.rewrite(model, "gradcam", layer="nope")
    flat = next(n.output[0] for n in model.graph.node if n.op_type == "Flatten")
    with pytest.raises(ValueError, match="4-D feature map"):
        rectonnx.rewrite(model, "layercam", layer=flat)
    with pytest.raises(ValueError, match="option wrt = 'nope'"):
        rectonnx.rewrite(model, "saliency", wrt="nope")
    with pytest.raises(ValueError, match="option layer"):
        rectonnx.ExplanationSpec("gradcam", layer="")
    for method in ("deconvnet", "guided_backprop", "epsilon_lrp"):
        with pytest.raises(ValueError, match=f"{method} has no option wrt"):
            rectonnx.ExplanationSpec(method, wrt="x")


def test_the_default_layer_of_the_shipped_models():
    found = {name: default_cam_layer(normalize(ROOT / "models" / f"{name}.onnx"))
             for name in ("paper_cnn_digits", "efficientnet_lite0")}
    assert found == {"paper_cnn_digits": "/9/MaxPool_output_0",
                     "efficientnet_lite0": "/head/head.2/Clip_output_0"}
    result = CliRunner().invoke(main, ["info", str(ROOT / "models" / "paper_cnn_digits.onnx")])
    assert result.exit_code == 0
    assert "default CAM layer (gradcam, gradcam++, layercam): '/9/MaxPool_output_0' " \
           "[N, 64, 8, 8]" in result.output


def test_explainer_chunks_keep_the_cam_shape():
    graph = rectonnx.rewrite(ROOT / "models" / "paper_cnn_digits.onnx", "gradcam")
    x = np.random.default_rng(3).random((5, 3, 32, 32), dtype=np.float32)
    whole = run_explainer(graph, x, [-1] * 5)[1]
    chunked = rectonnx.Explainer(graph, batch_size=2).explain(x).attribution
    assert chunked.shape == (5, 1, 32, 32)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-7)
