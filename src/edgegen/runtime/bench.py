"""``edgegen bench``: images/s and latency p50/p99 of a model's variants, and cold start.

Measured side by side in one process with the same thread count: onnxruntime fp32 / int8 / fp16
(the model and its siblings ``<base>.int8.onnx`` / ``<base>.fp16.onnx``, or files passed
explicitly) at batch 1 and 64, PyTorch eager on the run the model came from (only with
``--torch RUN_DIR``; that code lives in :mod:`edgegen.training.eager_bench`, loaded only then), and cold start
(import the runtime, open the session, first image) in a fresh interpreter where torch is
blocked. Latency is per call; images/s is images over total time of the timed calls.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

from edgegen.errors import EdgegenError
from edgegen.runtime.generator import Generator, cpu_count
from edgegen.runtime.latent import latents

VARIANTS = ("fp32", "int8", "fp16")

_BLOCK_TORCH = ("import sys\nclass _B:\n    def find_spec(self, n, p=None, t=None):\n"
                "        if n == 'torch' or n.startswith('torch.'): raise ImportError('torch blocked')\n"
                "sys.meta_path.insert(0, _B())\n")


def machine_info() -> dict:
    """CPU model, usable cores, int8-relevant ISA flags, library versions: what a figure depends on."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown", "", "x86_64"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16") if f in flags]
    return {"cpu": model, "cores": cpu_count(), "isa": isa, "onnxruntime": ort.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def time_calls(fn: Callable[[], object], batch: int, seconds: float = 1.0, min_calls: int = 10,
               warmup: int = 3) -> dict:
    """Call ``fn`` (one batch) repeatedly for ~``seconds``: images/s and latency p50/p99 in ms."""
    for _ in range(warmup):
        fn()
    lat: list[float] = []
    t_end = time.perf_counter() + seconds
    while len(lat) < min_calls or time.perf_counter() < t_end:
        t = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t)
    arr = np.asarray(lat)
    return {"batch": batch, "images_per_s": batch * len(arr) / arr.sum(), "p50_ms": 1e3 * np.percentile(arr, 50),
            "p99_ms": 1e3 * np.percentile(arr, 99), "calls": len(arr)}


def find_variants(model: str | os.PathLike, **explicit: str | os.PathLike | None) -> dict[str, Path]:
    """fp32/int8/fp16 files to compare: explicit ones, else siblings named ``<base>.<variant>.onnx``.

    ``model`` itself is filed under the quantization its metadata states.
    """
    model = Path(model)
    found = {}
    stem = model.name[:-5] if model.name.endswith(".onnx") else model.stem
    base = next((stem[: -len(v) - 1] for v in VARIANTS if stem.endswith("." + v)), stem)
    for v in VARIANTS:
        for cand in (model.with_name(f"{base}.{v}.onnx"), model.with_name(f"{base}.onnx")):
            if cand.is_file() and v not in found:
                q = Generator.load(cand).meta.quantization
                if q == v:
                    found[v] = cand
    q = Generator.load(model).meta.quantization
    found[q] = model
    for v, p in explicit.items():
        if p is not None:
            found[v] = Path(p)
    return {v: found[v] for v in VARIANTS if v in found}


def bench_onnx(path: Path, threads: int, batches: tuple[int, ...], seconds: float) -> list[dict]:
    """Rows for one ONNX file: latents precomputed, so only ``session.run`` is timed."""
    gen = Generator.load(path, threads=threads, mode="batch")
    rows = []
    for b in batches:
        z = latents(0, np.arange(b), gen.meta.latent_dim)                   # (b, latent)
        lab = gen.labels_for(np.arange(b), None)
        rows.append({"engine": "onnxruntime", "variant": gen.meta.quantization, "file": path.name,
                     "size_bytes": path.stat().st_size, **time_calls(lambda: gen.run(z, lab), b, seconds)})
    return rows


def bench_torch(run_dir: str | os.PathLike, threads: int, batches: tuple[int, ...], seconds: float) -> list[dict]:
    """PyTorch eager rows for ``run_dir`` (only with ``--torch``): delegated to the training package,
    where torch lives, and imported only here so the runtime itself never loads torch."""
    try:
        from edgegen.training.eager_bench import bench_eager
    except ImportError as e:
        raise EdgegenError(f"--torch needs PyTorch (pip install 'edgegen[train]'): {e}") from None
    return bench_eager(run_dir, threads, batches, seconds)


def cold_start(path: Path, threads: int, repeats: int = 3) -> dict:
    """Seconds from a fresh interpreter (torch blocked) to the first image; best of ``repeats``."""
    code = _BLOCK_TORCH + f"""
import time, json
t0 = time.perf_counter()
from edgegen.runtime import Generator
t1 = time.perf_counter()
g = Generator.load({str(path)!r}, threads={threads})
t2 = time.perf_counter()
g.generate(1, seed=0)
t3 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1, "first_image_s": t3 - t2, "total_s": t3 - t0,
                   "torch_loaded": "torch" in sys.modules}}))
"""
    best = None
    for _ in range(repeats):
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        wall = time.perf_counter() - t
        if res.returncode != 0:
            raise EdgegenError(f"cold start run failed: {res.stderr.strip().splitlines()[-1]}")
        d = json.loads(res.stdout.strip().splitlines()[-1]) | {"process_wall_s": wall}
        best = d if best is None or d["total_s"] < best["total_s"] else best
    return {"file": path.name, **best}


def run_bench(model: str | os.PathLike, torch_run: str | os.PathLike | None = None, threads: int | None = None,
              batches: tuple[int, ...] = (1, 64), seconds: float = 1.0, **explicit: str | None) -> dict:
    """All rows plus cold start and machine info, as one JSON-able dict."""
    if threads is not None and (isinstance(threads, bool) or threads < 1):
        raise EdgegenError(f"--threads must be >= 1, got {threads}")
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0):
        raise EdgegenError(f"--seconds must be a positive number of seconds, got {seconds}")
    threads = threads or cpu_count()
    variants = find_variants(model, **explicit)
    rows: list[dict] = []
    if torch_run is not None:
        rows += bench_torch(torch_run, threads, batches, seconds)
    for path in variants.values():
        rows += bench_onnx(path, threads, batches, seconds)
    cold_file = variants.get("int8", Path(model))
    return {"machine": machine_info(), "threads": threads, "rows": rows, "cold_start": cold_start(cold_file, threads)}


def format_table(result: dict) -> str:
    """Markdown table of a :func:`run_bench` result, with speed-ups over fp32 and eager."""
    rows = result["rows"]
    ref = {(r["variant"], r["batch"]): r["images_per_s"] for r in rows}
    lines = ["| engine | variant | batch | images/s | p50 ms | p99 ms | × fp32 | × eager |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        fp32, eager = ref.get(("fp32", r["batch"])), ref.get(("eager", r["batch"]))
        x32 = f"{r['images_per_s'] / fp32:.2f}" if fp32 else "–"
        xe = f"{r['images_per_s'] / eager:.2f}" if eager else "–"
        lines.append(f"| {r['engine']} | {r['variant']} | {r['batch']} | {r['images_per_s']:,.0f} | "
                     f"{r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {x32} | {xe} |")
    c = result["cold_start"]
    lines.append("")
    lines.append(f"Cold start ({c['file']}, torch blocked): import {c['import_s']:.3f} s + load {c['load_s']:.3f} s "
                 f"+ first image {c['first_image_s']:.3f} s = **{c['total_s']:.3f} s** "
                 f"(whole process incl. interpreter start: {c['process_wall_s']:.3f} s)")
    return "\n".join(lines)
