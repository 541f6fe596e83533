"""CLI-wide input checks: outputs never replace inputs, one error line instead of a traceback, no partial output."""

from __future__ import annotations

import errno
import os

import cv2
import numpy as np
import pytest

from edgegen import cli, fileio
from edgegen.cli import main
from edgegen.errors import EdgegenError
from edgegen.safety.keys import write_key

KEY_ENV = "EDGEGEN_WATERMARK_KEY"


def _last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgegen: error: ")
    return err[0]


def test_outputs_must_have_their_kind_of_suffix(tmp_path, capsys):
    # A mistyped --out must not replace a checkpoint, an image or the index being read.
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"checkpoint")
    assert main(["export", str(run), "--out", str(run / "best.pt")]) == 2
    assert "expected a .onnx file name" in _last_error(capsys) and (run / "best.pt").read_bytes() == b"checkpoint"
    assert main(["quantize", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "m.png")]) == 2
    assert ".onnx" in _last_error(capsys)
    assert main(["index", "build", "--data", str(tmp_path), "--out", str(tmp_path / "a.png")]) == 2
    assert "expected a .idx file name" in _last_error(capsys)
    idx = tmp_path / "train.idx"
    idx.write_bytes(b"index")
    assert main(["audit", str(tmp_path), "--index", str(idx), "--report", str(tmp_path / "r.html"),
                 "--json", str(idx)]) == 2
    assert "expected a .json file name" in _last_error(capsys) and idx.read_bytes() == b"index"
    assert main(["audit", str(tmp_path), "--index", str(idx), "--report", str(tmp_path / "r.png")]) == 2
    assert ".html" in _last_error(capsys)
    assert main(["eval", str(tmp_path), "--json", str(tmp_path / "x.txt")]) == 2
    assert ".json" in _last_error(capsys)


def test_conflicting_and_out_of_range_options(tmp_path, capsys):
    assert main(["generate", "gan", "--model", "vae", "-n", "2", "--out", str(tmp_path / "o"), "--no-watermark"]) == 2
    assert "two models given" in _last_error(capsys)
    assert main(["generate", "-n", "2", "--out", str(tmp_path / "o"), "--no-watermark", "--audit",
                 str(tmp_path / "i.idx"), "--audit-fpr", "2"]) == 2
    assert "--audit-fpr must be between 0 and 1" in _last_error(capsys)
    assert not (tmp_path / "o").exists()
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    report = ["--index", str(tmp_path / "i.idx"), "--report", str(tmp_path / "r.html")]
    assert main(["audit", str(model), "-n", "0"] + report) == 2
    assert "-n must be a positive number" in _last_error(capsys)
    assert main(["audit", str(tmp_path), "-n", "5"] + report) == 2        # a folder: every image is audited
    assert "-n applies when auditing a model" in _last_error(capsys)
    assert not (tmp_path / "r.html").exists()
    assert main(["audit", "nosuch", "--index", str(tmp_path / "i.idx"), "--report", str(tmp_path / "r.html")]) == 2
    assert "nosuch: no such folder, model file or bundled model" in _last_error(capsys)


def test_write_errors_are_one_line_and_leave_nothing(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "kdir"
    folder.mkdir()
    with pytest.raises(EdgegenError, match="is a folder"):
        fileio.write_json_atomic(folder, {})

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio.os, "fsync", full)
    target = tmp_path / "key.key"
    assert main(["keygen", "--out", str(target)]) == 2
    assert "No space left on device" in _last_error(capsys)
    assert os.listdir(tmp_path) == ["kdir"]                         # no key, no temporary file


def test_any_os_error_is_one_line(monkeypatch, capsys):
    def broken(args):
        raise PermissionError(errno.EACCES, "Permission denied", "/some/file")

    monkeypatch.setattr(cli, "_cmd_models", broken)
    assert main(["models"]) == 2
    assert _last_error(capsys) == "edgegen: error: /some/file: Permission denied"


# ----------------------------------------------------------------------------- watermark embed


@pytest.fixture
def keyed(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, write_key(tmp_path / "wm.key").hex())
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a", "b"):
        cv2.imwrite(str(src / f"{name}.png"), rng.integers(40, 200, (32, 32), dtype=np.uint8))
    return src


