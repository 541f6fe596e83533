"""Torch modules that are exactly what goes into the ONNX graph: BN folded, pixels computed in-graph.

Export never traces the training modules directly. It deep-copies them, folds every BatchNorm
into the preceding Conv/Linear (so the graph holds no BatchNormalization node whatever the
exporter's optimiser does), folds the VAE's ex-post Gaussian into the first Linear layer, and
wraps the result so the graph's I/O is the contract of :mod:`edgegen.modelmeta`:

    generator  z float32 (N, L) [+ label int64 (N,)]  ->  image uint8 (N, H, W, C)
    encoder    image uint8 (N, H, W, C) [+ label]    ->  mean, logvar float32 (N, L)

Pixels are ``clip(round((x + 1) * 127.5), 0, 255)`` of the generator's tanh output ``x``; ONNX
``Round`` and ``torch.round`` both round half to even, so the two agree wherever the float
inputs agree.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from edgegen.training.models.gan import Generator
from edgegen.training.models.vae import VAE, Encoder


def fold_generator(gen: Generator, expost: tuple[torch.Tensor, torch.Tensor] | None = None) -> Generator:
    """A copy of ``gen`` in eval mode with BN folded into fc/conv and, optionally, an affine latent map.

    ``expost = (mean (L,), chol (L, L))`` folds ``z -> mean + z @ chol.T`` into the z-columns of
    ``fc``: ``W_z (m + C z) = (W_z C) z + W_z m``, computed in float64. The copy's ``forward``
    is the original one with the BatchNorms replaced by ``Identity``.
    """
    g = copy.deepcopy(gen).eval()
    with torch.no_grad():
        if expost is not None:
            mean, chol = (t.detach().double() for t in expost)
            lat = mean.shape[0]
            w = g.fc.weight.detach().double()                    # (out, L [+ L for the label embedding])
            w_z = w[:, :lat]                                      # (out, L) acts on z
            bias = w_z @ mean                                     # (out,)
            if g.fc.bias is not None:
                bias = bias + g.fc.bias.detach().double()
            new_w = w.clone()
            new_w[:, :lat] = w_z @ chol                           # (out, L)
            fc = nn.Linear(g.fc.in_features, g.fc.out_features, bias=True)
            fc.weight.copy_(new_w.float())
            fc.bias.copy_(bias.float())
            g.fc = fc.eval()
        g.fc = fuse_linear_bn_eval(g.fc, g.bn0)                   # Linear + BatchNorm1d -> Linear
        g.bn0 = nn.Identity()
        for block in g.blocks:
            block.conv = fuse_conv_bn_eval(block.conv, block.bn)  # Conv3x3 + BatchNorm2d -> Conv3x3
            block.bn = nn.Identity()
    return g.eval()


def fold_encoder(enc: Encoder) -> Encoder:
    """A copy of the VAE encoder with every Conv -> BatchNorm2d pair folded into the Conv."""
    e = copy.deepcopy(enc).eval()
    layers = list(e.features)
    out: list[nn.Module] = []
    i = 0
    with torch.no_grad():
        while i < len(layers):
            if (isinstance(layers[i], nn.Conv2d) and i + 1 < len(layers)
                    and isinstance(layers[i + 1], nn.BatchNorm2d)):
                out.append(fuse_conv_bn_eval(layers[i], layers[i + 1]))
                i += 2
            else:
                out.append(layers[i])
                i += 1
    e.features = nn.Sequential(*out)
    return e.eval()


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) float in [-1, 1] -> (N, H, W, C) uint8 in 0..255 (round half to even, clipped)."""
    return torch.clamp(torch.round((x + 1.0) * 127.5), 0.0, 255.0).to(torch.uint8).permute(0, 2, 3, 1)


class PixelGenerator(nn.Module):
    """The exported generator graph: z [+ label] -> uint8 NHWC pixels of a folded :class:`Generator`."""

    def __init__(self, folded: Generator):
        super().__init__()
        self.g = folded
        self.conditional = folded.cfg.conditional

    def forward(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        return to_pixels(self.g(z, label))                       # (N, H, W, C) uint8


class PixelEncoder(nn.Module):
    """The exported encoder graph: uint8 NHWC pixels [+ label] -> (mean, logvar) of a folded encoder."""

    def __init__(self, folded: Encoder):
        super().__init__()
        self.e = folded

    def forward(self, image: torch.Tensor, label: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = image.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0   # (N, C, H, W) in [-1, 1]
        return self.e(x, label)


def reference_images(model: Generator | VAE, z: torch.Tensor, label: torch.Tensor | None,
                     expost: bool) -> torch.Tensor:
    """The unfolded PyTorch model's eval output (N, C, H, W) in [-1, 1]: the parity reference."""
    with torch.no_grad():
        if isinstance(model, VAE):
            return model.decoder.eval()(model.sample_latent(z, expost), label)
        return model.eval()(z, label)
