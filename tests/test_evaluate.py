"""``rectonnx.evaluate``: the metrics on cases computed by hand, the pieces of the experiments, and
the whole pipeline (training, explainer graphs, report) on a few dozen images for one epoch."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from rectonnx.cli import main
from rectonnx.evaluate import EvalConfig, configure, method_specs, metrics, run, training
from rectonnx.evaluate.experiments import (INNER, PATCH, Attributor, balanced_correct, patched,
                                           random_maps)
from rectonnx.threshold import percentile_rank


# -- metrics -----------------------------------------------------------------------------------
def test_curve_area_of_known_curves():
    fractions = [0.1, 0.3, 0.5, 0.7, 0.9]
    assert metrics.curve_area(fractions, [0.7] * 5) == pytest.approx(0.7)
    # a straight line from 0.9 down to 0.1: mean height 0.5
    assert metrics.curve_area(fractions, [0.9, 0.7, 0.5, 0.3, 0.1]) == pytest.approx(0.5)
    # trapezoids: (0.8 + 0.4) / 2 * 0.4 + (0.4 + 0.4) / 2 * 0.4 = 0.4, over a span of 0.8
    assert metrics.curve_area([0.1, 0.5, 0.9], [0.8, 0.4, 0.4]) == pytest.approx(0.5)
    # a random ranking gives one curve for ROAR and KAR: AUC + AOC = 1 (the paper's Table 1)
    curve = [0.6, 0.55, 0.5, 0.4, 0.2]
    assert metrics.curve_area(fractions, curve) + (1 - metrics.curve_area(fractions, curve)) \
        == pytest.approx(1.0)


def test_total_variation_of_known_maps():
    spike = np.zeros((1, 3, 5, 5))
    spike[0, :, 2, 2] = 1.0 / 3                    # channel sum 1 at an interior pixel
    assert metrics.total_variation(spike) == pytest.approx([4.0])  # four unit steps
    corner = np.zeros((1, 1, 5, 5))
    corner[0, 0, 0, 0] = -7.0                      # scaled to -1; two steps at a corner
    assert metrics.total_variation(corner) == pytest.approx([2.0])
    ramp = np.tile(np.arange(4.0), (4, 1))[None, None]  # 0..3 along x, scaled by 1/3
    assert metrics.total_variation(ramp) == pytest.approx([4.0])
    assert metrics.total_variation(np.zeros((2, 3, 4, 4))) == pytest.approx([0.0, 0.0])
    assert metrics.total_variation(5 * spike) == pytest.approx(metrics.total_variation(spike))


def test_region_share():
    a = np.zeros((3, 2, 4, 4))
    a[0, :, :2, :2] = 1.0                          # all inside the region
    a[1] = -1.0                                    # uniform: the region's area, 4 / 16
    region = np.zeros((4, 4), bool)
    region[:2, :2] = True
    np.testing.assert_allclose(metrics.region_share(a, region), [1.0, 0.25, 0.0])
    masks = np.stack([region, ~region, region])     # per-image regions
    np.testing.assert_allclose(metrics.region_share(a, masks), [1.0, 0.75, 0.0])


def test_roar_and_kar_replace_exactly_the_ranked_fraction():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (3, 2, 5, 4)).astype(np.float32)
    maps = rng.standard_normal((3, 2, 5, 4))
    maps[2] = 0.0                                  # all ties: a random order
    maps[2, :, 0, 0] = 1.0                         # ... after the one important pixel
    order = metrics.pixel_order(maps, np.random.default_rng(1))
    scores = maps.sum(axis=1).reshape(3, -1)
    assert all((np.diff(scores[i][order[i]]) <= 0).all() for i in range(3))
    assert order[2, 0] == 0
    np.testing.assert_array_equal(order, metrics.pixel_order(maps, np.random.default_rng(1)))
    fill = np.array([0.25, -0.5], np.float32)
    for fraction in (0.1, 0.25, 0.5, 0.9):
        count = int(round(fraction * 20))
        for most in (True, False):
            out = metrics.replace_pixels(images, order, fraction, fill, most)
            changed = (out != images).any(axis=1).reshape(3, -1)
            assert (changed.sum(axis=1) == count).all()
            expected = order[:, :count] if most else order[:, 20 - count:]
            for i in range(3):
                assert set(np.flatnonzero(changed[i])) == set(expected[i])
                pixels = out[i].reshape(2, -1)[:, expected[i]]
                np.testing.assert_array_equal(pixels, np.repeat(fill[:, None], count, axis=1))
    assert (images == metrics.replace_pixels(images, order, 0.0, fill)).all()


def test_map_change_and_sparsity():
    a = np.zeros((2, 1, 2, 2))
    a[:, 0, 0, 0] = 1.0
    b = np.zeros((2, 1, 2, 2))
    b[0, 0, 0, 0] = 3.0                            # the same map, scaled
    b[1, 0, 1, 1] = 1.0                            # disjoint support
    np.testing.assert_allclose(metrics.map_change(a, b), [0.0, 1.0])
    np.testing.assert_allclose(metrics.nonzero_share(a), [0.25, 0.25])


def test_random_maps_are_thresholded_like_the_baselines():
    maps = random_maps((4, 3, 8, 8), 95.0, np.random.default_rng(0))
    k = percentile_rank(192, 95.0)
    assert ((maps != 0).reshape(4, -1).sum(axis=1) == k - 1).all()
    assert maps.min() >= 0


# -- pieces of the experiments -----------------------------------------------------------------
def test_patch_covers_the_top_left_corner_only():
    images = np.zeros((2, 3, 32, 32), np.float32)
    patch = np.random.default_rng(0).uniform(-1, 1, (3, PATCH, PATCH)).astype(np.float32)
    out = patched(images, patch)
    assert (out[:, :, :10, :10] == patch).all() and (out[:, :, 10:] == 0).all()
    assert (out[:, :, :, 10:] == 0).all() and (images == 0).all()
    assert INNER == (1, 9)  # the inner 8x8: rows and columns 1..8


def test_balanced_correct_takes_the_same_number_per_class():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    predicted = np.array([0, 1, 0, 0, 1, 2, 0, 2, 2, 0])
    picked = balanced_correct(labels, predicted, 6, 3)
    np.testing.assert_array_equal(picked, [0, 1, 3, 4, 5, 8])


def test_method_specs_follow_the_paper():
    specs = {s.key: s for s in method_specs(("random", "smoothgrad", "rectgrad"), samples=7)}
    assert specs["smoothgrad"].options == {"samples": 7, "final_percentile": 95.0}
    assert specs["rectgrad"].options == {"q": 98.0, "padding_trick": True}
    assert specs["random"].method is None
    with pytest.raises(ValueError, match="unknown method"):
        method_specs(("saliency", "lime"))


def test_configure_applies_the_paper_protocol_then_the_options():
    config = configure(paper=True, out="x", fractions="0.2, 0.8", methods="saliency,rectgrad",
                       repeats=None)
    assert (config.epochs, config.repeats, config.retrain, config.width) == (20, 3, "scratch",
                                                                             1.0)
    assert config.fractions == (0.2, 0.8) and config.methods == ("saliency", "rectgrad")
    assert configure(epochs=3).epochs == 3 and configure().retrain == "finetune"
    with pytest.raises(ValueError, match="unknown experiment"):
        configure(experiments="roar")
    with pytest.raises(ValueError, match="fractions"):
        configure(fractions="0,0.5")


def test_training_fgsm_and_export(tmp_path):
    from rectonnx.datasets import digits_on_photos

    training.set_threads(1)
    data = digits_on_photos(20, seed=1)
    settings = training.TrainSettings(epochs=1, width=0.25)
    model = training.train(data.images, data.labels, settings, seed=0, num_classes=10)
    again = training.train(data.images, data.labels, settings, seed=0, num_classes=10)
    np.testing.assert_array_equal(training.predict(model, data.images),
                                  training.predict(again, data.images))  # deterministic
    assert not model.training
    adversarial = training.fgsm(model, data.images, data.labels, 0.01)
    assert np.abs(adversarial - data.images).max() <= 0.01 + 1e-6
    assert adversarial.min() >= -1 and adversarial.max() <= 1
    attributor = Attributor(training.to_onnx(model, (3, 32, 32)), threads=1, chunk=8)
    spec = method_specs(("smoothgrad",), samples=3)[0]
    maps = attributor.maps(spec, data.images, data.labels)  # 2 images per chunk of 8 rows
    assert maps.shape == data.images.shape
    whole = Attributor(attributor.model, threads=1).maps(spec, data.images, data.labels)
    np.testing.assert_allclose(maps, whole, rtol=1e-5, atol=1e-7)


# -- the whole pipeline -----------------------------------------------------------------------
TINY = dict(train_size=40, test_size=30, epochs=1, retrain_epochs=1, fractions=(0.3, 0.7),
            methods=("random", "saliency", "smoothgrad", "rectgrad"), occlusion_images=10,
            noise_images=10, sensitivity_images=10, q_values=(0.0, 50.0, 98.0), q_images=5,
            figure_images=2, smoothgrad_samples=2, ig_steps=2, threads=1, workers=1,
            progress=False, network="train", width=0.5, repeats=1, sanity_images=3,
            deletion_images=6, deletion_steps=4, bootstrap=50)


def test_evaluate_writes_the_report(tmp_path):
    """Every experiment on 40 + 30 images, one epoch; ROAR/KAR in two worker processes."""
    results = run(EvalConfig(**{**TINY, "out": str(tmp_path), "workers": 2, "repeats": 2,
                                "fractions": (0.5,)}))
    for name in ("summary.md", "results.json", "table1.csv", "roar_kar.csv", "per_image.csv",
                 "roar_kar.png", "occlusion_boxplot.png", "noise_boxplots.png", "q_sweep.png",
                 "q_sweep_maps.png", "methods_grid.png", "layers_0.png", "layers_1.png",
                 "sanity_randomization.png", "sanity_maps.png", "deletion_insertion.png",
                 "report.html"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["roar_kar"]["summary"]) == {"Random", "Saliency", "SmoothGrad", "RectGrad"}
    assert len(saved["roar_kar"]["runs"]) == 4 * 2 * 2  # methods x (ROAR, KAR) x repeats
    for row in saved["roar_kar"]["summary"].values():
        assert 0 <= row["roar_auc"] <= 1 and 0 <= row["kar_aoc"] <= 1
        assert row["roar_auc_sd"] >= 0 and row["kar_aoc_sd"] >= 0
    for values in saved["occlusion"]["patch_share"].values():
        assert len(values) == 10 and all(0 <= v <= 1 for v in values)
    assert all(0 <= v <= 1 for v in saved["q_sweep"]["nonzero_share"].values())
    assert saved["layers"]["layers"] == ["input", "ReLU 1 (32x32)", "ReLU 2 (32x32)",
                                         "ReLU 3 (16x16)", "ReLU 4 (16x16)"]
    summary = (tmp_path / "summary.md").read_text()
    assert "| method | ROAR AUC | KAR AOC | patch attribution | background attribution | " \
           "total variation |" in summary
    assert "RectGrad ranks" in summary
    assert results["accuracy"] == saved["accuracy"]


def test_evaluate_command(tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(main, [
        "evaluate", "--out", str(out), "--train-size", "30", "--test-size", "20", "--epochs",
        "1", "--width", "0.25", "--experiments", "q_sweep,layers", "--methods", "saliency",
        "--threads", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "summary.md" in result.output and (out / "q_sweep_maps.png").is_file()
    bad = CliRunner().invoke(main, ["evaluate", "--out", str(out), "--methods", "lime"])
    assert bad.exit_code == 2 and "unknown method" in bad.output


def test_evaluate_on_a_local_cifar10_copy(tmp_path):
    """``cifar10=DIR`` reads the standard python pickles; without masks the noise test reports
    total variation only."""
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (12, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, 12))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    out = tmp_path / "report"
    results = run(EvalConfig(**{**TINY, "out": str(out), "cifar10": str(tmp_path),
                                "experiments": ("noise",), "train_size": None,
                                "test_size": None, "noise_images": 30}))
    assert "CIFAR-10" in results["data"] and "60 training" in results["data"]
    assert results["noise"]["background_share"] is None
    summary = (out / "summary.md").read_text()
    assert "no object masks" in summary
