"""Keyed watermark (edgegen.safety.watermark): round trips on real Fashion-MNIST, attacks,
wrong key, the null distribution on unmarked images, payloads, bad inputs and the CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from edgegen import cli
from edgegen.errors import EdgegenError
from edgegen.safety import attacks, objectmark, watermark
from edgegen.safety.keys import key_fingerprint, load_key, write_key
from edgegen.safety.watermark import Watermarker, chernoff_p, null_p
from edgegen.training.data import FASHION_MNIST_DIR, load_dataset

KEY = bytes(range(32))
OTHER_KEY = bytes(range(100, 132))

pytestmark = pytest.mark.skipif(not __import__("os").path.isdir(FASHION_MNIST_DIR), reason="needs Fashion-MNIST")


def fmnist(size: int, n: int, rgb: bool = False, offset: int = 0) -> np.ndarray:
    """n real test images (n, size, size) grey, or (n, size, size, 3) tinted RGB (not grey copies)."""
    x = load_dataset("fashion-mnist", split="test", size=size, channels=1).images[offset:offset + n, :, :, 0]
    if not rgb:
        return x
    tint = np.array([1.0, 0.8, 0.55])                      # warm tint: R, G, B differ
    return np.clip(x[..., None] * tint + np.array([0, 10, 30]), 0, 255).astype(np.uint8)


def rate(dets) -> float:
    return float(np.mean([d.detected for d in dets]))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return float(10 * np.log10(255 ** 2 / mse))


@pytest.fixture(scope="module")
def wm() -> Watermarker:
    return Watermarker(KEY)


# ----------------------------------------------------------------------------- golden values


def test_golden_fingerprint_and_pattern(wm):
    assert key_fingerprint(KEY) == "048613ee44337668"
    assert wm.fingerprint == "048613ee44337668" and "048613" in repr(wm) and KEY.hex() not in repr(wm)
    x = fmnist(32, 1)
    marked = wm.embed(x, 0xBEEF)
    # Re-pinned for scheme 4 (the object mark's gaps, gain normalisation and cosines above the main band;
    # main step 0.0596), from a run that detected it.
    assert hashlib.sha256(marked.tobytes()).hexdigest()[:16] == "7dcc2e247c47a4b3"
    assert not np.array_equal(marked, x)
    d = wm.detect(marked)[0]
    assert d.detected and d.payload == 0xBEEF and d.sync_bits == 39


def test_no_image_is_marked_below_the_psnr_floor():
    """Dark images with small objects would take a strong mark; the floor caps each image, and only those.
    (At 64 px no Fashion-MNIST image needs it since the gain floor: the least is 38.5 dB.)"""
    x = fmnist(32, 200)
    capped, free = Watermarker(KEY).embed(x, 5), Watermarker(KEY, min_psnr=None).embed(x, 5)
    per_image = [psnr(c, h) for c, h in zip(capped, x)]
    uncapped = np.array([psnr(f, h) for f, h in zip(free, x)])
    assert min(per_image) >= 36.5 and uncapped.min() < 36.5          # the floor did something, and holds
    same = uncapped >= 36.5
    assert np.array_equal(capped[same], free[same])                  # images under the floor are untouched
    assert rate(Watermarker(KEY).detect(capped[~same])) >= 0.8       # the capped ones are still found
    with pytest.raises(EdgegenError, match="min_psnr"):
        Watermarker(KEY, min_psnr=5.0)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("size", [28, 32, 64])
@pytest.mark.parametrize("rgb", [False, True])
def test_round_trip_real_images(wm, size, rgb):
    x = fmnist(size, 40, rgb)
    m = wm.embed(x, 777)
    assert m.shape == x.shape and m.dtype == np.uint8
    assert psnr(m, x) > 34.0   # whole-batch PSNR of 40 images; the benchmark measures 1,000
    if rgb:  # only luma moves: the chroma of every pixel not clipped stays put
        ycc0 = cv2.cvtColor(x.reshape(-1, size, 3), cv2.COLOR_RGB2YCrCb).astype(int)
        ycc1 = cv2.cvtColor(m.reshape(-1, size, 3), cv2.COLOR_RGB2YCrCb).astype(int)
        inside = (x > 5).all(-1) & (x < 250).all(-1)
        assert np.abs(ycc1[..., 1:] - ycc0[..., 1:])[inside.reshape(-1, size)].mean() < 0.6
    dets = wm.detect(m)
    assert np.mean([d.detected and d.p_value <= 1e-6 for d in dets]) >= 0.95   # issue: >= 99 % at scale
    # The payload is coded (rate 2/3, soft maximum-likelihood decoding): clipping in dark images no longer costs it.
    assert np.mean([d.payload == 777 for d in dets]) >= 0.9   # 97-100 % on 500 images (docs/benchmarks.md)
    assert not any(d.detected for d in wm.detect(x))


def test_gray_mark_survives_conversion_of_rgb(wm):
    m = wm.embed(fmnist(32, 30, rgb=True), 5)
    gray = cv2.cvtColor(m.reshape(-1, 32, 3), cv2.COLOR_RGB2GRAY).reshape(-1, 32, 32)
    assert rate(wm.detect(gray)) >= 0.95


def test_sizes_up_to_1024(wm):
    big = cv2.resize(fmnist(64, 1)[0], (1024, 1024), interpolation=cv2.INTER_LINEAR)[None]
    m = wm.embed(big, 3)
    d = wm.detect(m)[0]
    assert d.detected and d.payload == 3
    rect = wm.embed(fmnist(64, 4)[:, :, 8:56], 9)            # 64 x 48: not square
    assert all(d.detected for d in wm.detect(rect))


# ----------------------------------------------------------------------------- attacks


@pytest.mark.parametrize("name,attack,minimum", [
    ("JPEG q75 OpenCV", lambda x: attacks.jpeg_cv2(x, 75), 0.95),
    ("JPEG q75 Pillow", lambda x: attacks.jpeg_pil(x, 75), 0.95),
    ("JPEG q90 Pillow RGB", None, 0.95),
    ("resize x2", lambda x: attacks.resize(x, 2.0), 0.95),
    ("resize x0.75", lambda x: attacks.resize(x, 0.75), 0.95),
    ("noise 5", lambda x: attacks.gaussian_noise(x, 5.0, seed=1), 0.8),
    ("contrast 0.8", lambda x: attacks.contrast(x, 0.8), 0.95),
])
def test_attacks_64px(wm, name, attack, minimum):
    if attack is None:
        m = wm.embed(fmnist(64, 40, rgb=True, offset=100), 1)
        a = attacks.jpeg_pil(m, 90)
    else:
        m = wm.embed(fmnist(64, 40, offset=100), 1)
        a = attack(m)
    assert rate(wm.detect(a)) >= minimum, name


def test_attack_inverses_recover_clipped_brightness(wm):
    # Brightening clips the white pixels and noise clips at black: images the plain detector misses,
    # the matching inverse (a highlight offset, the noise floor) finds; a detector without them does not.
    from edgegen.safety.watermark import Watermarker

    bare = Watermarker(KEY, highlight=None, noise_floor=False, object_mark=False)
    m64, m32 = (wm.embed(fmnist(size, 200, offset=300), 1) for size in (64, 32))
    for attacked, hypothesis in ((attacks.brightness(m64, 20), "offset=8,blur=0"),
                                 (attacks.gaussian_noise(m32, 5.0, seed=2), "offset=0,blur=0,floor")):
        dets, bare_dets = wm.detect(attacked), bare.detect(attacked)
        assert rate(dets) > rate(bare_dets)
        assert any(d.detected and d.hypothesis == hypothesis for d in dets)
    with pytest.raises(EdgegenError, match="offsets must be <= 0"):
        Watermarker(KEY, offsets=(0.0, 8.0))


def test_gain_hypotheses_undo_a_contrast_change(wm):
    # The gain floor makes a contrast change move the projections by a factor; the gain hypotheses
    # undo it (contrast x0.8 has nothing to clip), a detector without them misses nearly every image.
    m = wm.embed(fmnist(32, 100, offset=700), 9)
    attacked = attacks.contrast(m, 0.8)
    dets = wm.detect(attacked)
    assert rate(dets) >= 0.95 and rate(Watermarker(KEY, gains=()).detect(attacked)) <= 0.2
    found = [float(d.hypothesis.split("=")[1]) for d in dets if d.detected and d.hypothesis.startswith("gain=")]
    assert len(found) >= 90 and 0.78 <= np.median(found) <= 0.9          # 0.8 x g / sqrt(0.8^2 g^2 + 20^2) ...
    assert all(d.payload == 9 for d in dets if d.detected)
    # detect searches the gains only where the plain hypotheses miss; scores can be told the same
    assert (wm.scores(attacked, searched=np.zeros(len(attacked), dtype=bool))[3] == 1).all()
    assert not (wm.scores(attacked)[3] == 1).all()
    for w in (wm, Watermarker(KEY, gains=()), Watermarker(KEY, object_mark=False),
              Watermarker(KEY, offsets=(0.0,), blurs=(0.0,), highlight=None, noise_floor=False)):
        h = len(w.hypotheses)                                              # the budget shares add up to 1
        regions = len(objectmark.HYPOTHESES) * w._object_weight if w._object is not None else 0.0
        assert w._weights[:h].sum() + sum(len(g) * x for (_, g), x in zip(w._families, w._weights[h:])) \
            + regions == pytest.approx(1)
    with pytest.raises(EdgegenError, match="gains"):
        Watermarker(KEY, gains=(1.0, 1.1))


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", ["brightness −20", "contrast ×1.2"])
def test_object_mark_survives_clipping_of_the_background(wm, size, name):
    # Brightness -20 and contrast x1.2 (about the mean grey) clip the black background and the main
    # mark's part on it; the object mark (exact under an offset and a gain on the object) still
    # finds the image. Without it: few are found. Unmarked images stay unmarked.
    attack = attacks.ATTACKS[name]
    attacked = attack(wm.embed(fmnist(size, 60, offset=900), 3))
    dets = wm.detect(attacked)
    assert rate(dets) >= 0.95
    by_object = [d for d in dets if d.detected and d.hypothesis.startswith("object")]
    assert len(by_object) >= 30 and all(d.payload is None and d.sync_bits == objectmark.N_PROJ for d in by_object)
    assert rate(Watermarker(KEY, object_mark=False).detect(attacked)) <= 0.4
    assert not any(d.detected for d in wm.detect(attack(fmnist(size, 60, offset=900))))


def test_object_mark_stays_out_of_the_main_band(wm):
    # The object mark's change lives on cosines above the main mark's 8 x 8 band, so only a few
    # percent of its energy reaches the main projections (26 % with the 35 lowest cosines instead).
    base = Watermarker(KEY, object_mark=False, min_psnr=None).embed(fmnist(32, 100, offset=400), 1)
    change = wm._object.change(base.astype(np.float32))
    in_band = (watermark.band_coefficients(change, wm.band) ** 2).sum(axis=1) * 32 * 32   # orthonormal energy
    assert np.median(in_band / (change.reshape(100, -1) ** 2).sum(axis=1)) < 0.1


def test_object_mark_on_colour_images(wm):
    # Colour: the region is about each pixel's smallest and largest channel, so that brightness and
    # contrast changes clip no channel of it (the tinted images' red channel clips long before the luma).
    m = wm.embed(fmnist(32, 60, rgb=True, offset=900), 3)
    for name in ("brightness −20", "contrast ×1.2"):
        dets = wm.detect(attacks.ATTACKS[name](m))
        assert rate(dets) >= 0.9 and sum(d.detected and d.hypothesis.startswith("object") for d in dets) >= 20


def test_object_coordinates_ignore_an_offset_and_a_gain_on_the_region():
    rng = np.random.default_rng(1)
    x = rng.integers(30, 200, (3, 32, 32)).astype(np.float32)
    phi, pv, pu = objectmark._basis(32, 32)
    mask = objectmark.region(x.reshape(3, -1), x.reshape(3, -1))

    def coords(img: np.ndarray) -> np.ndarray:
        flat = img.reshape(3, -1)
        c, ok = objectmark._coordinates(objectmark._gram(objectmark._tables(mask.reshape(3, 32, 32), pv, pu)),
                                        *objectmark._luma_sums(flat, mask, phi))
        assert ok.all()
        return c

    a, b = coords(x), coords(1.2 * x - 17)                      # a contrast change, region kept
    assert np.allclose(a, b, atol=1e-4) and np.abs(a).max() > 0.5
    # the separable Gram matrix equals the direct one
    direct = np.einsum("kp,lp,np->nkl", phi, phi, mask.astype(np.float32))
    assert np.allclose(objectmark._gram(objectmark._tables(mask.reshape(3, 32, 32), pv, pu)), direct, rtol=1e-4, atol=1e-2)


def test_object_gaps_hold_a_grid_threshold_after_brightness_and_contrast():
    # The embedder empties 26..28 and 206..208; after y = floor(g x + c), clipped, some hypothesis has
    # both thresholds inside the moved gaps (so it recovers the region exactly), for every brightness
    # change -27..27 and Pillow's contrast x1.1 and x1.2 about any mean grey m up to 165 (c = m (1 - g)).
    def gap_image(g: float, c: float, t: float) -> tuple[float, float]:      # open interval of empty y
        return np.floor(g * (t - 2) + c), min(np.floor(g * (t + 2) + c), 255.0)

    cases = [(1.0, float(o)) for o in range(-27, 28)] + [(g, m * (1 - g)) for g in (1.1, 1.2) for m in range(0, 166)]
    for g, c in cases:
        (l0, l1), (h0, h1) = (gap_image(g, c, t) for t in objectmark.REGION)
        assert any(l0 < lo < l1 and h0 < hi < h1 for lo, hi in objectmark.HYPOTHESES), (g, c)
    marked = Watermarker(KEY).embed(fmnist(32, 50, offset=1200), 1)
    assert not np.isin(marked, [26, 27, 28, 206, 207, 208]).any()


def test_payload_after_jpeg(wm):
    payloads = np.arange(40) * 1601 % 65536
    m = wm.embed(fmnist(64, 40, offset=200), payloads)
    dets = wm.detect(attacks.jpeg_cv2(m, 75))
    exact = [d.payload == p for d, p in zip(dets, payloads) if d.detected]
    assert len(exact) >= 38 and np.mean(exact) >= 0.9   # issue target 95 %, measured on 500 in docs/benchmarks.md


def test_payload_code_corrects_errors(wm):
    from edgegen.safety.watermark import _code
    for bits, length in wm._chunks:
        cw = _code(bits, length)
        assert cw.shape == (1 << bits, length) and len(np.unique(cw, axis=0)) == 1 << bits
        dist = (cw[:, None, :] != cw[None, :, :]).sum(-1) + length * np.eye(len(cw), dtype=int)
        assert dist.min() >= 3                                   # at least one error corrected
    # Ideal projections of payload 0xA5C3 (on their lattice points), one payload bit flipped at a time:
    # the soft decoder still returns the payload; two flips in one chunk may not.
    z = np.tile(wm._dither + wm._bits(0xA5C3, 1)[0] / 2.0 + 3.0, (wm.n_pay, 1))
    z[np.arange(wm.n_pay), wm.n_sync + np.arange(wm.n_pay)] += 0.5
    assert (wm._decode(z) == 0xA5C3).all()
    assert (wm._decode(z[:1] - np.r_[np.zeros(wm.n_sync), np.full(wm.n_pay, 0.5)]) != 0xA5C3).all()


def test_payload_read_through_a_gain_error(wm, monkeypatch):
    # Ideal projections of payload 0x5A3C at the magnitudes real images give (|z| 10..25 lattice
    # units), then the image's gain estimate off by 1.6 %: residues move by up to 0.4 of a step.
    rng = np.random.default_rng(3)
    k = wm.n_sync + wm.n_pay
    z = (wm._dither + wm._bits(0x5A3C, 1)[0] / 2.0 + rng.integers(10, 25, k) * rng.choice([-1, 1], k)) / 1.016
    assert wm._decode(z[None])[0] == 0x5A3C
    monkeypatch.setattr(watermark, "_PAYLOAD_GAINS", np.array([1.0]))    # without the gain search: wrong
    assert wm._decode(z[None])[0] != 0x5A3C


def test_geometric_attacks_are_not_claimed(wm):
    m = wm.embed(fmnist(32, 20), 1)
    assert rate(wm.detect(attacks.flip(m))) <= 0.1


# ----------------------------------------------------------------------------- the null


def test_wrong_key_not_detected(wm):
    other = Watermarker(OTHER_KEY)
    assert other.fingerprint != wm.fingerprint
    m = wm.embed(fmnist(32, 300, offset=300), 11)
    assert not any(d.detected for d in other.detect(m))
    assert not any(d.detected for d in wm.detect(other.embed(fmnist(32, 300, offset=300), 11)))


def test_unmarked_images_follow_the_null(wm):
    x = fmnist(28, 3000, offset=1000)
    dets = wm.detect(x)
    assert not any(d.detected for d in dets)
    # Under the null each sync bit is a fair coin: check with the identity hypothesis only.
    _, matches, _, _ = wm.scores(x)
    k, n = matches[:, 0], wm.n_sync
    assert abs(k.mean() - n / 2) < 4 * np.sqrt(n / 4 / len(k))
    assert 0.85 < k.var() / (n / 4) < 1.15
    # Bonferroni p-values are conservative: at most the nominal fraction falls below 0.05.
    p = np.array([d.p_value for d in dets])
    assert np.mean(p <= 0.05) <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / len(p))


def test_null_tail_is_valid_and_tight():
    rng = np.random.default_rng(0)
    s = np.cos(2 * np.pi * rng.random((400_000, 20))).sum(1)
    for q in (2.0, 4.0, 7.0, 10.0):
        empirical, se = np.mean(s >= q), np.sqrt(np.mean(s >= q) / len(s))
        assert empirical <= null_p(np.array([q]), 20)[0] <= chernoff_p(np.array([q]), 20)[0]
        assert null_p(np.array([q]), 20)[0] <= empirical + 4 * se + 20 / 1024   # exact up to the grid
    # ~10x below the Chernoff bound at the detection threshold of the default watermarker (39 sync bits)
    assert chernoff_p(np.array([22.0]), 39)[0] > 8 * null_p(np.array([22.0]), 39)[0]
    grid = np.linspace(-25, 40, 2000)
    assert np.all(np.diff(null_p(grid, 39)) <= 0)                                 # a proper tail
    assert null_p(np.array([-20.0]), 20)[0] > 0.99 and null_p(np.array([20.0]), 20)[0] < 1e-30


# ----------------------------------------------------------------------------- payload and inputs


def test_payload_round_trip(wm):
    payloads = np.array([0, 1, 0xFFFF, 0x8001, 12345, 54321] * 5)
    m = wm.embed(fmnist(32, 30, offset=500), payloads)
    got = [d.payload for d in wm.detect(m)]
    assert np.mean(np.array(got) == payloads) >= 0.9
    w24 = Watermarker(KEY, payload_bits=24)
    assert w24.detect(w24.embed(fmnist(32, 2), 0xABCDEF))[0].payload == 0xABCDEF


@pytest.mark.parametrize("images,match", [
    (np.zeros((2, 32, 32), np.float32), "uint8"),
    (np.zeros((0, 32, 32), np.uint8), "empty batch"),
    (np.zeros((1, 1, 1), np.uint8), "outside"),
    (np.zeros((32, 32), np.uint8), "shape"),
    (np.zeros((1, 32, 32, 2), np.uint8), "shape"),
])
def test_invalid_images(wm, images, match):
    with pytest.raises(EdgegenError, match=match):
        wm.embed(images, 0)
    with pytest.raises(EdgegenError, match=match):
        wm.detect(images)


def test_invalid_payload_and_key(wm):
    x = fmnist(32, 2)
    with pytest.raises(EdgegenError, match="payload"):
        wm.embed(x, 1 << 16)
    with pytest.raises(EdgegenError, match="payload"):
        wm.embed(x, [1, 2, 3])
    with pytest.raises(EdgegenError, match="32 bytes"):
        Watermarker(b"short")


def test_missing_and_bad_keys(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEGEN_WATERMARK_KEY", raising=False)
    with pytest.raises(EdgegenError, match="no watermark key configured"):
        load_key(None)
    monkeypatch.setenv("EDGEGEN_WATERMARK_KEY", KEY.hex())
    assert load_key(None) == KEY
    bad = tmp_path / "bad.key"
    bad.write_text("not-a-key-but-secret-ish")
    with pytest.raises(EdgegenError, match="not a watermark key") as e:
        load_key(bad)
    assert "secret-ish" not in str(e.value)
    good = tmp_path / "k.key"
    key = write_key(good)
    assert load_key(good) == key and (good.stat().st_mode & 0o777) == 0o600
    monkeypatch.setenv("EDGEGEN_WATERMARK_KEY", str(good))
    assert load_key(None) == key
    with pytest.raises(EdgegenError, match="already exists"):
        write_key(good)
    # A mistyped key (one digit short) in the variable, or key digits passed as --key, is never echoed.
    monkeypatch.setenv("EDGEGEN_WATERMARK_KEY", KEY.hex()[:-1])
    with pytest.raises(EdgegenError, match="value not shown") as e:
        load_key(None)
    assert KEY.hex()[:-1] not in str(e.value)
    with pytest.raises(EdgegenError, match="looks like key digits") as e:
        load_key(KEY.hex())
    assert KEY.hex() not in str(e.value)
    with pytest.raises(EdgegenError, match="nosuch.key: cannot read"):
        load_key(tmp_path / "nosuch.key")


def test_safety_never_imports_torch():
    code = ("import sys, numpy as np; from edgegen.safety import watermark, keys, attacks, wmfiles; "
            "w = watermark.Watermarker(bytes(32)); w.detect(w.embed(np.zeros((1, 32, 32), np.uint8) + 99, 1)); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- CLI


def test_cli_round_trip(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EDGEGEN_WATERMARK_KEY", raising=False)
    key = tmp_path / "wm.key"
    assert cli.main(["keygen", "--out", str(key)]) == 0
    fp = key_fingerprint(load_key(key))
    assert fp in capsys.readouterr().out and load_key(key).hex() not in key.read_text().replace(load_key(key).hex(), "x")
    src = tmp_path / "in"
    src.mkdir()
    for i, img in enumerate(fmnist(32, 3, rgb=True)):
        cv2.imwrite(str(src / f"img{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(src / "gray.png"), fmnist(28, 1)[0])
    out = tmp_path / "out"
    assert cli.main(["watermark", "embed", *map(str, sorted(src.iterdir())), "--out", str(out),
                     "--key", str(key), "--payload", "4242"]) == 0
    capsys.readouterr()
    (tmp_path / "junk.png").write_text("not an image")
    rc = cli.main(["watermark", "detect", str(out), str(src / "img0.png"), str(tmp_path / "junk.png"), "--key", str(key)])
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert rc == 1 and "junk.png" in captured.err
    marked = [r for r in lines if r["file"].startswith(str(out))]
    assert len(marked) == 4 and all(r["detected"] and r["payload"] == 4242 and r["p_value"] <= 1e-6 for r in marked)
    plain = next(r for r in lines if r["file"] == str(src / "img0.png"))
    assert plain["detected"] is False and plain["payload"] is None
    assert "error" in next(r for r in lines if r["file"].endswith("junk.png"))
    assert all(load_key(key).hex() not in line for line in captured.out.splitlines() + [captured.err])
    assert cli.main(["watermark", "detect", str(out), "--key", str(key)]) == 0
    assert cli.main(["watermark", "detect", str(out)]) == 2          # no key configured
    assert "no watermark key configured" in capsys.readouterr().err
