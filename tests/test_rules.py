"""Every backward rule, attribute variant by attribute variant, against float64 oracles.

Each case is a small ONNX model written as text: ``x -> op under test -> y -> Flatten -> random
dense head -> logits``. The random head makes the cotangent reaching ``y`` a random vector. The
explainer graph (float32, onnxruntime) is checked against

* the full input gradient by central differences on a float64 copy of the model under
  ``onnx.reference`` (``helpers.fd_gradient``), and
* a dot-product check ``<t, vjp(c)>`` against ``(f(x + eps t) - f(x - eps t)) / 2 eps``;

both with max relative error <= 1e-4 (``max|a - b| / max|b|``). The forward logits are checked
against ``onnx.reference`` too, so a runtime that disagrees with the ONNX spec shows up as such.

Kinks: inputs are a random permutation of an evenly spaced ramp (``helpers.distinct_values``),
so no two values tie in a max-pool window and no input sits at a ReLU/Clip corner (the nearest
corner is at least 1/size away, far beyond eps = 1e-6); denominators are kept away from 0.
Cases that torch can export are also checked against torch autograd at the end of the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from helpers import (assert_close, away_from_zero, check_rule, distinct_values,
                     explain, export, op_model, run_explainer, torch_function_gradient,
                     torch_gradient)

import rectonnx

TARGETS = [0, 2]  # two samples, two different classes of the 3-class random head


@dataclass(frozen=True)
class Case:
    id: str
    body: str
    x_shape: tuple
    weights: dict[str, tuple | Callable] = field(default_factory=dict)
    opset: int = 17
    x_fn: Callable | None = None
    method: str = "saliency"
    torch_y: Callable | None = None  # the op in torch, where onnx.reference gets it wrong

    def build(self, rng):
        inits = {}
        for name, spec in self.weights.items():
            value = np.asarray(spec(rng) if callable(spec) else rng.standard_normal(spec))
            inits[name] = value if value.dtype == np.int64 else value.astype(np.float32)
        model = op_model(self.body, self.x_shape, rng, initializers=inits, opset=self.opset)
        x = distinct_values((len(TARGETS), *self.x_shape), rng)
        if self.x_fn is not None:
            x = self.x_fn(x).astype(np.float32)
        return model, x


def ints(*values):
    return lambda rng: np.asarray(values, np.int64)


def const(value):
    return lambda rng: np.asarray(value, np.float32)


def positive(shape):
    return lambda rng: rng.uniform(0.5, 1.5, shape)


def run_case(case: Case, rng):
    model, x = case.build(rng)
    if case.torch_y is None:
        check_rule(model, x, TARGETS, rng, case.id, method=case.method)
        return
    logits, attribution = explain(model, x, TARGETS, case.method)
    expected_logits, expected = torch_function_gradient(case.torch_y, model, x, TARGETS)
    assert_close(logits, expected_logits, "forward logits vs torch", where=case.id)
    assert_close(attribution, expected, "gradient vs torch autograd", where=case.id)


# -- Conv ------------------------------------------------------------------------------------
CONV = [
    Case("stride1_pad1_bias", "y = Conv <pads = [1, 1, 1, 1]> (x, W, B)", (2, 6, 6),
         {"W": (3, 2, 3, 3), "B": (3,)}),
    Case("stride2_no_pads_output_padding", "y = Conv <strides = [2, 2]> (x, W)", (2, 8, 8),
         {"W": (3, 2, 3, 3)}),
    Case("stride2_pads_crop", "y = Conv <strides = [2, 2], pads = [1, 1, 1, 1]> (x, W)",
         (2, 7, 7), {"W": (3, 2, 3, 3)}),
    Case("stride3", "y = Conv <strides = [3, 3]> (x, W, B)", (2, 8, 8),
         {"W": (3, 2, 3, 3), "B": (3,)}),
    Case("stride3_pads", "y = Conv <strides = [3, 3], pads = [2, 1, 0, 2]> (x, W)", (2, 9, 8),
         {"W": (2, 2, 3, 3)}),
    Case("dilation2", "y = Conv <dilations = [2, 2], pads = [1, 2, 0, 1]> (x, W)", (2, 8, 8),
         {"W": (3, 2, 3, 3)}),
    Case("dilation2_stride2", "y = Conv <dilations = [2, 2], strides = [2, 2]> (x, W)",
         (2, 9, 10), {"W": (3, 2, 3, 3)}),
    Case("group2", "y = Conv <group = 2, pads = [1, 1, 1, 1]> (x, W, B)", (4, 5, 5),
         {"W": (6, 2, 3, 3), "B": (6,)}),
    Case("depthwise", "y = Conv <group = 3, pads = [1, 1, 1, 1], strides = [2, 2]> (x, W)",
         (3, 6, 6), {"W": (3, 1, 3, 3)}),
    Case("depthwise_multiplier2", "y = Conv <group = 3> (x, W)", (3, 5, 5),
         {"W": (6, 1, 3, 3)}),
    Case("asymmetric_pads", "y = Conv <pads = [0, 2, 1, 0], strides = [1, 2]> (x, W)",
         (2, 6, 7), {"W": (3, 2, 3, 3)}),
    Case("rectangular_kernel", "y = Conv <strides = [2, 1], dilations = [1, 2]> (x, W)",
         (2, 7, 8), {"W": (3, 2, 3, 2)}),
    Case("same_upper_even_kernel",
         'y = Conv <auto_pad = "SAME_UPPER", strides = [2, 2]> (x, W)', (2, 7, 7),
         {"W": (3, 2, 4, 4)}),
    Case("same_lower_even_kernel",
         'y = Conv <auto_pad = "SAME_LOWER", strides = [2, 2]> (x, W)', (2, 7, 7),
         {"W": (3, 2, 4, 4)}),
    Case("same_upper_stride1", 'y = Conv <auto_pad = "SAME_UPPER"> (x, W)', (2, 5, 5),
         {"W": (3, 2, 2, 2)}),
    Case("same_lower_stride1_rectangular",  # (onnxruntime rejects SAME with dilations)
         'y = Conv <auto_pad = "SAME_LOWER"> (x, W)', (2, 5, 6), {"W": (3, 2, 2, 3)}),
    Case("valid", 'y = Conv <auto_pad = "VALID", strides = [2, 2]> (x, W)', (2, 8, 7),
         {"W": (3, 2, 3, 3)}),
    Case("conv1d_stride2_pads", "y = Conv <strides = [2], pads = [1, 2]> (x, W, B)", (2, 9),
         {"W": (3, 2, 3), "B": (3,)}),
    Case("conv1d_same_lower", 'y = Conv <auto_pad = "SAME_LOWER", strides = [2]> (x, W)',
         (2, 8), {"W": (3, 2, 4)}),
    Case("kernel_shape_given", "y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, W)",
         (2, 5, 5), {"W": (2, 2, 3, 3)}),
    Case("conv_relu_conv", "h = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)\n r = Relu(h)\n"
         "y = Conv <strides = [2, 2]> (r, W2)", (2, 6, 6),
         {"W1": (3, 2, 3, 3), "B1": (3,), "W2": (2, 3, 3, 3)}),
    Case("conv_grad_input", "y = Conv <pads = [1, 0, 1, 0]> (x, W)", (2, 5, 5),
         {"W": (3, 2, 3, 3)}, method="grad_input"),
]


@pytest.mark.parametrize("case", CONV, ids=lambda c: c.id)
def test_conv(case, rng):
    run_case(case, rng)


# -- Gemm and MatMul -----------------------------------------------------------------------
GEMM = [
    Case("plain", "f = Flatten(x)\n y = Gemm(f, W, C)", (2, 3, 3), {"W": (18, 5), "C": (5,)}),
    Case("transB", "f = Flatten(x)\n y = Gemm <transB = 1> (f, W, C)", (2, 3, 3),
         {"W": (5, 18), "C": (1, 5)}),
    Case("alpha_beta", "f = Flatten(x)\n y = Gemm <alpha = 0.7, beta = 1.3> (f, W, C)",
         (2, 3, 3), {"W": (18, 5), "C": (5,)}),
    Case("no_bias", "f = Flatten(x)\n y = Gemm <alpha = -1.5> (f, W)", (2, 3, 3),
         {"W": (18, 5)}),
    Case("transA", "f = Flatten(x)\n ft = Transpose(f)\n y = Gemm <transA = 1> (ft, W, C)",
         (2, 3, 3), {"W": (18, 5), "C": (5,)}),
    Case("transA_transB_alpha",
         "f = Flatten(x)\n ft = Transpose(f)\n y = Gemm <transA = 1, transB = 1, alpha = 2.0>"
         " (ft, W)", (2, 3, 3), {"W": (5, 18)}),
    Case("B_active", "f = Flatten(x)\n ft = Transpose(f)\n g = Gemm <alpha = 0.5> (W, ft)\n"
         " y = Transpose(g)", (2, 3, 3), {"W": (5, 18)}),
    Case("B_active_transA_transB",
         "f = Flatten(x)\n g = Gemm <transA = 1, transB = 1> (W, f)\n y = Transpose(g)",
         (2, 3, 3), {"W": (18, 5)}),
    Case("C_active", "f = Flatten(x)\n c = MatMul(f, W2)\n y = Gemm <beta = 0.5> (f, W, c)",
         (2, 3, 3), {"W": (18, 5), "W2": (18, 5)}),
    Case("C_active_broadcast",
         "f = Flatten(x)\n c = MatMul(f, W2)\n y = Gemm <beta = -2.0, transB = 1> (f, W, c)",
         (2, 3, 3), {"W": (5, 18), "W2": (18, 1)}),
]


@pytest.mark.parametrize("case", GEMM, ids=lambda c: c.id)
def test_gemm(case, rng):
    run_case(case, rng)


MATMUL = [
    Case("constant_weight", "f = Flatten(x)\n y = MatMul(f, W)", (2, 3, 3), {"W": (18, 5)}),
    Case("batched_constant", "y = MatMul(x, W)", (2, 4, 3), {"W": (3, 5)}),
    Case("batched_constant_3d", "y = MatMul(x, W)", (2, 4, 3), {"W": (2, 3, 5)}),
    Case("constant_on_the_left", "y = MatMul(W, x)", (2, 4, 3), {"W": (5, 4)}),
    Case("two_activations", "t = Transpose <perm = [0, 1, 3, 2]> (x)\n y = MatMul(x, t)",
         (2, 4, 3)),
    Case("two_activations_broadcast", "b = Reshape(x, shape)\n y = MatMul(x, b)", (2, 4, 3),
         {"shape": ints(0, 1, 3, 8)}),
    Case("two_activations_2d_and_batched", "f = Flatten(x)\n a = MatMul(f, W)\n"
         " r = Reshape(a, shape)\n y = MatMul(r, x)", (2, 4, 3),
         {"W": (24, 40), "shape": ints(0, 2, 5, 4)}),
]


@pytest.mark.parametrize("case", MATMUL, ids=lambda c: c.id)
def test_matmul(case, rng):
    run_case(case, rng)


# -- elementwise arithmetic ----------------------------------------------------------------
ELEMENTWISE = [
    Case("add_constant_broadcast", "y = Add(x, c)", (3, 4, 4), {"c": (3, 1, 1)}),
    Case("add_constant_on_the_left_full_rank", "y = Add(c, x)", (3, 4, 4), {"c": (1, 3, 4, 4)}),
    Case("add_activation_broadcast_to_constant", "y = Add(x, c)", (1, 4, 4), {"c": (3, 4, 4)}),
    Case("sub_constant", "y = Sub(x, c)", (3, 4, 4), {"c": (4,)}),
    Case("sub_from_constant", "y = Sub(c, x)", (3, 4, 4), {"c": (3, 1, 4)}),
    Case("mul_constant_broadcast", "y = Mul(x, c)", (3, 4, 4), {"c": (1, 4)}),
    Case("mul_constant_on_the_left", "y = Mul(c, x)", (3, 4, 4), {"c": (3, 1, 1)}),
    Case("mul_activation_broadcast_to_constant", "y = Mul(x, c)", (1, 4, 4), {"c": (3, 1, 4)}),
    Case("mul_scalar", "y = Mul(x, c)", (3, 4, 4), {"c": const(-1.7)}),
    Case("div_by_constant", "y = Div(x, c)", (3, 4, 4), {"c": positive((3, 1, 1))}),
    Case("div_constant_by_activation", "y = Div(c, x)", (3, 4, 4), {"c": (1, 4)},
         x_fn=away_from_zero),
    Case("residual_add", "h = Conv <pads = [1, 1, 1, 1]> (x, W)\n r = Relu(h)\n y = Add(r, x)",
         (2, 5, 5), {"W": (2, 2, 3, 3)}),
    Case("add_two_activations_broadcast", "g = GlobalAveragePool(x)\n y = Add(x, g)",
         (3, 4, 4)),
    Case("sum_of_two", "a = Mul(x, c)\n b = Conv <pads = [1, 1, 1, 1]> (x, W)\n y = Sum(a, b)",
         (2, 4, 4), {"c": (2, 1, 1), "W": (2, 2, 3, 3)}),
    Case("sum_of_three", "a = Mul(x, c)\n b = Conv <pads = [1, 1, 1, 1]> (x, W)\n"
         " y = Sum(a, b, x)", (2, 4, 4), {"c": (2, 1, 1), "W": (2, 2, 3, 3)}),
    Case("sum_broadcast", "g = GlobalAveragePool(x)\n y = Sum(x, g, c)", (2, 4, 4),
         {"c": (1, 4)}),
    Case("sub_two_activations", "a = Conv <pads = [1, 1, 1, 1]> (x, W)\n y = Sub(a, x)",
         (2, 4, 4), {"W": (2, 2, 3, 3)}),
    Case("mul_two_activations", "a = Conv <pads = [1, 1, 1, 1]> (x, W)\n y = Mul(a, x)",
         (2, 4, 4), {"W": (2, 2, 3, 3)}),
    Case("mul_squeeze_excite_broadcast", "g = GlobalAveragePool(x)\n y = Mul(x, g)",
         (3, 4, 4)),
    Case("mul_same_tensor_twice", "y = Mul(x, x)", (2, 3, 3)),
    Case("div_two_activations", "s = Mul(x, x)\n d = Add(s, one)\n y = Div(x, d)", (2, 3, 3),
         {"one": const(1.0)}),
    Case("div_two_activations_broadcast",
         "s = Mul(x, x)\n g = GlobalAveragePool(s)\n d = Add(g, one)\n y = Div(x, d)",
         (2, 3, 3), {"one": const(0.5)}),
]


@pytest.mark.parametrize("case", ELEMENTWISE, ids=lambda c: c.id)
def test_elementwise(case, rng):
    run_case(case, rng)


# -- BatchNormalization (normalised away: folded into Conv or written as x * s + t) ---------
def bn_params(channels):
    return {"gamma": (channels,), "beta": (channels,), "mean": (channels,),
            "var": positive((channels,))}


BATCH_NORM = [
    Case("folded_into_conv", "h = Conv <pads = [1, 1, 1, 1]> (x, W, B)\n"
         " y = BatchNormalization <epsilon = 0.001> (h, gamma, beta, mean, var)", (2, 5, 5),
         {"W": (3, 2, 3, 3), "B": (3,), **bn_params(3)}),
    Case("folded_into_conv_without_bias", "h = Conv (x, W)\n"
         " y = BatchNormalization (h, gamma, beta, mean, var)", (2, 5, 5),
         {"W": (3, 2, 3, 3), **bn_params(3)}),
    Case("on_the_input", "y = BatchNormalization (x, gamma, beta, mean, var)", (3, 4, 4),
         bn_params(3)),
    Case("after_relu", "h = Conv (x, W)\n r = Relu(h)\n"
         " y = BatchNormalization (r, gamma, beta, mean, var)", (2, 5, 5),
         {"W": (3, 2, 3, 3), **bn_params(3)}),
    Case("after_conv_with_two_consumers", "h = Conv (x, W)\n"
         " b = BatchNormalization (h, gamma, beta, mean, var)\n y = Add(b, h)", (2, 5, 5),
         {"W": (3, 2, 3, 3), **bn_params(3)}),
    Case("after_gemm_2d", "f = Flatten(x)\n h = Gemm(f, W)\n"
         " y = BatchNormalization (h, gamma, beta, mean, var)", (2, 3, 3),
         {"W": (18, 4), **bn_params(4)}),
    # onnx.reference (onnx 1.23) mis-evaluates BatchNormalization-9: torch is the oracle here.
    Case("opset9", "h = Conv (x, W)\n"
         " y = BatchNormalization <epsilon = 0.01> (h, gamma, beta, mean, var)", (2, 4, 4),
         {"W": (3, 2, 3, 3), **bn_params(3)}, opset=9,
         torch_y=lambda x, w: F.batch_norm(F.conv2d(x, w["W"]), w["mean"], w["var"], w["gamma"],
                                           w["beta"], eps=0.01)),
    Case("opset9_standalone", "r = Relu(x)\n"
         " y = BatchNormalization <epsilon = 0.001> (r, gamma, beta, mean, var)", (3, 4, 4),
         bn_params(3), opset=9,
         torch_y=lambda x, w: F.batch_norm(F.relu(x), w["mean"], w["var"], w["gamma"],
                                           w["beta"], eps=0.001)),
]


@pytest.mark.parametrize("case", BATCH_NORM, ids=lambda c: c.id)
def test_batch_norm(case, rng):
    run_case(case, rng)


def test_batch_norm_leaves_the_explainer_graph(rng):
    """Both kinds of BatchNormalization are gone from the emitted graph (folded / affine)."""
    for case in BATCH_NORM[:5]:
        model, _ = case.build(rng)
        ops = {n.op_type for n in rectonnx.rewrite(model, "saliency").graph.node}
        assert "BatchNormalization" not in ops, case.id


# -- activations ------------------------------------------------------------------------------
def spread(scale):
    return lambda x: x * scale


ACTIVATIONS = [
    Case("relu", "y = Relu(x)", (2, 3, 3)),
    Case("relu_after_conv", "h = Conv <pads = [1, 1, 1, 1]> (x, W, B)\n y = Relu(h)", (2, 4, 4),
         {"W": (3, 2, 3, 3), "B": (3,)}),
    Case("leaky_relu", "y = LeakyRelu <alpha = 0.1> (x)", (2, 3, 3)),
    Case("leaky_relu_default_alpha", "y = LeakyRelu (x)", (2, 3, 3)),
    Case("leaky_relu_after_conv", "h = Conv (x, W)\n y = LeakyRelu <alpha = 0.3> (h)",
         (2, 4, 4), {"W": (3, 2, 3, 3)}),
    Case("relu6_inputs_opset17", "y = Clip(x, lo, hi)", (2, 3, 3),
         {"lo": const(0.0), "hi": const(6.0)}, x_fn=spread(9.0)),
    Case("clip_inputs_opset11", "y = Clip(x, lo, hi)", (2, 3, 3),
         {"lo": const(-0.4), "hi": const(0.5)}, opset=11),
    Case("clip_only_min_input", "y = Clip(x, lo)", (2, 3, 3), {"lo": const(-0.3)}),
    Case("clip_only_max_input", 'y = Clip(x, "", hi)', (2, 3, 3), {"hi": const(0.2)}),
    Case("clip_no_bounds", "y = Clip(x)", (2, 3, 3)),
    Case("relu6_attributes_opset6", "y = Clip <min = 0.0, max = 6.0> (x)", (2, 3, 3),
         x_fn=spread(9.0), opset=6),
    Case("clip_attributes_opset10", "y = Clip <min = -0.4, max = 0.5> (x)", (2, 3, 3),
         opset=10),
    Case("clip_only_min_attribute_opset10", "y = Clip <min = -0.3> (x)", (2, 3, 3), opset=10),
    Case("clip_only_max_attribute_opset6", "y = Clip <max = 0.2> (x)", (2, 3, 3), opset=6),
    Case("clip_bounds_from_constant_nodes",
         "lo = Constant <value = float {-0.2}> ()\n hi = Constant <value = float {0.3}> ()\n"
         " y = Clip(x, lo, hi)", (2, 3, 3)),
    Case("clip_after_conv", "h = Conv (x, W)\n y = Clip(h, lo, hi)", (2, 4, 4),
         {"W": (3, 2, 3, 3), "lo": const(-0.5), "hi": const(0.5)}),
]


@pytest.mark.parametrize("case", ACTIVATIONS, ids=lambda c: c.id)
def test_activation(case, rng):
    run_case(case, rng)


# -- pooling ----------------------------------------------------------------------------------
POOLS = [
    Case("maxpool_2x2", "y = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (x)", (2, 6, 6)),
    Case("maxpool_3x3_s2_overlapping",
         "y = MaxPool <kernel_shape = [3, 3], strides = [2, 2]> (x)", (2, 9, 9)),
    Case("maxpool_pads", "y = MaxPool <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x)",
         (2, 5, 5)),
    Case("maxpool_asymmetric_pads_strides",
         "y = MaxPool <kernel_shape = [3, 2], strides = [2, 1], pads = [0, 1, 1, 0]> (x)",
         (2, 6, 5)),
    Case("maxpool_ceil_mode",
         "y = MaxPool <kernel_shape = [2, 2], strides = [2, 2], ceil_mode = 1> (x)", (2, 7, 7)),
    Case("maxpool_ceil_mode_pads_overlapping",
         "y = MaxPool <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1],"
         " ceil_mode = 1> (x)", (2, 8, 8)),
    # the last ceil-mode window would start in the end padding: ONNX drops it (2 outputs, not 3)
    Case("maxpool_ceil_mode_window_starting_in_padding",
         "y = MaxPool <kernel_shape = [3, 3], strides = [3, 3], pads = [1, 1, 1, 1],"
         " ceil_mode = 1> (x)", (2, 5, 5)),
    Case("avgpool_ceil_mode_window_starting_in_padding",
         "y = AveragePool <kernel_shape = [3, 3], strides = [3, 3], pads = [1, 1, 1, 1],"
         " ceil_mode = 1, count_include_pad = 1> (x)", (2, 5, 5)),
    Case("maxpool_dilations", "y = MaxPool <kernel_shape = [2, 2], dilations = [2, 2]> (x)",
         (2, 7, 7)),
    Case("maxpool_dilations_strides_pads",
         "y = MaxPool <kernel_shape = [2, 2], dilations = [2, 2], strides = [2, 2],"
         " pads = [1, 0, 1, 1]> (x)", (2, 7, 8)),
    Case("maxpool_same_upper",
         'y = MaxPool <kernel_shape = [2, 2], strides = [2, 2], auto_pad = "SAME_UPPER"> (x)',
         (2, 7, 7)),
    # onnx.reference (onnx 1.23) pads SAME_LOWER max-pools at the end: torch is the oracle here.
    Case("maxpool_same_lower",
         'y = MaxPool <kernel_shape = [3, 3], strides = [2, 2], auto_pad = "SAME_LOWER"> (x)',
         (2, 6, 6), torch_y=lambda x, w: F.max_pool2d(F.pad(x, (1, 0, 1, 0), value=-np.inf),
                                                      3, 2)),
    Case("maxpool_1d", "y = MaxPool <kernel_shape = [3], strides = [2], pads = [1, 1]> (x)",
         (2, 9)),
    Case("maxpool_after_conv_relu", "h = Conv <pads = [1, 1, 1, 1]> (x, W, B)\n r = Relu(h)\n"
         " y = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r)", (2, 6, 6),
         {"W": (3, 2, 3, 3), "B": (3,)}),
    Case("maxpool_opset8", "y = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (x)",
         (2, 6, 6), opset=8),
    Case("avgpool_2x2", "y = AveragePool <kernel_shape = [2, 2], strides = [2, 2]> (x)",
         (2, 6, 6)),
    Case("avgpool_3x3_s2_overlapping",
         "y = AveragePool <kernel_shape = [3, 3], strides = [2, 2]> (x)", (2, 9, 9)),
    Case("avgpool_pads_exclude_pad",
         "y = AveragePool <kernel_shape = [3, 3], pads = [1, 1, 1, 1],"
         " count_include_pad = 0> (x)", (2, 5, 5)),
    Case("avgpool_pads_include_pad",
         "y = AveragePool <kernel_shape = [3, 3], pads = [1, 1, 1, 1],"
         " count_include_pad = 1> (x)", (2, 5, 5)),
    Case("avgpool_asymmetric_pads_include_pad",
         "y = AveragePool <kernel_shape = [3, 2], strides = [2, 1], pads = [2, 0, 0, 1],"
         " count_include_pad = 1> (x)", (2, 6, 5)),
    Case("avgpool_ceil_mode",
         "y = AveragePool <kernel_shape = [2, 2], strides = [2, 2], ceil_mode = 1> (x)",
         (2, 7, 7)),
    Case("avgpool_ceil_mode_pads_exclude_pad",
         "y = AveragePool <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1],"
         " ceil_mode = 1, count_include_pad = 0> (x)", (2, 8, 8)),
    Case("avgpool_ceil_mode_pads_include_pad",
         "y = AveragePool <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1],"
         " ceil_mode = 1, count_include_pad = 1> (x)", (2, 8, 8)),
    Case("avgpool_ceil_mode_asymmetric_pads_include_pad",
         "y = AveragePool <kernel_shape = [3, 2], strides = [2, 3], pads = [0, 1, 2, 0],"
         " ceil_mode = 1, count_include_pad = 1> (x)", (2, 8, 7)),
    Case("avgpool_ceil_mode_asymmetric_pads_exclude_pad",
         "y = AveragePool <kernel_shape = [3, 2], strides = [2, 3], pads = [0, 1, 2, 0],"
         " ceil_mode = 1, count_include_pad = 0> (x)", (2, 8, 7)),
    Case("maxpool_ceil_mode_asymmetric_pads",
         "y = MaxPool <kernel_shape = [3, 2], strides = [2, 3], pads = [0, 1, 2, 0],"
         " ceil_mode = 1> (x)", (2, 8, 7)),
    Case("avgpool_same_upper_include_pad",
         'y = AveragePool <kernel_shape = [2, 2], strides = [2, 2], auto_pad = "SAME_UPPER",'
         " count_include_pad = 1> (x)", (2, 7, 7)),
    Case("avgpool_same_lower_exclude_pad",
         'y = AveragePool <kernel_shape = [3, 3], strides = [2, 2], auto_pad = "SAME_LOWER">'
         " (x)", (2, 6, 6)),
    Case("avgpool_1d", "y = AveragePool <kernel_shape = [3], strides = [2], pads = [1, 1]> (x)",
         (2, 9)),
    Case("global_average_pool", "y = GlobalAveragePool(x)", (3, 4, 5)),
    Case("global_average_pool_1d", "y = GlobalAveragePool(x)", (3, 7)),
]


@pytest.mark.parametrize("case", POOLS, ids=lambda c: c.id)
def test_pool(case, rng):
    run_case(case, rng)


def windows_disjoint(node: onnx.NodeProto) -> bool:
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    kernel = attributes["kernel_shape"]
    strides = attributes.get("strides", [1] * len(kernel))
    return all(d == 1 for d in attributes.get("dilations", [1])) and \
        all(s >= k for s, k in zip(strides, kernel))


@pytest.mark.parametrize("case", [c for c in POOLS if "MaxPool" in c.body], ids=lambda c: c.id)
def test_max_pool_backward_for_onnxruntime_cpu(case, rng):
    """``runtime="onnxruntime-cpu"`` places the gradient of disjoint max-pool windows with
    MaxUnpool instead of a scatter-add: the same gradient to the bit (each input position gets at
    most one value), the portable graph's having been checked by ``test_pool``."""
    model, x = case.build(rng)
    portable = rectonnx.rewrite(model, "saliency")
    tuned = rectonnx.rewrite(model, "saliency", runtime="onnxruntime-cpu")
    pool = next(n for n in model.graph.node if n.op_type == "MaxPool")
    unpools = sum(n.op_type == "MaxUnpool" for n in tuned.graph.node)
    assert unpools == windows_disjoint(pool), case.id
    assert not any(n.op_type == "MaxUnpool" for n in portable.graph.node)
    for got, expected in zip(run_explainer(tuned, x, TARGETS),
                             run_explainer(portable, x, TARGETS)):
        np.testing.assert_array_equal(got, expected)


