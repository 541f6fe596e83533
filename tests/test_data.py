"""Data loading: IDX files (real Fashion-MNIST subsets and corrupt files) and image folders."""

from __future__ import annotations


import cv2
import numpy as np
import pytest

from conftest import write_idx
from edgegen.errors import EdgegenError
from edgegen.training.data import (FASHION_MNIST_CLASSES, NoSplitError, fit_images, load_dataset, read_idx,
                                   read_idx_pair)


def test_fashion_mnist_by_name(fmnist_test):
    ds = fmnist_test
    assert ds.images.shape == (10_000, 28, 28, 1) and ds.images.dtype == np.uint8
    assert ds.class_names == FASHION_MNIST_CLASSES and ds.class_names[0] == "T-shirt/top"
    assert np.bincount(ds.labels).tolist() == [1000] * 10
    # Golden values pin the reader: first label and a pixel checksum of the first image.
    assert int(ds.labels[0]) == 9 and int(ds.images[0].sum()) == 33_456


def test_fashion_mnist_fitted_to_model_size(fmnist_test):
    ds = load_dataset("fashion-mnist", "test", size=32, channels=3)
    assert ds.images.shape == (10_000, 32, 32, 3)
    assert (ds.images[..., 0] == ds.images[..., 2]).all()  # gray replicated to RGB


