"""Small models for the embedded default and tests."""
from __future__ import annotations

from typing import Annotated, List, Optional

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
    hidden: List[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [64])
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


class LeNetOptions(Options):
    in_channels: int = Field(3, ge=1, description="3 for CIFAR-10")
    image_size: int = Field(32, ge=8, description="input height = width (CIFAR-10: 32)")
    num_classes: int = Field(10, ge=2)


@MODELS.register("lenet", LeNetOptions)
def lenet(options: LeNetOptions, **_) -> nn.Module:
    """LeNet-5 as used for CIFAR-10 in D-GraB's ``main-lenet-cifar10.py`` (LeCun et al. 1998, with ReLU
    and max-pooling): conv 5x5 (6) - pool - conv 5x5 (16) - pool - 120 - 84 - classes; 62,006
    parameters for 3x32x32 inputs and 10 classes."""
    s = ((options.image_size - 4) // 2 - 4) // 2
    return nn.Sequential(
        nn.Conv2d(options.in_channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * s * s, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, options.num_classes),
    )


class LinearOptions(Options):
    in_features: Optional[int] = Field(None, ge=1, description="input size; default: from the data set")
    num_classes: Optional[int] = Field(None, ge=2, description="default: from the data set")


@MODELS.register("linear", LinearOptions)
def linear(options: LinearOptions, data=None, **_) -> nn.Module:
    """Logistic regression (one linear layer + the trainer's softmax cross-entropy): D-GraB's GLUE head
    on frozen BERT-base pooled embeddings. Sizes default to the data set's."""
    import math

    d = options.in_features or (math.prod(data.input_shape) if data is not None else None)
    c = options.num_classes or (data.num_classes if data is not None else None)
    if d is None or c is None:
        raise ValueError("model 'linear' needs in_features and num_classes (or a data set that provides them)")
    if data is not None and math.prod(data.input_shape) != d:
        raise ValueError(f"model 'linear': in_features={d} but the data set's inputs have "
                         f"{math.prod(data.input_shape)} features")
    return nn.Sequential(nn.Flatten(), nn.Linear(d, c))
