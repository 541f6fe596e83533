"""Shared fixtures: small real subsets of Fashion-MNIST written as IDX files, and test options."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

# Each xdist worker gets one core: keep torch and onnxruntime from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_configure(config):
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        pass


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    """Write a uint8 array as an MNIST-format IDX file (gzipped when ``gz``)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.fixture(scope="session")
def fmnist_test():
    """The real Fashion-MNIST test split (10,000 images), as an ImageDataset at 28x28."""
    from edgegen.training.data import load_dataset

    return load_dataset("fashion-mnist", "test")


@pytest.fixture(scope="session")
def small_idx_dir(tmp_path_factory, fmnist_test) -> Path:
    """An MNIST-layout folder with 512 train and 256 test images taken from real Fashion-MNIST."""
    root = tmp_path_factory.mktemp("small-fmnist")
    imgs, labels = fmnist_test.images[..., 0], fmnist_test.labels.astype(np.uint8)
    write_idx(root / "train-images-idx3-ubyte.gz", imgs[:512])
    write_idx(root / "train-labels-idx1-ubyte.gz", labels[:512])
    write_idx(root / "t10k-images-idx3-ubyte.gz", imgs[512:768])
    write_idx(root / "t10k-labels-idx1-ubyte.gz", labels[512:768])
    return root
