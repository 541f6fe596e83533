"""Atomic file writing and safe output paths, shared by every stage (no torch)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

from edgegen.errors import EdgegenError


# File suffixes read as images everywhere (training folders, watermark and audit inputs).
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}

_UMASK = os.umask(0o022)  # read the process umask once (at import, before any threads) ...
os.umask(_UMASK)          # ... and put it back


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", private: bool = False) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync and rename it into place.

    Readers never see a half-written file: on any exception the temporary file is removed
    and ``path`` keeps its previous content (or stays absent). The file gets the usual
    permissions (0666 less the umask), or 0600 when ``private`` (secret keys).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise EdgegenError(f"{path}: the folder {path.parent} does not exist")
    if path.is_dir():
        raise EdgegenError(f"{path}: is a folder, expected an output file name")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise EdgegenError(f"{path}: cannot write here ({e.strerror})") from None
    try:
        if not private:  # mkstemp creates 0600; outputs should be readable like any other file
            os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:      # disk full, read-only, quota, I/O
            raise EdgegenError(f"{path}: cannot write ({e.strerror}); nothing was written") from None
        raise


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + rename)."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def safe_join(root: str | os.PathLike, name: str) -> Path:
    """Join ``name`` under ``root``, refusing names that would escape it (``..``, absolute paths)."""
    root_p = Path(root).resolve()
    target = (root_p / name).resolve()
    if target != root_p and root_p not in target.parents:
        raise EdgegenError(f"{name}: path escapes the output folder {root}")
    return target


def sha256_hex(*chunks: bytes, length: int = 16) -> str:
    """Short hex SHA-256 fingerprint of the concatenated chunks."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()[:length]
