"""rectonnx.images: decoding every PIL mode, geometry, normalisation, file discovery, batches."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from rectonnx.images import (
    ImageLoadError,
    Preprocess,
    iter_image_paths,
    load_batch,
    load_image,
    preprocess_image,
    to_display,
)

KEEP = Preprocess(size=None)  # keep size, [0, 1], RGB, NCHW


def _save(path, im, **kw):
    im.save(path, **kw)
    return path


# ---------------------------------------------------------------------------------------------
# Preprocess
# ---------------------------------------------------------------------------------------------


def test_preprocess_json_round_trip():
    p = Preprocess(size=(32, 48), resize=40, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), scale=255.0,
                   layout="NHWC", dtype="float16", bgr=True, background=None, resample="bicubic")
    d = json.loads(json.dumps(p.to_dict()))
    assert Preprocess.from_dict(d) == p
    assert Preprocess.from_dict(Preprocess.imagenet().to_dict()) == Preprocess.imagenet()
    assert Preprocess(size=224).size == (224, 224)
    assert Preprocess(mean=0.5, std=0.5).mean == (0.5,)


@pytest.mark.parametrize(
    "kw",
    [dict(size=0), dict(channels=2), dict(mean=(0.1, 0.2)), dict(std=(0.0,)), dict(layout="CHW"),
     dict(dtype="int8"), dict(resample="cubicish"), dict(background=(300, 0, 0)), dict(resize=-3)],
)
def test_preprocess_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        Preprocess(**kw)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown Preprocess field"):
        Preprocess.from_dict({"size": 8, "crop": 7})


# ---------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------


def test_rgb_values_and_display(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
    path = _save(tmp_path / "rgb.png", Image.fromarray(a))
    x, disp = load_image(path, KEEP)
    assert x.shape == (3, 6, 7) and x.dtype == np.float32
    np.testing.assert_allclose(x, a.transpose(2, 0, 1) / 255.0, rtol=0, atol=1e-7)
    assert disp.dtype == np.uint8 and disp.shape == (6, 7, 3)
    np.testing.assert_array_equal(disp, a)


def test_grayscale_L_repeated_or_single_channel(tmp_path):
    a = np.array([[0, 128], [255, 64]], dtype=np.uint8)
    path = _save(tmp_path / "g.png", Image.fromarray(a, ))
    assert Image.open(path).mode == "L"
    x3, d = load_image(path, KEEP)
    assert x3.shape == (3, 2, 2)
    for c in range(3):
        np.testing.assert_allclose(x3[c], a / 255.0, atol=1e-7)
    np.testing.assert_array_equal(d, np.repeat(a[:, :, None], 3, axis=2))
    x1, _ = load_image(path, Preprocess(size=None, channels=1))
    assert x1.shape == (1, 2, 2)
    np.testing.assert_allclose(x1[0], a / 255.0, atol=1e-7)


def test_colour_to_one_channel_uses_601_luma(tmp_path):
    a = np.zeros((1, 3, 3), dtype=np.uint8)
    a[0, 0] = (255, 0, 0)
    a[0, 1] = (0, 255, 0)
    a[0, 2] = (0, 0, 255)
    path = _save(tmp_path / "c.png", Image.fromarray(a))
    x, d = load_image(path, Preprocess(size=None, channels=1, layout="NHWC"))
    assert x.shape == (1, 3, 1)
    np.testing.assert_allclose(x[0, :, 0], [0.299, 0.587, 0.114], atol=1e-6)
    np.testing.assert_array_equal(d, a)  # the display keeps the colours


def test_rgba_composited_on_white_or_alpha_dropped(tmp_path):
    a = np.zeros((1, 3, 4), dtype=np.uint8)
    a[0, 0] = (255, 0, 0, 0)      # fully transparent red
    a[0, 1] = (0, 0, 255, 255)    # opaque blue
    a[0, 2] = (0, 0, 0, 128)      # half-transparent black
    path = _save(tmp_path / "rgba.png", Image.fromarray(a, "RGBA"))
    x, d = load_image(path, KEEP)
    np.testing.assert_allclose(x[:, 0, 0], [1, 1, 1])          # white shows through
    np.testing.assert_allclose(x[:, 0, 1], [0, 0, 1])
    np.testing.assert_allclose(x[:, 0, 2], [127 / 255] * 3, atol=1 / 255)
    assert d.shape == (1, 3, 3)
    xd, _ = load_image(path, Preprocess(size=None, background=None))
    np.testing.assert_allclose(xd[:, 0, 0], [1, 0, 0])         # alpha dropped
    xk, _ = load_image(path, Preprocess(size=None, background=(0, 0, 0)))
    np.testing.assert_allclose(xk[:, 0, 0], [0, 0, 0])


def test_la_mode(tmp_path):
    a = np.array([[[200, 255], [10, 0]]], dtype=np.uint8)
    path = _save(tmp_path / "la.png", Image.fromarray(a, "LA"))
    assert Image.open(path).mode == "LA"
    x, _ = load_image(path, Preprocess(size=None, channels=1))
    np.testing.assert_allclose(x[0, 0], [200 / 255, 1.0], atol=1e-6)


def test_palette_with_and_without_transparency(tmp_path):
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * (254 * 3))
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    plain = _save(tmp_path / "p.png", p)
    x, _ = load_image(plain, KEEP)
    np.testing.assert_allclose(x[:, 0, 0], [1, 0, 0])
    np.testing.assert_allclose(x[:, 0, 1], [0, 1, 0])
    transparent = _save(tmp_path / "pt.png", p, transparency=1)  # index 1 (green) transparent
    assert Image.open(transparent).mode == "P" and "transparency" in Image.open(transparent).info
    x, d = load_image(transparent, KEEP)
    np.testing.assert_allclose(x[:, 0, 0], [1, 0, 0])
    np.testing.assert_allclose(x[:, 0, 1], [1, 1, 1])           # composited on white
    np.testing.assert_array_equal(d[0, 1], [255, 255, 255])
    gif = _save(tmp_path / "p.gif", p, transparency=1)
    x, _ = load_image(gif, KEEP)
    np.testing.assert_allclose(x[:, 0, 1], [1, 1, 1])


def test_16_bit_scaled_by_bit_depth_not_255(tmp_path):
    a = np.array([[0, 32768, 65535]], dtype=np.uint16)
    path = _save(tmp_path / "g16.png", Image.fromarray(a))
    assert Image.open(path).mode.startswith("I;16")
    x, d = load_image(path, Preprocess(size=None, channels=1))
    np.testing.assert_allclose(x[0, 0], [0.0, 32768 / 65535, 1.0], rtol=0, atol=1e-6)
    assert x.max() == 1.0
    np.testing.assert_array_equal(d[0, :, 0], [0, 128, 255])
    # a full-white 16-bit image is 1.0 before normalisation, mean/std applied after
    white = _save(tmp_path / "w16.png", Image.fromarray(np.full((4, 4), 65535, np.uint16)))
    x, _ = load_image(white, KEEP)
    np.testing.assert_array_equal(x, np.ones((3, 4, 4), np.float32))
    x, _ = load_image(white, Preprocess(size=None, mean=0.5, std=0.5))
    np.testing.assert_array_equal(x, np.ones((3, 4, 4), np.float32))
    # TIFF, too
    tif = _save(tmp_path / "g16.tif", Image.fromarray(a))
    x, _ = load_image(tif, Preprocess(size=None, channels=1))
    np.testing.assert_allclose(x[0, 0], [0.0, 32768 / 65535, 1.0], atol=1e-6)


def test_16_bit_resized_in_float(tmp_path):
    # 1-step differences in 16 bits must survive a resize (no 8-bit round trip)
    a = (40000 + np.arange(64, dtype=np.uint16)).reshape(8, 8)
    path = _save(tmp_path / "r16.png", Image.fromarray(a))
    x, _ = load_image(path, Preprocess(size=4, channels=1))
    assert x.shape == (1, 4, 4)
    assert len(np.unique(x)) == 16
    assert 40000 / 65535 <= x.min() and x.max() <= 40063 / 65535


def test_mode_I_with_16_bit_values(tmp_path):
    im = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert im.mode == "I"
    x, _ = preprocess_image(im, Preprocess(size=None, channels=1))
    np.testing.assert_allclose(x[0, 0], [0.0, 1.0])


def test_mode_F_taken_as_is(tmp_path):
    im = Image.fromarray(np.array([[0.25, 0.75]], dtype=np.float32))
    path = _save(tmp_path / "f.tif", im)
    assert Image.open(path).mode == "F"
    x, d = load_image(path, Preprocess(size=None, channels=1))
    np.testing.assert_allclose(x[0, 0], [0.25, 0.75])
    np.testing.assert_array_equal(d[0, :, 0], [64, 191])


def test_cmyk_and_bilevel(tmp_path):
    cmyk = _save(tmp_path / "c.jpg", Image.new("CMYK", (4, 4), (0, 0, 0, 0)), quality=100)
    assert Image.open(cmyk).mode == "CMYK"
    x, _ = load_image(cmyk, KEEP)
    assert x.shape == (3, 4, 4) and x.min() > 0.95          # no ink = white
    bw = Image.new("1", (3, 1))
    bw.putpixel((1, 0), 1)
    x, _ = load_image(_save(tmp_path / "b.png", bw), Preprocess(size=None, channels=1))
    np.testing.assert_allclose(x[0, 0], [0, 1, 0])


def test_exif_orientation_applied(tmp_path):
    a = np.zeros((10, 20, 3), dtype=np.uint8)                   # stored 20 wide, 10 high
    a[:, :10] = 255                                              # left half white
    exif = Image.Exif()
    exif[0x0112] = 6                                             # rotate 90 degrees clockwise to view
    path = _save(tmp_path / "rot.jpg", Image.fromarray(a), exif=exif, quality=95)
    x, d = load_image(path, KEEP)
    assert x.shape == (3, 20, 10) and d.shape == (20, 10, 3)
    assert x[:, :10].mean() > 0.9 and x[:, 10:].mean() < 0.1   # left half is now on top


# ---------------------------------------------------------------------------------------------
# Broken files
# ---------------------------------------------------------------------------------------------


def test_truncated_jpeg_raises_one_line_error_naming_file(tmp_path):
    rng = np.random.default_rng(1)
    good = _save(tmp_path / "good.jpg", Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    data = good.read_bytes()
    bad = tmp_path / "truncated.jpg"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as e:
        load_image(bad, KEEP)
    msg = str(e.value)
    assert "truncated.jpg" in msg and "\n" not in msg
    assert isinstance(e.value, ValueError)


def test_text_file_named_png(tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("this is not an image\nsecond line\n")
    with pytest.raises(ImageLoadError, match="notes.png.*not an image"):
        load_image(fake, KEEP)


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(ImageLoadError, match="nope.png: no such file"):
        load_image(tmp_path / "nope.png", KEEP)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty.jpg"):
        load_image(empty, KEEP)


# ---------------------------------------------------------------------------------------------
# Geometry and normalisation
# ---------------------------------------------------------------------------------------------


def test_resize_then_center_crop_matches_manual_pil(tmp_path):
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, size=(400, 300, 3), dtype=np.uint8)   # H=400, W=300
    path = _save(tmp_path / "big.png", Image.fromarray(a))
    p = Preprocess.imagenet()
    x, d = load_image(path, p)
    assert x.shape == (3, 224, 224) and d.shape == (224, 224, 3)
    # torchvision: Resize(256) -> 256 x int(256 * 400 / 300) = 256 x 341; CenterCrop(224)
    ref = Image.fromarray(a).resize((256, 341), Image.Resampling.BILINEAR)
    top, left = int(round((341 - 224) / 2.0)), int(round((256 - 224) / 2.0))
    ref = np.asarray(ref.crop((left, top, left + 224, top + 224)))
    np.testing.assert_array_equal(d, ref)
    expect = (ref / 255.0 - np.array(p.mean)) / np.array(p.std)
    np.testing.assert_allclose(x, expect.transpose(2, 0, 1), atol=1e-5)


def test_resize_straight_to_size_and_shorter_side_only(tmp_path):
    path = _save(tmp_path / "r.png", Image.new("RGB", (50, 20), (10, 20, 30)))
    x, _ = load_image(path, Preprocess(size=(8, 16)))
    assert x.shape == (3, 8, 16)
    x, _ = load_image(path, Preprocess(resize=10))
    assert x.shape == (3, 10, 25)
    # crop bigger than the resized image: scaled up to cover it
    x, _ = load_image(path, Preprocess(size=30, resize=10))
    assert x.shape == (3, 30, 30)


def test_scale_mean_std_layout_dtype_bgr(tmp_path):
    a = np.zeros((2, 2, 3), dtype=np.uint8)
    a[..., 0], a[..., 1], a[..., 2] = 255, 51, 0
    path = _save(tmp_path / "s.png", Image.fromarray(a))
    p = Preprocess(size=None, mean=(0.5,), std=(0.5,))
    x, _ = load_image(path, p)
    np.testing.assert_allclose(x[:, 0, 0], [1.0, -0.6, -1.0], atol=1e-6)
    caffe = Preprocess(size=None, scale=255.0, mean=(103.0, 116.0, 123.0), std=(1.0,), bgr=True, layout="NHWC",
                       dtype="float16")
    x, _ = load_image(path, caffe)
    assert x.dtype == np.float16 and x.shape == (2, 2, 3)
    np.testing.assert_allclose(x[0, 0].astype(np.float64), [0 - 103.0, 51 - 116.0, 255 - 123.0], atol=0.1)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("channels", [1, 3])
def test_to_display_inverts_normalisation(tmp_path, layout, channels):
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
    path = _save(tmp_path / "d.png", Image.fromarray(a))
    p = Preprocess(size=None, mean=(0.485, 0.456, 0.406)[:channels], std=(0.229, 0.224, 0.225)[:channels],
                   layout=layout, channels=channels, bgr=(channels == 3))
    x, d = load_image(path, p)
    back = to_display(x, p)
    assert back.shape == (5, 6, 3) and back.dtype == np.uint8
    if channels == 3:
        np.testing.assert_array_equal(back, d)
        np.testing.assert_array_equal(to_display(x[None], p), d)
    else:
        luma = np.rint(a @ np.array([0.299, 0.587, 0.114]))
        np.testing.assert_allclose(back[..., 0], luma, atol=1)
        assert (back[..., 0] == back[..., 2]).all()


# ---------------------------------------------------------------------------------------------
# Finding files
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "data"
    for rel in ["b.png", "a.jpg", "sub/c.JPEG", "sub/deeper/d.webp", "sub/e.tiff", ".hidden/x.png", "._junk.jpg"]:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (1, 2, 3)).save(p, format="PNG")
    (root / "README.md").write_text("not an image")
    (root / "sub" / "notes.txt").write_text("data/a.jpg\n")
    return root


def _rel(paths, base):
    return [p.resolve().relative_to(base.resolve()).as_posix() for p in paths]


def test_directory_recursive_sorted_filtered(tree):
    got = _rel(iter_image_paths(tree), tree)
    assert got == ["a.jpg", "b.png", "sub/c.JPEG", "sub/deeper/d.webp", "sub/e.tiff"]
    assert iter_image_paths(str(tree)) == iter_image_paths(tree)  # deterministic


def test_glob_list_file_order_and_dedup(tree, tmp_path):
    got = _rel(iter_image_paths([str(tree / "*.png"), tree / "a.jpg", str(tree / "**" / "*.webp")]), tree)
    assert got == ["b.png", "a.jpg", "sub/deeper/d.webp"]
    lst = tmp_path / "lists" / "list.txt"
    lst.parent.mkdir()
    lst.write_text("# my images\n../data/sub/e.tiff\n\n../data/b.png\n  ../data/b.png  \n../data/sub/deeper\n")
    got = _rel(iter_image_paths(lst), tree)
    assert got == ["sub/e.tiff", "b.png", "sub/deeper/d.webp"]
    # the same files reached through two sources are listed once, at their first place
    got = _rel(iter_image_paths([lst, tree]), tree)
    assert got == ["sub/e.tiff", "b.png", "sub/deeper/d.webp", "a.jpg", "sub/c.JPEG"]
    assert len(got) == len(set(got))


def test_explicit_file_with_any_extension_is_kept(tree):
    odd = tree / "photo.data"
    Image.new("RGB", (4, 4)).save(odd, format="PNG")
    assert iter_image_paths(odd) == [odd]


def test_sources_that_match_nothing_raise(tmp_path, tree):
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        iter_image_paths(tmp_path / "missing.jpg")
    with pytest.raises(FileNotFoundError, match=r"\*\.bmp"):
        iter_image_paths(str(tree / "*.bmp"))
    with pytest.raises(FileNotFoundError, match="no image files"):
        iter_image_paths(str(tree / "*.md"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="contains no images"):
        iter_image_paths(empty)
    lst = tmp_path / "bad.txt"
    lst.write_text("data/a.jpg\nnot/there.png\n")
    with pytest.raises(FileNotFoundError, match=r"bad.txt:2: .*there.png"):
        iter_image_paths(lst)
    with pytest.raises(ValueError):
        iter_image_paths([])


def test_list_file_cycle_detected(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("b.txt\n")
    b.write_text("a.txt\n")
    with pytest.raises(ValueError, match="includes itself"):
        iter_image_paths(a)


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def test_load_batch_skips_failures(tmp_path):
    good1 = _save(tmp_path / "1.png", Image.new("RGB", (10, 6), (255, 0, 0)))
    bad = tmp_path / "2.png"
    bad.write_text("nope")
    good2 = _save(tmp_path / "3.jpg", Image.new("L", (7, 9), 255))
    p = Preprocess(size=8)
    batch, displays, failures = load_batch([good1, bad, good2, tmp_path / "gone.png"], p)
    assert batch.shape == (2, 3, 8, 8) and batch.dtype == np.float32
    assert len(displays) == 2 and displays[0].shape == (8, 8, 3)
    np.testing.assert_allclose(batch[0, :, 0, 0], [1, 0, 0])
    assert batch[1].min() > 0.98
    assert [f[0] for f in failures] == [str(bad), str(tmp_path / "gone.png")]
    assert all(str(f[0]) in f[1] for f in failures)


def test_load_batch_all_fail_and_size_mismatch(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_text("nope")
    batch, displays, failures = load_batch([bad], Preprocess(size=(5, 6), layout="NHWC"))
    assert batch.shape == (0, 5, 6, 3) and displays == [] and len(failures) == 1
    a = _save(tmp_path / "a.png", Image.new("RGB", (4, 4)))
    b = _save(tmp_path / "b.png", Image.new("RGB", (5, 4)))
    with pytest.raises(ValueError, match="set Preprocess.size"):
        load_batch([a, b], KEEP)
