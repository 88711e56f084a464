"""Modern architectures as tiny torch modules exported to ONNX (TorchScript exporter, opset 17,
dynamic batch): a MobileNetV2-style net (ReLU6, depthwise convs, inverted residuals), two
EfficientNet-style nets (depthwise 5x5 convs, squeeze-and-excitation with ReduceMean and
Sigmoid; "lite" with ReLU6, "b0" with SiLU) and a ViT-style patch classifier (patch Conv, class
token, LayerNormalization, multi-head Softmax attention with MatMul of two activations, GELU).

Saliency and grad*input equal torch autograd (float64) within 1e-4 (max relative error);
guided backprop, deconvnet and RectGrad run and give finite maps (RectGrad's is non-negative).
The composite activations reach the walker as one gated unit each (GELU in the ViT, SiLU in
EfficientNet-b0); the squeeze-and-excitation Sigmoid is gated on its own.

Kinks: inputs are random normal, so no ReLU/ReLU6 input sits at a corner; max-pools are absent.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from helpers import assert_close, export, run_explainer, torch_gradient

import rectonnx
from rectonnx.normalize import normalize

TARGETS = [0, 3, -1]


def conv_bn(cin, cout, kernel, stride=1, groups=1, activation=nn.ReLU6):
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, activation()) if activation else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand, kernel=3, activation=nn.ReLU6, se=False):
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.expand = conv_bn(cin, hidden, 1, activation=activation)
        self.depthwise = conv_bn(hidden, hidden, kernel, stride, groups=hidden,
                                 activation=activation)
        self.se = SqueezeExcite(hidden, activation) if se else nn.Identity()
        self.project = conv_bn(hidden, cout, 1, activation=None)

    def forward(self, x):
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class SqueezeExcite(nn.Module):
    def __init__(self, channels, activation):
        super().__init__()
        self.reduce = nn.Conv2d(channels, max(2, channels // 4), 1)
        self.activation = activation()
        self.restore = nn.Conv2d(max(2, channels // 4), channels, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)  # ReduceMean in the export
        return x * torch.sigmoid(self.restore(self.activation(self.reduce(s))))


class MobileNetV2Style(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 8, 3, 2),
            InvertedResidual(8, 8, 1, 1),
            InvertedResidual(8, 12, 2, 4),
            InvertedResidual(12, 12, 1, 4),
            InvertedResidual(12, 16, 2, 4),
            conv_bn(16, 32, 1))
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1),
                                       1))


class EfficientNetStyle(nn.Module):
    def __init__(self, activation=nn.ReLU6, classes=5):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 8, 3, 2, activation=activation),
            InvertedResidual(8, 8, 1, 1, activation=activation, se=True),
            InvertedResidual(8, 12, 2, 6, kernel=5, activation=activation, se=True),
            InvertedResidual(12, 12, 1, 6, kernel=5, activation=activation, se=True),
            conv_bn(12, 24, 1, activation=activation))
        self.head = nn.Linear(24, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        n, tokens, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, tokens, 3, self.heads, -1) \
            .permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dim // self.heads), -1)
        x = x + self.proj((attention @ v).transpose(1, 2).reshape(n, tokens, dim))
        return x + self.mlp(self.norm2(x))


class ViTStyle(nn.Module):
    def __init__(self, dim=16, heads=2, depth=2, patch=4, size=16, classes=5):
        super().__init__()
        self.patches = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.position = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, dim) * 0.5)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        tokens = self.patches(x).flatten(2).transpose(1, 2)
        cls = self.cls.expand(x.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], 1) + self.position
        return self.head(self.norm(self.blocks(tokens))[:, 0])


ARCHITECTURES = {
    "mobilenet_v2": (MobileNetV2Style, set()),
    "efficientnet_lite": (lambda: EfficientNetStyle(nn.ReLU6), set()),
    "efficientnet_b0": (lambda: EfficientNetStyle(nn.SiLU), {"Swish"}),
    "vit": (ViTStyle, {"Gelu"}),
}


def randomised(module: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and LayerNorm affine parameters."""
    torch.manual_seed(0)
    for sub in module.modules():
        if isinstance(sub, nn.BatchNorm2d):
            sub.running_mean.uniform_(-0.2, 0.2)
            sub.running_var.uniform_(0.5, 1.5)
            sub.weight.data.uniform_(0.5, 1.5)
            sub.bias.data.uniform_(-0.2, 0.2)
        if isinstance(sub, nn.LayerNorm):
            sub.weight.data.uniform_(0.5, 1.5)
            sub.bias.data.uniform_(-0.2, 0.2)
    return module.eval()


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def architecture(request):
    factory, fused = ARCHITECTURES[request.param]
    torch.manual_seed(0)
    net = randomised(factory())
    x = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
    return request.param, net, x, export(net, torch.from_numpy(x)), fused


def test_saliency_and_grad_input_equal_torch_autograd(architecture):
    name, net, x, model, _ = architecture
    expected_logits, expected = torch_gradient(net, x, TARGETS)
    for method in ("saliency", "grad_input"):
        logits, attribution = run_explainer(rectonnx.rewrite(model, method), x, TARGETS)
        assert_close(logits, expected_logits, "architectures: logits vs torch", where=name)
        oracle = expected if method == "saliency" else expected * x.astype(np.float64)
        assert_close(attribution, oracle, "architectures: gradient vs torch autograd",
                     where=f"{name}/{method}")


def test_every_method_runs(architecture):
    name, _, x, model, _ = architecture
    for method in ("deconvnet", "guided_backprop", "rectgrad"):
        explainer = rectonnx.rewrite(model, method)
        assert explainer.graph.input[0].type.tensor_type.shape.dim[0].dim_param
        _, attribution = run_explainer(explainer, x, TARGETS)
        assert np.isfinite(attribution).all() and attribution.any(), (name, method)
        if method == "rectgrad":
            assert (attribution >= 0).all()


def test_activations_are_gated_once(architecture):
    """Each GELU / SiLU is one composite node on the path; ReLU6 stays Clip; no Erf or Tanh
    remains to be gated on its own, and only the squeeze-and-excitation gates are Sigmoids."""
    name, _, _, model, fused = architecture
    ops = [n.op_type for n in normalize(model).path_nodes]
    for op in fused:
        assert op in ops, (name, op)
    assert "Erf" not in ops and "Tanh" not in ops
    if name == "efficientnet_b0":
        se_gates = 3
        assert ops.count("Sigmoid") == se_gates and ops.count("Swish") >= 6
