"""rectonnx.visualize: App. F.1 maps, colours, overlays, atomic PNGs and the figure grids."""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from rectonnx.visualize import (
    attribution_to_map,
    channel_mean_map,
    heatmap_rgb,
    layer_maps_grid,
    method_grid,
    method_grid_many,
    overlay_rgb,
    save_png,
    scale_map,
)

WHITE = np.array([255, 255, 255])


def _smooth(rng, shape, passes=3):
    a = rng.normal(size=shape)
    for _ in range(passes):  # cheap blur along the two last axes
        a = (a + np.roll(a, 1, -1) + np.roll(a, -1, -1) + np.roll(a, 1, -2) + np.roll(a, -1, -2)) / 5
    return a


# ---------------------------------------------------------------------------------------------
# attribution_to_map
# ---------------------------------------------------------------------------------------------


def test_map_is_channel_sum_clipped_to_numpy_percentiles():
    rng = np.random.default_rng(0)
    a = rng.standard_cauchy(size=(3, 40, 50))               # heavy tails: clipping matters
    m = attribution_to_map(a, "CHW")
    s = a.sum(axis=0)
    lo, hi = np.percentile(s, [0.5, 99.5])
    assert lo < 0 < hi
    np.testing.assert_allclose(m, np.clip(s, lo, hi), rtol=0, atol=1e-12)
    assert m.shape == (40, 50) and m.dtype == np.float64
    assert (m == lo).sum() >= 1 and (m == hi).sum() >= 1
    np.testing.assert_allclose(attribution_to_map(a, clip=None), s)


def test_map_layouts_agree():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(3, 8, 9))
    ref = attribution_to_map(a, "CHW")
    np.testing.assert_array_equal(attribution_to_map(a[None], "NCHW"), ref)
    np.testing.assert_array_equal(attribution_to_map(a, "NCHW"), ref)          # per-sample array
    np.testing.assert_array_equal(attribution_to_map(a.transpose(1, 2, 0), "HWC"), ref)
    np.testing.assert_array_equal(attribution_to_map(a.transpose(1, 2, 0)[None], "NHWC"), ref)
    with pytest.raises(ValueError, match="batch of 2"):
        attribution_to_map(np.stack([a, a]), "NCHW")
    with pytest.raises(ValueError, match="layout"):
        attribution_to_map(a, "CWH")


def test_grayscale_only_clipped():
    rng = np.random.default_rng(2)
    g = rng.normal(size=(1, 30, 30))
    lo, hi = np.percentile(g[0], [0.5, 99.5])
    np.testing.assert_allclose(attribution_to_map(g, "NCHW"), np.clip(g[0], lo, hi))
    np.testing.assert_allclose(attribution_to_map(g[0]), np.clip(g[0], lo, hi))  # 2-D = a map


def test_positive_floor_is_not_lifted():
    """All-positive map (no zeros): values under the 0.5th percentile go to 0, not up to it."""
    rng = np.random.default_rng(3)
    m0 = rng.uniform(1.0, 2.0, size=(20, 20))
    lo, hi = np.percentile(m0, [0.5, 99.5])
    m = attribution_to_map(m0)
    below = m0 < lo
    assert below.any()
    assert (m[below] == 0).all()
    np.testing.assert_allclose(m[~below], np.clip(m0[~below], lo, hi))
    # mirrored for all-negative maps
    np.testing.assert_array_equal(attribution_to_map(-m0), -m)


def test_non_finite_attribution_rejected():
    a = np.zeros((3, 4, 4))
    a[0, 1, 1] = np.nan
    with pytest.raises(ValueError, match="1 NaN"):
        attribution_to_map(a)


def test_channel_mean_map():
    rng = np.random.default_rng(4)
    t = rng.normal(size=(1, 16, 7, 7))
    np.testing.assert_allclose(channel_mean_map(t), t[0].mean(axis=0))
    np.testing.assert_allclose(channel_mean_map(t.transpose(0, 2, 3, 1), "NHWC"), t[0].mean(axis=0))


def test_scale_map_constant_maps_do_not_divide_by_zero():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(scale_map(np.zeros((3, 3))), np.zeros((3, 3)))
        np.testing.assert_array_equal(scale_map(np.ones((3, 3)), symmetric=False), np.full((3, 3), 0.5))
    np.testing.assert_allclose(scale_map(np.array([[-2.0, 1.0]])), [[-1.0, 0.5]])


# ---------------------------------------------------------------------------------------------
# Colours
# ---------------------------------------------------------------------------------------------


