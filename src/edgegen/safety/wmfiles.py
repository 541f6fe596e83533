"""File front end of the watermark for ``edgegen watermark embed|detect`` (OpenCV I/O, no torch).

Images are read one by one (they may differ in size), grey files stay grey and colour files
are marked in luma; outputs are PNG written atomically. Detection prints one JSON line per
file and names unreadable files instead of stopping.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np

from edgegen.errors import EdgegenError
from edgegen.fileio import IMAGE_SUFFIXES, safe_join, write_bytes_atomic
from edgegen.safety.keys import load_key
from edgegen.safety.watermark import DEFAULT_THRESHOLD, Watermarker


def read_image(path: Path) -> np.ndarray | None:
    """A file as (H, W) grey or (H, W, 3) RGB uint8; None when it is not a readable 8-bit image."""
    read = _read_with_alpha(path)
    return None if read is None else read[0]


def _read_with_alpha(path: Path) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(grey or RGB image, alpha channel or None), or None when not a readable 8-bit image."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None or img.dtype != np.uint8:
        return None
    alpha = None
    if img.ndim == 3 and img.shape[2] == 4:
        img, alpha = img[:, :, :3], img[:, :, 3]   # the mark lives in luma; alpha is written back as it was
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img, alpha


def expand_paths(items: Iterable[str], npz: bool = False) -> list[Path]:
    """Files as given, folders replaced by their image files (and npz shards if ``npz``; sorted, not recursive)."""
    suffixes = IMAGE_SUFFIXES | ({".npz"} if npz else set())
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in suffixes))
        else:
            out.append(p)
    return out


def embed_files(images: list[str], out_dir: str, key_path: str | None = None, payload: int = 0,
                force: bool = False) -> list[Path]:
    """Mark each image file and write ``OUT/<stem>.png`` (an alpha channel kept as it was); returns the paths.

    Every input is read and marked before anything is written: an unreadable or unmarkable file
    stops the run naming it, and so does an output that would replace an input or (without
    ``force``) an existing file.
    """
    wm = Watermarker(load_key(key_path))
    if not 0 <= payload < (1 << wm.payload_bits):
        raise EdgegenError(f"--payload must be in 0..{(1 << wm.payload_bits) - 1}, got {payload}")
    paths = expand_paths(images)
    if not paths:
        raise EdgegenError("no image files found in the given paths")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise EdgegenError(f"no such files: {', '.join(missing)}")
    loaded = [(p, _read_with_alpha(p)) for p in paths]
    bad = [str(p) for p, img in loaded if img is None]
    if bad:
        raise EdgegenError(f"not readable 8-bit images: {', '.join(bad)}")
    by_stem: dict[str, Path] = {}
    for p in paths:
        if p.stem in by_stem:
            raise EdgegenError(f"{by_stem[p.stem]} and {p} share a file name stem; their outputs would collide")
        by_stem[p.stem] = p
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EdgegenError(f"--out {out}: is a file, expected a folder")
    inputs = {p.resolve() for p in paths}
    encoded = []
    for path, (img, alpha) in loaded:
        target = safe_join(out, path.stem + ".png")
        if target in inputs:
            raise EdgegenError(f"{target}: would overwrite an input image; choose another --out")
        if target.exists() and not force:
            raise EdgegenError(f"{target}: already exists; refusing to overwrite (another --out, or --force)")
        try:
            marked = wm.embed(img[None], payload)[0]
        except EdgegenError as e:
            raise EdgegenError(f"{path}: {e}") from None
        bgr = marked if marked.ndim == 2 else cv2.cvtColor(marked, cv2.COLOR_RGB2BGR)
        if alpha is not None:
            bgr = np.dstack([bgr if bgr.ndim == 3 else cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR), alpha])
        ok, buf = cv2.imencode(".png", bgr)
        if not ok:
            raise EdgegenError(f"{path}: could not encode the marked image")
        encoded.append((target, buf))
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for target, buf in encoded:
        write_bytes_atomic(target, buf.tobytes())
        written.append(target)
    print(f"marked {len(written)} images into {out} with key {wm.fingerprint}, payload {payload}", file=sys.stderr)
    return written


def detect_files(images: list[str], key_path: str | None = None, threshold: float = DEFAULT_THRESHOLD) -> int:
    """Print one JSON line per file (file, detected, p_value, payload, matching_bits, key).

    An ``edgegen generate`` npz shard gives one line per image, with its ``index``. Unreadable or
    too-small files get a line with an ``error`` and are named on stderr; the return value (the
    exit code) is 0 when every file was read, 1 otherwise.
    """
    wm = Watermarker(load_key(key_path), threshold=threshold)
    paths = expand_paths(images, npz=True)
    if not paths:
        raise EdgegenError("no image files found in the given paths")
    unreadable = []
    for path in paths:
        try:
            rows, batch = _read_for_detection(path)
            dets = wm.detect(batch)
        except EdgegenError as e:                 # unreadable, or too small to carry the mark
            unreadable.append(str(path))
            print(json.dumps({"file": str(path), "error": str(e)}))
            continue
        for row, d in zip(rows, dets):
            print(json.dumps({"file": str(path), **row, "detected": d.detected, "p_value": d.p_value,
                              "payload": d.payload, "matching_bits": f"{d.matching_bits}/{d.sync_bits}",
                              "key": wm.fingerprint}))
    if unreadable:
        print(f"edgegen: could not read {len(unreadable)} file(s): {', '.join(unreadable)}", file=sys.stderr)
        return 1
    return 0


def _read_for_detection(path: Path) -> tuple[list[dict], np.ndarray]:
    """(one dict of extra JSON fields per image, images as a batch) of an image file or npz shard."""
    from edgegen.safety.sources import read_npz_shard

    if not path.exists():
        raise EdgegenError("no such file")
    if path.suffix.lower() == ".npz":
        indices, shard = read_npz_shard(path)
        return [{"index": int(i)} for i in indices], shard
    img = read_image(path)
    if img is None:
        raise EdgegenError("not a readable 8-bit image")
    return [{}], img[None]
