"""Seed spread of the bundled-model recipes (issue 7): quality as mean ± sd over training seeds.

    python benchmarks/seed_spread.py [--models gan gan_relu conditional vae] [--seeds 1 2]

Seed 0 is the shipped model (runs/models/<name>, built by ``make models``). Every other seed trains
the same recipe (``scripts/make_models.py``'s RECIPES, only the seed changed) into
runs/seeds/<name>_s<seed>, resuming an interrupted run, and is exported to fp32 ONNX. Each model
is scored with ``edgegen eval``'s protocol (10,000 samples against the 10,000 test images, seed 0)
and by the int8 quality gate (its int8 file's pixels within 2/255 of fp32); the table of per-seed
figures and their mean ± sd is written to the "seeds" section of docs/benchmarks.md. Seeds that
have not finished training are left out of the table and named. Variants: ``gan_relu`` is the GAN
recipe before its ReLUs were capped, for comparison; ``conditional_cap`` the conditional GAN with
capped ReLUs, a candidate (seed 0: runs/models/<variant>; seeds: runs/seeds/gan_s<seed>_relu,
runs/seeds/conditional_s<seed>_cap).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from docs_section import machine, write_section  # noqa: E402
from make_models import RECIPES, recipe_steps  # noqa: E402

# (figure, column, decimals, factor): the int8 gate's fraction is shown in percent.
METRICS = [("fcd", "FCD", 3, 1), ("recall", "recall", 3, 1), ("precision", "precision", 3, 1),
           ("min_class_fraction", "smallest class", 3, 1), ("class_agreement", "class agreement", 3, 1),
           ("int8_within_2", "int8 pixels within 2/255 of fp32, % (gate 99)", 2, 100)]


# Recipe variants beside the shipped ones: the GAN before its ReLUs were capped (for comparison), and
# the conditional GAN with capped ReLUs (a candidate: its recipe still uses plain ReLUs).
VARIANTS = {"gan_relu": {**RECIPES["gan"], "act_clip": 0.0},
            "conditional_cap": {**RECIPES["conditional"], "act_clip": 3.0}}


def _recipe(name: str) -> dict:
    return RECIPES[name] if name in RECIPES else VARIANTS[name]


def _paths(name: str, seed: int) -> tuple[Path, Path]:
    """(run folder, fp32 ONNX file) of seed ``seed`` of ``name``'s recipe: runs/models/gan for seed 0,
    runs/seeds/gan_s1 for seed 1; an earlier recipe's tag follows the seed (runs/seeds/gan_s1_relu)."""
    if seed == 0:
        run = ROOT / "runs" / "models" / name
    else:
        base, _, tag = name.partition("_")
        run = ROOT / "runs" / "seeds" / (f"{base}_s{seed}" + (f"_{tag}" if tag else ""))
    return run, run.with_name(run.name + ".onnx")


def score(name: str, seed: int, n: int) -> dict | None:
    """Train (or resume) seed ``seed`` of ``name``'s recipe, export it, and return its eval figures
    and the fraction of its int8 file's pixels within 2/255 of fp32 (``edgegen quantize``'s gate)."""
    figures = _fp32_figures(name, seed, n)
    if figures is not None and "int8_within_2" not in figures:
        from edgegen.export import quantize_model

        onnx_path = _paths(name, seed)[1]
        with tempfile.TemporaryDirectory() as tmp:
            meta = quantize_model(onnx_path, Path(tmp) / "int8.onnx", "int8", force=True, speed_gate=False)
        figures["int8_within_2"] = meta.extra["gates"]["within_2_frac"]
        onnx_path.with_suffix(".eval.json").write_text(json.dumps(figures))
    return figures


