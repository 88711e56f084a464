"""The paper's experiments (Sec. 3, 5.1-5.3) on a dataset, with networks trained here in PyTorch.

Every attribution comes from a rectonnx explainer graph (``rewrite``) of the trained network,
run by onnxruntime, so the baselines and RectGrad are compared inside the same engine. The
methods (``METHODS``) follow Sec. 5.3: the baselines with the paper's final thresholding at the
95th percentile (``final_percentile``), RectGrad with ``q = 98`` and the padding trick, and a
random baseline (uniform noise, thresholded like the baselines; a random pixel order in ROAR/KAR).
Maps explain the true label (occlusion, noise) or the predicted class (ROAR/KAR by default,
class sensitivity).

Experiments (``EXPERIMENTS``), metrics in metrics.py:

* ``occlusion``: a second network is trained on images whose top-left 10x10 is one fixed patch
  of uniform noise over the input range (``[-1, 1]``: uniform ``[0, 1]`` pixels); test images
  carry the patch too. Per test image: the share of ``|A|`` in the patch's inner 8x8
  (Sec. 3, Fig. 3 and 7).
* ``noise``: correctly classified test images, as many per class (the paper: 100, 10 per class);
  the share of ``|A|`` outside the object mask (needs masks: digits-on-photos) and the total
  variation of the map (Fig. 8).
* ``roar_kar``: every training and test image's pixels ranked per method; at each fraction the
  top (ROAR) or bottom (KAR) pixels are replaced by the per-channel training mean, a network is
  trained on the modified training set (``repeats`` times) and tested on the modified test set;
  ROAR AUC and KAR AOC (Fig. 9, Table 1). The maps explain the trained network's predicted
  class (``roar_target="predicted"``): maps of the true label leak it through the very shape of
  the kept or removed pixels (on the default data, a network trained on KAR's mask alone, the
  kept positions white and the rest grey, reaches 0.68 accuracy with Grad * Input's label maps
  where the network itself reaches 0.49), which rewards class templates over evidence;
  ``roar_target="label"`` ranks by the label's maps all the same. ``retrain="scratch"`` trains
  from a fresh
  initialisation as Hooker et al. and the paper do; ``retrain="finetune"`` (the quick default)
  starts from the trained network's weights.
* ``sensitivity``: FGSM (``epsilon`` in input units) on correctly classified test images; for
  the images whose predicted class flips, how much each map changes (``map_change``) between
  the image (its class) and the adversarial image (its new class); unflipped ones for contrast.
* ``q_sweep``: RectGrad (padding trick) for each ``q``: the share of non-zero attribution and
  maps of a few images (Sec. 5.1, Fig. 4).
* ``layers``: the gradient reaching each hidden activation (``rewrite(..., layer_outputs=True)``)
  for saliency and RectGrad, channel means (Fig. 6, noise accumulation).
* ``sanity``: Adebayo et al.'s cascading model-parameter randomization on the ONNX network
  (checks.py): Spearman rank correlation and SSIM with the trained network's maps per depth.
* ``deletion``: deletion and insertion curves of the predicted class's probability, no
  retraining (checks.py).

The network (``network="auto"``, the default): the shipped paper CNN
(models/paper_cnn_digits.onnx, 0.93 test accuracy) when its sidecar matches the data and the
width (``shipped_network_match``), else one trained here. Intervals, paired tests and the paper
beside us: evidence.py and stats.py.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from . import metrics
from . import training

EXPERIMENTS = ("occlusion", "noise", "roar_kar", "sensitivity", "q_sweep", "layers",
               "sanity", "deletion")
DEFAULT_METHODS = ("random", "saliency", "grad_input", "guided_backprop", "smoothgrad",
                   "integrated_gradients", "deeplift", "rectgrad")
Q_VALUES = (0.0, 20.0, 50.0, 80.0, 90.0, 95.0, 98.0, 99.0)
# Below this test accuracy the network is too weak for the tables to be evidence about the
# methods (the default run's network, models/paper_cnn_digits.onnx, reaches 0.93; the paper's
# CIFAR-10 network 0.746): the run warns, on the console, in summary.md and report.html.
LOW_ACCURACY = 0.85
# The shipped paper CNN that the default run reuses when its data and architecture match.
SHIPPED_NETWORK = "paper_cnn_digits"
QUICK_METHODS = ("random", "saliency", "rectgrad")


class LowAccuracyWarning(UserWarning):
    """The trained network's test accuracy is below ``LOW_ACCURACY``."""
PATCH = 10          # the occluding patch is PATCH x PATCH at the top-left corner
INNER = (1, 9)      # its inner 8x8 (rows/columns 1..8): the 3x3 filters see only the patch


@dataclass(frozen=True)
class MethodSpec:
    key: str
    label: str
    method: str | None            # a rectonnx method; None = random maps
    options: dict = field(default_factory=dict)

    @property
    def spec(self):
        """The validated ``rectonnx.ExplanationSpec`` (None for random maps)."""
        from ..spec import ExplanationSpec

        return None if self.method is None else ExplanationSpec(self.method, **self.options)


