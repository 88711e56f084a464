"""``rectonnx evaluate``'s evidence (issue 14): intervals and paired tests, the shipped network's
reuse, the sanity check and deletion/insertion, reruns giving the same numbers, and report.html
opened in headless Chromium (skipped, with the reason, where ``chromium`` is not on PATH)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from rectonnx.evaluate import EvalConfig, run, stats
from rectonnx.evaluate.checks import randomized, spearman, ssim, weighted_layers
from rectonnx.evaluate.experiments import load_data, load_network, shipped_network_match

SMALL = dict(train_size=40, test_size=30, epochs=1, retrain_epochs=1, fractions=(0.3, 0.7),
             methods=("random", "saliency", "rectgrad"),
             experiments=("occlusion", "noise", "roar_kar", "sanity", "deletion"),
             occlusion_images=8, noise_images=10, figure_images=2, sanity_images=3,
             deletion_images=6, deletion_steps=4, bootstrap=50, repeats=2, threads=1,
             workers=1, progress=False, network="train", width=0.25)


def test_intervals_and_paired_tests():
    t = stats.t_interval([1.0, 2.0, 3.0])
    assert t["mean"] == pytest.approx(2.0)
    assert t["high"] - t["mean"] == pytest.approx(4.302653 * 1.0 / np.sqrt(3), rel=1e-5)
    assert stats.t_interval([0.5])["low"] is None
    rng = np.random.default_rng(0)
    values = rng.normal(1.0, 1.0, 400)
    b = stats.bootstrap_interval(values, stats.seeded(0, 1))
    assert b["low"] < values.mean() < b["high"] and b["high"] - b["low"] < 0.3
    assert b == stats.bootstrap_interval(values, stats.seeded(0, 1))  # seeded: reproducible
    assert stats.paired_difference(values + 0.5, values, stats.seeded(0, 2))["significant"]
    noise = rng.normal(0, 1, 400)
    assert not stats.paired_difference(values + 0.001 * noise, values,
                                       stats.seeded(0, 3))["significant"]
    assert stats.paired_t([1.0, 1.1, 1.2], [0.0, 0.1, 0.2])["significant"]
    assert not stats.paired_t([1.0, -1.0, 0.1], [0.0, 0.0, 0.0])["significant"]


def test_sanity_metrics_and_randomization():
    rng = np.random.default_rng(0)
    a = rng.random((3, 3, 8, 8))
    np.testing.assert_allclose(spearman(a, 2 * a), 1.0)
    np.testing.assert_allclose(ssim(a, 5 * a), 1.0, atol=1e-6)
    assert np.abs(spearman(a, rng.random((3, 3, 8, 8)))).max() < 0.5
    import onnx

    from rectonnx import models

    model = onnx.load(models.path("paper_cnn_digits"))
    layers = weighted_layers(model)
    assert [name.rsplit("/", 1)[-1] for name, _ in layers] == ["Conv"] * 4 + ["Gemm"] * 2
    changed = randomized(model, layers[-1:], np.random.default_rng(0))
    before = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    after = {i.name: onnx.numpy_helper.to_array(i) for i in changed.graph.initializer}
    assert not np.array_equal(before["13.weight"], after["13.weight"])
    assert (after["13.bias"] == 0).all()
    assert all(np.array_equal(before[k], after[k]) for k in before if not k.startswith("13."))


def test_the_default_run_reuses_the_shipped_network_when_it_matches():
    config = EvalConfig(train_size=20, test_size=200)
    data = load_data(config)
    path, why = shipped_network_match(config, data)
    assert path and path.endswith("paper_cnn_digits.onnx") and "held-out scans" in why
    from rectonnx.evaluate import training

    net, _ = load_network(path, 10, 1.0, data.train.images.shape[1:])
    assert training.accuracy(net, data.test.images, data.test.labels) >= 0.85
    # another width, another data set or network="train": no reuse, and the reason says so
    assert shipped_network_match(EvalConfig(width=0.5), data) == \
        (None, "width 0.5: the shipped network has width 1")
    assert shipped_network_match(EvalConfig(network="train"), data)[0] is None


def _numbers(results: dict) -> str:
    keep = {k: v for k, v in results.items() if k not in ("timings_s", "command")}
    keep["config"] = {k: v for k, v in keep["config"].items() if k != "out"}
    return json.dumps(keep, sort_keys=True, default=str)


def test_report_has_intervals_and_reruns_give_the_same_numbers(tmp_path):
    first = run(EvalConfig(**{**SMALL, "out": str(tmp_path / "a")}), warn=lambda m: None)
    second = run(EvalConfig(**{**SMALL, "out": str(tmp_path / "b")}), warn=lambda m: None)
    assert _numbers(first) == _numbers(second)
    summary = (tmp_path / "a" / "summary.md").read_text()
    assert "## Table 1 with 95 % intervals and ranks" in summary
    assert "## The paper beside us" in summary and "RectGrad ranks" in summary
    assert "cascading randomization" in summary and "deletion AUC" in summary
    assert re.search(r"\d\.\d{4} \[\d\.\d{4}, \d\.\d{4}\]", summary)  # mean [low, high]
    r = first["roar_kar"]
    assert r["seeds"] == [100, 101]
    for row in r["summary"].values():
        assert row["roar_auc_low"] <= row["roar_auc"] <= row["roar_auc_high"]
        assert len(row["roar_auc_repeats"]) == 2
    assert len(first["sanity"]["layers"]) == 6
    for per in first["sanity"]["summary"].values():
        assert len(per["spearman"]) == 6 and len(per["ssim"]) == 6
    for per in first["deletion"]["summary"].values():
        assert 0 <= per["deletion"]["mean"] <= 1 and 0 <= per["insertion"]["mean"] <= 1
    assert "Random" not in first["sanity"]["summary"]


def test_report_html_loads_every_image_in_chromium(tmp_path):
    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("chromium is not on PATH (Debian: apt-get install chromium); the browser "
                    "check of report.html needs it")
    out = tmp_path / "report"
    run(EvalConfig(**{**SMALL, "out": str(out), "repeats": 1}), warn=lambda m: None)
    page = out / "report.html"
    text = page.read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "src='data:image/png;base64," in text and "<img" in text
    assert text.count("<img") == len(pngs) >= 6  # every figure embedded, none linked
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                          "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    marks = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))
    assert marks.get("checked") == "yes", marks
    assert marks["images"] == marks["images-loaded"] == str(len(pngs))
    tables = int(marks["tables"])
    summary = (out / "summary.md").read_text()
    markdown_tables = sum(1 for block in summary.split("\n\n") if block.startswith("|"))
    assert tables == markdown_tables + 4  # + settings, network, timings, versions
    for heading in ("Table 1 (lower is better everywhere)", "Table 1 with 95 % intervals",
                    "The paper beside us", "Sanity check", "Deletion and insertion",
                    "Settings", "Timings", "Versions"):
        assert heading in dom, heading
