"""`edgegen generate --audit INDEX --on-copy flag|drop`: the inline memorization audit stage.

A small index of real Fashion-MNIST images (1,000 training, 400 held-out for calibration) and a
tiny 28x28 model. A memorizing model is simulated by a test stage that puts training images in
place of some generated ones; the audit stage after it must flag (and with ``drop``, leave
unwritten) exactly those, record its verdict per image, write the run summary, resume exactly,
and refuse indexes that do not belong to the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from _runtime_models import make_decoder
from edgegen.cli import main
from edgegen.errors import EdgegenError
from edgegen.runtime.batch import Plan, finish_shard
from edgegen.runtime.pipeline import run_generate
from edgegen.runtime.stages import AUDIT_SUMMARY, AuditStage
from edgegen.safety.index import build_index

TRAIN, HELD = slice(0, 1000), slice(1000, 1400)


@pytest.fixture(scope="module")
def train(fmnist_test) -> np.ndarray:
    return fmnist_test.images[TRAIN]


@pytest.fixture(scope="module")
def index_path(train, fmnist_test, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("aidx") / "train.idx"
    build_index(train, fmnist_test.images[HELD], path, fpr=0.01)
    return path


@pytest.fixture(scope="module")
def other_index(fmnist_test, tmp_path_factory) -> Path:
    """An index of other images (same size): another data set as far as fingerprints go."""
    path = tmp_path_factory.mktemp("aidx2") / "other.idx"
    build_index(fmnist_test.images[2000:3000], fmnist_test.images[HELD], path, fpr=0.01)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_decoder(tmp_path_factory.mktemp("amodel") / "gan28.onnx", size=28, latent=8, seed=3)


def _with_data_fingerprint(src: Path, dst: Path, fingerprint: str, source: str) -> Path:
    """Copy of a model whose metadata names its training index/data, as export writes it."""
    m = onnx.load(src)
    props = {p.key: p.value for p in m.metadata_props}
    extra = json.loads(props.get("edgegen.extra", "{}"))
    extra["data_fingerprint_source"] = source
    props.update({"edgegen.data_fingerprint": fingerprint, "edgegen.extra": json.dumps(extra)})
    del m.metadata_props[:]
    for k, v in props.items():
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, dst)
    return dst


class _Plant:
    """Test stage simulating a memorizing model: image i becomes training image i when i % 5 == 2."""

    def __init__(self, train: np.ndarray):
        self.train = train

    def identity(self) -> dict:
        return {"stage": "plant-test"}

    def __call__(self, images, indices, labels):
        images = images.copy()
        planted = indices % 5 == 2
        images[planted] = self.train[indices[planted] % len(self.train)]
        return images, [{} for _ in indices], np.ones(len(indices), bool)


class _FailAt:
    """Raises on one shard (a crash mid-run); its identity is empty, so the rerun is the same run."""

    def __init__(self, shard_start: int | None):
        self.shard_start = shard_start

    def identity(self) -> dict:
        return {"stage": "fail-test"}

    def __call__(self, images, indices, labels):
        if self.shard_start is not None and int(indices[0]) == self.shard_start:
            raise OSError(28, "No space left on device")
        return images, [{} for _ in indices], np.ones(len(indices), bool)


def read_manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- the stage itself

def test_stage_flags_training_images_and_drops_them(index_path, train, fmnist_test):
    stage = AuditStage(index_path, on_copy="drop")
    planted = train[[3, 141, 592, 977]]
    novel = fmnist_test.images[5000:5060]                   # not in the index, not used in calibration
    images = np.concatenate([planted, novel])
    out, recs, keep = stage(images, np.arange(len(images)), None)
    assert out is images                                    # the audit never changes pixels
    a = [r["audit"] for r in recs]
    assert [x["flagged"] for x in a[:4]] == [True] * 4
    assert [x["nearest_id"] for x in a[:4]] == [3, 141, 592, 977]
    assert all(x["view"] == "as-is" and x["score"] < 0.05 for x in a[:4])
    assert sum(x["flagged"] for x in a[4:]) <= 3            # calibrated at 1 %
    assert all({"flagged", "blank", "score", "nearest_id", "cell"} <= set(x) for x in a)
    np.testing.assert_array_equal(keep, ~np.array([x["flagged"] for x in a]))
    _, _, keep_flag = AuditStage(index_path, on_copy="flag")(images, np.arange(len(images)), None)
    assert keep_flag.all()


def test_stage_pickles_like_ray_ships_it(index_path, train):
    """Ray sends stages to actors by pickle: the copy reloads the index and gives the same records."""
    import pickle

    stage = AuditStage(index_path, on_copy="drop")
    imgs = train[[5, 6, 7]]
    clone = pickle.loads(pickle.dumps(stage))
    assert clone._index is None and clone.identity() == stage.identity()
    a, b = stage(imgs, np.arange(3), None), clone(imgs, np.arange(3), None)
    assert a[1] == b[1] and (a[2] == b[2]).all() and not b[2].any()


def test_audit_after_watermark_still_finds_copies(index_path, train):
    """CLI order: watermark, then audit, so the verdict is about the written (marked) pixels."""
    pytest.importorskip("edgegen.safety.watermark")
    from edgegen.runtime.stages import WatermarkStage
    from edgegen.safety.keys import generate_key

    plan = make_plan_for(index_path)
    imgs = train[[10, 20, 30, 40, 50, 60]]
    res = finish_shard(plan, 0, np.arange(6), imgs, None,
                       (WatermarkStage(generate_key(), 7), AuditStage(index_path, on_copy="drop")))
    assert all(r["audit"]["flagged"] and r["dropped"] and r["file"] is None for r in res.records)
    assert [r["audit"]["nearest_id"] for r in res.records] == [10, 20, 30, 40, 50, 60]
    assert all(r["watermark"]["payload"] == 7 for r in res.records) and res.files == []


def make_plan_for(index_path: Path) -> Plan:
    return Plan(n=6, seed=0, model_fingerprint="m", shard_size=6,
                stages=(AuditStage(index_path).identity(),))


# ----------------------------------------------------------------------------- full runs

def test_run_drops_planted_copies_records_all_and_writes_summary(model, index_path, train, tmp_path):
    out = tmp_path / "drop"
    n = 60
    run_generate(model, out, n, shard_size=16, progress=False,
                 stages=(_Plant(train), AuditStage(index_path, on_copy="drop")))
    recs = sorted(read_manifest(out), key=lambda r: r["index"])
    assert [r["index"] for r in recs] == list(range(n))
    planted = [r for r in recs if r["index"] % 5 == 2]
    assert all(r["audit"]["flagged"] and r["dropped"] and r["file"] is None for r in planted)
    assert [r["audit"]["nearest_id"] for r in planted] == [r["index"] % len(train) for r in planted]
    written = [r for r in recs if r["file"] is not None]
    assert all(not r["audit"]["flagged"] and (out / r["file"]).is_file() for r in written)
    assert sorted(p.name for p in out.glob("img-*.png")) == sorted(r["file"] for r in written)
    s = json.loads((out / AUDIT_SUMMARY).read_text())
    n_flag = sum(r["audit"]["flagged"] for r in recs)
    assert s["images"] == n and s["flagged"] == n_flag >= len(planted) and s["dropped"] == n - len(written)
    assert s["on_copy"] == "drop" and s["excess_p_value"] < 1e-6      # 12 copies in 60: far above 1 %
    assert s["index"]["fingerprint"] == AuditStage(index_path).index_fingerprint
    ident = json.loads((out / "run.json").read_text())["identity"]["stages"]
    assert ident[1]["stage"] == "audit" and ident[1]["on_copy"] == "drop"


def test_resume_is_exact_and_other_audit_settings_are_refused(model, index_path, other_index, train, tmp_path):
    n, kw = 70, dict(shard_size=16, progress=False)
    ref = tmp_path / "ref"
    run_generate(model, ref, n, stages=(_Plant(train), _FailAt(None), AuditStage(index_path)), **kw)
    out = tmp_path / "resumed"
    with pytest.raises(EdgegenError, match="disk is full"):
        run_generate(model, out, n, stages=(_Plant(train), _FailAt(32), AuditStage(index_path)), **kw)
    assert not (out / AUDIT_SUMMARY).exists()                   # no summary of a partial run
    partial = len(read_manifest(out))
    assert 0 < partial < n
    for other in ((AuditStage(index_path, on_copy="drop"),), (AuditStage(index_path, fpr=0.05),),
                  (AuditStage(other_index),), ()):
        with pytest.raises(EdgegenError, match="holds another run"):
            run_generate(model, out, n, stages=(_Plant(train), _FailAt(None), *other), **kw)
    res = run_generate(model, out, n, stages=(_Plant(train), _FailAt(None), AuditStage(index_path)), **kw)
    assert res.resumed_images == partial and res.new_images == n - partial
    key = lambda r: r["index"]  # noqa: E731
    assert sorted(read_manifest(out), key=key) == sorted(read_manifest(ref), key=key)
    s_out, s_ref = (json.loads((d / AUDIT_SUMMARY).read_text()) for d in (out, ref))
    s_out["index"].pop("path"), s_ref["index"].pop("path")
    assert s_out == s_ref and s_out["images"] == n and s_out["flagged"] >= 14


# ----------------------------------------------------------------------------- refusals and CLI

def test_index_of_another_training_set_or_size_is_refused(model, index_path, other_index, tmp_path):
    fp = AuditStage(index_path).index_fingerprint
    mine = _with_data_fingerprint(model, tmp_path / "mine.onnx", fp, "train.idx")
    out = tmp_path / "x"
    with pytest.raises(EdgegenError, match="is not the index of .* training set") as e:
        run_generate(mine, out, 8, stages=(AuditStage(other_index),), progress=False)
    assert "\n" not in str(e.value) and not out.exists()         # one line, nothing written
    run_generate(mine, out, 8, stages=(AuditStage(index_path),), progress=False)  # its own index: fine
    assert len(read_manifest(out)) == 8
    small = make_decoder(tmp_path / "gan8.onnx", size=8)
    with pytest.raises(EdgegenError, match="index holds 28x28x1 training images but .* makes 8x8x1"):
        run_generate(small, tmp_path / "y", 8, stages=(AuditStage(index_path),), progress=False)
    assert not (tmp_path / "y").exists()


def test_cli_audit_drop_summary_and_bad_input(model, index_path, other_index, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["generate", str(model), "-n", "20", "--out", str(out), "--no-watermark", "--quiet",
            "--shard-size", "8", "--audit", str(index_path), "--on-copy", "drop"]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "audit: " in said and "flagged as training copies" in said and str(out / AUDIT_SUMMARY) in said
    recs = read_manifest(out)
    assert len(recs) == 20 and all("audit" in r for r in recs)
    assert json.loads((out / AUDIT_SUMMARY).read_text())["images"] == 20
    assert main(args) == 0                                      # rerun: nothing to do, same summary
    # The output folder audits as it is: its manifest / run / summary files are not taken for images.
    kept = sum(1 for r in recs if r.get("file"))
    assert main(["audit", str(out), "--index", str(index_path), "--report", str(tmp_path / "a.html"),
                 "--json", str(tmp_path / "a.json")]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["summary"]["images"] == kept
    assert main(["generate", str(model), "-n", "4", "--out", str(tmp_path / "z"), "--no-watermark",
                 "--on-copy", "drop"]) == 2
    assert "need --audit" in capsys.readouterr().err
    assert main(["generate", str(model), "-n", "4", "--out", str(tmp_path / "z"), "--no-watermark",
                 "--audit", str(tmp_path / "missing.idx")]) == 2
    assert "no such index file" in capsys.readouterr().err and not (tmp_path / "z").exists()