def method_specs(keys, *, final_percentile: float | None = 95.0, samples: int = 50,
                 steps: int = 50, q: float = 98.0) -> list[MethodSpec]:
    """The compared methods, configured as in the paper's Sec. 5.3."""
    final = {} if final_percentile is None else {"final_percentile": final_percentile}
    rect = {"q": q, "padding_trick": True}
    known = {
        "random": ("Random", None, final),
        "saliency": ("Saliency", "saliency", final),
        "grad_input": ("Grad * Input", "grad_input", final),
        "guided_backprop": ("Guided BP", "guided_backprop", final),
        "deconvnet": ("Deconvnet", "deconvnet", final),
        "smoothgrad": ("SmoothGrad", "smoothgrad", {"samples": samples, **final}),
        "integrated_gradients": ("IntegGrad", "integrated_gradients",
                                 {"steps": steps, **final}),
        "deeplift": ("DeepLIFT", "deeplift", final),
        "epsilon_lrp": ("Epsilon-LRP", "epsilon_lrp", final),
        "rectgrad": ("RectGrad", "rectgrad", rect),
        "rectgrad_prr": ("RectGrad PRR", "rectgrad", {**rect, "prr": True}),
    }
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(known)}")
    return [MethodSpec(k, *known[k]) for k in keys]


@dataclass(frozen=True)
class EvalConfig:
    """What to run and how big. The defaults finish in under 20 minutes on two CPU cores:
    the shipped paper CNN (``network="auto"``, 0.93 test accuracy) when the data match it,
    3 fine-tuned networks per ROAR/KAR point; ``paper()`` gives the paper's protocol (20
    epochs, 3 networks per ROAR/KAR point, from scratch)."""

    out: str = "rectonnx-eval"
    cifar10: str | None = None        # a local CIFAR-10 python-version directory
    train_size: int | None = 1000     # None = the whole training split
    test_size: int | None = 500
    epochs: int = 10
    width: float = 1.0                # channel multiplier of the paper's CNN (1 = the paper's)
    # "auto": reuse the shipped paper CNN (models/paper_cnn_digits.onnx) when it matches the
    # data and the width (digits on photos, width 1), else train; "train": always train; or
    # the path of an ONNX paper CNN (its initializers are loaded into the torch network)
    network: str = "auto"
    retrain: str = "finetune"         # "scratch" (the paper) or "finetune"
    retrain_epochs: int = 1
    repeats: int = 3
    roar_target: str = "predicted"    # the class ROAR/KAR ranks explain: "predicted" or "label"
    fractions: tuple[float, ...] = (0.1, 0.5, 0.9)
    methods: tuple[str, ...] = DEFAULT_METHODS
    experiments: tuple[str, ...] = EXPERIMENTS
    final_percentile: float | None = 95.0
    smoothgrad_samples: int = 10
    ig_steps: int = 10
    occlusion_images: int = 200
    noise_images: int = 100
    sensitivity_images: int = 100
    fgsm_epsilon: float = 0.01
    q_values: tuple[float, ...] = Q_VALUES
    q_images: int = 50
    figure_images: int = 4
    sanity_images: int = 16           # cascading randomization (Adebayo et al. 2018)
    deletion_images: int = 100        # deletion / insertion curves
    deletion_steps: int = 16
    bootstrap: int = 1000             # bootstrap resamples of the per-image intervals
    seed: int = 0
    threads: int | None = 1           # torch threads of this process (None: all cores)
    workers: int | None = None        # ROAR/KAR training processes (None: cores; 1 on a GPU)
    device: str = "cpu"               # torch device for training ("cuda" on a GPU machine)
    progress: bool = True

    def paper(self) -> "EvalConfig":
        """The paper's protocol (Sec. 5.3, App. F.2) on this config's data."""
        return replace(self, epochs=20, width=1.0, retrain="scratch", retrain_epochs=20,
                       repeats=3, network="train",
                       fractions=(0.1, 0.3, 0.5, 0.7, 0.9), smoothgrad_samples=50,
                       ig_steps=50, noise_images=100, train_size=None if self.cifar10 else
                       max(self.train_size or 0, 20000), test_size=None if self.cifar10 else
                       max(self.test_size or 0, 2000))

    def quick(self) -> "EvalConfig":
        """A smoke run in about a minute on two CPU cores: 3000 training and 500 test images,
        5 epochs (test accuracy about 0.55-0.6), three methods, every experiment but occlusion
        (it trains a second network from scratch), ROAR/KAR at the one fraction 0.5 with one
        epoch of fine-tuning in this process (six short trainings: starting worker processes
        would cost more than they save), fewer images per experiment. Its numbers show that
        everything runs, not the paper's results."""
        return replace(self, train_size=3000, test_size=500, epochs=5, width=0.5,
                       network="train", sanity_images=4, deletion_images=20, deletion_steps=8,
                       bootstrap=200,
                       retrain="finetune", retrain_epochs=1, repeats=1, fractions=(0.5,),
                       workers=1, methods=QUICK_METHODS, smoothgrad_samples=5, ig_steps=5,
                       experiments=tuple(e for e in EXPERIMENTS if e != "occlusion"),
                       occlusion_images=100, noise_images=50, sensitivity_images=50,
                       q_values=(0.0, 50.0, 90.0, 98.0), q_images=20, figure_images=3)

    def check(self) -> None:
        unknown = [e for e in self.experiments if e not in EXPERIMENTS]
        if unknown:
            raise ValueError(f"unknown experiment(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(EXPERIMENTS)}")
        if self.retrain not in ("scratch", "finetune"):
            raise ValueError(f"retrain must be 'scratch' or 'finetune', got {self.retrain!r}")
        if self.roar_target not in ("predicted", "label"):
            raise ValueError(f"roar_target must be 'predicted' or 'label', got "
                             f"{self.roar_target!r}")
        if not self.fractions or not all(0 < f < 1 for f in self.fractions):
            raise ValueError(f"fractions must lie in (0, 1), got {self.fractions}")
        if self.epochs < 1 or self.retrain_epochs < 1 or self.repeats < 1:
            raise ValueError("epochs, retrain_epochs and repeats must be >= 1")
        if self.network not in ("auto", "train") and not Path(self.network).is_file():
            raise ValueError(f"network must be 'auto', 'train' or an ONNX file, got "
                             f"{self.network!r}")
        method_specs(self.methods)


