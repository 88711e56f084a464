"""The rules added for model coverage (issue #3), attribute variant by attribute variant.

Same oracles and style as test_rules.py: each case is ``x -> op under test -> y -> Flatten ->
random dense head``; the float32 explainer (onnxruntime) is checked against central differences
in float64 on ``onnx.reference`` plus a dot-product check, or against torch autograd (float64) where
the case says ``torch_y`` (onnx.reference lacks the op or disagrees with onnxruntime), with max
relative error <= 1e-4. Modules exported by torch are checked against torch autograd at the end.

Kinks: inputs are the evenly spaced random ramp of ``helpers.distinct_values`` (no ties for
ReduceMax/GlobalMaxPool, nothing within 1/size of a HardSigmoid/HardSwish/ThresholdedRelu
corner); logs, square roots and powers get positive inputs.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from helpers import (Reference, assert_close, distinct_values, dot_product_check, explain,
                     export, fd_gradient,
                     make_model, op_model, parse, run_explainer, session, torch_gradient)
from test_rules import TARGETS, Case, Wrap, const, ints, positive, run_case

import rectonnx
from rectonnx.builder import GraphBuilder
from rectonnx.geometry import explicit_pads
from rectonnx.gates import exact_gradient
from rectonnx.normalize import normalize
from rectonnx.rules import RuleContext
from rectonnx.threshold import percentile_rank


def spread(scale, shift=0.0):
    return lambda x: x * scale + shift


def positive_inputs(x):
    return np.abs(x) + 0.5


SQRT2, HALF, ONE = const(math.sqrt(2.0)), const(0.5), const(1.0)

# -- activations (gated by the method; saliency is the exact gradient) -----------------------
ACTIVATIONS = [
    Case("sigmoid", "y = Sigmoid(x)", (2, 3, 3), x_fn=spread(4.0)),
    Case("tanh", "y = Tanh(x)", (2, 3, 3), x_fn=spread(3.0)),
    Case("softplus", "y = Softplus(x)", (2, 3, 3), x_fn=spread(4.0)),
    Case("softsign", "y = Softsign(x)", (2, 3, 3), x_fn=spread(3.0)),
    Case("elu", "y = Elu <alpha = 0.7> (x)", (2, 3, 3), x_fn=spread(3.0)),
    Case("elu_default", "y = Elu(x)", (2, 3, 3), x_fn=spread(3.0)),
    Case("selu", "y = Selu(x)", (2, 3, 3), x_fn=spread(3.0)),
    Case("celu", "y = Celu <alpha = 1.5> (x)", (2, 3, 3), x_fn=spread(3.0), opset=17),
    Case("thresholded_relu", "y = ThresholdedRelu <alpha = 0.3> (x)", (2, 3, 3)),
    Case("prelu_per_channel", "y = PRelu(x, slope)", (3, 3, 3), {"slope": (3, 1, 1)}),
    Case("prelu_scalar", "y = PRelu(x, slope)", (2, 3, 3), {"slope": const(0.25)}),
    Case("prelu_active_slope", "g = GlobalAveragePool(x)\n y = PRelu(x, g)", (2, 3, 3)),
    Case("hard_sigmoid", "y = HardSigmoid <alpha = 0.3, beta = 0.4> (x)", (2, 3, 3),
         x_fn=spread(4.0)),
    Case("hard_sigmoid_default", "y = HardSigmoid(x)", (2, 3, 3), x_fn=spread(5.0)),
    Case("hard_swish", "y = HardSwish(x)", (2, 3, 3), x_fn=spread(5.0)),
    Case("sigmoid_after_conv", "h = Conv <pads = [1, 1, 1, 1]> (x, W)\n y = Sigmoid(h)",
         (2, 4, 4), {"W": (3, 2, 3, 3)}),
    # squeeze-and-excitation: the Sigmoid is gated on its own, the Mul is exact
    Case("squeeze_excite", "g = ReduceMean <axes = [2, 3]> (x)\n f = Conv (g, W)\n"
         " s = Sigmoid(f)\n y = Mul(x, s)", (3, 3, 3), {"W": (3, 3, 1, 1)}),
]

# composite activations: the normaliser fuses each into ONE node (Gelu, Swish, Mish)
COMPOSITES = [
    Case("gelu_torch_form", "d = Div(x, s2)\n e = Erf(d)\n a = Add(e, one)\n m = Mul(x, a)\n"
         " y = Mul(m, half)", (2, 3, 3), {"s2": SQRT2, "one": ONE, "half": HALF},
         x_fn=spread(3.0)),
    Case("gelu_keras_form", "h = Mul(half, x)\n d = Mul(x, r2)\n e = Erf(d)\n a = Add(one, e)\n"
         " y = Mul(h, a)", (2, 3, 3), {"r2": const(1 / math.sqrt(2.0)), "one": ONE,
                                       "half": HALF}, x_fn=spread(3.0)),
    Case("gelu_tanh_form", "x2 = Mul(x, x)\n x3 = Mul(x2, x)\n k = Mul(x3, c)\n i = Add(x, k)\n"
         " u = Mul(i, s)\n t = Tanh(u)\n a = Add(t, one)\n h = Mul(x, half)\n y = Mul(h, a)",
         (2, 3, 3), {"c": const(0.044715), "s": const(math.sqrt(2 / math.pi)), "one": ONE,
                     "half": HALF}, x_fn=spread(3.0)),
    Case("gelu_tanh_pow_form", "x3 = Pow(x, three)\n k = Mul(c, x3)\n i = Add(k, x)\n"
         " u = Mul(s, i)\n t = Tanh(u)\n a = Add(one, t)\n m = Mul(a, x)\n y = Mul(half, m)",
         (2, 3, 3), {"three": const(3.0), "c": const(0.044715),
                     "s": const(math.sqrt(2 / math.pi)), "one": ONE, "half": HALF},
         x_fn=spread(3.0)),
    Case("gelu_opset20", "y = Gelu(x)", (2, 3, 3), x_fn=spread(3.0), opset=20),
    Case("gelu_tanh_opset20", 'y = Gelu <approximate = "tanh"> (x)', (2, 3, 3),
         x_fn=spread(3.0), opset=20),
    Case("gelu_after_matmul", "f = Flatten(x)\n z = MatMul(f, W)\n d = Div(z, s2)\n"
         " e = Erf(d)\n a = Add(e, one)\n m = Mul(z, a)\n y = Mul(m, half)", (2, 3, 3),
         {"W": (18, 7), "s2": SQRT2, "one": ONE, "half": HALF}),
    Case("silu", "s = Sigmoid(x)\n y = Mul(x, s)", (2, 3, 3), x_fn=spread(4.0)),
    Case("silu_other_order", "s = Sigmoid(x)\n y = Mul(s, x)", (2, 3, 3), x_fn=spread(4.0)),
    Case("quick_gelu", "a = Mul(x, k)\n s = Sigmoid(a)\n y = Mul(x, s)", (2, 3, 3),
         {"k": const(1.702)}, x_fn=spread(4.0)),
    Case("swish_opset24", "y = Swish <alpha = 0.8> (x)", (2, 3, 3), x_fn=spread(4.0),
         opset=24),
    Case("mish_form", "p = Softplus(x)\n t = Tanh(p)\n y = Mul(x, t)", (2, 3, 3),
         x_fn=spread(4.0)),
    Case("mish_opset18", "y = Mish(x)", (2, 3, 3), x_fn=spread(4.0), opset=18),
]
FUSED_AS = {"gelu_torch_form": "Gelu", "gelu_keras_form": "Gelu", "gelu_tanh_form": "Gelu",
            "gelu_tanh_pow_form": "Gelu", "gelu_opset20": "Gelu", "gelu_tanh_opset20": "Gelu",
            "gelu_after_matmul": "Gelu", "silu": "Swish", "silu_other_order": "Swish",
            "quick_gelu": "Swish", "swish_opset24": "Swish", "mish_form": "Mish",
            "mish_opset18": "Mish"}

# not composites: an inner tensor is used twice, or the formula is something else
NOT_FUSED = [
    Case("gelu_inner_tensor_reused", "d = Div(x, s2)\n e = Erf(d)\n a = Add(e, one)\n"
         " m = Mul(x, a)\n g = Mul(m, half)\n y = Add(g, e)", (2, 3, 3),
         {"s2": SQRT2, "one": ONE, "half": HALF}, x_fn=spread(3.0)),
    Case("sigmoid_times_other_tensor", "s = Sigmoid(x)\n r = Relu(x)\n y = Mul(r, s)",
         (2, 3, 3), x_fn=spread(4.0)),
    Case("erf_alone", "e = Erf(x)\n y = Mul(e, x)", (2, 3, 3), x_fn=spread(2.0)),
]


@pytest.mark.parametrize("case", ACTIVATIONS + COMPOSITES + NOT_FUSED, ids=lambda c: c.id)
def test_activation(case, rng):
    run_case(case, rng)


@pytest.mark.parametrize("case", COMPOSITES + NOT_FUSED, ids=lambda c: c.id)
def test_composites_reach_the_walker_as_one_node(case, rng):
    model, _ = case.build(rng)
    ops = [n.op_type for n in normalize(model).path_nodes]
    if case.id in FUSED_AS:
        assert FUSED_AS[case.id] in ops and not {"Erf", "Tanh", "Sigmoid"} & set(ops), ops
        # the forward graph keeps the exporter's own nodes (only opset-17 ops)
        explainer = rectonnx.rewrite(model, "saliency")
        assert not {"Gelu", "Swish", "Mish"} & {n.op_type for n in explainer.graph.node}
    else:
        assert not {"Gelu", "Swish", "Mish"} & set(ops), ops


# -- methods at the new activations: a literal numpy oracle ----------------------------------
def _gelu(z):
    erf = np.vectorize(math.erf)
    return 0.5 * z * (1 + erf(z / math.sqrt(2))), \
        0.5 * (1 + erf(z / math.sqrt(2))) + z * np.exp(-z * z / 2) / math.sqrt(2 * math.pi)


def _sigmoid(z):
    s = 1 / (1 + np.exp(-z))
    return s, s * (1 - s)


def _hard_swish(z):
    inner = np.clip(z / 6 + 0.5, 0, 1)
    slope = np.where(z < -3, 0.0, np.where(z > 3, 1.0, z / 3 + 0.5))
    return z * inner, slope


LITERAL = {
    "gelu": ("d = Div(h, s2)\n e = Erf(d)\n a = Add(e, one)\n m = Mul(h, a)\n y = Mul(m, half)",
             _gelu),
    "sigmoid": ("y = Sigmoid(h)", _sigmoid),
    "hard_swish": ("y = HardSwish(h)", _hard_swish),
}


@pytest.mark.parametrize("method,options", [("saliency", {}), ("deconvnet", {}),
                                            ("guided_backprop", {}),
                                            ("rectgrad", {"tau": 0.01}),
                                            ("rectgrad", {"q": 60.0})])
@pytest.mark.parametrize("activation", sorted(LITERAL))
def test_methods_at_new_activations_against_literal_numpy(activation, method, options):
    """``x -> Gemm -> f -> Gemm``: the table of docs/maths.md, 'Activations other than ReLU', at
    one non-ReLU activation, in numpy."""
    rng = np.random.default_rng(3)
    body, f = LITERAL[activation]
    w1 = rng.standard_normal((6, 9)).astype(np.float32)
    w2 = rng.standard_normal((9, 4)).astype(np.float32)
    text = ('<ir_version: 8, opset_import: ["" : 17]>\n'
            "mlp (float[N,6] x) => (float[N,4] logits) {\n h = MatMul(x, w1)\n"
            f" {body}\n logits = MatMul(y, w2)\n}}")
    model = parse(text, {"w1": w1, "w2": w2, "s2": np.float32(math.sqrt(2)),
                         "one": np.float32(1), "half": np.float32(0.5)})
    x = distinct_values((3, 6), rng, -2, 2)
    target = np.array([0, 3, -1])
    logits, attribution = explain(model, x, target, method, **options)
    xd = x.astype(np.float64)
    z = xd @ w1
    y, slope = f(z)
    chosen = np.where(target < 0, (y @ w2).argmax(1), target)
    upstream = w2[:, chosen].T.astype(np.float64)  # R at y
    if method == "saliency":
        r_z = slope * upstream
    elif method == "deconvnet":
        r_z = np.maximum(upstream, 0)
    elif method == "guided_backprop":
        r_z = np.maximum(slope * upstream, 0)
    else:
        scores = y * upstream
        if "tau" in options:
            tau = np.full((len(x), 1), options["tau"])
        else:
            k = percentile_rank(scores.shape[1], options["q"])
            tau = -np.sort(-scores, axis=1)[:, k - 1:k]
        r_z = np.where(scores > tau, slope * upstream, 0.0)
    grad = r_z @ w1.T
    expected = np.maximum(xd * grad, 0) if method == "rectgrad" else grad
    assert_close(attribution, expected, "methods vs literal numpy",
                 where=f"{activation}/{method}")


# -- elementwise maths (exact) ------------------------------------------------------------
ELEMENTWISE = [
    Case("neg", "y = Neg(x)", (2, 3, 3)),
    Case("exp", "y = Exp(x)", (2, 3, 3)),
    Case("log", "y = Log(x)", (2, 3, 3), x_fn=positive_inputs),
    Case("sqrt", "y = Sqrt(x)", (2, 3, 3), x_fn=positive_inputs),
    Case("reciprocal", "y = Reciprocal(x)", (2, 3, 3), x_fn=positive_inputs),
    Case("abs", "y = Abs(x)", (2, 3, 3)),
    Case("erf", "y = Erf(x)", (2, 3, 3), x_fn=spread(2.0)),
    Case("pow_square", "y = Pow(x, e)", (2, 3, 3), {"e": const(2.0)}),
    Case("pow_cube_int_exponent", "y = Pow(x, e)", (2, 3, 3), {"e": ints(3)}),
    Case("pow_half", "y = Pow(x, e)", (2, 3, 3), {"e": const(0.5)}, x_fn=positive_inputs),
    Case("pow_exponent_vector", "y = Pow(x, e)", (2, 3, 3), {"e": positive((3,))},
         x_fn=positive_inputs),
    Case("pow_active_exponent", "y = Pow(b, x)", (2, 3, 3), {"b": positive((3,))}),
    Case("pow_both_active", "p = Abs(x)\n a = Add(p, one)\n y = Pow(a, x)", (2, 3, 3),
         {"one": ONE}),
    Case("cast_float_double_float", "d = Cast <to = 11> (x)\n s = Mul(d, d)\n"
         " y = Cast <to = 1> (s)", (2, 3, 3)),
    Case("cast_float_to_float", "y = Cast <to = 1> (x)", (2, 3, 3)),
    Case("castlike", "y = CastLike(x, c)", (2, 3, 3), {"c": const(0.0)}),
    Case("where_constant_condition", "c = Greater(r, h)\n y = Where(c, x, v)", (2, 3, 3),
         {"r": (3, 3), "h": const(0.0), "v": const(0.3)}),
    Case("where_both_active", "r = Relu(x)\n c = Greater(x, zero)\n y = Where(c, r, x)",
         (2, 3, 3), {"zero": const(0.1)}),
    # the decomposed LayerNorm exporters write (ReduceMean/Sub/Pow/Add/Sqrt/Div)
    Case("layer_norm_decomposed", "m = ReduceMean <axes = [-1]> (x)\n c = Sub(x, m)\n"
         " p = Pow(c, two)\n v = ReduceMean <axes = [-1]> (p)\n e = Add(v, eps)\n"
         " s = Sqrt(e)\n n = Div(c, s)\n g = Mul(n, gamma)\n y = Add(g, beta)", (3, 5),
         {"two": const(2.0), "eps": const(1e-5), "gamma": (5,), "beta": (5,)}),
]


@pytest.mark.parametrize("case", ELEMENTWISE, ids=lambda c: c.id)
def test_elementwise(case, rng):
    run_case(case, rng)


# -- normalisations ------------------------------------------------------------------------
def torch_lrn(size, alpha, beta, bias):
    return lambda x, w: F.local_response_norm(x, size, alpha, beta, bias)


NORMALIZATION = [
    Case("lrn_size5", "y = LRN <size = 5, alpha = 0.5, beta = 0.75, bias = 1.0> (x)",
         (7, 3, 3)),
    Case("lrn_size3_bias2", "y = LRN <size = 3, alpha = 0.3, beta = 0.6, bias = 2.0> (x)",
         (4, 3, 2)),
    Case("lrn_size1", "y = LRN <size = 1, alpha = 0.6> (x)", (3, 2, 2)),
    Case("lrn_after_relu", "r = Relu(x)\n y = LRN <size = 5, alpha = 0.5> (r)", (6, 3, 3)),
    Case("lrn_torch_size5", "y = LRN <size = 5, alpha = 0.5, beta = 0.75, bias = 1.0> (x)",
         (7, 3, 3), torch_y=torch_lrn(5, 0.5, 0.75, 1.0)),
    Case("lrn_torch_size3", "y = LRN <size = 3, alpha = 0.3, beta = 0.6, bias = 2.0> (x)",
         (4, 3, 2), torch_y=torch_lrn(3, 0.3, 0.6, 2.0)),
    Case("softmax_last_axis", "y = Softmax(x)", (2, 3, 4), x_fn=spread(2.0)),
    Case("softmax_axis1", "y = Softmax <axis = 1> (x)", (3, 2, 2), x_fn=spread(2.0)),
    # onnx.reference ignores opset 11's flatten-to-2D rule (onnxruntime does not): torch here
    Case("softmax_opset11_coerced", "y = Softmax <axis = 1> (x)", (3, 2, 2), opset=11,
         torch_y=lambda x, w: torch.softmax(x.flatten(1), 1).reshape(x.shape)),
    Case("log_softmax", "y = LogSoftmax <axis = -1> (x)", (2, 3, 4), x_fn=spread(2.0)),
    Case("layer_norm_last_axis", "y = LayerNormalization <epsilon = 1e-5> (x, g, b)", (3, 5),
         {"g": (5,), "b": (5,)}),
    Case("layer_norm_axis1_no_bias", "y = LayerNormalization <axis = 1> (x, g)", (2, 3, 3),
         {"g": (2, 3, 3)}),
    Case("layer_norm_axis_minus2", "y = LayerNormalization <axis = -2, epsilon = 0.1> (x, g, b)",
         (2, 3, 4), {"g": (3, 4), "b": (4,)}),
    Case("attention", "q = MatMul(x, Wq)\n k = MatMul(x, Wk)\n v = MatMul(x, Wv)\n"
         " t = Transpose <perm = [0, 2, 1]> (k)\n s = MatMul(q, t)\n c = Div(s, d)\n"
         " a = Softmax(c)\n y = MatMul(a, v)", (4, 3),
         {"Wq": (3, 3), "Wk": (3, 3), "Wv": (3, 3), "d": const(math.sqrt(3.0))}),
]


@pytest.mark.parametrize("case", NORMALIZATION, ids=lambda c: c.id)
def test_normalization(case, rng):
    run_case(case, rng)


# -- reductions -------------------------------------------------------------------------------
REDUCE = [
    Case("reduce_mean_spatial_keepdims", "y = ReduceMean <axes = [2, 3]> (x)", (3, 3, 4)),
    Case("reduce_mean_no_keepdims", "y = ReduceMean <axes = [1], keepdims = 0> (x)", (3, 3, 4)),
    Case("reduce_mean_negative_axis", "y = ReduceMean <axes = [-1], keepdims = 0> (x)",
         (3, 3, 4)),
    Case("reduce_mean_all_but_batch", "m = ReduceMean <axes = [1, 2, 3]> (x)\n y = Mul(x, m)",
         (2, 3, 3)),
    Case("reduce_mean_opset18_axes_input", "y = ReduceMean(x, axes)", (3, 3, 4),
         {"axes": ints(2, 3)}, opset=18),
    Case("reduce_sum_axes_input", "y = ReduceSum <keepdims = 0> (x, axes)", (3, 3, 4),
         {"axes": ints(1)}),
    Case("reduce_sum_all_but_batch", "s = ReduceSum(x, ax)\n y = Mul(x, s)", (2, 3, 3),
         {"ax": ints(-1, 1, 2)}),
    Case("reduce_sum_noop", "y = ReduceSum <noop_with_empty_axes = 1> (x)", (2, 3, 3)),
    Case("reduce_max_spatial", "y = ReduceMax <axes = [2, 3]> (x)", (3, 3, 4)),
    Case("reduce_min_no_keepdims", "y = ReduceMin <axes = [1], keepdims = 0> (x)", (3, 3, 4)),
    Case("global_max_pool", "y = GlobalMaxPool(x)", (3, 4, 5)),
    # onnx.reference's GlobalMaxPool drops the spatial axis of 1-D inputs: torch here
    Case("global_max_pool_1d", "y = GlobalMaxPool(x)", (3, 7),
         torch_y=lambda x, w: x.amax(2, keepdim=True)),
]


@pytest.mark.parametrize("case", REDUCE, ids=lambda c: c.id)
def test_reduce(case, rng):
    run_case(case, rng)


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum", "ReduceMax"])
def test_reduce_over_all_axes_one_sample(op, rng):
    """No axes: the reduction takes the batch axis too, so one sample is checked alone, by the
    dot-product check (the full central differences batch their perturbed copies)."""
    model = op_model(f"m = {op}(x)\n y = Mul(x, m)", (2, 3, 3), rng)
    x = distinct_values((1, 2, 3, 3), rng)
    _, attribution = explain(model, x, [1])
    lhs, rhs = dot_product_check(Reference(model), x, [1], attribution, rng)
    assert_close(lhs, rhs, "dot-product check", where=f"{op}/all axes")


# -- Resize --------------------------------------------------------------------------------------
def scales(*values):
    return lambda rng: np.asarray(values, np.float32)


def with_sizes(resize: str) -> str:
    """``resize`` reading ``sz`` = the input's N, C and the constant ``hw``."""
    return ("sh = Shape(x)\n nc = Slice(sh, z0, z2)\n sz = Concat <axis = 0> (nc, hw)\n"
            + resize)