# -- shape ops --------------------------------------------------------------------------------
SHAPES = [
    Case("flatten_axis1", "y = Flatten <axis = 1> (x)", (2, 3, 4)),
    Case("flatten_axis3_then_reshape",
         "f = Flatten <axis = 3> (x)\n y = Reshape(f, shape)", (2, 3, 4),
         {"shape": ints(-1, 3, 4, 2)}),
    Case("reshape", "r = Reshape(x, shape)\n y = Relu(r)", (2, 3, 4), {"shape": ints(0, 4, -1)}),
    Case("transpose", "y = Transpose <perm = [0, 2, 3, 1]> (x)", (2, 3, 4)),
    Case("transpose_then_matmul", "t = Transpose <perm = [0, 3, 1, 2]> (x)\n y = MatMul(t, W)",
         (2, 3, 4), {"W": (3, 5)}),
    Case("unsqueeze_squeeze", "u = Unsqueeze(x, axes)\n c = Mul(u, s)\n y = Squeeze(c, axes)",
         (2, 3, 4), {"axes": ints(2), "s": (1, 1, 1, 3, 4)}),
    Case("unsqueeze_squeeze_attributes_opset11",
         "u = Unsqueeze <axes = [1, 4]> (x)\n c = Mul(u, s)\n y = Squeeze <axes = [4]> (c)",
         (2, 3, 4), {"s": (1, 1, 2, 3, 1, 4)}, opset=11),
    Case("concat_channels", "h = Conv <pads = [1, 1, 1, 1]> (x, W)\n"
         " y = Concat <axis = 1> (x, h)", (2, 4, 4), {"W": (3, 2, 3, 3)}),
    Case("concat_three_negative_axis", "r = Relu(x)\n m = Mul(x, c)\n"
         " y = Concat <axis = -3> (r, x, m)", (2, 4, 4), {"c": (2, 1, 1)}),
    Case("concat_spatial_axis", "r = Relu(x)\n y = Concat <axis = 2> (x, r)", (2, 3, 4)),
    Case("add_same_tensor_twice", "a = Add(x, x)\n y = Relu(a)", (2, 3, 3)),
    Case("concat_same_tensor_twice", "y = Concat <axis = 1> (x, x)", (2, 3, 4)),
    Case("pad_constant", "y = Pad(x, pads, value)", (2, 3, 4),
         {"pads": ints(0, 0, 1, 2, 0, 0, 2, 1), "value": const(0.5)}),
    # onnx.reference cannot evaluate negative pads (onnxruntime can): torch is the oracle here.
    Case("pad_negative", "y = Pad(x, pads)", (2, 5, 5), {"pads": ints(0, 0, -1, 2, 0, 0, 1, -2)},
         torch_y=lambda x, w: F.pad(x, (2, -2, -1, 1))),
    Case("pad_negative_and_value", "y = Pad(x, pads, v)", (2, 5, 5),
         {"pads": ints(0, 0, 1, -1, 0, 0, -2, 2), "v": const(0.7)},
         torch_y=lambda x, w: F.pad(x, (-1, 2, 1, -2), value=0.7)),
    Case("pad_channels_and_spatial", "y = Pad(x, pads)", (2, 3, 3),
         {"pads": ints(0, 1, 0, 1, 0, 0, 2, 0)}),
    Case("pad_dynamic_pads", "s = Shape(x)\n ss = Concat <axis = 0> (s, s)\n"
         " one = Div(ss, ss)\n pads = Mul(one, m)\n y = Pad(x, pads)", (2, 3, 3),
         {"m": ints(0, 0, 1, 0, 0, 0, 0, 2)}),
    Case("pad_opset18", "y = Pad(x, pads, v)", (2, 3, 3),
         {"pads": ints(0, 0, 1, 2, 0, 0, 2, 1), "v": const(-0.5)}, opset=18),
    Case("pad_opset21_mode_attribute", 'y = Pad <mode = "constant"> (x, pads)', (2, 3, 3),
         {"pads": ints(0, 1, 0, 1, 0, 0, 2, 0)}, opset=21),
    Case("pad_attributes_opset10", "y = Pad <pads = [0, 0, 1, 0, 0, 0, 0, 2], value = 1.0> (x)",
         (2, 3, 3), opset=10),
    Case("pad_then_conv_valid", "p = Pad(x, pads)\n y = Conv (p, W)", (2, 4, 4),
         {"pads": ints(0, 0, 1, 1, 0, 0, 1, 1), "W": (3, 2, 3, 3)}),
    Case("identity_and_dropout", "i = Identity(x)\n d = Dropout(i)\n y = Relu(d)", (2, 3, 3)),
    Case("dropout_with_ratio_opset12", "d, mask = Dropout(x, ratio)\n y = Identity(d)",
         (2, 3, 3), {"ratio": const(0.3)}, opset=12),
    Case("dropout_opset7", "d = Dropout <ratio = 0.2> (x)\n y = Relu(d)", (2, 3, 3), opset=7),
]


