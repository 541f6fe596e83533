"""Batch generation: files + manifest, resume after kill, disk full, bad input, flat memory, no torch."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import cv2
import numpy as np
import pytest

from _runtime_models import make_decoder, make_encoder, make_lying_decoder
from edgegen.cli import main
from edgegen.errors import EdgegenError
from edgegen.runtime import Generator, pipeline
from edgegen.runtime.pipeline import make_plan, run_generate
from test_runtime import TORCH_BLOCKER

CLI = [sys.executable, "-m", "edgegen.cli"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {"gan": make_decoder(d / "gan.onnx"),
            "cond": make_decoder(d / "cond.onnx", conditional=True, channels=3, seed=4),
            "enc": make_encoder(d / "x.encoder.onnx"),
            "gan32": make_decoder(d / "gan32.onnx", size=32, latent=16, seed=5),
            "flat": make_lying_decoder(d / "flat.onnx", flat=True)}


def read_manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def check_complete(out: Path, model: Path, n: int, seed: int, labels=None, check_pixels: int = 20) -> list[dict]:
    """Exactly n indices, each listed once, every listed file present and equal to a fresh generate."""
    recs = read_manifest(out)
    assert sorted(r["index"] for r in recs) == list(range(n))
    pngs = sorted(p.name for p in out.glob("img-*.png"))
    assert pngs == sorted(r["file"] for r in recs)
    assert not list(out.glob(".*.tmp"))
    g = Generator.load(model)
    pick = np.linspace(0, n - 1, min(check_pixels, n)).astype(int)
    expect = g.generate(n, seed=seed, labels=labels)[pick]
    for j, i in enumerate(pick):
        img = cv2.imread(str(out / recs[[r["index"] for r in recs].index(i)]["file"]), cv2.IMREAD_UNCHANGED)
        img = img[..., None] if img.ndim == 2 else img[..., ::-1]
        np.testing.assert_array_equal(img, expect[j])
    return recs


# ----------------------------------------------------------------------------- happy paths

def test_cli_png_run_and_manifest(models, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["generate", str(models["cond"]), "-n", "300", "--out", str(out), "--seed", "9",
               "--class", "Sneaker", "--shard-size", "64", "--batch", "50", "--no-watermark", "--quiet"])
    assert rc == 0 and "wrote 300 images" in capsys.readouterr().out
    recs = check_complete(out, models["cond"], 300, 9, labels=7)
    fp = Generator.load(models["cond"]).fingerprint
    assert {(r["seed"], r["class"], r["label"], r["model"]) for r in recs} == {(9, "Sneaker", 7, fp)}
    # same arguments again: nothing to do, nothing duplicated
    assert main(["generate", str(models["cond"]), "-n", "300", "--out", str(out), "--seed", "9", "--class", "7",
                 "--shard-size", "64", "--no-watermark", "--quiet"]) == 0
    assert len(read_manifest(out)) == 300


def test_same_files_whatever_batch_and_threads(models, tmp_path):
    a = run_generate(models["gan"], tmp_path / "a", 130, seed=3, batch_size=128, threads=1, shard_size=40, progress=False)
    b = run_generate(models["gan"], tmp_path / "b", 130, seed=3, batch_size=7, threads=2, shard_size=40,
                     workers=1, progress=False)
    assert a.new_images == b.new_images == 130
    for p in (tmp_path / "a").glob("img-*.png"):
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes()
    assert (tmp_path / "a" / "manifest.jsonl").read_bytes() == (tmp_path / "b" / "manifest.jsonl").read_bytes()


def test_npz_format(models, tmp_path):
    out = tmp_path / "npz"
    run_generate(models["cond"], out, 100, seed=2, fmt="npz", shard_size=32, progress=False)
    recs = read_manifest(out)
    assert sorted(r["index"] for r in recs) == list(range(100))
    ref = Generator.load(models["cond"]).generate(100, seed=2)            # classes cycle by index
    for r in recs[::7]:
        with np.load(out / r["file"]) as z:
            np.testing.assert_array_equal(z["images"][r["row"]], ref[r["index"]])
            assert z["labels"][r["row"]] == r["index"] % 10 == r["label"]


def test_generate_with_torch_unimportable(models, tmp_path):
    out = tmp_path / "nt"
    code = TORCH_BLOCKER + f"""
