"""What an audit reads: a folder of image files, or an exported model that generates them.

Both yield (names, images) in batches of the index's image shape, so the auditor can stream. Bad
input is one :class:`EdgegenError` line before anything is written: an empty folder, an image file
that cannot be decoded (unless skipped), an image of another size than the training images, a
model whose recorded index fingerprint differs from the index's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from edgegen.errors import EdgegenError
from edgegen.fileio import IMAGE_SUFFIXES
from edgegen.safety.index import HashIndex


def read_npz_shard(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """An ``edgegen generate --format npz`` shard as (indices (N,), images (N, H, W, C) uint8).

    Read without pickle; anything else than edgegen's two arrays is one clear error naming the file.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            indices, images = z["indices"], z["images"]
    except (OSError, ValueError, KeyError) as e:
        raise EdgegenError(f"{path}: not an edgegen npz shard ({type(e).__name__})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3) or indices.shape != (len(images),):
        raise EdgegenError(f"{path}: not an edgegen npz shard (images {images.dtype} {images.shape}, "
                           f"indices {indices.shape})")
    return indices.astype(np.int64), images


def read_folder(folder: str | os.PathLike, shape: tuple[int, int, int], skip_bad: bool = False
                ) -> tuple[list[str], np.ndarray, list[str]]:
    """Every image under ``folder`` (sorted, recursive) as (names, (N, H, W, C) uint8, skipped).

    Image files (suffixes in :data:`~edgegen.fileio.IMAGE_SUFFIXES`) and ``edgegen generate``
    npz shards (each row named ``<file>#<index>``) count; others, such as the manifest and run
    files of a generate folder, are ignored, so its output audits as it is. Images must have the
    index's (H, W); colour is converted to its channel count. A file that cannot be decoded stops
    the read with an error naming it, unless ``skip_bad``.
    """
    root = Path(folder)
    if not root.is_dir():
        raise EdgegenError(f"{root}: no such folder")
    h, w, c = shape
    names, images, skipped = [], [], []
    for f in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
                    and p.suffix.lower() in IMAGE_SUFFIXES | {".npz"}):
        if f.suffix.lower() == ".npz":
            indices, shard = read_npz_shard(f)
            if shard.shape[1:3] != (h, w):
                raise EdgegenError(f"{f}: images are {shard.shape[2]}x{shard.shape[1]} but the index holds "
                                   f"{w}x{h} training images")
            if shard.shape[3] != c:     # as the image files: grey by OpenCV's luma, or grey repeated
                shard = (np.stack([cv2.cvtColor(im, cv2.COLOR_RGB2GRAY) for im in shard])[..., None] if c == 1
                         else np.repeat(shard, 3, axis=3))
            names += [f"{f.relative_to(root)}#{i}" for i in indices]
            images += list(shard)
            continue
        img = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE if c == 1 else cv2.IMREAD_COLOR)
        if img is None:
            if not skip_bad:
                raise EdgegenError(f"{f}: not a readable image (use --skip-bad to skip such files)")
            skipped.append(str(f))
            continue
        if img.shape[:2] != (h, w):
            raise EdgegenError(f"{f}: image is {img.shape[1]}x{img.shape[0]} but the index holds "
                               f"{w}x{h} training images")
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if c == 3 else img[:, :, None]
        names.append(str(f.relative_to(root)))
        images.append(img)
    if not images:
        raise EdgegenError(f"{root}: no images to audit" + (f" ({len(skipped)} unreadable files skipped)" if skipped else ""))
    return names, np.stack(images), skipped


def model_batches(model: str | os.PathLike, index: HashIndex, n: int, seed: int = 0,
                  batch: int = 1000) -> Iterator[tuple[list[str], np.ndarray]]:
    """Generate ``n`` images from an exported model (``edgegen.runtime``) in batches, checked first.

    The model's metadata records the fingerprint of the index of its training set (when export
    found one); it must equal this index's fingerprint, and its images must have the index's shape.
    """
    from edgegen.runtime import Generator

    gen = Generator.load(model, mode="batch")
    meta = gen.meta
    if meta.extra.get("data_fingerprint_source") == "train.idx" and meta.data_fingerprint \
            and meta.data_fingerprint != index.fingerprint:
        raise EdgegenError(f"{model}: model was trained with index {meta.data_fingerprint}, but "
                           f"{index.path} is {index.fingerprint} (index of another data set or settings)")
    if tuple(meta.image_shape) != index.image_shape:
        raise EdgegenError(f"{model}: model makes {tuple(meta.image_shape)} images but the index holds "
                           f"{index.image_shape} training images")
    for start in range(0, n, batch):
        images = gen.generate(min(batch, n - start), seed=seed, start=start, batch_size=256)
        yield [f"seed {seed} #{i}" for i in range(start, start + len(images))], images
