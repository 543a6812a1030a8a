"""Recommendation models of the seeds: NeuMF (ExDyna's NCF / MovieLens-20M benchmark) and DeepFM (DS-Sync's
Criteo benchmark).

Both are click/no-click models trained with a binary log-loss in their references (``BCEWithLogitsLoss`` in
ExDyna's NCF, ``BCELoss`` on a sigmoid in DS-Sync's DeepFM). The trainer applies
``cross_entropy(model(x), y)`` with ``y`` in {0, 1}, so both models return two logits ``[0, z]`` per
example: ``softmax([0, z])[1] = sigmoid(z)``, hence the cross-entropy equals the reference's binary
log-loss on the logit ``z`` exactly (same value, same gradient), and ``argmax`` predicts a click iff
``z > 0``. ``binary_logit(out)`` recovers ``z`` for AUC / ranking metrics.

Sizes that depend on the data (users, items, per-field vocabularies) are options. Their defaults are the
full data sets' values where those are fixed (MovieLens-20M: 138,493 users, 26,744 items); Criteo's
per-field sizes depend on the frequency threshold, so ``deepfm`` takes them from the options or, when the
caller passes the bundle (``MODELS.build(name, options, data=bundle)``), from ``bundle.train.field_dims``.
Given both, a mismatch is refused when the model is built.
"""
from __future__ import annotations

from typing import Annotated, List, Optional

import torch
import torch.nn as nn
from pydantic import Field, field_validator

from ..registry import MODELS, Options


def two_class_logits(z: torch.Tensor) -> torch.Tensor:
    """``[B]`` binary logits -> ``[B, 2]`` logits ``[0, z]`` (cross-entropy on them == BCE-with-logits on z)."""
    return torch.stack([torch.zeros_like(z), z], dim=1)


def binary_logit(out: torch.Tensor) -> torch.Tensor:
    """Inverse of ``two_class_logits``: the click logit ``z`` of a ``[B, 2]`` output."""
    return out[:, 1] - out[:, 0]


# ---- NeuMF -------------------------------------------------------------------------------------