SIZES = {"z0": ints(0), "z2": ints(2)}


def interpolate(**kwargs):
    return lambda x, w: F.interpolate(x, **kwargs)


RESIZE = [
    Case("nearest_x2", 'y = Resize <mode = "nearest"> (x, "", s)', (2, 3, 4),
         {"s": scales(1, 1, 2, 2)}),
    Case("nearest_asymmetric_floor_x3", 'y = Resize <mode = "nearest", '
         'coordinate_transformation_mode = "asymmetric", nearest_mode = "floor"> (x, "", s)',
         (2, 3, 2), {"s": scales(1, 1, 3, 3)}),
    Case("nearest_fractional", 'y = Resize <mode = "nearest"> (x, "", s)', (2, 4, 5),
         {"s": scales(1, 1, 1.5, 0.6)}),
    Case("nearest_round_prefer_ceil_sizes", with_sizes('y = Resize <mode = "nearest", '
         'nearest_mode = "round_prefer_ceil"> (x, "", "", sz)'), (2, 3, 4),
         {**SIZES, "hw": ints(7, 6)}),
    Case("linear_half_pixel_x2", 'y = Resize <mode = "linear"> (x, "", s)', (2, 3, 4),
         {"s": scales(1, 1, 2, 2)}),
    Case("linear_downsample", 'y = Resize <mode = "linear"> (x, "", s)', (2, 6, 7),
         {"s": scales(1, 1, 0.5, 0.6)}),
    Case("linear_align_corners_sizes", with_sizes('y = Resize <mode = "linear", '
         'coordinate_transformation_mode = "align_corners"> (x, "", "", sz)'), (2, 3, 4),
         {**SIZES, "hw": ints(7, 9)}),
    Case("linear_asymmetric", 'y = Resize <mode = "linear", '
         'coordinate_transformation_mode = "asymmetric"> (x, "", s)', (2, 3, 4),
         {"s": scales(1, 1, 2.5, 1.5)}),
    Case("linear_pytorch_half_pixel", with_sizes('y = Resize <mode = "linear", '
         'coordinate_transformation_mode = "pytorch_half_pixel"> (x, "", "", sz)'), (2, 3, 4),
         {**SIZES, "hw": ints(1, 6)}),
    Case("linear_one_axis", 'y = Resize <mode = "linear"> (x, "", s)', (2, 3, 4),
         {"s": scales(1, 1, 1, 2)}),
    Case("linear_1d", 'y = Resize <mode = "linear"> (x, "", s)', (2, 5), {"s": scales(1, 1, 2)}),
    Case("cubic", 'y = Resize <mode = "cubic"> (x, "", s)', (2, 4, 4),
         {"s": scales(1, 1, 2, 1.5)}),
    Case("cubic_exclude_outside_a05", 'y = Resize <mode = "cubic", exclude_outside = 1, '
         'cubic_coeff_a = -0.5> (x, "", s)', (2, 4, 4), {"s": scales(1, 1, 2, 2)}),
    Case("torch_nearest_x2", 'y = Resize <mode = "nearest", coordinate_transformation_mode = '
         '"asymmetric", nearest_mode = "floor"> (x, "", s)', (2, 3, 4),
         {"s": scales(1, 1, 2, 2)},
         torch_y=interpolate(scale_factor=2, mode="nearest")),
    Case("torch_bilinear", 'y = Resize <mode = "linear"> (x, "", s)', (2, 3, 4),
         {"s": scales(1, 1, 2, 2)},
         torch_y=interpolate(scale_factor=2, mode="bilinear", align_corners=False)),
    Case("torch_bilinear_align_corners", with_sizes('y = Resize <mode = "linear", '
         'coordinate_transformation_mode = "align_corners"> (x, "", "", sz)'), (2, 3, 4),
         {**SIZES, "hw": ints(7, 9)},
         torch_y=interpolate(size=(7, 9), mode="bilinear", align_corners=True)),
    Case("torch_bilinear_downsample", with_sizes('y = Resize <mode = "linear"> (x, "", "", sz)'),
         (2, 8, 6), {**SIZES, "hw": ints(4, 3)},
         torch_y=interpolate(size=(4, 3), mode="bilinear", align_corners=False)),
    Case("upsample_opset9_nearest", 'y = Upsample <mode = "nearest"> (x, s)', (2, 3, 4),
         {"s": scales(1, 1, 2, 3)}, opset=9),
]


