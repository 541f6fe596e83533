"""The watermark's second part: a small keyed mark on the object, exact under darkening (numpy only).

Why: the main mark (:mod:`edgegen.safety.watermark`) is a global low-frequency pattern. On a dark
background a darkening such as brightness -20 clips the background to 0 and takes the mark's
background part with it, which no detector-side inverse can restore (7-14 % of marked images
were still found after brightness -20; 99-100 % with this mark, docs/benchmarks.md). A
brightening does the same to white highlights.

What: the object region is M = {27.5 <= luma <= 227.5}. On M, the 24 lowest 2-D cosines (DC
dropped) are centred (their mean on M removed, exactly) and orthonormalised (Gram matrix of M,
Cholesky), so the 24 coordinates ignore any offset added to M. 16 key-derived orthonormal
combinations of them, divided by a step of 6 grey levels, are quantised onto key-derived dithered
lattice points (all sync bits, no payload), like the main mark. A brightness change by o grey
levels, |o| <= 27, moves every pixel of M by exactly o without clipping it, so the detector
recovers M as {27.5 + o <= luma <= 227.5 + o} and the coordinates exactly: it tries o = -27..27
(one hypothesis each).

Embedding changes the finished integer image: least-norm steps on the pixels of M in 34..221 (away
from both thresholds), each rounded against fixed random thresholds so that changes smaller than
half a grey level survive (ObjectMark.change). Its cost is about 0.05 of MSE at
32 x 32 (0.02 dB of PSNR). Images whose region is too small (under 100 pixels) or larger than
128 x 128 carry no object mark.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

REGION = (27.5, 227.5)  # grey levels: M = {REGION[0] <= luma <= REGION[1]} (half-integers: rounding keeps M)
FREE = (34.0, 221.0)    # pixels of M the object mark may change
BAND = 5                # 5 x 5 cosines less DC: 24 coordinates
N_PROJ = 16
STEP = 6.0              # grey levels per lattice step (orthonormal coordinates)
OFFSETS = range(-27, 28)   # brightness changes undone exactly (ObjectMark.best)
MIN_PIXELS = 100
MAX_PIXELS = 128 * 128
PASSES = 2              # embedding passes (after brightness -20 at 32 px: 1 pass 95.8 % found, 2 98.8 %)
_CHUNK = 512            # images per batch


def region(luma: np.ndarray, offset: int = 0) -> np.ndarray:
    """The object region of (N, H*W) luma after a brightness change ``offset``: M shifted, unclipped pixels."""
    return (luma >= REGION[0] + offset) & (luma <= REGION[1] + offset) & (luma > 0) & (luma < 255)


@lru_cache(maxsize=16)
def _basis(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(25, H*W) float32 functions (the constant, then the 24 lowest 2-D cosines less DC, unit mean
    square) and (H*W, 325) their pairwise products k <= l, so a region's Gram matrix is one matmul."""
    from edgegen.safety.watermark import _cosines

    cv, cu = _cosines(h, BAND), _cosines(w, BAND)
    phi = np.ascontiguousarray((cv[:, None, :, None] * cu[None, :, None, :]).reshape(BAND * BAND, h * w))
    rows, cols = np.triu_indices(len(phi))
    products = np.ascontiguousarray((phi[rows] * phi[cols]).T)
    phi.setflags(write=False)
    products.setflags(write=False)
    return phi, products


def _gram(products: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N, HW) masks -> (N, 25, 25) float64 Gram matrices of the basis on each mask."""
    k = BAND * BAND
    rows, cols = np.triu_indices(k)
    upper = (mask.astype(np.float32) @ products).astype(np.float64)            # (N, 325)
    gram = np.empty((len(mask), k, k))
    gram[:, rows, cols] = upper
    gram[:, cols, rows] = upper
    return gram


def _coordinates(luma: np.ndarray, mask: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For flat (N, H*W) images and masks: (coordinates (N, 24), W (N, 24, 25), ok (N,)).

    The coordinates are W @ (inner products of the luma on M with the constant and the 24 cosines):
    the cosines are centred on M exactly (Schur complement of the constant, so any offset on M
    cancels) and then orthonormalised (Cholesky, with a ridge of 1e-3 of the mean diagonal for
    near-degenerate regions; the same for the embedder and the detector).
    """
    phi, products = _basis(h, w)
    gram = _gram(products, mask)
    ok = mask.sum(axis=1) >= MIN_PIXELS
    gram[~ok] = np.eye(len(phi))
    mu = gram[:, 1:, 0] / gram[:, :1, 0]                            # (N, 24) the cosines' means on M
    centred = gram[:, 1:, 1:] - mu[:, :, None] * gram[:, None, 0, 1:]
    k = len(phi) - 1
    centred += 1e-3 * np.trace(centred, axis1=1, axis2=2)[:, None, None] / k * np.eye(k)
    linv = np.linalg.inv(np.linalg.cholesky(centred))
    wmat = np.matmul(linv, np.concatenate([-mu[:, :, None], np.broadcast_to(np.eye(k), (len(mu), k, k))], axis=2))
    inner = ((luma * mask).astype(np.float32) @ phi.T).astype(np.float64)      # (N, 25)
    return np.matmul(wmat, inner[..., None])[..., 0], wmat, ok