class NeuMF(nn.Module):
    """Neural matrix factorisation (He et al., "Neural Collaborative Filtering", WWW 2017) as in the ExDyna
    seed's ``ncf/neumf.py`` (the MLPerf/NVIDIA NCF model): a GMF tower (element-wise product of
    ``factors``-dim user and item embeddings) and an MLP tower (concatenated ``layers[0]/2``-dim user and
    item embeddings through ReLU layers ``layers[1:]`` with dropout), concatenated into one linear output.
    Init as the reference: embeddings N(0, 0.01), MLP Glorot-uniform, output LeCun-uniform, biases 0
    (PyTorch's default bias init in the reference; see note in ``__init__``).

    Input ``x``: ``[B, 2]`` int64 (user index, item index). Output ``[B, 2]`` logits ``[0, z]``.
    """

    def __init__(self, num_users: int, num_items: int, factors: int, layers: List[int], dropout: float):
        super().__init__()
        self.num_users, self.num_items = num_users, num_items
        self.mf_user_embed = nn.Embedding(num_users, factors)
        self.mf_item_embed = nn.Embedding(num_items, factors)
        self.mlp_user_embed = nn.Embedding(num_users, layers[0] // 2)
        self.mlp_item_embed = nn.Embedding(num_items, layers[0] // 2)
        self.mlp = nn.ModuleList(nn.Linear(a, b) for a, b in zip(layers[:-1], layers[1:]))
        self.dropout = nn.Dropout(dropout)
        self.final = nn.Linear(layers[-1] + factors, 1)
        for emb in (self.mf_user_embed, self.mf_item_embed, self.mlp_user_embed, self.mlp_item_embed):
            nn.init.normal_(emb.weight, 0.0, 0.01)
        for lin in self.mlp:
            nn.init.xavier_uniform_(lin.weight)  # Glorot uniform: sqrt(6 / (fan_in + fan_out))
        bound = (3.0 / self.final.in_features) ** 0.5  # LeCun uniform
        nn.init.uniform_(self.final.weight, -bound, bound)
        # biases keep nn.Linear's default init, as in the reference (it only re-initialises weights)

    def forward(self, x):
        if x.dim() != 2 or x.shape[1] != 2:
            raise ValueError(f"ncf expects [batch, 2] (user, item) index pairs, got {tuple(x.shape)}")
        user, item = x[:, 0], x[:, 1]
        gmf = self.mf_user_embed(user) * self.mf_item_embed(item)
        h = torch.cat([self.mlp_user_embed(user), self.mlp_item_embed(item)], dim=1)
        for lin in self.mlp:
            h = self.dropout(torch.relu(lin(h)))
        return two_class_logits(self.final(torch.cat([gmf, h], dim=1)).squeeze(1))


class NCFOptions(Options):
    num_users: int = Field(138493, ge=1, description="user embeddings (MovieLens-20M: 138,493)")
    num_items: int = Field(26744, ge=1, description="item embeddings (MovieLens-20M rated movies: 26,744)")
    factors: int = Field(64, ge=1, description="GMF embedding size (ExDyna ncf.py --factors 64)")
    layers: List[int] = Field(default_factory=lambda: [256, 256, 128, 64],
                              description="MLP tower sizes; layers[0] = concatenated user+item embedding size")
    dropout: float = Field(0.5, ge=0, lt=1, description="dropout after each MLP layer (ExDyna ncf.py: 0.5)")

    @field_validator("layers")
    @classmethod
    def _even_first(cls, v):
        if not v or v[0] % 2 or any(d < 1 for d in v):
            raise ValueError("layers must be a non-empty list of positive sizes whose first entry is even "
                             "(it is split between the user and the item embedding)")
        return v


@MODELS.register("ncf", NCFOptions)
def ncf(options: NCFOptions, data: Optional[object] = None, **_) -> nn.Module:
    """NeuMF (GMF + MLP towers) for MovieLens-20M as in ExDyna's NCF benchmark: [B,2] ids -> [B,2] logits."""
    train = getattr(data, "train", None)
    for what in ("num_users", "num_items"):
        have = getattr(train, what, None)
        if have is not None and have != getattr(options, what):
            raise ValueError(f"ncf: model.{what} is {getattr(options, what)} but the data set has {have}; "
                             f"set model.{what}: {have}")
    o = options
    return NeuMF(o.num_users, o.num_items, o.factors, o.layers, o.dropout)


# ---- DeepFM ------------------------------------------------------------------------------------

class DeepFM(nn.Module):
    """DeepFM (Guo et al., "DeepFM: A Factorization-Machine based Neural Network for CTR Prediction",
    IJCAI 2017) as in the DS-Sync seed's ``RecSys/code/dfm.py`` (the pytorch-fm model): every field is
    categorical (Criteo's 13 integer fields arrive discretised, see ``ds_ext.data.criteo``); one shared
    embedding table with per-field offsets feeds (1) a first-order term (1-dim embeddings + bias),
    (2) the FM second-order term ``0.5 * sum((sum_f e_f)^2 - sum_f e_f^2)`` and (3) an MLP of
    Linear-BatchNorm-ReLU-Dropout layers on the concatenated embeddings; the three logits are summed.
    Init as the reference: second-order embeddings Xavier-uniform, the rest PyTorch defaults.

    Input ``x``: ``[B, F]`` int64 per-field indices (``0 <= x[:, f] < field_dims[f]``).
    Output ``[B, 2]`` logits ``[0, z]``.
    """

    def __init__(self, field_dims: List[int], embed_dim: int, mlp_dims: List[int], dropout: float):
        super().__init__()
        self.field_dims = list(field_dims)
        total = int(sum(field_dims))
        offsets = torch.tensor([0] + list(field_dims[:-1]), dtype=torch.long).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        self.linear = nn.Embedding(total, 1)
        self.bias = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Embedding(total, embed_dim)
        nn.init.xavier_uniform_(self.embedding.weight)
        layers: list = []
        d = len(field_dims) * embed_dim
        for h in mlp_dims:
            layers += [nn.Linear(d, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Dropout(dropout)]
            d = h
        layers.append(nn.Linear(d, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x):
        if x.dim() != 2 or x.shape[1] != len(self.field_dims):
            raise ValueError(f"deepfm built for {len(self.field_dims)} fields expects [batch, "
                             f"{len(self.field_dims)}] indices, got {tuple(x.shape)}")
        idx = x + self.offsets
        emb = self.embedding(idx)  # [B, F, E]
        first = self.linear(idx).sum(dim=(1, 2)) + self.bias
        fm = 0.5 * (emb.sum(1).pow(2) - emb.pow(2).sum(1)).sum(1)
        deep = self.mlp(emb.flatten(1)).squeeze(1)
        return two_class_logits(first + fm + deep)


class DeepFMOptions(Options):
    field_dims: Optional[List[int]] = Field(
        None, description="vocabulary size of each field (39 for Criteo); null = take them from the data set "
                          "(bundle.train.field_dims, printed by the criteo reader) when the trainer passes it")
    embed_dim: int = Field(10, ge=1, description="embedding size per field (DS-Sync deepfm.py: 10)")
    mlp_dims: List[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [400, 400, 400],
                                description="hidden sizes of the deep part (DS-Sync: 400, 400, 400)")
    dropout: float = Field(0.5, ge=0, lt=1, description="dropout after each MLP layer (DS-Sync: 0.5)")

    @field_validator("field_dims")
    @classmethod
    def _positive(cls, v):
        if v is not None and (not v or any(d < 1 for d in v)):
            raise ValueError("field_dims must be a non-empty list of positive vocabulary sizes")
        return v


@MODELS.register("deepfm", DeepFMOptions)
def deepfm(options: DeepFMOptions, data: Optional[object] = None, **_) -> nn.Module:
    """DeepFM for Criteo as in DS-Sync's RecSys code: [B, 39] field indices -> [B, 2] logits."""
    have = getattr(getattr(data, "train", None), "field_dims", None)
    dims = options.field_dims
    if dims is None:
        if have is None:
            raise ValueError("deepfm: model.field_dims is not set and no data set was given to take it from; set "
                             "model.field_dims to the list the criteo reader prints (one size per field)")
        dims = list(have)
    elif have is not None and list(have) != list(dims):
        raise ValueError(f"deepfm: model.field_dims {list(dims)} differ from the data set's {list(have)}; "
                         "remove model.field_dims or set it to the data set's list")
    return DeepFM(dims, options.embed_dim, options.mlp_dims, options.dropout)