@pytest.mark.parametrize("case", RESIZE, ids=lambda c: c.id)
def test_resize(case, rng):
    run_case(case, rng)


@pytest.mark.parametrize("mode,factors", [("linear", (1, 1, 2, 3)), ("linear", (1, 1, 1.7, 2.5)),
                                          ("nearest", (1, 1, 2, 2)),
                                          ("nearest", (1, 1, 1.5, 2.5))])
@pytest.mark.parametrize("opset", [9, 10])
def test_legacy_upsample_keeps_its_coordinates(opset, mode, factors, rng):
    """Upsample-9 / Resize-10 compute ``x_out / scale``; onnx's converter forgets it. The
    explainer's logits equal the source model's (onnxruntime runs it at its own opset), and its
    attribution equals the explainer of the same resize written at opset 17."""
    op = "Upsample" if opset == 9 else "Resize"
    body = f'y = {op} <mode = "{mode}"> (x, s)'
    model = op_model(body, (2, 3, 4), rng, initializers={"s": np.float32(factors)}, opset=opset)
    x = distinct_values((2, 2, 3, 4), rng)
    logits, attribution = explain(model, x, TARGETS)
    source = session(model).run(None, {"x": x})[0]
    assert_close(logits, source, "forward logits vs onnxruntime", where=f"{op}{opset}/{mode}")
    modern = onnx.ModelProto()
    modern.CopyFrom(model)
    del modern.opset_import[:]
    modern.opset_import.append(helper.make_opsetid("", 17))
    node = next(n for n in modern.graph.node if n.op_type == op)
    node.op_type = "Resize"
    node.input[:] = ["x", "", "s"]
    node.attribute.append(helper.make_attribute("coordinate_transformation_mode", "asymmetric"))
    node.attribute.append(helper.make_attribute("nearest_mode", "floor"))
    _, expected = explain(modern, x, TARGETS)
    assert_close(attribution, expected, "gradient vs opset-17 twin", where=f"{op}{opset}/{mode}")