class ObjectMark:
    """The object mark of one key: ``change`` for the embedder, ``best`` for the detector."""

    def __init__(self, proj: np.ndarray, dither: np.ndarray, bits: np.ndarray):
        self.proj = proj                                            # (16, 24) orthonormal rows
        self.offset = dither + bits / 2.0                           # (16,) lattice offsets

    def _z(self, coords: np.ndarray) -> np.ndarray:
        return coords @ self.proj.T / STEP                          # (N, 16) lattice units

    def change(self, luma: np.ndarray, room: np.ndarray | None = None, passes: int = PASSES) -> np.ndarray:
        """(N, H, W) luma -> (N, H, W) integer change putting its object coordinates on the lattice.

        ``room`` (N, H, W) bool, for colour images: the pixels whose every channel can take the
        change without clipping (a luma change is added to all three channels).

        Each pass solves the least-norm change on the free pixels P for the coordinates still to move
        and rounds it up where its fraction exceeds a fixed random threshold per pixel, so the rounding
        error averages out instead of cancelling a change smaller than half a grey level; the next
        pass corrects what the rounding left. P stays inside M and below 255 (a few grey levels at most).
        """
        n, h, w = luma.shape
        out = np.zeros((n, h * w), np.float32)
        if h * w > MAX_PIXELS:
            return out.reshape(n, h, w)
        phi, products = _basis(h, w)
        dither = np.random.default_rng(0).random((passes, h * w), dtype=np.float32)   # fixed rounding thresholds
        for s in range(0, n, _CHUNK):
            x = luma[s:s + _CHUNK].reshape(-1, h * w).astype(np.float32)
            mask = region(x)
            coords, wmat, ok = _coordinates(x, mask, h, w)
            z = self._z(coords)
            target = np.round(z - self.offset) + self.offset                  # nearest lattice point, once
            # The 16 mark functions on M in basis weights, b = proj @ W (n, 16, 25), and the normal
            # matrix of the least-norm problem on the free pixels, b G_P b^T (n, 16, 16).
            b = np.matmul(self.proj[None], wmat)
            free = mask & (x >= FREE[0]) & (x <= FREE[1]) & ok[:, None]
            if room is not None:
                free &= room[s:s + _CHUNK].reshape(len(x), -1)
            normal = np.matmul(np.matmul(b, _gram(products, free)), b.transpose(0, 2, 1)) + 1e-9 * np.eye(N_PROJ)
            total = np.zeros_like(x)
            for k in range(passes):
                inner = (((x + total) * mask) @ phi.T).astype(np.float64)    # (n, 25); M does not move
                z = self._z(np.matmul(wmat, inner[..., None])[..., 0])
                y = np.linalg.solve(normal, ((target - z) * STEP)[..., None])   # (n, 16, 1)
                weights = np.matmul(y.transpose(0, 2, 1), b)[:, 0].astype(np.float32)   # (n, 25)
                step = (weights @ phi) * free
                low = np.floor(step)
                total += low + (step - low > dither[k])
            out[s:s + len(x)] = total
        return out.reshape(n, h, w)

    def best(self, luma: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N, H, W) luma -> best sync score (N,), its matching bits (N,) and brightness change o (N,) over ``OFFSETS``.

        The coordinates ignore an offset, so undoing a brightness change o only needs its region,
        ``region(luma, o)``. Each is scored on the 16 residues (sum of cosines: the same null law
        as the main mark's, with n = 16).
        """
        n, h, w = luma.shape
        best = np.full(n, -float(N_PROJ))
        best_o, match = np.zeros(n, np.int64), np.zeros(n, np.int64)
        if h * w > MAX_PIXELS:
            return best, match, best_o
        flat = luma.reshape(n, h * w).astype(np.float32)
        for o in OFFSETS:
            for s in range(0, n, _CHUNK):
                x = flat[s:s + _CHUNK]
                coords, _, ok = _coordinates(x, region(x, o), h, w)
                cos = np.cos(2.0 * np.pi * (self._z(coords) - self.offset))
                score = np.where(ok, cos.sum(axis=1), -N_PROJ)
                better = score > best[s:s + len(x)]
                rows = np.arange(s, s + len(x))[better]
                best[rows], best_o[rows], match[rows] = score[better], o, (cos[better] > 0).sum(axis=1)
        return best, match, best_o
