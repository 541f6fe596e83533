"""Batched perceptual hashing that reproduces ``imagehash.phash`` bit for bit, without PIL per image.

``imagehash.phash(img)`` does, per image: ``img.convert("L")``, a Pillow LANCZOS resize to 32x32,
``scipy.fftpack.dct`` along axis 0 then axis 1, keeps the 8x8 low-frequency corner and sets each
bit where the coefficient is above the corner's median. We do the same on a whole batch:

* RGB->L uses Pillow's fixed-point luma ``(19595 R + 38470 G + 7471 B + 0x8000) >> 16``.
* The resize uses Pillow's own separable filter: coefficients computed in double exactly as
  ``precompute_coeffs`` in ``Resample.c``, rounded to 22-bit fixed point as
  ``normalize_coeffs_8bpc``, horizontal pass first, each pass rounded and clipped to uint8. The
  fixed-point sums are small integers (< 2**31), so a float64 matrix product computes them exactly
  and BLAS does the work for the whole batch.
* The DCT is the same ``scipy.fftpack.dct`` (pocketfft) on the batch; the second pass runs on the
  8 rows we keep only, which is the same arithmetic per row.

Hashes are packed big-endian into 8 bytes per image (bit 63 = ``hash.flatten()[0]``), so
``format(int, "016x")`` equals ``str(imagehash.phash(img))``.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import scipy.fftpack

HASH_SIZE = 8                 # 8x8 = 64 bits, imagehash's default
HIGHFREQ_FACTOR = 4           # imagehash's default: resize to 32x32 before the DCT
IMG_SIZE = HASH_SIZE * HIGHFREQ_FACTOR
_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images (Resample.c)
_LANCZOS_SUPPORT = 3.0
FLAT_STD = 2.0               # grey levels; Fashion-MNIST images sit at 30-100
_CHUNK = 256                  # images per block: float64 temporaries stay in cache (64 px: 8 MiB)
_THREADS = min(2, os.cpu_count() or 1)


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    # Pillow's lanczos_filter: truncated sinc with a = 3.
    if -3.0 <= x < 3.0:
        return _sinc(x) * _sinc(x / 3.0)
    return 0.0


@lru_cache(maxsize=32)
def lanczos_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's fixed-point LANCZOS resampling weights as a dense (out_size, in_size) float64 matrix.

    Follows ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` in Pillow's ``Resample.c``
    operation by operation (scalar ``math`` functions, like the C code's libm calls), so each
    entry is the exact integer weight Pillow uses, in units of 2**-22.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = _LANCZOS_SUPPORT * filterscale
    out = np.zeros((out_size, in_size), np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        ss = 1.0 / filterscale
        xmin = max(int(center - support + 0.5), 0)          # C cast truncates toward zero
        xmax = min(int(center + support + 0.5), in_size) - xmin
        w = [_lanczos((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        ww = sum(w) if w else 0.0
        # Sequential sum, as the C loop does (Python's sum adds left to right).
        for x in range(xmax):
            k = w[x] / ww if ww != 0.0 else w[x]
            fixed = k * (1 << _PRECISION_BITS)
            out[xx, xmin + x] = int(-0.5 + fixed) if k < 0 else int(0.5 + fixed)
    return out


def _resample_rows(pixels: np.ndarray, mat: np.ndarray) -> np.ndarray:
    """One Pillow 8-bit pass along the last axis of (..., L) float64 pixels: -> (..., out_size)."""
    # Sum of weight*pixel is an integer below 2**31: exact in float64. Then Pillow's
    # ``(ss + 2**21) >> 22`` (arithmetic shift = floor) and clip to 0..255.
    # Scaling the weights by 2**-22 is exact (a power of two), so this is floor(sum * 2**-22 + 0.5).
    acc = pixels @ _scaled_t(mat)
    acc += 0.5
    np.floor(acc, out=acc)
    return np.clip(acc, 0.0, 255.0, out=acc)


@lru_cache(maxsize=32)
def _scaled_t_cached(key: tuple[int, int]) -> np.ndarray:
    return np.ascontiguousarray(lanczos_matrix(*key).T * (1.0 / (1 << _PRECISION_BITS)))


def _scaled_t(mat: np.ndarray) -> np.ndarray:
    return _scaled_t_cached((mat.shape[1], mat.shape[0]))


def to_luma(images: np.ndarray) -> np.ndarray:
    """(N, H, W[, C]) uint8 -> (N, H, W) uint8 as Pillow's ``convert("L")`` (C = 1, 3 or 4)."""
    if images.ndim == 3:
        return images
    if images.shape[-1] == 1:
        return images[..., 0]
    if images.shape[-1] in (3, 4):  # RGBA drops alpha, as Pillow's RGBA->L does
        rgb = images[..., :3].astype(np.uint32)
        luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
        return luma.astype(np.uint8)
    raise ValueError(f"expected 1, 3 or 4 channels, got shape {images.shape}")


