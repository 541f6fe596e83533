"""Training data: MNIST-format IDX files, Fashion-MNIST by name, and folders of images.

Everything here is numpy + OpenCV (no torch), so the safety layer can read the same data
to build its hash index. A data set is an :class:`ImageDataset`: uint8 pixels (N, H, W, C),
integer labels or None, and the class names that travel with them.

Data sources (``--data``):
    fashion-mnist       Debian's dataset-fashion-mnist files, or $EDGEGEN_DATA
    DIR with IDX files  ``train-images-idx3-ubyte[.gz]`` + labels (MNIST layout)
    FILE.idx[.gz]       one IDX image file (labels beside it when named ``*-labels-*``)
    DIR of images       PNG/JPEG; labels from sub-folder names; files without an image suffix are ignored
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from edgegen.errors import EdgegenError
from edgegen.fileio import IMAGE_SUFFIXES, sha256_hex

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/ format).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class NoSplitError(EdgegenError):
    """The data set has no such split (e.g. an image folder without ``train/`` and ``test/``)."""


@dataclass(frozen=True)
class ImageDataset:
    """Images (N, H, W, C) uint8, labels (N,) int64 or None, class names, and where they came from."""

    images: np.ndarray
    labels: np.ndarray | None
    class_names: tuple[str, ...]
    name: str
    source: str = ""
    skipped: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W, C), got {self.images.dtype} {self.images.shape}")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise ValueError("labels and images differ in length")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def fingerprint(self) -> str:
        """Short SHA-256 of shape, pixels and labels: identifies exactly this data."""
        labels = b"" if self.labels is None else self.labels.astype("<i8").tobytes()
        return sha256_hex(str(self.images.shape).encode(), np.ascontiguousarray(self.images).tobytes(), labels)

    def subset(self, n: int, seed: int = 0) -> "ImageDataset":
        """A seeded random subset of ``n`` images (all of them when ``n >= len``); ``n`` must be at least 1."""
        if n < 1:
            raise EdgegenError(f"{self.name}: a subset needs at least 1 image, got {n}")
        if n >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).choice(len(self), n, replace=False))
        labels = None if self.labels is None else self.labels[idx]
        return ImageDataset(self.images[idx], labels, self.class_names, self.name, self.source)


# ----------------------------------------------------------------------------- IDX files


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzipped or not) with full validation of magic, dimensions and size.

    Raises :class:`EdgegenError` naming the file on a wrong magic number, a truncated or
    corrupt gzip stream, or a payload whose size does not match the header.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise EdgegenError(f"{path}: cannot read ({e.strerror})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:
            raise EdgegenError(f"{path}: corrupt or truncated gzip data ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or not 1 <= raw[3] <= 4:
        raise EdgegenError(f"{path}: not an IDX file (wrong magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise EdgegenError(f"{path}: IDX header is truncated")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise EdgegenError(
            f"{path}: IDX payload is {len(raw) - header} bytes but the header {dims} needs {expected}"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx_pair(images_path: str | os.PathLike, labels_path: str | os.PathLike | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Read an IDX image file (N, H, W) uint8 and its label file (N,), checking they match."""
    images = read_idx(images_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise EdgegenError(f"{images_path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    if labels_path is None:
        return images, None
    labels = read_idx(labels_path)
    if labels.ndim != 1:
        raise EdgegenError(f"{labels_path}: expected a 1-D label file, got shape {labels.shape}")
    if len(labels) != len(images):
        raise EdgegenError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}")
    return images, labels.astype(np.int64)


def _find_idx(root: Path, split: str) -> tuple[Path, Path | None] | None:
    prefix = "train" if split == "train" else "t10k"
    for suffix in ("", ".gz"):
        img = root / f"{prefix}-images-idx3-ubyte{suffix}"
        if img.is_file():
            for lsuffix in ("", ".gz"):
                lab = root / f"{prefix}-labels-idx1-ubyte{lsuffix}"
                if lab.is_file():
                    return img, lab
            return img, None
    return None


def fashion_mnist_root() -> Path:
    """Where Fashion-MNIST lives: ``$EDGEGEN_DATA`` or Debian's package folder; error says how to install."""
    root = Path(os.environ.get("EDGEGEN_DATA", FASHION_MNIST_DIR))
    if _find_idx(root, "train") is None:
        raise EdgegenError(
            f"{root}: Fashion-MNIST not found; install it with "
            "`apt-get install dataset-fashion-mnist` or point $EDGEGEN_DATA at its IDX files"
        )
    return root


# ----------------------------------------------------------------------------- image folders


def _read_image(path: Path, channels: int) -> np.ndarray | None:
    flag = cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR
    img = cv2.imread(str(path), flag)
    if img is None:
        return None
    if channels == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img if img.ndim == 3 else img[:, :, None]


def read_image_folder(root: str | os.PathLike, channels: int = 1, skip_bad: bool = False) -> ImageDataset:
    """Read a folder of images; sub-folder names become class labels (sorted), flat folders have none.

    Only files with an image suffix (:data:`~edgegen.fileio.IMAGE_SUFFIXES`) are read; others (the
    ``manifest.jsonl`` of an ``edgegen generate`` folder, notes) are ignored. Images keep their own
    size here (see :func:`fit_images`). An image file that cannot be decoded stops the read with an
    error naming it, unless ``skip_bad`` is set, in which case it is listed in ``ImageDataset.skipped``.
    """
    root = Path(root)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    groups = [(d.name, sorted(d.rglob("*"))) for d in subdirs] if subdirs else [("", sorted(root.iterdir()))]
    images, labels, skipped, sizes = [], [], [], set()
    for label, (_, files) in enumerate(groups):
        for f in files:
            if not f.is_file() or f.name.startswith(".") or f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            img = _read_image(f, channels)
            if img is None:
                if not skip_bad:
                    raise EdgegenError(f"{f}: not a readable image (use --skip-bad to skip such files)")
                skipped.append(str(f))
                continue
            images.append(img)
            labels.append(label)
            sizes.add(img.shape[:2])
    if not images:
        raise EdgegenError(f"{root}: no readable images found")
    if len(sizes) > 1:
        # Mixed sizes: bring each to one square side so the batch stacks; fit_images does the final resize.
        side = max(max(s) for s in sizes)
        images = [_resize(i, side) for i in images]
    class_names = tuple(name for name, _ in groups) if subdirs else ()
    return ImageDataset(
        np.stack(images), np.asarray(labels, np.int64) if subdirs else None, class_names,
        name=root.name, source=str(root), skipped=tuple(skipped),
    )


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[0] == size and img.shape[1] == size:
        return img
    shrink = img.shape[0] > size
    out = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return out if out.ndim == 3 else out[:, :, None]


def fit_images(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """Resize (N, H, W, C) uint8 images to (N, size, size, channels); gray<->RGB as needed."""
    if images.shape[-1] != channels:
        if channels == 3:
            images = np.repeat(images, 3, axis=-1)
        else:  # ITU-R BT.601 luma, as OpenCV's RGB2GRAY
            images = cv2.cvtColor(images.reshape(-1, images.shape[2], 3), cv2.COLOR_RGB2GRAY).reshape(
                images.shape[:3] + (1,))
    if images.shape[1] == size and images.shape[2] == size:
        return np.ascontiguousarray(images)
    return np.stack([_resize(i, size) for i in images])


# ----------------------------------------------------------------------------- one entry point


def load_dataset(
    data: str,
    split: str = "train",
    size: int | None = None,
    channels: int | None = None,
    skip_bad: bool = False,
) -> ImageDataset:
    """Load a data set by name or path (see module docstring), optionally fitted to size/channels.

    ``split`` is ``train`` or ``test``; folders of images have only ``train`` unless they hold
    ``train/`` and ``test/`` sub-folders.
    """
    if split not in ("train", "test"):
        raise EdgegenError(f"unknown split {split!r} (expected train or test)")
    if size is not None and size < 1:
        raise EdgegenError(f"--size must be a positive number of pixels, got {size}")
    if channels not in (None, 1, 3):
        raise EdgegenError(f"--channels must be 1 or 3, got {channels}")
    if data == "fashion-mnist":
        ds = _load_idx_dir(fashion_mnist_root(), split, "fashion-mnist", FASHION_MNIST_CLASSES)
    else:
        path = Path(data)
        if not path.exists():
            raise EdgegenError(f"{data}: no such data set (use 'fashion-mnist', an IDX file/folder or an image folder)")
        if path.is_file():
            ds = _load_idx_file(path)
        elif _find_idx(path, "train") is not None:
            ds = _load_idx_dir(path, split, path.name, ())
        elif (path / "train").is_dir():
            if not (path / split).is_dir():
                raise NoSplitError(f"{data}: image folder has train/ but no {split}/ sub-folder")
            ds = read_image_folder(path / split, channels or 1, skip_bad)
            ds = ImageDataset(ds.images, ds.labels, ds.class_names, path.name, str(path), ds.skipped)
        elif split == "test":
            raise NoSplitError(f"{data}: image folder has no test split (add train/ and test/ sub-folders)")
        else:
            ds = read_image_folder(path, channels or 1, skip_bad)
    if size is None and channels is None:
        return ds
    images = fit_images(ds.images, size or ds.images.shape[1], channels or ds.images.shape[3])
    return ImageDataset(images, ds.labels, ds.class_names, ds.name, ds.source, ds.skipped)


def _load_idx_dir(root: Path, split: str, name: str, class_names: tuple[str, ...]) -> ImageDataset:
    found = _find_idx(root, split)
    if found is None:
        raise NoSplitError(f"{root}: no {split} split (expected {'train' if split == 'train' else 't10k'}-images-idx3-ubyte[.gz])")
    images, labels = read_idx_pair(*found)
    if labels is not None and not class_names:
        class_names = tuple(str(i) for i in range(int(labels.max()) + 1))
    _check_labels(labels, class_names, found[1])
    return ImageDataset(images[..., None], labels, class_names, name=name, source=str(found[0]))


def _load_idx_file(path: Path) -> ImageDataset:
    labels_path = None
    if "-images-" in path.name:
        cand = path.with_name(path.name.replace("-images-idx3-", "-labels-idx1-"))
        labels_path = cand if cand.is_file() else None
    images, labels = read_idx_pair(path, labels_path)
    class_names = tuple(str(i) for i in range(int(labels.max()) + 1)) if labels is not None else ()
    return ImageDataset(images[..., None], labels, class_names, name=path.name.split(".")[0], source=str(path))


def _check_labels(labels: np.ndarray | None, class_names: tuple[str, ...], path: Path | None) -> None:
    if labels is not None and len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise EdgegenError(f"{path}: labels outside 0..{len(class_names) - 1}")
