"""WikiText-2 (Merity et al., "Pointer Sentinel Mixture Models", 2016) word-level language modelling, the
LSTM benchmark of the ExDyna and D-GraB seeds.

On-disk layout under ``data.root`` (what ``wikitext-2-v1.zip``, the tokenised word-level release, unzips to)::

    <root>/wikitext-2/wiki.train.tokens, wiki.valid.tokens, wiki.test.tokens

Get the zip on a machine with internet (e.g. the Salesforce/Smerity WikiText page or the Hugging Face
``wikitext`` data set, configuration ``wikitext-2-v1``, written out as the three ``.tokens`` files) and run
``unzip wikitext-2-v1.zip -d <root>``.

Tokenisation and vocabulary as the PyTorch ``word_language_model`` example (which the seeds' LSTM code
derives from): every line is split on whitespace and gets an ``<eos>`` token; the vocabulary is the
training split's words in order of first appearance (33,278 words for WikiText-2 per the PyTorch
example; not re-counted here, no copy of the data on this machine; it is ``lstm_lm``'s default
``vocab_size``, and passing ``data=bundle`` to the model factory checks it). Validation/test words
outside it map to ``<unk>``. The ExDyna seed instead tokenises with spaCy and lower-cases through
torchtext (28,869 words, inferred from its parameter count); ``lowercase: true`` gets the lower-casing,
not the spaCy tokens.

Examples: the token stream is cut into non-overlapping windows of ``bptt`` tokens; example ``i`` is
``x = s[i*bptt : (i+1)*bptt]`` and ``y = s[i*bptt+1 : (i+1)*bptt+1]`` (next-token targets), both int64
``[bptt]``. The default collate stacks them to ``[B, bptt]``; ``lstm_lm`` returns ``[B, V, bptt]`` logits so
the trainer's ``cross_entropy(model(x), y)`` is the mean per-token loss (see ``ds_ext.models.lstm_lm``).
The whole split is one int64 tensor (about 2.1M tokens for the training split).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Literal, Optional

import torch
from pydantic import Field
from torch.utils.data import Dataset

from ..registry import DATASETS, Options
from .base import DataBundle
from .files import data_root, needs_files, require

LAYOUT = "wikitext-2/{wiki.train.tokens, wiki.valid.tokens, wiki.test.tokens}"
FIX = ("get wikitext-2-v1.zip (the word-level, tokenised WikiText-2 release) and unzip it into the data root: "
       "unzip wikitext-2-v1.zip -d <root>  (it creates <root>/wikitext-2/)")


class LMWindows(Dataset):
    """Non-overlapping next-token windows over one token stream (see module docstring)."""

    def __init__(self, stream: torch.Tensor, bptt: int, vocab: List[str]):
        self.stream, self.bptt = stream, bptt
        self.itos = vocab
        self.vocab_size = len(vocab)
        self.n = (len(stream) - 1) // bptt

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        a = i * self.bptt
        return self.stream[a:a + self.bptt], self.stream[a + 1:a + self.bptt + 1]


def _words(path: Path, lowercase: bool):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if lowercase:
                line = line.lower()
            yield from line.split()
            yield "<eos>"


def _encode(path: Path, stoi: Dict[str, int], vocab: List[str], lowercase: bool, grow: bool,
            limit: Optional[int]) -> torch.Tensor:
    ids: List[int] = []
    unk = None
    for w in _words(path, lowercase):
        i = stoi.get(w)
        if i is None:
            if grow:
                i = stoi[w] = len(vocab)
                vocab.append(w)
            else:
                if unk is None:
                    if "<unk>" not in stoi:
                        stoi["<unk>"] = len(vocab)
                        vocab.append("<unk>")
                    unk = stoi["<unk>"]
                i = unk
        ids.append(i)
        if limit is not None and len(ids) >= limit:
            break
    return torch.tensor(ids, dtype=torch.long)


class WikiText2Options(Options):
    bptt: int = Field(30, ge=1, description="tokens per example window (ExDyna: 30; D-GraB: 35)")
    val_split: Literal["valid", "test"] = Field("valid", description="which split the trainer evaluates on")
    lowercase: bool = Field(False, description="lower-case all text before building the vocabulary")
    max_train_tokens: Optional[int] = Field(None, ge=2, description="read only the first N training tokens "
                                            "(smoke runs; the vocabulary then comes from those tokens only)")


@DATASETS.register("wikitext2", WikiText2Options)
@needs_files(lambda o: [("data.root", "wikitext-2/wiki.train.tokens"),
                        ("data.root", f"wikitext-2/wiki.{o.val_split}.tokens")])
def wikitext2(options: WikiText2Options, root: Optional[str] = None, **_) -> DataBundle:
    """WikiText-2 word-level LM: [bptt] token windows x with next-token targets y; vocab from train."""
    base = data_root(root, "wikitext2", LAYOUT, FIX)
    d = base / "wikitext-2"
    train_path = require(d / "wiki.train.tokens", "wikitext2", base, LAYOUT, FIX)
    val_path = require(d / f"wiki.{options.val_split}.tokens", "wikitext2", base, LAYOUT, FIX)
    vocab: List[str] = []
    stoi: Dict[str, int] = {}
    train = _encode(train_path, stoi, vocab, options.lowercase, True, options.max_train_tokens)
    val = _encode(val_path, stoi, vocab, options.lowercase, False, None)
    for name, s in (("train", train), (options.val_split, val)):
        if len(s) <= options.bptt:
            raise ValueError(f"wikitext2: the {name} split has {len(s)} tokens, too few for one window of "
                             f"bptt={options.bptt} (+1 target)")
    # both splits share the final vocabulary (it may have gained <unk> while encoding the validation split)
    return DataBundle(LMWindows(train, options.bptt, vocab), LMWindows(val, options.bptt, vocab),
                      (options.bptt,), len(vocab))