# -- slicing, splitting, repeating ---------------------------------------------------------
SLICING = [
    Case("slice_spatial", "y = Slice(x, st, en, ax)", (2, 5, 6),
         {"st": ints(1, 2), "en": ints(4, -1), "ax": ints(2, 3)}),
    Case("slice_no_axes_clamped", "y = Slice(x, st, en)", (3, 4, 4),
         {"st": ints(0, 0, 1, -3), "en": ints(2 ** 62, 9, 3, 1000)}),
    Case("slice_steps", "y = Slice(x, st, en, ax, sp)", (2, 7, 6),
         {"st": ints(1, 0), "en": ints(7, 5), "ax": ints(2, 3), "sp": ints(2, 3)}),
    Case("slice_negative_step", "y = Slice(x, st, en, ax, sp)", (2, 5, 6),
         {"st": ints(-1, 4), "en": ints(-100, 0), "ax": ints(2, -1), "sp": ints(-1, -2)}),
    Case("slice_channels", "y = Slice(x, st, en, ax)", (4, 3, 3),
         {"st": ints(1), "en": ints(3), "ax": ints(1)}),
    Case("slice_opset9_attributes", "y = Slice <starts = [1], ends = [3], axes = [2]> (x)",
         (2, 4, 4), opset=9),
    Case("slice_twice_overlapping", "a = Slice(x, s1, e1, ax)\n b = Slice(x, s2, e2, ax)\n"
         " y = Mul(a, b)", (2, 5, 5),
         {"s1": ints(0), "e1": ints(3), "s2": ints(2), "e2": ints(5), "ax": ints(3)}),
    Case("split_equal", "a, b = Split <axis = 1> (x)\n y = Mul(a, b)", (4, 3, 3)),
    Case("split_sizes_input", "a, b, c = Split <axis = 3> (x, sp)\n m = Mul(a, c)\n"
         " y = Concat <axis = 3> (m, b)", (2, 3, 6), {"sp": ints(2, 3, 1)}),
    Case("split_unused_output", "a, b = Split <axis = 2> (x, sp)\n y = Relu(b)", (2, 5, 3),
         {"sp": ints(2, 3)}),
    Case("split_opset11_attribute", "a, b = Split <axis = 1, split = [1, 3]> (x)\n"
         " y = Concat <axis = 1> (b, a)", (4, 2, 2), opset=11),
    Case("split_opset18_num_outputs", "a, b = Split <axis = 1, num_outputs = 2> (x)\n"
         " y = Mul(a, b)", (4, 3, 3), opset=18),
    Case("expand_channels", "g = GlobalAveragePool(x)\n e = Expand(g, sh)\n y = Mul(e, x)",
         (3, 4, 4), {"sh": ints(1, 3, 4, 4)}),
    Case("expand_rank_up", "u = Unsqueeze(x, ax)\n y = Expand(u, sh)", (3, 4),
         {"ax": ints(1), "sh": ints(1, 2, 3, 4)}),
    Case("tile", "y = Tile(x, r)", (2, 3, 2), {"r": ints(1, 2, 1, 3)}),
    Case("tile_channels_and_width", "y = Tile(x, r)", (2, 2, 2), {"r": ints(1, 3, 1, 2)}),
    Case("gather_scalar_index", "y = Gather <axis = 1> (x, i)", (4, 3, 3),
         {"i": lambda rng: np.asarray(2, np.int64)}),
    Case("gather_repeated_indices", "y = Gather <axis = 2> (x, i)", (2, 4, 3),
         {"i": ints(3, 0, 3, 1)}),
    Case("gather_negative_2d_indices", "y = Gather <axis = -1> (x, i)", (2, 3, 4),
         {"i": lambda rng: np.asarray([[-1, 0], [2, -1]], np.int64)}),
]


