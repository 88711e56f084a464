r"""Checks that need no retraining: Adebayo et al.'s sanity check and deletion/insertion curves.

* ``cascading_randomization`` (Adebayo et al., NeurIPS 2018, "Sanity Checks for Saliency Maps",
  Sec. 3.1): the weighted layers of the ONNX network (Conv, Gemm) are re-initialised one after
  the other, from the logits down to the first convolution (Glorot-uniform weights and zero
  biases, the training initialisation, drawn from a seeded generator); after each step the
  explainer graph of the partly random network is rebuilt (``rewrite``) and the maps of the same
  test images (explaining their true label; the baselines without the final threshold, as in
  Adebayo et al., RectGrad with its q) are compared with those of the trained network:
  Spearman's rank correlation of the absolute channel-sum maps (Adebayo's "absolute value"
  variant) and SSIM (``skimage.metrics.structural_similarity``, data range 1) of the absolute
  maps each scaled to max 1. A method whose maps depend on the learned weights falls towards 0
  as more layers are randomized; one that stays high is insensitive to the model.
* ``deletion_insertion`` (Petsiuk et al. 2018, RISE): pixels ranked by the map of the predicted
  class (``metrics.pixel_order``); the deletion curve is the network's softmax probability of
  that class while the top ``k / steps`` of the pixels are replaced by the per-channel training
  mean (as in ROAR), the insertion curve while only they are kept on an image of that mean. The
  areas (``metrics.curve_area`` over ``[0, 1]``) are per image: deletion lower is better,
  insertion higher is better. No network is retrained, so the modified images are off the
  training distribution (ROAR/KAR's retraining is what corrects for that).
"""

from __future__ import annotations

import numpy as np

from . import metrics, stats, training

WEIGHTED = ("Conv", "Gemm", "MatMul", "ConvTranspose")


def weighted_layers(model) -> list[tuple[str, list[str]]]:
    """``[(node name, [initializer names])]`` of the weighted layers in graph order."""
    names = {i.name for i in model.graph.initializer}
    layers = []
    for k, node in enumerate(model.graph.node):
        if node.op_type in WEIGHTED:
            held = [i for i in node.input[1:] if i in names]
            if held:
                layers.append((node.name or f"{node.op_type}_{k}", held))
    return layers


def randomized(model, layers: list[tuple[str, list[str]]], rng: np.random.Generator):
    """A copy of ``model`` whose ``layers`` are re-initialised (Glorot uniform, zero bias)."""
    import copy

    from onnx import numpy_helper

    out = copy.deepcopy(model)
    chosen = {name for _, held in layers for name in held}
    for i, init in enumerate(out.graph.initializer):
        if init.name not in chosen:
            continue
        value = numpy_helper.to_array(init)
        if value.ndim >= 2:
            fan_out, fan_in = value.shape[0], value.shape[1]
            field = int(np.prod(value.shape[2:])) if value.ndim > 2 else 1
            limit = np.sqrt(6.0 / ((fan_in + fan_out) * field))
            new = rng.uniform(-limit, limit, value.shape).astype(value.dtype)
        else:
            new = np.zeros_like(value)
        out.graph.initializer[i].CopyFrom(numpy_helper.from_array(new, init.name))
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per image, Spearman's rank correlation of ``|map2d(a)|`` and ``|map2d(b)|`` (0 where a
    map is constant)."""
    from scipy.stats import rankdata

    x = rankdata(np.abs(metrics.map2d(a)).reshape(len(a), -1), axis=1)
    y = rankdata(np.abs(metrics.map2d(b)).reshape(len(b), -1), axis=1)
    x -= x.mean(axis=1, keepdims=True)
    y -= y.mean(axis=1, keepdims=True)
    norm = np.sqrt((x ** 2).sum(axis=1) * (y ** 2).sum(axis=1))
    return np.divide((x * y).sum(axis=1), norm, out=np.zeros(len(a)), where=norm > 0)


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per image, SSIM of the absolute channel-sum maps each scaled to max 1."""
    from skimage.metrics import structural_similarity

    def scaled(maps):
        m = np.abs(metrics.map2d(maps))
        peak = m.max(axis=(1, 2), keepdims=True)
        return np.divide(m, peak, out=np.zeros_like(m), where=peak > 0)

    x, y = scaled(a), scaled(b)
    return np.array([structural_similarity(x[i], y[i], data_range=1.0) for i in range(len(x))])


