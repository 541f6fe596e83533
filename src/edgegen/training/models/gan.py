"""GAN for small images, shaped for fast int8 inference on CPU.

Generator: z (N, latent) -> Linear -> (N, C0, s0, s0) -> [upsample x2 -> Conv3x3 -> BN -> ReLU] x n
-> Conv3x3 -> tanh -> (N, C, H, W) in [-1, 1].

Why this shape: onnxruntime's CPU int8 path runs Conv as QLinearConv on int8 (VNNI) kernels but a
quantized ConvTranspose falls back to float, so we upsample by nearest-neighbour resize (or pixel
shuffle) followed by a plain Conv; that also avoids checkerboard artefacts. Every conv is followed
directly by BatchNorm (conv has no bias) so export folds BN into the conv weights. The ReLUs may be
capped (``act_clip``, :func:`activation`) so that int8 rounds every activation on a fixed, fine grid.

Discriminator: spectrally normalised convs, hinge loss, and a projection head for class
conditioning (Miyato & Koyama 2018).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from statistics import NormalDist

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm


@dataclass
class GANConfig:
    image_size: int = 32          # 28, 32 or 64
    channels: int = 1             # 1 (gray) or 3 (RGB)
    latent_dim: int = 64
    width: int = 32               # channels of the last up-block; earlier blocks double it
    num_classes: int = 0          # > 0: class-conditional (label embedding in G, projection in D)
    upsample: str = "nearest"     # "nearest" (resize + conv) or "pixelshuffle" (conv + depth-to-space)
    d_width: int = 32
    act_clip: float = 0.0         # > 0: G's activations are min(relu(x), act_clip) (int8-friendly, see below)
    # Self-conditioning (training.clusters): each label-free cluster's share of the training images.
    # Non-empty: G and D are conditioned on the cluster, and G draws it from its own latent (cluster_of).
    cluster_freq: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.image_size not in (28, 32, 64):
            raise ValueError(f"image_size must be 28, 32 or 64, got {self.image_size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.upsample not in ("nearest", "pixelshuffle"):
            raise ValueError(f"upsample must be nearest or pixelshuffle, got {self.upsample}")
        if self.act_clip < 0:
            raise ValueError(f"act_clip must be >= 0, got {self.act_clip}")
        if self.cluster_freq and self.num_classes:
            raise ValueError("a GAN is either class-conditional or self-conditioned, not both")

    @property
    def conditional(self) -> bool:
        """Takes a class label as input (self-conditioned GANs do not: they draw their cluster)."""
        return self.num_classes > 0

    @property
    def groups(self) -> int:
        """Classes or clusters that G's label embedding and D's projection are conditioned on (0: none)."""
        return self.num_classes or len(self.cluster_freq)

    def to_dict(self) -> dict:
        return asdict(self)


def _plan(image_size: int) -> tuple[int, int]:
    """(start side, number of x2 up-blocks): 28 = 7*4, 32 = 4*8, 64 = 4*16."""
    return (7, 2) if image_size == 28 else (4, {32: 3, 64: 4}[image_size])


def activation(x: torch.Tensor, clip: float) -> torch.Tensor:
    """ReLU, or with ``clip > 0`` ReLU capped at ``clip`` (ONNX ``Clip(0, clip)``, like MobileNet's ReLU6).

    Why cap: int8 rounds each activation tensor on one uint8 grid from 0 to its largest value. A
    plain ReLU's rare peaks (10-13x its RMS in a trained GAN) set that grid, and the rounding
    noise they bring is what keeps int8 pixels from matching fp32. A cap that is there during
    training fixes the grid at ``clip / 255``, and the model learns to work within it.
    """
    return F.relu(x) if clip <= 0 else x.clamp(0.0, clip)


class UpBlock(nn.Module):
    """x2 upsample then Conv3x3 -> BN -> ReLU: (N, cin, s, s) -> (N, cout, 2s, 2s)."""

    def __init__(self, cin: int, cout: int, mode: str, clip: float = 0.0):
        super().__init__()
        self.mode, self.clip = mode, clip
        if mode == "nearest":
            self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        else:  # conv at low resolution to 4*cout channels, then DepthToSpace: same MACs, no Resize op
            self.conv = nn.Conv2d(cin, 4 * cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4 * cout if mode == "pixelshuffle" else cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "nearest":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            return activation(self.bn(self.conv(x)), self.clip)
        return F.pixel_shuffle(activation(self.bn(self.conv(x)), self.clip), 2)


class Generator(nn.Module):
    """z (N, latent) [+ label (N,)] -> images (N, C, H, W) in [-1, 1]."""

    def __init__(self, cfg: GANConfig):
        super().__init__()
        self.cfg = cfg
        s0, n_up = _plan(cfg.image_size)
        chans = [cfg.width * 2 ** (n_up - i) for i in range(n_up + 1)]  # e.g. 256,128,64,32 for 32 px
        in_dim = cfg.latent_dim * (2 if cfg.groups else 1)
        self.embed = nn.Embedding(cfg.groups, cfg.latent_dim) if cfg.groups else None
        # Self-conditioned: the cluster is the bucket of z's last coordinate between the N(0, 1)
        # quantiles of the clusters' cumulative shares, so clusters come out in their training shares.
        cum = torch.tensor(cfg.cluster_freq, dtype=torch.float64).cumsum(0)[:-1].clamp(1e-12, 1 - 1e-12)
        edges = torch.tensor([NormalDist().inv_cdf(float(c)) for c in cum], dtype=torch.float32)   # (k - 1,)
        self.register_buffer("cluster_edges", edges, persistent=False)
        self.fc = nn.Linear(in_dim, chans[0] * s0 * s0, bias=False)
        self.bn0 = nn.BatchNorm1d(chans[0] * s0 * s0)
        self.blocks = nn.Sequential(*[UpBlock(chans[i], chans[i + 1], cfg.upsample, cfg.act_clip) for i in range(n_up)])
        self.out = nn.Conv2d(chans[-1], cfg.channels, 3, padding=1)
        self.s0, self.c0 = s0, chans[0]

    def cluster_of(self, z: torch.Tensor) -> torch.Tensor:
        """Cluster drawn by latents z (N, latent) of a self-conditioned generator: (N,) int64."""
        return (z[:, -1:] > self.cluster_edges).sum(dim=1)                 # (N, k-1) bool -> (N,)

    def forward(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            if label is None and not self.cfg.cluster_freq:
                raise ValueError("conditional generator needs labels")
            if label is None:
                label = self.cluster_of(z)
            z = torch.cat([z, self.embed(label)], dim=1)          # (N, 2*latent)
        h = activation(self.bn0(self.fc(z)), self.cfg.act_clip)    # (N, C0*s0*s0)
        h = h.view(-1, self.c0, self.s0, self.s0)                  # (N, C0, s0, s0)
        h = self.blocks(h)                                         # (N, width, H, W)
        return torch.tanh(self.out(h))                             # (N, C, H, W)


class Discriminator(nn.Module):
    """images (N, C, H, W) [+ label] -> realness score (N,); spectral norm on every weight."""

    def __init__(self, cfg: GANConfig):
        super().__init__()
        w = cfg.d_width
        layers: list[nn.Module] = [spectral_norm(nn.Conv2d(cfg.channels, w, 3, padding=1)), nn.LeakyReLU(0.1)]
        c, side = w, cfg.image_size
        while side > 4:
            # (N, c, s, s) -> (N, 2c, s/2, s/2): 32 -> 16 -> 8 -> 4, 28 -> 14 -> 7 -> 3
            layers += [spectral_norm(nn.Conv2d(c, 2 * c, 4, stride=2, padding=1)), nn.LeakyReLU(0.1),
                       spectral_norm(nn.Conv2d(2 * c, 2 * c, 3, padding=1)), nn.LeakyReLU(0.1)]
            c, side = 2 * c, (side - 2) // 2 + 1
        self.features = nn.Sequential(*layers)
        self.head = spectral_norm(nn.Linear(c, 1))
        self.embed = spectral_norm(nn.Embedding(cfg.groups, c)) if cfg.groups else None

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        h = self.features(x).sum(dim=(2, 3))                       # (N, c) global sum pool
        out = self.head(h).squeeze(1)                               # (N,)
        if self.embed is not None:
            out = out + (self.embed(label) * h).sum(dim=1)          # projection term <e_y, h>
        return out


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]."""
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def hinge_g_loss(fake: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: -E[D(G(z))]."""
    return -fake.mean()


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameters only (BN stats are recomputed later)."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - decay)


@torch.no_grad()
def recompute_bn_stats(gen: Generator, batches: int = 32, batch_size: int = 256, seed: int = 0) -> None:
    """Recompute BatchNorm running statistics for the (EMA-averaged) weights.

    Averaged weights do not match the running stats accumulated by the live model, so we
    reset them and take a cumulative average over fresh prior samples (momentum=None).
    """
    device = next(gen.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(seed)
    bns = [m for m in gen.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was_training = gen.training
    gen.train()
    for _ in range(batches):
        z = torch.randn(batch_size, gen.cfg.latent_dim, generator=g).to(device)
        label = (torch.randint(0, gen.cfg.num_classes, (batch_size,), generator=g).to(device)
                 if gen.cfg.conditional else None)
        gen(z, label)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    gen.train(was_training)
