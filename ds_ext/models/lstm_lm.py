"""Word-level LSTM language model for WikiText-2 (Zaremba et al. 2014; the PyTorch ``word_language_model``
example that both seeds build on).

Defaults follow the ExDyna seed (Yoon & Oh, CCGrid 2024, code kljp/exdyna,
``cnn-lstm/tasks/language_modeling``: ``define_model``): embedding 650, **3** LSTM layers of 650, dropout 0.4
on the embedding and LSTM outputs (and between LSTM layers), decoder weight **tied** to the embedding
(Press & Wolf 2016; Inan et al. 2016), embedding/decoder initialised U(-0.1, 0.1), decoder bias 0. The seed's
``run.sh`` lists 28,949,319 parameters for this LSTM; that is exactly this model with a 28,869-word
vocabulary (its torchtext vocabulary: spaCy tokens, lower-cased), measured here and pinned by the test.
With the whitespace vocabulary of ``ds_ext.data.wikitext`` (33,278 words, the PyTorch example's published
count for WikiText-2) it is 31,819,578.
The D-GraB seed's WikiText-2 LSTM (GarlGuo/D-GraB ``d_model.LSTMModel``) is the option set
``{num_layers: 2, emb_dim: 32, hidden_dim: 32, dropout: 0.2, tie_weights: false}``.

Shapes (how it fits the trainer's ``cross_entropy(model(x), y)``): a data set example is a window of
``T = bptt`` token ids ``x`` and the same window shifted by one token ``y`` (both ``[T]`` int64; see
``ds_ext.data.wikitext``), so the default collate gives ``x, y`` of shape ``[B, T]``. The model returns
logits ``[B, V, T]`` (class dimension second), which ``F.cross_entropy`` accepts together with targets
``[B, T]``: the loss is the mean over all ``B*T`` tokens, i.e. the usual per-token LM loss (perplexity =
exp(loss)), with no reshaping in the trainer. ``out.argmax(1) == y`` is then per-token accuracy.

Deliberate deviation from the references: they batchify the corpus into B parallel streams and carry the
(detached) hidden state from one BPTT window to the next. Here every window starts from a zero state,
because the trainer's data orders (random reshuffling, D-GraB) visit windows in arbitrary order, as D-GraB's
own LM script does with its reordered bptt chunks.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn
from pydantic import Field, model_validator

from ..registry import MODELS, Options


class LSTMLanguageModel(nn.Module):
    def __init__(self, vocab_size: int, emb_dim: int, hidden_dim: int, num_layers: int, dropout: float,
                 tie_weights: bool):
        super().__init__()
        if tie_weights and emb_dim != hidden_dim:
            raise ValueError(f"tie_weights needs emb_dim == hidden_dim, got {emb_dim} and {hidden_dim}")
        self.vocab_size = vocab_size
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab_size, emb_dim)
        self.rnn = nn.LSTM(emb_dim, hidden_dim, num_layers, dropout=dropout if num_layers > 1 else 0.0,
                           batch_first=True)
        self.decoder = nn.Linear(hidden_dim, vocab_size)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if tie_weights:
            self.decoder.weight = self.encoder.weight
        else:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, x):
        """``x``: ``[B, T]`` token ids -> logits ``[B, V, T]`` (zero initial state)."""
        if x.dim() != 2:
            raise ValueError(f"lstm_lm expects token ids of shape [batch, time], got {tuple(x.shape)}")
        out, _ = self.rnn(self.drop(self.encoder(x)))
        return self.decoder(self.drop(out)).transpose(1, 2)


class LSTMOptions(Options):
    vocab_size: int = Field(33278, ge=2, description="vocabulary size; 33278 = WikiText-2 train vocabulary of "
                                                     "ds_ext.data.wikitext (whitespace tokens + <eos>)")
    emb_dim: int = Field(650, ge=1, description="embedding size (ExDyna: 650; D-GraB: 32)")
    hidden_dim: int = Field(650, ge=1, description="LSTM hidden size (ExDyna: 650; D-GraB: 32)")
    num_layers: int = Field(3, ge=1, description="stacked LSTM layers (ExDyna: 3; D-GraB: 2)")
    dropout: float = Field(0.4, ge=0, lt=1, description="dropout on embeddings, between and after LSTM layers "
                                                        "(ExDyna: 0.4; D-GraB: 0.2)")
    tie_weights: bool = Field(True, description="share embedding and decoder weights (ExDyna: true; D-GraB: false)")

    @model_validator(mode="after")
    def _check(self):
        if self.tie_weights and self.emb_dim != self.hidden_dim:
            raise ValueError(f"tie_weights: true needs emb_dim == hidden_dim (got {self.emb_dim} and "
                             f"{self.hidden_dim}); set tie_weights: false or equal sizes")
        return self


@MODELS.register("lstm_lm", LSTMOptions)
def lstm_lm(options: LSTMOptions, data: Optional[object] = None, **_) -> nn.Module:
    """LSTM language model (ExDyna's WikiText-2 setup by default): [B, T] ids -> [B, V, T] logits."""
    _check_vocab(options.vocab_size, data)
    o = options
    return LSTMLanguageModel(o.vocab_size, o.emb_dim, o.hidden_dim, o.num_layers, o.dropout, o.tie_weights)


def _check_vocab(vocab_size: int, data) -> None:
    """When the caller passes the DataBundle (``MODELS.build(..., data=bundle)``), refuse a vocabulary
    mismatch here instead of an index error inside the embedding at the first step."""
    have = getattr(getattr(data, "train", None), "vocab_size", None)
    if have is not None and have != vocab_size:
        raise ValueError(f"lstm_lm: model.vocab_size is {vocab_size} but the data set's vocabulary has {have} "
                         f"words; set model.vocab_size: {have}")
