"""Window arithmetic of convolutions and pools, kept apart so each formula is tested on its own.

Along one spatial axis with input length ``n``, kernel ``k``, stride ``s``, dilation ``d`` and
pads ``(b, e)``, the effective kernel is ``K = (k - 1) d + 1`` and output position ``o`` reads the
input positions ``o s - b + j d`` for ``j = 0..k-1``; the output length is
``floor((n + b + e - K) / s) + 1`` (``ceil`` in ceil mode).

* ``conv_transpose_geometry``: the ConvTranspose that maps an output-shaped gradient back to the
  input shape. ConvTranspose yields ``(m - 1) s + K - b - e' + p`` positions for ``m`` inputs;
  we pick ``e'`` and ``output_padding p`` (``0 <= p < s``) so that this is exactly ``n``, and report
  any shortfall as extra zero padding at the end (pools in ceil mode can need it).
* ``flipped_kernel`` / ``flipped_kernel_pads``: for stride 1 the same input gradient is a plain
  Conv of the output gradient with the kernel flipped and its in/out channels swapped (per
  group), pads ``((k - 1) d - b, (k - 1) d - e)`` and the same dilation; onnxruntime runs it
  faster than ConvTranspose.
* ``padding_trick_mask``: 1 where an output position reads only real input, 0 where its
  receptive field covers padding (the paper's App. C.1, exact for every kernel and stride).
* ``border_mask``: the authors' padding trick (``padding_trick="border"``): 0 on a one-position
  border of the output, 1 inside, for a convolution whose output has TensorFlow's SAME size
  ``ceil(n / s)`` on every axis, whatever its kernel; None for any other convolution.
* ``valid_counts``: how many real (non-padding) input positions each output window covers.
* ``unbroadcast_axes``: the axes over which a broadcast operand's gradient must be summed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

Dim = int | str | None


def output_length(n: int, k: int, s: int = 1, d: int = 1, b: int = 0, e: int = 0,
                  ceil_mode: bool = False) -> int:
    effective = (k - 1) * d + 1
    span = n + b + e - effective
    if ceil_mode:
        length = -(-span // s) + 1
        # ONNX/PyTorch: the last window must start inside the input or the left padding.
        if (length - 1) * s >= n + b:
            length -= 1
        return length
    return span // s + 1


def explicit_pads(auto_pad: str, pads: Sequence[int] | None, in_sizes: Sequence[int],
                  kernel: Sequence[int], strides: Sequence[int],
                  dilations: Sequence[int]) -> list[int]:
    """ONNX pads ``[b_1..b_r, e_1..e_r]`` with ``auto_pad`` (SAME_UPPER/LOWER, VALID) resolved."""
    rank = len(kernel)
    if auto_pad in ("", "NOTSET"):
        return list(pads) if pads else [0] * (2 * rank)
    if auto_pad == "VALID":
        return [0] * (2 * rank)
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise ValueError(f"unknown auto_pad {auto_pad!r}")
    begins, ends = [], []
    for n, k, s, d in zip(in_sizes, kernel, strides, dilations):
        out = math.ceil(n / s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


@dataclass(frozen=True)
class TransposeGeometry:
    """Attributes of the ConvTranspose that inverts a window op's shape, plus trailing zero pads."""

    pads: list[int]
    output_padding: list[int]
    extra_end: list[int]

    @property
    def needs_extra(self) -> bool:
        return any(self.extra_end)


