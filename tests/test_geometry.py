"""The window arithmetic of rectonnx.geometry, each helper against an independent oracle:
torch's own padding/pooling, onnxruntime's auto_pad, brute-force loops, and the adjoint identity
``<conv(x), y> = <x, conv^T(y)>`` for the ConvTranspose geometry."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import parse, session
from rectonnx.geometry import (conv_transpose_geometry, explicit_pads, output_length,
                               padding_trick_mask, receptive_field_inside, unbroadcast_axes,
                               valid_counts)


# -- explicit_pads -----------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("kernel,dilation", [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (2, 2),
                                             (3, 2), (4, 3)])
@pytest.mark.parametrize("n", [5, 6, 9])
def test_explicit_pads_same_upper_matches_torch_same(kernel, dilation, n):
    """torch's padding='same' (stride 1) puts the odd pixel at the end, like SAME_UPPER."""
    torch.manual_seed(0)
    x, w = torch.randn(1, 1, n, dtype=torch.float64), torch.randn(1, 1, kernel,
                                                                   dtype=torch.float64)
    pads = explicit_pads("SAME_UPPER", None, [n], [kernel], [1], [dilation])
    same = F.conv1d(x, w, padding="same", dilation=dilation)
    explicit = F.conv1d(F.pad(x, (pads[0], pads[1])), w, dilation=dilation)
    assert same.shape[-1] == n
    torch.testing.assert_close(explicit, same, rtol=0, atol=1e-12)
    lower = explicit_pads("SAME_LOWER", None, [n], [kernel], [1], [dilation])
    assert lower == [pads[1], pads[0]]


def test_explicit_pads_literal_values():
    # 7 inputs, kernel 4, stride 2: 4 outputs need (4-1)*2 + 4 - 7 = 3 padding: 1 + 2.
    assert explicit_pads("SAME_UPPER", None, [7, 7], [4, 4], [2, 2], [1, 1]) == [1, 1, 2, 2]
    assert explicit_pads("SAME_LOWER", None, [7, 7], [4, 4], [2, 2], [1, 1]) == [2, 2, 1, 1]
    assert explicit_pads("VALID", [3, 3, 3, 3], [7, 7], [3, 3], [1, 1], [1, 1]) == [0, 0, 0, 0]
    assert explicit_pads("NOTSET", [1, 2, 3, 4], [7, 7], [3, 3], [1, 1], [1, 1]) == [1, 2, 3, 4]
    assert explicit_pads("NOTSET", None, [7], [3], [1], [1]) == [0, 0]
    assert explicit_pads("", None, [7], [3], [1], [1]) == [0, 0]
    # large stride: never negative padding
    assert explicit_pads("SAME_UPPER", None, [8], [2], [4], [1]) == [0, 0]
    with pytest.raises(ValueError):
        explicit_pads("SAME", None, [7], [3], [1], [1])


CONV_AUTO_PAD = [(auto, n, k, s) for auto in ("SAME_UPPER", "SAME_LOWER", "VALID")
                 for n, k, s in [(7, 4, 2), (6, 3, 2), (8, 3, 3), (5, 2, 1), (9, 5, 2), (4, 4, 3)]]


@pytest.mark.parametrize("auto_pad,n,k,s", CONV_AUTO_PAD)
def test_explicit_pads_matches_onnxruntime_auto_pad(auto_pad, n, k, s):
    """A Conv with auto_pad and the same Conv with the explicit pads agree under onnxruntime."""
    pads = explicit_pads(auto_pad, None, [n, n + 1], [k, k], [s, s], [1, 1])
    text = (f'<ir_version: 8, opset_import: ["" : 17]> g (float[1,1,{n},{n + 1}] x) => '
            f'(float a, float b) {{\n a = Conv <auto_pad = "{auto_pad}", strides = [{s}, {s}]>'
            f' (x, w)\n b = Conv <pads = [{", ".join(map(str, pads))}], strides = [{s}, {s}]>'
            f' (x, w)\n}}')
    rng = np.random.default_rng(0)
    model = parse(text, {"w": rng.standard_normal((1, 1, k, k)).astype(np.float32)})
    a, b = session(model).run(None, {"x": rng.standard_normal((1, 1, n, n + 1))
                                     .astype(np.float32)})
    assert a.shape == b.shape
    np.testing.assert_array_equal(a, b)


