"""The nine model-zoo architectures of the ``onnx`` package (AlexNet, DenseNet-121, Inception v1
and v2, ResNet-50, ShuffleNet, SqueezeNet, VGG-19, ZFNet-512) with seeded random weights
(tests/zoo.py): opset 9, IR 3, weights as graph inputs, LRN, Sum, Dropout, Concat, channel
shuffle, trailing Softmax, ``[N, C, 1, 1]`` scores, a fixed batch of 1.

For each architecture:

* every method (saliency, grad_input, deconvnet, guided_backprop, rectgrad, and rectgrad with
  the padding trick and the proportional redistribution rule) rewrites, the explainer has a
  symbolic batch and runs two samples at once in onnxruntime; its logits are the source model's
  scores (onnxruntime on the source, one sample at a time); grad_input is x times saliency,
  RectGrad's map is non-negative;
* the saliency graph, evaluated in float64 (``zoo.run_in_float64``), passes the dot-product
  check ``<t, grad> = (S(x + eps t) - S(x - eps t)) / 2 eps`` in a random direction ``t``, with
  the source model's scores in float64 (``zoo.ZooReference``: onnx.reference with float64
  torch/numpy Conv/pools/BatchNorm, itself checked against onnxruntime), max rel. err 1e-4;
  onnxruntime's float32 run of the same graph agrees elementwise to float32 precision (median
  within 1e-4 and 95 % of the pixels within 2e-3 of the largest value): deep 224-pixel nets
  lose float32 digits (Inception v1: median 1e-5, 99th percentile 5e-4), and
  rounding can flip a ReLU or a max-pool choice, which changes a small patch (ResNet-50's
  largest elementwise difference is ~8e-3). The float32 numbers are recorded too.

Models whose head allows it run at a smaller input (zoo.ZOO: AlexNet/ZFNet 99, VGG-19 32,
DenseNet/SqueezeNet 64); those ending in a fixed 7x7 average pool run at 224.
``benchmarks/zoo_report.py`` prints the per-architecture table (rewrite time, node counts,
finite-difference error).
"""

from __future__ import annotations

import functools

import warnings

import numpy as np
import pytest

from helpers import assert_close, dot_product_check, record, rel_err, run_explainer, session
from zoo import ZOO, ZooReference, input_shape, run_in_float64, scores_model, zoo_model

import rectonnx

METHODS = ["saliency", "grad_input", "deconvnet", "guided_backprop", "rectgrad"]
TARGETS = [-1, 7]
FD_STEP = 1e-7  # small enough that x +- eps t crosses no ReLU kink, large enough for float64

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Zoo:
    def __init__(self, name: str):
        self.name = name
        self.model = zoo_model(name)
        rng = np.random.default_rng(1)
        self.x = rng.standard_normal([len(TARGETS), *input_shape(self.model)[1:]]) \
            .astype(np.float32)

    def explainer(self, method: str, **options):
        if method == "saliency" and not options:
            return self.saliency
        return rectonnx.rewrite(self.model, method, **options)

    @functools.cached_property
    def saliency(self):
        return rectonnx.rewrite(self.model, "saliency")

    @functools.cached_property
    def scores(self) -> np.ndarray:
        """The source model's scores (before its Softmax), one sample at a time."""
        sess = session(scores_model(self.model))
        name = sess.get_inputs()[0].name
        return np.concatenate([sess.run(None, {name: self.x[i:i + 1]})[0].reshape(1, -1)
                               for i in range(len(self.x))])


@pytest.fixture(scope="module", params=sorted(ZOO))
def zoo(request):
    return Zoo(request.param)


def test_every_method_rewrites_and_runs_with_any_batch(zoo):
    attributions = {}
    for method in METHODS:
        explainer = zoo.explainer(method)
        batch = explainer.graph.input[0].type.tensor_type.shape.dim[0]
        assert batch.dim_param == "N", (zoo.name, method)
        logits, attribution = run_explainer(explainer, zoo.x, TARGETS)
        assert attribution.shape == zoo.x.shape and np.isfinite(attribution).all()
        assert_close(logits, zoo.scores, "zoo logits vs source model", where=zoo.name)
        attributions[method] = attribution
    assert_close(attributions["grad_input"], zoo.x * attributions["saliency"],
                 "zoo grad_input vs x * saliency", tol=1e-6, where=zoo.name)
    assert (attributions["rectgrad"] >= 0).all()
    # RectGrad's default padding trick at the zoo's 32 px: VGG-19's 2x2 conv5 outputs all read
    # padding, so its map is zero, and rewrite says so (a VanishingMapWarning)
    plain = zoo.explainer("rectgrad", padding_trick=False)
    _, attribution = run_explainer(plain, zoo.x, TARGETS)
    assert (attribution >= 0).all() and attribution.any()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tricks = zoo.explainer("rectgrad", padding_trick=True, prr=True)
    _, attribution = run_explainer(tricks, zoo.x, TARGETS)
    assert np.isfinite(attribution).all() and (attribution >= 0).all()
    closed = [w for w in caught if issubclass(w.category, rectonnx.VanishingMapWarning)
              and "padding trick" in str(w.message)]
    assert attribution.any() or closed, zoo.name  # a zero map is always explained


def test_saliency_by_central_differences(zoo):
    """The saliency graph, run in float64, passes the dot-product check; onnxruntime's float32
    run of it agrees elementwise to float32 precision (see the module docstring)."""
    reference = ZooReference(zoo.model)
    assert_close(reference(zoo.x), zoo.scores, "zoo oracle vs onnxruntime", where=zoo.name)
    exact = run_in_float64(zoo.saliency, zoo.x, TARGETS)
    lhs, rhs = dot_product_check(reference, zoo.x, TARGETS, exact, np.random.default_rng(2),
                                 eps=FD_STEP)
    error = assert_close(lhs, rhs, "zoo saliency dot-product check", where=zoo.name)
    record(f"zoo dot-product check {zoo.name}", error)
    direction = np.random.default_rng(2).standard_normal(zoo.x.shape)  # the check's t
    _, attribution = run_explainer(zoo.saliency, zoo.x, TARGETS)
    float32 = (direction * attribution).sum(axis=(1, 2, 3))
    record("zoo saliency float32 dot-product check", rel_err(float32, rhs), zoo.name)
    elementwise = np.abs(attribution - exact) / np.abs(exact).max()
    record("zoo saliency float32 vs float64 run (max)", float(elementwise.max()), zoo.name)
    median, high = np.quantile(elementwise, [0.5, 0.95])
    assert median <= 1e-4 and high <= 2e-3, (zoo.name, median, high)
