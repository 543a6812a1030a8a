"""Small models for the embedded default and tests."""
from __future__ import annotations

from typing import List

import torch.nn as nn
from pydantic import Field

from ..registry import MODELS, Options


class DigitsCNNOptions(Options):
    width: int = Field(16, ge=1, description="channels of the first conv layer")
    hidden: int = Field(64, ge=1)
    num_classes: int = Field(10, ge=2)
    dropout: float = Field(0.0, ge=0, lt=1)


@MODELS.register("digits_cnn", DigitsCNNOptions)
def digits_cnn(options: DigitsCNNOptions, **_) -> nn.Module:
    """Two 3x3 conv layers + max-pool + two linear layers for 1x8x8 inputs (scikit-learn digits)."""
    w = options.width
    return nn.Sequential(
        nn.Conv2d(1, w, 3, padding=1), nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(2 * w * 16, options.hidden), nn.ReLU(),
        nn.Dropout(options.dropout),
        nn.Linear(options.hidden, options.num_classes),
    )


class MLPOptions(Options):
    in_features: int = Field(64, ge=1)
    hidden: List[int] = Field(default_factory=lambda: [64])
    num_classes: int = Field(10, ge=2)


@MODELS.register("mlp", MLPOptions)
def mlp(options: MLPOptions, **_) -> nn.Module:
    """Fully connected ReLU network on flattened inputs."""
    layers: list = [nn.Flatten()]
    d = options.in_features
    for h in options.hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    layers.append(nn.Linear(d, options.num_classes))
    return nn.Sequential(*layers)