@pytest.mark.parametrize("case", SLICING, ids=lambda c: c.id)
def test_slicing(case, rng):
    run_case(case, rng)


# -- ConvTranspose inside the model --------------------------------------------------------
CONV_TRANSPOSE = [
    Case("stride2_pads_output_padding", "y = ConvTranspose <strides = [2, 2], pads = [1, 1, 1, 1],"
         " output_padding = [1, 1]> (x, W, B)", (3, 4, 4), {"W": (3, 2, 3, 3), "B": (2,)}),
    Case("stride1", "y = ConvTranspose (x, W)", (3, 3, 4), {"W": (3, 2, 2, 2)}),
    # onnx.reference's ConvTranspose fails on groups and on output_shape: torch here
    Case("group2_dilation2", "y = ConvTranspose <group = 2, dilations = [2, 2],"
         " pads = [1, 0, 2, 1]> (x, W)", (4, 4, 4), {"W": (4, 3, 3, 3)},
         torch_y=lambda x, w: F.conv_transpose2d(x, w["W"], groups=2,
                                                 dilation=2)[:, :, 1:-2, 0:-1]),
    Case("stride3_asymmetric_pads", "y = ConvTranspose <strides = [3, 2], pads = [0, 2, 2, 0],"
         " output_padding = [2, 0]> (x, W)", (2, 3, 3), {"W": (2, 2, 3, 3)}),
    Case("output_shape", "y = ConvTranspose <strides = [2, 2], output_shape = [8, 9]> (x, W)",
         (2, 4, 4), {"W": (2, 3, 3, 3)},
         torch_y=lambda x, w: F.conv_transpose2d(x, w["W"], stride=2)[:, :, 1:, :]),
    Case("same_upper", 'y = ConvTranspose <strides = [2, 2], auto_pad = "SAME_UPPER"> (x, W)',
         (2, 3, 3), {"W": (2, 3, 4, 4)}),
    Case("same_lower", 'y = ConvTranspose <strides = [2, 2], auto_pad = "SAME_LOWER"> (x, W)',
         (2, 3, 3), {"W": (2, 3, 3, 3)}),
    Case("kernel_shape_1d", "y = ConvTranspose <kernel_shape = [3], strides = [2],"
         " pads = [1, 0]> (x, W)", (2, 5), {"W": (2, 3, 3)}),
    Case("conv_then_conv_transpose", "h = Conv <strides = [2, 2], pads = [1, 1, 1, 1]> (x, W1)\n"
         " r = Relu(h)\n y = ConvTranspose <strides = [2, 2], pads = [1, 1, 1, 1],"
         " output_padding = [1, 1]> (r, W2)", (2, 6, 6), {"W1": (3, 2, 3, 3),
                                                            "W2": (3, 2, 3, 3)}),
    Case("torch_stride2", "y = ConvTranspose <strides = [2, 2], pads = [1, 1, 1, 1],"
         " output_padding = [1, 1]> (x, W, B)", (3, 4, 4), {"W": (3, 2, 3, 3), "B": (2,)},
         torch_y=lambda x, w: F.conv_transpose2d(x, w["W"], w["B"], stride=2, padding=1,
                                                 output_padding=1)),
]


@pytest.mark.parametrize("case", CONV_TRANSPOSE, ids=lambda c: c.id)
def test_conv_transpose(case, rng):
    run_case(case, rng)


# -- Einsum that is a matrix product -------------------------------------------------------
EINSUM = [
    Case("batched_matmul", 'y = Einsum <equation = "bij,bjk->bik"> (x, x)', (3, 3)),
    Case("transposed_right", 'y = Einsum <equation = "bij,bkj->bik"> (x, x)', (3, 4)),
    Case("heads", 'y = Einsum <equation = "bhqd,bhkd->bhqk"> (x, x)', (2, 3, 4)),
    Case("output_transposed", 'y = Einsum <equation = "bhqd,bhkd->bkhq"> (x, x)', (2, 3, 4)),
    Case("constant_right", 'y = Einsum <equation = "bij,jk->bik"> (x, W)', (3, 4),
         {"W": (4, 5)}),
    Case("constant_left_no_batch", 'y = Einsum <equation = "ij,bjk->bik"> (W, x)', (3, 4),
         {"W": (5, 3)}),
    Case("ellipsis", 'y = Einsum <equation = "...ij,...kj->...ik"> (x, x)', (2, 3, 4)),
    Case("spatial", 'y = Einsum <equation = "bchw,bcwk->bchk"> (x, x)', (2, 3, 3)),
]


@pytest.mark.parametrize("case", EINSUM, ids=lambda c: c.id)
def test_einsum(case, rng):
    run_case(case, rng)
    model, _ = case.build(rng)
    assert "Einsum" not in {n.op_type for n in normalize(model).path_nodes}