def test_embed_never_replaces_inputs_or_earlier_outputs(keyed, tmp_path, capsys):
    before = (keyed / "a.png").read_bytes()
    assert main(["watermark", "embed", str(keyed / "a.png"), str(keyed / "b.png"), "--out", str(keyed)]) == 2
    assert "would overwrite an input image" in _last_error(capsys) and (keyed / "a.png").read_bytes() == before
    out = tmp_path / "out"
    assert main(["watermark", "embed", str(keyed), "--out", str(out)]) == 0
    first = (out / "a.png").read_bytes()
    capsys.readouterr()
    assert main(["watermark", "embed", str(keyed), "--out", str(out), "--payload", "7"]) == 2
    assert "already exists" in _last_error(capsys) and (out / "a.png").read_bytes() == first
    assert main(["watermark", "embed", str(keyed), "--out", str(out), "--payload", "7", "--force"]) == 0
    assert (out / "a.png").read_bytes() != first


def test_embed_checks_everything_before_writing(keyed, tmp_path, capsys):
    out = tmp_path / "out"
    tiny = keyed / "tiny.png"
    cv2.imwrite(str(tiny), np.zeros((1, 1), np.uint8))
    assert main(["watermark", "embed", str(keyed), "--out", str(out)]) == 2
    assert f"{tiny}: image size 1x1" in _last_error(capsys)
    tiny.unlink()
    assert main(["watermark", "embed", str(keyed), "--out", str(out), "--payload", "70000"]) == 2
    assert "--payload must be in 0..65535" in _last_error(capsys)
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["watermark", "embed", str(keyed), "--out", str(afile)]) == 2
    assert "is a file, expected a folder" in _last_error(capsys)
    assert not out.exists()


def test_embed_keeps_alpha_and_detect_names_missing_files(keyed, tmp_path, capsys):
    rgba = np.dstack([np.full((40, 40, 3), 120, np.uint8), np.linspace(0, 255, 1600).reshape(40, 40).astype(np.uint8)])
    cv2.imwrite(str(keyed / "c.png"), rgba)
    out = tmp_path / "out"
    assert main(["watermark", "embed", str(keyed / "c.png"), "--out", str(out)]) == 0
    marked = cv2.imread(str(out / "c.png"), cv2.IMREAD_UNCHANGED)
    assert marked.shape == (40, 40, 4) and np.array_equal(marked[:, :, 3], rgba[:, :, 3])
    capsys.readouterr()
    assert main(["watermark", "detect", str(out / "c.png"), str(tmp_path / "nosuch.png")]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert '"detected": true' in lines[0] and '"error": "no such file"' in lines[1]


def test_audit_takes_a_bundled_model_name(tmp_path, capsys):
    from edgegen.runtime.generator import ASSETS

    report = tmp_path / "r.html"
    assert main(["audit", "gan", "-n", "40", "--index", str(ASSETS / "fashion-mnist.idx"), "--report", str(report)]) == 0
    assert "of 40 images flagged" in capsys.readouterr().out and report.is_file()


def test_npz_shards_from_generate_are_detected_and_audited(tmp_path, monkeypatch, capsys):
    import json

    from edgegen.runtime.generator import ASSETS

    monkeypatch.setenv(KEY_ENV, write_key(tmp_path / "wm.key").hex())
    out = tmp_path / "gen"
    assert main(["generate", "-n", "20", "--out", str(out), "--format", "npz", "--shard-size", "8", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["watermark", "detect", str(out)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["index"] for r in rows) == list(range(20)) and all(r["detected"] for r in rows)
    assert main(["audit", str(out), "--index", str(ASSETS / "fashion-mnist.idx"), "--report", str(tmp_path / "r.html"),
                 "--json", str(tmp_path / "r.json")]) == 0
    assert "of 20 images flagged" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "r.json").read_text())["scores"]) == 20
    (out / "shard-000001.npz").write_bytes(b"not npz")
    assert main(["watermark", "detect", str(out)]) == 1
    assert "shard-000001.npz: not an edgegen npz shard" in capsys.readouterr().out


def test_every_option_and_argument_says_what_it_does():
    import argparse

    def undocumented(parser: argparse.ArgumentParser, path: str) -> list[str]:
        missing = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    missing += undocumented(sub, f"{path} {name}")
            elif not action.help and not isinstance(action, argparse._HelpAction):
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
        return missing

    assert undocumented(cli.build_parser(), "edgegen") == []
