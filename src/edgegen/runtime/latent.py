"""Counter-based latent noise: image ``i`` of seed ``s`` always gets the same ``z``.

A stateful RNG would make image ``i`` depend on how many draws came before it (batch size,
resumed runs, workers). Instead every latent coordinate is a pure function of
``(seed, index, coordinate)``: a SplitMix64-style hash gives 53-bit uniforms and Box–Muller turns
pairs of them into standard normals. Vectorised over a whole batch in numpy uint64 arithmetic
(wrap-around multiplication is the intended modular arithmetic), so any slice of indices, computed
on any machine, in any order, yields bit-identical float32 latents.
"""

from __future__ import annotations

import numpy as np

from edgegen.errors import EdgegenError

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_STREAM_Z = np.uint64(0x5A5A5A5A00000001)  # domain separation: latent noise stream


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijective avalanche mix of uint64 values (elementwise)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def check_seed(seed: int) -> int:
    """Validate a seed (an int in [0, 2**64)) and return it as a Python int."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise EdgegenError(f"seed must be an integer, got {seed!r}")
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise EdgegenError(f"seed must be in [0, 2**64), got {seed}")
    return seed


def uniforms(seed: int, indices: np.ndarray, count: int, stream: np.uint64 = _STREAM_Z) -> np.ndarray:
    """(len(indices), count) float64 uniforms in (0, 1], each a hash of (seed, stream, index, column)."""
    idx = np.asarray(indices, dtype=np.uint64).reshape(-1, 1)               # (N, 1)
    cols = np.arange(count, dtype=np.uint64).reshape(1, -1)                 # (1, count)
    with np.errstate(over="ignore"):
        key = _mix(np.uint64(check_seed(seed)) ^ stream)                    # one key per (seed, stream)
        row = _mix(key + (idx + np.uint64(1)) * _GOLDEN)                    # (N, 1) per-image key
        bits = _mix(row ^ ((cols + np.uint64(1)) * _M2))                    # (N, count) 64 random bits
    # top 53 bits -> (0, 1]: +1 keeps log() finite in Box-Muller
    return ((bits >> np.uint64(11)).astype(np.float64) + 1.0) * (1.0 / 2.0**53)


def latents(seed: int, indices: np.ndarray, dim: int) -> np.ndarray:
    """Standard-normal latents (len(indices), dim) float32 for images ``indices`` of ``seed``.

    Box–Muller on pairs of counter-based uniforms; row ``k`` depends only on
    ``(seed, indices[k])``, never on the other rows, so batching and ordering cannot change it.
    """
    half = (dim + 1) // 2
    u = uniforms(seed, indices, 2 * half)                                   # (N, 2*half)
    r = np.sqrt(-2.0 * np.log(u[:, :half]))                                 # (N, half)
    theta = 2.0 * np.pi * u[:, half:]
    z = np.concatenate([r * np.cos(theta), r * np.sin(theta)], axis=1)      # (N, 2*half)
    return z[:, :dim].astype(np.float32)


def slerp(a: np.ndarray, b: np.ndarray, steps: int) -> np.ndarray:
    """(steps, dim) spherical interpolation from ``a`` to ``b`` (both (dim,)), endpoints included.

    Gaussian latents live near a sphere of radius sqrt(dim); a straight line between two of them
    passes through low-norm points the generator rarely saw, so we interpolate the angle and the
    norm separately.
    """
    t = np.linspace(0.0, 1.0, steps).reshape(-1, 1)                         # (steps, 1)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
    ua, ub = a64 / na, b64 / nb
    omega = np.arccos(np.clip(ua @ ub, -1.0, 1.0))
    if omega < 1e-6:                                                        # (almost) same direction
        dirs = (1 - t) * ua + t * ub
    else:
        dirs = (np.sin((1 - t) * omega) * ua + np.sin(t * omega) * ub) / np.sin(omega)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return (dirs * ((1 - t) * na + t * nb)).astype(np.float32)
