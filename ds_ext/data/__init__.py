"""Data sets registered by recipe name (``data: {name: ..., <options>}``).

A data set factory returns a ``DataBundle`` (train / val ``torch.utils.data.Dataset`` plus shape
metadata). Which examples a rank visits, and in which order, is decided by the ``order`` method
(``ds_ext.order``), not here.

Readers of local files (nothing downloads; each module docstring gives the on-disk layout under
``data.root`` and how to get the files, and a missing file raises FileNotFoundError saying so):
``cifar`` (cifar10, cifar100), ``wikitext`` (wikitext2), ``movielens`` (ml20m), ``criteo`` (criteo),
``glue`` (glue_embeddings: frozen BERT-base pooled embeddings of QNLI / QQP), ``ffcv_imagenet``
(ImageNet as FFCV ``.beton`` files; ffcv is imported only when that data set is built, so registering it
never needs ffcv, and using it without ffcv raises an ImportError saying what to install). Each of them
declares the files it opens first (``needs_files`` in ``files.py``), which the trainer looks for before the
process group starts.
"""
from .base import DataBundle  # noqa: F401
from . import digits  # noqa: F401  (registration)
from . import cifar
from . import wikitext
from . import movielens
from . import criteo
from . import glue
from . import ffcv_imagenet
from . import pytext