from edgegen.cli import main
rc = main(["generate", {str(models['gan'])!r}, "-n", "200", "--out", {str(out)!r}, "--no-watermark", "--quiet"])
assert rc == 0 and "torch" not in sys.modules, (rc, "torch" in sys.modules)
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
    check_complete(out, models["gan"], 200, 0)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("extra,msg", [
    (["-n", "0"], "-n must be a positive integer"),
    (["-n", "5", "--class", "Hat", "@cond"], "unknown class 'Hat'"),
    (["-n", "5", "--class", "12", "@cond"], "class index 12 out of range"),
    (["-n", "5", "--class", "Bag"], "unconditional model"),
    (["-n", "5", "@enc"], "this is a VAE encoder"),
    (["-n", "5", "@missing"], "no such model file"),
    (["-n", "5", "--seed", "-1"], "seed must be in"),
    (["-n", "5", "@flat"], "graph output image is uint8 (N, 64) but its edgegen metadata promises"),
    (["-n", "5", "--actors", "2"], "--actors needs --engine ray"),
    (["-n", "5", "--actors", "0", "--engine", "ray"], "--actors must be >= 1, got 0"),
])
def test_bad_input_one_line_nonzero_nothing_written(models, tmp_path, extra, msg):
    model = str(models["gan"])
    args = []
    for a in extra:
        if a.startswith("@"):
            model = str(models.get(a[1:], tmp_path / "missing.onnx"))
        else:
            args.append(a)
    out = tmp_path / "o"
    res = subprocess.run(CLI + ["generate", model, "--out", str(out), "--no-watermark", "--quiet", *args],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and msg in res.stderr, res.stderr
    assert not out.exists()


def test_real_output_breaking_the_metadata_fails_before_any_folder(models, tmp_path, monkeypatch):
    """Second line of defence: a graph that declares the right output but returns another is
    refused on its first image, before the output folder exists."""
    real_load = Generator.load

    def load(*args, **kwargs):
        g = real_load(*args, **kwargs)
        g.session.run = lambda names, feeds, run=g.session.run: [run(names, feeds)[0].reshape(len(feeds["z"]), -1)]
        return g

    monkeypatch.setattr(pipeline.Generator, "load", load)
    with pytest.raises(EdgegenError, match=r"returned uint8 \(1, 64\) for 1 latents but its edgegen metadata"):
        run_generate(models["gan"], tmp_path / "o", 5, progress=False)
    assert not (tmp_path / "o").exists()


def test_refuses_other_runs_and_foreign_folders(models, tmp_path):
    out = tmp_path / "run"
    run_generate(models["gan"], out, 50, seed=1, shard_size=16, progress=False)
    before = (out / "manifest.jsonl").read_bytes()
    with pytest.raises(EdgegenError, match=r"holds another run \(seed=1, now 2\)"):
        run_generate(models["gan"], out, 50, seed=2, shard_size=16, progress=False)
    with pytest.raises(EdgegenError, match="holds another run"):
        run_generate(models["cond"], out, 50, seed=1, shard_size=16, progress=False)
    assert (out / "manifest.jsonl").read_bytes() == before                 # nothing lost
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"jpeg")
    with pytest.raises(EdgegenError, match="holds files that are not from an edgegen generate run"):
        run_generate(models["gan"], foreign, 5, progress=False)
    assert [p.name for p in foreign.iterdir()] == ["holiday.jpg"]
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(EdgegenError, match="exists and is not a folder"):
        run_generate(models["gan"], blocker, 5, progress=False)
    with pytest.raises(EdgegenError, match="cannot create the output folder"):
        run_generate(models["gan"], blocker / "sub", 5, progress=False)


# ----------------------------------------------------------------------------- crash safety

