"""Train the RectGrad paper's CIFAR CNN and export it to ``models/paper_cnn_digits.onnx``.

The network is the one of the paper's evaluation (docs/maths.md, "The paper's network and
evaluation metrics"), layer for layer:
Conv3x3-32, ReLU, Conv3x3-32, ReLU, MaxPool2, Conv3x3-64, ReLU, Conv3x3-64, ReLU, MaxPool2,
Flatten, Dense-256, ReLU, Dense-10 (all convolutions padded by 1), trained with Adam on images
scaled to [-1, 1]. CIFAR-10 cannot be downloaded here, so by default it trains on the
synthetic digits-on-photos set of ``rectonnx.datasets`` (50000 images made from the first 1300
scikit-learn digit scans, tested on 2000 images made from the other 497 with another seed),
5 epochs, Adam with the learning rate decayed along a cosine; ``--cifar10 DIR`` trains on a
local CIFAR-10 copy instead. Everything is seeded and runs on two CPU threads. Default run
(about 3.5 minutes on 2 otherwise idle cores, 93 % test accuracy):

    python models/train_paper_cnn.py

It writes ``<name>.onnx`` (opset 17, input "input" [N, 3, 32, 32], output "logits" [N, 10],
dynamic batch), checks it against torch with onnxruntime, writes ``<name>.json`` (accuracy,
settings, preprocessing, timing) and, for digits, six test images as PNG to ``models/images``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rectonnx.datasets import LabelledImages, digits_on_photos, load_cifar10, to_uint8

HERE = Path(__file__).resolve().parent
DEMO_IMAGES = 6


def paper_cnn(num_classes: int = 10) -> nn.Sequential:
    """The paper's CIFAR network for 3 x 32 x 32 inputs."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 256), nn.ReLU(),
        nn.Linear(256, num_classes),
    )


def load_data(args: argparse.Namespace) -> tuple[LabelledImages, LabelledImages, str]:
    """Train set, test set and a one-line description of where they come from."""
    if args.cifar10:
        train, test = load_cifar10(args.cifar10, "train"), load_cifar10(args.cifar10, "test")
        return train, test, f"CIFAR-10 from {args.cifar10} (50000 train / 10000 test)"
    train = digits_on_photos(args.train_size, seed=args.data_seed, split="train")
    test = digits_on_photos(args.test_size, seed=args.data_seed + 1, split="test")
    description = (
        f"rectonnx.datasets.digits_on_photos: {args.train_size} train images "
        f"(split='train', seed={args.data_seed}: sklearn load_digits scans 0..1299) and "
        f"{args.test_size} test images (split='test', seed={args.data_seed + 1}: scans "
        "1300..1796, never seen in training); a handwritten digit (upscaled to 14..22 px, "
        "colour contrasting with the background) alpha-composited on a random crop of one of "
        "9 real photos bundled with scikit-learn/scikit-image; 32x32 RGB, 10 balanced classes"
    )
    return train, test, description


def train(
    model: nn.Module, data: LabelledImages, test: LabelledImages, args: argparse.Namespace
) -> list[dict]:
    """Adam on cross-entropy over shuffled mini-batches, the learning rate decayed to 0 along a
    cosine over all steps (``--constant-lr`` keeps it); per epoch: loss, test accuracy, time.

    Batches are channels-last, which is about twice as fast for these small convolutions on CPU.
    """
    images = torch.from_numpy(data.images).contiguous(memory_format=torch.channels_last)
    labels = torch.from_numpy(data.labels)
    model.to(memory_format=torch.channels_last)
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps = args.epochs * -(-len(labels) // args.batch_size)

    def lr_factor(step: int) -> float:
        return 1.0 if args.constant_lr else 0.5 * (1.0 + float(np.cos(np.pi * step / steps)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_factor)
    loss_fn = nn.CrossEntropyLoss()
    order_rng = torch.Generator().manual_seed(args.seed)
    history = []
    for epoch in range(args.epochs):
        start = time.perf_counter()
        model.train()
        order = torch.randperm(len(labels), generator=order_rng)
        total, count = 0.0, 0
        for batch in order.split(args.batch_size):
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(model(images[batch]), labels[batch])
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * len(batch)
            count += len(batch)
        seconds = time.perf_counter() - start
        test_acc = accuracy(predict(model, test.images), test.labels)
        history.append({"epoch": epoch + 1, "loss": round(total / count, 4),
                        "test_accuracy": round(test_acc, 4), "seconds": round(seconds, 1)})
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total / count:.4f}, "
              f"test accuracy {test_acc:.4f} ({seconds:.0f} s)", flush=True)
    model.to(memory_format=torch.contiguous_format)
    return history


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    model.eval()
    x = torch.from_numpy(images)
    return torch.cat([model(part) for part in x.split(batch_size)]).numpy()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def export_onnx(model: nn.Module, path: Path) -> None:
    model.eval()
    x = torch.zeros(1, 3, 32, 32)
    torch.onnx.export(
        model, x, str(path), dynamo=False, opset_version=17,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
    )


