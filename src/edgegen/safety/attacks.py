"""Image attacks for watermark robustness checks (numpy, OpenCV, Pillow; no torch).

Every function maps a uint8 batch (N, H, W) or (N, H, W, 3) to a new uint8 batch, the
way a user's tools would: JPEG through OpenCV or Pillow (4:2:0 chroma subsampling for
colour), resizing with OpenCV's default bilinear filter (area filter when shrinking),
Gaussian noise and blur, brightness (added, clipped) and Pillow's contrast (scaled about
the mean grey). ``ATTACKS`` names the set the benchmark and tests use.
"""

from __future__ import annotations

import io
from typing import Callable

import cv2
import numpy as np
from PIL import Image, ImageEnhance


def _each(images: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    return np.stack([fn(img) for img in images])


def jpeg_cv2(images: np.ndarray, quality: int) -> np.ndarray:
    """JPEG encode + decode with OpenCV (RGB handled as RGB, i.e. converted to BGR and back)."""
    def one(img: np.ndarray) -> np.ndarray:
        bgr = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        assert ok
        out = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        return out if img.ndim == 2 else cv2.cvtColor(out, cv2.COLOR_BGR2RGB)
    return _each(images, one)


def jpeg_pil(images: np.ndarray, quality: int) -> np.ndarray:
    """JPEG encode + decode with Pillow."""
    def one(img: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())))
    return _each(images, one)


def resize(images: np.ndarray, factor: float) -> np.ndarray:
    """Resize by ``factor`` (area filter when shrinking, bilinear when enlarging)."""
    h, w = images.shape[1:3]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    return _each(images, lambda img: cv2.resize(img, size, interpolation=interp))


def gaussian_noise(images: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """Add i.i.d. N(0, sigma^2) noise to every channel, round and clip."""
    noise = np.random.default_rng(seed).normal(0.0, sigma, images.shape)
    return np.clip(np.rint(images + noise), 0, 255).astype(np.uint8)


def blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with standard deviation ``sigma`` pixels (OpenCV's kernel size)."""
    return _each(images, lambda img: cv2.GaussianBlur(img, (0, 0), sigma))


def brightness(images: np.ndarray, delta: int) -> np.ndarray:
    """Add ``delta`` grey levels to every channel, clipped to 0..255."""
    return np.clip(images.astype(np.int16) + delta, 0, 255).astype(np.uint8)


def contrast(images: np.ndarray, factor: float) -> np.ndarray:
    """Pillow's ``ImageEnhance.Contrast``: scale about the image's mean grey, clipped."""
    return _each(images, lambda img: np.asarray(ImageEnhance.Contrast(Image.fromarray(img)).enhance(factor)))


def crop(images: np.ndarray, keep: float) -> np.ndarray:
    """Keep the central ``keep`` fraction of each side."""
    h, w = images.shape[1:3]
    dh, dw = round(h * (1 - keep) / 2), round(w * (1 - keep) / 2)
    return np.ascontiguousarray(images[:, dh:h - dh, dw:w - dw])


def rotate(images: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate about the centre by ``degrees`` (bilinear, black corners)."""
    h, w = images.shape[1:3]
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), degrees, 1.0)
    return _each(images, lambda img: cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR))


def flip(images: np.ndarray) -> np.ndarray:
    """Mirror left-right."""
    return np.ascontiguousarray(images[:, :, ::-1])


ATTACKS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": lambda x: x,
    "JPEG q90": lambda x: jpeg_cv2(x, 90),
    "JPEG q75": lambda x: jpeg_cv2(x, 75),
    "JPEG q75 (Pillow)": lambda x: jpeg_pil(x, 75),
    "JPEG q50": lambda x: jpeg_cv2(x, 50),
    "noise σ=5": lambda x: gaussian_noise(x, 5.0),
    "brightness +20": lambda x: brightness(x, 20),
    "brightness −20": lambda x: brightness(x, -20),
    "contrast ×0.8": lambda x: contrast(x, 0.8),
    "contrast ×1.2": lambda x: contrast(x, 1.2),
    "resize ×0.75": lambda x: resize(x, 0.75),
    "resize ×2": lambda x: resize(x, 2.0),
    "blur σ=1": lambda x: blur(x, 1.0),
    "resize ×0.5": lambda x: resize(x, 0.5),
    "crop 90 %": lambda x: crop(x, 0.9),
    "rotation 2°": lambda x: rotate(x, 2.0),
    "flip": flip,
}
