"""Eager PyTorch baselines: RectGrad by autograd-function gating, Captum's GuidedBackprop and
Saliency.

``TorchRectGrad`` swaps every ``nn.ReLU`` of a module for a ReLU whose backward is the paper's
rule ``R_z = I(y R > tau) R`` with ``tau`` the per-sample q-th percentile of ``y R`` (torch.topk
per sample, over all non-batch elements; k as in docs/maths.md, 'The percentile threshold'), then
returns ``relu(x dS/dx)``. Every ``nn.ReLU6`` gets the same gate and keeps its own derivative
mask (``R_z = I(y R > tau) I(0 < y < 6) R``, as rectonnx gates a Clip). ``TorchRectGrad(net, q,
compile=backend)`` runs the gated module under ``torch.compile`` (forward and backward). This
is how one writes RectGrad in PyTorch by hand; it is the speed baseline, and it agrees with
rectonnx's graph (checked in tests/test_speed_options.py).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn


def percentile_rank(m: int, q: float) -> int:
    return int(np.round(np.float64(m - 1) * (1.0 - np.float64(q) / 100.0))) + 1


def _rectified(y, upstream, q, inside=None):
    """RectGrad's gate ``I(y R > tau) R`` per sample (and ``inside``, an activation's own
    derivative mask, where it has one)."""
    scores = (y * upstream).reshape(len(y), -1)
    k = percentile_rank(scores.shape[1], q)
    tau = torch.topk(scores, k, dim=1, largest=True, sorted=False).values.min(dim=1).values
    keep = scores > tau[:, None]
    if inside is not None:
        keep = keep & inside.reshape_as(scores)
    return (upstream.reshape_as(scores) * keep).reshape_as(upstream)


class _GatedClip(torch.autograd.Function):
    """``y = clamp(z, 0, high)`` (ReLU: ``high = None``; ReLU6: 6) with RectGrad's gate in the
    backward pass (and ReLU6's own derivative mask ``0 < y < 6``)."""

    @staticmethod
    def forward(ctx, z, q, high):
        y = torch.clamp(z, 0.0, high)
        ctx.save_for_backward(y)
        ctx.q, ctx.high = q, high
        return y

    @staticmethod
    def backward(ctx, upstream):
        (y,) = ctx.saved_tensors
        inside = None if ctx.high is None else (y > 0.0) & (y < ctx.high)
        return _rectified(y, upstream, ctx.q, inside), None, None


class _RectReLU(nn.Module):
    def __init__(self, q: float):
        super().__init__()
        self.q = q

    def forward(self, z):
        return _GatedClip.apply(z, self.q, None)


class _RectReLU6(_RectReLU):
    def forward(self, z):
        return _GatedClip.apply(z, self.q, 6.0)


def _swap_relus(module: nn.Module, q: float) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU6):
            setattr(module, name, _RectReLU6(q))
        elif isinstance(child, nn.ReLU):
            setattr(module, name, _RectReLU(q))
        else:
            _swap_relus(child, q)
    return module


class TorchRectGrad:
    """``TorchRectGrad(net, q)(x, target)`` -> (logits, relu(x dS/dx)) as torch tensors."""

    def __init__(self, net: nn.Module, q: float = 98.0, compile: str | None = None):
        self.net = _swap_relus(copy.deepcopy(net).eval(), q)
        for p in self.net.parameters():
            p.requires_grad_(False)
        if compile:
            # static shapes: a new batch size compiles anew instead of turning dynamic
            self.net = torch.compile(self.net, backend=compile, dynamic=False)

    def __call__(self, x: torch.Tensor, target: torch.Tensor | None = None):
        x = x.detach().requires_grad_(True)
        logits = self.net(x)
        if target is None:
            target = logits.argmax(dim=1)
        score = logits.gather(1, target[:, None]).sum()
        (grad,) = torch.autograd.grad(score, x)
        return logits.detach(), torch.relu(x.detach() * grad)


class CaptumGuided:
    """Captum's GuidedBackprop on the predicted class (``target`` given as a tensor)."""

    def __init__(self, net: nn.Module):
        from captum.attr import GuidedBackprop

        self.net = copy.deepcopy(net).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.method = GuidedBackprop(self.net)

    def __call__(self, x: torch.Tensor, target: torch.Tensor):
        return self.method.attribute(x, target=target)


class CaptumSaliency(CaptumGuided):
    """Captum's Saliency (the signed gradient, ``abs=False``) on the given ``target``."""

    def __init__(self, net: nn.Module):
        from captum.attr import Saliency

        self.net = copy.deepcopy(net).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.method = Saliency(self.net)

    def __call__(self, x: torch.Tensor, target: torch.Tensor):
        return self.method.attribute(x, target=target, abs=False)
