"""Runtime API: counter-based latents, Generator loading/refusals, determinism, VAE, torch-free."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from _runtime_models import CLASSES, make_decoder, make_encoder, make_lying_decoder, make_plain_onnx
from edgegen.errors import EdgegenError
from edgegen.runtime import Generator, default_model_path, latents, session_options
from edgegen.runtime.latent import slerp

ROOT = Path(__file__).resolve().parents[1]

# Blocks any import of torch in a child interpreter: proves the runtime never needs it.
TORCH_BLOCKER = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, _NoTorch())
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {
        "gan": make_decoder(d / "gan.onnx"),
        "cond": make_decoder(d / "cond.onnx", conditional=True, channels=3),
        "vae": make_decoder(d / "vae.onnx", kind="vae-decoder", seed=2),
        "vae_enc": make_encoder(d / "vae.encoder.onnx"),
        "cvae": make_decoder(d / "cvae.onnx", kind="vae-decoder", conditional=True, seed=3),
        "cvae_enc": make_encoder(d / "cvae.encoder.onnx", conditional=True),
        "plain": make_plain_onnx(d / "plain.onnx"),
    }


# ----------------------------------------------------------------------------- latents

def test_latents_are_counter_based_and_gaussian():
    idx = np.arange(20_000)
    z = latents(7, idx, 33)
    assert z.shape == (20_000, 33) and z.dtype == np.float32
    # any subset / order of indices gives the same rows
    perm = np.random.default_rng(0).permutation(idx)[:500]
    np.testing.assert_array_equal(latents(7, perm, 33), z[perm])
    # standard normal: mean 0, sd 1 (SE of the mean ~ 0.0012 over 660k values), uncorrelated columns
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    c = np.corrcoef(z[:, :8].T) - np.eye(8)
    assert np.abs(c).max() < 0.05
    # other seeds give other noise
    assert not np.allclose(latents(8, idx[:10], 33), z[:10])


def test_slerp_endpoints():
    a, b = latents(1, [0], 16)[0], latents(2, [0], 16)[0]
    path = slerp(a, b, 5)
    np.testing.assert_allclose(path[0], a, atol=1e-5)
    np.testing.assert_allclose(path[-1], b, atol=1e-5)


# ----------------------------------------------------------------------------- loading

def test_load_reads_metadata(models):
    g = Generator.load(models["cond"])
    assert g.meta.kind == "gan" and g.meta.conditional and g.num_classes == len(CLASSES)
    assert g.meta.image_shape == (8, 8, 3) and len(g.fingerprint) == 16


@pytest.mark.parametrize("case,msg", [
    ("missing", "no such model file"), ("garbage", "not a readable ONNX model"),
    ("plain", "not an edgegen model"), ("encoder", "this is a VAE encoder"),
])
def test_load_refuses_what_it_cannot_serve(models, tmp_path, case, msg):
    path = {"missing": tmp_path / "nope.onnx", "plain": models["plain"], "encoder": models["vae_enc"]}.get(case)
    if case == "garbage":
        path = tmp_path / "garbage.onnx"
        path.write_bytes(b"\x08\x07not really protobuf" * 10)
    with pytest.raises(EdgegenError, match=msg):
        Generator.load(path)


@pytest.mark.parametrize("kw,msg", [
    ({"flat": True}, r"graph output image is uint8 \(N, 64\) but its edgegen metadata promises uint8 \(N, 8, 8, 1\)"),
    ({"float_out": True}, r"graph output image is float \(N, 8, 8, 1\) but its edgegen metadata promises uint8"),
])
def test_load_refuses_a_graph_output_that_breaks_the_metadata(tmp_path, kw, msg):
    path = make_lying_decoder(tmp_path / "liar.onnx", **kw)
    with pytest.raises(EdgegenError, match=f"{path}: {msg}"):
        Generator.load(path)
    assert Generator.load(make_lying_decoder(tmp_path / "honest.onnx")).generate(2).shape == (2, 8, 8, 1)


class _WrongOutput:
    """Stands in for a session whose real output is not what the graph declares (e.g. symbolic dims)."""

    def __init__(self, session, fix):
        self.session, self.fix = session, fix

    def run(self, names, feeds):
        return [self.fix(self.session.run(names, feeds)[0])]


@pytest.mark.parametrize("fix,msg", [
    (lambda a: a.reshape(len(a), -1), r"returned uint8 \(3, 64\) for 3 latents"),
    (lambda a: a.astype(np.float32) * 300, r"returned float32 \(3, 8, 8, 1\) for 3 latents"),
])
def test_run_checks_the_real_output_against_the_metadata(models, fix, msg):
    g = Generator.load(models["gan"])
    g.session = _WrongOutput(g.session, fix)
    with pytest.raises(EdgegenError, match=msg + r" but its edgegen metadata promises uint8 \(3, 8, 8, 1\)"):
        g.generate(3)                                                            # never wrapped or broadcast


def test_session_modes():
    desk = session_options("desktop")
    assert 1 <= desk.intra_op_num_threads <= 2
    assert desk.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options("batch", threads=3).intra_op_num_threads == 3
    with pytest.raises(EdgegenError, match="unknown session mode"):
        session_options("turbo")


def test_default_model_path_absent_is_clear():
    try:
        p = default_model_path("gan")
    except EdgegenError as e:
        assert "no bundled model named 'gan'" in str(e)
    else:  # the pretrained models have landed: it must be a real file
        assert p.is_file()
    with pytest.raises(EdgegenError, match="no bundled model named 'no-such-model'"):
        default_model_path("no-such-model")


# ----------------------------------------------------------------------------- generation

def test_same_seed_same_images_whatever_batch_or_threads(models):
    g1 = Generator.load(models["gan"], threads=1)
    g2 = Generator.load(models["gan"], threads=2, mode="batch")
    ref = g1.generate(50, seed=11, batch_size=50)
    assert ref.shape == (50, 8, 8, 1) and ref.dtype == np.uint8
    np.testing.assert_array_equal(ref, g1.generate(50, seed=11, batch_size=7))
    np.testing.assert_array_equal(ref, g2.generate(50, seed=11, batch_size=1))
    np.testing.assert_array_equal(ref[20:], g2.generate(30, seed=11, start=20))   # resume from index 20
    assert not np.array_equal(ref, g1.generate(50, seed=12))
    assert ref.std() > 10  # real, varied pixels, not a constant


def test_conditional_labels(models):
    g = Generator.load(models["cond"])
    default = g.generate(20, seed=1)
    explicit = g.generate(20, seed=1, labels=np.arange(20) % 10)
    np.testing.assert_array_equal(default, explicit)                              # None cycles classes
    sneakers = g.generate(4, seed=1, labels="sneaker")
    np.testing.assert_array_equal(sneakers, g.generate(4, seed=1, labels=7))
    assert not np.array_equal(sneakers, g.generate(4, seed=1, labels=0))
    with pytest.raises(EdgegenError, match="unknown class 'Hat'"):
        g.generate(2, labels="Hat")
    with pytest.raises(EdgegenError, match="out of range"):
        g.generate(2, labels=10)
    with pytest.raises(EdgegenError, match="label out of range"):
        g.generate(2, labels=np.array([0, 12]))


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_bad_n(models, n):
    with pytest.raises(EdgegenError, match="n must be a positive integer"):
        Generator.load(models["gan"]).generate(n)


def test_unconditional_refuses_labels(models):
    with pytest.raises(EdgegenError, match="unconditional"):
        Generator.load(models["gan"]).generate(3, labels=1)


def test_interpolate_endpoints_are_the_seeds_images(models):
    g = Generator.load(models["gan"])
    path = g.interpolate(3, 9, 6)
    assert path.shape == (6, 8, 8, 1)
    # slerp endpoints equal the latents up to float rounding: allow one grey level
    assert np.abs(path[0].astype(int) - g.generate(1, seed=3)[0]).max() <= 1
    assert np.abs(path[-1].astype(int) - g.generate(1, seed=9)[0]).max() <= 1


# ----------------------------------------------------------------------------- VAE

def test_vae_encode_decode_reconstruct(models):
    g = Generator.load(models["vae"])
    imgs = g.generate(5, seed=0)
    mean, logvar = g.encode(imgs)
    assert mean.shape == logvar.shape == (5, 8)
    mean2, _ = g.encode(imgs[..., 0])                                            # (N, H, W) gray accepted
    np.testing.assert_array_equal(mean, mean2)
    np.testing.assert_array_equal(g.decode(mean), g.reconstruct(imgs))
    with pytest.raises(EdgegenError, match="must be uint8"):
        g.encode(imgs.astype(np.float32))


def test_conditional_vae_needs_labels(models):
    g = Generator.load(models["cvae"])
    imgs = g.generate(4, seed=0, labels=3)
    rec = g.reconstruct(imgs, labels=np.full(4, 3))
    assert rec.shape == imgs.shape
    with pytest.raises(EdgegenError, match="need the images' labels"):
        g.encode(imgs)


def test_vae_without_encoder_and_gan_without_vae_api(models, tmp_path):
    lone = tmp_path / "lone.onnx"
    lone.write_bytes(models["vae"].read_bytes())
    g = Generator.load(lone)
    assert g.decode(np.zeros((2, 8), np.float32)).shape == (2, 8, 8, 1)
    with pytest.raises(EdgegenError, match="no VAE encoder found"):
        g.encode(np.zeros((1, 8, 8, 1), np.uint8))
    with pytest.raises(EdgegenError, match="VAE only"):
        Generator.load(models["gan"]).decode(np.zeros((1, 8), np.float32))
    with pytest.raises(EdgegenError, match="expected a VAE encoder"):
        Generator.load(lone, encoder=models["gan"])


# ----------------------------------------------------------------------------- torch-free, example

def test_runtime_works_with_torch_unimportable(models):
    code = TORCH_BLOCKER + f"""
