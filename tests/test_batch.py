"""Batch attribution over image collections: formats, resume, atomic writes, a full disk, and the
same job on a local Ray instance.

The oracle everywhere is the Explainer itself on the same preprocessed images: the batch layer
must only move its results into files, never change them.
"""

from __future__ import annotations

import errno
import json
import os
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import rectonnx
from rectonnx import batch as batch_module
from rectonnx.batch import MANIFEST, OutputDir, OutputError, explain_images, parse_bytes
from rectonnx.cli import main
from rectonnx.converters.pytorch import export
from rectonnx.images import Preprocess, load_image

PRE = Preprocess(mean=(0.5,), std=(0.5,))  # minus1to1; the size comes from the model (16 x 16)
FAST = dict(preprocess=PRE, progress=False, batch_size=4)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 8 * 8, 3))
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    export(net, torch.randn(1, 3, 16, 16), path)
    return path


def make_images(root, count: int, seed: int = 0, nested: bool = True) -> list:
    """``count`` RGB PNGs of assorted sizes, half of them in a sub-folder."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        folder = root / ("b" if nested and i % 2 else "a")
        folder.mkdir(parents=True, exist_ok=True)
        h, w = 16 + i % 5, 20 + i % 3
        path = folder / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]


def load_attribution(out, record) -> np.ndarray:
    files = record["files"]
    data = np.load(out / files["attribution"])
    if "key" in files:
        return data[files["key"]]
    return data["attribution"] if isinstance(data, np.lib.npyio.NpzFile) else data


def direct(model_file, paths, **options) -> dict:
    """The oracle: the Explainer on the same preprocessing, by absolute input path."""
    explainer = rectonnx.Explainer(model_file, options.pop("method", "rectgrad"), **options)
    pre = batch_module.fit_preprocess_to_model(PRE, explainer.input_shape)
    x = np.stack([load_image(p, pre)[0] for p in paths])
    result = explainer.explain(x)
    return {os.path.abspath(p): (result.attribution[i], int(result.target[i]),
                                 float(result.logits[i, result.target[i]]))
            for i, p in enumerate(paths)}


@pytest.mark.parametrize("fmt", ["npy", "npz", "shards"])
def test_every_format_stores_exactly_the_explainers_maps(model_file, tmp_path, fmt):
    paths = make_images(tmp_path / "images", 10)
    out = tmp_path / "out"
    summary = explain_images(model_file, [tmp_path / "images"], out, fmt=fmt, shard_size=3,
                             write_overlay=False, **FAST)
    assert summary.explained == 10 and not summary.failures
    expected = direct(model_file, paths)
    rows = records(out)
    assert sorted(r["input"] for r in rows) == sorted(expected)
    for row in rows:
        attribution, target, score = expected[row["input"]]
        np.testing.assert_array_equal(load_attribution(out, row), attribution)
        assert row["target"] == row["predicted"] == target
        assert row["score"] == pytest.approx(score, rel=1e-6)
        assert (out / row["files"]["heatmap"]).is_file()
    names = {row["files"]["attribution"] for row in rows}
    if fmt == "shards":  # 10 maps in shards of 3
        assert sorted(names) == [f"shard-0000{i}.npz" for i in range(4)]
    else:  # the input tree is mirrored below the common folder
        assert {n.split("/")[0] for n in names} == {"a", "b"}
    assert not list((out / ".rectonnx-tmp").glob("*")) if (out / ".rectonnx-tmp").exists() \
        else True


def test_names_never_collide(model_file, tmp_path):
    rng = np.random.default_rng(0)
    for name in ["a/x.png", "b/x.png", "a/x.jpg", "a/x_overlay.png"]:
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
            tmp_path / "in" / name)
    out = tmp_path / "out"
    explain_images(model_file, [tmp_path / "in"], out, **FAST)
    files = [f for r in records(out) for f in r["files"].values()]
    assert len(files) == len(set(files)) == 12
    assert all((out / f).is_file() for f in files)


def test_a_rerun_skips_finished_images_and_leaves_their_files_alone(model_file, tmp_path):
    make_images(tmp_path / "images", 6)
    out = tmp_path / "out"
    first = explain_images(model_file, [tmp_path / "images"], out, **FAST)
    assert (first.explained, first.resumed) == (6, 0)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.npy")}
    make_images(tmp_path / "images", 8, seed=1)  # rewrites img000..005 (same names), adds 2
    again = explain_images(model_file, [tmp_path / "images"], out, **FAST)
    assert (again.explained, again.resumed) == (2, 6)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    rows = records(out)
    assert len(rows) == len({r["input"] for r in rows}) == 8
    nothing = explain_images(model_file, [tmp_path / "images"], out, **FAST)
    assert (nothing.explained, nothing.resumed) == (0, 8)


def test_an_interrupted_run_keeps_what_it_finished_and_resumes(model_file, tmp_path,
                                                               monkeypatch):
    paths = make_images(tmp_path / "images", 12)
    out = tmp_path / "out"
    real_explain = rectonnx.Explainer.explain
    calls = {"n": 0}

    def explain_then_interrupt(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # Ctrl-C during the third chunk
            raise KeyboardInterrupt
        return real_explain(self, *args, **kwargs)

    monkeypatch.setattr(rectonnx.Explainer, "explain", explain_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        explain_images(model_file, [tmp_path / "images"], out, **FAST)
    done = records(out)
    assert len(done) == 8  # two chunks of 4 finished and were written before the interrupt
    for row in done:
        assert load_attribution(out, row).shape == (3, 16, 16)
    monkeypatch.setattr(rectonnx.Explainer, "explain", real_explain)
    summary = explain_images(model_file, [tmp_path / "images"], out, **FAST)
    assert (summary.explained, summary.resumed) == (4, 8)
    expected = direct(model_file, paths)
    for row in records(out):
        np.testing.assert_array_equal(load_attribution(out, row), expected[row["input"]][0])


def test_a_torn_manifest_line_is_dropped_and_that_image_done_again(model_file, tmp_path):
    make_images(tmp_path / "images", 4)
    out = tmp_path / "out"
    explain_images(model_file, [tmp_path / "images"], out, **FAST)
    text = (out / MANIFEST).read_text().splitlines(keepends=True)
    (out / MANIFEST).write_text("".join(text[:3]) + text[3][:25])  # killed mid-line
    summary = explain_images(model_file, [tmp_path / "images"], out, **FAST)
    assert (summary.explained, summary.resumed) == (1, 3)
    rows = records(out)  # every line parses again
    assert len(rows) == len({r["input"] for r in rows}) == 4


def test_a_full_disk_stops_with_one_clear_error_and_finished_files_intact(model_file, tmp_path,
                                                                          monkeypatch):
    make_images(tmp_path / "images", 10)
    out = tmp_path / "out"
    real = batch_module.write_npy
    writes = {"n": 0}

    def full_after_five(array):
        writes["n"] += 1
        if writes["n"] > 5:
            def fail(handle):
                handle.write(b"\x93NUMPY partial")
                raise OSError(errno.ENOSPC, "No space left on device")
            return fail
        return real(array)

    monkeypatch.setattr(batch_module, "write_npy", full_after_five)
    with pytest.raises(OutputError) as caught:
        explain_images(model_file, [tmp_path / "images"], out, **FAST)
    message = str(caught.value)
    assert "disk full while writing" in message and "img" in message
    assert "5 image(s) listed in" in message and "re-run the same command to resume" in message
    rows = records(out)
    assert len(rows) == 5
    for row in rows:
        assert load_attribution(out, row).shape == (3, 16, 16)
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npy"))
    assert on_disk == sorted(r["files"]["attribution"] for r in rows)  # no partial file
    assert not (out / ".rectonnx-tmp").exists()

    # the command line: one line, exit status 2; then space is freed and the run resumes
    result = CliRunner().invoke(main, ["explain", str(model_file), str(tmp_path / "images"),
                                       "--out", str(out), "--preset", "minus1to1",
                                       "--batch-size", "4", "--no-progress"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: disk full while writing")
    monkeypatch.setattr(batch_module, "write_npy", real)
    summary = explain_images(model_file, [tmp_path / "images"], out, **FAST)
    assert (summary.explained, summary.resumed) == (5, 5)


def test_other_settings_in_the_same_directory_are_refused(model_file, tmp_path):
    make_images(tmp_path / "images", 2)
    out = tmp_path / "out"
    explain_images(model_file, [tmp_path / "images"], out, **FAST)
    with pytest.raises(OutputError, match=r"other settings \(method: 'rectgrad' -> 'saliency'"):
        explain_images(model_file, [tmp_path / "images"], out, method="saliency", **FAST)


def test_two_runs_cannot_share_a_directory(model_file, tmp_path):
    make_images(tmp_path / "images", 2)
    out = tmp_path / "out"
    with OutputDir(out):
        with pytest.raises(OutputError, match="in use by another rectonnx run"):
            explain_images(model_file, [tmp_path / "images"], out, **FAST)
    explain_images(model_file, [tmp_path / "images"], out, **FAST)  # free again


def test_memory_budget_sizes_the_chunks(model_file, tmp_path, monkeypatch):
    from rectonnx.runtime import activation_bytes_per_sample

    per_sample = activation_bytes_per_sample(rectonnx.Explainer(model_file).graph)
    assert parse_bytes("2GB") == 2 * 10**9 and parse_bytes("512MiB") == 512 * 2**20
    with pytest.raises(ValueError, match="expected a size"):
        parse_bytes("lots")
    make_images(tmp_path / "images", 5)
    sizes = []
    real = rectonnx.Explainer.explain

    def spy(self, x, *args, **kwargs):
        sizes.append(len(x))
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(rectonnx.Explainer, "explain", spy)
    summary = explain_images(model_file, [tmp_path / "images"], tmp_path / "out",
                             memory_budget=int(2.5 * per_sample), batch_size=16,
                             preprocess=PRE, progress=False)
    assert summary.explained == 5 and sizes == [2, 2, 1]


def test_decoding_threads_change_nothing(model_file, tmp_path):
    make_images(tmp_path / "images", 9)
    maps = []
    for workers in (1, 4):
        out = tmp_path / f"out{workers}"
        explain_images(model_file, [tmp_path / "images"], out, workers=workers,
                       chunks_ahead=3, **FAST)
        maps.append({r["input"]: load_attribution(out, r) for r in records(out)})
    assert maps[0].keys() == maps[1].keys()
    for key in maps[0]:
        np.testing.assert_array_equal(maps[0][key], maps[1][key])


def test_cli_progress_bar_reports_images_per_second(model_file, tmp_path):
    make_images(tmp_path / "images", 3)
    result = CliRunner().invoke(main, ["explain", str(model_file), str(tmp_path / "images"),
                                       "--out", str(tmp_path / "out"), "--preset",
                                       "minus1to1", "--format", "npz", "--no-overlay"])
    assert result.exit_code == 0, result.output
    assert "img/s" in result.stderr and "images/s" in result.stdout
    again = CliRunner().invoke(main, ["explain", str(model_file), str(tmp_path / "images"),
                                      "--out", str(tmp_path / "out"), "--preset",
                                      "minus1to1", "--format", "npz", "--no-overlay"])
    assert again.exit_code == 0 and "3 image(s) were already done" in again.stdout


# -- Ray -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="the Ray tests need pip install -e '.[ray]'")
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    print(f"ray.init took {time.perf_counter() - started:.1f} s")
    yield ray
    ray.shutdown()


def test_ray_job_writes_what_the_local_job_writes_and_resumes(model_file, tmp_path,
                                                             local_ray):
    from rectonnx.distributed import explain_images_ray

    paths = make_images(tmp_path / "images", 14)
    (tmp_path / "images" / "a" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    summary = explain_images_ray(model_file, [tmp_path / "images" / "a"], out, actors=2,
                                 fmt="shards", **FAST)
    assert summary.explained == 7 and len(summary.failures) == 1
    summary = explain_images_ray(model_file, [tmp_path / "images"], out, actors=2,
                                 fmt="shards", **FAST)
    assert (summary.explained, summary.resumed) == (7, 7) and len(summary.failures) == 1
    expected = direct(model_file, paths)
    rows = records(out)
    assert sorted(r["input"] for r in rows) == sorted(expected)
    for row in rows:
        np.testing.assert_array_equal(load_attribution(out, row), expected[row["input"]][0])
        assert row["target"] == expected[row["input"]][1]


def test_ray_job_refuses_images_over_max_pixels(model_file, tmp_path, local_ray):
    from rectonnx.distributed import explain_images_ray

    make_images(tmp_path / "images", 4, nested=False)
    with pytest.raises(ValueError, match="--max-pixels"):
        explain_images_ray(model_file, [tmp_path / "images"], tmp_path / "bad", max_pixels=0,
                           **FAST)
    summary = explain_images_ray(model_file, [tmp_path / "images"], tmp_path / "out",
                                 actors=1, max_pixels=50, **FAST)
    assert summary.explained == 0 and len(summary.failures) == 4
    assert all("--max-pixels" in message for _, message in summary.failures)


def test_ray_dataset_map_batches_adds_attribution_columns(model_file, local_ray):
    from rectonnx.distributed import explain_dataset

    x = np.random.default_rng(0).standard_normal((10, 3, 16, 16)).astype(np.float32)
    ds = local_ray.data.from_items([{"image": row, "id": i} for i, row in enumerate(x)])
    out = explain_dataset(ds, model_file, "saliency", batch_size=4, actors=2).take_all()
    expected = rectonnx.Explainer(model_file, "saliency").explain(x)
    assert len(out) == 10
    for row in out:
        np.testing.assert_allclose(row["attribution"], expected.attribution[row["id"]],
                                   rtol=0, atol=1e-6)
        assert row["target"] == expected.target[row["id"]]


class MaskedTokens(torch.nn.Module):
    """A token classifier with an attention mask: the masked mean of the embeddings."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 6)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, ids, attention_mask):
        weights = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(ids) * weights).sum(1) / weights.sum(1)
        return self.head(torch.tanh(pooled))