# ---------------------------------------------------------------------------------------------
# data
@dataclass(frozen=True)
class Data:
    name: str
    description: str
    train: object                     # rectonnx.datasets.LabelledImages
    test: object


def load_data(config: EvalConfig) -> Data:
    from .. import datasets

    if config.cifar10:
        train = _subset(datasets.load_cifar10(config.cifar10, "train"), config.train_size,
                        config.seed)
        test = _subset(datasets.load_cifar10(config.cifar10, "test"), config.test_size,
                       config.seed + 1)
        return Data("cifar10", f"CIFAR-10 from {config.cifar10} ({len(train)} training and "
                    f"{len(test)} test images, scaled to [-1, 1])", train, test)
    train = datasets.digits_on_photos(config.train_size or 20000, seed=config.seed,
                                      split="train")
    # the test images: the held-out digit scans with seed + 1, as models/train_paper_cnn.py
    test = datasets.digits_on_photos(config.test_size or 2000, seed=config.seed + 1,
                                     split="test")
    return Data("digits_on_photos", f"digits on photos (rectonnx.datasets.digits_on_photos: "
                f"scikit-learn's handwritten digits composited onto crops of bundled photos, "
                f"32x32 RGB in [-1, 1], exact object masks; {len(train)} training images from "
                f"the first 1300 digit scans (seed {config.seed}), {len(test)} test images "
                f"from the other 497 (seed {config.seed + 1}))",
                train, test)


def _subset(data, size: int | None, seed: int):
    if size is None or size >= len(data):
        return data
    from ..datasets import LabelledImages

    pick = np.sort(np.random.default_rng([seed, 0x5B]).choice(len(data), size, replace=False))
    return LabelledImages(data.images[pick], data.labels[pick],
                          None if data.masks is None else data.masks[pick], data.class_names)


