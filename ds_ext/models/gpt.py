"""``gpt_small``: a small GPT-style decoder-only transformer (Radford et al. 2018/2019), built here, no download.

Token and learned position embeddings, ``num_layers`` pre-LayerNorm blocks (causal multi-head self-attention through
``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``, then a 4x-wide GELU MLP, each with a residual),
a final LayerNorm and a decoder tied to the token embedding; weights N(0, 0.02), residual projections scaled by
1/sqrt(2 num_layers) as GPT-2 does, biases 0. Defaults (width 192, 3 layers, 4 heads, context 128, vocabulary 256 for
``pytext``'s bytes): 1,408,704 parameters, of which the 192 x 576 attention and 192 x 768 MLP matrices are where low-rank
and sparse compression act.

Shapes as ``lstm_lm`` (see that module): ``x`` ``[B, T]`` token ids (T <= ``context``) -> logits ``[B, V, T]``, so the
trainer's ``cross_entropy(model(x), y)`` is the mean per-token loss. ``data=<DataBundle>`` checks the vocabulary.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from ..registry import MODELS, Options


class Block(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, c)))
        return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, width: int, num_layers: int, heads: int, context: int, dropout: float):
        super().__init__()
        self.vocab_size, self.context = vocab_size, context
        self.tok, self.pos = nn.Embedding(vocab_size, width), nn.Embedding(context, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(num_layers))
        self.ln = nn.LayerNorm(width)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * num_layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, x):
        """``x``: ``[B, T]`` token ids -> logits ``[B, V, T]``."""
        if x.dim() != 2 or x.shape[1] > self.context:
            raise ValueError(f"gpt_small expects token ids of shape [batch, time <= {self.context}], got "
                             f"{tuple(x.shape)}")
        h = self.drop(self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device)))
        for block in self.blocks:
            h = block(h)
        return (self.ln(h) @ self.tok.weight.t()).transpose(1, 2)


class GPTOptions(Options):
    vocab_size: int = Field(256, ge=2, description="vocabulary size (256: pytext's bytes)")
    width: int = Field(192, ge=8, description="model width (embedding and residual stream)")
    num_layers: int = Field(3, ge=1, description="transformer blocks")
    heads: int = Field(4, ge=1, description="attention heads (width must divide by it)")
    context: int = Field(128, ge=1, description="longest sequence (learned positions); data.bptt must fit")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on embeddings, attention and residual branches")

    @model_validator(mode="after")
    def _check(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be a multiple of heads {self.heads}")
        return self


@MODELS.register("gpt_small", GPTOptions)
def gpt_small(options: GPTOptions, data: Optional[object] = None, **_) -> nn.Module:
    """Small GPT-style causal transformer (pre-LN, tied decoder): [B, T] ids -> [B, V, T] logits."""
    have = getattr(getattr(data, "train", None), "vocab_size", None)
    if have is not None and have != options.vocab_size:
        raise ValueError(f"gpt_small: model.vocab_size is {options.vocab_size} but the data set's vocabulary has "
                         f"{have} tokens; set model.vocab_size: {have}")
    bptt = getattr(data, "input_shape", (0,))[0] if data is not None else 0
    if bptt > options.context:
        raise ValueError(f"gpt_small: data windows of {bptt} tokens exceed model.context {options.context}; set "
                         f"model.context: {bptt} or a smaller data.bptt")
    o = options
    return GPT(o.vocab_size, o.width, o.num_layers, o.heads, o.context, o.dropout)
