"""Checkpoints: one torch file with weights, optimiser and RNG state, plus a JSON beside it.

A run folder holds ``last.pt`` (written every few minutes and at the end) and ``best.pt`` (the
best by the quality metric), each with a ``.json`` twin carrying config, step, version and
metrics so people and tools can read a run without torch. Files are written atomically and
loaded with ``weights_only=True``: a checkpoint is data, never code.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from edgegen import __version__
from edgegen.errors import EdgegenError
from edgegen.fileio import write_bytes_atomic, write_json_atomic
from edgegen.training.models import VAE, Classifier, ClassifierConfig, GANConfig, Generator, VAEConfig


# The weights each kind of run is loaded from: the EMA generator of a GAN, the whole VAE, the classifier.
_MODEL_KEYS = {"gan": "G_ema", "vae": "vae", "classifier": "classifier"}


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomically write ``state`` (tensors and plain Python values only) and its JSON summary."""
    state = {**state, "version": __version__}
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes_atomic(path, buf.getvalue())
    summary = {k: state[k] for k in ("version", "kind", "step", "elapsed", "model_config", "train_config",
                                     "data", "metrics") if k in state}
    write_json_atomic(path.with_suffix(".json"), summary)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); clear error if missing or corrupt."""
    if not path.is_file():
        raise EdgegenError(f"{path}: no checkpoint here (has the run finished its first checkpoint?)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # truncated zip, another format, pickle with code, ...: all mean "not a usable checkpoint"
        # torch's own message spans lines and suggests weights_only=False, which would run code from the file.
        raise EdgegenError(f"{path}: not a readable edgegen checkpoint (damaged, another kind of file, "
                           "or holding code)") from None
    if not isinstance(state, dict) or "kind" not in state or "models" not in state:
        raise EdgegenError(f"{path}: not an edgegen checkpoint (missing kind/models)")
    if state["kind"] not in _MODEL_KEYS:
        raise EdgegenError(f"{path}: not an edgegen checkpoint (unknown model kind {state['kind']!r})")
    return state


@dataclass
class LoadedRun:
    """A trained model ready for inference or export, with what is known about its training."""

    kind: str                    # gan | vae | classifier
    model: nn.Module             # GAN: the EMA generator; VAE: the whole VAE; classifier
    model_config: dict
    data: dict                   # name, fingerprint, class_names, image_size, channels
    step: int
    path: Path
    metrics: dict


def build_model(kind: str, model_config: dict) -> nn.Module:
    """Instantiate the network for ``kind`` from its config dict."""
    if kind == "gan":
        return Generator(GANConfig(**model_config))
    if kind == "vae":
        return VAE(VAEConfig(**model_config))
    if kind == "classifier":
        return Classifier(ClassifierConfig(**model_config))
    raise EdgegenError(f"unknown model kind {kind!r}")


def load_run(run: str | Path, which: str = "best") -> LoadedRun:
    """Load the ``best`` (falling back to ``last``) or ``last`` checkpoint of a run folder, in eval mode.

    ``run`` may also be a ``.pt`` file. For a GAN the returned model is the EMA generator with
    its BatchNorm statistics recomputed for the averaged weights.
    """
    path = Path(run)
    if not path.exists():
        raise EdgegenError(f"{path}: no such run folder or checkpoint file")
    if path.is_dir():
        cands = [path / f"{which}.pt", path / "last.pt"]
        path = next((c for c in cands if c.is_file()), cands[-1])
    state = load_checkpoint(path)
    try:
        model = build_model(state["kind"], state["model_config"])
        model.load_state_dict(state["models"][_MODEL_KEYS[state["kind"]]])
        step = int(state["step"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__   # torch's messages span lines
        raise EdgegenError(f"{path}: weights do not match the stored config ({reason})") from None
    model.eval()
    return LoadedRun(state["kind"], model, state["model_config"], state.get("data", {}), step,
                     path, state.get("metrics", {}))


def read_summary(path: Path) -> dict:
    """The JSON twin of a checkpoint (no torch needed)."""
    return json.loads(path.with_suffix(".json").read_text())
