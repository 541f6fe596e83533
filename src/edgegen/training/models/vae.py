"""Convolutional VAE whose decoder is the GAN generator's edge-friendly network.

Encoder: (N, C, H, W) [+ label] -> strided Conv/BN/LeakyReLU -> (mu, logvar) each (N, latent).
Decoder: :class:`Generator` (resize-conv, BN after every conv) -> (N, C, H, W) in [-1, 1].

Likelihood: Gaussian with fixed sigma on pixels in [-1, 1]; loss = recon + beta * KL, in nats
per image. Besides the N(0, I) prior, :meth:`VAE.fit_expost` fits a full-covariance Gaussian to
the encoder means of the training set ("ex-post density", Ghosh et al. 2020): sampling
z = mean + chol @ eps from it gives sharper images at no training cost. The fitted mean and
Cholesky factor are buffers, so they travel in the checkpoint and into the exported graph.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgegen.training.models.gan import GANConfig, Generator


@dataclass
class VAEConfig:
    image_size: int = 32
    channels: int = 1
    latent_dim: int = 32
    width: int = 32
    num_classes: int = 0
    upsample: str = "nearest"
    beta: float = 1.0
    sigma: float = 0.1            # pixel noise std of the Gaussian likelihood, in [-1, 1] units

    def __post_init__(self) -> None:
        self.decoder_config()  # validates size/channels/upsample

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def decoder_config(self) -> GANConfig:
        return GANConfig(image_size=self.image_size, channels=self.channels, latent_dim=self.latent_dim,
                         width=self.width, num_classes=self.num_classes, upsample=self.upsample)

    def to_dict(self) -> dict:
        return asdict(self)


class Encoder(nn.Module):
    """(N, C, H, W) [+ label] -> mu, logvar (N, latent)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        w, c, side = cfg.width, cfg.channels + (1 if cfg.conditional else 0), cfg.image_size
        layers: list[nn.Module] = []
        while side > 4:
            layers += [nn.Conv2d(c, w, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.LeakyReLU(0.1)]
            c, w, side = w, 2 * w, (side - 2) // 2 + 1     # conv 4/2/1 output side
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c * side * side, 2 * cfg.latent_dim)
        # label -> one extra constant input plane carrying a learned per-class value map
        self.embed = nn.Embedding(cfg.num_classes, cfg.image_size * cfg.image_size) if cfg.conditional else None
        self.cfg = cfg

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.embed is not None:
            s = self.cfg.image_size
            x = torch.cat([x, self.embed(label).view(-1, 1, s, s)], dim=1)   # (N, C+1, H, W)
        h = self.features(x).flatten(1)                                      # (N, c*4*4)
        mu, logvar = self.fc(h).chunk(2, dim=1)                              # (N, latent) each
        return mu, logvar.clamp(-12.0, 8.0)


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Generator(cfg.decoder_config())
        self.register_buffer("expost_mean", torch.zeros(cfg.latent_dim))
        self.register_buffer("expost_chol", torch.eye(cfg.latent_dim))
        self.register_buffer("expost_fitted", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None):
        mu, logvar = self.encoder(x, label)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decoder(z, label), mu, logvar

    def loss(self, x: torch.Tensor, label: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """beta-weighted negative ELBO per image (nats); also returns its recon and KL parts."""
        recon, mu, logvar = self(x, label)
        d = x[0].numel()
        nll = (F.mse_loss(recon, x, reduction="none").flatten(1).sum(1) / (2 * self.cfg.sigma ** 2)
               + d * math.log(self.cfg.sigma * math.sqrt(2 * math.pi)))          # (N,)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)             # (N,)
        loss = (nll + self.cfg.beta * kl).mean()
        return loss, {"recon": nll.mean().item(), "kl": kl.mean().item(), "neg_elbo": (nll + kl).mean().item()}

    def sample_latent(self, eps: torch.Tensor, expost: bool) -> torch.Tensor:
        """Map N(0, I) noise to latents: identity for the prior, mean + eps @ chol^T for ex-post."""
        return self.expost_mean + eps @ self.expost_chol.T if expost else eps

    @torch.no_grad()
    def fit_expost(self, images: torch.Tensor, labels: torch.Tensor | None = None, batch_size: int = 512) -> None:
        """Fit the ex-post Gaussian to encoder means of ``images`` (float, [-1, 1], N x C x H x W)."""
        was = self.training
        self.eval()
        device = self.expost_mean.device
        mus = []
        for i in range(0, len(images), batch_size):
            lab = None if labels is None else labels[i:i + batch_size].to(device)
            mus.append(self.encoder(images[i:i + batch_size].to(device), lab)[0].double())
        mu = torch.cat(mus)                                                     # (N, latent)
        mean = mu.mean(0)
        cov = torch.cov(mu.T) + 1e-5 * torch.eye(mu.shape[1], dtype=mu.dtype, device=device)
        self.expost_mean.copy_(mean.float())
        self.expost_chol.copy_(torch.linalg.cholesky(cov).float())
        self.expost_fitted.fill_(True)
        self.train(was)
