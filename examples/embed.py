"""Embed an edgegen generator in an app: load once, then generate pixels on demand (no torch).

    python examples/embed.py MODEL.onnx grid.png
"""

import sys

import cv2
import numpy as np

from edgegen.runtime import Generator

gen = Generator.load(sys.argv[1])                # desktop mode: <= 2 threads, no idle spinning
images = gen.generate(16, seed=42)               # (16, H, W, C) uint8; same seed -> same pixels
grid = np.vstack([np.hstack(list(row)) for row in images.reshape(4, 4, *images.shape[1:])])
cv2.imwrite(sys.argv[2], grid if grid.shape[2] == 1 else grid[..., ::-1])   # OpenCV wants BGR
print(f"{gen}: wrote a 4x4 grid to {sys.argv[2]}")
