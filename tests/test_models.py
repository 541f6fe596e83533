"""Model shapes for every size / channel / conditional combination, and the edge-friendly layout."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn

from edgegen.training.models import VAE, Discriminator, GANConfig, Generator, VAEConfig
from edgegen.training.models.gan import activation, recompute_bn_stats


@pytest.mark.parametrize("size,channels,classes,upsample",
                         list(itertools.product([28, 32, 64], [1, 3], [0, 10], ["nearest", "pixelshuffle"])))
def test_shapes(size, channels, classes, upsample):
    torch.manual_seed(0)
    cfg = GANConfig(image_size=size, channels=channels, num_classes=classes, upsample=upsample, width=8, d_width=8)
    g, d = Generator(cfg), Discriminator(cfg)
    z = torch.randn(3, cfg.latent_dim)
    y = torch.tensor([0, 1, 9]) if classes else None
    x = g(z, y)
    assert x.shape == (3, channels, size, size)
    assert x.abs().max() <= 1.0
    assert d(x, y).shape == (3,)
    vae = VAE(VAEConfig(image_size=size, channels=channels, num_classes=classes, upsample=upsample, width=8))
    recon, mu, logvar = vae(x, y)
    assert recon.shape == x.shape and mu.shape == (3, 32) and logvar.shape == (3, 32)


def test_generator_is_int8_friendly():
    """No ConvTranspose; every conv without bias is directly followed by BatchNorm (foldable)."""
    g = Generator(GANConfig())
    mods = list(g.modules())
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in mods)
    convs = [m for m in mods if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4
    for block in g.blocks:
        assert block.conv.bias is None and isinstance(block.bn, nn.BatchNorm2d)


def test_capped_activations():
    """act_clip caps the generator's ReLUs; 0 leaves them plain."""
    x = torch.linspace(-2, 2, 9)
    assert torch.equal(activation(x, 0.0), x.relu())
    assert torch.equal(activation(x, 0.5), x.relu().clamp(max=0.5))
    torch.manual_seed(0)
    plain = Generator(GANConfig(width=8, latent_dim=16)).eval()
    capped = Generator(GANConfig(width=8, latent_dim=16, act_clip=0.5)).eval()
    capped.load_state_dict(plain.state_dict())                     # same weights, only the cap differs
    z = torch.randn(8, 16) * 3
    assert not torch.equal(plain(z), capped(z))
    with pytest.raises(ValueError, match="act_clip"):
        GANConfig(act_clip=-1.0)


def test_conditional_generator_needs_labels():
    g = Generator(GANConfig(num_classes=10))
    with pytest.raises(ValueError, match="needs labels"):
        g(torch.randn(2, 64))


def test_bad_config():
    with pytest.raises(ValueError, match="image_size"):
        GANConfig(image_size=48)
    with pytest.raises(ValueError, match="channels"):
        VAEConfig(channels=2)


def test_bn_recompute_matches_eval_statistics():
    """After recomputing, eval-mode BN sees the batch statistics of fresh prior samples."""
    torch.manual_seed(0)
    g = Generator(GANConfig(width=8))
    recompute_bn_stats(g, batches=8, batch_size=256, seed=3)
    g.eval()
    with torch.no_grad():
        h = g.fc(torch.randn(2048, 64))
    # Both sides are estimates from independent samples: compare on average over the 1024 features.
    assert (g.bn0.running_mean - h.mean(0)).abs().mean() < 0.02
    assert ((g.bn0.running_var / h.var(0)) - 1).abs().mean() < 0.05
    assert (h.var(0) - 1).abs().mean() > 0.3  # the reset default (var 1) would fail the check above


def test_expost_fit_matches_encoder_moments():
    torch.manual_seed(0)
    vae = VAE(VAEConfig(width=8, latent_dim=4))
    x = torch.rand(300, 1, 32, 32) * 2 - 1
    vae.fit_expost(x)
    vae.eval()  # fit_expost encodes in eval mode (BN running stats)
    with torch.no_grad():
        mu = vae.encoder(x)[0]
    cov = vae.expost_chol @ vae.expost_chol.T
    assert bool(vae.expost_fitted)
    assert torch.allclose(vae.expost_mean, mu.mean(0), atol=1e-5)
    assert torch.allclose(cov, torch.cov(mu.T), atol=1e-4)