import edgegen.runtime
import edgegen.runtime.batch, edgegen.runtime.bench, edgegen.runtime.manifest, edgegen.runtime.pipeline
import edgegen.runtime.ray_engine, edgegen.runtime.stages
from edgegen.runtime import Generator
imgs = Generator.load({str(models['gan'])!r}).generate(16, seed=5)
assert imgs.shape == (16, 8, 8, 1)
try:
    import torch
except ImportError:
    print("blocked-ok", "torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "blocked-ok False" in out.stdout


def test_embed_example(models, tmp_path):
    out = tmp_path / "grid.png"
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "embed.py"), str(models["cond"]), str(out)],
                         capture_output=True, text=True, check=True)
    assert "wrote a 4x4 grid" in res.stdout
    grid = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    assert grid.shape == (32, 32, 3)
    expect = Generator.load(models["cond"]).generate(16, seed=42)
    np.testing.assert_array_equal(grid[:8, 8:16, ::-1], expect[1])            # tile (0, 1) is image 1


# ----------------------------------------------------------------------------- bench

def test_bench_variants_table_and_json(tmp_path, capsys):
    from edgegen.cli import main
    from edgegen.runtime.bench import find_variants

    m = make_decoder(tmp_path / "m.onnx")
    make_decoder(tmp_path / "m.int8.onnx", quantization="int8", seed=1)
    make_decoder(tmp_path / "other.fp16.onnx", quantization="fp16", seed=2)
    assert find_variants(tmp_path / "m.int8.onnx") == {"fp32": m, "int8": tmp_path / "m.int8.onnx"}
    assert set(find_variants(m, fp16=tmp_path / "other.fp16.onnx")) == {"fp32", "int8", "fp16"}
    out = tmp_path / "bench.json"
    assert main(["bench", str(m), "--fp16", str(tmp_path / "other.fp16.onnx"), "--seconds", "0.02",
                 "--threads", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| onnxruntime | int8 | 64 |" in table and "Cold start (m.int8.onnx, torch blocked)" in table
    res = json.loads(out.read_text())
    assert [(r["variant"], r["batch"]) for r in res["rows"]] == [
        ("fp32", 1), ("fp32", 64), ("int8", 1), ("int8", 64), ("fp16", 1), ("fp16", 64)]
    assert all(r["images_per_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"] for r in res["rows"])
    assert res["cold_start"]["torch_loaded"] is False and res["machine"]["cores"] >= 1


@pytest.mark.parametrize("kw,msg", [
    ({"seconds": 0}, "--seconds must be a positive number of seconds, got 0"),
    ({"seconds": -1}, "--seconds must be a positive number of seconds, got -1"),
    ({"seconds": float("inf")}, "--seconds must be a positive number of seconds, got inf"),
    ({"threads": 0}, "--threads must be >= 1, got 0"),
])
def test_bench_refuses_bad_seconds_and_threads(models, kw, msg):
    from edgegen.runtime.bench import run_bench

    with pytest.raises(EdgegenError, match=msg):
        run_bench(models["gan"], **kw)


def test_bench_torch_eager_on_an_exported_run(tmp_path):
    torch = pytest.importorskip("torch")
    from edgegen.export import export_run
    from edgegen.runtime.bench import bench_torch, run_bench
    from edgegen.training.checkpoint import save_checkpoint
    from edgegen.training.models.gan import GANConfig
    from edgegen.training.models.gan import Generator as TorchGenerator

    torch.manual_seed(0)
    cfg = GANConfig(image_size=32, width=8, latent_dim=16)
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / "last.pt", {"kind": "gan", "models": {"G_ema": TorchGenerator(cfg).eval().state_dict()},
                                      "model_config": cfg.to_dict(), "step": 1, "metrics": {},
                                      "data": {"name": "synthetic", "fingerprint": "x", "class_names": []}})
    export_run(run, tmp_path / "g.onnx")
    res = run_bench(tmp_path / "g.onnx", torch_run=run, threads=1, seconds=0.02)
    engines = [(r["engine"], r["variant"], r["batch"]) for r in res["rows"]]
    assert engines == [("pytorch", "eager", 1), ("pytorch", "eager", 64), ("onnxruntime", "fp32", 1),
                       ("onnxruntime", "fp32", 64)]
    with pytest.raises(EdgegenError, match="no such run folder|no checkpoint here"):   # checkpoint.py wording
        bench_torch(tmp_path / "nothing", 1, (1,), 0.01)
