"""D-GraB's GLUE-embedding data set, LeNet and the linear head."""
import pytest
import torch

import ds_ext
from ds_ext.data import glue


def _write(root, task="qnli", n=12, dev=5, d=16):
    g = torch.Generator().manual_seed(0)
    base = root / "glue-embeddings" / task
    base.mkdir(parents=True)
    torch.save({"x": torch.randn(n, d, generator=g), "y": torch.arange(n) % 2, "task": task}, base / "train.pt")
    torch.save({"x": torch.randn(dev, d, generator=g), "y": torch.ones(dev, dtype=torch.long)}, base / "dev.pt")


def test_glue_embeddings_load_and_feed_the_linear_head(tmp_path):
    _write(tmp_path)
    b = ds_ext.DATASETS.build("glue_embeddings", {"task": "qnli", "max_train": 10}, root=str(tmp_path))
    assert len(b.train) == 10 and len(b.val) == 5 and b.input_shape == (16,) and b.num_classes == 2
    x, y = b.train[3]
    assert x.shape == (16,) and y.item() == 1
    head = ds_ext.MODELS.build("linear", {}, data=b)
    assert head(torch.stack([b.train[i][0] for i in range(4)])).shape == (4, 2)
    with pytest.raises(ValueError, match="in_features=8 but the data set's inputs have 16"):
        ds_ext.MODELS.build("linear", {"in_features": 8}, data=b)


def test_glue_embeddings_missing_file_names_path_and_command(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        ds_ext.DATASETS.build("glue_embeddings", {"task": "qqp"}, root=str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "glue-embeddings" / "qqp" / "train.pt") in msg
    assert "python -m ds_ext.data.glue embed --task qqp" in msg and "data_root" in msg


def test_glue_tsv_reader(tmp_path):
    (tmp_path / "dev.tsv").write_text("index\tquestion\tsentence\tlabel\n0\tWhy?\tBecause.\tentailment\n"
                                      "1\tWho?\tNobody.\tnot_entailment\n2\tbroken\n")
    pairs, ys = glue.read_tsv(tmp_path / "dev.tsv", "qnli")
    assert pairs == [("Why?", "Because."), ("Who?", "Nobody.")] and ys == [0, 1]


def test_lenet_shapes_and_size():
    m = ds_ext.MODELS.build("lenet", {})
    assert sum(p.numel() for p in m.parameters()) == 62006
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
