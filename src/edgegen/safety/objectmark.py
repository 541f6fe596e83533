"""The watermark's second part: a small keyed mark on the object, exact under brightness and contrast changes (numpy only).

Why: the main mark (:mod:`edgegen.safety.watermark`) is a global low-frequency pattern. On a dark
background a darkening (brightness -20) or a contrast increase (x 1.2 about the mean grey) clips
the background to 0 and takes the mark's background part with it, which no detector-side inverse
can restore. A brightening does the same to white highlights.

What: the object region is M = {27 < luma < 207}. On M, 35 2-D cosines are centred (their mean
on M removed, exactly) and orthonormalised (Gram matrix of M, Cholesky), so the 35 coordinates
ignore any offset added to M; divided by the region's own RMS contrast s they also ignore a
gain. 20 key-derived orthonormal combinations of them, divided by a step of STEP * s (8 grey
levels at Fashion-MNIST's median s), are quantised onto key-derived dithered lattice points (all
sync bits, no payload), like the main mark. The cosines are the products of
1-D cosines of frequency 0 or 10..14 (the constant left out): every one lies above the main mark's
8 x 8 band, so little of the object mark's change reaches the main projections (measured at 32 px
on generated images: with frequencies 0..5, the object mark cut noise sigma=5 detection from 95.2
to 91.6 %; with 10..14, 94.8 %).

An affine change y = g x + c (a brightness or contrast change, rounded) that clips no pixel of M
maps M onto {g 27 + c < y < g 207 + c} and the coordinates / s onto themselves, so the detector
only has to find the region's two thresholds again. To make that a coarse search, the embedder
empties two gaps of luma values around the thresholds (26..28 and 206..208 stay empty; a pixel
moves by 1 or 2 grey levels to the nearer side): any threshold inside the (moved, widened)
gap recovers M exactly, and a grid of thresholds every 4 grey levels always lands inside it at
gains of 1 and up. The detector tries the pairs of that grid (``HYPOTHESES``: brightness changes
-27..+27 and contrast gains up to 1.3, one hypothesis each), skipping thresholds that have a
pixel within one grey level on both sides.

Embedding changes the finished integer image: the gaps first, then least-norm steps on the pixels
of M, kept in 29..205 (out of the gaps), each rounded against fixed random thresholds so that
changes smaller than half a grey level survive (``ObjectMark.change``). Cost at 32 x 32: about
0.25 of MSE with the gaps. Images whose region is too small (under 100 pixels), too flat, larger
than 128 x 128, or so near-degenerate that the mark would cost more than MAX_COST carry none.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Callable

import numpy as np
from scipy.linalg import solve_triangular
from threadpoolctl import threadpool_limits

REGION = (27.0, 207.0)  # grey levels: M = {REGION[0] < luma < REGION[1]} (colour: every channel, see region)
GAP = 2.0               # luma strictly within GAP of a threshold moves out (26..28 and 206..208 stay empty)
FREE = (29.0, 205.0)    # the object mark's changes keep M's channels in here (M less the gaps)
BAND = 6                # 6 x 6 cosines less DC: 35 coordinates ...
FREQ = 10               # ... of frequencies 0 and 10..14 along each side (module docstring)
N_PROJ = 20
STEP = 8.0 / 46.0       # lattice step per unit of s: 8 grey levels at Fashion-MNIST's median s (46)
MIN_PIXELS = 100
MIN_CONTRAST = 4.0      # s below this: no mark (the gain would be lost in the rounding)
RIDGE = 1e-2            # of the mean diagonal, added before Cholesky: near-degenerate directions stay unused
MAX_PIXELS = 128 * 128
MAX_COST = 2.0          # mean square change (grey levels^2) above which an image gets no object mark (~1 %)
PASSES = 2              # embedding passes (the second corrects what the rounding and s's change left)
_CHUNK = 256            # images per batch (embedding)
_PER = 32               # images per batch (detection)

# The detector's grid: lower thresholds for brightness changes down to -27 and contrast increases
# about a mean grey up to ~165, upper ones up to just below white; pairs whose distance is 0.95 to
# 1.3 times the region's (the gain). A gap of 3 empty values holds one point of a grid of 4 at
# gains of 1 and up.
_LOWS = np.arange(0.5, 57.0, 4.0)
_HIGHS = np.arange(178.5, 255.0, 4.0)
HYPOTHESES = [(float(lo), float(hi)) for lo in _LOWS for hi in _HIGHS
              if 0.95 <= (hi - lo) / (REGION[1] - REGION[0]) <= 1.3]
_THRESHOLDS = np.array(sorted({v for pair in HYPOTHESES for v in pair}), np.float32)   # every threshold once
_HYP_PAIRS = np.searchsorted(_THRESHOLDS, np.array(HYPOTHESES, np.float32))             # (H, 2) indices into it
_K = BAND * BAND
_PAIRS = np.triu_indices(BAND)         # the 21 products of two 1-D cosines
_PAIR = np.zeros((BAND, BAND), np.int64)
_PAIR[_PAIRS], _PAIR[_PAIRS[::-1]] = np.arange(len(_PAIRS[0])), np.arange(len(_PAIRS[0]))
_V, _U = np.divmod(np.arange(_K), BAND)  # basis function k = cos_v(row) cos_u(column)
# Gram entry (k, l) = table entry (pair of the rows' cosines, pair of the columns' cosines)
_GATHER = (_PAIR[_V[:, None], _V[None, :]] * len(_PAIRS[0]) + _PAIR[_U[:, None], _U[None, :]]).reshape(-1)


@lru_cache(maxsize=16)
def _basis(h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(36, H*W) float32 functions (the constant, then the 35 other products of two 1-D cosines of
    frequency 0 or FREQ.., unit mean square), and the products of two 1-D cosines along the rows
    (21, H) and the columns (21, W)."""
    from edgegen.safety.watermark import _cosines

    rows = [0] + list(range(FREQ, FREQ + BAND - 1))
    cv, cu = (_cosines(side, FREQ + BAND - 1)[rows] for side in (h, w))
    phi = np.ascontiguousarray((cv[:, None, :, None] * cu[None, :, None, :]).reshape(_K, h * w))
    pv, pu = cv[_PAIRS[0]] * cv[_PAIRS[1]], np.ascontiguousarray((cu[_PAIRS[0]] * cu[_PAIRS[1]]).T)
    for a in (phi, pv, pu):
        a.setflags(write=False)
    return phi, pv, pu