# -- output_length -----------------------------------------------------------------------------
def pool_configs(count, seed=0):
    """Random (n, k, s, d, b, e) with the constraints torch puts on pools (pad <= k/2)."""
    rng = np.random.default_rng(seed)
    configs = []
    while len(configs) < count:
        k, s, d = int(rng.integers(1, 6)), int(rng.integers(1, 5)), int(rng.integers(1, 4))
        n = int(rng.integers((k - 1) * d + 1, 16))
        p = int(rng.integers(0, k // 2 + 1))
        configs.append((n, k, s, d, p))
    return configs


@pytest.mark.parametrize("ceil_mode", [False, True])
def test_output_length_matches_torch_pooling(ceil_mode):
    for n, k, s, d, p in pool_configs(300):
        expected = F.max_pool1d(torch.zeros(1, 1, n), k, s, p, dilation=d,
                                ceil_mode=ceil_mode).shape[-1]
        assert output_length(n, k, s, d, p, p, ceil_mode) == expected, (n, k, s, d, p)


@pytest.mark.parametrize("n,k,s,b,e", [(7, 2, 2, 0, 0), (8, 3, 2, 1, 1), (8, 3, 2, 0, 2),
                                       (9, 3, 3, 2, 0), (6, 3, 2, 1, 0), (5, 4, 3, 0, 1)])
def test_output_length_matches_onnxruntime_ceil_mode(n, k, s, b, e):
    """Asymmetric pads in ceil mode (which torch cannot express) against onnxruntime."""
    text = (f'<ir_version: 8, opset_import: ["" : 17]> g (float[1,1,{n}] x) => (float y) {{\n'
            f' y = MaxPool <kernel_shape = [{k}], strides = [{s}], pads = [{b}, {e}],'
            f' ceil_mode = 1> (x)\n}}')
    y = session(parse(text)).run(None, {"x": np.zeros((1, 1, n), np.float32)})[0]
    assert output_length(n, k, s, 1, b, e, ceil_mode=True) == y.shape[-1]


# -- conv_transpose_geometry -------------------------------------------------------------------
def geometry_configs(count, seed=0):
    rng = np.random.default_rng(seed)
    configs = []
    while len(configs) < count:
        k, s, d = int(rng.integers(1, 6)), int(rng.integers(1, 5)), int(rng.integers(1, 4))
        b, e = int(rng.integers(0, k)), int(rng.integers(0, k))
        n = int(rng.integers(1, 14))
        ceil_mode = bool(rng.integers(0, 2))
        if n + b + e < (k - 1) * d + 1:
            continue
        m = output_length(n, k, s, d, b, e, ceil_mode)
        if m < 1:
            continue
        configs.append((n, m, k, s, d, b, e, ceil_mode))
    return configs


def transpose_length(m, k, s, d, geometry):
    """ConvTranspose's output length (ONNX formula) plus the extra zero padding."""
    begin, end = geometry.pads
    return ((m - 1) * s + (k - 1) * d + 1 - begin - end + geometry.output_padding[0]
            + geometry.extra_end[0])


def test_conv_transpose_geometry_restores_sizes():
    """For 400 random convolutions and pools (ceil mode included) the transpose has the input's
    length, with legal attributes: pads >= 0, 0 <= output_padding < stride."""
    for n, m, k, s, d, b, e, ceil_mode in geometry_configs(400):
        geometry = conv_transpose_geometry([n], [m], [k], [s], [d], [b, e])
        assert transpose_length(m, k, s, d, geometry) == n, (n, m, k, s, d, b, e, ceil_mode)
        assert geometry.pads[0] == b and min(geometry.pads) >= 0
        assert 0 <= geometry.output_padding[0] < s
        assert geometry.extra_end[0] >= 0
        assert geometry.needs_extra == (geometry.extra_end[0] > 0)
        if not ceil_mode:  # a convolution's transpose never needs more than output_padding
            assert not geometry.needs_extra


def apply_transpose(dy, w, s, d, geometry):
    """ConvTranspose with ONNX's asymmetric pads, output_padding and the extra zero padding."""
    full = F.conv_transpose1d(dy, w, stride=s, dilation=d,
                              output_padding=geometry.output_padding[0])
    begin, end = geometry.pads
    cropped = full[..., begin:full.shape[-1] - end]
    return F.pad(cropped, (0, geometry.extra_end[0]))


def test_conv_transpose_geometry_is_the_adjoint():
    """``<conv(x), dy> = <x, conv^T(dy)>`` for the window op (ceil-mode windows may run past the
    padded input; the positions they read there do not exist and get no gradient)."""
    rng = np.random.default_rng(1)
    for n, m, k, s, d, b, e, ceil_mode in geometry_configs(200, seed=1):
        x = torch.tensor(rng.standard_normal((1, 1, n)), requires_grad=True)
        w = torch.tensor(rng.standard_normal((1, 1, k)))
        beyond = max(0, (m - 1) * s + (k - 1) * d + 1 - (n + b + e))
        y = F.conv1d(F.pad(x, (b, e + beyond)), w, stride=s, dilation=d)[..., :m]
        dy = torch.tensor(rng.standard_normal((1, 1, m)))
        (expected,) = torch.autograd.grad(y, x, dy)
        geometry = conv_transpose_geometry([n], [m], [k], [s], [d], [b, e])
        actual = apply_transpose(dy, w, s, d, geometry)
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12,
                                   msg=str((n, m, k, s, d, b, e, ceil_mode)))


def test_conv_transpose_geometry_literal_cases():
    # conv 3x3 stride 2 on 8 without pads: 3 outputs reach (3-1)*2+3 = 7 < 8: output_padding 1
    g = conv_transpose_geometry([8], [3], [3], [2], [1], [0, 0])
    assert (g.pads, g.output_padding, g.extra_end) == ([0, 0], [1], [0])
    # stride 2, pads 1 on 7: 4 outputs span 9 positions = 1 + 7 + 1: crop one at the end
    g = conv_transpose_geometry([7], [4], [3], [2], [1], [1, 1])
    assert (g.pads, g.output_padding, g.extra_end) == ([1, 1], [0], [0])
    # 2-D, per axis
    g = conv_transpose_geometry([8, 7], [3, 4], [3, 3], [2, 2], [1, 1], [0, 1, 0, 1])
    assert (g.pads, g.output_padding) == ([0, 1, 0, 1], [1, 0])


# -- padding_trick_mask ------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(4, 4), (5, 7), (8, 8)])
def test_padding_trick_mask_is_the_one_pixel_border_for_3x3_same(size):
    mask = padding_trick_mask(list(size), list(size), [3, 3], [1, 1], [1, 1], [1, 1, 1, 1])
    expected = np.zeros((1, 1, *size), np.float32)
    expected[..., 1:-1, 1:-1] = 1.0
    assert mask.dtype == np.float32
    np.testing.assert_array_equal(mask, expected)


def brute_force_mask(in_sizes, kernel, strides, dilations, pads):
    """1 where the window reads only real input: convolve the zero-padded indicator of real
    positions with a ones kernel and compare with the kernel's size."""
    rank = len(kernel)
    indicator = torch.ones(1, 1, *in_sizes, dtype=torch.float64)
    torch_pads = [p for i in reversed(range(rank)) for p in (pads[i], pads[rank + i])]
    padded = F.pad(indicator, torch_pads)
    ones = torch.ones(1, 1, *kernel, dtype=torch.float64)
    conv = F.conv2d if rank == 2 else F.conv1d
    count = conv(padded, ones, stride=strides, dilation=dilations)
    return (count == np.prod(kernel)).double().numpy()


def test_padding_trick_mask_matches_brute_force():
    rng = np.random.default_rng(2)
    checked = 0
    for _ in range(200):
        kernel = [int(v) for v in rng.integers(1, 5, 2)]
        strides = [int(v) for v in rng.integers(1, 4, 2)]
        dilations = [int(v) for v in rng.integers(1, 3, 2)]
        pads = [int(rng.integers(0, k + 1)) for k in kernel * 2]
        in_sizes = [int(v) for v in rng.integers(4, 10, 2)]
        out_sizes = [output_length(n, k, s, d, pads[i], pads[2 + i])
                     for i, (n, k, s, d) in enumerate(zip(in_sizes, kernel, strides, dilations))]
        if min(out_sizes) < 1:
            continue
        mask = padding_trick_mask(in_sizes, out_sizes, kernel, strides, dilations, pads)
        np.testing.assert_array_equal(mask, brute_force_mask(in_sizes, kernel, strides,
                                                             dilations, pads))
        checked += 1
    assert checked > 150


def test_receptive_field_inside_literal():
    # 5 inputs, kernel 3, stride 1, pad 1 at the start: outputs 0 and 4 read padding
    assert receptive_field_inside(5, 5, 3, 1, 1, 1).tolist() == [False, True, True, True, False]
    # no padding: every window is inside
    assert receptive_field_inside(7, 3, 3, 2, 1, 0).all()


# -- valid_counts ----------------------------------------------------------------------------
def brute_force_counts(in_sizes, out_sizes, kernel, strides, pads):
    rank = len(kernel)
    counts = np.zeros(out_sizes)
    for out in itertools.product(*[range(m) for m in out_sizes]):
        total = 0
        for offset in itertools.product(*[range(k) for k in kernel]):
            position = [out[i] * strides[i] - pads[i] + offset[i] for i in range(rank)]
            total += all(0 <= position[i] < in_sizes[i] for i in range(rank))
        counts[out] = total
    return counts[None, None]


@pytest.mark.parametrize("in_sizes,kernel,strides,pads,ceil_mode", [
    ([5, 5], [3, 3], [1, 1], [1, 1, 1, 1], False),
    ([7, 6], [3, 2], [2, 1], [2, 0, 0, 1], False),
    ([8, 8], [3, 3], [2, 2], [1, 1, 1, 1], True),   # last window runs past the padded input
    ([7, 7], [2, 2], [2, 2], [0, 0, 0, 0], True),
    ([9], [4], [3], [1, 2], True),
])
def test_valid_counts_matches_brute_force(in_sizes, kernel, strides, pads, ceil_mode):
    rank = len(kernel)
    out_sizes = [output_length(in_sizes[i], kernel[i], strides[i], 1, pads[i], pads[rank + i],
                               ceil_mode) for i in range(rank)]
    counts = valid_counts(in_sizes, out_sizes, kernel, strides, pads)
    assert counts.dtype == np.float32
    np.testing.assert_array_equal(counts, brute_force_counts(in_sizes, out_sizes, kernel,
                                                             strides, pads))


def test_valid_counts_matches_torch_average_pool():
    """count_include_pad=False divides by the real count: sum-pool / avg-pool recovers it."""
    x = torch.ones(1, 1, 6, 7, dtype=torch.float64)
    sums = F.avg_pool2d(x, 3, 2, 1, count_include_pad=True) * 9
    counts = valid_counts([6, 7], list(sums.shape[2:]), [3, 3], [2, 2], [1, 1, 1, 1])
    np.testing.assert_array_equal(counts, sums.numpy())


# -- unbroadcast_axes --------------------------------------------------------------------------
@pytest.mark.parametrize("in_shape,out_shape,axes", [
    ((2, 3), (2, 3), []),
    (("N", 3, 4, 4), ("N", 3, 4, 4), []),
    ((3, 1, 1), ("N", 3, 4, 4), [0, 2, 3]),
    ((1, 4), ("N", 3, 4, 4), [0, 1, 2]),
    ((1, 3, 1, 1), ("N", 3, 4, 4), [0, 2, 3]),
    (("N", 1, 4, 4), ("N", 3, 4, 4), [1]),
    (("N", 3, 1, 1), ("N", 3, 4, 4), [2, 3]),
    ((), ("N", 3), [0, 1]),
    ((1,), (2, 5), [0, 1]),
    ((5,), (2, 5), [0]),
    ((2, 5), (5,), None),            # operand larger than the result
    ((3,), (2, 5), None),            # not broadcastable
    ((None, 3), (None, 3), None),    # unknown dims cannot be proven equal
    (("N", 3), ("M", 3), None),      # different symbols
])
def test_unbroadcast_axes(in_shape, out_shape, axes):
    assert unbroadcast_axes(in_shape, out_shape) == axes


def test_unbroadcast_axes_sums_back_to_the_operand():
    """Summing a broadcast result over the axes (keepdims) and reshaping gives the operand's
    shape, for every numpy-broadcastable pair of small shapes."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        out_shape = tuple(int(v) for v in rng.integers(2, 4, rng.integers(1, 5)))
        lead = int(rng.integers(0, len(out_shape) + 1))
        in_shape = tuple(1 if rng.random() < 0.5 else d for d in out_shape[lead:])
        axes = unbroadcast_axes(in_shape, out_shape)
        grad = rng.standard_normal(out_shape)
        summed = grad.sum(axis=tuple(axes), keepdims=True).reshape(in_shape)
        # the adjoint of broadcasting: <broadcast(a), g> = <a, unbroadcast(g)>
        a = rng.standard_normal(in_shape)
        assert np.isclose((np.broadcast_to(a, out_shape) * grad).sum(), (a * summed).sum())
