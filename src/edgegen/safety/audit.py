"""Memorization audit: which generated images are near-copies of a training image, and does the
model copy more than chance would explain?

Per image, two stages:

1. **Candidates by Hamming distance.** The image is hashed in six views (as is, mirrored, shifted
   one pixel back in four directions, :mod:`edgegen.safety.pixels`) and each view's 16 nearest
   training hashes are candidates. Flat images (blank or constant outputs) all hash alike, so they
   are reported as ``blank`` and never matched.
2. **Confirmation by pixel distance.** For every (view, candidate) pair: RMS distance of the
   mean-centred interior pixels, plain and Gaussian-blurred. Each is divided by its median on
   held-out images, and the image's ``score`` is the smallest value over pairs and both metrics.
   A copy scores near 0; a novel look-alike scores like held-out images.

Calibration (:func:`calibrate`): held-out images of the training distribution (the test split)
are scored the same way; the flag threshold is the held-out score quantile at ``fpr``, so a
novel image is flagged with probability ``fpr``. Scales, threshold, every held-out score and
the cells of the data-copying test are stored with the index; another ``--fpr`` re-thresholds
from the stored scores.

Per run (:meth:`Auditor.summary`): the flagged fraction against the expected rate (exact binomial
p-value), and Meehan, Chaudhuri & Dasgupta (2020)'s data-copying test: training images are split
into k-means cells, and within each cell the generated->train scores are compared with the
held-out->train scores by a Mann-Whitney U z-score; ``C_T`` is their average weighted by the
held-out share of each cell. ``C_T`` well below 0 means generated images sit closer to the
training set than fresh samples do (copying); the one-sided p-value tests that.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats
from scipy.cluster.vq import kmeans2

from edgegen.errors import EdgegenError
from edgegen.safety.index import SETTINGS, HashIndex
from edgegen.safety.phash import is_flat, phash_batch
from edgegen.safety.pixels import FEATURE_SCALE, VIEW_NAMES, features, quantize_features, rms_to_candidates, view

CELLS = 10            # k-means cells of the data-copying test
MIN_PER_CELL = 20     # cells with fewer generated or held-out images are left out of C_T
_CHUNK = 1024         # images per work unit (stage-2 gathers ~ 1024 x 16 x F floats per view)
_THREADS = 2


@dataclass(frozen=True)
class AuditResult:
    """Verdict on one image: flagged as a copy (or blank), its score and nearest training image."""

    flagged: bool
    blank: bool
    score: float          # min normalised distance; flagged when < threshold; inf when blank
    nearest_id: int       # training image of the best match (-1 when blank)
    view: str             # which query view matched (as-is, mirrored, shift-...)
    hamming: int          # pHash bits between that view and the training image (-1 when blank)
    rms: float            # plain RMS pixel distance of the best pair
    rms_blur: float       # blurred RMS pixel distance of the best pair
    cell: int = -1        # k-means cell of the data-copying test (-1: index without cells)

    def to_dict(self) -> dict:
        """JSON-ready fields (inf -> None)."""
        d = asdict(self)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


# ----------------------------------------------------------------------------- shared matching


def _train_features(index: HashIndex) -> tuple[np.ndarray, np.ndarray]:
    """Plain and blurred training features as int16 (N, F) (:func:`quantize_features`), cached."""
    cache = getattr(index, "_feature_cache", None)
    if cache is None:
        pixels = index.train_pixels()
        out = []
        for blur in (False, True):
            out.append(np.concatenate([quantize_features(features(pixels[s:s + 8192], blur))
                                       for s in range(0, len(pixels), 8192)]))
        cache = index._feature_cache = tuple(out)
    return cache  # type: ignore[return-value]


def _check_images(index: HashIndex, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise EdgegenError(f"audit needs uint8 images (N, H, W, C), got {images.dtype} {images.shape}")
    if tuple(images.shape[1:]) != index.image_shape:
        h, w, c = index.image_shape
        raise EdgegenError(f"images are {'x'.join(map(str, images.shape[1:]))} but the index holds "
                           f"{h}x{w}x{c} training images (audit images of the training size)")
    return images


def _match_chunk(index: HashIndex, images: np.ndarray) -> dict[str, np.ndarray]:
    """Stage 1 + 2 for (n, H, W, C) images: per (view x candidate) pair, plain/blur RMS, id, bits."""
    k = SETTINGS["candidates_per_view"]
    fp, fb = _train_features(index)
    as_is_hash, std = phash_batch(images, return_std=True)
    plain, blur, ids, bits = [], [], [], []
    as_is_blur = None
    for name in VIEW_NAMES:
        v = view(images, name)
        dist, cand = index.knn(as_is_hash if name == "as-is" else phash_batch(v), k)  # (n, k) candidates
        fv = features(v, True)
        as_is_blur = fv if name == "as-is" else as_is_blur
        plain.append(rms_to_candidates(features(v, False), fp, cand))
        blur.append(rms_to_candidates(fv, fb, cand))
        ids.append(cand)
        bits.append(dist)
    cat = lambda xs: np.concatenate(xs, axis=1)  # noqa: E731 - (n, views * k)
    cells = np.argmin(_cell_distances(index, as_is_blur), axis=1) if "centroids" in index.arrays else None
    return {"blank": is_flat(std), "plain": cat(plain), "blur": cat(blur), "ids": cat(ids),
            "bits": cat(bits), "cells": cells}


def _cell_distances(index: HashIndex, feat: np.ndarray) -> np.ndarray:
    c = np.asarray(index.arrays["centroids"], np.float32)
    return (feat ** 2).sum(1)[:, None] + (c ** 2).sum(1)[None] - 2.0 * feat @ c.T


def _run_chunks(index: HashIndex, images: np.ndarray) -> list[dict[str, np.ndarray]]:
    starts = range(0, len(images), _CHUNK)
    work = lambda s: _match_chunk(index, images[s:s + _CHUNK])  # noqa: E731
    if len(starts) > 1:
        _train_features(index)  # build the cache once, before threads race for it
        with ThreadPoolExecutor(_THREADS) as pool:
            return list(pool.map(work, starts))
    return [work(s) for s in starts]


# ----------------------------------------------------------------------------- calibration


def calibrate(index: HashIndex, heldout: np.ndarray, fpr: float = 0.01, heldout_fingerprint: str = "",
              seed: int = 0) -> dict:
    """Score held-out images and store the thresholds in ``index`` (manifest + arrays); returns them.

    ``heldout`` (N, H, W, C) uint8 comes from the training distribution but not the training set
    (the test split). Sets the per-metric scales (held-out medians), the score threshold at
    ``fpr`` and the data-copying cells; keeps every held-out score for re-thresholding.
    """
    heldout = _check_images(index, heldout)
    if not 0 < fpr < 1:
        raise EdgegenError(f"--fpr must be between 0 and 1, got {fpr}")
    if len(heldout) < 100:
        raise EdgegenError(f"calibration needs at least 100 held-out images, got {len(heldout)}")
    # Data-copying cells: k-means on blurred training features (a 10,000-image subset is plenty).
    fb = _train_features(index)[1]
    rng = np.random.default_rng(seed)
    sub = fb[rng.choice(len(fb), min(len(fb), 10_000), replace=False)].astype(np.float32) / FEATURE_SCALE
    centroids, _ = kmeans2(sub, min(CELLS, len(sub)), seed=seed, minit="++")
    index.arrays["centroids"] = centroids.astype(np.float32)

    parts = _run_chunks(index, heldout)
    blank = np.concatenate([p["blank"] for p in parts])
    plain = np.concatenate([p["plain"].min(axis=1) for p in parts])
    blur = np.concatenate([p["blur"].min(axis=1) for p in parts])
    bits = np.concatenate([p["bits"][:, :2 * SETTINGS["candidates_per_view"]].min(axis=1) for p in parts])
    cells = np.concatenate([p["cells"] for p in parts])
    ok = ~blank
    scales = [float(np.median(plain[ok])), float(np.median(blur[ok]))]
    scores = np.minimum(plain / scales[0], blur / scales[1]).astype(np.float32)
    scores[blank] = np.inf
    index.arrays["heldout_scores"] = scores
    index.arrays["heldout_cells"] = cells.astype(np.int16)
    cal = {"fpr": float(fpr), "n": int(len(heldout)), "blank": int(blank.sum()), "scales": scales,
           "heldout_fingerprint": heldout_fingerprint, "cells": int(len(centroids)),
           "hamming_threshold": _threshold(bits[ok].astype(np.float64), fpr)}
    cal.update(threshold_for(scores, fpr))
    index.manifest["calibration"] = cal
    return cal


def _threshold(values: np.ndarray, fpr: float) -> float:
    # Flag when value < t, t = the floor(fpr * n)-th order statistic: at most fpr of these flagged.
    s = np.sort(values)
    return float(s[min(int(math.floor(fpr * len(s))), len(s) - 1)])


def threshold_for(heldout_scores: np.ndarray, fpr: float) -> dict:
    """Score threshold at ``fpr`` from held-out scores, and the held-out rate it actually flags."""
    s = np.asarray(heldout_scores, np.float64)
    s = s[np.isfinite(s)]
    t = _threshold(s, fpr)
    return {"threshold": t, "heldout_flag_rate": float(np.mean(s < t))}


# ----------------------------------------------------------------------------- the auditor


class Auditor:
    """Audits batches of images against a calibrated :class:`HashIndex`; keeps per-run statistics.

    ``audit(images)`` may be called once or per batch (streaming); ``summary()`` reports the whole
    run so far. ``fpr`` other than the index's re-thresholds from the stored held-out scores.
    ``keep`` flagged images (the lowest scores) are kept for the report.
    """

    def __init__(self, index: HashIndex, fpr: float | None = None, keep: int = 48) -> None:
        cal = index.calibration
        if not cal or "heldout_scores" not in index.arrays:
            raise EdgegenError(f"{index.path or 'index'}: not calibrated; build it with held-out data "
                               "(`edgegen index build` or build_index)")
        self.index, self.keep = index, keep
        self.fpr = float(cal["fpr"] if fpr is None else fpr)
        if not 0 < self.fpr < 1:
            raise EdgegenError(f"--fpr must be between 0 and 1, got {self.fpr}")
        th = {"threshold": cal["threshold"], "heldout_flag_rate": cal["heldout_flag_rate"]} if fpr is None \
            else threshold_for(index.arrays["heldout_scores"], self.fpr)
        self.threshold, self.expected_rate = th["threshold"], th["heldout_flag_rate"]
        self.scales = cal["scales"]
        self._scores: list[np.ndarray] = []
        self._cells: list[np.ndarray] = []
        self._n = self._flagged = self._blank = 0
        self.examples: list[tuple[float, int, np.ndarray, AuditResult]] = []  # (score, image #, pixels, result)

    def audit(self, images: np.ndarray) -> list[AuditResult]:
        """Audit (N, H, W, C) uint8 images (the index's shape); one :class:`AuditResult` each."""
        images = _check_images(self.index, images)
        results: list[AuditResult] = []
        for part in _run_chunks(self.index, images):
            results += self._verdicts(part)
        for i, r in enumerate(results):
            if r.flagged:
                self.examples.append((r.score, self._n + i, images[i].copy(), r))
        self.examples = sorted(self.examples, key=lambda e: (e[0], e[1]))[: self.keep]
        self._n += len(results)
        self._flagged += sum(r.flagged for r in results)
        self._blank += sum(r.blank for r in results)
        return results

    def _verdicts(self, part: dict[str, np.ndarray]) -> list[AuditResult]:
        norm = np.minimum(part["plain"] / self.scales[0], part["blur"] / self.scales[1])  # (n, pairs)
        best = np.argmin(norm, axis=1)
        take = lambda a: np.take_along_axis(a, best[:, None], 1)[:, 0]  # noqa: E731
        score, ids, bits = take(norm), take(part["ids"]), take(part["bits"])
        plain, blur = take(part["plain"]), take(part["blur"])
        k = SETTINGS["candidates_per_view"]
        score = np.where(part["blank"], np.inf, score)
        self._scores.append(score.astype(np.float32))
        self._cells.append(part["cells"])
        cells = part["cells"]
        out = []
        for i in range(len(score)):
            blank = bool(part["blank"][i])
            out.append(AuditResult(
                flagged=bool(not blank and score[i] < self.threshold), blank=blank, score=float(score[i]),
                nearest_id=-1 if blank else int(ids[i]), view="" if blank else VIEW_NAMES[best[i] // k],
                hamming=-1 if blank else int(bits[i]), rms=math.inf if blank else float(plain[i]),
                rms_blur=math.inf if blank else float(blur[i]),
                cell=-1 if cells is None else int(cells[i])))
        return out

    def add_scores(self, scores: np.ndarray, cells: np.ndarray, blank: np.ndarray) -> None:
        """Count already-audited images into this run's statistics without auditing them again.

        For runs audited piecewise elsewhere (``edgegen generate --audit`` records each image's
        ``score``, ``cell`` and ``blank`` in its manifest; a resumed or Ray run sums them up at the
        end): ``scores`` (N,) as :attr:`AuditResult.score`, ``cells`` (N,) as :attr:`AuditResult.cell`,
        ``blank`` (N,) bool. Flags are recomputed with this auditor's threshold, exactly as
        :meth:`audit` decides them; no example images are kept.
        """
        scores = np.asarray(scores, np.float64)
        blank = np.asarray(blank, bool)
        if not (len(scores) == len(cells) == len(blank)):
            raise EdgegenError("add_scores: scores, cells and blank must have the same length")
        scores = np.where(blank, np.inf, scores)
        self._scores.append(scores.astype(np.float32))
        self._cells.append(np.asarray(cells, np.int64))
        self._n += len(scores)
        self._flagged += int(np.sum(~blank & (scores < self.threshold)))
        self._blank += int(blank.sum())

    def scores(self) -> np.ndarray:
        """Scores (N,) of every image audited so far (inf for blank ones)."""
        return np.concatenate(self._scores) if self._scores else np.empty(0, np.float32)

    def summary(self) -> dict:
        """Per-run figures: counts, flagged fraction vs expected rate (binomial p), data-copying test."""
        n_ok = self._n - self._blank
        p_excess = float(stats.binom.sf(self._flagged - 1, n_ok, self.expected_rate)) if n_ok else 1.0
        cells = np.concatenate(self._cells) if self._cells else np.empty(0, np.int64)
        idx = self.index
        return {
            "images": self._n, "flagged": self._flagged, "blank": self._blank,
            "flagged_fraction": self._flagged / n_ok if n_ok else 0.0,
            "expected_fraction": self.expected_rate, "excess_p_value": p_excess,
            "fpr": self.fpr, "threshold": self.threshold, "scales": self.scales,
            "hamming_threshold": idx.calibration.get("hamming_threshold"),
            "data_copying": data_copying_test(self.scores(), cells, idx.arrays["heldout_scores"],
                                              idx.arrays["heldout_cells"]),
            "index": {"path": str(idx.path or ""), "fingerprint": idx.fingerprint, "images": len(idx),
                      "data": idx.manifest["data"]["name"], "data_fingerprint": idx.data_fingerprint,
                      "calibration_images": idx.calibration["n"]},
        }


def data_copying_test(gen: np.ndarray, gen_cells: np.ndarray, held: np.ndarray, held_cells: np.ndarray,
                      min_per_cell: int = MIN_PER_CELL) -> dict:
    """Meehan et al. (2020) C_T: held-out-weighted mean over cells of Mann-Whitney z(generated vs held-out).

    Inputs are each image's distance-to-training score and k-means cell; blank (inf) scores are
    left out. Returns ``statistic`` (C_T; < 0: generated closer to training than held-out),
    ``p_value`` (one-sided, copying; C_T / sqrt(sum w^2) ~ N(0, 1) under no copying) and the
    cells used. With no usable cell, statistic and p-value are None.
    """
    gen, held = np.asarray(gen, np.float64), np.asarray(held, np.float64)
    ok_g, ok_h = np.isfinite(gen), np.isfinite(held)
    gen, gen_cells, held, held_cells = gen[ok_g], np.asarray(gen_cells)[ok_g], held[ok_h], np.asarray(held_cells)[ok_h]
    zs, weights, used = [], [], []
    for c in np.unique(held_cells):
        g, h = gen[gen_cells == c], held[held_cells == c]
        if len(g) < min_per_cell or len(h) < min_per_cell:
            continue
        u = stats.mannwhitneyu(g, h, alternative="two-sided", method="asymptotic").statistic  # U of gen > held
        m, n = len(g), len(h)
        zs.append((u - m * n / 2.0) / math.sqrt(m * n * (m + n + 1) / 12.0))
        weights.append(len(h) / len(held))
        used.append(int(c))
    if not used:
        return {"statistic": None, "p_value": None, "cells_used": [], "min_per_cell": min_per_cell}
    w = np.asarray(weights) / np.sum(weights)
    ct = float(np.dot(w, zs))
    p = float(stats.norm.cdf(ct / math.sqrt(float(np.sum(w ** 2)))))
    return {"statistic": ct, "p_value": p, "cells_used": used, "min_per_cell": min_per_cell}
