"""Tests for rectonnx.datasets: the synthetic digits-on-photos set and the CIFAR-10 reader."""

import pickle

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("skimage")

from rectonnx import datasets as D  # noqa: E402


@pytest.fixture(scope="module")
def small():
    return D.digits_on_photos(200, seed=3)


def test_shapes_dtypes_and_range(small):
    assert len(small) == 200
    assert small.images.shape == (200, 3, 32, 32) and small.images.dtype == np.float32
    assert small.labels.shape == (200,) and small.labels.dtype == np.int64
    assert small.masks.shape == (200, 32, 32) and small.masks.dtype == np.bool_
    assert small.images.min() >= -1.0 and small.images.max() <= 1.0
    assert small.class_names == tuple("0123456789")


def test_other_size():
    ds = D.digits_on_photos(10, seed=0, size=48)
    assert ds.images.shape == (10, 3, 48, 48) and ds.masks.shape == (10, 48, 48)


def test_same_seed_gives_identical_bytes(small):
    again = D.digits_on_photos(200, seed=3)
    assert small.images.tobytes() == again.images.tobytes()
    assert np.array_equal(small.labels, again.labels)
    assert np.array_equal(small.masks, again.masks)


def test_different_seeds_and_splits_differ(small):
    other_seed = D.digits_on_photos(200, seed=4)
    other_split = D.digits_on_photos(200, seed=3, split="test")
    for other in (other_seed, other_split):
        diff = np.abs(small.images - other.images).mean(axis=(1, 2, 3))
        assert (diff > 0.05).mean() > 0.95


def test_masks_are_nonempty_and_mark_the_digit(small):
    area = small.masks.sum(axis=(1, 2))
    assert area.min() >= 10
    assert (area < 32 * 32 / 2).all()


def test_digit_contrasts_with_what_surrounds_it(small):
    lum = np.tensordot(np.array([0.299, 0.587, 0.114], np.float32), small.images, axes=(0, 1))
    inside = (lum * small.masks).sum((1, 2)) / small.masks.sum((1, 2))
    ring = _ring(small.masks)
    outside = (lum * ring).sum((1, 2)) / np.maximum(ring.sum((1, 2)), 1)
    assert np.median(np.abs(inside - outside)) > 0.3  # in [-1, 1] units


def _ring(masks: np.ndarray) -> np.ndarray:
    """Pixels within 2 px of the mask but outside it."""
    grown = masks.copy()
    for _ in range(2):
        g = grown.copy()
        g[:, 1:] |= grown[:, :-1]
        g[:, :-1] |= grown[:, 1:]
        g[:, :, 1:] |= grown[:, :, :-1]
        g[:, :, :-1] |= grown[:, :, 1:]
        grown = g
    return grown & ~masks


def test_labels_are_balanced(small):
    counts = np.bincount(small.labels, minlength=10)
    assert counts.min() == counts.max() == 20
    assert len(set(small.labels[:10].tolist())) > 3  # shuffled, not 0, 1, 2, ...


def test_train_and_test_use_disjoint_digit_scans():
    train, _ = D._digit_pool("train")
    test, _ = D._digit_pool("test")
    assert len(train) == D.TRAIN_DIGITS and len(train) + len(test) == 1797
    train_keys = {d.tobytes() for d in train}
    assert not any(d.tobytes() in train_keys for d in test)


def test_uint8_round_trip(small):
    pixels = D.to_uint8(small.images)
    assert pixels.dtype == np.uint8 and pixels.shape == (200, 32, 32, 3)
    assert np.array_equal(D.from_uint8(pixels), small.images)


def test_bad_split_is_rejected():
    with pytest.raises(ValueError, match="split"):
        D.digits_on_photos(4, split="validation")


def _write_fake_cifar(folder, rng):
    folder.mkdir()
    expected = {}
    for split, names in D.CIFAR10_FILES.items():
        data, labels = [], []
        for name in names:
            rows = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
            batch_labels = rng.integers(0, 10, size=3).tolist()
            with open(folder / name, "wb") as f:
                pickle.dump({b"data": rows, b"labels": batch_labels}, f)
            data.append(rows)
            labels += batch_labels
        expected[split] = (np.concatenate(data), np.array(labels))
    return expected


@pytest.mark.parametrize("nested", [False, True])
def test_load_cifar10_reads_pickles(tmp_path, nested):
    folder = tmp_path / "cifar-10-batches-py"
    expected = _write_fake_cifar(folder, np.random.default_rng(0))
    root = tmp_path if nested else folder
    for split in ("train", "test"):
        ds = D.load_cifar10(root, split)
        rows, labels = expected[split]
        assert ds.images.shape == (len(labels), 3, 32, 32) and ds.images.dtype == np.float32
        assert ds.masks is None and ds.class_names[3] == "cat"
        assert np.array_equal(ds.labels, labels)
        # Pickle rows are R-plane, G-plane, B-plane of 32x32 each.
        r00 = rows[0, 0] / 127.5 - 1
        b_last = rows[-1, 3071] / 127.5 - 1
        assert ds.images[0, 0, 0, 0] == pytest.approx(r00)
        assert ds.images[-1, 2, 31, 31] == pytest.approx(b_last)
        assert np.array_equal(D.to_uint8(ds.images).transpose(0, 3, 1, 2).reshape(-1, 3072), rows)


def test_load_cifar10_explains_a_wrong_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1.*cifar-10-batches-py"):
        D.load_cifar10(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="test_batch"):
        D.load_cifar10(tmp_path / "missing", "test")