def test_einsum_that_is_no_matmul_is_reported(rng):
    model = op_model('y = Einsum <equation = "bii->bi"> (x)', (3, 3), rng)
    with pytest.raises(rectonnx.UnsupportedModelError, match="Einsum"):
        rectonnx.rewrite(model, "saliency")


# -- Shape-computed reshapes are integer tensors: never on the path ------------------------
def test_shape_computed_reshapes_need_no_rules(rng):
    """``x.view(x.size(0), -1)`` and a channel shuffle written with ``x.size()``: torch exports
    Shape/Gather/Unsqueeze/Concat chains; they are integer tensors, so not active."""
    class Shuffle(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 3 * 3, 3)

        def forward(self, x):
            n, c, h, w = x.size()
            x = self.conv(x).view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
            return self.fc(torch.relu(x).view(x.size(0), -1))

    torch.manual_seed(0)
    net = Shuffle().eval()
    x = distinct_values((2, 4, 3, 3), rng)
    model = export(net, torch.from_numpy(x))
    exported = {n.op_type for n in model.graph.node}
    assert {"Shape", "Gather", "Unsqueeze", "Concat"} <= exported
    path = {n.op_type for n in normalize(model).path_nodes}
    assert not {"Shape", "Gather", "Unsqueeze", "Concat"} & path, path
    logits, attribution = explain(model, x, TARGETS)
    expected_logits, expected = torch_gradient(net, x, TARGETS)
    assert_close(logits, expected_logits, "forward logits vs torch", where="shape chains")
    assert_close(attribution, expected, "gradient vs torch autograd", where="shape chains")


# -- torch modules exported to ONNX, against torch autograd --------------------------------
class Attention(nn.Module):
    def __init__(self, dim=6, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):  # x: [N, C, L] -> tokens [N, L, C]
        t = x.transpose(1, 2)
        n, length, dim = t.shape
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        q, k, v = (z.reshape(n, length, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        a = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(dim // self.heads),
                          dim=-1)
        return self.out((a @ v).transpose(1, 2).reshape(n, length, dim))


TORCH_CASES = {
    "gelu": (lambda: nn.GELU(), (2, 3, 3), 3.0),
    "gelu_tanh": (lambda: nn.GELU(approximate="tanh"), (2, 3, 3), 3.0),
    "silu": (lambda: nn.SiLU(), (2, 3, 3), 4.0),
    "mish": (lambda: nn.Mish(), (2, 3, 3), 4.0),
    "hardswish": (lambda: nn.Hardswish(), (2, 3, 3), 5.0),
    "hardsigmoid": (lambda: nn.Hardsigmoid(), (2, 3, 3), 5.0),
    "sigmoid": (lambda: nn.Sigmoid(), (2, 3, 3), 4.0),
    "tanh": (lambda: nn.Tanh(), (2, 3, 3), 3.0),
    "elu": (lambda: nn.ELU(0.7), (2, 3, 3), 3.0),
    "selu": (lambda: nn.SELU(), (2, 3, 3), 3.0),
    "celu": (lambda: nn.CELU(1.3), (2, 3, 3), 3.0),
    "softplus_beta2": (lambda: nn.Softplus(beta=2.0), (2, 3, 3), 3.0),
    "prelu": (lambda: nn.PReLU(2, init=0.2), (2, 3, 3), 1.5),
    "layer_norm": (lambda: nn.LayerNorm(3), (2, 3, 3), 1.5),
    "layer_norm_2d": (lambda: nn.LayerNorm([3, 3]), (2, 3, 3), 1.5),
    "group_norm": (lambda: nn.GroupNorm(2, 4), (4, 3, 3), 1.5),
    "interpolate_nearest": (lambda: nn.Upsample(scale_factor=2, mode="nearest"), (2, 3, 4), 1.5),
    "interpolate_bilinear": (lambda: nn.Upsample(scale_factor=2, mode="bilinear"), (2, 3, 4),
                             1.5),
    "interpolate_bilinear_align_corners": (
        lambda: nn.Upsample(size=(5, 7), mode="bilinear", align_corners=True), (2, 3, 4), 1.5),
    "conv_transpose": (lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1,
                                                  output_padding=1), (2, 3, 3), 1.5),
    "conv_transpose_groups": (lambda: nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2),
                              (4, 3, 3), 1.5),
    "mean_and_amax": (lambda: MeanMax(), (3, 4, 4), 1.5),
    "slices_chunks_expand_repeat": (lambda: Slicing(), (4, 5, 5), 1.5),
    "attention": (lambda: Attention(), (6, 4), 1.5),
}


class MeanMax(nn.Module):
    def forward(self, x):
        return torch.cat([x.mean((2, 3)), x.amax((2, 3)), x.sum(1).flatten(1)], 1)


class Slicing(nn.Module):
    def forward(self, x):
        a, b = torch.chunk(x, 2, dim=1)
        c = x[:, 1:3, ::2, 1:-1]
        d = x[:, :1].expand(-1, 4, -1, -1)
        return torch.cat([(a * b).flatten(1), c.flatten(1), (d * x).flatten(1),
                          b.repeat(1, 1, 2, 1).flatten(1)], 1)


@pytest.mark.parametrize("name", sorted(TORCH_CASES))
def test_against_torch_autograd(name, rng):
    torch.manual_seed(0)
    factory, in_shape, scale = TORCH_CASES[name]
    module = Wrap(factory(), in_shape).eval()
    x = distinct_values((2, *in_shape), rng, -scale, scale)
    model = export(module, torch.from_numpy(x), opset=17)
    logits, attribution = explain(model, x, TARGETS, "saliency")
    expected_logits, expected = torch_gradient(module, x, TARGETS)
    assert_close(logits, expected_logits, "forward logits vs torch", where=name)
    assert_close(attribution, expected, "gradient vs torch autograd", where=name)
    for method in ("rectgrad", "guided_backprop"):
        _, other = explain(model, x, TARGETS, method)
        assert np.isfinite(other).all()


# -- dynamic shapes ----------------------------------------------------------------------------
def dx_model(g: GraphBuilder, w: np.ndarray) -> onnx.ModelProto:
    """The nodes of ``g`` as a model ``(x [N, 2, H, W], dy [N, 3, h, w]) -> dx``, weight ``W``."""
    return make_model(g.nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                              ["N", 2, "H", "W"]),
                                helper.make_tensor_value_info("dy", TensorProto.FLOAT,
                                                              ["N", 3, "h", "w"])],
                      [helper.make_tensor_value_info("dx", TensorProto.FLOAT, None)],
                      [numpy_helper.from_array(w, "W"), *g.initializers])


