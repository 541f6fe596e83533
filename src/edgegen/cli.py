"""The ``edgegen`` command: one subcommand per job, each a thin layer over the library.

Stage imports happen inside the handlers, so ``edgegen generate`` never imports torch and
start-up stays fast. Every :class:`EdgegenError` (and any OSError: disk full, permissions) becomes one
line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from edgegen import __version__
from edgegen.errors import EdgegenError


def _output(path: str | None, suffix: str, option: str) -> str | None:
    """Refuse an output file name without ``suffix``: a mistyped path must not overwrite an input
    (a checkpoint, an image, the index being read) with a file of another kind."""
    if path is not None and not path.lower().endswith(suffix):
        raise EdgegenError(f"{option} {path}: expected a {suffix} file name")
    return path


# ----------------------------------------------------------------------------- training


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="fashion-mnist",
                   help="fashion-mnist, a folder of IDX files, an IDX file, or a folder of images")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of stopping")


def _cmd_train(args: argparse.Namespace) -> int:
    from edgegen.training.train import TrainOptions, train

    opts = TrainOptions(
        kind=args.kind, data=args.data, out=args.out, minutes=args.minutes, epochs=args.epochs,
        seed=args.seed, size=args.size, channels=args.channels, conditional=args.conditional,
        batch_size=args.batch_size, device=args.device, resume=args.resume, skip_bad=args.skip_bad,
        checkpoint_minutes=args.checkpoint_minutes, width=args.width, latent_dim=args.latent_dim,
        lr=args.lr, beta=args.beta, mode_seeking=args.mode_seeking, upsample=args.upsample,
        act_clip=args.act_clip, clusters=args.clusters, progress=not args.quiet,
    )
    train(opts)
    return 0


def _existing_target(value: str):
    """A folder or model file that exists, or the file of the bundled model named ``value`` (:func:`_model_arg`)."""
    try:
        path = _model_arg(value)
    except EdgegenError:                     # not a bundled name either
        path = None
    if path is None or not path.exists():
        raise EdgegenError(f"{value}: no such folder, model file or bundled model")
    return path


def _cmd_eval(args: argparse.Namespace) -> int:
    from edgegen.training.evaluate import evaluate_target

    _output(args.json, ".json", "--json")
    report = evaluate_target(str(_existing_target(args.target)), n=args.n, seed=args.seed, data=args.data,
                             classifier=args.classifier, label=args.label)
    print(report.format())
    if args.json:
        from edgegen.fileio import write_json_atomic
        write_json_atomic(args.json, report.to_dict())
    return 0


# ----------------------------------------------------------------------------- export


def _cmd_export(args: argparse.Namespace) -> int:
    from edgegen.export.onnx_export import export_run

    meta = export_run(args.run, _output(args.out, ".onnx", "--out"), expost=not args.prior)
    extra = f", encoder {meta.extra['encoder']}" if meta.kind == "vae-decoder" else ""
    print(f"wrote {args.out}: {meta.kind}, {meta.image_size}x{meta.image_size}x{meta.channels}, "
          f"parity {meta.parity_max_abs:.1e}, sampling {meta.sampling}{extra}")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from edgegen.export.quantize import quantize_model

    meta = quantize_model(args.model, _output(args.out, ".onnx", "--out"), mode=args.mode, force=args.force)
    g = meta.extra.get("gates", {})
    figures = [f"median PSNR {g['psnr_median_db']:.1f} dB", f"{100 * g['within_2_frac']:.2f} % of pixels within 2/255"]
    if "fcd_change_rel" in g:
        figures.append(f"FCD change {100 * g['fcd_change_rel']:+.1f} %")
    if "int8_img_s_b64" in g:
        figures.append(f"{g['int8_img_s_b64']:.0f} vs {g['fp32_img_s_b64']:.0f} img/s fp32 at batch 64")
    figures.append(f"{g['size_ratio_vs_fp32']:.2f}x smaller")
    verdict = "gates passed" if g.get("passed") else "GATES FAILED (kept by --force): " + "; ".join(g.get("failed", []))
    print(f"wrote {args.out}: {meta.quantization}; {', '.join(figures)}; {verdict}")
    return 0


# ----------------------------------------------------------------------------- runtime


def _model_arg(value: str | None):
    """A model file, or the name of a bundled model (default: the bundled GAN)."""
    from pathlib import Path

    from edgegen.runtime import default_model_path

    if value is None:
        return default_model_path("gan")
    if Path(value).exists() or value.endswith(".onnx") or "/" in value:
        return Path(value)
    return default_model_path(value)


def _generate_stages(args: argparse.Namespace, model) -> tuple:
    """Watermark stage from --key / $EDGEGEN_WATERMARK_KEY (required unless --no-watermark)."""
    if args.no_watermark:
        if args.key:
            raise EdgegenError("--key given but --no-watermark asks for no mark")
        return ()
    from edgegen.fileio import sha256_hex
    from edgegen.runtime.stages import WatermarkStage, default_payload
    from edgegen.safety.keys import load_key

    key = load_key(args.key)
    payload = args.payload if args.payload is not None else default_payload(sha256_hex(model.read_bytes()))
    return (WatermarkStage(key, payload),)


def _audit_stages(args: argparse.Namespace) -> tuple:
    """Audit stage from --audit INDEX (--on-copy, --audit-fpr); runs after the watermark (audits written pixels)."""
    if not args.audit:
        if args.on_copy != "flag" or args.audit_fpr is not None:
            raise EdgegenError("--on-copy / --audit-fpr need --audit INDEX")
        return ()
    if args.audit_fpr is not None and not 0.0 < args.audit_fpr < 1.0:
        raise EdgegenError(f"--audit-fpr must be between 0 and 1, got {args.audit_fpr}")
    from pathlib import Path

    from edgegen.runtime.stages import AuditStage

    if not Path(args.audit).is_file():
        raise EdgegenError(f"--audit {args.audit}: no such index file")
    return (AuditStage(args.audit, on_copy=args.on_copy, fpr=args.audit_fpr),)


def _cmd_generate(args: argparse.Namespace) -> int:
    from edgegen.runtime.pipeline import run_generate

    if args.actors is not None and args.engine != "ray":
        raise EdgegenError("--actors needs --engine ray")
    if args.model_name and args.model:
        raise EdgegenError(f"two models given ({args.model} and --model {args.model_name}); give one")
    model = _model_arg(args.model_name or args.model)
    if not model.is_file():
        raise EdgegenError(f"{model}: no such model file")
    if args.n <= 0:
        raise EdgegenError(f"-n must be a positive integer, got {args.n}")
    res = run_generate(model, args.out, args.n, seed=args.seed, cls=args.cls, fmt=args.format,
                       batch_size=args.batch, threads=args.threads, shard_size=args.shard_size,
                       stages=_generate_stages(args, model) + _audit_stages(args), engine=args.engine,
                       ray_address=args.ray_address,
                       num_actors=1 if args.actors is None else args.actors, progress=not args.quiet)
    resumed = f" ({res.resumed_images} already done)" if res.resumed_images else ""
    print(f"wrote {res.new_images} images to {res.out}{resumed} at {res.images_per_s:.0f} img/s; "
          f"manifest {res.out / 'manifest.jsonl'}")
    if res.redone_images:
        print(f"redid {res.redone_images} images whose files were missing or damaged (first: {res.redo_reason})")
    if args.audit:
        import json

        s = json.loads((res.out / "audit.json").read_text())
        print(f"audit: {s['flagged']} of {s['images']} images flagged as training copies "
              f"({100 * s['flagged_fraction']:.2f}%, expected {100 * s['expected_fraction']:.2f}%; "
              f"excess p={s['excess_p_value']:.3g}); {s['blank']} blank; {s['dropped']} dropped; "
              f"summary {res.out / 'audit.json'}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from edgegen.runtime.catalogue import bundled_models

    models = bundled_models()
    if not models:
        print("this installation bundles no pretrained models (make models builds them)")
    for m in models:
        print(m.summary())
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from edgegen.fileio import write_json_atomic
    from edgegen.runtime.bench import format_table, run_bench

    model = _model_arg(args.model)
    _output(args.json, ".json", "--json")
    res = run_bench(model, torch_run=args.torch, threads=args.threads, seconds=args.seconds,
                    fp32=args.fp32, int8=args.int8, fp16=args.fp16)
    m = res["machine"]
    print(f"{m['cpu']}, {m['cores']} cores ({', '.join(m['isa'])}), onnxruntime {m['onnxruntime']}, "
          f"{res['threads']} threads")
    print(format_table(res))
    if args.json:
        write_json_atomic(args.json, res)
    return 0


# ----------------------------------------------------------------------------- watermark


def _cmd_keygen(args: argparse.Namespace) -> int:
    from edgegen.safety.keys import key_fingerprint, write_key

    key = write_key(args.out, overwrite=args.force)
    print(f"wrote watermark key {key_fingerprint(key)} to {args.out} (keep it secret; mode 0600)")
    return 0


def _cmd_watermark_embed(args: argparse.Namespace) -> int:
    from edgegen.safety.wmfiles import embed_files

    embed_files(args.images, args.out, key_path=args.key, payload=args.payload, force=args.force)
    return 0


def _cmd_watermark_detect(args: argparse.Namespace) -> int:
    from edgegen.safety.wmfiles import detect_files

    return detect_files(args.images, key_path=args.key, threshold=args.threshold)


# ----------------------------------------------------------------------------- memorization audit


def _cmd_index_build(args: argparse.Namespace) -> int:
    from edgegen.safety.index import build_index
    from edgegen.training.data import load_dataset

    _output(args.out, ".idx", "--out")
    if args.heldout_n is not None and args.heldout_n < 1:
        raise EdgegenError(f"--heldout-n must be a positive number of images, got {args.heldout_n}")
    train = load_dataset(args.data, "train", args.size, args.channels, args.skip_bad)
    held = load_dataset(args.data, "test", args.size, args.channels, args.skip_bad)
    if args.heldout_n is not None:
        held = held.subset(args.heldout_n, seed=0)
    index = build_index(train, held, args.out, fpr=args.fpr)
    cal = index.calibration
    print(f"{args.out}: {len(index)} training images of {train.name}, fingerprint {index.fingerprint}; "
          f"calibrated on {cal['n']} held-out images: threshold {cal['threshold']:.4f} at --fpr {cal['fpr']}")
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from edgegen.safety import report
    from edgegen.safety.audit import Auditor
    from edgegen.safety.index import HashIndex
    from edgegen.safety.sources import model_batches, read_folder

    _output(args.report, ".html", "--report")
    _output(args.json, ".json", "--json")
    target = _existing_target(args.target)
    if target.is_dir() and args.n is not None:
        raise EdgegenError(f"-n applies when auditing a model; {target} is a folder (every image is audited)")
    n = 10_000 if args.n is None else args.n
    if n < 1:
        raise EdgegenError(f"-n must be a positive number of images, got {n}")
    index = HashIndex.load(args.index)
    auditor = Auditor(index, fpr=args.fpr)
    if target.is_dir():
        names, images, skipped = read_folder(target, index.image_shape, args.skip_bad)
        batches = [(names, images)]
    else:
        batches, skipped = model_batches(target, index, n, args.seed), []
    sources: list[str] = []
    for names, images in batches:
        auditor.audit(images)
        sources += names
    if args.json:
        report.write_json(args.json, report.report_dict(auditor, sources))
    report.write_html(args.report, auditor, sources, title=f"edgegen memorization audit: {target.name}")
    s = auditor.summary()
    dc = s["data_copying"]
    ct = "n/a" if dc["statistic"] is None else f"{dc['statistic']:.2f} (p={dc['p_value']:.3g})"
    print(f"{s['flagged']} of {s['images']} images flagged as training copies "
          f"({100 * s['flagged_fraction']:.2f}%, expected {100 * s['expected_fraction']:.2f}% at --fpr {s['fpr']}; "
          f"excess p={s['excess_p_value']:.3g}); {s['blank']} blank; data-copying C_T {ct}"
          + (f"; {len(skipped)} unreadable files skipped" if skipped else "") + f"; report: {args.report}")
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgegen", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"edgegen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a GAN, VAE or the evaluation classifier")
    p.add_argument("kind", choices=["gan", "vae", "classifier"],
                   help="what to train: a GAN or VAE generator, or the evaluation classifier")
    _add_data_args(p)
    p.add_argument("--out", required=True, help="run folder (checkpoints, samples, metrics)")
    p.add_argument("--minutes", type=float, help="training time budget (wall clock, across resumes)")
    p.add_argument("--epochs", type=float, help="training length in passes over the data")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data order and noise (default 0)")
    p.add_argument("--size", type=int, default=32, choices=[28, 32, 64], help="image side in pixels (default 32)")
    p.add_argument("--channels", type=int, choices=[1, 3], help="default: the data's channels")
    p.add_argument("--conditional", action="store_true", help="class-conditional model")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size (default 64)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--checkpoint-minutes", type=float, default=2.0, help="minutes between checkpoints (default 2)")
    p.add_argument("--width", type=int, help="model width (channels of the last block)")
    p.add_argument("--latent-dim", type=int, help="size of z (default 64 for a GAN, 32 for a VAE)")
    p.add_argument("--lr", type=float, help="learning rate (default 2e-4 GAN, 1e-3 VAE, 2e-3 classifier)")
    p.add_argument("--beta", type=float, default=1.0, help="VAE KL weight")
    p.add_argument("--mode-seeking", type=float,
                   help="GAN: weight of the mode-seeking term (MSGAN) that keeps samples diverse "
                        "(default 0.2 with --conditional, where a GAN collapses without it; else 0)")
    p.add_argument("--upsample", choices=["nearest", "pixelshuffle"], default="nearest",
                   help="GAN up-blocks: nearest resize + conv (default) or conv + pixel shuffle")
    p.add_argument("--act-clip", type=float,
                   help="GAN: cap of the generator's ReLUs, so its int8 export keeps more precision "
                        "(default 3; 0: plain ReLUs)")
    p.add_argument("--clusters", type=int, default=0,
                   help="GAN: self-condition on this many clusters of the training images, found without "
                        "labels; the model stays unconditional (default 0: off)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="measure sample quality (FCD, KID, precision/recall, class balance)")
    p.add_argument("target", help="run folder, ONNX model, bundled model name, or folder of images")
    p.add_argument("--data", default="fashion-mnist", help="reference data (its test split)")
    p.add_argument("-n", type=int, help="samples to draw from a run or model (default 10,000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples drawn (default 0)")
    p.add_argument("--classifier", help="classifier checkpoint (default: the bundled Fashion-MNIST one)")
    p.add_argument("--label", type=int, help="only this class (conditional models)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("export", help="export a trained GAN/VAE run to a self-describing ONNX file")
    p.add_argument("run", metavar="RUN_DIR", help="run folder (or checkpoint .pt)")
    p.add_argument("--out", required=True, help="output .onnx (a VAE also writes <stem>.encoder.onnx)")
    p.add_argument("--prior", action="store_true", help="VAE: sample from the N(0, I) prior even when ex-post is fitted")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("quantize", help="int8 or fp16 copy of an exported model, behind quality and speed gates")
    p.add_argument("model", metavar="MODEL", help="fp32 .onnx written by edgegen export")
    p.add_argument("--mode", choices=["int8", "fp16"], default="int8",
                   help="int8 (default): static QDQ, about 4x smaller and 2x faster than fp32; "
                        "fp16: float16 weights, 2x smaller")
    p.add_argument("--out", required=True, help="output .onnx")
    p.add_argument("--force", action="store_true", help="write the model even when a gate fails")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("generate", help="generate N images with a manifest (resumable; no torch)")
    p.add_argument("model", metavar="MODEL", nargs="?", help="edgegen .onnx file or bundled model name (default: gan)")
    p.add_argument("--model", dest="model_name", help="bundled model name (gan, conditional, vae) or file")
    p.add_argument("-n", type=int, required=True, help="number of images")
    p.add_argument("--out", required=True, help="output folder (new, empty, or this run's to resume)")
    p.add_argument("--batch", type=int, default=256, help="inference batch size (speed only; default 256)")
    p.add_argument("--seed", type=int, default=0, help="image i comes from latent (seed, i)")
    p.add_argument("--class", dest="cls", metavar="NAME|INDEX", help="class of a conditional model")
    p.add_argument("--threads", type=int, help="onnxruntime threads (default: all cores)")
    p.add_argument("--format", choices=["png", "npz"], default="png", help="PNG files or one .npz per shard")
    p.add_argument("--shard-size", type=int, default=1024, help="images per atomic shard (default 1024)")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="run here (default), or spread the shards over a Ray cluster's actors")
    p.add_argument("--ray-address", help="Ray cluster address (default: start or join a local Ray)")
    p.add_argument("--actors", type=int, help="Ray actors, each with its own session (default 1)")
    p.add_argument("--key", help="watermark key file (default: $EDGEGEN_WATERMARK_KEY)")
    p.add_argument("--payload", type=int, help="16-bit watermark payload (default: from the model fingerprint)")
    p.add_argument("--no-watermark", action="store_true", help="do not mark the images (on purpose)")
    p.add_argument("--audit", metavar="INDEX", help="audit each image against this training-set index (train.idx)")
    p.add_argument("--on-copy", choices=["flag", "drop"], default="flag",
                   help="flagged training copies: record only (flag) or also leave them unwritten (drop)")
    p.add_argument("--audit-fpr", type=float, help="false-flag rate of the audit (default: the index's calibration)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("models", help="list the bundled pretrained models with their quality figures")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("keygen", help="make a secret watermark key file (mode 0600)")
    p.add_argument("--out", required=True, help="key file to create")
    p.add_argument("--force", action="store_true", help="replace an existing key file (marks made with it become unreadable)")
    p.set_defaults(func=_cmd_keygen)

    p = sub.add_parser("watermark", help="embed or detect the keyed invisible watermark in image files")
    wsub = p.add_subparsers(dest="watermark_command", required=True, metavar="ACTION")
    q = wsub.add_parser("embed", help="write marked copies of images (PNG) into a folder")
    q.add_argument("images", nargs="+", metavar="IMAGE", help="image files (grey or RGB)")
    q.add_argument("--out", required=True, help="output folder (created if missing)")
    q.add_argument("--key", help="key file (default: $EDGEGEN_WATERMARK_KEY)")
    q.add_argument("--payload", type=int, default=0, help="16-bit payload to carry (default 0)")
    q.add_argument("--force", action="store_true", help="replace marked files already in --out")
    q.set_defaults(func=_cmd_watermark_embed)
    q = wsub.add_parser("detect", help="check images for the mark; one JSON line per file")
    q.add_argument("images", nargs="+", metavar="IMAGE|DIR", help="image files or folders of images")
    q.add_argument("--key", help="key file (default: $EDGEGEN_WATERMARK_KEY)")
    q.add_argument("--threshold", type=float, default=1e-6, help="p-value at or below which a file counts as marked")
    q.set_defaults(func=_cmd_watermark_detect)

    p = sub.add_parser("bench", help="images/s and latency of a model's fp32/int8/fp16 variants (and PyTorch)")
    p.add_argument("model", metavar="MODEL", nargs="?", help="edgegen .onnx file or bundled model name")
    p.add_argument("--torch", metavar="RUN_DIR", help="also time PyTorch eager on this run (imports torch)")
    p.add_argument("--fp32", help="fp32 file (default: sibling <base>.onnx / <base>.fp32.onnx)")
    p.add_argument("--int8", help="int8 file (default: sibling <base>.int8.onnx)")
    p.add_argument("--fp16", help="fp16 file (default: sibling <base>.fp16.onnx)")
    p.add_argument("--threads", type=int, help="threads for every engine (default: all cores)")
    p.add_argument("--seconds", type=float, default=1.0, help="timing per row (default 1 s)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("index", help="training-set perceptual-hash index for the memorization audit")
    isub = p.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    q = isub.add_parser("build", help="hash the training split and calibrate on the test split")
    _add_data_args(q)
    q.add_argument("--out", required=True, help="index file to write (e.g. train.idx)")
    q.add_argument("--fpr", type=float, default=0.01, help="false-flag rate on held-out images (default 0.01)")
    q.add_argument("--size", type=int, help="resize images to this side (default: the data's own)")
    q.add_argument("--channels", type=int, choices=[1, 3], help="default: the data's channels")
    q.add_argument("--heldout-n", type=int, help="calibrate on this many test images (default: all)")
    q.set_defaults(func=_cmd_index_build)

    p = sub.add_parser("audit", help="flag generated images that copy training images (HTML + JSON report)")
    p.add_argument("target", help="folder of images, or a model (.onnx file or bundled name) to sample from")
    p.add_argument("--index", required=True, help="training-set index (edgegen index build)")
    p.add_argument("--report", required=True, help="HTML report to write")
    p.add_argument("--json", help="also write the figures and per-image scores as JSON")
    p.add_argument("--fpr", type=float, help="false-flag rate (default: the index's calibration)")
    p.add_argument("-n", type=int, help="images to generate when auditing a model (default 10,000)")
    p.add_argument("--seed", type=int, default=0, help="latent seed when auditing a model")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable files in the folder")
    p.set_defaults(func=_cmd_audit)

    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``edgegen`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EdgegenError as e:
        print(f"edgegen: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:      # the environment failed (disk full, permissions...): one line, not a traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"edgegen: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgegen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
