"""Quality and speed gates for quantized models, measured against the fp32 model they came from.

Quality is measured on the uint8 pixels the apps receive, on fixed latents the calibration never
saw: per-image PSNR (median over images, capped at 100 dB for identical images) and the fraction
of pixels within 2/255. When torch, the evaluation classifier and the model's training data are
all available, the FCD change (int8 vs fp32 samples, both against the data's test split) is added.
Speed is images per second at a fixed batch with 2 intra-op threads, best of a few repetitions
(best, not mean: the machine is shared and we want the kernel's speed, not the neighbours' load).
"""

from __future__ import annotations

import time

import numpy as np

from edgegen.export import onnx_io
from edgegen.modelmeta import ModelMeta

PSNR_CAP = 100.0
GATE_N, GATE_SEED = 256, 4321   # quality latents: disjoint seed from calibration (0) and parity (1234)
FCD_N, FCD_SEED = 2000, 999


def image_quality(ref: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """PSNR (median, min over images) and pixel agreement of uint8 images ``test`` vs ``ref`` (N, H, W, C)."""
    diff = test.astype(np.float64) - ref.astype(np.float64)
    mse = (diff ** 2).reshape(len(ref), -1).mean(axis=1)                      # (N,)
    psnr = np.where(mse > 0, 10.0 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12)), PSNR_CAP)
    psnr = np.minimum(psnr, PSNR_CAP)
    return {"psnr_median_db": round(float(np.median(psnr)), 3), "psnr_min_db": round(float(psnr.min()), 3),
            "within_2_frac": round(float(np.mean(np.abs(diff) <= 2.0)), 6),
            "max_abs_diff": int(np.abs(diff).max())}


def generate(model, meta: ModelMeta, n: int, seed: int, batch: int = 64) -> np.ndarray:
    """``n`` uint8 images (N, H, W, C) from an ONNX generator on seeded latents (1 thread: deterministic)."""
    z, labels = onnx_io.seeded_latents(meta, n, seed)
    return onnx_io.run_batched(onnx_io.session(model, threads=1), meta, z, labels, batch=batch)[0]


def throughput(model, meta: ModelMeta, batch: int, threads: int = 2, reps: int = 5,
               min_seconds: float = 0.3) -> float:
    """Images per second of ``model`` at ``batch`` (best of ``reps`` timed runs after one warm-up)."""
    sess = onnx_io.session(model, threads=threads)
    z, labels = onnx_io.seeded_latents(meta, batch, 0)
    feed = onnx_io.feeds(meta, z, labels)
    sess.run(None, feed)                                                     # warm-up: allocations, packing
    best = float("inf")
    for _ in range(reps):
        t0, k = time.perf_counter(), 0
        while True:                                                          # loop long enough to time reliably
            sess.run(None, feed)
            k += 1
            dt = time.perf_counter() - t0
            if dt >= min_seconds / reps:
                break
        best = min(best, dt / k)
    return batch / best


def fcd_change(meta: ModelMeta, ref_model, test_model) -> dict:
    """FCD of fp32 and quantized samples against the training data's test split, when that is possible.

    Needs torch, ``edgegen.training.evaluate`` with its classifier, and ``meta.data_name`` loadable;
    otherwise returns ``{"fcd": "skipped: <reason>"}`` so the metadata says why it is absent.
    """
    try:
        from edgegen.errors import EdgegenError
        from edgegen.training.data import load_dataset
        from edgegen.training.evaluate import Evaluator
    except ImportError as e:
        return {"fcd": f"skipped: {e.name or 'torch'} not importable"}
    if not meta.data_name:
        return {"fcd": "skipped: the model names no training data"}
    try:
        reference = load_dataset(meta.data_name, "test", size=meta.image_size, channels=meta.channels)
        ev = Evaluator.for_data(meta.data_name, reference)
    except (EdgegenError, OSError) as e:
        return {"fcd": f"skipped: {str(e).splitlines()[0]}"}
    if ev is None:
        return {"fcd": f"skipped: no evaluation classifier for {meta.data_name}"}
    a = ev.fcd(generate(ref_model, meta, FCD_N, FCD_SEED))
    b = ev.fcd(generate(test_model, meta, FCD_N, FCD_SEED))
    return {"fcd_fp32": round(a, 4), "fcd_quantized": round(b, 4), "fcd_change_rel": round((b - a) / a, 5),
            "fcd_n": FCD_N}
