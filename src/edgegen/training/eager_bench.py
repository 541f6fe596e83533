"""PyTorch eager timing of a run's generator, for ``edgegen bench --torch`` (the torch side of it).

Kept out of :mod:`edgegen.runtime` so the runtime never imports torch; the runtime's benchmark
loads this module only when the user asks for the PyTorch rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from edgegen.errors import EdgegenError
from edgegen.runtime.bench import time_calls
from edgegen.runtime.latent import latents
from edgegen.training.checkpoint import load_run


def bench_eager(run_dir: str | os.PathLike, threads: int, batches: tuple[int, ...], seconds: float) -> list[dict]:
    """Rows (images/s, p50/p99 ms) of the run's generator in eager mode, producing the same uint8
    NHWC pixels as the exported graph (so both sides do the same work), ``threads`` intra-op threads."""
    torch.set_num_threads(threads)
    run = load_run(run_dir)
    if run.kind not in ("gan", "vae"):
        raise EdgegenError(f"{run_dir}: a {run.kind} run has no generator to benchmark")
    net = run.model.decoder if run.kind == "vae" else run.model
    cfg = net.cfg
    rows = []
    for b in batches:
        z = torch.from_numpy(latents(0, np.arange(b), cfg.latent_dim))    # (b, latent), same as onnx rows
        lab = torch.arange(b) % cfg.num_classes if cfg.num_classes else None

        def call() -> np.ndarray:
            with torch.inference_mode():
                x = net(z, lab)                                              # (b, C, H, W) in [-1, 1]
                return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()

        rows.append({"engine": "pytorch", "variant": "eager", "file": Path(run_dir).name, "size_bytes": None,
                     **time_calls(call, b, seconds)})
    return rows