def test_ray_dataset_explains_token_ids_with_their_mask(tmp_path, local_ray):
    from rectonnx.distributed import explain_dataset

    torch.manual_seed(0)
    ids = torch.randint(0, 20, (2, 5))
    path = tmp_path / "tokens.onnx"
    axes = {0: "N", 1: "T"}
    torch.onnx.export(MaskedTokens().eval(), (ids, torch.ones_like(ids)), str(path),
                      dynamo=False, input_names=["ids", "attention_mask"],
                      output_names=["logits"], dynamic_axes={"ids": axes,
                                                             "attention_mask": axes})
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 20, (6, 5))
    mask = np.ones((6, 5), np.int64)
    mask[::2, 3:] = 0
    rows = [{"ids": t, "attention_mask": m, "id": i}
            for i, (t, m) in enumerate(zip(tokens, mask))]
    out = explain_dataset(local_ray.data.from_items(rows), path, "integrated_gradients",
                          column="ids", steps=4, batch_size=3, actors=1).take_all()
    expected = rectonnx.Explainer(path, "integrated_gradients", steps=4).explain(
        tokens, attention_mask=mask)
    for row in out:
        np.testing.assert_allclose(row["attribution"], expected.attribution[row["id"]],
                                   rtol=0, atol=1e-6)
    assert np.abs(expected.attribution[0, 3:]).max() == 0  # masked tokens get nothing
    no_mask = [{"ids": t} for t in tokens]
    with pytest.raises(Exception, match="attention_mask"):
        explain_dataset(local_ray.data.from_items(no_mask), path, "saliency",
                        column="ids").take_all()


