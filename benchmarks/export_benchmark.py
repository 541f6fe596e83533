"""Export benchmark: PyTorch eager vs onnxruntime fp32 / int8 / fp16, side by side in one run.

Default 32x32 GAN (``GANConfig()`` with the training default's activation cap), random weights with
recomputed BatchNorm statistics (speed and size do not depend on training; the quality gate figures
do, so they are shown but not judged here).
Every engine gets 2 intra-op threads (onnxruntime's spinning off, as edgegen's sessions run).
Measures images/s at batch 1 and 64 (all engines timed back to back in rounds, so the shared
machine's load drifts hit them alike), the multiply-adds/s achieved against this CPU's peaks, cold
start (import onnxruntime, open the session, first image) in a fresh process that never imports
torch, file sizes, and the levers (pixel-shuffle up-blocks, NHWC layout, exact phase rewrite, channel
counts, the AMX-capable conv path and the bare GEMM floor, split output conv; the graph variants are built in
``export_variants.py``). Writes the ``export`` section of docs/benchmarks.md between
``<!-- export:start -->`` and ``<!-- export:end -->``.

    python benchmarks/export_benchmark.py [--no-levers] [--sensitivity runs/models/gan.onnx] [--doc docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from docs_section import machine, write_section
from export_variants import joined, layer_sensitivity, phased, with_weight_zero_point

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2


def cpu_peaks() -> dict:
    """This CPU's nominal multiply-adds per cycle and core, from /proc/cpuinfo (the clock is the one the
    VM reports; turbo may run above it).

    fp32: two FMA pipes of 16 float lanes (AVX-512) or 8 (AVX2); AMD's Zen 4 runs AVX-512 on two
    256-bit pipes, so 8 lanes there. int8 VNNI (vpdpbusd: 4 u8 x s8 products per 32-bit lane) on
    the same pipes: 4x fp32. AMX-int8 (Intel only): a 16x64 by 64x16 tile product per 16 cycles,
    1024 per cycle. 0 where the CPU lacks the instructions.
    """
    from edgegen.runtime.bench import machine_info

    info, m = Path("/proc/cpuinfo").read_text(), machine_info()         # vendor and clock; flags and cores
    flags = set(m["isa"])
    lanes = 16 if "avx512f" in flags and "AuthenticAMD" not in info else 8
    fp32 = 2 * lanes
    return {"cpu": machine(), "cores": m["cores"],
            "ghz": float(re.search(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M).group(1)) / 1e3,
            "fp32": fp32, "vnni": 4 * fp32 if {"avx512_vnni", "avx_vnni"} & flags else 0,
            "amx": 1024 if "amx_int8" in flags else 0}


def steady_malloc() -> None:
    """Keep glibc's malloc from giving large freed blocks back to the OS after every call.

    PyTorch's CPU tensors come from malloc. With onnxruntime sessions in the same process, glibc's
    adaptive mmap threshold made each batch-64 activation an mmap/munmap pair, and the page faults
    slowed eager by up to 1.6x (measured: 700-800 against 1,200 img/s alone). Fixed thresholds give
    eager the speed it has in a process of its own; onnxruntime allocates from its own arena.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:                                                          # not glibc: nothing to tune
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3               # <malloc.h>
    libc.mallopt(m_mmap_threshold, 32 << 20)                                 # glibc's largest
    libc.mallopt(m_trim_threshold, 1 << 30)
    libc.mallopt(m_top_pad, 256 << 20)


def build(work: Path, upsample: str = "nearest", width: int = 32):
    """Seeded default GAN (or one ``upsample`` / ``width`` away) -> fp32, int8, fp16 files;
    returns (generator, paths, int8 meta)."""
    import torch

    from edgegen.export import export_run, quantize_model
    from edgegen.training.checkpoint import LoadedRun
    from edgegen.training.models.gan import GANConfig, Generator, recompute_bn_stats
    from edgegen.training.train import GAN_ACT_CLIP

    torch.manual_seed(0)
    cfg = GANConfig(upsample=upsample, width=width, act_clip=GAN_ACT_CLIP)    # as `edgegen train gan` makes it
    gen = Generator(cfg)
    recompute_bn_stats(gen, batches=4, batch_size=128)
    gen.eval()
    paths = {m: work / f"gan-{upsample}-{width}.{m}.onnx" for m in ("fp32", "int8", "fp16")}
    export_run(LoadedRun("gan", gen, cfg.to_dict(), {}, 0, work / "last.pt", {}), paths["fp32"])
    meta8 = quantize_model(paths["fp32"], paths["int8"], mode="int8", force=True)   # gates measured, shown below
    quantize_model(paths["fp32"], paths["fp16"], mode="fp16", force=True)
    return gen, paths, meta8


