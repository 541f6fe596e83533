"""`HashIndex`: the pHashes of a training set, saved compactly, searched exactly by Hamming distance.

File layout (one file, e.g. ``train.idx``)::

    b"EGHIDX1\\n"  | uint64 LE manifest length | manifest JSON | zero pad to 64 | array sections

The manifest holds the settings (hash, views, candidates, features), library versions, the data
set (name, fingerprint, shape, how to reload it), the calibration scalars (``--fpr``, thresholds,
scales) and where each array section lies. The ``hashes`` section is 8 bytes per training image
and is memory-mapped on load; the calibration sections (held-out scores, Meehan cells) are small.
``fingerprint`` = SHA-256 of the manifest (minus itself) and every section, checked on load, so a
corrupt or edited file is refused with one line.

Training pixels (needed by the audit's stage-2 confirmation) are normally *not* copied into the
index: when the data set can be reloaded exactly (``load_dataset(**spec)`` reproduces its
fingerprint, checked at build time), the manifest records that recipe and
:meth:`HashIndex.train_pixels` reloads on first use, refusing the data if its fingerprint has
changed since. Otherwise (an in-memory array, a subset, an augmented set) the pixels are stored
as one more uint8 section, ``pixels`` (H*W*C bytes per image), memory-mapped like the hashes.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgegen.errors import EdgegenError
from edgegen.fileio import atomic_write, sha256_hex
from edgegen.safety import hamming
from edgegen.safety.phash import HASH_SIZE, HIGHFREQ_FACTOR, FLAT_STD, phash_batch, is_flat
from edgegen.safety.pixels import BLUR_SIGMA, VIEW_NAMES

MAGIC = b"EGHIDX1\n"
FORMAT = "edgegen-hash-index/1"
_ALIGN = 64
# Smallest image side worth indexing: the hash keeps an 8x8 block of frequencies, so a smaller
# image has fewer pixels than hash bits (and below 3 px the audit's features are empty).
MIN_SIDE = HASH_SIZE
# Everything that changes what a hash, a candidate or a score means. An index whose settings
# differ from these was made by another version of the method and is refused.
SETTINGS: dict[str, Any] = {
    "hash": "imagehash.phash", "hash_size": HASH_SIZE, "highfreq_factor": HIGHFREQ_FACTOR,
    "flat_std": FLAT_STD, "views": list(VIEW_NAMES), "candidates_per_view": 16,
    "features": {"crop": 1, "centre": "mean", "blur_sigma": BLUR_SIGMA, "distance": "rms"},
    "score": "min(rms_plain/scale_plain, rms_blur/scale_blur) over views x candidates",
}


def _versions() -> dict[str, str]:
    import PIL
    import imagehash
    import numba
    import scipy

    from edgegen import __version__
    return {"edgegen": __version__, "numpy": np.__version__, "scipy": scipy.__version__,
            "pillow": PIL.__version__, "imagehash": imagehash.__version__, "numba": numba.__version__}


def dataset_fingerprint(images: np.ndarray, labels: np.ndarray | None = None) -> str:
    """The :meth:`ImageDataset.fingerprint` of these pixels (and labels): identifies the data."""
    from edgegen.training.data import ImageDataset
    return ImageDataset(np.asarray(images), labels, (), "").fingerprint()


@dataclass
class HashIndex:
    """Training-set pHashes (N, 8) uint8 plus their manifest; search, calibration and pixel access.

    Build with :meth:`from_images` / :meth:`from_dataset` (or :func:`build_index`, which also
    calibrates), persist with :meth:`save`, reopen with :meth:`load`.
    """

    hashes: np.ndarray
    manifest: dict
    arrays: dict[str, np.ndarray]
    path: Path | None = None

    def __post_init__(self) -> None:
        self._u64 = hamming._as_u64(self.hashes)
        self._pixels: np.ndarray | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_images(cls, images: np.ndarray, name: str = "array", spec: dict | None = None,
                    fingerprint: str | None = None) -> "HashIndex":
        """Index (N, H, W, C) uint8 training images. ``spec`` = ``load_dataset`` kwargs to reload them."""
        images = np.asarray(images)
        if images.ndim != 4 or images.dtype != np.uint8 or not len(images):
            raise EdgegenError(f"cannot index {images.dtype} {images.shape}: need uint8 (N, H, W, C), N > 0")
        if min(images.shape[1:3]) < MIN_SIDE:
            raise EdgegenError(f"cannot index {images.shape[2]}x{images.shape[1]} images: the perceptual hash "
                               f"needs at least {MIN_SIDE}x{MIN_SIDE} pixels (use a larger --size)")
        hashes, stds = phash_batch(images, return_std=True)
        manifest = {
            "format": FORMAT, "settings": SETTINGS, "versions": _versions(),
            "data": {"name": name, "fingerprint": fingerprint or dataset_fingerprint(images),
                     "n": int(len(images)), "image_shape": list(images.shape[1:]), "spec": spec,
                     "flat_images": int(is_flat(stds).sum())},
            "calibration": None,
        }
        # No reload recipe: the pixels travel inside the index file.
        index = cls(hashes, manifest, {} if spec else {"pixels": images})
        index._pixels = images
        return index

    @classmethod
    def from_dataset(cls, dataset: Any, split: str = "train", spec: dict | None = None) -> "HashIndex":
        """Index an :class:`~edgegen.training.data.ImageDataset`; the reload recipe is derived from it.

        Fashion-MNIST reloads by name, other sources by their path, at the data set's own
        (H, W, C); pass ``spec`` to override. ``split`` is the split the images came from.
        """
        fingerprint = dataset.fingerprint()
        if spec is None:
            h, _, c = dataset.image_shape
            data = "fashion-mnist" if dataset.name == "fashion-mnist" else dataset.source
            spec = {"data": data, "split": split, "size": int(h), "channels": int(c),
                    "skip_bad": bool(dataset.skipped)} if data else None
        if spec is not None and not _reloads_to(spec, fingerprint):
            spec = None  # e.g. a subset: store the pixels instead
        return cls.from_images(dataset.images, dataset.name, spec, fingerprint)

    # ------------------------------------------------------------------ properties

    def __len__(self) -> int:
        return len(self.hashes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the indexed training images; audited images must have it too."""
        return tuple(self.manifest["data"]["image_shape"])  # type: ignore[return-value]

    @property
    def data_fingerprint(self) -> str:
        """Fingerprint of the indexed training data set."""
        return self.manifest["data"]["fingerprint"]

    @property
    def calibration(self) -> dict | None:
        """Calibration scalars (fpr, threshold, scales, ...) or None when not calibrated."""
        return self.manifest.get("calibration")

    @property
    def fingerprint(self) -> str:
        """SHA-256 (16 hex) of manifest and every section: what exported models record."""
        return _fingerprint(self.manifest, self.hashes, self.arrays)

    # ------------------------------------------------------------------ search

    def knn(self, query_hashes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact Hamming k-NN of (Q, 8) hashes: distances (Q, k) int32, training ids (Q, k) int64."""
        return hamming.knn(query_hashes, self._u64, k)

    def range_search(self, query_hashes: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All training hashes within ``radius`` bits, CSR (lims, distances, ids); see :func:`hamming.range_search`."""
        return hamming.range_search(query_hashes, self._u64, radius)

    # ------------------------------------------------------------------ training pixels

    def train_pixels(self) -> np.ndarray:
        """The training images (N, H, W, C) uint8: the stored section, or reloaded and verified."""
        if self._pixels is None and "pixels" in self.arrays:
            self._pixels = self.arrays["pixels"]
        if self._pixels is None:
            spec = self.manifest["data"].get("spec")
            where = self.path or "this index"
            if not spec:
                raise EdgegenError(f"{where}: corrupt index (neither training pixels nor a data source)")
            from edgegen.training.data import load_dataset
            ds = load_dataset(**spec)
            if ds.fingerprint() != self.data_fingerprint:
                raise EdgegenError(f"{where}: training data {spec['data']!r} has changed since the index was "
                                   f"built (fingerprint {ds.fingerprint()}, index has {self.data_fingerprint}); "
                                   "rebuild it with `edgegen index build`")
            self._pixels = ds.images
        return self._pixels

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index atomically (a failed write leaves any previous file untouched)."""
        path = Path(path)
        sections = {"hashes": self.hashes, **self.arrays}
        manifest = dict(self.manifest)
        manifest.pop("fingerprint", None)
        layout, offset = {}, 0
        for name, arr in sections.items():
            arr = np.ascontiguousarray(arr)
            layout[name] = {"offset": offset, "dtype": arr.dtype.str, "shape": list(arr.shape)}
            offset += -(-arr.nbytes // _ALIGN) * _ALIGN
        manifest["sections"] = layout
        manifest["fingerprint"] = _fingerprint(manifest, self.hashes, self.arrays)
        blob = json.dumps(manifest, sort_keys=True).encode()
        head = MAGIC + struct.pack("<Q", len(blob)) + blob
        head += b"\0" * (-len(head) % _ALIGN)
        with atomic_write(path, "wb") as f:
            f.write(head)
            for name, arr in sections.items():
                raw = np.ascontiguousarray(arr).tobytes()
                f.write(raw + b"\0" * (-len(raw) % _ALIGN))
        self.manifest, self.path = manifest, path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, expect_fingerprint: str | None = None) -> "HashIndex":
        """Open an index (hashes memory-mapped), verifying format, settings and fingerprint.

        ``expect_fingerprint`` (e.g. from a model's metadata) must equal the index's; every
        problem is one :class:`EdgegenError` line naming the file.
        """
        path = Path(path)
        manifest, data_start = _read_header(path)
        if manifest.get("settings") != SETTINGS:
            raise EdgegenError(f"{path}: index was built with other settings (another edgegen version); "
                               "rebuild it with `edgegen index build`")
        size = path.stat().st_size
        arrays: dict[str, np.ndarray] = {}
        try:
            for name, sec in manifest["sections"].items():
                dtype, shape = np.dtype(sec["dtype"]), tuple(sec["shape"])
                start = data_start + int(sec["offset"])
                if start + dtype.itemsize * int(np.prod(shape)) > size:
                    raise EdgegenError(f"{path}: index file is truncated (section {name!r})")
                arrays[name] = np.memmap(path, dtype, "r", start, shape) if np.prod(shape) else np.empty(shape, dtype)
        except (KeyError, TypeError, ValueError) as e:
            raise EdgegenError(f"{path}: corrupt index manifest ({e})") from None
        hashes = arrays.pop("hashes", None)
        if hashes is None or hashes.ndim != 2 or hashes.shape[1] != 8:
            raise EdgegenError(f"{path}: corrupt index (no 8-byte hash section)")
        got = _fingerprint(manifest, hashes, arrays)
        if got != manifest.get("fingerprint"):
            raise EdgegenError(f"{path}: index file is corrupt (checksum {got} != {manifest.get('fingerprint')})")
        if expect_fingerprint and expect_fingerprint != got:
            raise EdgegenError(f"{path}: index fingerprint {got} does not match the expected {expect_fingerprint} "
                               "(index built from another data set or with other settings)")
        return cls(hashes, manifest, arrays, path)


def _reloads_to(spec: dict, fingerprint: str) -> bool:
    from edgegen.training.data import load_dataset
    try:
        return load_dataset(**spec).fingerprint() == fingerprint
    except (EdgegenError, OSError, ValueError):
        return False


def _fingerprint(manifest: dict, hashes: np.ndarray, arrays: dict[str, np.ndarray]) -> str:
    meta = {k: v for k, v in manifest.items() if k not in ("fingerprint", "versions")}
    chunks = [json.dumps(meta, sort_keys=True).encode(), np.ascontiguousarray(hashes).tobytes()]
    chunks += [name.encode() + np.ascontiguousarray(arrays[name]).tobytes() for name in sorted(arrays)]
    return sha256_hex(*chunks)


def _read_header(path: Path) -> tuple[dict, int]:
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) < 16 or head[:8] != MAGIC:
                raise EdgegenError(f"{path}: not an edgegen hash index (bad magic; build one with `edgegen index build`)")
            (n,) = struct.unpack("<Q", head[8:])
            if n > 1 << 28:
                raise EdgegenError(f"{path}: corrupt index header (manifest length {n})")
            blob = f.read(n)
    except OSError as e:
        raise EdgegenError(f"{path}: cannot read index ({e.strerror})") from None
    if len(blob) != n:
        raise EdgegenError(f"{path}: index file is truncated (manifest)")
    try:
        manifest = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgegenError(f"{path}: corrupt index manifest ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise EdgegenError(f"{path}: unsupported index format {manifest.get('format') if isinstance(manifest, dict) else '?'}")
    start = 16 + n
    return manifest, start + (-start % _ALIGN)


def read_index_fingerprint(path: str | os.PathLike) -> str:
    """The fingerprint of the index at ``path`` (verified), for export to record in model metadata."""
    return HashIndex.load(path).fingerprint


def build_index(dataset_train: Any, dataset_heldout: Any, out_path: str | os.PathLike | None,
                fpr: float = 0.01) -> HashIndex:
    """Hash the training set, calibrate the audit on held-out images at ``fpr``, save to ``out_path``.

    The one call the training loop makes: ``dataset_train``/``dataset_heldout`` are
    :class:`~edgegen.training.data.ImageDataset` (or (N, H, W, C) uint8 arrays) of the same
    image shape; ``out_path`` None skips saving. Returns the calibrated index.
    """
    from edgegen.safety.audit import calibrate

    if dataset_heldout is None:
        raise EdgegenError("building an index needs held-out images (a test split) to calibrate on")
    if not 0 < fpr < 1:   # checked again by calibrate; here before the slow hashing
        raise EdgegenError(f"--fpr must be between 0 and 1, got {fpr}")
    if isinstance(dataset_train, np.ndarray):
        index = HashIndex.from_images(dataset_train)
    else:
        index = HashIndex.from_dataset(dataset_train)
    heldout = dataset_heldout if isinstance(dataset_heldout, np.ndarray) else dataset_heldout.images
    held_fp = dataset_fingerprint(heldout) if isinstance(dataset_heldout, np.ndarray) else dataset_heldout.fingerprint()
    if held_fp == index.data_fingerprint:
        raise EdgegenError("the held-out images are the training images; calibration needs images not in the "
                           "training set (a test split)")
    calibrate(index, heldout, fpr, heldout_fingerprint=held_fp)
    if out_path is not None:
        index.save(out_path)
    return index
