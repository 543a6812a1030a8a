"""Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021), as trained by the
QSR seed (Gu et al., "A Quadratic Synchronization Rule for Distributed Deep Learning", ICLR 2024; ViT-B with
Local AdamW + QSR on ImageNet, code hmgxr128/QSR).

Written out with torchvision's ``vit_b_16`` module layout, parameter shapes and initialisation (conv patch
embedding, learned class token and position embedding, pre-LN encoder blocks with ``nn.MultiheadAttention``
and a GELU MLP, LayerNorm eps 1e-6, zero-initialised head), so gradient sizes equal the paper's model and a
torchvision state dict loads into it. Measured parameter counts: ``vit_b16`` 86,567,656 at 1000 classes (=
torchvision ``vit_b_16``, and timm ``vit_base_patch16_224``); ``vit_tiny`` defaults 81,226 (10 classes).

``vit_tiny`` is the same constructor with small defaults (32x32 input, patch 8, depth 2, width 64) for
tests and CPU smoke runs; every dimension is an option of both entries.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from ..registry import MODELS, Options


class MLPBlock(nn.Sequential):
    def __init__(self, width: int, mlp_dim: int, dropout: float):
        super().__init__(nn.Linear(width, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, width),
                         nn.Dropout(dropout))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x + Drop(MHA(LN(x))), then + MLP(LN(.))."""

    def __init__(self, heads: int, width: int, mlp_dim: int, dropout: float, attention_dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(width, heads, dropout=attention_dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = MLPBlock(width, mlp_dim, dropout)

    def forward(self, inp):
        x = self.ln_1(inp)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x) + inp
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, seq_len: int, depth: int, heads: int, width: int, mlp_dim: int, dropout: float,
                 attention_dropout: float):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_len, width).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(heads, width, mlp_dim, dropout, attention_dropout))
            for i in range(depth)))
        self.ln = nn.LayerNorm(width, eps=1e-6)

    def forward(self, x):
        return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


class VisionTransformer(nn.Module):
    """Input ``[B, 3, image_size, image_size]`` floats; output ``[B, num_classes]`` logits."""

    def __init__(self, image_size: int, patch_size: int, depth: int, width: int, heads: int, mlp_dim: int,
                 num_classes: int, dropout: float = 0.0, attention_dropout: float = 0.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.image_size, self.patch_size, self.width = image_size, patch_size, width
        self.conv_proj = nn.Conv2d(3, width, patch_size, patch_size)
        seq_len = (image_size // patch_size) ** 2 + 1
        self.class_token = nn.Parameter(torch.zeros(1, 1, width))
        self.encoder = Encoder(seq_len, depth, heads, width, mlp_dim, dropout, attention_dropout)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(width, num_classes)))
        fan_in = 3 * patch_size * patch_size
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)
        nn.init.zeros_(self.heads.head.weight)
        nn.init.zeros_(self.heads.head.bias)

    def forward(self, x):
        b, _, h, w = x.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(f"ViT built for {self.image_size}x{self.image_size} inputs, got {h}x{w}")
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # [B, patches, width]
        x = torch.cat([self.class_token.expand(b, -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 0])


class ViTOptions(Options):
    """Defaults: ViT-B/16 at 224x224 (QSR's ImageNet setup)."""

    image_size: int = Field(224, ge=1, description="input height = width in pixels")
    patch_size: int = Field(16, ge=1, description="side of the square patches; image_size must be a multiple")
    depth: int = Field(12, ge=1, description="number of encoder blocks")
    width: int = Field(768, ge=1, description="hidden size (token embedding dimension)")
    heads: int = Field(12, ge=1, description="attention heads; must divide width")
    mlp_dim: int = Field(3072, ge=1, description="hidden size of each block's MLP")
    num_classes: int = Field(1000, ge=2, description="classes of the linear head")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on embeddings, attention output and MLP")
    attention_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on attention weights")

    @model_validator(mode="after")
    def _check(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")
        return self


class ViTTinyOptions(ViTOptions):
    """Small defaults for tests and CPU smoke runs (32x32 input, e.g. CIFAR)."""

    image_size: int = Field(32, ge=1, description="input height = width in pixels")
    patch_size: int = Field(8, ge=1, description="side of the square patches; image_size must be a multiple")
    depth: int = Field(2, ge=1, description="number of encoder blocks")
    width: int = Field(64, ge=1, description="hidden size (token embedding dimension)")
    heads: int = Field(4, ge=1, description="attention heads; must divide width")
    mlp_dim: int = Field(128, ge=1, description="hidden size of each block's MLP")
    num_classes: int = Field(10, ge=2, description="classes of the linear head")


def _build(options: ViTOptions) -> VisionTransformer:
    o = options
    return VisionTransformer(o.image_size, o.patch_size, o.depth, o.width, o.heads, o.mlp_dim, o.num_classes,
                             o.dropout, o.attention_dropout)


@MODELS.register("vit_b16", ViTOptions)
def vit_b16(options: ViTOptions, **_) -> nn.Module:
    """ViT-B/16 with torchvision's layout (86,567,656 parameters at 224x224, 1000 classes)."""
    return _build(options)


@MODELS.register("vit_tiny", ViTTinyOptions)
def vit_tiny(options: ViTTinyOptions, **_) -> nn.Module:
    """Small ViT (same code as vit_b16) for tests: 32x32 input, patch 8, depth 2, width 64."""
    return _build(options)