def interleaved(runners: dict, batch: int, rounds: int = 15, seconds: float = 0.15,
                settle: float = 0.05) -> dict[str, np.ndarray]:
    """Images/s of every engine in each of ``rounds`` rounds, the engines timed back to back within a
    round in rotating order, so the shared machine's drifting load hits all of them alike.

    ``runners`` maps a name to a no-argument callable that makes one batch of ``batch`` images.
    Each engine's turn starts ``settle`` seconds after the last one's: the thread pools of PyTorch
    (OpenMP) and of spinning onnxruntime sessions spin-wait after their last call, and without the
    pause they take cores from the next engine (measured: eager at batch 64 1.5x slower).
    """
    names = list(runners)
    for run in runners.values():
        run()                                                                # warm-up: allocations, packing
    out: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            time.sleep(settle)
            t0, n = time.perf_counter(), 0
            while (dt := time.perf_counter() - t0) < seconds or n == 0:
                runners[k]()
                n += 1
            out[k].append(batch * n / dt)
    return {k: np.array(v) for k, v in out.items()}


def torch_runner(gen, batch: int, threads: int):
    """PyTorch eager, inference mode, one batch including the pixel conversion, on ``threads`` threads."""
    import torch

    from edgegen.export.fold import to_pixels

    z = torch.randn(batch, gen.cfg.latent_dim)

    def run() -> None:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            to_pixels(gen(z))
    return run


