"""pHash bit-exactness with imagehash, exact Hamming search, and the index file (save/load/corruption)."""

from __future__ import annotations

import imagehash
import numpy as np
import pytest
from PIL import Image

from edgegen.errors import EdgegenError
from edgegen.safety import hamming
from edgegen.safety.index import HashIndex, read_index_fingerprint
from edgegen.safety.phash import hash_hex, is_flat, phash_batch
from edgegen.training.data import fit_images


def _reference(images: np.ndarray) -> list[str]:
    return [str(imagehash.phash(Image.fromarray(i[..., 0] if i.shape[-1] == 1 else i))) for i in images]


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 1), (64, 1), (40, 3)])
def test_phash_matches_imagehash_bit_for_bit(fmnist_test, size, channels):
    images = fit_images(fmnist_test.images[:300], size, channels)
    assert hash_hex(phash_batch(images)) == _reference(images)


def test_phash_golden_values(fmnist_test):
    # imagehash 4.3.2 / Pillow LANCZOS on the real Fashion-MNIST test images 0, 1, 2 and 9999.
    got = hash_hex(phash_batch(fmnist_test.images[[0, 1, 2, 9999]]))
    assert got == ["957b6a841bb5e24a", "855e6a9a388b6d6c", "9a9938666366636d", "95796a8696e96919"]


def test_phash_random_rgb_and_flat_images():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (50, 37, 53, 3), dtype=np.uint8)
    assert hash_hex(phash_batch(noise)) == _reference(noise)
    flat = np.stack([np.full((28, 28, 1), v, np.uint8) for v in (0, 17, 128, 255)])
    hashes, std = phash_batch(flat, return_std=True)
    assert hash_hex(hashes) == _reference(flat)           # imagehash's bits, even when meaningless
    assert is_flat(std).all()
    faint = np.clip(flat[1:2].astype(int) + np.random.default_rng(1).integers(-1, 2, flat[1:2].shape), 0, 255)
    assert is_flat(phash_batch(faint.astype(np.uint8), return_std=True)[1]).all()   # +-1 grey-level noise


def test_real_images_are_not_flat(fmnist_test):
    _, std = phash_batch(fmnist_test.images[:500], return_std=True)
    assert not is_flat(std).any()


def _brute(q: np.ndarray, db: np.ndarray) -> np.ndarray:
    qa, da = q.view(">u8").ravel().astype(np.uint64), db.view(">u8").ravel().astype(np.uint64)
    return np.bitwise_count(qa[:, None] ^ da[None, :]).astype(np.int32)   # (Q, N)


def test_knn_and_range_match_brute_force(fmnist_test):
    db = phash_batch(fmnist_test.images[:4000])            # real hashes: many ties and duplicates
    q = phash_batch(fmnist_test.images[3900:4200])         # 100 exact members, 200 novel
    full = _brute(q, db)
    order = np.lexsort((np.broadcast_to(np.arange(len(db)), full.shape), full), axis=1)
    for k in (1, 7, 40):
        d, i = hamming.knn(q, db, k)
        assert np.array_equal(i, order[:, :k])
        assert np.array_equal(d, np.take_along_axis(full, order[:, :k], 1))
    assert (hamming.knn(q[:100], db, 1)[0][:, 0] == 0).all()
    lims, d, i = hamming.range_search(q, db, 6)
    for r in range(len(q)):
        hit = np.nonzero(full[r] <= 6)[0]
        want = hit[np.argsort(full[r][hit], kind="stable")]
        assert np.array_equal(i[lims[r]:lims[r + 1]], want)
        assert np.array_equal(d[lims[r]:lims[r + 1]], full[r][want])


def test_knn_with_k_larger_than_database():
    db = np.array([[0] * 8, [255] * 8], np.uint8)
    d, i = hamming.knn(db[:1], db, 4)
    assert d.tolist() == [[0, 64, 65, 65]] and i.tolist() == [[0, 1, -1, -1]]


@pytest.fixture()
def small_index(fmnist_test, tmp_path):
    index = HashIndex.from_images(fmnist_test.images[:1000], name="fm-sub")
    return index, index.save(tmp_path / "train.idx")