def test_device_choice(model_file, tmp_path):
    """--device cuda runs on CUDA where onnxruntime can use it and is one clear error elsewhere;
    auto picks CUDA when usable, else the CPU."""
    from rectonnx.runtime import cuda_usable

    make_images(tmp_path / "images", 2)
    result = CliRunner().invoke(main, ["explain", str(model_file), str(tmp_path / "images"),
                                       "--out", str(tmp_path / "out"), "--device", "cuda",
                                       "--no-progress", "--preset", "minus1to1"])
    if cuda_usable():
        assert result.exit_code == 0 and "CUDA" in result.stdout, result.output
    else:
        assert result.exit_code == 2 and result.output.startswith(
            "error: device 'cuda' asked for, but onnxruntime cannot use CUDA here")
    summary = explain_images(model_file, [tmp_path / "images"], tmp_path / "auto", **FAST)
    assert summary.device == ("CUDA" if cuda_usable() else "CPU")


def test_bisect_threshold_writes_the_same_maps(model_file, tmp_path):
    """--threshold bisect (no TopK, TensorRT-safe) computes the same tau as topk."""
    make_images(tmp_path / "images", 4)
    maps = []
    for threshold in ("topk", "bisect"):
        out = tmp_path / threshold
        explain_images(model_file, [tmp_path / "images"], out, threshold=threshold, **FAST)
        maps.append({r["input"]: load_attribution(out, r) for r in records(out)})
    for key in maps[0]:
        np.testing.assert_array_equal(maps[0][key], maps[1][key])
