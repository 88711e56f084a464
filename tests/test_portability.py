"""One explainer graph, many runtimes: onnxruntime at every graph optimisation level,
``onnx.reference.ReferenceEvaluator`` and OpenVINO give the same logits and attribution
(relative error <= 1e-4 against onnxruntime with optimisations off).

Two runtime notes the test pins down (see ``rectonnx.serve.portable``):

* OpenVINO's CPU plugin computes in bfloat16 by default on CPUs with bf16 units; attribution
  then differs by ~10 %: compile with ``INFERENCE_PRECISION_HINT = f32``.
* OpenVINO 2026.4 cannot compile a Pooling node whose input is a constant (the AveragePool
  backward divides by ``AveragePool(ones)``): ``portable()`` folds all-constant subgraphs first.

Inputs are random normal: every method's map is continuous there except at RectGrad's
thresholds, and ties between a score and its layer's threshold have probability zero.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper, parser
from onnx.reference import ReferenceEvaluator

import rectonnx
from rectonnx.serve import portable

from helpers import assert_close, export

LEVELS = ["ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"]
VARIANTS = [
    ("saliency", {}), ("grad_input", {}), ("deconvnet", {}), ("guided_backprop", {}),
    ("rectgrad", {}), ("rectgrad", {"padding_trick": True, "prr": True}),
    ("rectgrad", {"tau": 0.0}), ("rectgrad", {"q": 80.0, "threshold": "bisect"}),
]


class SqueezeExcite(torch.nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.reduce = torch.nn.Conv2d(channels, 4, 1)
        self.expand = torch.nn.Conv2d(4, channels, 1)

    def forward(self, x):
        scale = torch.nn.functional.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.expand(torch.nn.functional.silu(self.reduce(scale))))


class Block(torch.nn.Module):
    """An EfficientNet-style block: depthwise conv, squeeze-excite, projection, residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.depthwise = torch.nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.norm = torch.nn.BatchNorm2d(channels)
        self.excite = SqueezeExcite(channels)
        self.project = torch.nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        y = torch.nn.functional.relu6(self.norm(self.depthwise(x)))
        return x + self.project(self.excite(y))


def networks():
    torch.manual_seed(0)
    paper_like = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1, groups=2), torch.nn.ReLU6(), torch.nn.AvgPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 32), torch.nn.LeakyReLU(0.1),
        torch.nn.Linear(32, 10))
    efficient_like = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.BatchNorm2d(8), torch.nn.SiLU(),
        Block(8), Block(8), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 10))
    out = {}
    for name, net in (("paper_like", paper_like), ("efficient_like", efficient_like)):
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                with torch.no_grad():
                    module.running_mean.uniform_(-0.2, 0.2)
                    module.running_var.uniform_(0.5, 1.5)
        out[name] = export(net.eval(), torch.randn(1, 3, 16, 16))
    return out


MODELS = networks()
X = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
TARGET = np.array([-1, 3, 0, -1], np.int64)


def run_ort(graph, level: str):
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(graph.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(["logits", "attribution"], {"x": X, "target": TARGET})


def run_reference(graph):
    return ReferenceEvaluator(graph).run(["logits", "attribution"], {"x": X, "target": TARGET})


def run_openvino(graph):
    ov = pytest.importorskip("openvino", reason="pip install -e '.[openvino]'")
    core = ov.Core()
    compiled = core.compile_model(core.read_model(portable(graph).SerializeToString(), b""),
                                  "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled({"x": X, "target": TARGET})
    return [result[compiled.output("logits")], result[compiled.output("attribution")]]


def graph_for(model: str, method: str, options: dict):
    return rectonnx.rewrite(MODELS[model], method, **options)


# The counting threshold's ~35 passes per layer are slow in onnx.reference: one model is enough.
CASES = [(model, method, options) for model in sorted(MODELS) for method, options in VARIANTS
         if not (options.get("threshold") == "bisect" and model != "paper_like")]


@pytest.mark.parametrize("model, method, options", CASES,
                         ids=[f"{model}-{m}-{'-'.join(f'{k}={v}' for k, v in o.items())}"
                              for model, m, o in CASES])
def test_same_maps_in_every_runtime(model, method, options):
    graph = graph_for(model, method, options)
    logits, attribution = run_ort(graph, "ORT_DISABLE_ALL")
    assert np.abs(attribution).max() > 0
    where = f"{model}/{method}/{options}"
    runs = {f"onnxruntime {level}": run_ort(graph, level) for level in LEVELS[1:]}
    runs["onnx.reference"] = run_reference(graph)
    runs["openvino f32"] = run_openvino(graph)
    for runtime, (other_logits, other_attribution) in runs.items():
        assert_close(other_logits, logits, f"logits: {runtime} vs ORT no-opt", where=where)
        assert_close(other_attribution, attribution,
                     f"attribution: {runtime} vs ORT no-opt", where=where)


def test_portable_form_is_the_same_graph_folded():
    graph = graph_for("paper_like", "rectgrad", {"prr": True})
    folded = portable(graph)
    assert len(folded.graph.node) < len(graph.graph.node)
    assert not any(n.op_type == "AveragePool" and n.input[0] in
                   {t.name for t in folded.graph.initializer} for n in folded.graph.node)
    for a, b in zip(run_ort(folded, "ORT_DISABLE_ALL"), run_ort(graph, "ORT_DISABLE_ALL")):
        np.testing.assert_array_equal(a, b)


def test_portable_form_keeps_inputs_with_defaults():
    """An input with a default (initializer of the same name) is not a constant to fold."""
    graph = parser.parse_model('''<ir_version: 8, opset_import: ["" : 17]>
        g (float[N] x, float[Q] s) => (float[N] y) {
            c = Add(one, one)
            d = Mul(s, c)
            y = Mul(x, d)
        }''')
    graph.graph.initializer.extend([numpy_helper.from_array(np.array([1.0], np.float32), "one"),
                                    numpy_helper.from_array(np.array([3.0], np.float32), "s")])
    folded = portable(graph)
    assert [n.op_type for n in folded.graph.node] == ["Mul", "Mul"]
    session = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([1.0, 2.0], np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], [6.0, 12.0])
    np.testing.assert_array_equal(session.run(None, {"x": x, "s": np.array([0.5], np.float32)})[0],
                                  [1.0, 2.0])
