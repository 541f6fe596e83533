"""Model definitions, each beside its typed config: GAN, VAE and the evaluation classifier."""

from edgegen.training.models.classifier import Classifier, ClassifierConfig
from edgegen.training.models.gan import Discriminator, GANConfig, Generator
from edgegen.training.models.vae import VAE, VAEConfig

__all__ = ["Classifier", "ClassifierConfig", "Discriminator", "GANConfig", "Generator", "VAE", "VAEConfig"]
