"""Memorization audit on real Fashion-MNIST: planted copies found, novel images not, calibration,
the data-copying test, the HTML report in headless chromium, the CLI and its bad-input errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgegen.cli import main
from edgegen.errors import EdgegenError
from edgegen.safety.audit import Auditor, data_copying_test
from edgegen.safety.index import HashIndex, build_index
from edgegen.safety.pixels import shift
from edgegen.safety.report import render_html


@pytest.fixture(scope="module")
def train():
    from edgegen.training.data import load_dataset
    return load_dataset("fashion-mnist", "train").subset(5000, seed=0)


@pytest.fixture(scope="module")
def index_path(train, fmnist_test, tmp_path_factory):
    path = tmp_path_factory.mktemp("idx") / "train.idx"
    build_index(train, fmnist_test.images[:2000], path, fpr=0.01)  # calibrate on test 0..1999
    return path


def _planted(train):
    """40 training images in four guises (exact, mirrored, shifted, JPEG q75), with their ids."""
    src = np.arange(0, 4000, 100)
    x = train.images[src]
    jpeg = np.stack([cv2.imdecode(cv2.imencode(".jpg", i, [cv2.IMWRITE_JPEG_QUALITY, 75])[1], 0)[..., None]
                     for i in x])
    return np.concatenate([x, x[:, :, ::-1], shift(x, 0, 1), jpeg]), np.tile(src, 4)


def test_planted_copies_found_and_novel_images_not_flagged(index_path, train, fmnist_test):
    auditor = Auditor(HashIndex.load(index_path))
    planted, src = _planted(train)
    novel = fmnist_test.images[5000:6500]                  # held-out, not used in calibration
    res = auditor.audit(np.concatenate([planted, novel]))
    hits = [r for r in res[:len(planted)]]
    assert np.mean([r.flagged for r in hits]) >= 0.95
    assert np.mean([r.nearest_id == s for r, s in zip(hits, src)]) >= 0.95
    assert {r.view for r in hits[40:80] if r.flagged} == {"mirrored"}
    novel_rate = np.mean([r.flagged for r in res[len(planted):]])
    assert novel_rate <= 0.025                             # calibrated at 1 %; 1,500 samples
    s = auditor.summary()
    assert s["images"] == len(res) and s["flagged"] == sum(r.flagged for r in res)
    assert s["excess_p_value"] < 1e-6                      # 160 copies is far more than chance


def test_calibration_rates_and_other_fpr(index_path):
    index = HashIndex.load(index_path)
    cal = index.calibration
    assert cal["n"] == 2000 and cal["heldout_flag_rate"] <= 0.01
    held = np.asarray(index.arrays["heldout_scores"])
    assert np.mean(held < cal["threshold"]) == pytest.approx(cal["heldout_flag_rate"])
    loose = Auditor(index, fpr=0.05)
    assert loose.threshold > cal["threshold"] and 0.04 <= loose.expected_rate <= 0.05


def test_blank_images_are_reported_not_matched(index_path):
    auditor = Auditor(HashIndex.load(index_path))
    blank = np.stack([np.full((28, 28, 1), v, np.uint8) for v in (0, 40, 255)])
    res = auditor.audit(blank)
    assert all(r.blank and not r.flagged and r.nearest_id == -1 for r in res)
    assert auditor.summary()["blank"] == 3


def test_wrong_image_size_is_refused(index_path):
    with pytest.raises(EdgegenError, match="index holds 28x28x1"):
        Auditor(HashIndex.load(index_path)).audit(np.zeros((2, 32, 32, 1), np.uint8))


def test_data_copying_statistic():
    rng = np.random.default_rng(0)
    held, hc = rng.gamma(4, 1, 2000), rng.integers(0, 5, 2000)
    same = data_copying_test(rng.gamma(4, 1, 3000), rng.integers(0, 5, 3000), held, hc)
    closer = data_copying_test(rng.gamma(4, 1, 3000) * 0.6, rng.integers(0, 5, 3000), held, hc)
    assert abs(same["statistic"]) < 0.3 and same["p_value"] > 0.01
    assert closer["statistic"] < -3 and closer["p_value"] < 1e-6
    assert data_copying_test(held[:5], hc[:5], held, hc)["statistic"] is None   # too few per cell


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.browser
@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium is not installed (make system)")
def test_report_renders_in_headless_chromium(index_path, train, fmnist_test, tmp_path):
    auditor = Auditor(HashIndex.load(index_path), keep=12)
    planted, _ = _planted(train)
    images = np.concatenate([planted[:6], fmnist_test.images[6000:6200]])
    auditor.audit(images)
    evil = ['<script>window.EVIL=1</script>"&.png'] * len(images)
    page = tmp_path / "audit.html"
    page.write_text(render_html(auditor, title="<b>t</b>", sources=evil))
    shown = len(auditor.examples)
    assert shown >= 6
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    out = subprocess.run([_chromium(), *flags, "--dump-dom", page.as_uri()], capture_output=True,
                         text=True, timeout=120)
    dom = out.stdout
    assert f"pairs shown: {shown}" in dom                     # the page's script ran
    assert dom.count('class="pair"') == shown and dom.count("data:image/png;base64,") == 2 * shown
    assert "<script>window.EVIL" not in dom and "&lt;script&gt;window.EVIL" in dom
    assert "<b>t</b>" not in dom and "<svg" in dom
    assert "Uncaught" not in out.stderr and "SyntaxError" not in out.stderr


def _write_pngs(folder: Path, images: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        cv2.imwrite(str(folder / f"img{i:04d}.png"), img)


def test_cli_audit_folder_round_trip(index_path, train, fmnist_test, tmp_path, capsys):
    planted, _ = _planted(train)
    _write_pngs(tmp_path / "gen", np.concatenate([planted[:10], fmnist_test.images[7000:7090]]))
    html, js = tmp_path / "audit.html", tmp_path / "audit.json"
    rc = main(["audit", str(tmp_path / "gen"), "--index", str(index_path), "--report", str(html), "--json", str(js)])
    assert rc == 0
    rep = json.loads(js.read_text())
    assert rep["summary"]["images"] == 100 and rep["summary"]["flagged"] >= 10
    assert {e["source"] for e in rep["flagged_examples"]} >= {f"img{i:04d}.png" for i in range(10)}
    assert "flagged as training copies" in capsys.readouterr().out and html.stat().st_size > 1000


def test_cli_index_build_and_model_audit(small_idx_dir, tmp_path, capsys):
    out = tmp_path / "small.idx"
    assert main(["index", "build", "--data", str(small_idx_dir), "--out", str(out), "--fpr", "0.02"]) == 0
    index = HashIndex.load(out)
    assert len(index) == 512 and index.calibration["n"] == 256 and index.calibration["fpr"] == 0.02
    assert "pixels" not in index.arrays                       # reloadable from the IDX folder
    sys.path.insert(0, str(Path(__file__).parent))
    from _runtime_models import make_decoder
    model = make_decoder(tmp_path / "g.onnx", size=28)
    html = tmp_path / "m.html"
    assert main(["audit", str(model), "--index", str(out), "--report", str(html), "-n", "300"]) == 0
    assert "of 300 images" in capsys.readouterr().out and html.is_file()


@pytest.mark.parametrize("case", ["empty", "non-image", "other-size", "corrupt-index"])
def test_cli_bad_inputs_one_line_nothing_written(case, index_path, fmnist_test, tmp_path, capsys):
    folder, idx = tmp_path / "in", index_path
    folder.mkdir()
    if case == "non-image":
        _write_pngs(folder, fmnist_test.images[:3])
        (folder / "notes.png").write_text("hello")           # an image name that does not decode
    elif case == "other-size":
        _write_pngs(folder, np.zeros((2, 32, 32, 1), np.uint8))
    elif case == "corrupt-index":
        _write_pngs(folder, fmnist_test.images[:3])
        idx = tmp_path / "bad.idx"
        idx.write_bytes(index_path.read_bytes()[:-100])
    html, js = tmp_path / "r.html", tmp_path / "r.json"
    rc = main(["audit", str(folder), "--index", str(idx), "--report", str(html), "--json", str(js)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("edgegen: error: ") and "\n" not in err
    expected = {"empty": "no images to audit", "non-image": "not a readable image",
                "other-size": "32x32", "corrupt-index": "truncated"}[case]
    assert expected in err
    assert not html.exists() and not js.exists() and not list(tmp_path.glob(".*.tmp"))