def balanced_correct(labels: np.ndarray, predicted: np.ndarray, count: int,
                     classes: int) -> np.ndarray:
    """Indices of up to ``count`` correctly classified images, ``count // classes`` per class
    (the paper's "10 correctly classified images of each class"), in index order."""
    per_class = max(1, count // classes)
    picked = [np.flatnonzero((labels == c) & (predicted == c))[:per_class]
              for c in range(classes)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


# ---------------------------------------------------------------------------------------------
# attribution maps through explainer graphs
class Attributor:
    """Explainer graphs of one ONNX model, one onnxruntime session per method, run in chunks."""

    def __init__(self, model, *, threads: int | None = None, seed: int = 0,
                 progress: bool = False, chunk: int = 512):
        self.model = model
        self.threads = threads
        self.seed = seed
        self.progress = progress
        self.chunk = chunk
        self._sessions: dict = {}

    def session(self, method: str, options: dict):
        import onnxruntime as ort

        from ..rewrite import rewrite
        from ..spec import ExplanationSpec

        spec = ExplanationSpec(method, **options)  # validated once, the session's key
        key = spec.to_json()
        if key not in self._sessions:
            graph = rewrite(self.model, spec)
            settings = ort.SessionOptions()
            settings.log_severity_level = 3
            # no spin-waiting between runs: torch trains in this process and others
            settings.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if self.threads:
                settings.intra_op_num_threads = self.threads
            self._sessions[key] = ort.InferenceSession(graph.SerializeToString(), settings,
                                                       providers=["CPUExecutionProvider"])
        return self._sessions[key]

    def run(self, method: str, options: dict, images: np.ndarray, targets: np.ndarray,
            outputs: list[str] | None = None, label: str | None = None) -> list[np.ndarray]:
        session = self.session(method, options)
        copies = int(options.get("samples", options.get("steps", 1))) + 1
        step = max(1, self.chunk // copies)
        feed = session.get_inputs()[0].name
        parts = []
        starts = range(0, len(images), step)
        if self.progress and len(starts) > 1:
            from tqdm import tqdm
            starts = tqdm(starts, desc=f"  {label or method}", unit="batch", leave=False)
        for start in starts:
            parts.append(session.run(outputs, {
                feed: np.ascontiguousarray(images[start:start + step], np.float32),
                "target": np.asarray(targets[start:start + step], np.int64)}))
        return [np.concatenate(p) for p in zip(*parts)]

    def maps(self, spec: MethodSpec, images: np.ndarray, targets: np.ndarray,
             salt: int = 0) -> np.ndarray:
        """The attribution maps of ``spec`` for ``images`` explaining ``targets``."""
        if len(images) == 0:
            return np.zeros(images.shape, np.float32)
        if spec.method is None:
            return random_maps(images.shape, spec.options.get("final_percentile"),
                               np.random.default_rng([self.seed, 0xAA, salt]))
        return self.run(spec.method, spec.options, images, targets, ["attribution"],
                        spec.label)[0]


def random_maps(shape, final_percentile: float | None, rng) -> np.ndarray:
    """Uniform ``[0, 1)`` noise, final-thresholded like the baselines."""
    maps = rng.random(shape, dtype=np.float32)
    if final_percentile is None:
        return maps
    from ..threshold import percentile_rank

    flat = maps.reshape(len(maps), -1)
    k = percentile_rank(flat.shape[1], final_percentile)
    tau = -np.partition(-flat, k - 1, axis=1)[:, k - 1:k]
    return np.where(flat > tau, flat, 0).reshape(shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# the experiments
@dataclass
class Context:
    config: EvalConfig
    data: Data
    specs: list[MethodSpec]
    model: object = None               # the trained torch network
    onnx_model: object = None
    attributor: Attributor | None = None
    accuracy: float = float("nan")
    network: dict = field(default_factory=dict)   # where the network came from, and why
    figures: dict = field(default_factory=dict)   # in-memory pictures for report.py

    @property
    def settings(self) -> training.TrainSettings:
        return training.TrainSettings(epochs=self.config.epochs, width=self.config.width,
                                      device=self.config.device)

    @property
    def workers(self) -> int:
        import os

        if self.config.workers:
            return self.config.workers
        return 1 if self.config.device != "cpu" else max(1, os.cpu_count() or 1)

    @property
    def classes(self) -> int:
        return len(self.data.train.class_names)

    def bar(self, total: int, desc: str):
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit="step", disable=not self.config.progress)


def shipped_network_match(config: EvalConfig, data: Data) -> tuple[str | None, str]:
    """``(path, why)``: the shipped paper CNN's path when the evaluation may reuse it, else
    ``(None, why not)``. It may when its sidecar says it is the paper's CNN (width 1) trained
    on digits on photos from the training digit scans (``split="train"``, 0..1299) at 32x32
    in ``[-1, 1]`` with classes "0".."9", and this evaluation runs on the same data set at the
    same size and width: its training images come from the same scans and generator (not the
    same images: another count draws other images), its test images from the held-out scans
    (1300..1796) that the network never saw. The accuracy is then measured on this run's
    test set (``train_base``)."""
    if config.network != "auto":
        return None, f"network={config.network!r}"
    if config.cifar10 or data.name != "digits_on_photos":
        return None, "the data are not digits on photos"
    if config.width != 1.0:
        return None, f"width {config.width:g}: the shipped network has width 1"
    try:
        from .. import models
        path, info = models.path(SHIPPED_NETWORK), models.info(SHIPPED_NETWORK)
    except (ImportError, FileNotFoundError) as error:
        return None, f"no shipped network ({error})"
    checks = {
        "data set digits_on_photos": "digits_on_photos" in info.get("dataset", ""),
        "training split 'train' (scans 0..1299)": "split='train'" in info.get("dataset", ""),
        "input [N, 3, 32, 32]": info.get("input", {}).get("shape") == ["N", 3, 32, 32]
        and tuple(data.train.images.shape[1:]) == (3, 32, 32),
        "scaling to [-1, 1]": "[-1, 1]" in info.get("input", {}).get("layout", ""),
        "classes 0..9": tuple(info.get("classes", ())) == tuple(data.train.class_names),
        "the paper's CNN": "Conv3x3-32" in info.get("model", ""),
    }
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        return None, "the sidecar does not match: " + ", ".join(failed)
    return str(path), ("its sidecar matches this run's data and network: " +
                       ", ".join(checks) + f"; trained with seeds {info.get('seeds')} on "
                       f"{info.get('train_size')} images (sidecar test accuracy "
                       f"{info.get('test_accuracy')}); this run's test images come from the "
                       "held-out scans")


def _shipped_path():
    try:
        from .. import models
        return models.path(SHIPPED_NETWORK)
    except (ImportError, FileNotFoundError):
        return None


def load_network(path: str, classes: int, width: float, sample_shape) -> tuple:
    """``(torch network, onnx model)`` from an ONNX paper CNN: every initializer loaded into
    ``training.paper_cnn`` by name (``0.weight`` ... ``13.bias``, torch's export names)."""
    import onnx
    from onnx import numpy_helper

    torch = training._torch()
    model = onnx.load(path)
    net = training.paper_cnn(classes, width, sample_shape[-1], sample_shape[0])
    weights = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy())
               for i in model.graph.initializer}
    state = net.state_dict()
    missing = [k for k in state if k not in weights or tuple(weights[k].shape) !=
               tuple(state[k].shape)]
    if missing:
        raise ValueError(f"{path} is not a paper CNN of width {width:g}: no matching "
                         f"initializer for {', '.join(missing)}")
    net.load_state_dict({k: weights[k] for k in state})
    return net.eval(), model


def train_base(ctx: Context) -> None:
    data, config = ctx.data, ctx.config
    path, why = shipped_network_match(config, data)
    if path is None and config.network not in ("auto", "train"):
        path, why = config.network, "given with --network"
    ctx.network = {"source": "trained here", "why": why}
    if path is not None:
        model, onnx_model = load_network(path, ctx.classes, config.width,
                                         data.train.images.shape[1:])
        accuracy = training.accuracy(model, data.test.images, data.test.labels)
        if accuracy >= LOW_ACCURACY or config.network != "auto":
            ctx.model, ctx.onnx_model, ctx.accuracy = model, onnx_model, accuracy
            shipped = path == str(_shipped_path())
            ctx.network = {"source": f"models/{SHIPPED_NETWORK}.onnx (rectonnx.models)"
                           if shipped else path, "why": why, "reused": True}
        else:
            ctx.network["why"] = (f"{path} reaches only {accuracy:.3f} on this run's test "
                                  "images")
    if ctx.model is None:
        with ctx.bar(config.epochs, "train network") as bar:
            ctx.model = training.train(data.train.images, data.train.labels, ctx.settings,
                                       seed=config.seed, num_classes=ctx.classes, progress=bar)
        ctx.accuracy = training.accuracy(ctx.model, data.test.images, data.test.labels)
        ctx.onnx_model = training.to_onnx(ctx.model, data.train.images.shape[1:])
    ctx.attributor = Attributor(ctx.onnx_model, seed=config.seed,
                                progress=config.progress)


def patched(images: np.ndarray, patch: np.ndarray) -> np.ndarray:
    out = images.copy()
    out[:, :, :PATCH, :PATCH] = patch
    return out


def occlusion(ctx: Context) -> dict:
    """Training-dataset occlusion (Sec. 3 and 5.3, Fig. 3 and 7)."""
    config, data = ctx.config, ctx.data
    channels = data.train.images.shape[1]
    patch = np.random.default_rng([config.seed, 0x0CC]).uniform(
        -1.0, 1.0, (channels, PATCH, PATCH)).astype(np.float32)
    train_images, test_images = patched(data.train.images, patch), patched(data.test.images,
                                                                           patch)
    # a reused (pretrained) network is fine-tuned on the patched images, else trained afresh
    reused = ctx.network.get("reused", False)
    settings = replace(ctx.settings, epochs=max(2, config.retrain_epochs)) if reused else \
        ctx.settings
    with ctx.bar(settings.epochs, "train on patched data") as bar:
        model = training.train(train_images, data.train.labels, settings,
                               seed=config.seed + 1, num_classes=ctx.classes, progress=bar,
                               start_from=ctx.model if reused else None)
    accuracy = training.accuracy(model, test_images, data.test.labels)
    attributor = Attributor(training.to_onnx(model, train_images.shape[1:]),
                            seed=config.seed, progress=config.progress)
    chosen = np.arange(min(config.occlusion_images, len(test_images)))
    region = np.zeros(test_images.shape[2:], bool)
    region[INNER[0]:INNER[1], INNER[0]:INNER[1]] = True
    shares, pictures = {}, {}
    for spec in ctx.specs:
        maps = attributor.maps(spec, test_images[chosen], data.test.labels[chosen], salt=1)
        shares[spec.label] = metrics.region_share(maps, region).tolist()
        pictures[spec.label] = maps[:config.figure_images]
    ctx.figures["occlusion"] = (test_images[:config.figure_images], pictures)
    return {"accuracy_patched": accuracy, "accuracy_clean": ctx.accuracy,
            "training": (f"fine-tuned from the network {settings.epochs} epochs" if reused
                         else f"trained from scratch {settings.epochs} epochs"),
            "images": len(chosen), "patch_share": shares,
            "note": "share of sum |A| in the patch's inner 8x8 (random map: 64/1024 = 0.0625)"}


def noise(ctx: Context) -> dict:
    """Noise level (Sec. 5.3, Fig. 8): background share and total variation."""
    config, data = ctx.config, ctx.data
    predicted = training.predict(ctx.model, data.test.images).argmax(axis=1)
    chosen = balanced_correct(data.test.labels, predicted, config.noise_images, ctx.classes)
    images, labels = data.test.images[chosen], data.test.labels[chosen]
    background, variation, pictures = {}, {}, {}
    for spec in ctx.specs:
        maps = ctx.attributor.maps(spec, images, labels, salt=2)
        if data.test.masks is not None:
            background[spec.label] = metrics.region_share(maps, ~data.test.masks[chosen]).tolist()
        variation[spec.label] = metrics.total_variation(maps).tolist()
        pictures[spec.label] = maps[:config.figure_images]
    ctx.figures["methods"] = (images[:config.figure_images], pictures,
                              [data.test.class_names[c] for c in labels[:config.figure_images]])
    mask_share = None if data.test.masks is None else \
        float((~data.test.masks[chosen]).mean())
    return {"images": len(chosen), "background_share": background or None,
            "total_variation": variation, "background_pixel_share": mask_share,
            "note": "background share needs object masks" if data.test.masks is None else
            "share of sum |A| outside the object mask; a random map puts the background's "
            "pixel share there"}


def roar_kar(ctx: Context) -> dict:
    """ROAR and KAR (Hooker et al.; paper Sec. 5.3, Fig. 9, Table 1)."""
    config, data = ctx.config, ctx.data
    both = np.concatenate([data.train.images, data.test.images])
    labels = np.concatenate([data.train.labels, data.test.labels])
    if config.roar_target == "predicted":
        labels = training.predict(ctx.model, both).argmax(axis=1)
    settings = ctx.settings if config.retrain == "scratch" else \
        replace(ctx.settings, epochs=config.retrain_epochs)
    start = None if config.retrain == "scratch" else \
        {k: v.detach().cpu() for k, v in ctx.model.state_dict().items()}
    jobs = [(m, mode, fraction, repeat) for m in range(len(ctx.specs))
            for mode in ("roar", "kar") for fraction in config.fractions
            for repeat in range(config.repeats)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="rectonnx-roar-") as folder:
        arrays = {"train_images": data.train.images, "train_labels": data.train.labels,
                  "test_images": data.test.images, "test_labels": data.test.labels,
                  "fill": data.train.images.mean(axis=(0, 2, 3))}
        rank_type = np.int16 if np.prod(both.shape[2:]) < 2 ** 15 else np.int32
        for m, spec in enumerate(ctx.specs):
            maps = ctx.attributor.maps(spec, both, labels, salt=3)
            arrays[f"order_{m}"] = metrics.pixel_order(
                maps, np.random.default_rng([config.seed, 0x0D, 3])).astype(rank_type)
            del maps
        for name, array in arrays.items():  # workers memory-map them: one copy in RAM
            np.save(Path(folder) / f"{name}.npy", array)
        del arrays
        shared = RetrainData(folder, settings, ctx.classes, start, config.seed)
        with ctx.bar(len(jobs), f"ROAR/KAR ({config.retrain}, {ctx.workers} process"
                     f"{'es' if ctx.workers > 1 else ''})") as bar:
            for job, accuracy in _map_jobs(shared, jobs, ctx.workers):
                m, mode, fraction, repeat = job
                rows.append({"method": ctx.specs[m].label, "mode": mode, "fraction": fraction,
                             "repeat": repeat, "accuracy": accuracy})
                bar.update(1)
    from . import stats

    curves, summary, intervals = {}, {}, {}
    for spec in ctx.specs:
        for mode in ("roar", "kar"):
            points = [stats.t_interval([r["accuracy"] for r in rows if r["method"] == spec.label
                                        and r["mode"] == mode and r["fraction"] == f])
                      for f in config.fractions]
            curves.setdefault(spec.label, {})[mode] = [p["mean"] for p in points]
            intervals.setdefault(spec.label, {})[mode] = [(p["low"], p["high"])
                                                          for p in points]
        area_roar = metrics.curve_area(config.fractions, curves[spec.label]["roar"])
        area_kar = metrics.curve_area(config.fractions, curves[spec.label]["kar"])
        summary[spec.label] = {"roar_auc": area_roar, "kar_aoc": 1.0 - area_kar}
        # per repeat (repeat k of every method and fraction shares the seed seed + 100 + k):
        # the areas whose t-intervals the report gives, paired by seed between methods
        for key, mode in (("roar_auc", "roar"), ("kar_aoc", "kar")):
            areas = []
            for k in range(config.repeats):
                area = metrics.curve_area(config.fractions, [
                    next(r["accuracy"] for r in rows if r["method"] == spec.label and
                         r["mode"] == mode and r["fraction"] == f and r["repeat"] == k)
                    for f in config.fractions])
                areas.append(area if mode == "roar" else 1.0 - area)
            interval = stats.t_interval(areas)
            summary[spec.label][f"{key}_repeats"] = areas
            summary[spec.label][f"{key}_low"] = interval["low"]
            summary[spec.label][f"{key}_high"] = interval["high"]
        if config.repeats > 1:  # the spread over the networks trained per point
            for key, mode in (("roar_auc_sd", "roar"), ("kar_aoc_sd", "kar")):
                areas = [metrics.curve_area(config.fractions, [
                    next(r["accuracy"] for r in rows if r["method"] == spec.label and
                         r["mode"] == mode and r["fraction"] == f and r["repeat"] == k)
                    for f in config.fractions]) for k in range(config.repeats)]
                summary[spec.label][key] = float(np.std(areas, ddof=1))
    rows.sort(key=lambda r: (r["method"], r["mode"], r["fraction"], r["repeat"]))
    return {"fractions": list(config.fractions), "retrain": config.retrain,
            "retrain_epochs": settings.epochs, "repeats": config.repeats,
            "target": config.roar_target, "runs": rows, "seeds": [
                config.seed + 100 + k for k in range(config.repeats)],
            "curves": curves, "intervals": intervals, "summary": summary,
            "accuracy_unmodified": ctx.accuracy}


@dataclass(frozen=True)
class RetrainData:
    """What every ROAR/KAR retraining needs: arrays saved as ``.npy`` in ``folder`` (each process
    memory-maps them), the training settings and, for fine-tuning, the trained weights."""

    folder: str
    settings: training.TrainSettings
    classes: int
    start: dict | None
    seed: int

    def array(self, name: str) -> np.ndarray:
        return np.load(Path(self.folder) / f"{name}.npy", mmap_mode="r")

    def accuracy(self, job: tuple) -> float:
        """Replace pixels for ``(method, mode, fraction, repeat)``, retrain, test."""
        m, mode, fraction, repeat = job
        train_images, test_images = self.array("train_images"), self.array("test_images")
        order, fill, most = self.array(f"order_{m}"), self.array("fill"), mode == "roar"
        split = len(train_images)
        train_images = metrics.replace_pixels(train_images, order[:split], fraction, fill, most)
        test_images = metrics.replace_pixels(test_images, order[split:], fraction, fill, most)
        start = None
        if self.start is not None:
            start = training.paper_cnn(self.classes, self.settings.width,
                                       train_images.shape[-1], train_images.shape[1])
            start.load_state_dict(self.start)
        model = training.train(train_images, np.asarray(self.array("train_labels")),
                               self.settings, seed=self.seed + 100 + repeat,
                               num_classes=self.classes, start_from=start)
        return training.accuracy(model, test_images, np.asarray(self.array("test_labels")))


_WORKER_DATA: RetrainData | None = None


def _worker_init(shared: RetrainData) -> None:
    global _WORKER_DATA
    training.set_threads(1)
    _WORKER_DATA = shared


def _worker_job(job: tuple) -> tuple[tuple, float]:
    return job, _WORKER_DATA.accuracy(job)


def _map_jobs(shared: RetrainData, jobs: list, workers: int):
    """``(job, accuracy)`` for every job: in this process, or in ``workers`` spawned processes
    with one torch thread each (independent trainings scale better so than threads do, and
    stay fast on a machine that other programs load too)."""
    if workers <= 1:
        for job in jobs:
            yield job, shared.accuracy(job)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers, _worker_init, (shared,)) as pool:
        yield from pool.imap_unordered(_worker_job, jobs)