def test_killed_run_resumes_to_exactly_n(models, tmp_path):
    out, n = tmp_path / "k", 40_000
    cmd = CLI + ["generate", str(models["gan"]), "-n", str(n), "--out", str(out), "--seed", "5",
                 "--shard-size", "500", "--batch", "100", "--no-watermark", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    man = out / "manifest.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if man.exists() and man.stat().st_size > 0:
            break
        time.sleep(0.02)
    time.sleep(0.3)                                                          # let it get mid-shard
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(man.read_text().splitlines())
    assert 0 < partial < n, "the first run should have been killed mid-way"
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "already done" in res.stdout
    check_complete(out, models["gan"], n, 5)


@pytest.mark.parametrize("fmt", ["png", "npz"])
def test_resume_redoes_shards_whose_files_are_missing_or_damaged(models, tmp_path, fmt):
    out = tmp_path / fmt
    run_generate(models["gan"], out, 10, seed=4, fmt=fmt, shard_size=4, progress=False)
    ref = {r["index"]: r for r in read_manifest(out)}
    files = sorted({r["file"] for r in ref.values()})
    missing, damaged = (files[5], files[9]) if fmt == "png" else (files[1], files[2])   # shards 1 and 2
    (out / missing).unlink()
    (out / damaged).write_bytes((out / damaged).read_bytes()[:-7])              # truncated: size differs
    res = run_generate(models["gan"], out, 10, seed=4, fmt=fmt, shard_size=4, progress=False)
    assert (res.resumed_images, res.new_images, res.redone_images) == (4, 6, 6)
    assert res.redo_reason == f"{missing} is missing"
    recs = read_manifest(out)
    assert sorted(r["index"] for r in recs) == list(range(10))                  # each index once
    assert {r["index"]: r for r in recs} == ref                                 # same records, same sizes
    for r in recs:
        assert (out / r["file"]).stat().st_size == r["bytes"]
    if fmt == "png":
        check_complete(out, models["gan"], 10, 4)
    again = run_generate(models["gan"], out, 10, seed=4, fmt=fmt, shard_size=4, progress=False)
    assert (again.resumed_images, again.new_images, again.redone_images) == (10, 0, 0)


def test_shard_plan_is_lazy(models, tmp_path, monkeypatch):
    plan = make_plan(Generator.load(models["gan"]), 10**15, shard_size=1024)   # ~1e12 shards
    t = time.perf_counter()
    todo = plan.shards_todo({1})
    assert isinstance(todo, Iterator) and list(islice(todo, 3)) == [0, 2, 3]
    assert time.perf_counter() - t < 0.1
    # run_generate hands the engine a lazy plan: 2M one-image shards as a list would take ~70 MB
    seen = []
    monkeypatch.setattr(pipeline, "_run_local", lambda gen, plan, todo, *a: seen.append(list(islice(todo, 2))))
    tracemalloc.start()
    try:
        run_generate(models["gan"], tmp_path / "lazy", 2_000_000, shard_size=1, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == [[0, 1]] and peak < 8 * 2**20, peak


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)                            # get EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (12_000, 12_000))


def test_disk_full_stops_cleanly_and_resumes(models, tmp_path):
    """A file-size limit makes the manifest append fail mid-block, like a full disk."""
    out = tmp_path / "full"
    cmd = CLI + ["generate", str(models["gan"]), "-n", "600", "--out", str(out), "--shard-size", "40",
                 "--no-watermark", "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_limit_file_size)
    assert res.returncode == 2
    assert "file size limit was reached" in res.stderr and "rerun the same command" in res.stderr
    assert res.stderr.count("\n") == 1
    recs = read_manifest(out)                                                # whole shards only, files present
    assert 0 < len(recs) < 600 and len(recs) % 40 == 0
    assert len({r["index"] for r in recs}) == len(recs)
    assert all((out / r["file"]).is_file() for r in recs)
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    check_complete(out, models["gan"], 600, 0)


# ----------------------------------------------------------------------------- streaming

def _rss_growth_mb(model: Path, out: Path, n: int) -> float:
    """Peak RSS during a run minus RSS just before it (imports and a warm-up run done), sampled
    every 5 ms from /proc (ru_maxrss would be dominated by import-time peaks)."""
    code = f"""
import os, threading, time
from edgegen.runtime.pipeline import run_generate
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page / 2**20
run_generate({str(model)!r}, {str(out)!r} + "-warm", 3000, shard_size=1024, batch_size=512, progress=False)
base, peak, stop = rss(), [0.0], threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss()); time.sleep(0.005)
t = threading.Thread(target=sample); t.start()
run_generate({str(model)!r}, {str(out)!r}, {n}, shard_size=1024, batch_size=512, progress=False)
stop.set(); t.join()
print(base, max(peak[0], rss()) - base)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    base, growth = map(float, res.stdout.split())
    print(f"n={n}: RSS before {base:.1f} MB, growth during the run {growth:.1f} MB")
    return growth


def test_memory_stays_flat_at_1e5(models, tmp_path):
    small = _rss_growth_mb(models["gan"], tmp_path / "s", 2_000)
    big = _rss_growth_mb(models["gan"], tmp_path / "b", 100_000)
    assert len(os.listdir(tmp_path / "b")) == 100_000 + 2                    # images + run.json + manifest
    # 100k images hold ~3 MB of latents, ~6 MB of pixels and ~40 MB of manifest records if
    # anything accumulated; a streaming run grows by the same few MB (in-flight shards) at any n
    assert big - small < 8 and big < 20, (small, big)


# ----------------------------------------------------------------------------- watermark

def test_watermark_stage_marks_and_records_fingerprint_only(models, tmp_path, monkeypatch, capsys):
    wm = pytest.importorskip("edgegen.safety.watermark")
    from edgegen.safety.keys import generate_key, key_fingerprint

    key = generate_key()
    monkeypatch.setenv("EDGEGEN_WATERMARK_KEY", key.hex())
    out = tmp_path / "wm"
    assert main(["generate", str(models["gan32"]), "-n", "40", "--out", str(out), "--payload", "4242",
                 "--shard-size", "16", "--quiet"]) == 0
    recs = read_manifest(out)
    assert {json.dumps(r["watermark"], sort_keys=True) for r in recs} == {
        json.dumps({"key": key_fingerprint(key), "payload": 4242}, sort_keys=True)}
    for f in out.iterdir():                                                  # the key itself is nowhere
        assert key.hex().encode() not in f.read_bytes()
    stage = json.loads((out / "run.json").read_text())["identity"]["stages"][0]
    assert stage["version"] == wm.VERSION and stage["key"] == key_fingerprint(key)   # a resume never mixes schemes
    imgs = np.stack([cv2.imread(str(out / r["file"]), cv2.IMREAD_GRAYSCALE) for r in recs])
    dets = wm.Watermarker(key).detect(imgs)
    assert sum(d.detected for d in dets) >= 38 and {d.payload for d in dets if d.detected} == {4242}
    assert not any(d.detected for d in wm.Watermarker(generate_key()).detect(imgs))
    # unmarked originals differ from the written files
    raw = Generator.load(models["gan32"]).generate(40)[..., 0]
    assert not np.array_equal(raw, imgs)
    monkeypatch.delenv("EDGEGEN_WATERMARK_KEY")
    assert main(["generate", str(models["gan32"]), "-n", "4", "--out", str(tmp_path / "nokey")]) == 2
    assert "no watermark key configured" in capsys.readouterr().err
    assert not (tmp_path / "nokey").exists()


class _DropOdd:
    """A stage like the audit's --on-copy drop: flags odd indices and keeps only even ones."""

    def identity(self) -> dict:
        return {"stage": "drop-odd"}

    def __call__(self, images, indices, labels):
        flagged = indices % 2 == 1
        return images, [{"audit": {"flagged": bool(f)}} for f in flagged], ~flagged


def test_stage_extension_point_records_and_drops(models, tmp_path):
    out = tmp_path / "st"
    run_generate(models["gan"], out, 50, shard_size=16, stages=(_DropOdd(),), progress=False)
    recs = read_manifest(out)
    assert sorted(r["index"] for r in recs) == list(range(50))               # every index listed once
    for r in recs:
        assert r["audit"]["flagged"] == (r["index"] % 2 == 1)
        assert (r["file"] is None and r.get("dropped")) if r["index"] % 2 else (out / r["file"]).is_file()
    assert len(list(out.glob("img-*.png"))) == 25
    assert json.loads((out / "run.json").read_text())["identity"]["stages"] == [{"stage": "drop-odd"}]
    with pytest.raises(EdgegenError, match="holds another run"):                # stages are part of the identity
        run_generate(models["gan"], out, 50, shard_size=16, progress=False)


def test_no_model_uses_bundled_default_or_says_why(tmp_path):
    res = subprocess.run(CLI + ["generate", "-n", "3", "--out", str(tmp_path / "d"), "--no-watermark", "--quiet"],
                         capture_output=True, text=True)
    if res.returncode == 2:
        assert "no bundled model named 'gan'" in res.stderr and not (tmp_path / "d").exists()
    else:  # the pretrained models have landed
        assert res.returncode == 0 and len(read_manifest(tmp_path / "d")) == 3


def test_write_files_refuses_names_outside_the_folder(tmp_path):
    """Shard files land only in the output folder: folder parts and '..' are refused before any write."""
    from edgegen.errors import EdgegenError
    from edgegen.runtime.batch import write_files

    write_files(tmp_path, [("a.png", b"1"), ("b.png", b"2")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]
    for bad in ("../evil.png", "sub/x.png", "..", ""):
        with pytest.raises(EdgegenError, match="not a plain file name"):
            write_files(tmp_path, [("c.png", b"3"), (bad, b"x")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]
    assert not (tmp_path.parent / "evil.png").exists()