@pytest.mark.parametrize("case", SHAPES, ids=lambda c: c.id)
def test_shape_op(case, rng):
    run_case(case, rng)


ALL_CASES = CONV + GEMM + MATMUL + ELEMENTWISE + BATCH_NORM + ACTIVATIONS + POOLS + SHAPES


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.id)
def test_rules_more_seeds(case, seed):
    run_case(case, np.random.default_rng(seed))


# -- models from opsets newer than the target opset 17 (converted down) ------------------------
NEWER = "h = Conv <pads = [1, 1, 1, 1]> (x, W, B)\n r = Relu(h)\n" \
        " p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r)\n q = Pad(p, pads)\n" \
        " a = AveragePool <kernel_shape = [2, 2], strides = [1, 1]> (q)\n y = Reshape(a, shape)"


@pytest.mark.parametrize("opset", [18, 19, 20, 21, 22, 23])
def test_newer_opsets(opset, rng):
    run_case(Case(f"opset{opset}", NEWER, (2, 6, 6), {"W": (3, 2, 3, 3), "B": (3,),
                                                      "pads": ints(0, 0, 1, 0, 0, 0, 0, 1),
                                                      "shape": ints(0, -1)}, opset=opset), rng)


# -- torch autograd as a second oracle for what torch can export -----------------------------
Conv2d = torch.nn.Conv2d
class Wrap(torch.nn.Module):
    """``function(x)`` followed by a random dense head (so the cotangent is random)."""

    def __init__(self, function, in_shape, classes=3):
        super().__init__()
        self.function = function
        width = function(torch.zeros(1, *in_shape)).numel()
        self.head = torch.nn.Linear(width, classes)

    def forward(self, x):
        return self.head(torch.flatten(self.function(x), 1))


