"""VGG for 32x32 CIFAR inputs (Simonyan & Zisserman, ICLR 2015) as in the ExDyna seed (Yoon & Oh, CCGrid
2024; kljp/exdyna ``cnn-lstm/tasks/cifar_architectures/vgg.py``, task ``vgg19`` -> ``vgg19_bn``).

Layout of that file: the VGG conv configuration (A/B/D/E = 11/13/16/19 weight layers) of 3x3 convs (with
bias) + optional BatchNorm + ReLU and five 2x2 max-pools, leaving a 512x1x1 map; classifier
Dropout-Linear(512,512)-ReLU-Dropout-Linear(512,512)-ReLU-Linear(512,classes). Conv weights
N(0, sqrt(2/(k*k*out))), conv biases 0, linear layers PyTorch defaults. Measured parameter counts
(10 classes): vgg_cifar depth 19 + BN (default) 20,565,834; depth 16 + BN 15,253,578.

ExDyna's other CIFAR networks: ResNet-18 / ResNet-152 for CIFAR are ``resnet18`` / ``resnet152`` with
``small_input: true`` (3x3 stem, no max-pool; ResNet-18 at 10 classes has 11,173,962 parameters, the number
in ExDyna's ``run.sh``). SENet-18, GoogLeNet and Inception-v4 are not provided.
"""
from __future__ import annotations

from typing import Literal

import torch.nn as nn
from pydantic import Field

from ..registry import MODELS, Options

_CFG = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGGCifar(nn.Module):
    def __init__(self, depth: int = 19, batch_norm: bool = True, num_classes: int = 10, dropout: float = 0.5):
        super().__init__()
        layers: list = []
        c = 3
        for v in _CFG[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(nn.Conv2d(c, v, 3, padding=1))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(v))
                layers.append(nn.ReLU(inplace=True))
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(512, 512), nn.ReLU(True),
            nn.Dropout(dropout), nn.Linear(512, 512), nn.ReLU(True),
            nn.Linear(512, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x):
        if x.shape[-2:] != (32, 32):
            raise ValueError(f"vgg_cifar expects 32x32 inputs, got {tuple(x.shape[-2:])}")
        return self.classifier(self.features(x).flatten(1))


class VGGCifarOptions(Options):
    depth: Literal[11, 13, 16, 19] = Field(19, description="weight layers: 11/13/16/19 (ExDyna: 19)")
    batch_norm: bool = Field(True, description="BatchNorm after each conv (ExDyna's vgg19_bn: true)")
    num_classes: int = Field(10, ge=2, description="10 for CIFAR-10, 100 for CIFAR-100")
    dropout: float = Field(0.5, ge=0, lt=1, description="dropout before the two hidden linear layers")


@MODELS.register("vgg_cifar", VGGCifarOptions)
def vgg_cifar(options: VGGCifarOptions, **_) -> nn.Module:
    """VGG-11/13/16/19 (BN optional) for 32x32 CIFAR as in ExDyna's cifar_architectures (default VGG-19-BN)."""
    return VGGCifar(options.depth, options.batch_norm, options.num_classes, options.dropout)