def _fp32_figures(name: str, seed: int, n: int) -> dict | None:
    from edgegen.export import export_run
    from edgegen.training.checkpoint import load_checkpoint
    from edgegen.training.evaluate import evaluate_target
    from edgegen.training.train import TrainOptions, train

    recipe = _recipe(name)
    run, onnx_path = _paths(name, seed)
    cache = onnx_path.with_suffix(".eval.json")
    if cache.exists() and onnx_path.exists() and cache.stat().st_mtime >= onnx_path.stat().st_mtime:
        return json.loads(cache.read_text())
    last = run / "last.pt"
    state = load_checkpoint(last) if last.exists() else None
    if state is not None and state["model_config"].get("act_clip", 0.0) != recipe.get("act_clip", 0.0):
        print(f"[{name}] seed {seed}: {run} was trained with an older recipe (act_clip); move it aside to retrain",
              flush=True)
        return None
    if state is None or state["step"] < recipe_steps(_recipe(name)):
        if seed == 0:
            print(f"[{name}] seed 0: run `make models` first", flush=True)
            return None
        opts = TrainOptions(data="fashion-mnist", out=str(run), size=32, checkpoint_minutes=3.0,
                            **{**recipe, "seed": seed})
        train(TrainOptions(**{**asdict(opts), "resume": state is not None}))
        state = load_checkpoint(last)
    export_run(run, onnx_path)
    figures = {**evaluate_target(str(onnx_path), n=n, seed=0).to_dict(),
               "steps": state["step"], "minutes": round(state["elapsed"] / 60, 1)}
    cache.write_text(json.dumps(figures))
    return figures


def section(results: dict[str, dict[int, dict]], missing: list[str], n: int) -> str:
    lines = ["## Seed spread of the bundled-model recipes (issue 7)", "",
             f"`python benchmarks/seed_spread.py` on {machine()}: each recipe of `scripts/make_models.py` trained "
             f"with several seeds (seed 0 is the shipped model), fp32 ONNX scored with `edgegen eval`'s protocol "
             f"({n:,} samples against the test split), and its int8 file as `edgegen quantize` writes it against the "
             "fp32 file (the quality gate's 256 latents). Figures are mean ± sd over the seeds, per-seed values "
             "in brackets." + (" `gan_relu` is the GAN recipe before the activation cap (plain ReLUs), for comparison."
                              if "gan_relu" in results else "")
             + (" `conditional_cap` is the conditional recipe with the cap, a candidate (not shipped)."
                if "conditional_cap" in results else ""), "",
             "| model | seeds | " + " | ".join(m[1] for m in METRICS) + " |",
             "|---|---|" + "---:|" * len(METRICS)]
    for name, per_seed in results.items():
        cells = []
        for key, _, digits, factor in METRICS:
            vals = [factor * f[key] for f in per_seed.values() if f.get(key) is not None]
            if not vals:
                cells.append("")
                continue
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.fmean(vals):.{digits}f} ± {sd:.{digits}f} "
                         f"({', '.join(f'{v:.{digits}f}' for v in vals)})")
        lines.append(f"| {name} | {', '.join(map(str, per_seed))} | " + " | ".join(cells) + " |")
    floor = next((f["floor"]["fcd"] for per in results.values() for f in per.values()), None)
    if floor is not None:
        lines += ["", f"Real-vs-real FCD floor at this n: {floor:.3f}."]
    if missing:
        lines += ["", "Unfinished, or trained with an older recipe, when this ran (left out): " + ", ".join(missing) + "."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["gan"], choices=sorted(RECIPES) + sorted(VARIANTS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[1, 2], help="extra seeds besides the shipped seed 0")
    ap.add_argument("-n", type=int, default=10_000)
    ap.add_argument("--eval-only", action="store_true", help="score finished seeds only; train nothing")
    args = ap.parse_args()
    results, missing = {}, []
    for name in args.models:
        per_seed = {}
        for seed in [0, *args.seeds]:
            if args.eval_only and not _finished(_paths(name, seed)[0], name):
                missing.append(f"{name} seed {seed}")
                continue
            figures = score(name, seed, args.n)
            if figures is None:
                missing.append(f"{name} seed {seed}")
            else:
                per_seed[seed] = figures
                print(f"[{name}] seed {seed}: FCD {figures['fcd']:.3f} recall {figures['recall']:.3f}", flush=True)
        if per_seed:
            results[name] = per_seed
    write_section("seeds", section(results, missing, args.n))


def _finished(run: Path, name: str) -> bool:
    from edgegen.training.checkpoint import load_checkpoint

    last = run / "last.pt"
    return last.exists() and load_checkpoint(last)["step"] >= recipe_steps(_recipe(name))


if __name__ == "__main__":
    main()