def conv_transpose_geometry(in_sizes: Sequence[int], out_sizes: Sequence[int],
                            kernel: Sequence[int], strides: Sequence[int],
                            dilations: Sequence[int], pads: Sequence[int]) -> TransposeGeometry:
    rank = len(kernel)
    begins, ends = list(pads[:rank]), list(pads[rank:])
    new_ends, output_padding, extra = [], [], []
    for i in range(rank):
        full = (out_sizes[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1
        surplus = full - begins[i] - in_sizes[i]  # positions past the input end
        if surplus >= 0:  # crop the positions past the input end with the end pad
            new_ends.append(surplus)
            output_padding.append(0)
            extra.append(0)
        else:  # too short: output_padding (< stride) first, then zero padding
            shortfall = -surplus
            pad = min(shortfall, strides[i] - 1)
            new_ends.append(0)
            output_padding.append(pad)
            extra.append(shortfall - pad)
    return TransposeGeometry(begins + new_ends, output_padding, extra)


def flipped_kernel_pads(n: int, m: int, k: int, d: int, b: int) -> tuple[int, int] | None:
    """Pads of the stride-1 Conv with the flipped kernel that computes a stride-1 convolution's
    input gradient along one axis (input ``n``, output ``m``, kernel ``k``, dilation ``d``,
    begin pad ``b``): ``((k - 1) d - b, (k - 1) d - e)``, or None where one would be negative
    (pads wider than the kernel)."""
    begin = (k - 1) * d - b
    end = n - m - begin + (k - 1) * d
    return (begin, end) if begin >= 0 and end >= 0 else None


def flipped_kernel(weight: np.ndarray, group: int) -> np.ndarray:
    """``W'[g, i, o] = W[g, o, i]`` flipped in every spatial axis, for the stride-1 Conv that maps
    an output gradient back: ``[C_out, C_in / g, k...]`` -> ``[C_in, C_out / g, k...]``."""
    c_out, c_in_group = weight.shape[:2]
    spatial = weight.shape[2:]
    grouped = weight.reshape((group, c_out // group, c_in_group) + spatial)
    swapped = grouped.swapaxes(1, 2)[(Ellipsis,) + (slice(None, None, -1),) * len(spatial)]
    return np.ascontiguousarray(swapped.reshape((group * c_in_group, c_out // group) + spatial))


def receptive_field_inside(n: int, m: int, k: int, s: int, d: int, b: int) -> np.ndarray:
    """Bool ``[m]``: True where output position ``o`` reads only positions inside ``[0, n)``."""
    o = np.arange(m)[:, None]
    read = o * s - b + np.arange(k)[None, :] * d
    return np.all((read >= 0) & (read < n), axis=1)


def padding_trick_mask(in_sizes: Sequence[int], out_sizes: Sequence[int], kernel: Sequence[int],
                       strides: Sequence[int], dilations: Sequence[int],
                       pads: Sequence[int]) -> np.ndarray:
    """Float32 ``[1, 1, *out_sizes]``: 0 where the receptive field covers padding, else 1."""
    rank = len(kernel)
    mask = np.ones((), dtype=bool)
    for i in range(rank):
        inside = receptive_field_inside(in_sizes[i], out_sizes[i], kernel[i], strides[i],
                                        dilations[i], pads[i])
        mask = np.multiply.outer(mask, inside)
    return mask.astype(np.float32)[None, None]


def is_same_shaped(in_sizes: Sequence[int], out_sizes: Sequence[int],
                   strides: Sequence[int]) -> bool:
    """Whether every output length is ``ceil(n / s)``: TensorFlow's SAME output size."""
    return all(o == -(-n // s) for n, o, s in zip(in_sizes, out_sizes, strides))


def border_mask(in_sizes: Sequence[int], out_sizes: Sequence[int],
                strides: Sequence[int]) -> np.ndarray | None:
    """Float32 ``[1, 1, *out_sizes]``: 0 on the first and last position of every spatial axis,
    1 elsewhere, when the output has TensorFlow's SAME size (``is_same_shaped``); else None.

    This is the mask of the RectGrad authors' ``conv2d_grad_override``, which masks a
    one-pixel border of the output gradient of every SAME convolution, 1x1 and strided ones
    included; ``padding_trick_mask`` equals it for 3x3 kernels with stride 1 and pads 1.
    """
    if not is_same_shaped(in_sizes, out_sizes, strides):
        return None
    mask = np.ones((), dtype=bool)
    for length in out_sizes:
        inside = np.ones(length, dtype=bool)
        inside[[0, -1]] = False
        mask = np.multiply.outer(mask, inside)
    return mask.astype(np.float32)[None, None]


def valid_counts(in_sizes: Sequence[int], out_sizes: Sequence[int], kernel: Sequence[int],
                 strides: Sequence[int], pads: Sequence[int]) -> np.ndarray:
    """Float32 ``[1, 1, *out_sizes]``: real input positions covered by each window."""
    counts = np.ones((), dtype=np.float32)
    for i in range(len(kernel)):
        o = np.arange(out_sizes[i])[:, None]
        read = o * strides[i] - pads[i] + np.arange(kernel[i])[None, :]
        per_axis = ((read >= 0) & (read < in_sizes[i])).sum(axis=1).astype(np.float32)
        counts = np.multiply.outer(counts, per_axis)
    return counts[None, None]


def unbroadcast_axes(in_shape: Sequence[Dim], out_shape: Sequence[Dim]) -> list[int] | None:
    """Axes of ``out_shape`` to sum so a gradient takes ``in_shape`` (numpy broadcasting).

    Returns None when the shapes are not known well enough to decide.
    """
    lead = len(out_shape) - len(in_shape)
    if lead < 0:
        return None
    axes = list(range(lead))
    for i, d_in in enumerate(in_shape):
        d_out = out_shape[lead + i]
        if d_in == d_out and d_in is not None:
            continue
        if d_in == 1:
            axes.append(lead + i)
            continue
        return None
    return axes
