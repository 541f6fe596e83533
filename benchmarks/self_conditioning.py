"""Self-conditioned GAN (``edgegen train gan --clusters K``) against the shipped unconditional GAN.

Self-conditioning (``edgegen.training.clusters``) trains the GAN as a conditional one on label-free
k-means clusters of the training images, and the generator draws its cluster from its own latent,
so the model stays unconditional. For each K this trains the shipped GAN recipe (width 24, batch
64, seed 0, capped ReLUs) with ``--clusters K`` for ``--epochs`` (resuming a run that exists), then
exports its best checkpoint, quantizes it with ``edgegen quantize``'s settings and scores both files
with ``edgegen eval``'s protocol (10,000 samples against the test split), beside the shipped GAN
(runs/models/gan, built by ``make models``). Writes the ``self-conditioning`` section of
docs/benchmarks.md. With ``--mode-seeking W ...`` (the trainer's default for these runs is 0.2) it
trains each K with each weight, in ``runs/selfcond/k<K>-ms<W>``, and writes its table to its own
``self-conditioning-mode-seeking`` section. The shipped GAN's row needs its run folder; without
one, the table points to the bundled-models section.

    python benchmarks/self_conditioning.py --clusters 10 --epochs 3           # runs/selfcond/k10
    python benchmarks/self_conditioning.py --clusters 10 --mode-seeking 0.5 1  # runs/selfcond/k10-ms0.5, -ms1
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
    ap.add_argument("--mode-seeking", type=float, nargs="+", help="mode-seeking weights (default: the trainer's, 0.2)")
    ap.add_argument("-n", type=int, default=10_000)
    args = ap.parse_args()
    recipe = RECIPES["gan"]
    shipped = ROOT / "runs" / "models" / "gan"
    rows = {"shipped (no clusters)": measure(shipped, shipped.with_suffix(".onnx"), args.n)} if shipped.is_dir() else {}
    steps = recipe_steps({**recipe, "epochs": args.epochs})
    for k in args.clusters:
        for w in args.mode_seeking or [None]:
            run = ROOT / "runs" / "selfcond" / (f"k{k}" if w is None else f"k{k}-ms{w:g}")
            last = run / "last.pt"
            if not last.exists() or load_checkpoint(last)["step"] < steps:
                train(TrainOptions(out=str(run), size=32, checkpoint_minutes=3.0, progress=False, resume=last.exists(),
                                   **{**recipe, "epochs": args.epochs, "clusters": k, "mode_seeking": w}))
            rows[f"{k} clusters" + ("" if w is None else f", mode-seeking {w:g}")] = \
                measure(run, run.parent / f"{run.name}.onnx", args.n)

    floor = next(iter(rows.values()))["floor"]
    weights = " ".join(f"{w:g}" for w in args.mode_seeking or [])
    shown = (f"beside the shipped GAN ({recipe['epochs']:g} epochs)" if shipped.is_dir() else
             f"(the shipped GAN, {recipe['epochs']:g} epochs, is in the bundled-models section)")
    lines = [
        "## Self-conditioned GAN (label-free clusters)" + (", mode-seeking weight" if weights else ""),
        "",
        f"`python benchmarks/self_conditioning.py --clusters {' '.join(map(str, args.clusters))} --epochs "
        f"{args.epochs:g}{f' --mode-seeking {weights}' if weights else ''}` on {machine()}: the shipped GAN "
        f"recipe (width {recipe['width']}, batch {recipe['batch_size']}, seed {recipe['seed']}, ReLUs capped at "
        f"{recipe['act_clip']:g}) trained with `--clusters K` for {args.epochs:g} epochs {shown}; best checkpoints "
        f"by the training-time FCD; `edgegen eval`'s protocol ({args.n:,} samples, real-vs-real floor {floor:.3f}); "
        "int8 as `edgegen quantize` writes it.",
        "",
        "| model | best step | FCD fp32 | FCD int8 | precision | recall | smallest class | int8 pixels within 2/255 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['steps']:,} | {r['fcd']:.3f} | {r['fcd_int8']:.3f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['min_class']:.3f} | {100 * r['within_2']:.2f} % |")
    diverse = [name for name, r in rows.items() if r["recall"] >= 0.7 and r["min_class"] >= 0.06]
    lines += ["", "Rows that keep the shipped GAN's diversity bars (issue 7: recall >= 0.7, every class >= 6 % of "
              f"samples): {', '.join(diverse) or 'none'}."]
    write_section("self-conditioning" + ("-mode-seeking" if weights else ""), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