def _tables(masks: np.ndarray, pv: np.ndarray, pu: np.ndarray) -> np.ndarray:
    """(N, H, W) masks -> (N, 441) float32: sum over the mask of each product of two row cosines times
    two column cosines. The basis is separable, so this is a region's whole Gram matrix (``_gram``)
    at a 15th of the cost of summing the 666 products of 2-D functions."""
    n, h, w = masks.shape
    t = (masks.reshape(n * h, w).astype(np.float32) @ pu).reshape(n, h, -1)       # (N, H, 21)
    return np.matmul(pv[None], t).reshape(n, -1)


def _gram(tables: np.ndarray) -> np.ndarray:
    """(N, 441) tables -> (N, 36, 36) float64 Gram matrices of the basis."""
    return tables[:, _GATHER].astype(np.float64).reshape(-1, _K, _K)


def region(lo: np.ndarray, hi: np.ndarray, low: float | np.ndarray = REGION[0],
           high: float | np.ndarray = REGION[1]) -> np.ndarray:
    """The object region: pixels whose smallest channel ``lo`` is above ``low`` and largest ``hi``
    below ``high`` (both the luma for grey images), so that no channel of it is clipped at 0 or 255."""
    return (lo > np.maximum(low, 0.5)) & (hi < np.minimum(high, 254.5))


def _luma_sums(x: np.ndarray, mask: np.ndarray, phi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, HW) luma and masks -> the luma's inner products with the basis on M (N, 36) and its sum of squares on M (N,), float64."""
    xm = x * mask
    return (xm @ phi.T).astype(np.float64), (xm * x).sum(axis=1, dtype=np.float64)


def _contrast(count: np.ndarray, inner: np.ndarray, sumsq: np.ndarray) -> np.ndarray:
    """The RMS contrast s (N,) of the luma on M from its pixel count, inner products and sum of squares."""
    n1 = np.maximum(count, 1.0)
    return np.sqrt(np.maximum(sumsq / n1 - (inner[:, 0] / n1) ** 2, 0.0))


