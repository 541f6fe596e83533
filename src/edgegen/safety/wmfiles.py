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
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None or img.dtype != np.uint8:
        return None
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]                       # alpha dropped: the mark lives in luma
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img


def expand_paths(items: Iterable[str]) -> list[Path]:
    """Files as given, folders replaced by their image files (sorted, not recursive)."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            out.append(p)
    return out


def embed_files(images: list[str], out_dir: str, key_path: str | None = None, payload: int = 0) -> list[Path]:
    """Mark each image file and write ``OUT/<stem>.png``; returns the written paths.

    Any unreadable input stops the run before anything is written, naming every such file.
    """
    wm = Watermarker(load_key(key_path))
    paths = expand_paths(images)
    loaded = [(p, read_image(p)) for p in paths]
    bad = [str(p) for p, img in loaded if img is None]
    if bad:
        raise EdgegenError(f"not readable 8-bit images: {', '.join(bad)}")
    if not loaded:
        raise EdgegenError("no images given")
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):
        raise EdgegenError("two inputs share a file name stem; their outputs would collide")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path, img in loaded:
        marked = wm.embed(img[None], payload)[0]
        bgr = marked if marked.ndim == 2 else cv2.cvtColor(marked, cv2.COLOR_RGB2BGR)
        ok, buf = cv2.imencode(".png", bgr)
        if not ok:
            raise EdgegenError(f"{path}: could not encode the marked image")
        target = safe_join(out, path.stem + ".png")
        write_bytes_atomic(target, buf.tobytes())
        written.append(target)
    print(f"marked {len(written)} images into {out} with key {wm.fingerprint}, payload {payload}", file=sys.stderr)
    return written


def detect_files(images: list[str], key_path: str | None = None, threshold: float = DEFAULT_THRESHOLD) -> int:
    """Print one JSON line per file (file, detected, p_value, payload, matching_bits, key).

    Unreadable or too-small files get a line with an ``error`` and are named on stderr; the
    return value (the exit code) is 0 when every file was read, 1 otherwise.
    """
    wm = Watermarker(load_key(key_path), threshold=threshold)
    paths = expand_paths(images)
    if not paths:
        raise EdgegenError("no image files found in the given paths")
    unreadable = []
    for path in paths:
        img = read_image(path) if path.is_file() else None
        try:
            det = wm.detect(img[None]) if img is not None else None
        except EdgegenError as e:                 # e.g. an image too small to carry the mark
            det, reason = None, str(e)
        else:
            reason = "not a readable 8-bit image"
        if det is None:
            unreadable.append(str(path))
            print(json.dumps({"file": str(path), "error": reason}))
            continue
        d = det[0]
        print(json.dumps({"file": str(path), "detected": d.detected, "p_value": d.p_value, "payload": d.payload,
                          "matching_bits": f"{d.matching_bits}/{d.sync_bits}", "key": wm.fingerprint}))
    if unreadable:
        print(f"edgegen: could not read {len(unreadable)} file(s): {', '.join(unreadable)}", file=sys.stderr)
        return 1
    return 0
