"""Training loops on a small real subset: losses fall, checkpoints are complete, resume is exact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from edgegen.errors import EdgegenError
from edgegen.training.checkpoint import load_checkpoint, load_run
from edgegen.training.train import TrainOptions, train


def _opts(tmp_path, data, kind="gan", **kw) -> TrainOptions:
    base = dict(kind=kind, data=str(data), out=str(tmp_path / kind), epochs=0.25, batch_size=32,
                width=8, latent_dim=16, progress=False, quality_samples=64, seed=0, log_every=1)
    return TrainOptions(**{**base, **kw})


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_gan_run_folder_is_complete(tmp_path, small_idx_dir):
    last = train(_opts(tmp_path, small_idx_dir, conditional=True))
    run = last.parent
    for name in ("last.pt", "last.json", "best.pt", "config.json", "metrics.jsonl", "train.idx"):
        assert (run / name).is_file(), name
    assert list((run / "samples").glob("step_*.png"))
    state = load_checkpoint(last)
    assert state["step"] == 4 and set(state["models"]) == {"G", "D", "G_ema"}
    assert state["data"]["fingerprint"] and state["version"]
    assert state["train_config"]["mode_seeking"] == 0.2      # conditional GANs collapse without it
    assert state["train_config"]["act_clip"] == state["model_config"]["act_clip"] == 3.0   # int8-friendly default
    loaded = load_run(run)
    assert loaded.kind == "gan" and not loaded.model.training
    x = loaded.model(torch.randn(2, 16), torch.tensor([1, 2]))
    assert x.shape == (2, 1, 32, 32)
    from edgegen.safety.index import HashIndex

    assert len(HashIndex.load(run / "train.idx")) == 512  # the audit's index of exactly the training set


def test_vae_loss_falls_and_expost_is_fitted(tmp_path, small_idx_dir):
    run = train(_opts(tmp_path, small_idx_dir, kind="vae", epochs=3, lr=3e-3)).parent
    losses = [m["loss"] for m in _metrics(run) if "loss" in m]
    assert losses[-1] < 0.8 * losses[0]
    assert bool(load_run(run).model.expost_fitted)


def test_classifier_loss_falls(tmp_path, small_idx_dir):
    run = train(_opts(tmp_path, small_idx_dir, kind="classifier", epochs=6, batch_size=64)).parent
    losses = [m["loss"] for m in _metrics(run) if "loss" in m]
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])  # batch losses are noisy: compare 5-step means
    assert 0.0 <= load_checkpoint(run / "last.pt")["metrics"]["accuracy"] <= 1.0  # measured on the test split


@pytest.mark.parametrize("kind", ["gan", "vae"])
def test_resume_is_exact(tmp_path, small_idx_dir, kind):
    """Two runs of 4 + 4 steps end bit-identical to one run of 8 steps, also when the folder moved between them."""
    full = train(_opts(tmp_path / "a", small_idx_dir, kind=kind, epochs=0.5))
    half = _opts(tmp_path / "b", small_idx_dir, kind=kind, epochs=0.25)
    train(half)
    moved = tmp_path / "moved"
    Path(half.out).rename(moved)
    resumed = train(TrainOptions(**{**half.__dict__, "out": str(moved), "epochs": 0.5, "resume": True}))
    assert resumed.parent == moved and load_checkpoint(resumed)["train_config"]["out"] == str(moved)
    a, b = load_checkpoint(full), load_checkpoint(resumed)
    assert a["step"] == b["step"] == 8
    for name, sd in a["models"].items():
        for key, value in sd.items():
            assert torch.equal(value, b["models"][name][key]), f"{name}.{key}"
    steps = [m["step"] for m in _metrics(resumed.parent) if "checkpoint" not in m]
    assert steps == sorted(set(steps)) and steps[-1] == 8  # lines after the resumed checkpoint were dropped


def test_refuses_to_overwrite_a_run(tmp_path, small_idx_dir):
    opts = _opts(tmp_path, small_idx_dir, epochs=0.0625)
    train(opts)
    with pytest.raises(EdgegenError, match="already holds a run; pass --resume"):
        train(opts)


def test_resume_needs_a_checkpoint(tmp_path, small_idx_dir):
    with pytest.raises(EdgegenError, match="no checkpoint here"):
        train(_opts(tmp_path, small_idx_dir, resume=True))


def test_checkpoint_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "last.pt"
    torch.save({"kind": "gan", "models": Evil()}, path)
    with pytest.raises(EdgegenError, match="not a readable edgegen checkpoint"):
        load_checkpoint(path)


def test_sigterm_checkpoints_and_resumes(tmp_path, small_idx_dir):
    """A killed run keeps a complete checkpoint at a step boundary and continues from it."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "edgegen.cli", "train", "gan", "--data", str(small_idx_dir), "--out", str(out),
           "--epochs", "1000", "--batch-size", "32", "--width", "8", "--latent-dim", "16", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "--resume" in stdout
    step = load_checkpoint(out / "last.pt")["step"]
    assert step >= 2
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    resumed = train(TrainOptions(kind="gan", data=str(small_idx_dir), out=str(out), epochs=(step + 2) / 16,
                                 resume=True, progress=False))
    assert load_checkpoint(resumed)["step"] == step + 2