def _centred(gram: np.ndarray, inner: np.ndarray, sumsq: np.ndarray) -> tuple[np.ndarray, ...]:
    """A region's sums -> centred Gram matrix C (N, 35, 35; ridge added), centred inner products
    v (N, 35), the cosines' means on M (N, 35), RMS contrast s (N,) and ok (N,).

    ``gram`` (N, 36, 36) is the basis' Gram matrix on M, ``inner`` and ``sumsq`` come from
    ``_luma_sums``. The first basis function is the constant, so gram[:, 0, 0] is the pixel count
    |M|, gram[:, 0, 1:] the cosines' sums and inner[:, 0] the luma's sum. Centring (Schur
    complement of the constant) cancels any offset on M; the coordinates L^-1 v / s (C = L L^T)
    are orthonormal on M and ignore a gain too. The ridge (RIDGE of the mean diagonal) keeps
    near-degenerate regions stable; the embedder and the detector use the same formula.
    """
    count, sums = gram[:, 0, 0], gram[:, 0, 1:]
    s = _contrast(count, inner, sumsq)
    ok = (count >= MIN_PIXELS) & (s >= MIN_CONTRAST)
    mu = sums / np.maximum(count, 1.0)[:, None]
    c = gram[:, 1:, 1:] - mu[:, :, None] * sums[:, None, :]
    diag = np.arange(_K - 1)
    c[:, diag, diag] += RIDGE * np.trace(c, axis1=1, axis2=2)[:, None] / (_K - 1)
    c[~ok] = np.eye(_K - 1)
    return c, inner[:, 1:] - mu * inner[:, :1], mu, np.where(ok, s, 1.0), ok


