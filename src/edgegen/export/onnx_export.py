"""``edgegen export``: a trained run -> a self-describing, parity-checked fp32 ONNX file.

GAN runs export the EMA generator; VAE runs export the decoder as the generator (with the ex-post
Gaussian folded into its first layer when fitted and asked for) plus the encoder as
``<stem>.encoder.onnx``. Each graph is traced with torch's ONNX exporter (``dynamo=True``,
opset 18, dynamic batch) from the folded modules of :mod:`edgegen.export.fold`; a generator's output
conv is split for speed (:mod:`edgegen.export.layout`, same function). Then the graph is checked:
``onnx.checker``, no BatchNormalization node, standard ops only, parity against the unfolded
PyTorch model on 256 seeded latents (max |ONNX - PyTorch| <= 1e-4 in [-1, 1] units, measured on the
tanh output inside the graph), and batch independence (each of 8 latents run alone gives exactly
its row of the batch). The figures go into the metadata; nothing is written unless all pass.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from edgegen import __version__
from edgegen.errors import EdgegenError
from edgegen.export import layout, onnx_io
from edgegen.export.fold import PixelEncoder, PixelGenerator, fold_encoder, fold_generator, reference_images
from edgegen.modelmeta import ModelMeta
from edgegen.training.checkpoint import LoadedRun, load_run
from edgegen.training.models.gan import Generator
from edgegen.training.models.vae import VAE

OPSET = 18            # torch's dynamo exporter emits 18 natively; >= 17 as the issue asks
PARITY_TOL = 1e-4     # max |ONNX - PyTorch| in [-1, 1] units
PARITY_N, PARITY_SEED = 256, 1234


def export_run(run: str | os.PathLike | LoadedRun, out_path: str | os.PathLike, *, expost: bool = True,
               parity_tol: float = PARITY_TOL) -> ModelMeta:
    """Export a GAN or VAE run to ``out_path`` (and ``<stem>.encoder.onnx`` for a VAE); return its metadata.

    ``run`` is a run folder, a checkpoint file, or an already loaded run. ``expost`` applies a
    VAE's fitted ex-post Gaussian in-graph (ignored for GANs, and for VAEs whose ex-post fit is
    absent; ``meta.sampling`` says what was done). Raises :class:`EdgegenError` (and writes
    nothing) for a run without a usable checkpoint, a classifier run, a missing output folder, or
    a graph that fails the checker, parity or batch-independence checks.
    """
    out = onnx_io.check_output_path(out_path)
    loaded = run if isinstance(run, LoadedRun) else load_run(run)
    if loaded.kind not in ("gan", "vae"):
        raise EdgegenError(f"{loaded.path}: a {loaded.kind} run has no generator to export")
    data = dict(loaded.data)
    class_names = tuple(str(c) for c in data.get("class_names", ()))
    run_dir = loaded.path.parent
    fingerprint, fp_source = _data_fingerprint(run_dir, data)
    common = dict(data_name=str(data.get("name", "")), data_fingerprint=fingerprint, version=__version__)
    extra_common = {"data_fingerprint_source": fp_source, "run_step": loaded.step,
                    "source": f"{run_dir.name}/{loaded.path.name}"}

    if loaded.kind == "gan":
        gen: Generator = loaded.model
        model, meta = _export_generator(gen, gen, expost_used=False, kind="gan", class_names=class_names,
                                        common=common, extra=extra_common, parity_tol=parity_tol)
        onnx_io.write_model(model, out)
        return meta

    vae: VAE = loaded.model
    use_expost = bool(expost and bool(vae.expost_fitted))
    enc_path = out.with_name(out.stem + ".encoder.onnx")
    extra = {**extra_common, "encoder": enc_path.name,
             "expost_available": bool(vae.expost_fitted), "expost_requested": bool(expost)}
    dec_model, dec_meta = _export_generator(vae, vae.decoder, expost_used=use_expost, kind="vae-decoder",
                                            class_names=class_names, common=common, extra=extra,
                                            parity_tol=parity_tol)
    enc_model, _ = _export_encoder(vae, dec_meta, common=common,
                                   extra={**extra_common, "decoder_fingerprint": dec_meta.model_fingerprint})
    onnx_io.write_model(enc_model, enc_path)     # encoder first: the decoder names it
    onnx_io.write_model(dec_model, out)
    return dec_meta


def _data_fingerprint(run_dir: Path, data: dict) -> tuple[str, str]:
    """Fingerprint of the training-set hash index ``train.idx`` when present and readable, else the run's data."""
    idx = run_dir / "train.idx"
    if idx.is_file():
        try:
            from edgegen.safety.index import read_index_fingerprint
        except ImportError:
            pass
        else:
            return str(read_index_fingerprint(idx)), "train.idx"
    return str(data.get("fingerprint", "")), "run-data"


