"""Hostile inputs to ``rectonnx explain``: special files, symlink loops, long names, decompression
bombs, broken sidecars, absurd sizes, full disks, and an output folder inside the input folder.

Each test reproduces one failure of an adversarial run and checks the behaviour asked for:
no hang, no unbounded memory, no torn or orphaned file, and a clear message naming the file,
the key or the flag.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import tracemalloc

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import rectonnx
from rectonnx import batch as batch_module
from rectonnx.batch import (FAILURES, MANIFEST, Manifest, OutputDir, OutputError, explain_images,
                            parse_bytes, preprocess_for, sidecar)
from rectonnx.cli import main
from rectonnx.converters.pytorch import export
from rectonnx.images import ImageLoadError, Preprocess, iter_image_paths, load_image

PRE = Preprocess(mean=(0.5,), std=(0.5,))
FAST = dict(preprocess=PRE, progress=False, batch_size=4)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(2 * 16 * 16, 3))
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    export(net, torch.randn(1, 3, 16, 16), path)
    return path


@pytest.fixture(scope="module")
def explainer(model_file):
    return rectonnx.Explainer(model_file, spinning=False)


def png(path, seed=0, size=(16, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(path)
    return path


def manifest_rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]


def failure_rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / FAILURES).read_text().splitlines()]


def listed_files(out) -> set[str]:
    return {v for r in manifest_rows(out) for k, v in r["files"].items() if k != "key"}


def files_on_disk(out) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*")
            if p.is_file() and p.suffix in (".npy", ".npz", ".png")}


# -- 1. special files and symlink loops ----------------------------------------------------------
class _FifoUnblocker:
    """Before the fix a FIFO blocks ``open`` forever: after ``delay`` seconds this opens the
    writing end (and closes it), so a blocked reader gets EOF and the test fails instead of
    hanging."""

    def __init__(self, fifo, delay=3.0):
        self.fifo, self.delay, self.stop = fifo, delay, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        if self.stop.wait(self.delay):
            return
        while not self.stop.wait(0.2):
            try:
                os.close(os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def test_fifos_sockets_and_devices_are_skipped_with_a_reason(model_file, tmp_path,
                                                            monkeypatch):
    images = tmp_path / "imgs"
    png(images / "a.png")
    png(images / "z.png", seed=1)
    os.mkfifo(images / "pipe.png")
    monkeypatch.chdir(images)  # AF_UNIX paths are short: bind relative to the folder
    server = socket.socket(socket.AF_UNIX)
    server.bind("sock.png")
    out = tmp_path / "out"
    started = time.perf_counter()
    try:
        with _FifoUnblocker(images / "pipe.png"):
            summary = explain_images(model_file, [images], out, **FAST)
    finally:
        server.close()
    assert time.perf_counter() - started < 3.0  # never blocked on the FIFO
    assert summary.explained == 2
    reasons = {row["input"].rsplit("/", 1)[1]: row["error"] for row in failure_rows(out)}
    assert set(reasons) == {"pipe.png", "sock.png"}
    assert "FIFO" in reasons["pipe.png"] and "not a regular file" in reasons["pipe.png"]
    assert "socket" in reasons["sock.png"]
    # a FIFO or device named explicitly is listed too (then skipped), never opened for reading
    assert iter_image_paths(images / "pipe.png") == [images / "pipe.png"]
    with _FifoUnblocker(images / "pipe.png"):
        with pytest.raises(ImageLoadError, match="pipe.png: .*FIFO"):
            load_image(images / "pipe.png", PRE)
    with pytest.raises(ImageLoadError, match="/dev/zero: .*character device"):
        load_image("/dev/zero", PRE)


def test_a_glob_through_a_symlink_loop_visits_each_directory_once(tmp_path, monkeypatch):
    loop = tmp_path / "loop"
    png(loop / "top.png")
    png(loop / "a" / "inner.png")
    png(loop / "a" / "b" / "deep.png")
    (loop / "a" / "up").symlink_to("..")          # a/up -> loop
    (loop / "a" / "self").symlink_to("../a")      # a/self -> a
    (loop / "a" / "knot.png").symlink_to("knot.png")  # a file link to itself: skipped
    calls = {"n": 0}
    real_scandir = os.scandir

    def counting_scandir(*args):
        calls["n"] += 1
        if calls["n"] > 100:
            raise RuntimeError("the walk does not end: a directory is visited again and again")
        return real_scandir(*args)

    monkeypatch.setattr(os, "scandir", counting_scandir)
    monkeypatch.chdir(tmp_path)
    found = iter_image_paths(["loop/**/*.png"])
    assert sorted(p.resolve().relative_to(loop.resolve()).as_posix() for p in found) == \
        ["a/b/deep.png", "a/inner.png", "top.png"]
    assert calls["n"] <= 10
    calls["n"] = 0
    assert len(iter_image_paths(["loop/**"])) == 3 and calls["n"] <= 20
    calls["n"] = 0
    assert len(iter_image_paths([loop])) == 3 and calls["n"] <= 10  # directory walk


# -- 2. long names -------------------------------------------------------------------------------
def test_long_input_names_give_short_enough_temporary_and_output_names(model_file, tmp_path):
    images = tmp_path / "imgs"
    long_a = "x" * 246 + "a.png"                 # 251 bytes
    long_b = "x" * 246 + "b.png"                 # the same first 246 bytes
    accents = "\u00e9" * 124 + ".png"            # 252 bytes of UTF-8
    for i, name in enumerate([long_a, long_b, accents]):
        png(images / name, seed=i)
    out = tmp_path / "out"
    summary = explain_images(model_file, [images], out, **FAST)
    assert summary.explained == 3 and not summary.failures
    names = listed_files(out)
    assert len(names) == 9  # attribution, heatmap and overlay of each, all distinct
    assert all(len(os.fsencode(n.rsplit("/", 1)[-1])) <= 255 for n in names)
    assert all((out / n).is_file() for n in names)
    again = explain_images(model_file, [images], out, **FAST)
    assert (again.explained, again.resumed) == (0, 3)


def test_a_name_too_long_is_never_called_a_full_disk(model_file, tmp_path, monkeypatch):
    with OutputDir(tmp_path / "direct") as output:
        with pytest.raises(OutputError) as caught:
            output.write("y" * 300 + ".npy", lambda h: h.write(b"x"))
    message = str(caught.value)
    assert "too long" in message and "disk full" not in message

    png(tmp_path / "imgs" / "a.png")

    def too_long(array):
        def fail(handle):
            raise OSError(errno.ENAMETOOLONG, "File name too long")
        return fail

    monkeypatch.setattr(batch_module, "write_npy", too_long)
    with pytest.raises(OutputError) as caught:
        explain_images(model_file, [tmp_path / "imgs"], tmp_path / "out", **FAST)
    message = str(caught.value)
    assert "too long" in message
    assert "disk full" not in message and "free space" not in message


# -- 3. memory: pixel limit, decode budget, sidecar sizes ----------------------------------------
def big_16_bit_png(path, side=2000):
    """A ``side`` x ``side`` 16-bit grayscale PNG of a few kB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((side, side), np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    return path


def test_images_over_the_pixel_limit_are_refused_naming_limit_and_flag(model_file, tmp_path):
    big = big_16_bit_png(tmp_path / "imgs" / "big.png")
    png(tmp_path / "imgs" / "small.png")
    with pytest.raises(ImageLoadError, match=r"big.png: .*4\.0 megapixels.*limit of 1\.0 "
                                             r"megapixels.*--max-pixels"):
        load_image(big, PRE, max_pixels=1_000_000)
    assert load_image(big, Preprocess(size=16), max_pixels=4_000_000)[0].shape == (3, 16, 16)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["explain", str(model_file), str(tmp_path / "imgs"),
                                       "--out", str(out), "--workers", "2",
                                       "--max-pixels", "1000000", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "explained 1 image(s)" in result.output
    (row,) = failure_rows(out)
    assert row["input"].endswith("big.png") and "--max-pixels" in row["error"]


def test_a_large_jpeg_is_decoded_smaller_when_the_target_size_allows(tmp_path):
    path = tmp_path / "large.jpg"
    Image.new("RGB", (2400, 2000), (200, 40, 90)).save(path, quality=50)
    x, _ = load_image(path, Preprocess(size=16), max_pixels=1_000_000)  # drafted to 300 x 250
    assert x.shape == (3, 16, 16)
    np.testing.assert_allclose(x[:, 8, 8], np.array([200, 40, 90]) / 255, atol=0.03)
    with pytest.raises(ImageLoadError, match="--max-pixels"):  # full size asked for: refused
        load_image(path, Preprocess(size=None), max_pixels=1_000_000)


def test_16_bit_decoding_works_in_float32_not_float64(tmp_path):
    big = big_16_bit_png(tmp_path / "big.png")
    tracemalloc.start()
    try:
        load_image(big, Preprocess(size=16))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2000 * 2000 * 10  # before: float64 copies, about 26 bytes per pixel


def test_the_decode_budget_bounds_bytes_in_flight(tmp_path, monkeypatch):
    from rectonnx.images import DecodeBudget, decode_bytes

    budget = DecodeBudget(100)
    peak, lock = [0], threading.Lock()

    def work(n):
        with budget.hold(n):
            with lock:
                peak[0] = max(peak[0], budget.used)
            time.sleep(0.01)

    threads = [threading.Thread(target=work, args=(n,)) for n in (60, 60, 60, 30, 30, 500)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads)
    assert peak[0] <= 500 and budget.used == 0  # at most 100, or one too-large image alone
    # load_image holds the estimated bytes of its image while it decodes
    held = []
    budget = DecodeBudget(10**9)
    real_hold = budget.hold

    def spy(n):
        held.append(n)
        return real_hold(n)

    monkeypatch.setattr(budget, "hold", spy)
    big = big_16_bit_png(tmp_path / "big.png", side=500)
    load_image(big, Preprocess(size=16), budget=budget)
    assert held == [decode_bytes(500, 500, "I;16")] and held[0] >= 500 * 500 * 6


@pytest.mark.parametrize("key, value", [("size", 60000), ("resize", 10**6), ("size", [16, 9000])])
def test_absurd_sidecar_sizes_are_refused_naming_file_and_key(model_file, tmp_path, key, value):
    model = tmp_path / "m.onnx"
    model.write_bytes(model_file.read_bytes())
    (tmp_path / "m.json").write_text(json.dumps({"preprocess": {key: value}}))
    with pytest.raises(ValueError, match=rf"m\.json: preprocess\.{key}.*8192"):
        preprocess_for(model)
    with pytest.raises(ValueError, match=r"--size.*8192"):
        preprocess_for(model_file, size=60000)


def test_a_failure_message_is_never_empty(tmp_path, monkeypatch):
    path = png(tmp_path / "a.png")

    def out_of_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(batch_module, "load_image", out_of_memory)
    item = batch_module.Item(path, str(path), "a")
    message = batch_module.load_item(item, PRE, False)
    assert isinstance(message, str) and "a.png" in message and "MemoryError" in message
    other = png(tmp_path / "b.png", size=(20, 20))
    monkeypatch.setattr(Image.Image, "resize",
                        lambda *a, **k: (_ for _ in ()).throw(ValueError()))
    with pytest.raises(ImageLoadError, match=r"cannot preprocess image \(ValueError\)"):
        load_image(other, Preprocess(size=16))


# -- 4. the sidecar's classes ------------------------------------------------------------------
def sidecar_model(model_file, tmp_path, content) -> str:
    model = tmp_path / "m.onnx"
    model.write_bytes(model_file.read_bytes())
    (tmp_path / "m.json").write_text(json.dumps(content))
    return model


@pytest.mark.parametrize("content, words", [
    ({"classes": 3}, "classes"),
    ({"classes": [1, 2, 3]}, "classes"),
    ({"classes": "cat"}, "classes"),
    (["cat", "dog", "cow"], "JSON object"),
    ({"preprocess": [1]}, "preprocess"),
])
def test_a_malformed_sidecar_is_refused_naming_file_and_key(model_file, tmp_path, content,
                                                           words):
    model = sidecar_model(model_file, tmp_path, content)
    png(tmp_path / "imgs" / "a.png")
    with pytest.raises(ValueError, match=rf"m\.json: .*{words}"):
        sidecar(model)
    with pytest.raises(ValueError, match=rf"m\.json: .*{words}"):
        explain_images(model, [tmp_path / "imgs"], tmp_path / "out", **FAST)
    assert not (tmp_path / "out").exists() or not files_on_disk(tmp_path / "out")


def test_classes_of_the_wrong_length_are_ignored_with_a_warning(model_file, tmp_path):
    model = sidecar_model(model_file, tmp_path, {"classes": ["cat"]})  # the model has 3
    png(tmp_path / "imgs" / "a.png")
    png(tmp_path / "imgs" / "b.png", seed=1)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"m\.json: 'classes' has 1 name\(s\) but the model "
                                         r"has 3 classes"):
        summary = explain_images(model, [tmp_path / "imgs"], out, **FAST)
    assert summary.explained == 2
    assert all("target_name" not in row for row in manifest_rows(out))
    assert files_on_disk(out) == listed_files(out)
    result = CliRunner().invoke(main, ["explain", str(model), str(tmp_path / "imgs"), "--out",
                                       str(tmp_path / "cli"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "warning: " in result.output and "'classes' has 1 name(s)" in result.output
    good = sidecar_model(model_file, tmp_path, {"classes": ["cat", "dog", "cow"]})
    explain_images(good, [tmp_path / "imgs"], tmp_path / "named", **FAST)
    assert {row["target_name"] for row in manifest_rows(tmp_path / "named")} <= \
        {"cat", "dog", "cow"}


def test_no_file_is_written_for_an_image_whose_record_fails(model_file, tmp_path, monkeypatch):
    for i in range(3):
        png(tmp_path / "imgs" / f"{i}.png", seed=i)
    real = batch_module.ResultWriter.record
    calls = {"n": 0}

    def second_fails(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise IndexError("list index out of range")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(batch_module.ResultWriter, "record", second_fails)
    out = tmp_path / "out"
    with pytest.raises(IndexError):
        explain_images(model_file, [tmp_path / "imgs"], out, **FAST)
    assert len(manifest_rows(out)) == 1
    assert files_on_disk(out) == listed_files(out)


# -- 5. --memory-budget ------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["infGB", "inf", "nan", "-infMB", "0", "0B", "0.1B", "-5MB",
                                  "1e-3", 0, -1])
def test_memory_budget_must_be_a_finite_size_of_at_least_one_byte(text):
    with pytest.raises(ValueError, match="--memory-budget"):
        parse_bytes(text)
    assert parse_bytes("1B") == 1 and parse_bytes("1.5KiB") == 1536 and parse_bytes(7) == 7


# -- 6. full disks, torn lines, failures.jsonl ----------------------------------------------------
class DiskFills:
    """``os.write`` that works ``allowed`` times, then writes half (``short``) or raises ENOSPC;
    once full, the disk stays full."""

    def __init__(self, allowed: int, short: bool):
        self.allowed, self.short, self.calls, self.full = allowed, short, 0, False
        self.real = os.write

    def __call__(self, fd, data):
        self.calls += 1
        if self.full or self.calls > self.allowed:
            first, self.full = not self.full, True
            if self.short and first and len(data) > 1:
                return self.real(fd, bytes(data)[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.real(fd, data)


def test_a_full_disk_at_every_write_leaves_no_torn_line_and_says_so(model_file, explainer,
                                                                    tmp_path, monkeypatch):
    for i in range(3):
        png(tmp_path / "imgs" / f"{i}.png", seed=i)
    options = dict(FAST, batch_size=2, write_png=True, write_overlay=False,
                   explainer=explainer)
    counter = DiskFills(10**9, False)
    monkeypatch.setattr(os, "write", counter)
    explain_images(model_file, [tmp_path / "imgs"], tmp_path / "clean", **options)
    total = counter.calls
    assert total >= 10  # run.json, 3 maps, 3 heatmaps, 3 manifest lines: all through os.write
    for short in (False, True):
        for allowed in range(total):
            out = tmp_path / f"full-{short}-{allowed}"
            monkeypatch.setattr(os, "write", DiskFills(allowed, short))
            with pytest.raises(OutputError) as caught:
                explain_images(model_file, [tmp_path / "imgs"], out, **options)
            message = str(caught.value)
            assert message.startswith("disk full") and str(out) in message, message
            assert "requested" not in message
            if (out / MANIFEST).exists():
                text = (out / MANIFEST).read_text()
                assert text == "" or text.endswith("\n")
                assert all((out / f).is_file() for f in listed_files(out))
            monkeypatch.setattr(os, "write", counter.real)
            summary = explain_images(model_file, [tmp_path / "imgs"], out, **options)
            assert summary.explained + summary.resumed == 3
            rows = manifest_rows(out)
            assert len(rows) == len({r["input"] for r in rows}) == 3


def test_a_short_manifest_write_is_cut_back_and_reported(tmp_path, monkeypatch):
    with OutputDir(tmp_path / "out") as output:
        manifest = Manifest(output.root / MANIFEST, output).load()
        manifest.append([{"input": "/a", "files": {}}])
        monkeypatch.setattr(os, "write", DiskFills(0, True))
        with pytest.raises(OutputError, match=rf"disk full.*{tmp_path / 'out'}"):
            manifest.append([{"input": "/b", "files": {}}])
        monkeypatch.undo()
        manifest.close()
        assert (output.root / MANIFEST).read_text() == json.dumps(
            {"input": "/a", "files": {}}) + "\n"
        assert list(Manifest(output.root / MANIFEST, output).load().done) == ["/a"]


def test_short_writes_are_retried_and_numpy_never_writes_behind_our_back(tmp_path,
                                                                       monkeypatch):
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, bytes(data)[:100]))
    array = np.arange(3000, dtype=np.float32)
    with OutputDir(tmp_path / "out") as output:
        output.write("a.npy", batch_module.write_npy(array))
        output.write("a.npz", batch_module.write_npz({"attribution": array}))
        output.write("a.png", batch_module.write_png(np.zeros((40, 40, 3), np.uint8)))
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "a.npy"), array)
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "a.npz")["attribution"], array)
    assert Image.open(tmp_path / "out" / "a.png").size == (40, 40)
    monkeypatch.setattr(os, "write", lambda fd, data: 0)
    with OutputDir(tmp_path / "zero") as output:
        with pytest.raises(OutputError, match="disk full"):
            output.write("a.npy", batch_module.write_npy(array))