def test_save_load_round_trip(small_index, fmnist_test):
    index, path = small_index
    loaded = HashIndex.load(path)
    assert isinstance(loaded.hashes, np.memmap)
    assert loaded.fingerprint == index.fingerprint == read_index_fingerprint(path)
    assert np.array_equal(loaded.hashes, index.hashes)
    assert loaded.image_shape == (28, 28, 1)
    m = loaded.manifest
    assert m["data"]["fingerprint"] == index.data_fingerprint and m["versions"]["imagehash"] == imagehash.__version__
    q = phash_batch(fmnist_test.images[:50])
    assert np.array_equal(loaded.knn(q, 3)[1], index.knn(q, 3)[1])
    # no reload recipe for an array: the pixels are stored in the file and come back exactly
    assert np.array_equal(loaded.train_pixels(), fmnist_test.images[:1000])
    # hashes take 8 bytes per image
    assert loaded.manifest["sections"]["hashes"]["shape"] == [1000, 8]


def test_corrupt_truncated_and_foreign_files_are_refused(small_index, tmp_path):
    _, path = small_index
    raw = bytearray(path.read_bytes())
    start = len(raw) - 1000 * 28 * 28 - 64          # somewhere in the sections
    raw[start] ^= 0xFF
    bad = tmp_path / "bad.idx"
    bad.write_bytes(bytes(raw))
    with pytest.raises(EdgegenError, match="corrupt"):
        HashIndex.load(bad)
    bad.write_bytes(path.read_bytes()[:-5000])
    with pytest.raises(EdgegenError, match="truncated"):
        HashIndex.load(bad)
    bad.write_bytes(b"PNG not an index")
    with pytest.raises(EdgegenError, match="not an edgegen hash index"):
        HashIndex.load(bad)
    with pytest.raises(EdgegenError, match="does not match the expected"):
        HashIndex.load(path, expect_fingerprint="0123456789abcdef")


def test_other_settings_are_refused(small_index, monkeypatch):
    _, path = small_index
    from edgegen.safety import index as index_mod
    monkeypatch.setitem(index_mod.SETTINGS, "candidates_per_view", 99)
    with pytest.raises(EdgegenError, match="other settings"):
        HashIndex.load(path)


def test_reloadable_data_is_not_copied_and_changed_data_is_refused(fmnist_test, small_idx_dir, tmp_path, monkeypatch):
    from edgegen.training.data import load_dataset
    index = HashIndex.from_dataset(fmnist_test, split="test")   # reloadable by name: no pixel copy
    path = index.save(tmp_path / "test.idx")
    assert "pixels" not in index.arrays and path.stat().st_size < 200_000
    loaded = HashIndex.load(path)
    assert np.array_equal(loaded.train_pixels(), fmnist_test.images)
    assert load_dataset("fashion-mnist", "test").fingerprint() == loaded.data_fingerprint
    monkeypatch.setenv("EDGEGEN_DATA", str(small_idx_dir))       # now "fashion-mnist" is other data
    with pytest.raises(EdgegenError, match="has changed since the index was built"):
        HashIndex.load(path).train_pixels()


def test_images_too_small_to_hash_are_refused(fmnist_test):
    with pytest.raises(EdgegenError, match=r"cannot index 7x7 images: the perceptual hash needs at least 8x8"):
        HashIndex.from_images(fit_images(fmnist_test.images[:20], 7, 1))
    assert len(HashIndex.from_images(fit_images(fmnist_test.images[:20], 8, 1))) == 20


def test_build_index_refuses_bad_heldout_and_fpr(fmnist_test):
    from edgegen.safety.index import build_index

    train, held = fmnist_test.images[:300], fmnist_test.images[300:450]
    with pytest.raises(EdgegenError, match="needs held-out images"):
        build_index(train, None, None)
    with pytest.raises(EdgegenError, match="held-out images are the training images"):
        build_index(train, train, None)
    for fpr in (0.0, 2.0, float("nan")):
        with pytest.raises(EdgegenError, match="--fpr must be between 0 and 1"):
            build_index(train, held, None, fpr=fpr)


@pytest.mark.parametrize("args,message", [
    (["--size", "0"], "--size must be a positive number of pixels, got 0"),
    (["--size", "5"], "cannot index 5x5 images"),
    (["--heldout-n", "-1"], "--heldout-n must be a positive number of images, got -1"),
    (["--heldout-n", "0"], "--heldout-n must be a positive number of images, got 0"),
])
def test_index_build_cli_bad_values_one_line(small_idx_dir, tmp_path, capsys, args, message):
    from edgegen.cli import main

    out = tmp_path / "i.idx"
    assert main(["index", "build", "--data", str(small_idx_dir), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgegen: error: ") and message in err and "\n" not in err
    assert not out.exists()
