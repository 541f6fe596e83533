"""Reproduce the bundled pretrained models from scratch (``make models``): the recipe lives here.

For each default model (unconditional GAN, class-conditional GAN, VAE with ex-post sampling),
all 32x32 grayscale on Fashion-MNIST with fixed seeds:

    train (resumes if interrupted) -> export fp32 ONNX -> quantize int8 (gated)
    -> evaluate fp32 and int8 with `edgegen eval`'s protocol (10,000 samples vs the test split)
    -> copy the int8 files into src/edgegen/assets/models/ with a models.json of how they were made

plus the Fashion-MNIST training-set hash index (src/edgegen/assets/models/fashion-mnist.idx*)
that the audit uses. Training runs go to runs/models/<name>; a re-run skips finished steps.
On a GPU machine pass ``--device cuda``; the recipe (epochs, seeds) stays the same.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from edgegen.fileio import write_json_atomic

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "src" / "edgegen" / "assets" / "models"

# The recipe. Epochs, not minutes, so a rerun reproduces the same weights on the same machine kind.
CLASSIFIER_RECIPE = dict(kind="classifier", data="fashion-mnist", epochs=3.0, batch_size=128, seed=0)
RECIPES: dict[str, dict] = {
    "gan": dict(kind="gan", conditional=False, epochs=3.0, batch_size=64, seed=0, width=32),
    "conditional": dict(kind="gan", conditional=True, epochs=3.0, batch_size=64, seed=0, width=32),
    "vae": dict(kind="vae", conditional=False, epochs=8.0, batch_size=128, seed=0, width=32, lr=2e-3),
}


def build(name: str, recipe: dict, runs: Path, device: str | None, n_eval: int) -> dict:
    """Train, export, quantize and evaluate one model; returns its models.json entry."""
    from edgegen.export import export_run, quantize_model
    from edgegen.training.checkpoint import load_checkpoint
    from edgegen.training.evaluate import evaluate_target
    from edgegen.training.train import TrainOptions, train

    run = runs / name
    opts = TrainOptions(data="fashion-mnist", out=str(run), size=32, device=device, checkpoint_minutes=3.0,
                        **recipe)
    last = run / "last.pt"
    state = load_checkpoint(last) if last.exists() else None
    steps_needed = int(recipe["epochs"] * (60_000 // recipe["batch_size"]) + 0.999)
    if state is None or state["step"] < steps_needed:
        t0 = time.monotonic()
        train(TrainOptions(**{**asdict(opts), "resume": state is not None}))
        print(f"[{name}] trained in {time.monotonic() - t0:.0f} s", flush=True)
    state = load_checkpoint(last)

    fp32, int8 = runs / f"{name}.onnx", runs / f"{name}.int8.onnx"
    export_run(run, fp32)
    meta = quantize_model(fp32, int8, mode="int8")
    figures = {}
    for variant, path in (("fp32", fp32), ("int8", int8)):
        report = evaluate_target(str(path), n=n_eval, seed=0)
        figures[variant] = report.to_dict()
        print(f"[{name}] {variant}\n{report.format()}", flush=True)
    if recipe["kind"] == "vae":  # prior sampling for comparison with ex-post (same decoder, no Gaussian)
        prior = runs / f"{name}.prior.onnx"
        export_run(run, prior, expost=False)
        figures["fp32_prior"] = evaluate_target(str(prior), n=n_eval, seed=0).to_dict()

    ASSETS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(int8, ASSETS / f"{name}.int8.onnx")
    for enc in runs.glob(f"{name}.encoder*.onnx"):
        if ".int8" in enc.name or not (runs / f"{name}.encoder.int8.onnx").exists():
            shutil.copyfile(enc, ASSETS / enc.name)
    return {
        "file": f"{name}.int8.onnx", "recipe": recipe, "steps": state["step"],
        "training_seconds": round(state["elapsed"], 1), "training_metrics": state["metrics"],
        "params": meta.extra.get("params"), "quantization": meta.quantization,
        "gates": {k: v for k, v in meta.extra.items() if k.startswith(("psnr", "speed", "fcd", "within"))},
        "quality": figures,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=sorted(RECIPES), help="build just these models")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "models"))
    ap.add_argument("--device", choices=["cpu", "cuda"])
    ap.add_argument("--n-eval", type=int, default=10_000)
    ap.add_argument("--retrain-classifier", action="store_true", help="rebuild the bundled classifier too")
    args = ap.parse_args()
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    from edgegen.training.evaluate import BUNDLED_CLASSIFIER, bundle_classifier
    from edgegen.training.train import TrainOptions, train

    if args.retrain_classifier or not BUNDLED_CLASSIFIER.exists():
        # The evaluation classifier comes first: every quality figure below is measured with it.
        classifier = runs / "classifier"
        if not (classifier / "last.pt").exists():
            train(TrainOptions(out=str(classifier), device=args.device, **CLASSIFIER_RECIPE))
        print(f"classifier: {bundle_classifier(classifier, BUNDLED_CLASSIFIER)}")
    index_path = ASSETS / "models.json"
    catalogue = json.loads(index_path.read_text()) if index_path.exists() else {}
    for name in args.only or RECIPES:
        catalogue[name] = build(name, RECIPES[name], runs, args.device, args.n_eval)
        ASSETS.mkdir(parents=True, exist_ok=True)
        write_json_atomic(index_path, catalogue)
    # The audit's index of the training set (every run above built the same one).
    for f in (runs / "gan").glob("train.idx*"):
        shutil.copyfile(f, ASSETS / f.name.replace("train", "fashion-mnist", 1))
    print(f"wrote {index_path}")


if __name__ == "__main__":
    main()
