"""Audit report: JSON for machines, one self-contained HTML page for people.

The HTML has no external resources: thumbnails are inline PNG data URIs, histograms inline SVG.
Every text that comes from data (paths, names, numbers) goes through :func:`html.escape`. A tiny
inline script only counts the pairs shown into the page header, which lets a headless browser
test prove that the page's scripts ran without error.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from typing import Any

import cv2
import numpy as np

from edgegen.fileio import atomic_write
from edgegen.safety.audit import Auditor


def _clean(obj: Any) -> Any:
    # JSON has no inf/nan and no numpy scalars.
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def report_dict(auditor: Auditor, sources: list[str] | None = None, per_image: bool = True) -> dict:
    """Summary, flagged examples and (optionally) the per-image scores as a JSON-ready dict."""
    out = {"summary": auditor.summary(),
           "flagged_examples": [{"image": i, "source": sources[i] if sources else None, **r.to_dict()}
                                for _, i, _, r in auditor.examples]}
    if per_image:
        out["scores"] = auditor.scores().tolist()
    return _clean(out)


def write_json(path: str | os.PathLike, report: dict) -> None:
    """Write the report dict atomically as indented JSON."""
    with atomic_write(path, "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
        f.write("\n")


def _png_uri(img: np.ndarray, scale: int = 3) -> str:
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    ok, buf = cv2.imencode(".png", img)
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def _histogram_svg(gen: np.ndarray, held: np.ndarray, threshold: float, bins: int = 40) -> str:
    """Overlaid density histograms (generated vs held-out scores) with the threshold line, as SVG."""
    gen, held = gen[np.isfinite(gen)], held[np.isfinite(held)]
    top = float(np.quantile(np.concatenate([gen, held, [threshold * 2]]), 0.995)) or 1.0
    edges = np.linspace(0.0, top, bins + 1)
    hg = np.histogram(np.clip(gen, 0, top), edges, density=True)[0] if len(gen) else np.zeros(bins)
    hh = np.histogram(np.clip(held, 0, top), edges, density=True)[0] if len(held) else np.zeros(bins)
    peak = max(float(hg.max()), float(hh.max()), 1e-9)
    w, h, pad = 560, 200, 30
    bw = (w - 2 * pad) / bins
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h + 40}" role="img" '
             f'aria-label="score histograms">']
    for hist, colour, cls in ((hh, "#4a7fb5", "held"), (hg, "#d9534f", "gen")):
        for i, v in enumerate(hist):
            bh = (h - pad) * float(v) / peak
            parts.append(f'<rect class="{cls}" x="{pad + i * bw:.1f}" y="{h - bh:.1f}" width="{bw:.1f}" '
                         f'height="{bh:.1f}" fill="{colour}" fill-opacity="0.5"/>')
    tx = pad + (w - 2 * pad) * min(threshold / top, 1.0)
    parts.append(f'<line x1="{tx:.1f}" y1="{pad / 2}" x2="{tx:.1f}" y2="{h}" stroke="#000" stroke-dasharray="4"/>')
    parts.append(f'<text x="{tx + 4:.1f}" y="{pad / 2 + 10}" font-size="11">threshold {threshold:.3f}</text>')
    parts.append(f'<line x1="{pad}" y1="{h}" x2="{w - pad}" y2="{h}" stroke="#000"/>')
    for v in np.linspace(0, top, 5):
        x = pad + (w - 2 * pad) * v / top
        parts.append(f'<text x="{x:.1f}" y="{h + 14}" font-size="10" text-anchor="middle">{v:.2f}</text>')
    parts.append(f'<text x="{pad}" y="{h + 32}" font-size="11"><tspan fill="#d9534f">&#9632; generated '
                 f'({len(gen)})</tspan> <tspan fill="#4a7fb5">&#9632; held-out ({len(held)})</tspan></text>')
    parts.append("</svg>")
    return "".join(parts)


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render_html(auditor: Auditor, title: str = "edgegen memorization audit", sources: list[str] | None = None) -> str:
    """The self-contained HTML report: summary, calibration, histograms, flagged pairs."""
    e = html.escape
    s = _clean(auditor.summary())
    dc = s["data_copying"]
    train = auditor.index.train_pixels()
    rows = [
        ("images audited", s["images"]), ("flagged as copies", s["flagged"]),
        ("blank / flat images (not matched)", s["blank"]),
        ("flagged fraction", s["flagged_fraction"]), ("expected fraction (calibration)", s["expected_fraction"]),
        ("p-value of excess flags (binomial)", s["excess_p_value"]),
        ("data-copying C_T (Meehan et al. 2020)", dc["statistic"]), ("C_T p-value (copying)", dc["p_value"]),
        ("cells used", len(dc["cells_used"])),
    ]
    cal = [("--fpr", s["fpr"]), ("score threshold", s["threshold"]),
           ("scales (plain, blurred RMS)", ", ".join(f"{x:.3f}" for x in s["scales"])),
           ("Hamming threshold at --fpr (pHash alone, for reference)", s["hamming_threshold"]),
           ("calibration images", s["index"]["calibration_images"]),
           ("index", s["index"]["path"]), ("index fingerprint", s["index"]["fingerprint"]),
           ("training data", f'{s["index"]["data"]} ({s["index"]["images"]} images, '
                             f'fingerprint {s["index"]["data_fingerprint"]})')]
    table = lambda items: "".join(f"<tr><th>{e(k)}</th><td>{e(_fmt(v))}</td></tr>" for k, v in items)  # noqa: E731
    pairs = []
    for score, i, img, r in auditor.examples:
        label = sources[i] if sources else f"image #{i}"
        pairs.append(
            f'<figure class="pair" data-image="{i}" data-train="{r.nearest_id}">'
            f'<img alt="{e(label)}" src="{_png_uri(img)}"><img alt="training image {r.nearest_id}" '
            f'src="{_png_uri(train[r.nearest_id])}"><figcaption>{e(label)} &harr; train #{r.nearest_id}<br>'
            f'score {score:.3f} &middot; {e(r.view)} &middot; {r.hamming} bits &middot; RMS {r.rms:.1f}'
            f"</figcaption></figure>")
    verdict = ("more copies than chance" if (s["excess_p_value"] or 1) < 0.01 else "no excess of copies")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;max-width:70em}} table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:.25em .6em;text-align:left}} th{{background:#f4f4f4;font-weight:normal}}
.pairs{{display:flex;flex-wrap:wrap;gap:1em}} .pair{{margin:0;border:1px solid #ddd;padding:.4em}}
.pair img{{image-rendering:pixelated;margin-right:2px}} figcaption{{font-size:.8em}}
</style></head><body>
<h1>{e(title)}</h1>
<p id="verdict">Verdict: <strong>{e(verdict)}</strong>. <span id="js-status">(script did not run)</span></p>
<h2>Summary</h2><table id="summary">{table(rows)}</table>
<h2>Calibration</h2><table id="calibration">{table(cal)}</table>
<h2>Score distributions</h2>
<p>Score = smallest normalised pixel distance to a candidate training image; copies score near 0.
Images left of the threshold are flagged.</p>
{_histogram_svg(auditor.scores(), np.asarray(auditor.index.arrays["heldout_scores"]), s["threshold"])}
<h2>Flagged images ({len(pairs)} shown of {s["flagged"]})</h2>
<p>Each generated image beside its nearest training image.</p>
<div class="pairs" id="pairs">{"".join(pairs) or "<p>None flagged.</p>"}</div>
<script>
document.getElementById("js-status").textContent =
  "pairs shown: " + document.querySelectorAll("#pairs .pair").length;
</script>
</body></html>
"""


def write_html(path: str | os.PathLike, auditor: Auditor, sources: list[str] | None = None,
               title: str = "edgegen memorization audit") -> None:
    """Write the HTML report atomically."""
    page = render_html(auditor, title, sources)
    with atomic_write(path, "w") as f:
        f.write(page)