def test_heatmap_red_positive_blue_negative_white_zero():
    a = np.zeros((3, 10, 30))
    a[:, :, :10] = 1.0      # left third positive
    a[:, :, 20:] = -1.0     # right third negative, middle zero
    h = heatmap_rgb(a, layout="CHW")
    assert h.shape == (10, 30, 3) and h.dtype == np.uint8
    np.testing.assert_array_equal(h[:, :10].reshape(-1, 3), np.tile([255, 0, 0], (100, 1)))
    np.testing.assert_array_equal(h[:, 20:].reshape(-1, 3), np.tile([0, 0, 255], (100, 1)))
    np.testing.assert_array_equal(h[:, 10:20].reshape(-1, 3), np.tile(WHITE, (100, 1)))


def test_heatmap_graded_and_symmetric():
    m = np.linspace(-1.0, 0.5, 301)[None, :]           # more negative than positive
    h = heatmap_rgb(m, clip=None).astype(int)[0]
    v = m[0]
    pos, neg = v > 0, v < 0
    assert (h[pos, 0] == 255).all() and (np.diff(h[pos, 1]) <= 0).all()   # whiter -> redder
    assert (h[neg, 2] == 255).all() and (np.diff(h[neg, 0]) >= 0).all()   # bluer -> whiter
    # symmetric about zero: +0.5 is half-strength red, not full red
    assert 120 <= h[-1, 1] <= 135
    np.testing.assert_array_equal(h[0], [0, 0, 255])


def test_all_zero_map_is_neutral_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h = heatmap_rgb(np.zeros((3, 5, 5)))
    assert (h == 255).all()


def test_nonnegative_map_uses_the_white_to_red_half():
    rng = np.random.default_rng(5)
    a = np.maximum(rng.normal(size=(3, 20, 20)), 0) * (rng.uniform(size=(1, 20, 20)) > 0.7)
    h = heatmap_rgb(a)
    assert (h[..., 0] == 255).all()                      # no blue anywhere
    assert (h[..., 1] == h[..., 2]).all()
    m = attribution_to_map(a)
    assert (h[m == 0] == 255).all() and (h[m == m.max()] == [255, 0, 0]).all()


def test_non_symmetric_spans_whole_colour_map():
    m = np.array([[1.0, 2.0, 3.0]])
    h = heatmap_rgb(m, symmetric=False, clip=None)
    np.testing.assert_array_equal(h[0, 0], [0, 0, 255])
    np.testing.assert_array_equal(h[0, 2], [255, 0, 0])


def test_other_colour_map_by_name():
    h = heatmap_rgb(np.array([[0.0, 1.0]]), cmap="gray", symmetric=False, clip=None)
    np.testing.assert_array_equal(h[0], [[0, 0, 0], [255, 255, 255]])


def test_overlay_shows_photo_where_attribution_is_zero():
    rng = np.random.default_rng(6)
    img = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
    a = np.zeros((3, 12, 12))
    a[:, :4, :4] = 1.0
    a[:, -4:, -4:] = -1.0
    o = overlay_rgb(img, a, alpha=0.6, layout="CHW")
    gray_f = img @ np.array([0.299, 0.587, 0.114])
    gray = np.rint(gray_f)
    zero = np.ones((12, 12), bool)
    zero[:4, :4] = zero[-4:, -4:] = False
    for c in range(3):
        np.testing.assert_array_equal(o[..., c][zero], gray[zero])
    expect_red = np.rint(0.4 * gray_f[:4, :4, None] + 0.6 * np.array([255, 0, 0]))
    np.testing.assert_array_equal(o[:4, :4], expect_red)
    assert (o[-4:, -4:, 2].astype(int) >= o[-4:, -4:, 0]).all()
    with pytest.raises(ValueError, match="12x12"):
        overlay_rgb(img[:10], a)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def test_save_png_atomic_round_trip(tmp_path):
    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, size=(9, 11, 3), dtype=np.uint8)
    out = save_png(tmp_path / "a" / "b" / "x.png", img)
    assert out.exists()
    np.testing.assert_array_equal(np.asarray(Image.open(out)), img)
    save_png(out, img[::-1].copy())                     # overwrite in place
    np.testing.assert_array_equal(np.asarray(Image.open(out)), img[::-1])
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.png"]  # no temp files left
    with pytest.raises(ValueError):
        save_png(tmp_path / "f.png", img.astype(np.float32))
    assert not (tmp_path / "f.png").exists()


# ---------------------------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------------------------


def _find_block(canvas, block):
    """Top-left positions where ``block`` occurs exactly in ``canvas``."""
    h, w = block.shape[:2]
    ys, xs = np.nonzero((canvas[:, :, :] == block[0, 0]).all(axis=2))
    return [(y, x) for y, x in zip(ys, xs)
            if y + h <= canvas.shape[0] and x + w <= canvas.shape[1]
            and np.array_equal(canvas[y:y + h, x:x + w], block)]


