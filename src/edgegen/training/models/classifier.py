"""Small CNN classifier whose penultimate features define the evaluation space (FCD, KID, P/R).

Inception cannot be downloaded here, so edgegen ships a ~100 K-parameter Fashion-MNIST
classifier and measures generators in its 128-d feature space. Input: (N, C, 32, 32) in [-1, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ClassifierConfig:
    num_classes: int = 10
    channels: int = 1
    image_size: int = 32
    width: int = 32
    feature_dim: int = 128

    def to_dict(self) -> dict:
        return asdict(self)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Classifier(nn.Module):
    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.body = nn.Sequential(_block(cfg.channels, w), nn.MaxPool2d(2),      # 32 -> 16
                                  _block(w, 2 * w), nn.MaxPool2d(2),            # 16 -> 8
                                  _block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1))  # 8 -> 1
        self.proj = nn.Linear(4 * w, cfg.feature_dim)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, 32, 32) -> (N, feature_dim) post-ReLU penultimate features."""
        return F.relu(self.proj(self.body(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))
