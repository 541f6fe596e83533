"""Self-conditioned GAN (``edgegen train gan --clusters K``) against the shipped unconditional GAN.

Self-conditioning (``edgegen.training.clusters``) trains the GAN as a conditional one on label-free
k-means clusters of the training images, and the generator draws its cluster from its own latent,
so the model stays unconditional. For each K this trains the shipped GAN recipe (width 24, batch
64, seed 0, capped ReLUs) with ``--clusters K`` for ``--epochs`` (resuming a run that exists), then
exports its best checkpoint, quantizes it with ``edgegen quantize``'s settings and scores both files
with ``edgegen eval``'s protocol (10,000 samples against the test split), beside the shipped GAN
(runs/models/gan, built by ``make models``). Writes the ``self-conditioning`` section of
docs/benchmarks.md.

    python benchmarks/self_conditioning.py --clusters 10 --epochs 3   # runs/selfcond/k10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from docs_section import machine, write_section
from edgegen.export import export_run, quantize_model
from edgegen.training.checkpoint import load_checkpoint
from edgegen.training.evaluate import evaluate_target
from edgegen.training.train import TrainOptions, train

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from make_models import RECIPES, recipe_steps  # noqa: E402


def measure(run: Path, fp32: Path, n: int) -> dict:
    """Quantize (and first export, when ``fp32`` is missing) one run; score both files."""
    if not fp32.exists():
        export_run(run, fp32)
    int8 = fp32.with_name(fp32.stem + ".bench-int8.onnx")
    gates = quantize_model(fp32, int8, force=True, speed_gate=False).extra["gates"]
    a, b = evaluate_target(str(fp32), n=n, seed=0), evaluate_target(str(int8), n=n, seed=0)
    state = load_checkpoint(run / "best.pt")
    return {"steps": state["step"], "fcd": a.fcd, "fcd_int8": b.fcd, "recall": a.recall, "precision": a.precision,
            "min_class": a.min_class_fraction, "within_2": gates["within_2_frac"], "floor": a.floor["fcd"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clusters", type=int, nargs="+", default=[10])
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("-n", type=int, default=10_000)
    args = ap.parse_args()
    recipe = RECIPES["gan"]
    shipped = ROOT / "runs" / "models" / "gan"
    rows = {"shipped (no clusters)": measure(shipped, shipped.with_suffix(".onnx"), args.n)}
    steps = recipe_steps({**recipe, "epochs": args.epochs})
    for k in args.clusters:
        run = ROOT / "runs" / "selfcond" / f"k{k}"
        last = run / "last.pt"
        if not last.exists() or load_checkpoint(last)["step"] < steps:
            train(TrainOptions(out=str(run), size=32, checkpoint_minutes=3.0, progress=False,
                               resume=last.exists(), **{**recipe, "epochs": args.epochs, "clusters": k}))
        rows[f"{k} clusters"] = measure(run, run.with_suffix(".onnx"), args.n)

    lines = [
        "## Self-conditioned GAN (label-free clusters)",
        "",
        f"`python benchmarks/self_conditioning.py --clusters {' '.join(map(str, args.clusters))} --epochs "
        f"{args.epochs:g}` on {machine()}: the shipped GAN recipe (width {recipe['width']}, batch "
        f"{recipe['batch_size']}, seed {recipe['seed']}, ReLUs capped at {recipe['act_clip']:g}) trained with "
        f"`--clusters K` for {args.epochs:g} epochs, beside the shipped GAN ({recipe['epochs']:g} epochs); best "
        f"checkpoints by the training-time FCD; `edgegen eval`'s protocol ({args.n:,} samples, real-vs-real floor "
        f"{rows['shipped (no clusters)']['floor']:.3f}); int8 as `edgegen quantize` writes it.",
        "",
        "| model | best step | FCD fp32 | FCD int8 | precision | recall | smallest class | int8 pixels within 2/255 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['steps']:,} | {r['fcd']:.3f} | {r['fcd_int8']:.3f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['min_class']:.3f} | {100 * r['within_2']:.2f} % |")
    write_section("self-conditioning", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