def test_failures_jsonl_holds_one_line_per_failed_input_across_resumes(model_file, tmp_path):
    images = tmp_path / "imgs"
    png(images / "good.png")
    (images / "text.png").write_text("not a picture")
    (images / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    for _ in range(3):
        explain_images(model_file, [images], out, **FAST)
    rows = failure_rows(out)
    assert sorted(r["input"].rsplit("/", 1)[1] for r in rows) == ["empty.jpg", "text.png"]


# -- 7. --out inside an input folder ---------------------------------------------------------------
def test_the_output_folder_is_never_an_input(model_file, tmp_path, monkeypatch):
    images = tmp_path / "imgs"
    for i in range(3):
        png(images / f"{i}.png", seed=i)
    out = images / "maps"
    counts = []
    for _ in range(3):
        summary = explain_images(model_file, [images], out, **FAST)
        counts.append((summary.explained, summary.resumed))
    assert counts == [(3, 0), (0, 3), (0, 3)]
    assert len(manifest_rows(out)) == 3
    monkeypatch.chdir(tmp_path)
    again = explain_images(model_file, ["imgs/**/*.png", str(out / "0.png")], "imgs/maps", **FAST)
    assert (again.explained, again.resumed) == (0, 3)
    assert all(not r["input"].startswith(str(out)) for r in manifest_rows(out))
