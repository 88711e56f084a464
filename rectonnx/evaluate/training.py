"""Training the paper's CIFAR network in PyTorch on the CPU, and FGSM (paper Sec. 5.2, App. F.2).

The network (App. F.2): Conv3x3-32, Conv3x3-32, MaxPool2, Conv3x3-64, Conv3x3-64, MaxPool2,
Dense-256, Dense-10, ReLU after every layer but the last, SAME padding; ``width`` scales the
channel and unit counts (``width=1`` is the paper's). Weights start Glorot-uniform with zero
biases (Keras' defaults, which the authors' TensorFlow code used), Adam with learning rate
1e-3 and batches of 32 (the Keras defaults), the paper's 20 epochs when asked for. Training is
deterministic for a seed on the CPU (torch's generator for the weights, numpy's for the batch
order); ``device="cuda"`` trains on a GPU when torch has one (the paper's protocol in hours).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import numpy as np


def _torch():
    from ..errors import require

    return require("torch", "evaluate", "rectonnx evaluate (training the paper's CNN)")


def paper_cnn(num_classes: int = 10, width: float = 1.0, image_size: int = 32,
              in_channels: int = 3):
    """The paper's CIFAR CNN as a ``torch.nn.Sequential`` (every ReLU its own module)."""
    torch = _torch()
    nn = torch.nn
    c1, c2, hidden = (max(1, round(n * width)) for n in (32, 64, 256))
    side = image_size // 4
    net = nn.Sequential(
        nn.Conv2d(in_channels, c1, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * side * side, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes))
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    return net


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    width: float = 1.0
    device: str = "cpu"               # a torch device: "cpu", "cuda", ...


def set_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads in torch (default: all cores)."""
    _torch().set_num_threads(max(1, threads or os.cpu_count() or 1))


def train(images: np.ndarray, labels: np.ndarray, settings: TrainSettings, *, seed: int,
          num_classes: int, progress=None, start_from=None):
    """A paper CNN trained on ``images`` ``[N, C, H, W]``, in eval mode: freshly initialised, or
    a copy of ``start_from`` trained further (fine-tuning)."""
    torch = _torch()
    torch.manual_seed(seed)
    model = copy.deepcopy(start_from) if start_from is not None else \
        paper_cnn(num_classes, settings.width, images.shape[-1], images.shape[1])
    model.to(settings.device)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    x = torch.from_numpy(np.ascontiguousarray(images, np.float32)).to(settings.device)
    y = torch.from_numpy(np.array(labels, np.int64)).to(settings.device)
    order_rng = np.random.default_rng([seed, 0x7A1])
    model.train()
    for _ in range(settings.epochs):
        order = torch.from_numpy(order_rng.permutation(len(x))).to(settings.device)
        for start in range(0, len(x), settings.batch_size):
            batch = order[start:start + settings.batch_size]
            optimiser.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimiser.step()
        if progress is not None:
            progress.update(1)
    return model.eval()


def predict(model, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Logits ``[N, classes]`` as float32."""
    torch = _torch()
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            out.append(model(torch.from_numpy(np.ascontiguousarray(
                images[start:start + batch_size], np.float32)).to(device)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def accuracy(model, images: np.ndarray, labels: np.ndarray) -> float:
    return float((predict(model, images).argmax(axis=1) == labels).mean())


def fgsm(model, images: np.ndarray, labels: np.ndarray, epsilon: float,
         clip: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """Goodfellow et al.'s fast gradient sign method: ``x + epsilon sign(d loss / d x)`` with the
    cross-entropy of ``labels``, clipped to the input range."""
    torch = _torch()
    device = next(model.parameters()).device
    x = torch.tensor(np.asarray(images, np.float32), requires_grad=True, device=device)
    loss = torch.nn.functional.cross_entropy(
        model(x), torch.from_numpy(np.asarray(labels, np.int64)).to(device), reduction="sum")
    loss.backward()
    adversarial = x.detach() + epsilon * x.grad.sign()
    return adversarial.clamp(*clip).cpu().numpy()


def to_onnx(model, sample_shape: tuple[int, ...]):
    """The trained network as an ONNX model with a symbolic batch (rectonnx.converters)."""
    torch = _torch()
    from ..converters.pytorch import export

    return export(copy.deepcopy(model).cpu().eval(), torch.zeros((1, *sample_shape)))