def sensitivity(ctx: Context) -> dict:
    """Class sensitivity under FGSM (Sec. 5.2, Fig. 5b)."""
    config, data = ctx.config, ctx.data
    predicted = training.predict(ctx.model, data.test.images).argmax(axis=1)
    chosen = np.flatnonzero(predicted == data.test.labels)[:config.sensitivity_images]
    images, labels = data.test.images[chosen], data.test.labels[chosen]
    adversarial = training.fgsm(ctx.model, images, labels, config.fgsm_epsilon)
    new_class = training.predict(ctx.model, adversarial).argmax(axis=1)
    flipped = new_class != labels
    changes, pictures = {}, {}
    show = np.flatnonzero(flipped)[:config.figure_images]
    for spec in ctx.specs:
        before = ctx.attributor.maps(spec, images, labels, salt=4)
        after = ctx.attributor.maps(spec, adversarial, new_class, salt=5)
        change = metrics.map_change(before, after)
        changes[spec.label] = {
            "flipped": float(change[flipped].mean()) if flipped.any() else None,
            "unflipped": float(change[~flipped].mean()) if (~flipped).any() else None}
        pictures[spec.label] = (before[show], after[show])
    ctx.figures["sensitivity"] = (images[show], adversarial[show],
                                  [(data.test.class_names[a], data.test.class_names[b])
                                   for a, b in zip(labels[show], new_class[show])], pictures)
    return {"epsilon": config.fgsm_epsilon, "images": len(chosen),
            "flipped": int(flipped.sum()), "map_change": changes,
            "note": "map change 0.5 |a/|a| - b/|b||_1 of the channel-sum maps (0 = same map, "
                    "1 = disjoint); a class-sensitive method changes more where the class flips"}