def with_eager(gen, batch: int, runners: dict) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``interleaved`` for ``runners`` and PyTorch eager on 2 and on 1 threads; (images/s per name, eager
    images/s per round). Eager is the better of its two thread counts in each round: under load, torch's
    2 OpenMP threads spin-wait on each other and collapse (3 img/s at batch 1 measured with a training
    job on the other core), so the comparison never flatters onnxruntime."""
    ips = interleaved({"torch2": torch_runner(gen, batch, 2), "torch1": torch_runner(gen, batch, 1), **runners}, batch)
    return ips, np.maximum(ips["torch2"], ips["torch1"])


def ort_runner(model: bytes, meta, batch: int, mode: str = "desktop"):
    """onnxruntime as edgegen's sessions run it (2 threads, NHWC transformer skipped), one batch of
    pixels. ``mode`` is the runtime's session mode: ``desktop`` turns onnxruntime's spin-waiting
    between runs off, ``batch`` keeps it (onnxruntime's default, as PyTorch's OpenMP threads spin)."""
    from edgegen.export import onnx_io
    from edgegen.runtime.generator import _open_session, session_options

    sess, _ = _open_session(model, "benchmark model", session_options(mode, THREADS))
    z, labels = onnx_io.seeded_latents(meta, batch, 0)
    feed = onnx_io.feeds(meta, z, labels)
    return lambda: sess.run(None, feed)


def quartiles(x: np.ndarray) -> list[float]:
    return [round(float(np.percentile(x, q)), 3) for q in (50, 25, 75)]


COLD = r"""
import time, sys
t0 = time.perf_counter()
import numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.intra_op_num_threads = 2
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"], disabled_optimizers=["NhwcTransformer"])
img = s.run(None, {"z": np.zeros((1, 64), np.float32)})[0]
t1 = time.perf_counter()
assert "torch" not in sys.modules and img.dtype == np.uint8
print(t1 - t0)
"""


def cold_start(path: Path, runs: int = 3) -> tuple[float, float]:
    """(in-process seconds: import + session + first image, whole process wall seconds), best of ``runs``."""
    inner, outer = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", COLD, str(path)], capture_output=True, text=True, check=True)
        outer.append(time.perf_counter() - t0)
        inner.append(float(out.stdout.strip()))
    return min(inner), min(outer)


def measure(work: Path, levers: bool) -> dict:
    from edgegen.export import onnx_io, quantize_model

    gen, paths, meta8 = build(work)
    meta = meta8
    res: dict = {"peaks": cpu_peaks(), "macs_per_image": meta.extra["macs_per_image"], "gates_int8": meta.extra["gates"]}
    for b in (1, 64):
        runners = {m: ort_runner(p.read_bytes(), meta, b) for m, p in paths.items()}
        runners.update({f"{m}_spin": ort_runner(paths[m].read_bytes(), meta, b, "batch") for m in ("fp32", "int8")})
        ips, eager = with_eager(gen, b, runners)
        for k, v in ips.items():
            res[f"{k}_b{b}"] = float(np.median(v))
        res[f"torch_b{b}"] = float(np.median(eager))
        res[f"ratios_b{b}"] = {name: quartiles(ips[a] / (eager if d == "eager" else ips[d])) for name, a, d in (
            ("int8/fp32", "int8", "fp32"), ("fp32/eager", "fp32", "eager"), ("int8/eager", "int8", "eager"),
            ("fp32 spinning/eager", "fp32_spin", "eager"), ("int8 spinning/eager", "int8_spin", "eager"))}
    res["sizes"] = {m: p.stat().st_size for m, p in paths.items()}
    res["cold_inner_s"], res["cold_process_s"] = cold_start(paths["int8"])
    if levers:
        _, ps_paths, ps_meta = build(work, "pixelshuffle")
        res["pixelshuffle"] = {}
        for b in (1, 64):
            ips = interleaved({"nearest_int8": ort_runner(paths["int8"].read_bytes(), meta, b),
                               "fp32": ort_runner(ps_paths["fp32"].read_bytes(), ps_meta, b),
                               "int8": ort_runner(ps_paths["int8"].read_bytes(), ps_meta, b)}, b)
            res["pixelshuffle"].update({f"{k}_b{b}": float(np.median(v)) for k, v in ips.items()})
            res["pixelshuffle"][f"int8_vs_nearest_b{b}"] = quartiles(ips["int8"] / ips["nearest_int8"])
        res["pixelshuffle"]["macs_per_image"] = ps_meta.extra["macs_per_image"]
        # Layout lever: edgegen's sessions skip onnxruntime's NHWC transformer (runtime.generator); with
        # it, QLinearConv runs channels-last and so does the uint8 Resize between them, whose NHWC kernel
        # is slow (profiled: 34-42 % of int8 time). Same run, same session settings otherwise.
        # Timed alternately (the machine's load drifts): median and quartiles of the per-round ratio.
        for b in (1, 64):
            res[f"nhwc_off_speedup_b{b}"] = alternating_speedup(paths["int8"].read_bytes(), meta, b)
        # Exact phase rewrite of the up-blocks: 0.44x their multiply-adds, pixels equal up to float rounding.
        # Four convs + Concat, or one stacked conv + Slice; fp32, and quantized as edgegen quantizes.
        fp32, int8 = paths["fp32"].read_bytes(), paths["int8"].read_bytes()
        feed = onnx_io.feeds(meta, *onnx_io.seeded_latents(meta, 256, 1))
        ref = onnx_io.session(fp32, THREADS).run(None, feed)[0].astype(int)
        variants = {}
        for k, single in (("phased", False), ("phased1", True)):
            (work / f"{k}.onnx").write_bytes(phased(fp32, single))
            gates = quantize_model(work / f"{k}.onnx", work / f"{k}.int8.onnx", force=True, speed_gate=False).extra["gates"]
            variants[k], variants[f"{k}_int8"] = (work / f"{k}.onnx").read_bytes(), (work / f"{k}.int8.onnx").read_bytes()
            res[k] = {"max_pixel_diff": int(np.abs(ref - onnx_io.session(variants[k], THREADS).run(None, feed)[0]).max()),
                      "int8_within_2": gates["within_2_frac"]}
        for b in (1, 64):
            ips = interleaved({"fp32": ort_runner(fp32, meta, b), "int8": ort_runner(int8, meta, b),
                               **{k: ort_runner(v, meta, b) for k, v in variants.items()}}, b)
            for k in ("phased", "phased1"):
                res[k][f"fp32_b{b}"] = quartiles(ips[k] / ips["fp32"])
                res[k][f"int8_b{b}"] = quartiles(ips[f"{k}_int8"] / ips["int8"])
        # Channel-count lever: narrower default GANs (fewer multiply-adds), eager and onnxruntime side by side.
        res["widths"] = {}
        for width in (16, 24):
            w_gen, w_paths, w_meta = build(work, width=width)
            row = {"macs_per_image": w_meta.extra["macs_per_image"]}
            for b in (1, 64):
                ips, eager = with_eager(w_gen, b, {m: ort_runner(w_paths[m].read_bytes(), w_meta, b)
                                                   for m in ("fp32", "int8")})
                row[f"b{b}"] = {"fp32/eager": quartiles(ips["fp32"] / eager), "int8/eager": quartiles(ips["int8"] / eager)}
            res["widths"][width] = row
        # AMX lever: the same int8 model with a weight zero point, which sends QLinearConv from MLAS's
        # VNNI indirect-conv kernel (symmetric weights) to im2col + its QGEMM, the path that can use AMX.
        for b in (1, 64):
            ips = interleaved({"sym": ort_runner(int8, meta, b), "zp": ort_runner(with_weight_zero_point(int8), meta, b)}, b)
            res[f"amx_path_speedup_b{b}"] = quartiles(ips["zp"] / ips["sym"])
        res["gemm"] = gemm_rates(gen)
        res["gemm"].update({f"int8_b{b}_s": best_of(ort_runner(int8, meta, b)) for b in (1, 64)})
        # Output-layer lever (edgegen.export.layout): the split output conv against one plain conv.
        for b in (1, 64):
            ips = interleaved({f"{m}{v}": ort_runner(data, meta, b) for m in ("fp32", "int8")
                               for v, data in (("", paths[m].read_bytes()), ("_plain", joined(paths[m].read_bytes())))}, b)
            res[f"split_speedup_b{b}"] = {m: quartiles(ips[m] / ips[f"{m}_plain"]) for m in ("fp32", "int8")}
    return res


def best_of(run, repeats: int = 20) -> float:
    """Fastest of ``repeats`` timed calls of ``run`` (after two warm-up calls), in seconds."""
    run(), run()
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_rates(gen, repeats: int = 20) -> dict:
    """Multiply-adds/s of onnxruntime's bare GEMMs, best of ``repeats``: a 2048-cube fp32 MatMul and
    u8 x s8 MatMulInteger (what this CPU's kernels reach at all), and MatMulInteger at the im2col
    shape of each up-block conv of ``gen`` at batch 1 and 64 (its multiply-adds as one plain GEMM)."""
    from onnx import helper, numpy_helper

    from edgegen.export import onnx_io

    def rate(m: int, k: int, n: int, dtype) -> tuple[float, float]:
        rng = np.random.default_rng(0)
        integer = dtype == np.uint8
        w = rng.integers(-100, 100, (k, n)).astype(np.int8) if integer else rng.standard_normal((k, n)).astype(np.float32)
        a = rng.integers(0, 255, (m, k)).astype(np.uint8) if integer else rng.standard_normal((m, k)).astype(np.float32)
        node = helper.make_node("MatMulInteger" if integer else "MatMul", ["a", "w"], ["y"])
        a_info = helper.make_tensor_value_info("a", helper.np_dtype_to_tensor_dtype(a.dtype), [m, k])
        graph = helper.make_graph([node], "gemm", [a_info], [helper.make_empty_tensor_value_info("y")],
                                  [numpy_helper.from_array(w, "w")])
        sess = onnx_io.session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), THREADS)
        best = best_of(lambda: sess.run(None, {"a": a}), repeats)
        return m * k * n / best, best

    out = {"fp32_2048": rate(2048, 2048, 2048, np.float32)[0], "int8_2048": rate(2048, 2048, 2048, np.uint8)[0]}
    side = gen.cfg.image_size // 2 ** len(gen.blocks)                        # the first block's input side
    for b in (1, 64):
        layers = []
        for i, block in enumerate(gen.blocks):
            o, c, kh, kw = block.conv.weight.shape
            hw = (2 * side * 2 ** i) ** 2                                    # output pixels (after the x2 resize)
            layers.append(rate(b * hw, c * kh * kw, o, np.uint8)[1])
        out[f"layers_b{b}_s"] = layers
    return out


def alternating_speedup(model: bytes, meta, batch: int, rounds: int = 15, seconds: float = 0.2) -> list[float]:
    """[median, 25th, 75th percentile] over ``rounds`` of (time with onnxruntime's NHWC transformer) /
    (time without it, as edgegen runs), the two sessions timed back to back in each round."""
    from edgegen.export import onnx_io

    sessions = [onnx_io.session(model, THREADS, disabled_optimizers=()), onnx_io.session(model, THREADS)]
    z, labels = onnx_io.seeded_latents(meta, batch, 0)
    feed = onnx_io.feeds(meta, z, labels)
    for s in sessions:
        s.run(None, feed)
    reps = max(1, int(seconds * 2000 / batch))
    ratios = []
    for _ in range(rounds):
        times = []
        for s in sessions:
            t0 = time.perf_counter()
            for _ in range(reps):
                s.run(None, feed)
            times.append(time.perf_counter() - t0)
        ratios.append(times[0] / times[1])
    return [round(float(np.percentile(ratios, q)), 3) for q in (50, 25, 75)]


def previous_figures(doc: Path) -> dict:
    """The raw figures of the export section already in ``doc`` ({} when there are none)."""
    text = doc.read_text() if doc.exists() else ""
    m = re.search(r"<!-- export:start -->.*?```json\n(.*?)\n```.*?<!-- export:end -->", text, re.S)
    return json.loads(m.group(1)) if m else {}


def ratio(r: dict, batch: int, name: str) -> str:
    """'1.83x (1.75-1.90)': median and quartiles of a per-round ratio."""
    med, lo, hi = r[f"ratios_b{batch}"][name]
    return f"{med:.2f}x ({lo:.2f}-{hi:.2f})"


def section(r: dict) -> str:
    """Markdown for the export section."""
    from edgegen.training.train import GAN_ACT_CLIP

    t1, t64 = r["torch_b1"], r["torch_b64"]
    pk = r["peaks"]
    per_cycle = pk["ghz"] * 1e9 * pk["cores"]
    clock = lambda k: f"{per_cycle * pk[k] / 1e9:,.0f} G/s = {pk['cores']} cores x {pk['ghz']:.1f} GHz x {pk[k]}"
    achieved = r["int8_b64"] * r["macs_per_image"]
    peak_fp32, fp32_b1 = per_cycle * pk["fp32"], r["fp32_b1"] * r["macs_per_image"]
    fp32_4x = 4 * t1 * r["macs_per_image"]                       # multiply-adds/s for 4x eager at batch 1
    s, g = r["sizes"], r["gates_int8"]
    eager = (f"PyTorch eager: 2 threads {r['torch2_b1']:,.0f} / {r['torch2_b64']:,.0f} img/s, 1 thread "
             f"{r['torch1_b1']:,.0f} / {r['torch1_b64']:,.0f} (batch 1 / 64); the table uses the better of the two.")
    rows = [f"| {name} | {r[f'{k}_b1']:,.0f} | {r[f'{k}_b1'] / t1:.1f}x | {r[f'{k}_b64']:,.0f} | "
            f"{r[f'{k}_b64'] / t64:.1f}x |" for name, k in (("PyTorch eager (best)", "torch"), ("onnxruntime fp32", "fp32"),
                                                            ("onnxruntime int8 (QDQ)", "int8"),
                                                            ("onnxruntime fp16 weights", "fp16"),
                                                            ("onnxruntime fp32, spinning", "fp32_spin"),
                                                            ("onnxruntime int8, spinning", "int8_spin"))]
    lines = [
        "## Export and quantization",
        "",
        f"Default 32x32 GAN (as `edgegen train gan` makes it: nearest-resize + Conv3x3 up-blocks, width 32, "
        f"ReLUs capped at {GAN_ACT_CLIP:g}, "
        f"{r['macs_per_image'] / 1e6:.1f} M multiply-adds per image), random weights with recomputed BN; "
        f"{THREADS} threads per engine, on {pk['cpu']} (shared). All engines are timed back to back in each of 15 "
        "rounds (rotating order, each turn 50 ms after the last so that spin-waiting threads have parked), so load "
        "drifts hit them alike: the table shows the median images/s, the ratios below the median (quartiles) of the "
        "per-round ratios. onnxruntime runs as edgegen's sessions do: without spin-waiting between runs (the "
        "runtime's `desktop` mode, the default), and with it (`batch` mode, onnxruntime's own default; PyTorch's "
        "OpenMP threads spin too). `python benchmarks/export_benchmark.py`.",
        "",
        "| engine | img/s batch 1 | vs eager | img/s batch 64 | vs eager |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
        f"- {eager}",
        f"- int8 / fp32 onnxruntime: {ratio(r, 1, 'int8/fp32')} at batch 1, {ratio(r, 64, 'int8/fp32')} at batch 64 "
        "(target >= 2x at batch 64).",
        f"- fp32 onnxruntime / eager at batch 1: {ratio(r, 1, 'fp32/eager')} (target >= 4x); int8 / eager: "
        f"{ratio(r, 1, 'int8/eager')} at batch 1 (target >= 6x), {ratio(r, 64, 'int8/eager')} at batch 64 (target >= 3x).",
        f"- Spinning (`batch` mode) / eager: fp32 {ratio(r, 1, 'fp32 spinning/eager')} at batch 1, "
        f"{ratio(r, 64, 'fp32 spinning/eager')} at batch 64; int8 {ratio(r, 1, 'int8 spinning/eager')} at batch 1, "
        f"{ratio(r, 64, 'int8 spinning/eager')} at batch 64.",
        f"- int8 achieved {achieved / 1e9:.0f} G multiply-adds/s at batch 64: "
        + (f"{100 * achieved / (per_cycle * pk['vnni']):.1f} % of the VNNI peak ({clock('vnni')})"
           if pk["vnni"] else "this CPU has no VNNI")
        + (f" and {100 * achieved / (per_cycle * pk['amx']):.1f} % of the AMX-int8 peak ({clock('amx')})" if pk["amx"]
           else "; it has no AMX") + ". "
        f"fp32 onnxruntime achieved {fp32_b1 / 1e9:.0f} G multiply-adds/s at batch 1, "
        f"{100 * fp32_b1 / peak_fp32:.0f} % of the fp32 FMA peak ({clock('fp32')}"
        f"{'; over 100 %: the cores run faster than the clock the VM reports' if fp32_b1 > peak_fp32 else ''}); "
        "4x eager at batch 1 "
        f"would take {fp32_4x / 1e9:.0f} G/s, {100 * fp32_4x / peak_fp32:.0f} % of that peak over the whole graph."
        + ("" if "gemm" not in r else
           f" Measured beside them (kernel lever below), bare 2048-cube GEMMs run at {r['gemm']['fp32_2048'] / 1e9:.0f} "
           f"G/s (fp32) and {r['gemm']['int8_2048'] / 1e9:.0f} G/s (u8 x s8): int8 at batch 64 reaches "
           f"{100 * achieved / r['gemm']['int8_2048']:.0f} % of the latter, fp32 at batch 1 "
           f"{100 * fp32_b1 / r['gemm']['fp32_2048']:.0f} % of the former, and 4x eager would need "
           f"{100 * fp32_4x / r['gemm']['fp32_2048']:.0f} % of it."),
        f"- Cold start (import onnxruntime + numpy, open the int8 session, first image; no torch in the process): "
        f"{r['cold_inner_s']:.3f} s in-process, {r['cold_process_s']:.3f} s including interpreter start (target <= 0.5 s).",
        f"- Sizes: fp32 {s['fp32'] / 1e3:,.0f} kB, int8 {s['int8'] / 1e3:,.0f} kB ({s['fp32'] / s['int8']:.2f}x smaller, "
        f"target 3.9x), fp16 {s['fp16'] / 1e3:,.0f} kB ({s['fp32'] / s['fp16']:.2f}x, target 1.95x).",
        f"- int8 gates on this random-weight model: median PSNR {g['psnr_median_db']:.1f} dB (gate 35), "
        f"{100 * g['within_2_frac']:.1f} % of pixels within 2/255 (gate 99 %), gate speed check "
        f"{g.get('int8_img_s_b64', 0):,.0f} vs {g.get('fp32_img_s_b64', 0):,.0f} img/s; "
        f"onnxruntime runs {sum(v for k, v in g['runtime_ops'].items() if k.endswith('QLinearConv'))} QLinearConv, "
        "the Linear as a "
        "float Gemm on int8-stored weights (weight-only), the output conv in float.",
    ]
    if "pixelshuffle" in r:
        p = r["pixelshuffle"]
        lines += [
            f"- Architecture lever, `upsample=\"pixelshuffle\"` (conv at low resolution, then DepthToSpace; "
            f"{p['macs_per_image'] / 1e6:.1f} M MACs): fp32 {p['fp32_b1']:,.0f} / {p['fp32_b64']:,.0f} img/s, "
            f"int8 {p['int8_b1']:,.0f} / {p['int8_b64']:,.0f} img/s (batch 1 / 64), timed in rounds with the nearest "
            f"int8 model: int8 pixel-shuffle / nearest {p['int8_vs_nearest_b1'][0]:.2f}x at batch 1, "
            f"{p['int8_vs_nearest_b64'][0]:.2f}x at batch 64.",
            "- Layout lever: edgegen skips onnxruntime's NHWC transformer (QLinearConv and the uint8 Resize stay "
            "NCHW). int8 speed without it / with it (onnxruntime's default), two sessions timed alternately, median "
            f"(quartiles) of 15 rounds: batch 1 {r['nhwc_off_speedup_b1'][0]:.2f}x ({r['nhwc_off_speedup_b1'][1]:.2f}-"
            f"{r['nhwc_off_speedup_b1'][2]:.2f}), batch 64 {r['nhwc_off_speedup_b64'][0]:.2f}x "
            f"({r['nhwc_off_speedup_b64'][1]:.2f}-{r['nhwc_off_speedup_b64'][2]:.2f}).",
        ]
    if "phased1" in r:
        q = lambda k, m, b: "{:.2f}x ({:.2f}-{:.2f})".format(*r[k][f"{m}_b{b}"])
        each = lambda k: (f"largest pixel difference {r[k]['max_pixel_diff']}; fp32 {q(k, 'fp32', 1)} at batch 1, "
                          f"{q(k, 'fp32', 64)} at batch 64; int8 ({100 * r[k]['int8_within_2']:.1f} % of pixels within "
                          f"2/255 of its fp32) {q(k, 'int8', 1)} at batch 1, {q(k, 'int8', 64)} at batch 64")
        int8_best = max(r[k][f"int8_b{b}"][0] for k in ("phased", "phased1") for b in (1, 64))
        lines += [
            "- Compute lever, the exact phase rewrite (`phased()` here): each nearest x2 Resize + Conv3x3 becomes 2x2 "
            "convs on the low-resolution input, one per output phase, 0.44x the up-blocks' multiply-adds. Speed "
            "rewritten / as exported, median (quartiles) of 15 interleaved rounds, the int8 files quantized as "
            "`edgegen quantize` does:",
            f"  - four convs + Concat + DepthToSpace: {each('phased')};",
            "  - one conv with the four phases' filters stacked (computing one extra row and column, which the Slice "
            f"drops) + DepthToSpace + Slice: {each('phased1')}.",
            "  - The interleave (onnxruntime's DepthToSpace, and the layout reorders around it) eats much of what the "
            "convs save at batch 1. "
            + ("In int8, which is what edgegen ships, both are slower than the plain conv, so no edgegen file "
               "uses the rewrite." if int8_best < 1 else
               f"In int8 the better variant is {int8_best:.2f}x: a candidate for the export."),
        ]
    if "widths" in r:
        wr = lambda w, b, k: "{:.2f}x".format(r["widths"][w][f"b{b}"][k][0])
        meets = [w for w in r["widths"] if r["widths"][w]["b1"]["fp32/eager"][0] >= 4
                 and r["widths"][w]["b1"]["int8/eager"][0] >= 6]
        lines.append(
            "- Channel-count lever: narrower up-blocks, fewer multiply-adds, for eager and onnxruntime alike. "
            "Engine / eager, median of 15 interleaved rounds, batch 1 and batch 64: " + "; ".join(
                f"width {w} ({r['widths'][w]['macs_per_image'] / 1e6:.1f} M MACs) fp32 {wr(w, 1, 'fp32/eager')} and "
                f"{wr(w, 64, 'fp32/eager')}, int8 {wr(w, 1, 'int8/eager')} and {wr(w, 64, 'int8/eager')}"
                for w in sorted(r["widths"], key=int)) +
            f"; width 32 (the default, above) fp32 {r['ratios_b1']['fp32/eager'][0]:.2f}x and "
            f"{r['ratios_b64']['fp32/eager'][0]:.2f}x, int8 {r['ratios_b1']['int8/eager'][0]:.2f}x and "
            f"{r['ratios_b64']['int8/eager'][0]:.2f}x. Widths meeting both batch-1 targets (fp32 4x, int8 6x): "
            f"{', '.join(map(str, meets)) or 'none'}.")
    if "gemm" in r:
        gm, amx = r["gemm"], lambda b: "{:.2f}x ({:.2f}-{:.2f})".format(*r[f"amx_path_speedup_b{b}"])
        floor = lambda b: " + ".join(f"{1e6 * t / b:.0f}" for t in gm[f"layers_b{b}_s"]) + \
            f" = {1e6 * sum(gm[f'layers_b{b}_s']) / b:.0f} us"
        lines += [
            "- Kernel lever (AMX): " + (
                "this CPU has AMX-int8, and onnxruntime's MLAS uses it for large GEMMs: "
                if pk["amx"] else "this CPU has no AMX-int8, so MLAS's int8 GEMMs run on VNNI: ") +
            f"a 2048-cube u8 x s8 MatMulInteger runs at {gm['int8_2048'] / 1e9:,.0f} G multiply-adds/s and a 2048-cube "
            f"fp32 MatMul at {gm['fp32_2048'] / 1e9:.0f} G/s (best of 20 each), {gm['int8_2048'] / gm['fp32_2048']:.1f}x "
            f"apart, where VNNI alone allows {pk['vnni'] // pk['fp32']}x ({pk['vnni']} against {pk['fp32']} "
            "multiply-adds per cycle). QLinearConv with symmetric int8 weights, as edgegen writes them, runs MLAS's "
            "indirect-conv kernel; the same model with a weight zero point (-1: same pixels) takes the im2col + QGEMM "
            f"path, the one that can use AMX: speed {amx(1)} at batch 1, {amx(64)} at batch 64 "
            "(median (quartiles) of 15 interleaved rounds, against the model as written).",
            f"- The up-block convs' GEMM floor: a bare MatMulInteger of each up-block's im2col shape (best of 20) takes "
            f"{floor(1)} per image at batch 1, {floor(64)} per image at batch 64, against "
            f"{1e6 * gm['int8_b1_s']:.0f} us and {1e6 * gm['int8_b64_s'] / 64:.0f} us for a whole int8 image (best of 20).",
        ]
    if "split_speedup_b1" in r:
        sp = lambda b, m: "{:.2f}x ({:.2f}-{:.2f})".format(*r[f"split_speedup_b{b}"][m])
        lines += [
            "- Output-layer lever (`edgegen.export.layout`): the output conv split into taps and a summing conv, "
            "both 3-D, against one plain conv that onnxruntime pads to 16 output channels; speed with the split / "
            f"without, median (quartiles) of 15 interleaved rounds: fp32 {sp(1, 'fp32')} at batch 1, "
            f"{sp(64, 'fp32')} at batch 64; int8 {sp(1, 'int8')} at batch 1, {sp(64, 'int8')} at batch 64.",
        ]
    if "sensitivity" in r:
        sens = r["sensitivity"]["layers"]
        lines += [
            f"- Where the trained GAN's int8 error comes from (`{r['sensitivity']['model']}`"
            f"{', carried from the previous run of this benchmark' if r['sensitivity'].get('carried') else ''}), "
            "pixels within 2/255 of "
            f"fp32: int8 as written by `edgegen quantize` {100 * sens['int8']:.1f} %; its 8-bit weights alone "
            f"(activations float) {100 * sens['weights only']:.2f} %; 8-bit activations alone (weights float) "
            f"{100 * sens['activations only']:.2f} %. Both halves now cost about the same; with plain ReLUs "
            "the activations cost the most (97.45 % in all, activations alone 98.1 %: the activation-cap section).",
        ]
    lines += ["", "<details><summary>raw figures</summary>", "", "```json",
              json.dumps({k: v for k, v in r.items() if k != "gates_int8"}, indent=1, default=float), "```",
              "", "</details>"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--no-levers", action="store_true", help="skip the pixel-shuffle comparison")
    ap.add_argument("--sensitivity", metavar="FP32_ONNX",
                    help="also measure where the int8 error of this (trained) fp32 export comes from")
    args = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    steady_malloc()
    with tempfile.TemporaryDirectory() as tmp:
        res = measure(Path(tmp), levers=not args.no_levers)
    if args.sensitivity:
        res["sensitivity"] = {"model": Path(args.sensitivity).name, "layers": layer_sensitivity(Path(args.sensitivity))}
    elif "sensitivity" in (old := previous_figures(Path(args.doc))):
        # Needs the shipped GAN's fp32 export (make models); keep the last measured figures, marked as such.
        res["sensitivity"] = {**old["sensitivity"], "carried": True}
    text = section(res)
    print(text)
    write_section("export", text, Path(args.doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
