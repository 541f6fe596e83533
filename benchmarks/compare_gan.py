"""Our GAN recipe against the pytorch/examples DCGAN recipe: same machine, same wall-clock budget.

Both trainings run side by side (one core each, started together, so machine noise hits both
alike) for ``--minutes``; then each draws 10,000 samples, scored with ``edgegen eval``'s
protocol (FCD etc. against the 10,000 test images, real-vs-real floor beside them). Writes the
``gan-vs-dcgan`` section of docs/benchmarks.md and a sample grid of each to docs/img/.

    python benchmarks/compare_gan.py --minutes 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from docs_section import machine, write_section
from dcgan_baseline import DCGANGenerator, sample_dcgan
from edgegen.training.checkpoint import load_checkpoint
from edgegen.training.evaluate import evaluate_images, evaluate_target
from edgegen.training.train import save_grid

HERE = Path(__file__).resolve().parent
IMG = HERE.parent / "docs" / "img"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--width", type=int, default=24, help="our generator/discriminator width (the shipped recipe)")
    ap.add_argument("-n", type=int, default=10_000)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    ours_dir, dcgan_dir = out / "ours", out / "dcgan"
    procs = []
    if not (ours_dir / "last.pt").exists():
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "edgegen.cli", "train", "gan", "--out", str(ours_dir), "--minutes", str(args.minutes),
             "--width", str(args.width), "--seed", "0", "--quiet"], env=env))
    if not (dcgan_dir / "generator.pt").exists():
        procs.append(subprocess.Popen(
            [sys.executable, str(HERE / "dcgan_baseline.py"), "--minutes", str(args.minutes), "--out", str(dcgan_dir)],
            env=env))
    for p in procs:
        if p.wait():
            sys.exit(f"a training process failed with exit code {p.returncode}")

    ours = evaluate_target(str(ours_dir), n=args.n, seed=0)
    g = DCGANGenerator()
    g.load_state_dict(torch.load(dcgan_dir / "generator.pt", weights_only=True))
    dc_images = sample_dcgan(g, args.n, seed=0)
    theirs = evaluate_images(dc_images, seed=0)
    state = load_checkpoint(ours_dir / "last.pt")
    dc_summary = json.loads((dcgan_dir / "summary.json").read_text())

    IMG.mkdir(parents=True, exist_ok=True)
    save_grid(torch.from_numpy(dc_images[:64]).permute(0, 3, 1, 2).float() / 127.5 - 1, IMG / "dcgan_baseline.png")
    rows = [("ours (resize-conv, hinge + SN, EMA), 32×32", ours, state["step"], state["step"] * 64),
            ("pytorch/examples DCGAN, 64×64", theirs, dc_summary["steps"], dc_summary["images_seen"])]
    lines = [
        "## Our GAN recipe vs the pytorch/examples DCGAN recipe (issue 7)",
        "",
        f"`python benchmarks/compare_gan.py --minutes {args.minutes:g}` on {machine()}: both trained side by side, "
        f"one core each, {args.minutes:g} minutes of wall clock; {args.n:,} samples each against the 10,000 "
        "Fashion-MNIST test images in the bundled classifier's feature space (DCGAN samples drawn as the "
        "example draws them: train-mode BatchNorm, batches of 64; downscaled 64→32 for the classifier).",
        "",
        "| recipe | steps | images seen | FCD | KID×1000 | precision | recall | smallest class |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r, steps, seen in rows:
        lines.append(f"| {name} | {steps:,} | {seen:,} | {r.fcd:.3f} | {r.kid:.3f} | {r.precision:.3f} | "
                     f"{r.recall:.3f} | {r.min_class_fraction:.3f} |")
    f = ours.floor
    lines += [f"| real-vs-real floor | | | {f['fcd']:.3f} | {f['kid']:.3f} | {f['precision']:.3f} | "
              f"{f['recall']:.3f} | {f['min_class_fraction']:.3f} |", "",
              f"FCD ratio ours / DCGAN = **{ours.fcd / theirs.fcd:.3f}** (target ≤ 0.333: "
              f"{'met' if ours.fcd <= theirs.fcd / 3 else 'missed'}).", "",
              "![DCGAN baseline samples](img/dcgan_baseline.png)"]
    write_section("gan-vs-dcgan", "\n".join(lines))
    (out / "compare.json").write_text(json.dumps({"ours": ours.to_dict(), "dcgan": theirs.to_dict()}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
