"""The pretrained models shipped in the package: listed, loadable without training, and sound."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edgegen.cli import main
from edgegen.runtime import Generator, default_model_path
from edgegen.runtime.catalogue import bundled_models
from edgegen.training.data import FASHION_MNIST_CLASSES


@pytest.fixture(scope="module")
def models():
    found = {m.name: m for m in bundled_models()}
    assert set(found) == {"gan", "conditional", "vae"}
    return found


def test_catalogue_metadata_and_size(models, capsys):
    for m in models.values():
        assert m.meta.quantization == "int8" and m.meta.image_shape == (32, 32, 1)
        assert m.meta.data_name == "fashion-mnist" and m.meta.data_fingerprint
        assert m.size_bytes < 1_000_000 and m.record["quality"]["int8"]["n"] == 10_000
    assert models["conditional"].meta.class_names == FASHION_MNIST_CLASSES
    assert models["vae"].meta.sampling == "expost"
    assets = Path(default_model_path("gan")).parent.parent
    assert sum(f.stat().st_size for f in assets.rglob("*") if f.is_file()) < 5_000_000  # "a few MB"
    assert main(["models"]) == 0
    assert len([line for line in capsys.readouterr().out.splitlines() if "FCD" in line]) == 3


def test_generate_without_a_model_uses_the_bundled_gan(tmp_path):
    assert main(["generate", "-n", "16", "--out", str(tmp_path / "s"), "--no-watermark", "--quiet"]) == 0
    pngs = sorted((tmp_path / "s").rglob("*.png"))
    assert len(pngs) == 16
    img = cv2.imread(str(pngs[0]), cv2.IMREAD_UNCHANGED)
    assert img.shape == (32, 32) and img.std() > 10  # a garment, not a flat image


def test_conditional_model_draws_the_requested_class(tmp_path):
    """The bundled classifier agrees with `--class Sneaker` on most samples."""
    from edgegen.training.evaluate import Evaluator, load_classifier
    from edgegen.training.data import load_dataset

    assert main(["generate", "--model", "conditional", "--class", "Sneaker", "-n", "64",
                 "--out", str(tmp_path / "s"), "--no-watermark", "--quiet"]) == 0
    images = np.stack([cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)[..., None]
                       for p in sorted((tmp_path / "s").rglob("*.png"))])
    ev = Evaluator(load_classifier(), load_dataset("fashion-mnist", "test", size=32).subset(100))
    preds = ev.features(images)[1]
    assert (preds == FASHION_MNIST_CLASSES.index("Sneaker")).mean() >= 0.8


def test_vae_reconstructs_real_images(fmnist_test):
    gen = Generator.load(default_model_path("vae"))
    x = np.stack([cv2.resize(i, (32, 32))[..., None] for i in fmnist_test.images[:32]])
    recon = gen.reconstruct(x)
    assert recon.shape == x.shape and recon.dtype == np.uint8
    err = np.abs(recon.astype(float) - x).mean()
    assert err < 0.5 * np.abs(x.astype(float) - x.mean()).mean()  # far better than a flat guess