def _coordinates(gram: np.ndarray, inner: np.ndarray, sumsq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For the detector: (coordinates / s (N, 35), ok (N,)), by forward substitution (no inverse).

    A loop over the 35 rows, each vectorised over the batch: 6x faster here than scipy's batched
    ``solve_triangular`` with one right-hand side (measured on 4,000 matrices).
    """
    c, v, _, s, ok = _centred(gram, inner, sumsq)
    lower = np.linalg.cholesky(c)
    out = np.empty_like(v)
    for i in range(_K - 1):
        out[:, i] = (v[:, i] - np.einsum("nj,nj->n", lower[:, i, :i], out[:, :i])) / lower[:, i, i]
    return out / s[:, None], ok


def _parallel(fn: Callable[[slice], None], items: list[slice]) -> None:
    """Run ``fn`` on each item, one thread per core (numpy releases the GIL in its batched linear
    algebra), with BLAS itself on one thread: its own threads on these small products fight the
    pool (measured at 32 px: object mark 3,400 images/s with both, 7,300 with the pool alone)."""
    workers = min(len(items), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    with threadpool_limits(1):
        if workers < 2:
            for item in items:
                fn(item)
            return
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(fn, items))


def _gap_moves(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The integer change (same shape) that moves every pixel inside a gap to the gap's nearer side.

    ``lo`` and ``hi`` are each pixel's smallest and largest channel (the luma for grey images):
    the lower gap is about ``lo``, the upper about ``hi`` (so that ``region`` sees them), and a
    move, added to every channel, must keep them in 0..255, else the other side is taken, else none.
    """
    d = np.zeros_like(lo)
    for t, v in zip(REGION, (lo, hi)):
        inside = (v > t - GAP) & (v < t + GAP)
        down, up = -np.ceil(v - (t - GAP)), np.ceil(t + GAP - v)
        down_ok, up_ok = lo + down >= 0, hi + up <= 255
        move = np.where((-down <= up) & down_ok | ~up_ok, np.where(down_ok, down, 0.0), up)
        d = np.where(inside, move, d)
    return d


class ObjectMark:
    """The object mark of one key: ``change`` for the embedder, ``best`` for the detector."""

    def __init__(self, proj: np.ndarray, dither: np.ndarray, bits: np.ndarray):
        self.proj = proj                                            # (N_PROJ, 35) orthonormal rows
        self.offset = dither + bits / 2.0                           # (N_PROJ,) lattice offsets

    def _z(self, coords: np.ndarray) -> np.ndarray:
        return coords @ self.proj.T / STEP                          # (N, N_PROJ) lattice units

    def change(self, luma: np.ndarray, lo: np.ndarray | None = None, hi: np.ndarray | None = None,
               passes: int = PASSES) -> np.ndarray:
        """(N, H, W) luma -> (N, H, W) integer change: the gaps emptied and the object coordinates on the lattice.

        ``lo`` and ``hi`` (N, H, W), for colour images: each pixel's smallest and largest channel
        (``region``; a luma change is added to all three channels).

        Each pass solves the least-norm change on the free pixels P of M that moves the projections
        to their lattice points and is orthogonal to the centred luma (so s stays put to first
        order), and rounds it up where its fraction exceeds a fixed random threshold per pixel, so
        the rounding error averages out instead of cancelling a change smaller than half a grey
        level; the next pass corrects what the rounding (and s's change) left.
        """
        n, h, w = luma.shape
        grey = lo is None or hi is None
        out = np.zeros((n, h * w), np.float32)
        if h * w > MAX_PIXELS:
            return out.reshape(n, h, w)
        phi, pv, pu = _basis(h, w)
        n_proj = len(self.proj)
        dither = np.random.default_rng(0).random((passes, h * w), dtype=np.float32)   # fixed rounding thresholds
        grey_gaps = _gap_moves(*(np.arange(256, dtype=np.float32),) * 2)          # integer luma: a table

        def chunk(sl: slice) -> None:
            x = luma[sl].reshape(-1, h * w).astype(np.float32)
            if grey:
                gaps = grey_gaps[x.astype(np.uint8)]
                flat = [x, x, x]
            else:
                flat = [x] + [a[sl].reshape(-1, h * w).astype(np.float32) for a in (lo, hi)]
                gaps = _gap_moves(*flat[1:])
            x = x + gaps
            lo_, hi_ = flat[1] + gaps, flat[2] + gaps
            mask = region(lo_, hi_)
            # M's geometry and so its coordinate frame are fixed; s moves a little.
            gram = _gram(_tables(mask.reshape(-1, h, w), pv, pu))
            inner, sumsq = _luma_sums(x, mask, phi)
            c, _, mu, _, ok = _centred(gram, inner, sumsq)
            # The projections' map from inner products to s times z * STEP: proj L^-1 [-mu, I] (n, N_PROJ, 36),
            # with proj L^-1 from L^T X = proj^T.
            proj = np.broadcast_to(self.proj.T, (len(c),) + self.proj.T.shape)
            q = solve_triangular(np.linalg.cholesky(c), proj, lower=True, trans="T").transpose(0, 2, 1)
            qmat = np.concatenate([-np.matmul(q, mu[..., None]), q], axis=2)
            # Each pixel's (integer) change keeps it out of the gaps and every channel in 0..255.
            free = mask & ok[:, None]
            floor = np.where(free, np.ceil(FREE[0] - lo_), 0.0)
            ceil = np.where(free, np.floor(FREE[1] - hi_), 0.0)
            free &= (floor < 0) & (ceil > 0)
            gram_p = _gram(_tables(free.reshape(-1, h, w), pv, pu))
            qgq = np.matmul(np.matmul(qmat, gram_p), qmat.transpose(0, 2, 1))            # (n, N_PROJ, N_PROJ)
            count = np.maximum(mask.sum(axis=1, keepdims=True), 1)
            total = np.zeros_like(x)
            for p in range(passes):
                # The least-norm change on P that moves the projections to their targets (rows b:
                # the mark functions in basis weights) and is orthogonal to e, the centred luma on
                # P, so that s stays put to first order. M does not move; s does, a little.
                xt = x + total
                if p:                                   # the first pass starts where the target was read
                    inner, sumsq = _luma_sums(xt, mask, phi)
                s_p = np.where(ok, _contrast(gram[:, 0, 0], inner, sumsq), 1.0)[:, None]
                z = np.matmul(qmat, inner[..., None])[..., 0] / (s_p * STEP)
                if not p:
                    target = np.round(z - self.offset) + self.offset          # nearest lattice point, once
                b = qmat / s_p[..., None]                                                    # (n, N_PROJ, 36)
                e = (xt - (xt * mask).sum(axis=1, keepdims=True) / count) * free
                e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-6)
                be = np.matmul(b, (e @ phi.T).astype(np.float64)[..., None])                 # (n, N_PROJ, 1)
                normal = np.empty((len(x), n_proj + 1, n_proj + 1))
                normal[:, :-1, :-1] = qgq / s_p[..., None] ** 2                              # b G_P b^T
                normal[:, :-1, -1:], normal[:, -1:, :-1] = be, be.transpose(0, 2, 1)
                normal[:, -1, -1] = (e * e).sum(axis=1, dtype=np.float64)
                want = np.concatenate([(target - z) * STEP, np.zeros((len(x), 1))], axis=1)
                y = np.linalg.solve(normal + 1e-9 * np.eye(n_proj + 1), want[..., None])[..., 0]
                weights = np.matmul(y[:, None, :-1], b)[:, 0].astype(np.float32)            # (n, 36)
                step = (weights @ phi) * free + y[:, -1:].astype(np.float32) * e
                low = np.floor(step)
                total = np.clip(total + low + (step - low > dither[p]), floor, ceil)
            # A near-degenerate region can ask for a large change: such an image keeps no object mark.
            total[np.mean(total * total, axis=1) > MAX_COST] = 0.0
            out[sl] = gaps + total

        _parallel(chunk, [slice(s, s + _CHUNK) for s in range(0, n, _CHUNK)])
        return out.reshape(n, h, w)

    def best(self, luma: np.ndarray, lo: np.ndarray | None = None,
             hi: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N, H, W) luma -> best sync score (N,), its matching bits (N,) and its index in ``HYPOTHESES`` (N,).

        ``lo`` and ``hi``, for colour images: each pixel's smallest and largest channel (``region``).
        Only thresholds inside an empty run of values are tried (a marked image's two gaps always
        hold one; a threshold with a pixel within one grey level on both sides cannot be the
        embedder's region). Each pair is scored on the N_PROJ residues (sum of cosines: the same
        null law as the main mark's).
        """
        n, h, w = luma.shape
        n_proj = len(self.proj)
        best = np.full(n, -float(n_proj))
        best_h, match = np.zeros(n, np.int64), np.zeros(n, np.int64)
        if h * w > MAX_PIXELS:
            return best, match, best_h
        phi, pv, pu = _basis(h, w)
        t, pairs = _THRESHOLDS, _HYP_PAIRS
        flat = [a.reshape(n, h * w).astype(np.float32) for a in (luma, luma if lo is None else lo, luma if hi is None else hi)]

        def empty(v: np.ndarray) -> np.ndarray:                 # (m, HW) -> (m, T): t has an empty side
            v, tt = v[:, None, :], t[None, :, None]
            return ~((v > tt - 1) & (v <= tt)).any(axis=2) | ~((v >= tt) & (v < tt + 1)).any(axis=2)

        def chunk(sl: slice) -> None:
            x, a, b = (v[sl] for v in flat)
            e_lo = empty(a)
            e_hi = e_lo if lo is None else empty(b)
            img, pair = np.nonzero(e_lo[:, pairs[:, 0]] & e_hi[:, pairs[:, 1]])
            if not len(img):
                return
            masks = region(a[img], b[img], t[pairs[pair, 0], None], t[pairs[pair, 1], None])   # (B, HW)
            coords, ok = _coordinates(_gram(_tables(masks.reshape(-1, h, w), pv, pu)), *_luma_sums(x[img], masks, phi))
            cos = np.cos(2.0 * np.pi * (self._z(coords) - self.offset))
            score = np.where(ok, cos.sum(axis=1), -n_proj)
            top = np.full(len(x), -np.inf)
            np.maximum.at(top, img, score)
            win = np.flatnonzero(score == top[img])
            win = win[np.unique(img[win], return_index=True)[1]]                     # one per image
            rows = sl.start + img[win]
            best[rows], best_h[rows], match[rows] = score[win], pair[win], (cos[win] > 0).sum(axis=1)

        _parallel(chunk, [slice(s, min(s + _PER, n)) for s in range(0, n, _PER)])
        return best, match, best_h