def torch_conv_input_gradient(w, sizes, pads, strides, dilations, seed: int):
    """Random float32 ``x [2, 2, *sizes]`` and ``dy``, and ``d<conv(x), dy>/dx`` in float64."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2, *sizes, dtype=torch.float64, generator=generator, requires_grad=True)
    y = F.conv2d(F.pad(x, (pads[1], pads[3], pads[0], pads[2])), torch.from_numpy(w).double(),
                 stride=strides, dilation=dilations)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=generator)
    (expected,) = torch.autograd.grad(y, x, dy)
    return (x.detach().numpy().astype(np.float32), dy.numpy().astype(np.float32),
            expected.numpy())


@pytest.mark.parametrize("recipe", ["pads_in_conv_transpose", "begins_in_fit"])
@pytest.mark.parametrize("sizes", [(7, 9), (8, 8), (10, 6)])
@pytest.mark.parametrize("strides,pads,dilations,kernel", [
    ((1, 1), (1, 1, 1, 1), (1, 1), (3, 3)),
    ((2, 2), (1, 1, 1, 1), (1, 1), (3, 3)),
    ((2, 3), (0, 2, 1, 0), (1, 1), (3, 2)),
    ((3, 2), (1, 0, 2, 2), (2, 1), (2, 3)),
])
def test_fit_to_shape_of_gives_the_dynamic_conv_input_gradient(strides, pads, dilations, kernel,
                                                               sizes, recipe):
    """The two recipes of ``RuleContext.fit_to_shape_of`` give the input gradient of
    ``Conv(x, W)`` for any H, W, from one graph with symbolic sizes (a Conv backward that needs
    no static sizes)."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, 2, *kernel)).astype(np.float32)
    g = GraphBuilder({"x", "dy", "W", "dx"})
    ctx = RuleContext(g, {"x": ("N", 2, "H", "W"), "dy": ("N", 3, None, None)}, {}, set(),
                      exact_gradient, opset=17)
    in_transpose = [pads[0], pads[1], 0, 0] if recipe == "pads_in_conv_transpose" else None
    spread = g.ConvTranspose("dy", "W", strides=list(strides), dilations=list(dilations),
                             kernel_shape=list(kernel), pads=in_transpose)
    begins = None if in_transpose else g.ints(pads[:2], "begins")
    g.Identity(ctx.fit_to_shape_of(spread, "x", begins=begins), outputs=["dx"])
    model = dx_model(g, w)
    x, dy, expected = torch_conv_input_gradient(w, sizes, pads, strides, dilations, seed=2)
    (dx,) = session(model).run(None, {"x": x, "dy": dy})
    assert_close(dx, expected, "fit_to_shape_of vs torch autograd",
                 where=f"{strides}/{pads}/{sizes}/{recipe}")


@pytest.mark.parametrize("sizes", [(7, 9), (8, 8)])
@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
@pytest.mark.parametrize("strides,dilations,kernel", [((2, 2), (1, 1), (4, 4)),
                                                      ((1, 1), (1, 1), (3, 2)),
                                                      ((3, 2), (1, 2), (3, 3))])
def test_same_pad_begins_for_dynamic_sizes(strides, dilations, kernel, auto_pad, sizes):
    """``same_pad_begins`` + ``fit_to_shape_of(ConvTranspose(dy, W), x, begins)``: the input
    gradient of a SAME-padded convolution whose pads depend on the run-time size."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((3, 2, *kernel)).astype(np.float32)
    g = GraphBuilder({"x", "dy", "W", "dx"})
    ctx = RuleContext(g, {"x": ("N", 2, "H", "W")}, {}, set(), exact_gradient, opset=17)
    begins = ctx.same_pad_begins("x", kernel, strides, dilations, auto_pad)
    spread = g.ConvTranspose("dy", "W", strides=list(strides), dilations=list(dilations),
                             kernel_shape=list(kernel))
    g.Identity(ctx.fit_to_shape_of(spread, "x", begins=begins), outputs=["dx"])
    model = dx_model(g, w)
    pads = explicit_pads(auto_pad, None, sizes, kernel, strides, dilations)
    x, dy, expected = torch_conv_input_gradient(w, sizes, pads, strides, dilations, seed=3)
    assert list(dy.shape[2:]) == [-(-n // s) for n, s in zip(sizes, strides)]  # SAME
    (dx,) = session(model).run(None, {"x": x, "dy": dy})
    assert_close(dx, expected, "fit_to_shape_of vs torch autograd",
                 where=f"{auto_pad}/{strides}/{sizes}")


DYNAMIC_BODY = """
    a = AveragePool <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]> (x)
    b = AveragePool <kernel_shape = [2, 2], strides = [2, 2], ceil_mode = 1,
                     count_include_pad = 0> (x)
    r = Relu(a)
    l = LRN <size = 3, alpha = 0.5> (r)
    u = Resize <mode = "linear"> (l, "", s)
    c = Slice(u, st, en, ax)
    m = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (x)
    h = Sigmoid(m)
    m2 = MaxPool <kernel_shape = [2, 2], strides = [3, 3], pads = [1, 0, 1, 1]> (x)
    m3 = MaxPool <kernel_shape = [2, 2], strides = [2, 2], ceil_mode = 1> (x)
    g2 = GlobalAveragePool(m2)
    g3 = GlobalAveragePool(m3)
    g23 = Add(g2, g3)
    gc = GlobalAveragePool(c)
    gh = GlobalMaxPool(h)
    gb = GlobalAveragePool(b)
    p = Add(gc, gh)
    p2 = Add(p, g23)
    q = Add(p2, gb)
    f = Flatten(q)
    logits = MatMul(f, head)
"""


def sized_model(name: str, body: str, channels: int, classes: int, height, width,
                initializers: dict) -> onnx.ModelProto:
    """``body`` as an opset-17 model with input ``x [N, channels, height, width]`` (ints or
    symbolic names) and output ``logits [N, classes]``."""
    text = ('<ir_version: 8, opset_import: ["" : 17]>\n'
            f"{name} (float[N,{channels},{height},{width}] x) => "
            f"(float[N,{classes}] logits) {{{body}}}")
    return parse(text, initializers)


def dynamic_model(height="H", width="W"):
    rng = np.random.default_rng(5)
    return sized_model("dyn", DYNAMIC_BODY, 3, 4, height, width, {
                        "s": np.float32([1, 1, 2, 2]), "st": np.int64([1, 0]),
                        "en": np.int64([-1, 100]), "ax": np.int64([2, 3]),
                        "head": rng.standard_normal((3, 4)).astype(np.float32)})


@pytest.mark.parametrize("runtime", ["any", "onnxruntime-cpu"])
@pytest.mark.parametrize("method", ["saliency", "rectgrad"])
def test_symbolic_height_and_width(method, runtime):
    """One explainer for every image size: AveragePool (also in ceil mode), LRN, Resize, Slice,
    MaxPool (also padded and in ceil mode), Sigmoid and global pools with symbolic H and W.
    Saliency is checked by central differences at several sizes, RectGrad (whose percentile k
    is computed in the graph) against the explainer of the same model with static sizes.
    ``onnxruntime-cpu`` unpools the disjoint max pools whose MaxUnpool size fits (not the
    ceil-mode one)."""
    explainer = rectonnx.rewrite(dynamic_model(), method, runtime=runtime,
                                 **({"q": 70.0} if method == "rectgrad" else {}))
    assert sum(n.op_type == "MaxUnpool" for n in explainer.graph.node) == \
        (2 if runtime == "onnxruntime-cpu" else 0)
    dims = [d.dim_param or d.dim_value for d in explainer.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, "H", "W"]
    for i, (height, width) in enumerate([(6, 7), (5, 4), (8, 6)]):
        rng = np.random.default_rng(i)
        x = distinct_values((2, 3, height, width), rng)
        logits, attribution = run_explainer(explainer, x, [0, -1])
        if method == "saliency":
            reference = Reference(dynamic_model(height, width))
            assert_close(attribution, fd_gradient(reference, x, [0, -1]),
                         "gradient vs central differences", where=f"dynamic {height}x{width}")
        else:
            static = rectonnx.rewrite(dynamic_model(height, width), method, runtime=runtime,
                                      **({"q": 70.0} if method == "rectgrad" else {}))
            _, expected = run_explainer(static, x, [0, -1])
            assert_close(attribution, expected, "rectgrad dynamic vs static sizes",
                         where=f"{height}x{width}")


class DynamicConvNet(nn.Module):
    """Convolutions of every kind the dynamic-size Conv backward handles: stride 1 (flipped
    kernel), stride 2 (ConvTranspose fitted to the input), dilated depthwise, 1x1."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 8, 3, stride=2,
                                                                              padding=1),
                                    nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8),
                                    nn.Conv2d(8, 6, 1)])
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if i == 2:
                x = F.max_pool2d(x, 2, ceil_mode=True)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def export_sizes(module, example, dynamic: bool) -> onnx.ModelProto:
    import io
    import warnings
    buffer = io.BytesIO()
    axes = {"x": {0: "N", 2: "H", 3: "W"}, "scores": {0: "N"}} if dynamic else \
        {"x": {0: "N"}, "scores": {0: "N"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.as_tensor(example),), buffer, dynamo=False,
                          input_names=["x"], output_names=["scores"], dynamic_axes=axes,
                          opset_version=17)
    return onnx.load_from_string(buffer.getvalue())


