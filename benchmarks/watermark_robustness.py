"""Watermark robustness benchmark: the table of issue 5, measured, into docs/benchmarks.md.

Stand-ins for generated images: Fashion-MNIST test images resized to 64 x 64 and 32 x 32.
Measures PSNR, the detection rate at p <= 1e-6 per attack, payload exactness after JPEG
q75, false alarms on all 70,000 unmarked Fashion-MNIST images (28 x 28) and on images
marked with another key, the fit of the matching-bit count to Binomial(n, 1/2), and
embed + detect speed; writes the section between ``<!-- watermark:start -->`` and
``<!-- watermark:end -->`` (other sections survive) and ``docs/img/watermark.png``.

    python benchmarks/watermark_robustness.py [--n 1000] [--null-n 70000]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
from scipy import stats

from edgegen.fileio import atomic_write, write_bytes_atomic
from edgegen.safety.attacks import ATTACKS
from edgegen.safety.watermark import Watermarker
from edgegen.training.data import load_dataset

ROOT = Path(__file__).resolve().parents[1]
KEY, OTHER = bytes(range(32)), bytes(range(100, 132))
START, END = "<!-- watermark:start -->", "<!-- watermark:end -->"
TARGETS = {  # attack -> (64 px target, 32 px target) detection rates from the issue
    "none": (99, 99), "JPEG q90": (99, 99), "JPEG q75": (99, 99), "JPEG q75 (Pillow)": (99, 99),
    "JPEG q50": (98, 95), "noise σ=5": (98, 95), "brightness +20": (98, 95), "brightness −20": (98, 95),
    "contrast ×0.8": (98, 95), "contrast ×1.2": (98, 95), "resize ×0.75": (97, 90), "resize ×2": (97, 90),
    "blur σ=1": (90, None), "resize ×0.5": (90, None),
}


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    mse = ((a.astype(np.float64) - b) ** 2).reshape(len(a), -1).mean(1)
    return 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12))


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), platform.processor())
    return f"{model}, {len(__import__('os').sched_getaffinity(0))} cores"


def run_size(wm: Watermarker, size: int, n: int, payloads: np.ndarray) -> dict:
    x = load_dataset("fashion-mnist", split="test", size=size, channels=1).images[:n, :, :, 0]
    marked = wm.embed(x, payloads)
    q = psnr(marked, x)
    res = {"psnr_mean": float(10 * np.log10(255 ** 2 / np.mean(10 ** (-q / 10) * 255 ** 2))),
           "psnr_min": float(q.min()), "x": x, "marked": marked, "rates": {}, "margin": {}}
    for name, attack in ATTACKS.items():
        dets = wm.detect(attack(marked))
        res["rates"][name] = 100.0 * np.mean([d.detected for d in dets])
        # log10 p of the median image: how far the typical image is from the threshold
        res["margin"][name] = float(np.median(np.log10([max(d.p_value, 1e-300) for d in dets])))
        if name == "JPEG q75":
            ok = [d.payload == p for d, p in zip(dets, payloads) if d.detected]
            res["payload_q75"] = 100.0 * float(np.mean(ok)) if ok else 0.0
    return res


def speed(wm: Watermarker, size: int = 32, n: int = 4000) -> tuple[float, float]:
    """Best of 3 timed runs (the 2 cores are shared, so single runs vary by up to 2x)."""
    x = load_dataset("fashion-mnist", split="test", size=size, channels=1).images[:n, :, :, 0]
    te = td = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        m = wm.embed(x, 7)
        t1 = time.perf_counter()
        wm.detect(m)
        t2 = time.perf_counter()
        te, td = min(te, t1 - t0), min(td, t2 - t1)
    return n / te, n / td


def null_check(wm: Watermarker, null_n: int) -> dict:
    train = load_dataset("fashion-mnist", split="train").images[..., 0]
    test = load_dataset("fashion-mnist", split="test").images[..., 0]
    x = np.concatenate([train, test])[:null_n]
    alarms, matches = 0, []
    for i in range(0, len(x), 5000):
        chunk = x[i:i + 5000]
        alarms += sum(d.detected for d in wm.detect(chunk))
        matches.append(wm.scores(chunk)[1][:, 0])       # identity hypothesis: Binomial(n, 1/2) under the null
    k = np.concatenate(matches)
    n = wm.n_sync
    observed = np.bincount(k, minlength=n + 1)
    expected = stats.binom.pmf(np.arange(n + 1), n, 0.5) * len(k)
    keep = expected >= 5                               # chi-square on bins with enough mass, tails pooled
    obs = np.concatenate([observed[keep], [observed[~keep].sum()]])
    exp = np.concatenate([expected[keep], [expected[~keep].sum()]])
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    dof = len(obs) - 1
    return {"n": len(x), "alarms": alarms, "k_mean": float(k.mean()), "k_var": float(k.var()), "bits": n,
            "chi2": chi2, "dof": dof, "chi2_p": float(stats.chi2.sf(chi2, dof))}


def picture(res64: dict, path: Path) -> None:
    """Rows: unmarked, marked, |difference| x 20, for 8 images at 64 x 64."""
    x, m = res64["x"][:8], res64["marked"][:8]
    diff = np.clip(np.abs(m.astype(np.int16) - x) * 20, 0, 255).astype(np.uint8)
    grid = np.concatenate([np.concatenate(list(r), axis=1) for r in (x, m, diff)], axis=0)
    grid = cv2.resize(grid, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    ok, buf = cv2.imencode(".png", grid)
    write_bytes_atomic(path, buf.tobytes())


def required_psnr(psnr_now: float, margin_log10p: float, threshold: float = 1e-6) -> float:
    """Rough PSNR at which the median image would reach the threshold: the Chernoff exponent
    grows about linearly in mark energy at low SNR, so scale energy by log(p_needed)/log(p_now)."""
    if margin_log10p > -1e-3:                      # no signal left: no finite answer
        return float("nan")
    return psnr_now - 10 * np.log10(np.log10(threshold) / margin_log10p)


def write_section(text: str) -> None:
    doc = ROOT / "docs" / "benchmarks.md"
    old = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"{START}\n{text.rstrip()}\n{END}\n"
    if START in old and END in old:
        new = old[: old.index(START)] + block + old[old.index(END) + len(END):].lstrip("\n")
    else:
        new = old.rstrip("\n") + "\n\n" + block
    with atomic_write(doc, "w") as f:
        f.write(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="marked images per size")
    ap.add_argument("--null-n", type=int, default=70_000, help="unmarked images for the false-alarm check")
    args = ap.parse_args()
    wm, other = Watermarker(KEY), Watermarker(OTHER)
    payloads = (np.arange(args.n) * 40503) % (1 << wm.payload_bits)
    t0 = time.time()
    res = {s: run_size(wm, s, args.n, payloads) for s in (64, 32)}
    wrong = {s: int(sum(d.detected for d in other.detect(res[s]["marked"]))) for s in (64, 32)}
    null = null_check(wm, args.null_n)
    emb, det = speed(wm)
    (ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
    picture(res[64], ROOT / "docs" / "img" / "watermark.png")

    def cell(size: int, name: str, i: int) -> str:
        r, tgt = res[size]["rates"][name], TARGETS.get(name, (None, None))[i]
        mark = "" if tgt is None else (" ✓" if r >= tgt else f" ✗ (target {tgt} %)")
        return f"{r:.1f} %{mark}"

    lines = [
        "## Watermark robustness (issue 5)",
        "",
        f"`python benchmarks/watermark_robustness.py --n {args.n}` on {cpu_model()}; "
        f"{time.time() - t0:.0f} s. Stand-ins: the first {args.n} Fashion-MNIST test images resized to 64 and 32 px "
        f"(grey), payloads varying per image; key fingerprint `{wm.fingerprint}`; threshold p ≤ 1e-6 "
        f"({wm.n_sync} sync projections, {len(wm.hypotheses)} hypotheses, Bonferroni-corrected).",
        "",
        f"Quality: 64×64 PSNR mean {res[64]['psnr_mean']:.2f} dB, min {res[64]['psnr_min']:.2f} dB "
        f"(target ≥ 40 / ≥ 36); 32×32 mean {res[32]['psnr_mean']:.2f} dB (target ≥ 38). "
        "Mean PSNR is computed from the mean MSE.",
        "",
        "| attack | 64×64 detected | median log10 p | 32×32 detected | median log10 p | PSNR the 32 px median image needs |",
        "|---|---|---|---|---|---|",
    ]
    for name in ATTACKS:
        need = required_psnr(res[32]["psnr_mean"], res[32]["margin"][name])
        need_s = "—" if np.isnan(need) or res[32]["margin"][name] <= -6 else f"≈ {need:.1f} dB"
        lines.append(f"| {name} | {cell(64, name, 0)} | {res[64]['margin'][name]:.1f} | {cell(32, name, 1)} | "
                     f"{res[32]['margin'][name]:.1f} | {need_s} |")
    lines += [
        "",
        f"Payload ({wm.payload_bits} bits) exact after JPEG q75 among detected images: "
        f"64×64 {res[64]['payload_q75']:.1f} %, 32×32 {res[32]['payload_q75']:.1f} % (target ≥ 95 %).",
        "",
        f"False alarms: {null['alarms']} of {null['n']:,} unmarked Fashion-MNIST images (28×28, train + test); "
        f"{wrong[64]} of {args.n} (64 px) and {wrong[32]} of {args.n} (32 px) images marked with a different key.",
        f"Matching sync bits on the unmarked images (identity hypothesis): mean {null['k_mean']:.3f} "
        f"(Binomial({null['bits']}, ½): {null['bits'] / 2}), variance {null['k_var']:.3f} ({null['bits'] / 4}); "
        f"χ² = {null['chi2']:.1f} on {null['dof']} d.o.f., p = {null['chi2_p']:.3f}.",
        "",
        f"Speed at 32×32 (one process, numpy on 2 shared cores, best of 3 runs of 4,000 images): embed {emb:,.0f} images/s, detect {det:,.0f} images/s, "
        f"embed + detect {1 / (1 / emb + 1 / det):,.0f} images/s (target ≥ 5,000).",
        "",
        "Tried and not kept: a brightness/contrast-invariant feature (the luma clamped to 24..231, so what "
        "those attacks clip does not matter) with the mark confined to pixels inside that range by a weighted "
        "least-norm solve. On Fashion-MNIST only 20-35 % of a 32 px image is inside the range, and 63 smooth "
        "global patterns restricted to it are badly conditioned: the same mark cost 2-5x the amplitude (PSNR "
        "21-30 dB), so brightness −20 and contrast ×1.2 stay misses of this global low-frequency design.",
        "",
        "The PSNR-needed column is a rough extrapolation (the Chernoff exponent scales about linearly "
        "with mark energy at low SNR); '—' where the median image already passes.",
        "",
        "![unmarked (top), marked (middle), |difference| × 20 (bottom), 64×64](img/watermark.png)",
    ]
    write_section("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
