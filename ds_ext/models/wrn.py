"""Wide residual networks used by the DS-Sync seed (Wang et al., "Divide-and-Shuffle Synchronization for
Distributed Machine Learning", arXiv 2007.03298; code: neurips10899/divide-and-shuffle).

``wrn26_10`` -- CIFAR-10/100, 32x32 input. Follows the seed's ``CV/cifar_code/models/wide_resnet_cifar.py``
(Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016, built the way that file builds it): a 3x3
16-channel stem, three stages of ``(depth-2)/6`` *post-activation* ResNet basic blocks (conv-BN-ReLU-conv-BN
+ shortcut, ReLU) with ``16k, 32k, 64k`` channels, a 1x1-conv + BN projection shortcut wherever the shape
changes (including the first block, 16 -> 16k), global average pooling and one linear layer. This is *not*
the pre-activation block of the WRN paper's own code; we keep the seed's variant because its accuracy
numbers (CIFAR-10 91.63%, CIFAR-100 75.78% with DS-Sync) were produced with it. The blocks are
``ds_ext.models.resnet.BasicBlock`` (same layer order). Measured parameter counts:
WRN-26-10: 36,481,434 (10 classes), 36,539,124 (100 classes).

``wide_resnet50_2`` -- ImageNet WRN-50-2 (the seed's ``CV/imagenet_code`` uses torchvision's
``wide_resnet50_2``): ResNet-50 v1.5 whose bottleneck inner width is doubled (``width_per_group=128``),
outer widths unchanged. Built from ``ds_ext.models.resnet.ResNet`` with a wide bottleneck, so module names
and parameter shapes equal torchvision's: 68,883,240 parameters for 1000 classes (measured; the test pins it).
"""
from __future__ import annotations

import torch.nn as nn
from pydantic import Field, field_validator

from ..registry import MODELS, Options
from .resnet import BasicBlock, Bottleneck, ResNet


class WideResNetCIFAR(nn.Module):
    """WRN-d-k for 32x32 inputs, layer layout of the DS-Sync seed (see module docstring)."""

    def __init__(self, depth: int = 26, widen_factor: int = 10, num_classes: int = 10,
                 zero_init_residual: bool = False):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+2 (e.g. 26, 28), got {depth}")
        n = (depth - 2) // 6
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make(16 * widen_factor, n, 1)
        self.layer2 = self._make(32 * widen_factor, n, 2)
        self.layer3 = self._make(64 * widen_factor, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # the seed's AvgPool2d(8) on the 8x8 map, size-agnostic
        self.fc = nn.Linear(64 * widen_factor, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # normal(0, sqrt(2 / (k*k*out))) as in the seed
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make(self, planes: int, n: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or self.inplanes != planes:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, down)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, n)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


class WRNCifarOptions(Options):
    depth: int = Field(26, ge=8, description="total depth 6n+2: n basic blocks per stage (26 -> 4, the DS-Sync setup)")
    widen_factor: int = Field(10, ge=1, description="channel multiplier k: stage widths 16k, 32k, 64k")
    num_classes: int = Field(10, ge=2, description="10 for CIFAR-10, 100 for CIFAR-100")
    zero_init_residual: bool = Field(False, description="start the last BN of each block at 0 (the seed does not)")

    @field_validator("depth")
    @classmethod
    def _six_n_plus_two(cls, v: int) -> int:
        if (v - 2) % 6:
            raise ValueError(f"depth must be 6n+2 (n basic blocks in each of 3 stages): 8, 14, 20, 26, ...; got {v}")
        return v


@MODELS.register("wrn26_10", WRNCifarOptions)
def wrn26_10(options: WRNCifarOptions, **_) -> nn.Module:
    """WRN-26-10 for 32x32 CIFAR inputs as in the DS-Sync seed (36,481,434 parameters for 10 classes)."""
    return WideResNetCIFAR(options.depth, options.widen_factor, options.num_classes, options.zero_init_residual)


class WideBottleneck(Bottleneck):
    """torchvision's Bottleneck with ``width_per_group=128``: inner width ``2 * planes``, output ``4 * planes``.

    Subclasses ``resnet.Bottleneck`` for its forward and so that ``ResNet(zero_init_residual=True)`` finds it.
    """

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        nn.Module.__init__(self)
        width = planes * 2
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample


class WRN50Options(Options):
    num_classes: int = Field(1000, ge=2, description="1000 for ImageNet-1k")
    zero_init_residual: bool = Field(False, description="start the last BN of each block at 0 "
                                                        "(torchvision's default is off)")


@MODELS.register("wide_resnet50_2", WRN50Options)
def wide_resnet50_2(options: WRN50Options, **_) -> nn.Module:
    """WRN-50-2 with torchvision's layout and parameter shapes (68,883,240 parameters at 1000 classes)."""
    return ResNet(WideBottleneck, [3, 4, 6, 3], options.num_classes, small_input=False,
                  zero_init_residual=options.zero_init_residual)