def test_method_grid_small_input_upscaled_nearest(tmp_path):
    rng = np.random.default_rng(8)
    img = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    attrs = {"saliency": _smooth(rng, (3, 32, 32)), "rectgrad": np.maximum(_smooth(rng, (3, 32, 32)), 0)}
    out = method_grid(img, attrs, tmp_path / "grid" / "one.png", title="A title")
    png = np.asarray(Image.open(out).convert("RGB"))
    h, w = png.shape[:2]
    assert w >= 3 * 160 and 160 < h < 400                 # 3 panels of 160 px (32 x 5)
    # the input is drawn pixel-exactly as 5x5 nearest-neighbour blocks
    big = np.repeat(np.repeat(img, 5, 0), 5, 1)
    assert len(_find_block(png, big)) == 1
    # and so is each heatmap
    for a in attrs.values():
        hm = np.repeat(np.repeat(heatmap_rgb(a), 5, 0), 5, 1)
        assert len(_find_block(png, hm)) == 1
    # red and blue heat, plus dark label text
    red = ((png[..., 0] > 200) & (png[..., 1] < 60) & (png[..., 2] < 60)).sum()
    blue = ((png[..., 2] > 200) & (png[..., 0] < 60) & (png[..., 1] < 60)).sum()
    assert red > 100 and blue > 100
    top = png[: png.shape[0] - 160 - 40]                   # title + column names
    assert (top.max(axis=2) < 80).sum() > 50


def test_method_grid_224_drawn_one_to_one(tmp_path):
    rng = np.random.default_rng(9)
    img = rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    a = _smooth(rng, (1, 3, 224, 224))
    out = method_grid(img, {"saliency": a}, tmp_path / "g224.png", overlay=True)
    png = np.asarray(Image.open(out).convert("RGB"))
    assert len(_find_block(png, img)) == 1
    assert len(_find_block(png, overlay_rgb(img, a))) == 1


def test_method_grid_many_rows_labels_and_missing_methods(tmp_path):
    rng = np.random.default_rng(10)
    rows = []
    for i in range(3):
        img = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        attrs = {"saliency": _smooth(rng, (3, 32, 32)), "guided_backprop": _smooth(rng, (3, 32, 32))}
        if i == 1:
            attrs["rectgrad"] = np.maximum(_smooth(rng, (3, 32, 32)), 0)
        rows.append((img, attrs, f"class {i} (pred {i}, 0.9{i})"))
    out = method_grid_many(rows, tmp_path / "many.png", "Three images")
    png = np.asarray(Image.open(out).convert("RGB"))
    assert png.shape[0] >= 3 * 160 and png.shape[1] >= 4 * 160
    for img, _, _ in rows:
        assert len(_find_block(png, np.repeat(np.repeat(img, 5, 0), 5, 1))) == 1
    # row labels widen the figure compared with no labels
    out2 = method_grid_many([(r[0], r[1], None) for r in rows], tmp_path / "nolabels.png")
    assert Image.open(out2).size[0] < png.shape[1]
    # left strip (row labels) has dark text pixels
    assert (png[:, :100].max(axis=2) < 80).sum() > 50


def test_grids_reject_nonsense(tmp_path):
    with pytest.raises(ValueError):
        method_grid_many([], tmp_path / "x.png")
    with pytest.raises(ValueError):
        method_grid(None, {}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_layer_maps_grid_mixed_sizes(tmp_path):
    rng = np.random.default_rng(11)
    maps = {f"conv{i}": _smooth(rng, (s, s)) for i, s in enumerate([32, 16, 8, 4])}
    out = layer_maps_grid(maps, tmp_path / "layers.png", "Saliency by layer")
    png = np.asarray(Image.open(out).convert("RGB"))
    assert png.shape[1] >= 4 * 160
    for m in maps.values():
        k = 160 // m.shape[0]
        assert len(_find_block(png, np.repeat(np.repeat(heatmap_rgb(m), k, 0), k, 1))) == 1
    # two rows, 3-D activations averaged over channels
    two = {"Saliency": {"conv1": rng.normal(size=(8, 16, 16)), "conv2": rng.normal(size=(8, 8, 8))},
           "RectGrad": {"conv1": np.maximum(rng.normal(size=(8, 16, 16)), 0)}}
    out = layer_maps_grid(two, tmp_path / "layers2.png")
    png2 = np.asarray(Image.open(out).convert("RGB"))
    assert png2.shape[0] > 2 * 160
    hm = heatmap_rgb(two["Saliency"]["conv1"].mean(axis=0))
    assert len(_find_block(png2, np.repeat(np.repeat(hm, 10, 0), 10, 1))) == 1


def test_import_is_light_and_pyplot_never_used(tmp_path):
    code = (
        "import sys, numpy as np\n"
        "import rectonnx.visualize as v, rectonnx.images\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'\n"
        f"v.method_grid(np.zeros((8, 8, 3), np.uint8), {{'m': np.ones((3, 8, 8))}}, r'{tmp_path / 'p.png'}')\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "p.png").exists()