def cascading_randomization(ctx) -> dict:
    """Adebayo et al.'s cascading model-parameter randomization, top layer to bottom."""
    from .experiments import Attributor

    config, data = ctx.config, ctx.data
    count = min(config.sanity_images, len(data.test.images))
    images, labels = data.test.images[:count], data.test.labels[:count]
    layers = weighted_layers(ctx.onnx_model)[::-1]          # logits first
    # "Gemm 6" (the logits) ... "Conv 1" (the first convolution): op type, layer from the input
    titles = [f"{name.rsplit('/', 1)[-1].split('_')[0]} {len(layers) - k}"
              for k, (name, _) in enumerate(layers)]
    # the baselines' raw maps, as Adebayo et al. (no final 95th-percentile threshold: it would
    # leave 95 % tied zeros to rank); RectGrad as configured (its q is part of the method)
    from dataclasses import replace

    specs = [replace(s, options={k: v for k, v in s.options.items() if k != "final_percentile"})
             for s in ctx.specs if s.method is not None]
    trained = {s.label: ctx.attributor.maps(s, images, labels, salt=6) for s in specs}
    rng = np.random.default_rng([config.seed, 0x5A9])
    rank, similarity, pictures = {}, {}, {s.label: [trained[s.label][:1]] for s in specs}
    model = ctx.onnx_model
    for depth in range(1, len(layers) + 1):
        model = randomized(model, layers[depth - 1:depth], rng)   # cascading: keep the above
        attributor = Attributor(model, seed=config.seed, progress=False)
        for spec in specs:
            maps = attributor.maps(spec, images, labels, salt=6)
            rank.setdefault(spec.label, []).append(spearman(trained[spec.label], maps).tolist())
            similarity.setdefault(spec.label, []).append(ssim(trained[spec.label], maps).tolist())
            pictures[spec.label].append(maps[:1])
    ctx.figures["sanity"] = (images[:1], titles, {k: np.concatenate(v)
                                                  for k, v in pictures.items()})
    summary = {}
    for label in rank:
        summary[label] = {
            "spearman": [stats.bootstrap_interval(v, stats.seeded(config.seed, 1, d),
                                                  config.bootstrap)
                         for d, v in enumerate(rank[label])],
            "ssim": [stats.bootstrap_interval(v, stats.seeded(config.seed, 2, d),
                                              config.bootstrap)
                     for d, v in enumerate(similarity[label])]}
    return {"images": count, "layers": titles, "spearman": rank, "ssim": similarity,
            "summary": summary,
            "thresholded": False,
            "note": "cascading randomization from the logits down (Adebayo et al. 2018): "
                    "after randomizing the layers up to each one, Spearman rank correlation "
                    "of |map| and SSIM with the trained network's map, per image; mean and "
                    "95 % bootstrap interval"}


def deletion_insertion(ctx) -> dict:
    """Deletion and insertion curves of the network's probability of the predicted class."""
    config, data = ctx.config, ctx.data
    count = min(config.deletion_images, len(data.test.images))
    images = data.test.images[:count]
    logits = training.predict(ctx.model, images)
    target = logits.argmax(axis=1)
    fill = data.train.images.mean(axis=(0, 2, 3)).astype(np.float32)
    fractions = np.linspace(0.0, 1.0, config.deletion_steps + 1)
    curves, areas = {}, {}
    for spec in ctx.specs:
        maps = ctx.attributor.maps(spec, images, target, salt=7)
        order = metrics.pixel_order(maps, np.random.default_rng([config.seed, 0xDE1]))
        result = {}
        for mode in ("deletion", "insertion"):
            batch = []
            for f in fractions:
                if mode == "deletion":
                    batch.append(metrics.replace_pixels(images, order, float(f), fill, True))
                else:  # keep the top fraction, the rest set to the mean
                    batch.append(metrics.replace_pixels(images, order, 1.0 - float(f), fill,
                                                        False))
            stacked = np.stack(batch, axis=1).reshape(-1, *images.shape[1:])
            out = training.predict(ctx.model, stacked).astype(np.float64)
            out -= out.max(axis=1, keepdims=True)
            probability = np.exp(out)
            probability /= probability.sum(axis=1, keepdims=True)
            p = probability[np.arange(len(stacked)), np.repeat(target, len(fractions))]
            p = p.reshape(count, len(fractions))
            result[mode] = p
        curves[spec.label] = {m: result[m].mean(axis=0).tolist() for m in result}
        areas[spec.label] = {m: [metrics.curve_area(fractions, row) for row in result[m]]
                             for m in result}
    summary = {label: {m: stats.bootstrap_interval(v, stats.seeded(config.seed, 3, i),
                                                   config.bootstrap)
                       for i, (m, v) in enumerate(a.items())}
               for label, a in areas.items()}
    return {"images": count, "fractions": fractions.tolist(), "curves": curves,
            "areas": areas, "summary": summary,
            "note": "probability of the predicted class as the top-ranked pixels are replaced "
                    "by the training mean (deletion, lower area is better) or kept on a mean "
                    "image (insertion, higher area is better); areas per image, mean and 95 % "
                    "bootstrap interval"}
