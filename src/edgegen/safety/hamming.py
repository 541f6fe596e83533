"""Exact Hamming search over 64-bit hashes: k nearest neighbours and range queries.

Brute force, because it is exact and, compiled, fast enough: one query against 60,000 hashes is
60,000 XOR + popcount (LLVM emits the CPU's vector popcount), ~0.2 ns a pair. The kernels are
numba functions that release the GIL, and :func:`knn` / :func:`range_search` split the queries
over threads (2 by default, the machines we target). Results are ordered by (distance, index), so
ties resolve to the lowest training index, the same as a stable sort of a brute-force matrix.

Distances are int32 in 0..64. A missing neighbour (k > database size) is distance 65, index -1.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit
from numba.core import types
from numba.extending import intrinsic

NO_MATCH = 65
THREADS = min(2, os.cpu_count() or 1)
_BLOCK = 2048  # queries per thread task


@intrinsic
def _ctpop(typingctx, x):  # noqa: ANN001 - numba typing signature
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):  # noqa: ANN001
        return builder.ctpop(args[0])

    return sig, codegen


@njit(nogil=True, cache=True)
def _distances(qi: np.uint64, db: np.ndarray, buf: np.ndarray) -> np.uint8:
    # buf[j] = popcount(qi ^ db[j]); returns the minimum. Two plain loops, because LLVM
    # vectorises each of them but not a fused one (measured 6x slower).
    for j in range(db.shape[0]):
        buf[j] = _ctpop(qi ^ db[j])
    m = np.uint8(64)
    for j in range(db.shape[0]):
        m = min(m, buf[j])
    return m  # (buf's padding bytes beyond db.shape[0] stay 127)


# The selection passes read the distance buffer 8 bytes at a time. Every byte is <= 64 or the
# padding value 127, so with the high bit forced on, (b | 0x80) - (t + 1) never borrows from the
# next byte, and its high bit stays set exactly when b > t: an exact per-byte test in 3 ops.
_ONES = np.uint64(0x0101010101010101)
_HIGH = np.uint64(0x8080808080808080)
_PAD = 127
_JUMP = 3     # k-NN: first threshold tried, in bits above the nearest distance


@njit(nogil=True, cache=True)
def _new_buffer_nb(n: int) -> np.ndarray:
    # Distance buffer: n bytes rounded up to whole 8-byte words, padding 127 (> any radius).
    return np.full(((n + 7) // 8) * 8, _PAD, np.uint8)


@njit(nogil=True, cache=True)
def _count_within(buf: np.ndarray, t: np.uint8) -> int:
    # #(buf <= t): popcount of the per-byte "b <= t" flags of every word (vectorised).
    words = buf.view(np.uint64)
    sub = _ONES * np.uint64(t + 1)
    c = np.uint64(0)
    for w in range(words.shape[0]):
        c += _ctpop(~((words[w] | _HIGH) - sub) & _HIGH)
    return np.int64(c)


@njit(nogil=True, cache=True)
def _collect_within(buf: np.ndarray, t: np.uint8, out_d: np.ndarray, out_i: np.ndarray) -> int:
    # Hits d <= t in index order, then a stable sort by distance (ties keep index order).
    # Hits are rare, so whole words without one are skipped by the same 3-op test.
    words = buf.view(np.uint64)
    sub = _ONES * np.uint64(t + 1)
    m = 0
    for w in range(words.shape[0]):
        if ~((words[w] | _HIGH) - sub) & _HIGH:
            for j in range(w * 8, w * 8 + 8):
                if buf[j] <= t:
                    out_d[m] = buf[j]
                    out_i[m] = j
                    m += 1
    order = np.argsort(out_d[:m], kind="mergesort")
    out_d[:m] = out_d[:m][order]
    out_i[:m] = out_i[:m][order]
    return m


@njit(nogil=True, cache=True)
def _knn_kernel(q: np.ndarray, db: np.ndarray, k: int, out_d: np.ndarray, out_i: np.ndarray) -> None:
    n = db.shape[0]
    buf = _new_buffer_nb(n)
    cand_d = np.empty(n, np.int32)
    cand_i = np.empty(n, np.int64)
    for i in range(q.shape[0]):
        lo = _distances(q[i], db, buf)
        # Any t with #(d <= t) >= k gives the exact answer (collect, stable-sort, keep k); the
        # k-th distance is typically ~3 bits above the minimum, so start there instead of
        # stepping up from the minimum one count pass at a time, and step back down only while
        # the collection would be needlessly large (> 8k hits, e.g. many equal hashes).
        t = np.uint8(min(lo + _JUMP, 64)) if k > 1 else lo
        c = _count_within(buf, t)
        while c < k and t < 64:
            t = np.uint8(t + 1)
            c = _count_within(buf, t)
        while t > lo and c > 8 * k:
            c_down = _count_within(buf, np.uint8(t - 1))
            if c_down < k:
                break
            t, c = np.uint8(t - 1), c_down
        m = _collect_within(buf, t, cand_d, cand_i)
        for r in range(k):
            if r < m:
                out_d[i, r] = cand_d[r]
                out_i[i, r] = cand_i[r]
            else:
                out_d[i, r] = NO_MATCH
                out_i[i, r] = -1


@njit(nogil=True, cache=True)
def _range_count(q: np.ndarray, db: np.ndarray, radius: int, counts: np.ndarray) -> None:
    buf = _new_buffer_nb(db.shape[0])
    for i in range(q.shape[0]):
        _distances(q[i], db, buf)
        counts[i] = _count_within(buf, np.uint8(radius))


@njit(nogil=True, cache=True)
def _range_fill(q: np.ndarray, db: np.ndarray, radius: int, starts: np.ndarray,
                out_d: np.ndarray, out_i: np.ndarray) -> None:
    buf = _new_buffer_nb(db.shape[0])
    for i in range(q.shape[0]):
        _distances(q[i], db, buf)
        s = starts[i]
        _collect_within(buf, np.uint8(radius), out_d[s:], out_i[s:])


def _as_u64(hashes: np.ndarray) -> np.ndarray:
    h = np.asarray(hashes)
    if h.dtype == np.uint64 and h.ndim == 1:
        return np.ascontiguousarray(h)
    if h.dtype == np.uint8 and h.ndim == 2 and h.shape[1] == 8:
        return np.ascontiguousarray(h).view(">u8").reshape(-1).astype(np.uint64)
    raise ValueError(f"hashes must be (N, 8) uint8 or (N,) uint64, got {h.dtype} {h.shape}")


def _run_blocks(fn, n: int, threads: int) -> None:  # noqa: ANN001 - fn(start, stop)
    blocks = [(s, min(s + _BLOCK, n)) for s in range(0, n, _BLOCK)]
    if threads > 1 and len(blocks) > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda b: fn(*b), blocks))
    else:
        for b in blocks:
            fn(*b)


def knn(queries: np.ndarray, database: np.ndarray, k: int, threads: int = THREADS) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by Hamming distance: -> distances (Q, k) int32, indices (Q, k) int64.

    ``queries`` and ``database`` are packed hashes, (N, 8) uint8 or (N,) uint64. Rows are sorted
    by (distance, database index); when the database holds fewer than ``k`` hashes the remaining
    columns are distance 65 and index -1.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    q, db = _as_u64(queries), _as_u64(database)
    out_d = np.full((len(q), k), NO_MATCH, np.int32)
    out_i = np.full((len(q), k), -1, np.int64)
    if len(db) and len(q):
        _run_blocks(lambda s, e: _knn_kernel(q[s:e], db, k, out_d[s:e], out_i[s:e]), len(q), threads)
    return out_d, out_i


def range_search(queries: np.ndarray, database: np.ndarray, radius: int,
                 threads: int = THREADS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every database hash within Hamming ``radius`` (inclusive) of each query, CSR layout.

    Returns ``lims`` (Q + 1,) int64, ``distances`` (M,) int32 and ``indices`` (M,) int64: the
    hits of query ``i`` are ``[lims[i]:lims[i + 1]]``, sorted by (distance, index).
    """
    if not 0 <= radius <= 64:
        raise ValueError("radius must be in 0..64")
    q, db = _as_u64(queries), _as_u64(database)
    counts = np.zeros(len(q), np.int64)
    if len(db) and len(q):
        _run_blocks(lambda s, e: _range_count(q[s:e], db, int(radius), counts[s:e]), len(q), threads)
    lims = np.zeros(len(q) + 1, np.int64)
    np.cumsum(counts, out=lims[1:])
    out_d = np.empty(lims[-1], np.int32)
    out_i = np.empty(lims[-1], np.int64)
    if lims[-1]:
        _run_blocks(lambda s, e: _range_fill(q[s:e], db, int(radius), lims[s:e], out_d, out_i), len(q), threads)
    return lims, out_d, out_i
