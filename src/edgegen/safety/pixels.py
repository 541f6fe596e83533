"""Pixel-side helpers of the audit: query views (mirror, 1-pixel shifts) and confirmation features.

pHash is blind to mirroring and, on 28-pixel images, a 1-pixel shift moves ~10 of its 64 bits, so
the audit hashes each query in six *views*: as is, mirrored, and shifted one pixel back in each
of the four directions. A copy of a training image that was flipped or shifted matches that
image in one of the views.

Stage-2 confirmation compares pixels, not hashes. Two features per image, both on the interior
(a 1-pixel border dropped, so the row a shift pushed out does not count) and both mean-centred
(so a uniform brightness change does not count): the plain pixels, and the pixels blurred with a
Gaussian of sigma 1.5 (so noise, JPEG ringing and mild blur do not count). The distances to
the candidates are one compiled gather-and-reduce loop (:func:`rms_to_candidates`) over int16
training features.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from numba import njit

VIEW_NAMES = ("as-is", "mirrored", "shift-left", "shift-right", "shift-up", "shift-down")
# (dy, dx) moves the content by that many pixels (zero fill); "shift-left" undoes a copy moved right.
_SHIFTS = {"shift-left": (0, -1), "shift-right": (0, 1), "shift-up": (-1, 0), "shift-down": (1, 0)}
BLUR_SIGMA = 1.5


def shift(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Move (N, H, W, C) images by (dy, dx) pixels, filling the uncovered border with zeros."""
    out = np.zeros_like(images)
    h, w = images.shape[1:3]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        images[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def view(images: np.ndarray, name: str) -> np.ndarray:
    """One query view of (N, H, W, C) uint8 images (see :data:`VIEW_NAMES`), contiguous."""
    if name == "as-is":
        return images
    if name == "mirrored":
        return np.ascontiguousarray(images[:, :, ::-1])
    return shift(images, *_SHIFTS[name])


@lru_cache(maxsize=8)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    # (n, n) Gaussian blur along one axis with reflect-101 borders (OpenCV's default); rows sum to 1.
    r = int(np.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    taps /= taps.sum()
    m = np.zeros((n, n))
    for i in range(n):
        for t, wgt in zip(range(i - r, i + r + 1), taps):
            j = abs(t) if t < 0 else (2 * (n - 1) - t if t >= n else t)
            m[i, min(max(j, 0), n - 1)] += wgt
    return m.astype(np.float32)


def features(images: np.ndarray, blur: bool) -> np.ndarray:
    """Stage-2 feature vectors: (N, H, W, C) uint8 -> (N, (H-2)(W-2)C) float32, mean-centred.

    ``blur`` first applies a separable Gaussian (sigma :data:`BLUR_SIGMA`) to each channel, as
    two small matrix products over the whole batch.
    """
    x = images.astype(np.float32)
    n, h, w, c = x.shape
    if blur:
        x = np.einsum("yh,nhwc->nywc", _blur_matrix(h, BLUR_SIGMA), x, optimize=True)
        x = np.einsum("xw,nywc->nyxc", _blur_matrix(w, BLUR_SIGMA), x, optimize=True)
    x = np.ascontiguousarray(x[:, 1:-1, 1:-1]).reshape(n, -1)
    x -= x.mean(axis=1, keepdims=True)
    return x


FEATURE_SCALE = 128.0
"""Training features are stored as int16 ``round(feature * 128)``: a centred feature lies in
[-255, 255], so this fits int16 exactly, costs the memory of float16 and rounds to 1/256 of a grey
level (float16 rounds to 1/8 near 255)."""


def quantize_features(feat: np.ndarray) -> np.ndarray:
    """(N, F) float32 features -> the int16 form :func:`rms_to_candidates` reads (x FEATURE_SCALE)."""
    return np.rint(np.asarray(feat, np.float32) * FEATURE_SCALE).astype(np.int16)


@njit(nogil=True, fastmath=True, cache=True)
def _rms_kernel(query: np.ndarray, train: np.ndarray, cand: np.ndarray, out: np.ndarray) -> None:
    # out[i, j] = RMS(query[i] - train[cand[i, j]]) in scaled units; gathers one training row at a
    # time (it stays in L1 while it is reduced), the inner loop vectorises (int16 -> float32 FMA).
    n, f = query.shape
    for i in range(n):
        q = query[i]
        for j in range(cand.shape[1]):
            c = cand[i, j]
            if c < 0:
                out[i, j] = np.inf
                continue
            t = train[c]
            acc = np.float32(0.0)
            for x in range(f):
                d = q[x] - np.float32(t[x])
                acc += d * d
            out[i, j] = np.sqrt(acc / np.float32(f))


def rms_to_candidates(query: np.ndarray, train_feat: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """RMS distance of each query to its candidates: (n, F) float, (N, F) int16, (n, k) ids -> (n, k).

    ``train_feat`` is :func:`quantize_features` of the training features. A compiled loop
    (numba, GIL released) gathers each candidate row and reduces the squared differences
    directly, so no (n, k, F) block is materialised; candidate id -1 (no neighbour) gives +inf.
    """
    q = np.ascontiguousarray(np.asarray(query, np.float32) * np.float32(FEATURE_SCALE))
    out = np.empty(cand.shape, np.float32)
    _rms_kernel(q, train_feat, np.ascontiguousarray(cand, np.int64), out)
    out /= np.float32(FEATURE_SCALE)
    return out