TORCH_CASES = {
    "conv_stride2": (lambda: Conv2d(2, 3, kernel_size=3, stride=2), (2, 8, 8)),
    "conv_stride3_pad1": (lambda: Conv2d(2, 3, kernel_size=3, stride=3, padding=1), (2, 8, 8)),
    "conv_dilation2": (lambda: Conv2d(2, 3, kernel_size=3, dilation=2, padding=2), (2, 7, 7)),
    "conv_group2": (lambda: Conv2d(4, 6, kernel_size=3, groups=2, padding=1), (4, 5, 5)),
    "conv_depthwise": (lambda: Conv2d(3, 3, kernel_size=3, groups=3, stride=2), (3, 7, 7)),
    "conv_same": (lambda: Conv2d(2, 3, kernel_size=4, padding="same"), (2, 6, 6)),
    "conv1d": (lambda: torch.nn.Conv1d(2, 3, kernel_size=3, stride=2, padding=1), (2, 9)),
    "maxpool_3x3_s2_ceil": (lambda: torch.nn.MaxPool2d(3, 2, padding=1, ceil_mode=True),
                            (2, 8, 8)),
    "maxpool_ceil_last_window_dropped": (lambda: torch.nn.MaxPool2d(3, 3, padding=1,
                                                                    ceil_mode=True), (2, 5, 5)),
    "avgpool_ceil_last_window_dropped": (lambda: torch.nn.AvgPool2d(3, 3, padding=1,
                                                                    ceil_mode=True), (2, 5, 5)),
    "maxpool_dilation": (lambda: torch.nn.MaxPool2d(2, 1, dilation=2), (2, 7, 7)),
    "avgpool_pad_include": (lambda: torch.nn.AvgPool2d(3, 2, padding=1), (2, 7, 7)),
    "avgpool_pad_exclude_ceil": (lambda: torch.nn.AvgPool2d(3, 2, padding=1, ceil_mode=True,
                                                            count_include_pad=False), (2, 8, 8)),
    "adaptive_avgpool": (lambda: torch.nn.AdaptiveAvgPool2d(1), (3, 4, 4)),
    "relu6": (lambda: torch.nn.ReLU6(), (2, 3, 3)),
    "leaky_relu": (lambda: torch.nn.LeakyReLU(0.2), (2, 3, 3)),
    "hardtanh": (lambda: torch.nn.Hardtanh(-0.3, 0.4), (2, 3, 3)),
    "batchnorm_standalone": (lambda: torch.nn.Sequential(torch.nn.ReLU(),
                                                          torch.nn.BatchNorm2d(2)), (2, 3, 3)),
    "zero_pad_then_flatten": (lambda: torch.nn.Sequential(torch.nn.ZeroPad2d((1, 0, 2, 1)),
                                                          torch.nn.Flatten(2)), (2, 3, 3)),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("name", sorted(TORCH_CASES))
def test_against_torch_autograd(name, rng):
    torch.manual_seed(0)
    factory, in_shape = TORCH_CASES[name]
    module = Wrap(factory(), in_shape).eval()
    for sub in module.modules():  # non-trivial BatchNorm statistics
        if isinstance(sub, torch.nn.BatchNorm2d):
            sub.running_mean.uniform_(-1, 1)
            sub.running_var.uniform_(0.5, 1.5)
            sub.weight.data.uniform_(0.5, 1.5)
            sub.bias.data.uniform_(-1, 1)
    x = distinct_values((2, *in_shape), rng, -1.5, 1.5) if "relu6" not in name else \
        distinct_values((2, *in_shape), rng, -9, 9)
    model = export(module, torch.from_numpy(x), opset=17)
    logits, attribution = explain(model, x, TARGETS, "saliency")
    expected_logits, expected = torch_gradient(module, x, TARGETS)
    assert_close(logits, expected_logits, "forward logits vs torch", where=name)
    assert_close(attribution, expected, "gradient vs torch autograd", where=name)
