"""Engine-free batch generation core: plan shards, render a shard, write its files.

A run of ``n`` images is cut into shards of ``shard_size`` consecutive indices. A shard is the
unit of work and of atomicity: its images are rendered (inference, then optional stages such as
watermarking and auditing, then PNG/NPZ encoding) into bytes plus one manifest record per index,
its files are written (each via a temporary name and a rename, so no file is ever half-visible),
and only then are its manifest lines committed (:mod:`edgegen.runtime.manifest`). Engines (the
local thread pipeline, Ray Data) only decide *where* these functions run.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass, field
from typing import Container, Iterator, Protocol

import cv2
import numpy as np

from edgegen.errors import EdgegenError
from edgegen.runtime.generator import Generator

FORMATS = ("png", "npz")


@dataclass(frozen=True)
class Plan:
    """Everything that determines a run's files and manifest (picklable: sent to Ray actors).

    ``label`` is a fixed class index, or None: unconditional models, or conditional ones that
    cycle the classes by image index. ``identity()`` is what ``run.json`` stores to recognise a
    folder as this run when resuming.
    """

    n: int
    seed: int
    model_fingerprint: str
    fmt: str = "png"
    label: int | None = None
    class_name: str | None = None
    class_names: tuple[str, ...] = ()
    batch_size: int = 256
    shard_size: int = 1024
    stages: tuple[dict, ...] = ()       # identity of each post-inference stage (key fingerprint, ...)

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise EdgegenError(f"unknown format {self.fmt!r} (expected png or npz)")
        if self.n <= 0:
            raise EdgegenError(f"n must be a positive integer, got {self.n}")
        if self.batch_size < 1 or self.shard_size < 1:
            raise EdgegenError("batch size and shard size must be >= 1")

    @property
    def num_shards(self) -> int:
        return -(-self.n // self.shard_size)

    def shards_todo(self, done: Container[int] = ()) -> Iterator[int]:
        """Shard numbers not in ``done``, in order, produced lazily: any ``n`` plans in constant memory."""
        return (k for k in range(self.num_shards) if k not in done)

    def shard_range(self, k: int) -> tuple[int, int]:
        """[start, stop) image indices of shard ``k``."""
        return k * self.shard_size, min((k + 1) * self.shard_size, self.n)

    def shard_len(self, k: int) -> int:
        start, stop = self.shard_range(k)
        return stop - start

    @property
    def digits(self) -> int:
        return max(8, len(str(self.n - 1)))

    def image_name(self, index: int) -> str:
        return f"img-{index:0{self.digits}d}.png"

    def shard_name(self, k: int) -> str:
        return f"shard-{k:06d}.npz"

    def identity(self) -> dict:
        """The run's identity for ``run.json``: a folder holding another identity is another run.

        Batch size, threads and engine are left out on purpose: they change speed, not pixels.
        """
        d = asdict(self)
        d.pop("batch_size")
        d["stages"] = list(self.stages)
        d["class_names"] = list(self.class_names)
        return d


class Stage(Protocol):
    """A post-inference step run on each shard (watermark, audit): numpy in, numpy out.

    ``__call__(images, indices, labels)`` gets (N, H, W, C) uint8 images and returns the
    (possibly modified) images, one dict per image merged into its manifest record, and a
    boolean (N,) mask of images to keep (False: the image is recorded but not written).
    ``identity()`` is recorded in ``run.json``; it must never contain secrets. Two optional
    methods, called by the engine's driver: ``check_model(meta, where)`` before anything is
    written (raise :class:`EdgegenError` to refuse the model), and ``finish(out)`` once every
    shard is committed (run-level outputs such as the audit summary, written atomically).
    """

    def identity(self) -> dict: ...

    def __call__(self, images: np.ndarray, indices: np.ndarray,
                 labels: np.ndarray | None) -> tuple[np.ndarray, list[dict], np.ndarray]: ...


@dataclass
class ShardResult:
    """A rendered shard: files to write (name, bytes) and its manifest records, in index order."""

    shard: int
    files: list[tuple[str, bytes]]
    records: list[dict] = field(default_factory=list)


def shard_labels(plan: Plan, indices: np.ndarray, conditional: bool) -> np.ndarray | None:
    """(N,) int64 labels of a shard: the fixed class, or classes cycled by index; None if unconditional."""
    if not conditional:
        return None
    if plan.label is not None:
        return np.full(len(indices), plan.label, dtype=np.int64)
    return (indices % len(plan.class_names)).astype(np.int64)


def infer_shard(gen: Generator, plan: Plan, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Inference for shard ``k``: (indices (S,), images (S, H, W, C) uint8, labels (S,) or None)."""
    start, stop = plan.shard_range(k)
    indices = np.arange(start, stop, dtype=np.int64)
    labels = shard_labels(plan, indices, gen.meta.conditional)
    return indices, gen.images_for(plan.seed, indices, labels, plan.batch_size), labels


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of one (H, W, C) uint8 image (RGB in, as OpenCV wants BGR; releases the GIL)."""
    img = image[..., 0] if image.shape[2] == 1 else np.ascontiguousarray(image[..., ::-1])
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise EdgegenError("OpenCV could not encode a PNG")
    return buf.tobytes()


def finish_shard(plan: Plan, k: int, indices: np.ndarray, images: np.ndarray, labels: np.ndarray | None,
                 stages: tuple[Stage, ...] = ()) -> ShardResult:
    """Run the stages, encode, and build manifest records for one shard (CPU work, no I/O).

    A record of a written image names its ``file`` and that file's size in ``bytes`` (what a
    resumed run checks); an image a stage dropped has ``file: null`` and ``dropped: true``.
    """
    extra: list[dict] = [{} for _ in indices]
    keep = np.ones(len(indices), dtype=bool)
    for stage in stages:
        images, recs, mask = stage(images, indices, labels)
        for e, r in zip(extra, recs):
            e.update(r)
        keep &= np.asarray(mask, dtype=bool)
    base = {"seed": plan.seed, "model": plan.model_fingerprint, "shard": k}
    records: list[dict] = []
    for j, i in enumerate(indices.tolist()):
        lab = None if labels is None else int(labels[j])
        rec = {"file": None, "index": i, **base, "label": lab,
               "class": None if lab is None else plan.class_names[lab], **extra[j]}
        records.append(rec)
    files: list[tuple[str, bytes]] = []
    if plan.fmt == "png":
        for j, rec in enumerate(records):
            if keep[j]:
                data = encode_png(images[j])
                rec["file"], rec["bytes"] = plan.image_name(rec["index"]), len(data)
                files.append((rec["file"], data))
    else:  # one npz per shard: rows in index order, only the kept images
        buf = io.BytesIO()
        np.savez(buf, images=images[keep], indices=indices[keep],
                 labels=labels[keep] if labels is not None else np.zeros(0, np.int64))
        name, data = plan.shard_name(k), buf.getvalue()
        files.append((name, data))
        row = 0
        for j, rec in enumerate(records):
            if keep[j]:
                rec["file"], rec["bytes"], rec["row"] = name, len(data), row
                row += 1
    for rec in records:
        if rec["file"] is None:
            rec["dropped"] = True
    return ShardResult(k, files, records)


def render_shard(gen: Generator, plan: Plan, k: int, stages: tuple[Stage, ...] = ()) -> ShardResult:
    """Inference + stages + encoding of shard ``k`` in one call (what a Ray actor runs)."""
    indices, images, labels = infer_shard(gen, plan, k)
    return finish_shard(plan, k, indices, images, labels, stages)


def write_files(out_dir: str | os.PathLike, files: list[tuple[str, bytes]]) -> None:
    """Write each (name, bytes) under ``out_dir`` via a temporary file and an atomic rename.

    Per-file fsync would cap throughput at the disk's sync rate (~1,000/s); instead the
    manifest, written after these files, is fsynced, and a crash can at worst leave complete
    files of an uncommitted shard, which the resumed run rewrites with the same bytes.
    Names must be plain file names (no folders, no ``..``), so nothing can land outside
    ``out_dir``; files are written relative to one open folder handle, so the hot loop does no
    path resolution. ``OSError`` (disk full, permissions) propagates to the engine, which reports it.
    """
    for name, _ in files:
        if not name or name in (".", "..") or "/" in name or os.sep in name:
            raise EdgegenError(f"{name!r}: not a plain file name; refusing to write outside {out_dir}")
    dir_fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name, data in files:
            tmp = f".{name}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666, dir_fd=dir_fd)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                try:
                    os.unlink(tmp, dir_fd=dir_fd)
                except OSError:
                    pass
                raise
    finally:
        os.close(dir_fd)
