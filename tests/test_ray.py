"""The Ray Data engine on a local Ray (num_cpus=2, one actor): same files and manifest as local."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _runtime_models import make_decoder
from edgegen.cli import main
from edgegen.runtime.pipeline import run_generate

ray = pytest.importorskip("ray")


@pytest.fixture(scope="session")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_decoder(tmp_path_factory.mktemp("m") / "cond.onnx", conditional=True, channels=3, seed=6)


def _lines(out: Path) -> list[str]:
    return (out / "manifest.jsonl").read_text().splitlines()


def test_ray_writes_the_same_run_as_local(local_ray, model, tmp_path):
    loc = run_generate(model, tmp_path / "local", 700, seed=4, shard_size=100, progress=False)
    rc = main(["generate", str(model), "-n", "700", "--out", str(tmp_path / "ray"), "--seed", "4",
               "--shard-size", "100", "--engine", "ray", "--actors", "1", "--no-watermark", "--quiet"])
    assert rc == 0 and loc.new_images == 700
    assert sorted(_lines(tmp_path / "local")) == sorted(_lines(tmp_path / "ray"))   # shards may finish in any order
    assert len(_lines(tmp_path / "ray")) == 700
    for p in (tmp_path / "local").glob("img-*.png"):
        assert p.read_bytes() == (tmp_path / "ray" / p.name).read_bytes()
    assert (tmp_path / "local" / "run.json").read_bytes() == (tmp_path / "ray" / "run.json").read_bytes()


def test_ray_resumes_a_broken_run(local_ray, model, tmp_path):
    out = tmp_path / "r"
    run_generate(model, out, 500, seed=1, shard_size=100, progress=False)
    full = _lines(out)
    # simulate a crash: two whole shards committed, a torn line of the third, its files partly gone
    (out / "manifest.jsonl").write_text("\n".join(full[:200]) + "\n" + full[200][:30])
    for p in sorted(out.glob("img-*.png"))[250:]:
        p.unlink()
    res = run_generate(model, out, 500, seed=1, shard_size=100, engine="ray", progress=False)
    assert res.resumed_images == 200 and res.new_images == 300
    lines = _lines(out)
    assert sorted(lines) == sorted(full)
    assert len({json.loads(x)["index"] for x in lines}) == 500
    assert len(list(out.glob("img-*.png"))) == 500