def q_sweep(ctx: Context) -> dict:
    """Effect of RectGrad's q (Sec. 5.1, Fig. 4): sparsity and maps."""
    config, data = ctx.config, ctx.data
    count = min(config.q_images, len(data.test.images))
    images, labels = data.test.images[:count], data.test.labels[:count]
    shares, pictures = {}, {}
    for q in config.q_values:
        maps = ctx.attributor.run("rectgrad", {"q": q, "padding_trick": True}, images, labels,
                                  ["attribution"], f"RectGrad q={q:g}")[0]
        shares[f"{q:g}"] = float(metrics.nonzero_share(maps).mean())
        pictures[f"q = {q:g}"] = maps[:config.figure_images]
    ctx.figures["q_sweep"] = (images[:config.figure_images], pictures)
    return {"images": count, "nonzero_share": shares}


def layers(ctx: Context) -> dict:
    """Noise accumulation (Sec. 5.2, Fig. 6): channel-mean gradients at hidden layers."""
    config, data = ctx.config, ctx.data
    count = min(config.figure_images, len(data.test.images))
    images, labels = data.test.images[:count], data.test.labels[:count]
    rows, tensors = {}, {}
    for label, method, options in (("Saliency", "saliency", {}),
                                   ("RectGrad", "rectgrad", {"q": 98.0, "padding_trick": True})):
        options = {**options, "layer_outputs": True}
        names = [o.name for o in ctx.attributor.session(method, options).get_outputs()][1:]
        outputs = ctx.attributor.run(method, options, images, labels, names, label)
        rows[label] = {"input": outputs[0]}
        for i, (name, value) in enumerate(zip(names[1:], outputs[1:])):
            if value.ndim == 4:  # feature maps; dense layers have no picture
                title = f"ReLU {i + 1} ({value.shape[2]}x{value.shape[3]})"
                rows[label][title] = value
                tensors[title] = name
    ctx.figures["layers"] = (images, rows)
    spread = {label: {name: float(metrics.nonzero_share(value).mean())
                      for name, value in maps.items()} for label, maps in rows.items()}
    return {"images": count, "layers": list(rows["Saliency"]), "tensors": tensors,
            "nonzero_share": spread,
            "note": "gradient reaching the input and each ReLU's output (graph outputs "
                    "attribution/<node>), RectGrad with q = 98 and the padding trick"}


