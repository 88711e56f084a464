"""The benchmark's models as plain torch modules (random weights) and their ONNX exports.

* ``PaperCNN``: the paper's CIFAR CNN (docs/maths.md, "The paper's network and evaluation
  metrics"): Conv3x3-32, Conv3x3-32, MaxPool2, Conv3x3-64, Conv3x3-64, MaxPool2, Dense-256,
  Dense-10, ReLU after every conv and the first dense layer, SAME padding, 32x32x3 input.
* ``ResNet50``: ResNet-50 v1.5 (bottleneck blocks [3, 4, 6, 3], stride in the 3x3 conv) written
  in plain torch (torchvision does not import here), He-initialised, BatchNorm statistics
  calibrated on random data so activations keep a sane scale. Every ReLU is its own module
  (Captum's GuidedBackprop hooks modules, and a reused ReLU would be hooked twice).

The same module serves the eager PyTorch baselines and, exported, rectonnx.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch
from torch import nn


class PaperCNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 8 * 8, 256), nn.ReLU(),
                                  nn.Linear(256, classes))

    def forward(self, x):
        return self.head(self.features(x))


class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        width, out = planes, planes * 4
        self.conv1, self.bn1 = nn.Conv2d(inplanes, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out)
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride,
                                                      bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        h = self.relu1(self.bn1(self.conv1(x)))
        h = self.relu2(self.bn2(self.conv2(h)))
        return self.relu3(self.bn3(self.conv3(h)) + identity)


class ResNet50(nn.Module):
    def __init__(self, classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(64), nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        blocks, inplanes = [], 64
        for planes, count, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
            for i in range(count):
                blocks.append(Bottleneck(inplanes, planes, stride if i == 0 else 1))
                inplanes = planes * 4
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        h = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        h = self.pool(self.layers(h))
        return self.fc(torch.flatten(h, 1))


def paper_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return PaperCNN().eval()


def resnet50(seed: int = 0, calibrate: bool = True) -> nn.Module:
    """He-initialised ResNet-50; BatchNorm statistics from one pass over random images."""
    torch.manual_seed(seed)
    net = ResNet50()
    if calibrate:
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # cumulative average
        net.train()
        with torch.no_grad():
            net(torch.randn(4, 3, 224, 224))
    return net.eval()


def export(module: nn.Module, shape, *, opset: int = 17) -> onnx.ModelProto:
    """The module as ONNX (TorchScript exporter), dynamic batch, input ``x``, output ``scores``."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(1, *shape),), buffer, dynamo=False,
                          input_names=["x"], output_names=["scores"], opset_version=opset,
                          dynamic_axes={"x": {0: "N"}, "scores": {0: "N"}})
    return onnx.load_from_string(buffer.getvalue())


def shipped_onnx(name: str) -> onnx.ModelProto:
    from rectonnx import models

    return onnx.load(str(models.path(name)))


def efficientnet_lite0() -> nn.Module:
    """The shipped EfficientNet-Lite0 (models/efficientnet_lite0.onnx) as a torch module.

    The architecture is the one models/export_efficientnet_lite0.py exported (TensorFlow SAME
    padding, ReLU6, BatchNorm after each bias-free conv); the weights are read back from the
    shipped ONNX file, whose convolutions carry the folded BatchNorm: each torch conv takes the
    ONNX Conv's kernel (same order: the module order is the export's node order) and its
    BatchNorm becomes ``x + bias`` (weight 1, mean 0, variance ``1 - eps``)."""
    import importlib.util

    from rectonnx import models
    from onnx import numpy_helper

    spec = importlib.util.spec_from_file_location(
        "export_efficientnet_lite0", models.DIRECTORY / "export_efficientnet_lite0.py")
    source = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(source)
    net = source.EfficientNetLite0(tf_same=True).eval()
    model = shipped_onnx(models.EFFICIENTNET_LITE0)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:  # Constant nodes holding weights, if any
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            weights[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    pairs = [(m, b) for seq in net.modules() if isinstance(seq, source.ConvBN)
             for m, b in [(next(x for x in seq if isinstance(x, nn.Conv2d)),
                           next(x for x in seq if isinstance(x, nn.BatchNorm2d)))]]
    if len(pairs) != len(convs):
        raise ValueError(f"{len(pairs)} torch convs, {len(convs)} ONNX Conv nodes")
    with torch.no_grad():
        for (conv, bn), node in zip(pairs, convs):
            kernel = torch.from_numpy(weights[node.input[1]].copy())
            if kernel.shape != conv.weight.shape:
                raise ValueError(f"{node.name}: {tuple(kernel.shape)} != "
                                 f"{tuple(conv.weight.shape)}")
            conv.weight.copy_(kernel)
            bias = weights[node.input[2]] if len(node.input) > 2 else np.zeros(len(kernel))
            bn.weight.fill_(1.0)
            bn.bias.copy_(torch.from_numpy(bias.copy()))
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
        gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
        trans_b = next((a.i for a in gemm.attribute if a.name == "transB"), 0)
        fc = weights[gemm.input[1]]
        net.fc.weight.copy_(torch.from_numpy((fc if trans_b else fc.T).copy()))
        net.fc.bias.copy_(torch.from_numpy(weights[gemm.input[2]].copy()))
    return net.eval()


MODELS = {"paper_cnn": (paper_cnn, (3, 32, 32)), "resnet50": (resnet50, (3, 224, 224)),
          "efficientnet_lite0": (efficientnet_lite0, (3, 224, 224))}
SHIPPED = {"efficientnet_lite0"}  # the ONNX model is the shipped file, not an export


def build(name: str):
    """``(torch module, onnx model, input shape without batch)`` of a benchmark model."""
    factory, shape = MODELS[name]
    net = factory()
    return net, shipped_onnx(name) if name in SHIPPED else export(net, shape), shape


def random_batch(shape, batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *shape)).astype(np.float32)
