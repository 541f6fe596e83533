"""The GAN's activation cap (``--act-clip``) against int8 accuracy and sample quality, one run per cap.

int8 rounds each activation tensor on one uint8 grid from 0 to its calibrated maximum. A plain
ReLU's rare peaks set that maximum; a cap present during training fixes it (see
``edgegen.training.models.gan.activation``). For each cap (0 = plain ReLU) this trains the shipped
GAN recipe (width 24, batch 64, seed 0, ``--epochs``) side by side, one core each, resuming runs
that exist; then exports each run's best checkpoint, quantizes it with ``edgegen quantize``'s
settings, and scores both files with ``edgegen eval``'s protocol (10,000 samples against the test
split). Writes the ``activation-cap`` section of docs/benchmarks.md.

    python benchmarks/activation_cap.py --caps 0 3 4 --out runs   # runs/cap0, runs/cap3, runs/cap4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from docs_section import machine, write_section
from edgegen.export import export_run, quantize_model
from edgegen.training.checkpoint import load_checkpoint
from edgegen.training.evaluate import evaluate_target

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from make_models import RECIPES, recipe_steps  # noqa: E402


def train_missing(runs: dict[float, Path], epochs: float) -> None:
    """Train (or resume) every run that has not reached ``epochs``, side by side, one core each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    recipe = RECIPES["gan"]
    steps = recipe_steps({**recipe, "epochs": epochs})
    procs = []
    for cap, run in runs.items():
        last = run / "last.pt"
        if last.exists() and load_checkpoint(last)["step"] >= steps:
            continue
        cmd = [sys.executable, "-m", "edgegen.cli", "train", "gan", "--out", str(run), "--epochs", str(epochs),
               "--width", str(recipe["width"]), "--batch-size", str(recipe["batch_size"]), "--seed", str(recipe["seed"]),
               "--checkpoint-minutes", "3",
               "--act-clip", str(cap), "--quiet"] + (["--resume"] if last.exists() else [])
        procs.append(subprocess.Popen(cmd, env=env))
    for p in procs:
        if p.wait():
            sys.exit(f"a training process failed with exit code {p.returncode}")


def measure(cap: float, run: Path, n: int) -> dict:
    """Export, quantize and evaluate one run; returns its row of figures."""
    fp32, int8 = run / "cap.onnx", run / "cap.int8.onnx"
    export_run(run, fp32)
    gates = quantize_model(fp32, int8, force=True, speed_gate=False).extra["gates"]
    a, b = evaluate_target(str(fp32), n=n, seed=0), evaluate_target(str(int8), n=n, seed=0)
    best = load_checkpoint(run / "best.pt")
    return {"cap": cap, "best_step": best["step"], "fcd_fp32": a.fcd, "recall_fp32": a.recall,
            "min_class_fp32": a.min_class_fraction, "fcd_int8": b.fcd, "floor_fcd": a.floor["fcd"],
            "within_2": gates["within_2_frac"], "psnr_median_db": gates["psnr_median_db"],
            "psnr_min_db": gates["psnr_min_db"], "max_abs_diff": gates["max_abs_diff"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--caps", type=float, nargs="+", default=[0.0, 3.0, 4.0])
    ap.add_argument("--out", default="runs", help="runs go to OUT/cap<value>")
    ap.add_argument("--epochs", type=float, default=6.0)
    ap.add_argument("-n", type=int, default=10_000)
    args = ap.parse_args()
    runs = {cap: Path(args.out) / f"cap{cap:g}" for cap in args.caps}
    train_missing(runs, args.epochs)
    rows = [measure(cap, run, args.n) for cap, run in runs.items()]
    (Path(args.out) / "activation_cap.json").write_text(json.dumps(rows, indent=1))

    recipe = RECIPES["gan"]
    lines = [
        "## GAN activation cap vs int8 accuracy (issue 3)",
        "",
        f"`python benchmarks/activation_cap.py --caps {' '.join(f'{c:g}' for c in args.caps)}` on {machine()}: "
        f"the shipped GAN recipe (width {recipe['width']}, batch {recipe['batch_size']}, seed {recipe['seed']}, {args.epochs:g} epochs, "
        "best checkpoint by the "
        "training-time FCD), trained once per cap of the generator's ReLUs (0: plain ReLU), side by side, one "
        "core each. int8 as `edgegen quantize` writes it, against its fp32 export on the gate's 256 latents; "
        f"FCD with `edgegen eval`'s protocol ({args.n:,} samples, real-vs-real floor {rows[0]['floor_fcd']:.3f}).",
        "",
        "| cap | best step | FCD fp32 | FCD int8 | recall | smallest class | int8 pixels within 2/255 (gate 99 %) "
        "| median PSNR | worst PSNR | max diff |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['cap']:g} | {r['best_step']:,} | {r['fcd_fp32']:.3f} | {r['fcd_int8']:.3f} | "
                     f"{r['recall_fp32']:.3f} | {r['min_class_fp32']:.3f} | {100 * r['within_2']:.2f} % | "
                     f"{r['psnr_median_db']:.2f} dB | {r['psnr_min_db']:.2f} dB | {r['max_abs_diff']} |")
    write_section("activation-cap", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