def test_missing_fashion_mnist_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEGEN_DATA", str(tmp_path))
    with pytest.raises(EdgegenError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


def test_idx_gz_and_plain_agree(tmp_path, fmnist_test):
    arr = fmnist_test.images[:20, :, :, 0]
    a = read_idx(write_idx(tmp_path / "a.gz", arr, gz=True))
    b = read_idx(write_idx(tmp_path / "b", arr, gz=False))
    assert (a == arr).all() and (b == arr).all()


def test_idx_dir_with_splits(small_idx_dir):
    train, test = load_dataset(str(small_idx_dir), "train"), load_dataset(str(small_idx_dir), "test")
    assert len(train) == 512 and len(test) == 256
    assert train.class_names == tuple(str(i) for i in range(10))
    assert train.fingerprint() != test.fingerprint()
    assert train.fingerprint() == load_dataset(str(small_idx_dir)).fingerprint()


def test_truncated_gzip(tmp_path, fmnist_test):
    p = write_idx(tmp_path / "x-images-idx3-ubyte.gz", fmnist_test.images[:50, :, :, 0])
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(EdgegenError, match=r"x-images-idx3-ubyte\.gz: corrupt or truncated gzip"):
        read_idx(p)


def test_wrong_magic(tmp_path):
    p = tmp_path / "bad.idx"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(EdgegenError, match=r"bad\.idx: not an IDX file \(wrong magic number 89504e47\)"):
        read_idx(p)


def test_payload_size_mismatch(tmp_path, fmnist_test):
    p = write_idx(tmp_path / "short", fmnist_test.images[:5, :, :, 0], gz=False)
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(EdgegenError, match=r"short: IDX payload is 3919 bytes but the header \(5, 28, 28\) needs 3920"):
        read_idx(p)


def test_label_count_mismatch(tmp_path, fmnist_test):
    imgs = write_idx(tmp_path / "i.gz", fmnist_test.images[:10, :, :, 0])
    labs = write_idx(tmp_path / "l.gz", fmnist_test.labels[:9].astype(np.uint8))
    with pytest.raises(EdgegenError, match=r"l\.gz: 9 labels for 10 images"):
        read_idx_pair(imgs, labs)


def _write_folder(root, fmnist_test, rgb=False):
    for name, label in (("shoe", 7), ("bag", 8)):
        (root / name).mkdir(parents=True)
        for i in np.flatnonzero(fmnist_test.labels == label)[:5]:
            img = fmnist_test.images[i]
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if rgb else img
            cv2.imwrite(str(root / name / f"{i}.png"), img)


def test_image_folder_labels_from_subfolders(tmp_path, fmnist_test):
    _write_folder(tmp_path, fmnist_test)
    ds = load_dataset(str(tmp_path), size=32, channels=1)
    assert ds.class_names == ("bag", "shoe")  # sorted folder names
    assert ds.images.shape == (10, 32, 32, 1) and np.bincount(ds.labels).tolist() == [5, 5]
    rgb = load_dataset(str(tmp_path), size=64, channels=3)
    assert rgb.images.shape == (10, 64, 64, 3)


def test_image_folder_bad_file_named_or_skipped(tmp_path, fmnist_test):
    _write_folder(tmp_path, fmnist_test)
    (tmp_path / "bag" / "notes.png").write_text("not an image")
    with pytest.raises(EdgegenError, match=r"notes\.png: not a readable image \(use --skip-bad"):
        load_dataset(str(tmp_path))
    ds = load_dataset(str(tmp_path), skip_bad=True)
    assert len(ds) == 10 and ds.skipped == (str(tmp_path / "bag" / "notes.png"),)


def test_image_folder_without_test_split(tmp_path, fmnist_test):
    _write_folder(tmp_path, fmnist_test)
    with pytest.raises(EdgegenError, match="no test split"):
        load_dataset(str(tmp_path), "test")


def test_folder_with_train_but_no_test(tmp_path, fmnist_test):
    _write_folder(tmp_path / "train", fmnist_test)
    assert len(load_dataset(str(tmp_path), "train")) == 10
    with pytest.raises(NoSplitError, match="has train/ but no test/ sub-folder"):
        load_dataset(str(tmp_path), "test")


def test_folder_readers_take_image_files_only(tmp_path, fmnist_test):
    """Training/eval and audit folder readers ignore a generate folder's manifest and run files alike;
    a file with an image suffix that does not decode is still an error (or skipped with --skip-bad)."""
    from edgegen.safety.sources import read_folder

    for i in range(4):
        cv2.imwrite(str(tmp_path / f"img-{i}.png"), fmnist_test.images[i])
    (tmp_path / "manifest.jsonl").write_text('{"index": 0}\n')
    (tmp_path / "run.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("hello")
    assert len(load_dataset(str(tmp_path))) == 4
    names, images, skipped = read_folder(tmp_path, (28, 28, 1))
    assert names == [f"img-{i}.png" for i in range(4)] and images.shape == (4, 28, 28, 1) and not skipped
    (tmp_path / "broken.png").write_text("not an image")
    for read in (lambda: load_dataset(str(tmp_path)), lambda: read_folder(tmp_path, (28, 28, 1))):
        with pytest.raises(EdgegenError, match=r"broken\.png: not a readable image \(use --skip-bad"):
            read()
    assert read_folder(tmp_path, (28, 28, 1), skip_bad=True)[2] == [str(tmp_path / "broken.png")]


def test_bad_size_channels_and_subset_are_refused(small_idx_dir):
    with pytest.raises(EdgegenError, match="--size must be a positive number of pixels, got 0"):
        load_dataset(str(small_idx_dir), size=0)
    with pytest.raises(EdgegenError, match="--channels must be 1 or 3, got 2"):
        load_dataset(str(small_idx_dir), channels=2)
    ds = load_dataset(str(small_idx_dir), "test")
    for n in (0, -1):
        with pytest.raises(EdgegenError, match=f"a subset needs at least 1 image, got {n}"):
            ds.subset(n)
    assert len(ds.subset(1)) == 1 and ds.subset(10_000) is ds


def test_empty_folder_and_missing_path(tmp_path):
    with pytest.raises(EdgegenError, match="no readable images"):
        load_dataset(str(tmp_path))
    with pytest.raises(EdgegenError, match="no such data set"):
        load_dataset(str(tmp_path / "nope"))


def test_fit_images_rgb_to_gray_uses_luma():
    rgb = np.zeros((1, 28, 28, 3), np.uint8)
    rgb[..., 1] = 200  # pure green
    gray = fit_images(rgb, 28, 1)
    assert gray.shape == (1, 28, 28, 1) and int(gray[0, 0, 0, 0]) == round(0.587 * 200)


def test_atomic_write_permissions_and_no_partial_file(tmp_path):
    """Outputs get the usual permissions (0600 only when private); a failed write leaves nothing."""
    import os

    from edgegen.fileio import atomic_write, write_bytes_atomic

    write_bytes_atomic(tmp_path / "out.bin", b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o666 & ~umask
    with atomic_write(tmp_path / "secret", private=True) as f:
        f.write(b"k")
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600
    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / "half.bin") as f:
            f.write(b"partial")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin", "secret"]
