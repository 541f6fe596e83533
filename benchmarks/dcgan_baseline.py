"""Baseline: a faithful re-implementation of the pytorch/examples DCGAN recipe, on Fashion-MNIST.

The recipe (github.com/pytorch/examples, dcgan/main.py): 64x64 images normalised to [-1, 1],
nz = 100, ngf = ndf = 64, ConvTranspose generator with BatchNorm + ReLU and a tanh output,
strided-conv discriminator with LeakyReLU(0.2) and a sigmoid, BCE loss, Adam lr 2e-4 with
beta1 0.5, batch 64, N(0, 0.02) init; samples are drawn as the example draws them (generator
left in training mode, so BatchNorm uses batch statistics).

Used by ``benchmarks/compare_gan.py``: both recipes get the same wall-clock budget on the same
machine and are scored with ``edgegen eval``'s protocol. Run alone:
    python benchmarks/dcgan_baseline.py --minutes 20 --out runs/dcgan
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from edgegen.training.data import load_dataset

NZ, NGF, NDF = 100, 64, 64


class DCGANGenerator(nn.Module):
    def __init__(self, nc: int = 1):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(NZ, NGF * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(NGF * 8), nn.ReLU(True),      # 4x4
            nn.ConvTranspose2d(NGF * 8, NGF * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(NGF * 4), nn.ReLU(True),  # 8x8
            nn.ConvTranspose2d(NGF * 4, NGF * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(NGF * 2), nn.ReLU(True),  # 16
            nn.ConvTranspose2d(NGF * 2, NGF, 4, 2, 1, bias=False), nn.BatchNorm2d(NGF), nn.ReLU(True),          # 32
            nn.ConvTranspose2d(NGF, nc, 4, 2, 1, bias=False), nn.Tanh())                                        # 64

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z)


class DCGANDiscriminator(nn.Module):
    def __init__(self, nc: int = 1):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(nc, NDF, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(NDF, NDF * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(NDF * 2), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(NDF * 2, NDF * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(NDF * 4), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(NDF * 4, NDF * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(NDF * 8), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(NDF * 8, 1, 4, 1, 0, bias=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).view(-1)


def weights_init(m: nn.Module) -> None:
    """The example's init: conv N(0, 0.02), BatchNorm weight N(1, 0.02) and bias 0."""
    name = m.__class__.__name__
    if "Conv" in name:
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif "BatchNorm" in name:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def train_dcgan(minutes: float, seed: int = 0, batch_size: int = 64) -> tuple[DCGANGenerator, dict]:
    """Train for a wall-clock budget; returns the generator and a summary (steps, images seen)."""
    torch.manual_seed(seed)
    data = load_dataset("fashion-mnist", "train", size=64, channels=1)
    x_all = torch.from_numpy(data.images).permute(0, 3, 1, 2)                      # (N, 1, 64, 64) uint8
    g, d = DCGANGenerator(), DCGANDiscriminator()
    g.apply(weights_init)
    d.apply(weights_init)
    crit = nn.BCELoss()
    opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    rng = np.random.default_rng(seed)
    start, steps = time.monotonic(), 0
    while time.monotonic() - start < minutes * 60:
        nb = len(x_all) // batch_size  # one epoch, last partial batch dropped as DataLoader(drop_last) would
        for idx in rng.permutation(len(x_all))[: nb * batch_size].reshape(nb, batch_size):
            real = x_all[idx].float().div(127.5).sub(1.0)
            # (1) D: maximise log D(x) + log(1 - D(G(z)))
            d.zero_grad()
            err_real = crit(d(real), torch.ones(batch_size))
            fake = g(torch.randn(batch_size, NZ, 1, 1))
            err_fake = crit(d(fake.detach()), torch.zeros(batch_size))
            (err_real + err_fake).backward()
            opt_d.step()
            # (2) G: maximise log D(G(z))
            g.zero_grad()
            crit(d(fake), torch.ones(batch_size)).backward()
            opt_g.step()
            steps += 1
            if time.monotonic() - start >= minutes * 60:
                break
    return g, {"steps": steps, "images_seen": steps * batch_size, "minutes": minutes}


@torch.no_grad()
def sample_dcgan(g: DCGANGenerator, n: int, seed: int = 0) -> np.ndarray:
    """Sample as the example does (train-mode BatchNorm, batches of 64); uint8 (N, 64, 64, 1)."""
    gen = torch.Generator().manual_seed(seed)
    g.train()
    out = []
    for i in range(0, n, 64):
        z = torch.randn(min(64, n - i), NZ, 1, 1, generator=gen)
        out.append(((g(z).clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/dcgan")
    args = ap.parse_args()
    g, summary = train_dcgan(args.minutes, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(g.state_dict(), out / "generator.pt")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