def _trace(module: torch.nn.Module, args: tuple, input_names: list[str], output_names: list[str]) -> onnx.ModelProto:
    """torch.onnx.export (dynamo) with a dynamic batch axis on every input; quiet; returns the ModelProto."""
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    shapes = {name: {0: batch} for name in input_names}
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        logging.getLogger("torch").setLevel(logging.ERROR)
        try:
            prog = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET, input_names=input_names,
                                     output_names=output_names, dynamic_shapes=shapes, external_data=False,
                                     optimize=True, verbose=False)
        except Exception as e:
            raise EdgegenError(f"ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return prog.model_proto


def _finish(model: onnx.ModelProto, meta: ModelMeta, where: str) -> tuple[onnx.ModelProto, ModelMeta]:
    """Check the graph, fingerprint it and stamp the metadata."""
    onnx_io.check_model(onnx_io.strip_debug_info(model), where)
    if any(n.op_type == "BatchNormalization" for n in model.graph.node):
        raise EdgegenError(f"{where}: BatchNormalization left in the graph")
    meta = ModelMeta(**{**meta.__dict__, "model_fingerprint": onnx_io.graph_fingerprint(model)})
    return onnx_io.stamp(model, meta), meta


def _export_generator(model: Generator | VAE, gen: Generator, *, expost_used: bool, kind: str,
                      class_names: tuple[str, ...], common: dict, extra: dict,
                      parity_tol: float) -> tuple[onnx.ModelProto, ModelMeta]:
    """Fold, trace and verify a generator (GAN G_ema or VAE decoder); returns (stamped model, meta)."""
    cfg = gen.cfg
    if cfg.conditional and len(class_names) != cfg.num_classes:
        class_names = tuple(str(i) for i in range(cfg.num_classes))   # run data lacks names: use indices
    affine = (model.expost_mean, model.expost_chol) if expost_used else None
    wrapped = PixelGenerator(fold_generator(gen, affine)).eval()
    example = (torch.zeros(2, cfg.latent_dim),) + ((torch.zeros(2, dtype=torch.long),) if cfg.conditional else ())
    names = ["z", "label"] if cfg.conditional else ["z"]
    proto = layout.split_output_conv(_trace(wrapped, example, names, ["image"]))   # faster, same function

    meta = ModelMeta(kind=kind, latent_dim=cfg.latent_dim, image_size=cfg.image_size, channels=cfg.channels,
                     class_names=class_names if cfg.conditional else (), conditional=cfg.conditional,
                     sampling="expost" if expost_used else "prior", **common)
    figures = _verify_generator(model, proto, meta, expost_used, parity_tol)
    if getattr(cfg, "cluster_freq", None):   # self-conditioned GAN: z's last coordinate draws the cluster
        extra = {**extra, "clusters": len(cfg.cluster_freq)}
    meta = ModelMeta(**{**meta.__dict__, "parity_max_abs": figures.pop("parity_max_abs"),
                        "extra": {**extra, **figures, "macs_per_image": _macs(gen), "opset": OPSET}})
    return _finish(proto, meta, kind)


def _verify_generator(model: Generator | VAE, proto: onnx.ModelProto, meta: ModelMeta, expost_used: bool,
                      parity_tol: float) -> dict:
    """Parity on 256 seeded latents (tanh output vs unfolded PyTorch) and batch independence."""
    z, labels = onnx_io.seeded_latents(meta, PARITY_N, PARITY_SEED)
    probe, tanh_name = onnx_io.with_extra_output(proto, "Tanh")
    sess = onnx_io.session(probe, threads=1)
    pixels, x = onnx_io.run_batched(sess, meta, z, labels, batch=PARITY_N, outputs=["image", tanh_name])
    ref = reference_images(model, torch.from_numpy(z), None if labels is None else torch.from_numpy(labels),
                           expost_used).numpy()                               # (N, C, H, W) in [-1, 1]
    err = float(np.abs(x - ref).max())
    if not err <= parity_tol:   # also catches NaN
        raise EdgegenError(f"export parity failed: max |ONNX - PyTorch| = {err:.2e} > {parity_tol:.0e}")
    ref_px = np.clip(np.round((ref + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    if pixels.shape != (PARITY_N, meta.image_size, meta.image_size, meta.channels) or pixels.dtype != np.uint8:
        raise EdgegenError(f"exported graph outputs {pixels.dtype} {pixels.shape}, expected uint8 NHWC")
    # Batch independence: each of the first 8 latents alone must give exactly its row of the batch.
    for i in range(8):
        alone = sess.run(["image"], onnx_io.feeds(meta, z[i:i + 1], None if labels is None else labels[i:i + 1]))[0]
        if not np.array_equal(alone[0], pixels[i]):
            raise EdgegenError(f"exported graph is not batch independent (row {i} differs when run alone)")
    return {"parity_max_abs": err, "parity_n": PARITY_N, "parity_seed": PARITY_SEED,
            "parity_pixels_equal": float(np.mean(pixels == ref_px)), "batch_independent": True}


def _export_encoder(vae: VAE, dec_meta: ModelMeta, *, common: dict, extra: dict) -> tuple[onnx.ModelProto, ModelMeta]:
    """Fold, trace and verify the VAE encoder: uint8 NHWC images [+ label] -> mean, logvar."""
    cfg = vae.cfg
    wrapped = PixelEncoder(fold_encoder(vae.encoder)).eval()
    s, c = cfg.image_size, cfg.channels
    example = (torch.zeros(2, s, s, c, dtype=torch.uint8),) + ((torch.zeros(2, dtype=torch.long),)
                                                               if cfg.conditional else ())
    names = ["image", "label"] if cfg.conditional else ["image"]
    proto = _trace(wrapped, example, names, ["mean", "logvar"])

    # Parity on 256 seeded pixel images (the decoder's own outputs would do too; noise covers more range).
    rng = np.random.default_rng(PARITY_SEED)
    images = rng.integers(0, 256, (PARITY_N, s, s, c), dtype=np.uint8)
    labels = (np.arange(PARITY_N) % cfg.num_classes).astype(np.int64) if cfg.conditional else None
    feed = {"image": images, **({"label": labels} if cfg.conditional else {})}
    mean, logvar = onnx_io.session(proto).run(["mean", "logvar"], feed)
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        ref_m, ref_lv = vae.encoder.eval()(x, None if labels is None else torch.from_numpy(labels))
    err = max(float(np.abs(mean - ref_m.numpy()).max()), float(np.abs(logvar - ref_lv.numpy()).max()))
    scale = max(1.0, float(np.abs(ref_m.numpy()).max()), float(np.abs(ref_lv.numpy()).max()))
    if not err <= PARITY_TOL * scale:   # relative to the outputs' magnitude: they are not bounded like pixels
        raise EdgegenError(f"encoder export parity failed: max |ONNX - PyTorch| = {err:.2e}")
    meta = ModelMeta(kind="vae-encoder", latent_dim=cfg.latent_dim, image_size=s, channels=c,
                     output_dtype="float32", output_range=(-3.4e38, 3.4e38), output_layout="NL",
                     class_names=dec_meta.class_names, conditional=cfg.conditional, parity_max_abs=err,
                     extra={**extra, "inputs": "image uint8 NHWC" + (" + label int64" if cfg.conditional else ""),
                            "outputs": "mean, logvar float32 (N, latent)", "parity_n": PARITY_N, "opset": OPSET},
                     **common)
    return _finish(proto, meta, "vae-encoder")


def _macs(gen: Generator) -> int:
    """Multiply-adds per image of the generator's Linear and Conv layers (the work int8 kernels do)."""
    total = 0
    side = gen.s0
    total += gen.fc.in_features * gen.fc.out_features
    for block in gen.blocks:
        conv = block.conv
        if block.mode == "nearest":
            side *= 2
            total += conv.in_channels * conv.out_channels * 9 * side * side
        else:   # conv at low resolution, then depth-to-space doubles the side
            total += conv.in_channels * conv.out_channels * 9 * side * side
            side *= 2
    total += gen.out.in_channels * gen.out.out_channels * 9 * side * side
    return int(total)