SIZES = [(21, 23), (24, 24), (19, 16)]


def test_conv_net_with_symbolic_height_and_width_against_torch():
    """One explainer of a CNN exported with symbolic H and W: saliency equals torch autograd at
    every size; RectGrad, guided backprop and the padding trick give what the explainer of the
    same net exported at that fixed size gives."""
    torch.manual_seed(0)
    net = DynamicConvNet().eval()
    model = export_sizes(net, torch.randn(1, 3, 12, 12), dynamic=True)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, "H", "W"]
    options = [("rectgrad", {"q": 80.0, "padding_trick": True}),
               ("guided_backprop", {"padding_trick": True}), ("rectgrad", {"q": 50.0})]
    explainers = {("saliency", "{}"): rectonnx.rewrite(model, "saliency")}
    for method, extra in options:
        explainers[method, str(extra)] = rectonnx.rewrite(model, method, **extra)
    for i, (height, width) in enumerate(SIZES):
        x = distinct_values((2, 3, height, width), np.random.default_rng(i))
        logits, attribution = run_explainer(explainers["saliency", "{}"], x, [1, -1])
        expected_logits, expected = torch_gradient(net, x, [1, -1])
        assert_close(logits, expected_logits, "forward logits vs torch",
                     where=f"dynamic conv {height}x{width}")
        assert_close(attribution, expected, "gradient vs torch autograd",
                     where=f"dynamic conv {height}x{width}")
        static = export_sizes(net, torch.from_numpy(x[:1]), dynamic=False)
        for method, extra in options:
            _, got = run_explainer(explainers[method, str(extra)], x, [1, -1])
            _, want = explain(static, x, [1, -1], method, **extra)
            assert np.abs(want).max() > 0
            assert_close(got, want, "dynamic vs static sizes",
                         where=f"{method}/{extra}/{height}x{width}")


SAME_BODY = """
    a = Conv <auto_pad = "SAME_UPPER", strides = [2, 2], kernel_shape = [4, 4]> (x, w1)
    r = Relu(a)
    b = Conv <auto_pad = "SAME_LOWER", strides = [1, 2], kernel_shape = [3, 2]> (r, w2)
    t = Relu(b)
    p = GlobalAveragePool(t)
    f = Flatten(p)
    logits = MatMul(f, head)
"""


def same_model(height="H", width="W"):
    rng = np.random.default_rng(7)
    return sized_model("same", SAME_BODY, 2, 3, height, width, {
                        "w1": rng.standard_normal((4, 2, 4, 4)).astype(np.float32),
                        "w2": rng.standard_normal((5, 4, 3, 2)).astype(np.float32),
                        "head": rng.standard_normal((5, 3)).astype(np.float32)})


@pytest.mark.parametrize("padding_trick", [False, True])
def test_same_padded_convs_with_symbolic_sizes(padding_trick):
    """SAME_UPPER/SAME_LOWER convolutions whose pads depend on the run-time size: saliency by
    central differences, RectGrad against the explainer built for the fixed size."""
    dynamic = {m: rectonnx.rewrite(same_model(), m, padding_trick=padding_trick,
                                   **({"q": 60.0} if m == "rectgrad" else {}))
               for m in ("saliency", "rectgrad")}
    for i, (height, width) in enumerate([(7, 9), (8, 8), (5, 6)]):
        x = distinct_values((2, 2, height, width), np.random.default_rng(10 + i))
        fixed = same_model(height, width)
        for method, explainer in dynamic.items():
            _, got = run_explainer(explainer, x, [0, -1])
            _, want = explain(fixed, x, [0, -1], method, padding_trick=padding_trick,
                              **({"q": 60.0} if method == "rectgrad" else {}))
            assert_close(got, want, "dynamic vs static sizes",
                         where=f"SAME/{method}/{padding_trick}/{height}x{width}")
        if not padding_trick:
            _, got = run_explainer(dynamic["saliency"], x, [0, -1])
            assert_close(got, fd_gradient(Reference(fixed), x, [0, -1]),
                         "gradient vs central differences", where=f"SAME {height}x{width}")


class FlattenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 2 * 2, 5)

    def forward(self, x):
        return self.fc(F.max_pool2d(F.relu(self.conv(x)), 2).view(1, -1))


class TokenNet(nn.Module):
    """A class token concatenated at a fixed batch of 1 cannot take another batch size."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 4))
        self.fc = nn.Linear(4 * 5, 3)

    def forward(self, x):
        t = torch.cat([self.cls, x.flatten(2).transpose(1, 2)], 1)
        return self.fc(torch.tanh(t).flatten(1))


def test_fixed_batch_becomes_symbolic(rng):
    """``x.view(1, -1)`` at a fixed batch of 1 exports ``Reshape(x, [1, 16])``: the explainer
    takes any batch (the Reshape copies the batch instead), and each sample's attribution is
    what torch gives for that sample alone."""
    torch.manual_seed(0)
    net = FlattenNet().eval()
    x = distinct_values((3, 3, 4, 4), rng)
    model = export(net, torch.from_numpy(x[:1]), dynamic_batch=False)
    explainer = rectonnx.rewrite(model, "saliency")
    assert explainer.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert explainer.graph.input[1].type.tensor_type.shape.dim[0].dim_param == "N"
    logits, attribution = run_explainer(explainer, x, [0, 4, -1])
    for i, target in enumerate([0, 4, -1]):
        expected_logits, expected = torch_gradient(net, x[i:i + 1], [target])
        assert_close(logits[i:i + 1], expected_logits, "forward logits vs torch",
                     where="fixed batch")
        assert_close(attribution[i:i + 1], expected, "gradient vs torch autograd",
                     where="fixed batch")


def test_fixed_batch_stays_where_the_graph_needs_it(rng):
    torch.manual_seed(0)
    net = TokenNet().eval()
    x = distinct_values((1, 4, 2, 2), rng)
    model = export(net, torch.from_numpy(x), dynamic_batch=False)
    explainer = rectonnx.rewrite(model, "saliency")
    assert explainer.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    logits, attribution = run_explainer(explainer, x, [1])
    expected_logits, expected = torch_gradient(net, x, [1])
    assert_close(attribution, expected, "gradient vs torch autograd", where="class token")


ALL_CASES = (ACTIVATIONS + COMPOSITES + NOT_FUSED + ELEMENTWISE + NORMALIZATION + REDUCE + RESIZE
             + SLICING + CONV_TRANSPOSE + EINSUM)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.id)
def test_extended_rules_more_seeds(case, seed):
    run_case(case, np.random.default_rng(seed))
