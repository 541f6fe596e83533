"""Export: tiny seeded GAN/VAE runs -> ONNX; parity, batch independence, contract, metadata, bad input, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgegen.cli import main
from edgegen.errors import EdgegenError
from edgegen.export import export_run
from edgegen.export.fold import to_pixels
from edgegen.modelmeta import ModelMeta
from edgegen.training.checkpoint import save_checkpoint
from edgegen.training.models.gan import GANConfig, Generator, recompute_bn_stats
from edgegen.training.models.vae import VAE, VAEConfig

CLASSES = [f"class{i}" for i in range(4)]


def make_gan_run(root: Path, num_classes: int = 0, seed: int = 0, upsample: str = "nearest",
                 act_clip: float = 0.0) -> tuple[Path, Generator]:
    """A run folder holding a tiny random generator with non-trivial BN statistics."""
    torch.manual_seed(seed)
    cfg = GANConfig(image_size=32, width=8, latent_dim=16, num_classes=num_classes, upsample=upsample,
                    act_clip=act_clip)
    gen = Generator(cfg)
    with torch.no_grad():   # non-identity BN affine so folding is really exercised
        for m in gen.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    recompute_bn_stats(gen, batches=2, batch_size=64, seed=seed)
    gen.eval()
    run = root / f"gan{num_classes}{upsample}{act_clip or ''}"
    run.mkdir()
    data = {"name": "synthetic", "fingerprint": "fp-gan", "class_names": CLASSES[:num_classes] if num_classes else []}
    save_checkpoint(run / "last.pt", {"kind": "gan", "models": {"G_ema": gen.state_dict()},
                                      "model_config": cfg.to_dict(), "data": data, "step": 7, "metrics": {}})
    return run, gen


def make_vae_run(root: Path, num_classes: int = 4, fit: bool = True) -> tuple[Path, VAE]:
    torch.manual_seed(1)
    cfg = VAEConfig(image_size=32, width=8, latent_dim=8, num_classes=num_classes)
    vae = VAE(cfg)
    vae.train()
    with torch.no_grad():   # a few forward passes in train mode give the BN layers real statistics
        for _ in range(3):
            vae(torch.rand(64, 1, 32, 32) * 2 - 1, torch.arange(64) % num_classes if num_classes else None)
    vae.eval()
    if fit:
        vae.fit_expost(torch.rand(200, 1, 32, 32) * 2 - 1, torch.arange(200) % num_classes if num_classes else None)
    run = root / "vae"
    run.mkdir()
    data = {"name": "synthetic", "fingerprint": "fp-vae", "class_names": CLASSES[:num_classes]}
    save_checkpoint(run / "last.pt", {"kind": "vae", "models": {"vae": vae.state_dict()},
                                      "model_config": cfg.to_dict(), "data": data, "step": 3, "metrics": {}})
    return run, vae


@pytest.fixture(scope="module")
def gan(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_gan")
    run, gen = make_gan_run(root)
    meta = export_run(run, root / "g.onnx")
    return root / "g.onnx", meta, gen


@pytest.fixture(scope="module")
def cgan(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_cgan")
    run, gen = make_gan_run(root, num_classes=4, upsample="pixelshuffle")
    meta = export_run(run, root / "c.onnx")
    return root / "c.onnx", meta, gen


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_vae")
    run, model = make_vae_run(root)
    meta = export_run(run, root / "v.onnx")
    return root / "v.onnx", meta, model, run


def _sess(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_gan_graph_contract(gan):
    path, meta, _ = gan
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert next(o.version for o in model.opset_import if o.domain == "") >= 17
    (z,), (image,) = model.graph.input, model.graph.output
    assert (z.name, image.name) == ("z", "image")
    assert z.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert z.type.tensor_type.shape.dim[0].dim_param                # dynamic batch axis
    assert z.type.tensor_type.shape.dim[1].dim_value == 16


def test_gan_parity_and_batch_independence(gan):
    path, meta, gen = gan
    assert 0 <= meta.parity_max_abs <= 1e-4 and meta.extra["parity_n"] == 256
    sess = _sess(path)
    z = np.random.default_rng(5).standard_normal((37, 16)).astype(np.float32)
    batch = sess.run(None, {"z": z})[0]
    assert batch.shape == (37, 32, 32, 1) and batch.dtype == np.uint8
    for i in (0, 17, 36):                                           # odd batch sizes, rows run alone
        assert np.array_equal(sess.run(None, {"z": z[i:i + 1]})[0][0], batch[i])
    assert np.array_equal(sess.run(None, {"z": z[3:9]})[0], batch[3:9])
    with torch.no_grad():
        ref = to_pixels(gen(torch.from_numpy(z))).numpy()          # the unfolded model, eval mode
    assert np.abs(ref.astype(int) - batch.astype(int)).max() <= 1   # a rounding boundary at most
    assert np.mean(ref == batch) > 0.999
    assert batch.std() > 5                                          # not a constant image


def test_metadata_round_trip_through_onnxruntime(gan):
    path, meta, _ = gan
    props = _sess(path).get_modelmeta().custom_metadata_map
    back = ModelMeta.from_props(props)
    assert back == meta
    assert (back.kind, back.latent_dim, back.image_shape, back.quantization) == ("gan", 16, (32, 32, 1), "fp32")
    assert (back.output_dtype, back.output_range, back.output_layout) == ("uint8", (0.0, 255.0), "NHWC")
    assert back.data_name == "synthetic" and back.data_fingerprint == "fp-gan"
    assert back.extra["data_fingerprint_source"] == "run-data" and back.extra["run_step"] == 7
    assert len(back.model_fingerprint) == 16 and not back.conditional


def test_conditional_pixelshuffle_gan(cgan):
    path, meta, gen = cgan
    assert meta.conditional and meta.class_names == tuple(CLASSES)
    assert "DepthToSpace" in {n.op_type for n in onnx.load(path).graph.node}
    sess = _sess(path)
    z = np.random.default_rng(2).standard_normal((8, 16)).astype(np.float32)
    labels = np.arange(8, dtype=np.int64) % 4
    out = sess.run(None, {"z": z, "label": labels})[0]
    other = sess.run(None, {"z": z, "label": (labels + 1) % 4})[0]
    assert not np.array_equal(out, other)                           # the label matters
    with torch.no_grad():
        ref = to_pixels(gen(torch.from_numpy(z), torch.from_numpy(labels))).numpy()
    assert np.abs(ref.astype(int) - out.astype(int)).max() <= 1
    assert np.array_equal(sess.run(None, {"z": z[5:6], "label": labels[5:6]})[0][0], out[5])


def test_vae_decoder_expost_and_encoder(vae):
    path, meta, model, _ = vae
    assert meta.kind == "vae-decoder" and meta.sampling == "expost" and meta.parity_max_abs <= 1e-4
    enc_path = path.with_name("v.encoder.onnx")
    assert meta.extra["encoder"] == enc_path.name and enc_path.is_file()
    eps = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    labels = np.arange(6, dtype=np.int64) % 4
    img = _sess(path).run(None, {"z": eps, "label": labels})[0]
    with torch.no_grad():   # ex-post Gaussian applied in-graph: decode(mean + eps @ chol^T)
        zt = model.sample_latent(torch.from_numpy(eps), True)
        ref = to_pixels(model.decoder(zt, torch.from_numpy(labels))).numpy()
    assert np.abs(ref.astype(int) - img.astype(int)).max() <= 1
    enc = _sess(enc_path)
    emeta = ModelMeta.from_props(enc.get_modelmeta().custom_metadata_map)
    assert emeta.kind == "vae-encoder" and emeta.extra["decoder_fingerprint"] == meta.model_fingerprint
    assert [i.name for i in enc.get_inputs()] == ["image", "label"]
    mean, logvar = enc.run(["mean", "logvar"], {"image": img, "label": labels})
    with torch.no_grad():
        x = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 127.5 - 1
        rm, rl = model.encoder(x, torch.from_numpy(labels))
    assert np.abs(mean - rm.numpy()).max() < 1e-4 and np.abs(logvar - rl.numpy()).max() < 1e-4


def test_vae_prior_when_asked(vae, tmp_path):
    _, _, model, run = vae
    meta = export_run(run, tmp_path / "p.onnx", expost=False)
    assert meta.sampling == "prior" and meta.extra["expost_available"]
    eps = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    labels = np.zeros(4, dtype=np.int64)
    img = _sess(tmp_path / "p.onnx").run(None, {"z": eps, "label": labels})[0]
    with torch.no_grad():
        ref = to_pixels(model.decoder(torch.from_numpy(eps), torch.from_numpy(labels))).numpy()
    assert np.abs(ref.astype(int) - img.astype(int)).max() <= 1


def test_bad_inputs_write_nothing(tmp_path, gan):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(EdgegenError, match="no checkpoint"):
        export_run(empty, tmp_path / "a.onnx")
    run, _ = make_gan_run(tmp_path)
    with pytest.raises(EdgegenError, match="does not exist"):
        export_run(run, tmp_path / "missing" / "a.onnx")
    (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:500])      # truncated checkpoint
    with pytest.raises(EdgegenError, match="not a readable"):
        export_run(run, tmp_path / "a.onnx")
    assert not (tmp_path / "a.onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_cli_round_trip(tmp_path, capsys):
    run, _ = make_gan_run(tmp_path, seed=3)
    out = tmp_path / "cli.onnx"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert "parity" in capsys.readouterr().out
    assert ModelMeta.from_props(_sess(out).get_modelmeta().custom_metadata_map).kind == "gan"
    assert main(["quantize", str(out), "--mode", "fp16", "--out", str(tmp_path / "h.onnx")]) == 0
    assert "fp16" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgegen: error:") and "\n" not in err
    assert not (tmp_path / "x.onnx").exists()


def test_file_that_is_not_a_run_is_one_safe_line(tmp_path, capsys):
    """A run argument that is some other file (an ONNX model, a pickle with code) is named in one line,
    with no advice to load it with weights_only=False."""
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    onnx_file = tmp_path / "bad.onnx"
    onnx_file.write_bytes(b"\x08\x07junk that is not a checkpoint")
    evil = tmp_path / "evil.pt"
    torch.save({"kind": "gan", "models": Evil()}, evil)
    for path in (onnx_file, evil):
        assert main(["export", str(path), "--out", str(tmp_path / "t.onnx")]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"edgegen: error: {path}: not a readable edgegen checkpoint (damaged, another kind of file, " \
                      "or holding code)"
    assert not (tmp_path / "t.onnx").exists()
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "t.onnx")]) == 2
    assert "no such run folder or checkpoint file" in capsys.readouterr().err
