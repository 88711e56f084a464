"""``padding_trick="border"`` against a literal re-implementation of the RectGrad authors' rule.

Their TensorFlow ``conv2d_grad_override`` multiplies the output gradient of every SAME
convolution by a mask that is 0 on a one-pixel border and 1 inside, then takes the ordinary
input gradient. The literal oracle here: a torch net whose convolutions pad as TensorFlow's SAME
(``F.pad`` with ``total = max((ceil(n / s) - 1) s + K - n, 0)``, the extra pixel at the end),
with a backward hook on each convolution's output that multiplies its gradient by that border
mask when the output has SAME size ``ceil(n / s)``; torch autograd in float64 does the rest.
Kernels 1, 3 and 5, strides 1 and 2, both as ONNX ``auto_pad="SAME_UPPER"`` and as the explicit
pads a PyTorch export writes. Inputs avoid ReLU kinks (distinct values, a random dense head).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

from helpers import assert_close, distinct_values, make_model, run_explainer

import rectonnx

TARGETS = np.array([1, 0], np.int64)


def same_pads(n: int, k: int, s: int) -> tuple[int, int]:
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def border_mask(shape) -> torch.Tensor:
    mask = torch.ones(shape, dtype=torch.float64)
    mask[..., 0, :] = 0
    mask[..., -1, :] = 0
    mask[..., :, 0] = 0
    mask[..., :, -1] = 0
    return mask


def literal_border_saliency(weights, x: np.ndarray, target: np.ndarray, kernels, strides,
                            *, trick: bool = True) -> np.ndarray:
    """d logit[target] / dx with the authors' border mask at every SAME-shaped convolution."""
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
    h = xt
    for (w, b), k, s in zip(weights[:-1], kernels, strides):
        n_h, n_w = h.shape[2:]
        (top, bottom), (left, right) = same_pads(n_h, k, s), same_pads(n_w, k, s)
        z = F.conv2d(F.pad(h, (left, right, top, bottom)), torch.from_numpy(w).double(),
                     torch.from_numpy(b).double(), stride=s)
        same = z.shape[2] == math.ceil(n_h / s) and z.shape[3] == math.ceil(n_w / s)
        if trick and same:
            z.register_hook(lambda grad, shape=z.shape: grad * border_mask(shape))
        h = torch.relu(z)
    w, b = weights[-1]
    logits = h.flatten(1) @ torch.from_numpy(w).double().T + torch.from_numpy(b).double()
    picked = logits[torch.arange(len(target)), torch.from_numpy(target)].sum()
    (grad,) = torch.autograd.grad(picked, xt)
    return grad.numpy()


def conv_net(weights, x_shape, kernels, strides, explicit: bool):
    """ONNX: SAME convs (auto_pad SAME_UPPER or the equal explicit pads) + Relu, a dense head."""
    nodes, inits, h, size = [], [], "x", list(x_shape[2:])
    for i, ((w, b), k, s) in enumerate(zip(weights[:-1], kernels, strides)):
        inits += [helper.make_tensor(f"w{i}", TensorProto.FLOAT, w.shape, w.ravel()),
                  helper.make_tensor(f"b{i}", TensorProto.FLOAT, b.shape, b.ravel())]
        if explicit:
            (t, bo), (le, r) = same_pads(size[0], k, s), same_pads(size[1], k, s)
            window = {"pads": [t, le, bo, r]}
        else:
            window = {"auto_pad": "SAME_UPPER"}
        nodes += [helper.make_node("Conv", [h, f"w{i}", f"b{i}"], [f"z{i}"],
                                   kernel_shape=[k, k], strides=[s, s], **window),
                  helper.make_node("Relu", [f"z{i}"], [f"a{i}"])]
        h, size = f"a{i}", [math.ceil(n / s) for n in size]
    w, b = weights[-1]
    inits += [helper.make_tensor("wd", TensorProto.FLOAT, w.shape, w.ravel()),
              helper.make_tensor("bd", TensorProto.FLOAT, b.shape, b.ravel())]
    nodes += [helper.make_node("Flatten", [h], ["flat"]),
              helper.make_node("Gemm", ["flat", "wd", "bd"], ["logits"], transB=1)]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                            ["N", *x_shape[1:]])],
                      [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
                      inits)


def random_weights(rng, x_shape, kernels, strides, channels=(4, 5)):
    weights, c, size = [], x_shape[1], list(x_shape[2:])
    for out, k, s in zip(channels, kernels, strides):
        weights.append((rng.normal(0, 0.5, (out, c, k, k)).astype(np.float32),
                        rng.normal(0, 0.1, out).astype(np.float32)))
        c, size = out, [math.ceil(n / s) for n in size]
    weights.append((rng.normal(0, 0.3, (3, c * size[0] * size[1])).astype(np.float32),
                    rng.normal(0, 0.1, 3).astype(np.float32)))
    return weights


@pytest.mark.parametrize("explicit", [False, True], ids=["auto_pad", "explicit_pads"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_border_padding_trick_equals_the_authors_rule(kernel, stride, explicit, rng):
    x_shape = (2, 3, 9, 8)
    kernels, strides = (kernel, 3), (stride, 1)  # the second conv: the paper's 3x3 stride 1
    weights = random_weights(rng, x_shape, kernels, strides)
    x = distinct_values(x_shape, rng)
    model = conv_net(weights, x_shape, kernels, strides, explicit)
    graph = rectonnx.rewrite(model, "saliency", padding_trick="border")
    _, attribution = run_explainer(graph, x, TARGETS)
    literal = literal_border_saliency(weights, x, TARGETS, kernels, strides)
    assert_close(attribution, literal, "padding_trick=border vs the authors' rule (torch)",
                 where=f"k{kernel}s{stride}{'e' if explicit else 'a'}")
    plain = literal_border_saliency(weights, x, TARGETS, kernels, strides, trick=False)
    assert np.abs(literal - plain).max() > 1e-3 * np.abs(plain).max()  # the mask matters


@pytest.mark.parametrize("kernel,stride,same_as_exact", [(3, 1, True), (1, 1, False),
                                                         (5, 1, False), (3, 2, False)])
def test_border_and_exact_agree_only_for_3x3_stride_1(kernel, stride, same_as_exact, rng):
    """Where the two padding tricks coincide (docs/maths.md, 'The padding trick')."""
    x_shape = (2, 3, 9, 8)
    kernels, strides = (kernel,), (stride,)
    weights = random_weights(rng, x_shape, kernels, strides, channels=(4,))
    x = distinct_values(x_shape, rng)
    model = conv_net(weights, x_shape, kernels, strides, explicit=True)
    maps = {mode: run_explainer(rectonnx.rewrite(model, "saliency", padding_trick=mode), x,
                                TARGETS)[1] for mode in ("border", "exact")}
    equal = np.allclose(maps["border"], maps["exact"], rtol=1e-6, atol=1e-7)
    assert equal == same_as_exact


def test_border_padding_trick_needs_static_sizes(rng):
    weights = random_weights(rng, (1, 3, 8, 8), (3,), (1,), channels=(4,))
    model = conv_net(weights, (1, 3, 8, 8), (3,), (1,), explicit=True)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    with pytest.raises(rectonnx.UnsupportedModelError, match="static|fixed image size"):
        rectonnx.rewrite(model, "saliency", padding_trick="border")