def test_mode_seeking_pairs_labels_and_spreads_samples(tmp_path):
    """The mode-seeking term (MSGAN) pairs fake labels and, weighted strongly, pushes same-class samples apart."""
    from edgegen.training.models import GANConfig
    from edgegen.training.train import GANTask

    cfg = GANConfig(image_size=28, channels=1, latent_dim=16, width=8, d_width=8, num_classes=10)
    seen = []
    x = torch.rand(32, 1, 28, 28) * 2 - 1
    y = torch.arange(32) % 10
    z = torch.randn(32, 16, generator=torch.Generator().manual_seed(5))
    label = torch.arange(16).repeat(2) % 10                         # pairs (i, i + 16) share a label

    def spread(task) -> float:
        with torch.no_grad():
            out = task.G(z, label)
        return float(((out[:16] - out[16:]).abs().mean((1, 2, 3)) / (z[:16] - z[16:]).abs().mean(1)).mean())

    ratios = {}
    for weight in (0.0, 20.0):
        torch.manual_seed(0)
        task = GANTask(cfg, _opts(tmp_path, "unused", mode_seeking=weight), torch.device("cpu"))
        hook = task.G.register_forward_hook(lambda m, args, out: seen.append(args[1].clone()))
        before = spread(task)
        logs = [task.step(x, y, step) for step in range(6)]
        hook.remove()
        ratios[weight] = spread(task) / before
        assert ("ms_ratio" in logs[0]) == (weight > 0)
    paired = seen[-1]
    assert torch.equal(paired[:16], paired[16:])
    assert ratios[20.0] > ratios[0.0]


@pytest.mark.parametrize("option,value,message", [
    ("epochs", 0.0, "--epochs must be a positive number, got 0"),
    ("epochs", -1.0, "--epochs must be a positive number, got -1"),
    ("minutes", 0.0, "--minutes must be a positive number, got 0"),
    ("minutes", -1.0, "--minutes must be a positive number, got -1"),
    ("width", 0, "--width must be at least 1, got 0"),
    ("latent_dim", 0, "--latent-dim must be at least 1, got 0"),
    ("lr", -1.0, "--lr must be a positive number, got -1"),
    ("lr", float("nan"), "--lr must be a positive number, got nan"),
    ("beta", -0.5, "--beta must be zero or a positive number, got -0.5"),
    ("mode_seeking", float("inf"), "--mode-seeking must be zero or a positive number, got inf"),
    ("act_clip", -1.0, "--act-clip must be zero or a positive number, got -1"),
    ("checkpoint_minutes", 0.0, "--checkpoint-minutes must be a positive number, got 0"),
    ("seed", -1, "--seed must be zero or positive, got -1"),
])
def test_bad_options_are_refused_before_anything_is_written(tmp_path, small_idx_dir, option, value, message):
    opts = _opts(tmp_path, small_idx_dir, **{option: value})
    with pytest.raises(EdgegenError, match=message):
        train(opts)
    assert not Path(opts.out).exists()


def test_bad_option_is_one_cli_line(tmp_path, small_idx_dir, capsys):
    from edgegen.cli import main

    out = tmp_path / "run"
    assert main(["train", "gan", "--data", str(small_idx_dir), "--out", str(out), "--epochs", "-1", "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == "edgegen: error: --epochs must be a positive number, got -1"
    assert not out.exists()


def test_data_errors_leave_no_run_folder(tmp_path, fmnist_test):
    import cv2

    flat = tmp_path / "flat"          # no class sub-folders: no labels for --conditional
    flat.mkdir()
    for i in range(8):
        cv2.imwrite(str(flat / f"{i}.png"), fmnist_test.images[i])
    opts = _opts(tmp_path, flat, conditional=True, batch_size=8)
    with pytest.raises(EdgegenError, match="--conditional needs labelled data"):
        train(opts)
    assert not Path(opts.out).exists()


def test_image_folder_without_test_split_trains_and_exports(tmp_path, fmnist_test, capsys):
    """A plain folder of class sub-folders trains (no train.idx, one line says so) and its run exports."""
    import cv2

    from edgegen.export import export_run

    data = tmp_path / "shoes-and-bags"
    for name, label in (("shoe", 7), ("bag", 8)):
        (data / name).mkdir(parents=True)
        for i in range(8):
            cv2.imwrite(str(data / name / f"{i}.png"), fmnist_test.images[fmnist_test.labels == label][i])
    # 16 images, batch 8: 2 steps; a checkpoint after every step
    run = train(_opts(tmp_path, data, batch_size=8, epochs=1.0, checkpoint_minutes=1e-9)).parent
    err = capsys.readouterr().err.strip()
    assert "train.idx was not built" in err and "edgegen index build" in err and "\n" not in err
    assert not (run / "train.idx").exists()
    # no quality metric without a test split: best.pt is the latest checkpoint, not the first one
    assert load_checkpoint(run / "best.pt")["step"] == load_checkpoint(run / "last.pt")["step"] == 2
    meta = export_run(run, tmp_path / "g.onnx")
    config = json.loads((run / "config.json").read_text())
    assert meta.extra["data_fingerprint_source"] == "run-data"
    assert meta.data_fingerprint == config["data"]["fingerprint"]


def test_single_idx_file_has_no_test_split(tmp_path, small_idx_dir, capsys):
    """One IDX file's "test" split would be its training images: no index is calibrated on them."""
    run = train(_opts(tmp_path, small_idx_dir / "train-images-idx3-ubyte.gz", epochs=0.0625)).parent
    assert "train.idx was not built" in capsys.readouterr().err
    assert not (run / "train.idx").exists() and (run / "last.pt").is_file()


def test_unreadable_test_split_is_an_error_not_skipped(tmp_path, fmnist_test):
    import cv2

    for split in ("train", "test"):
        (tmp_path / "data" / split).mkdir(parents=True)
        for i in range(8):
            cv2.imwrite(str(tmp_path / "data" / split / f"{i}.png"), fmnist_test.images[i])
    (tmp_path / "data" / "test" / "broken.png").write_text("not an image")
    opts = _opts(tmp_path, tmp_path / "data", batch_size=8)
    with pytest.raises(EdgegenError, match=r"broken\.png: not a readable image"):
        train(opts)
    assert not Path(opts.out).exists()
