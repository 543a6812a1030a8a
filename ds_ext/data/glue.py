"""GLUE QNLI / QQP as frozen BERT-base pooled embeddings (D-GraB's ``main-lr-glue.py`` setup: the BERT
encoder is frozen and its pooled output pre-computed, only a linear head is trained; Guo, Pham, Lu et al.,
"Scale up with Order: Finding Good Data Permutations for Distributed Training", arXiv 2302.00845, GLUE
experiments).

Layout under ``data.root``::

    glue-embeddings/<task>/train.pt     {"x": float [N, 768], "y": long [N], "task", "model"}
    glue-embeddings/<task>/dev.pt       same for the GLUE dev split (the trainer evaluates on it)

Nothing downloads at run time. The files are made once by

    python -m ds_ext.data.glue embed --task qnli --glue-dir /data/glue/QNLI --bert /models/bert-base-uncased \\
        --out <root>/glue-embeddings/qnli [--batch-size 64] [--max-length 128] [--device cuda]

which needs the ``transformers`` package and a local copy of the BERT weights (a directory with
``config.json``, the tokenizer files and the weights; loaded with ``local_files_only=True``), and the GLUE
task folder with ``train.tsv`` / ``dev.tsv`` (QNLI columns: index, question, sentence, label in
{entailment, not_entailment}; QQP: id, qid1, qid2, question1, question2, is_duplicate). The pooled output
is BERT's ``pooler_output`` (tanh of the [CLS] projection), in eval mode (no dropout), as the seed's
``c_bert.eval()``.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import List, Literal, Tuple

import torch
from pydantic import Field
from torch.utils.data import TensorDataset

from ..registry import DATASETS, Options
from .base import DataBundle
from .files import data_root, needs_files, require

TASKS = {
    # task: (text columns, label column, label map)
    "qnli": (("question", "sentence"), "label", {"entailment": 0, "not_entailment": 1}),
    "qqp": (("question1", "question2"), "is_duplicate", {"0": 0, "1": 1}),
}


class GlueOptions(Options):
    task: Literal["qnli", "qqp"] = Field("qqp", description="GLUE task (the D-GraB seed's default: qqp)")
    max_train: int = Field(0, ge=0, description="use only the first N training examples (0: all)")


def _fix(task: str) -> str:
    return (f"compute them once with: python -m ds_ext.data.glue embed --task {task} --glue-dir <GLUE>/"
            f"{task.upper()} --bert <local bert-base-uncased dir> --out <root>/glue-embeddings/{task} "
            "(needs transformers and local BERT weights)")


def _load(path: Path, task: str) -> Tuple[torch.Tensor, torch.Tensor]:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    x, y = blob.get("x"), blob.get("y")
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"glue_embeddings: {path} does not hold x [N, D] and y [N] tensors; re-create it: "
                         f"{_fix(task)}")
    return x.float(), y.long()


@DATASETS.register("glue_embeddings", GlueOptions)
@needs_files(lambda o: [("data.root", f"glue-embeddings/{o.task}/{n}") for n in ("train.pt", "dev.pt")])
def glue_embeddings(options: GlueOptions, root=None, **_) -> DataBundle:
    """Pre-computed BERT-base pooled embeddings of a GLUE task: train split and dev split."""
    task = options.task
    layout = f"glue-embeddings/{task}/{{train.pt, dev.pt}}"
    base = data_root(root, "glue_embeddings", layout, _fix(task))
    tr = require(base / "glue-embeddings" / task / "train.pt", "glue_embeddings", base, layout, _fix(task))
    dv = require(base / "glue-embeddings" / task / "dev.pt", "glue_embeddings", base, layout, _fix(task))
    xt, yt = _load(tr, task)
    xv, yv = _load(dv, task)
    if xt.shape[1] != xv.shape[1]:
        raise ValueError(f"glue_embeddings: {tr} has {xt.shape[1]}-d embeddings but {dv} has {xv.shape[1]}-d")
    if options.max_train:
        xt, yt = xt[:options.max_train], yt[:options.max_train]
    return DataBundle(TensorDataset(xt, yt), TensorDataset(xv, yv), (xt.shape[1],), 2)


def read_tsv(path: Path, task: str) -> Tuple[List[Tuple[str, str]], List[int]]:
    """(text pairs, labels) of a GLUE task file; rows with a missing field are skipped."""
    cols, label_col, labels = TASKS[task]
    pairs, ys = [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        for row in reader:
            a, b, lab = row.get(cols[0]), row.get(cols[1]), row.get(label_col)
            if a is None or b is None or lab not in labels:
                continue
            pairs.append((a, b))
            ys.append(labels[lab])
    return pairs, ys


def embed(task: str, glue_dir: str, bert: str, out: str, batch_size: int = 64, max_length: int = 128,
          device: str = "cpu") -> None:
    try:
        import transformers
    except ImportError:
        raise SystemExit("embed needs the `transformers` package: pip install transformers") from None
    from tqdm import tqdm

    tok = transformers.AutoTokenizer.from_pretrained(bert, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(bert, local_files_only=True).to(device).eval()
    Path(out).mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev"):
        src = Path(glue_dir) / f"{split}.tsv"
        if not src.is_file():
            raise SystemExit(f"missing {src}: --glue-dir must be the GLUE {task.upper()} folder with train.tsv and dev.tsv")
        pairs, ys = read_tsv(src, task)
        xs = []
        with torch.no_grad():
            for i in tqdm(range(0, len(pairs), batch_size), desc=f"{task} {split}", unit="batch"):
                a, b = zip(*pairs[i:i + batch_size])
                enc = tok(list(a), list(b), truncation=True, max_length=max_length, padding=True,
                          return_tensors="pt").to(device)
                xs.append(model(**enc).pooler_output.float().cpu())
        blob = {"x": torch.cat(xs) if xs else torch.zeros(0, model.config.hidden_size),
                "y": torch.tensor(ys, dtype=torch.long), "task": task, "model": str(bert)}
        tmp = Path(out) / f".{split}.pt.tmp"
        torch.save(blob, tmp)
        tmp.replace(Path(out) / f"{split}.pt")  # never a half-written file under the final name
        print(f"wrote {Path(out) / f'{split}.pt'}: {len(ys)} examples")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ds_ext.data.glue", description="GLUE embeddings for glue_embeddings")
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("embed", help="compute frozen BERT pooled embeddings of a GLUE task")
    e.add_argument("--task", choices=sorted(TASKS), required=True)
    e.add_argument("--glue-dir", required=True)
    e.add_argument("--bert", required=True, help="local directory of bert-base-uncased (no download)")
    e.add_argument("--out", required=True)
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--max-length", type=int, default=128)
    e.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    embed(a.task, a.glue_dir, a.bert, a.out, a.batch_size, a.max_length, a.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