def sanity(ctx: Context) -> dict:
    from .checks import cascading_randomization

    return cascading_randomization(ctx)


def deletion(ctx: Context) -> dict:
    from .checks import deletion_insertion

    return deletion_insertion(ctx)


RUNNERS = {"occlusion": occlusion, "noise": noise, "roar_kar": roar_kar,
           "sensitivity": sensitivity, "q_sweep": q_sweep, "layers": layers,
           "sanity": sanity, "deletion": deletion}


def configure(*, paper: bool = False, quick: bool = False, **options) -> EvalConfig:
    """An ``EvalConfig`` from command-line style options: ``paper`` applies the paper's protocol
    (``quick``: the smoke run's sizes) first, then every option that is not None overrides;
    comma-separated strings are split for ``fractions``, ``methods`` and ``experiments``."""
    if paper and quick:
        raise ValueError("--paper and --quick exclude each other: pick one")
    lists = {"fractions": float, "methods": str, "experiments": str}
    for key, kind in lists.items():
        if isinstance(options.get(key), str):
            options[key] = tuple(kind(v.strip()) for v in options[key].split(",") if v.strip())
    base = EvalConfig(**{k: v for k, v in options.items()
                         if k in ("out", "cifar10") and v is not None})
    config = base.paper() if paper else base.quick() if quick else base
    config = replace(config, **{k: v for k, v in options.items() if v is not None})
    config.check()
    return config