def check_onnx(path: Path, images: np.ndarray, expected: np.ndarray) -> float:
    """Largest |onnxruntime - torch| logit difference; raises if above 1e-4."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(onnx.load(str(path)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"input": images})[0]
    error = float(np.abs(got - expected).max())
    if error > 1e-4:
        raise AssertionError(f"{path.name}: onnxruntime differs from torch by {error:.2e} > 1e-4")
    return error


def save_demo_images(test: LabelledImages, logits: np.ndarray, folder: Path) -> list[dict]:
    """The first test image of each of the first six labels, as PNG (a correctly classified one
    where there is one)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(test.images)
    right = logits.argmax(axis=1) == test.labels
    saved = []
    for k in range(DEMO_IMAGES):
        candidates = np.flatnonzero((test.labels == k) & right)
        i = int(candidates[0] if candidates.size else np.flatnonzero(test.labels == k)[0])
        name = f"digits_{i}_label{k}.png"
        Image.fromarray(pixels[i]).save(folder / name)
        saved.append({"file": f"images/{name}", "index": i, "label": k})
    return saved


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cifar10", metavar="DIR", help="train on a local CIFAR-10 copy")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-size", type=int, default=50000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--constant-lr", action="store_true", help="no cosine decay")
    parser.add_argument("--seed", type=int, default=0, help="torch init and batch order")
    parser.add_argument("--data-seed", type=int, default=0, help="digits-on-photos seed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=HERE)
    parser.add_argument("--name", help="output stem (default paper_cnn_digits / paper_cnn_cifar10)")
    args = parser.parse_args(argv)
    name = args.name or ("paper_cnn_cifar10" if args.cifar10 else "paper_cnn_digits")
    args.out_dir.mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    train_set, test_set, description = load_data(args)
    data_seconds = time.perf_counter() - start
    print(f"data: {len(train_set)} train, {len(test_set)} test ({data_seconds:.1f} s)", flush=True)

    model = paper_cnn(len(train_set.class_names))
    start, cpu_start = time.perf_counter(), time.process_time()
    history = train(model, train_set, test_set, args)
    train_seconds = time.perf_counter() - start
    train_cpu_seconds = time.process_time() - cpu_start

    test_logits = predict(model, test_set.images)
    test_acc = accuracy(test_logits, test_set.labels)
    train_acc = accuracy(predict(model, train_set.images), train_set.labels)
    print(f"accuracy: train {train_acc:.4f}, test {test_acc:.4f}; training {train_seconds:.0f} s")

    onnx_path = args.out_dir / f"{name}.onnx"
    export_onnx(model, onnx_path)
    onnx_error = check_onnx(onnx_path, test_set.images[:256], test_logits[:256])
    print(f"wrote {onnx_path} (onnxruntime matches torch to {onnx_error:.1e})")

    demo = [] if args.cifar10 else save_demo_images(test_set, test_logits, args.out_dir / "images")
    report = {
        "model": "RectGrad paper CIFAR CNN: Conv3x3-32, ReLU, Conv3x3-32, ReLU, MaxPool2, "
                 "Conv3x3-64, ReLU, Conv3x3-64, ReLU, MaxPool2, Flatten, Dense-256, ReLU, "
                 "Dense-10 (convolutions padded by 1)",
        "dataset": description,
        "input": {"name": "input", "shape": ["N", 3, 32, 32],
                  "layout": "NCHW float32, RGB scaled to [-1, 1]",
                  "scaling": "x = uint8 / 127.5 - 1"},
        # rectonnx.images.Preprocess: (pixel / 255 - 0.5) / 0.5 = pixel / 127.5 - 1
        "preprocess": {"size": [32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        "output": {"name": "logits", "shape": ["N", len(train_set.class_names)]},
        "classes": list(train_set.class_names),
        "test_accuracy": round(test_acc, 4),
        "train_accuracy": round(train_acc, 4),
        "test_size": len(test_set),
        "train_size": len(train_set),
        "epochs": args.epochs,
        "optimiser": f"Adam lr={args.lr}, "
                     + ("constant" if args.constant_lr else "cosine decay to 0 over all steps")
                     + f", batch {args.batch_size}, cross-entropy",
        "seeds": {"torch": args.seed, "data_train": args.data_seed,
                  "data_test": args.data_seed + 1},
        "threads": args.threads,
        "data_seconds": round(data_seconds, 1),
        "training_seconds": round(train_seconds, 1),
        # CPU time of all threads: wall time on a shared machine can be much longer
        "training_cpu_seconds": round(train_cpu_seconds, 1),
        "history": history,
        "onnx": {"opset": 17, "max_abs_diff_vs_torch": onnx_error},
        "torch": torch.__version__,
        "command": "python models/train_paper_cnn.py"
                   + (f" --cifar10 {args.cifar10}" if args.cifar10 else ""),
        "demo_images": demo,
    }
    json_path = args.out_dir / f"{name}.json"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
