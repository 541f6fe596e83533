"""The ``edgegen`` command: one subcommand per job, each a thin layer over the library.

Stage imports happen inside the handlers, so ``edgegen generate`` never imports torch and
start-up stays fast. Every :class:`EdgegenError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from edgegen import __version__
from edgegen.errors import EdgegenError


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
        lr=args.lr, beta=args.beta, upsample=args.upsample, progress=not args.quiet,
    )
    train(opts)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from edgegen.training.evaluate import evaluate_target

    report = evaluate_target(args.target, n=args.n, seed=args.seed, data=args.data,
                             classifier=args.classifier, label=args.label)
    print(report.format())
    if args.json:
        from edgegen.fileio import write_json_atomic
        write_json_atomic(args.json, report.to_dict())
    return 0


# ----------------------------------------------------------------------------- export


def _cmd_export(args: argparse.Namespace) -> int:
    from edgegen.export.onnx_export import export_run

    meta = export_run(args.run, args.out, expost=not args.prior)
    extra = f", encoder {meta.extra['encoder']}" if meta.kind == "vae-decoder" else ""
    print(f"wrote {args.out}: {meta.kind}, {meta.image_size}x{meta.image_size}x{meta.channels}, "
          f"parity {meta.parity_max_abs:.1e}, sampling {meta.sampling}{extra}")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from edgegen.export.quantize import quantize_model

    meta = quantize_model(args.model, args.out, mode=args.mode, force=args.force)
    g = meta.extra.get("gates", {})
    print(f"wrote {args.out}: {meta.quantization}, " + ", ".join(f"{k} {v}" for k, v in g.get("summary", {}).items()))
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgegen", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"edgegen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a GAN, VAE or the evaluation classifier")
    p.add_argument("kind", choices=["gan", "vae", "classifier"])
    _add_data_args(p)
    p.add_argument("--out", required=True, help="run folder (checkpoints, samples, metrics)")
    p.add_argument("--minutes", type=float, help="training time budget (wall clock, across resumes)")
    p.add_argument("--epochs", type=float, help="training length in passes over the data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=32, choices=[28, 32, 64])
    p.add_argument("--channels", type=int, choices=[1, 3], help="default: the data's channels")
    p.add_argument("--conditional", action="store_true", help="class-conditional model")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--checkpoint-minutes", type=float, default=2.0)
    p.add_argument("--width", type=int, help="model width (channels of the last block)")
    p.add_argument("--latent-dim", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--beta", type=float, default=1.0, help="VAE KL weight")
    p.add_argument("--upsample", choices=["nearest", "pixelshuffle"], default="nearest")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="measure sample quality (FCD, KID, precision/recall, class balance)")
    p.add_argument("target", help="run folder, ONNX model, or folder of images")
    p.add_argument("--data", default="fashion-mnist", help="reference data (its test split)")
    p.add_argument("-n", type=int, default=10_000, help="samples to draw (default 10,000)")
    p.add_argument("--seed", type=int, default=0)
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
    p.add_argument("--mode", choices=["int8", "fp16"], default="int8")
    p.add_argument("--out", required=True, help="output .onnx")
    p.add_argument("--force", action="store_true", help="write the model even when a gate fails")
    p.set_defaults(func=_cmd_quantize)

    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``edgegen`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EdgegenError as e:
        print(f"edgegen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgegen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