def check_dependencies(config: EvalConfig) -> None:
    """MissingDependencyError naming the ``evaluate`` extra, before any work, when a package
    the run needs is missing: torch, and scikit-learn and scikit-image for digits on photos."""
    from ..errors import require

    for module in ("torch",) + (() if config.cifar10 else ("sklearn", "skimage")):
        require(module, "evaluate", "rectonnx evaluate")


def accuracy_warning(accuracy: float, classes: int) -> str | None:
    """The warning for a trained network too weak for the tables to mean anything (test
    accuracy below ``LOW_ACCURACY``), else None."""
    if not accuracy < LOW_ACCURACY:  # NaN (no test images) is not a weak network
        return None
    return (f"the trained network's test accuracy is {accuracy:.3f}, below {LOW_ACCURACY:g} "
            f"(chance: {1 / max(1, classes):.2f}): it has learned too little for these tables "
            "to mean anything; train longer or on more images (--epochs, --train-size, "
            "--width), or reuse the shipped paper CNN (0.93 on digits on photos: --width 1 "
            "--network auto, the default)")


def versions() -> dict:
    """The versions of what produced the numbers."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("rectonnx", "torch", "onnx", "onnxruntime", "numpy", "scipy", "scikit-learn",
                 "scikit-image", "matplotlib"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def run(config: EvalConfig, command: str | None = None, warn=None) -> dict:
    """Run the configured experiments and write the report (report.py); returns the results.
    ``warn(message)`` is called as soon as the trained network turns out too weak (default:
    ``warnings.warn``); the warning is in ``results["warnings"]`` and summary.md too."""
    from . import report

    config.check()
    check_dependencies(config)
    started = time.perf_counter()
    training.set_threads(config.threads)
    data = load_data(config)
    specs = method_specs(config.methods, final_percentile=config.final_percentile,
                         samples=config.smoothgrad_samples, steps=config.ig_steps)
    ctx = Context(config, data, specs)
    timings = {}
    clock = time.perf_counter()
    train_base(ctx)
    timings["train"] = time.perf_counter() - clock
    results = {"command": command, "config": asdict(config), "data": data.description,
               "methods": [asdict(s) for s in specs], "accuracy": ctx.accuracy,
               "network": ctx.network, "timings_s": timings, "warnings": [],
               "versions": versions()}
    weak = accuracy_warning(ctx.accuracy, ctx.classes)
    if weak:
        results["warnings"].append(weak)
        if warn is None:
            import warnings

            warnings.warn(weak, LowAccuracyWarning, stacklevel=2)
        else:
            warn(weak)
    for name in config.experiments:
        clock = time.perf_counter()
        results[name] = RUNNERS[name](ctx)
        timings[name] = time.perf_counter() - clock
    timings["total"] = time.perf_counter() - started
    report.write(Path(config.out), results, ctx.figures)
    return results