def resize_luma_32_t(luma: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 -> (N, 32 x, 32 y) float64: Pillow's LANCZOS-resized values, *transposed*.

    The transposed layout makes image axis 0 (imagehash's first DCT axis) the contiguous one.
    """
    n, h, w = luma.shape
    px = luma.astype(np.float64)
    if w != IMG_SIZE:  # horizontal pass first, as ImagingResampleInner; no-op sizes are skipped
        px = _resample_rows(px, lanczos_matrix(w, IMG_SIZE))           # (n, h, 32)
    px = np.ascontiguousarray(px.transpose(0, 2, 1))                   # (n, 32 x, h)
    if h != IMG_SIZE:
        px = _resample_rows(px, lanczos_matrix(h, IMG_SIZE))           # (n, 32 x, 32 y)
    return px


def _phash_block(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pt = resize_luma_32_t(to_luma(images))                     # (n, x, y)
    dct = scipy.fftpack.dct(pt, axis=2)[:, :, :HASH_SIZE]      # imagehash's axis-0 DCT, keep 8 v-freqs
    dct = scipy.fftpack.dct(dct, axis=1)[:, :HASH_SIZE, :]     # axis-1 DCT on those 8 only: (n, u, v)
    low = dct.transpose(0, 2, 1).reshape(len(pt), HASH_SIZE * HASH_SIZE)  # (n, 64) row-major (v, u)
    med = np.median(low, axis=1, keepdims=True)
    bits = low > med                                           # (n, 64), as imagehash's hash.flatten()
    return np.packbits(bits, axis=1), _lowfreq_std(low)


def _lowfreq_std(low: np.ndarray) -> np.ndarray:
    """Grey-level std of the image's 8x8 lowest frequencies (Parseval on orthonormal DCT-II), (n,)."""
    # fftpack's unnormalised DCT-II: orthonormal = raw * sqrt(1/(4N)) for k = 0, sqrt(1/(2N)) else.
    scale = np.full(HASH_SIZE, math.sqrt(1.0 / (2 * IMG_SIZE)))
    scale[0] = math.sqrt(1.0 / (4 * IMG_SIZE))
    ortho = low * np.outer(scale, scale).reshape(1, -1)
    ortho[:, 0] = 0.0                                          # drop the mean (DC)
    return np.sqrt((ortho ** 2).sum(axis=1) / (IMG_SIZE * IMG_SIZE))


def phash_batch(images: np.ndarray, return_std: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """pHash of every image: (N, H, W[, C]) uint8 -> (N, 8) uint8, the bits of ``imagehash.phash``.

    Row ``i`` packed big-endian is ``str(imagehash.phash(Image.fromarray(images[i])))``. With
    ``return_std`` also returns (N,) float64, the grey-level standard deviation of the hashed 32x32
    image's 8x8 lowest frequencies, which :func:`is_flat` uses: flat images all hash alike (their
    DCT is rounding noise).
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"expected uint8 images (N, H, W[, C]), got {images.dtype} {images.shape}")
    hashes = np.empty((len(images), 8), np.uint8)
    stds = np.empty(len(images), np.float64)

    def work(start: int) -> None:
        hashes[start:start + _CHUNK], stds[start:start + _CHUNK] = _phash_block(images[start:start + _CHUNK])

    starts = range(0, len(images), _CHUNK)
    if len(starts) > 1 and _THREADS > 1:  # numpy, BLAS and pocketfft release the GIL
        with ThreadPoolExecutor(_THREADS) as pool:
            list(pool.map(work, starts))
    else:
        for start in starts:
            work(start)
    return (hashes, stds) if return_std else hashes


def is_flat(stds: np.ndarray, tol: float = FLAT_STD) -> np.ndarray:
    """Flat (blank or near-constant) images: low-frequency grey-level std below ``tol``, (N,) bool."""
    return np.asarray(stds) < tol


def hashes_to_u64(hashes: np.ndarray) -> np.ndarray:
    """(N, 8) packed uint8 -> (N,) uint64 in native order, for XOR + popcount."""
    return np.ascontiguousarray(hashes).view(">u8").reshape(-1).astype(np.uint64)


def hash_hex(hashes: np.ndarray) -> list[str]:
    """(N, 8) packed hashes -> imagehash's 16-character hex strings."""
    return [bytes(h).hex() for h in np.asarray(hashes, np.uint8)]
