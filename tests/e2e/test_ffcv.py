"""FFCV ImageNet pipeline (ds_ext.data.ffcv_imagenet) on a tiny JPEG folder the test writes with PIL.

Skipped when ffcv is not importable (run/setup.sh installs it where the Debian packages can be had).
Train loaders cost a numba compilation (~10 s on 2 cores) each, so the checks share one module-scoped
data set and reuse loaders of the same shape; pixel-exact checks use the deterministic centre-crop (val)
pipeline, which reads the same file.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ffcv = pytest.importorskip("ffcv", reason="ffcv 1.0.2 is not installed (bash run/setup.sh installs it)")
PIL_Image = pytest.importorskip("PIL.Image", reason="pillow is needed to write the test JPEGs")

from ds_ext.data import ffcv_imagenet as fi  # noqa: E402
from ds_ext.registry import DATASETS, ORDERS, load_builtin  # noqa: E402

CLASSES = ("n01", "n02", "n03")
N_TRAIN = 20
RES = 32


def _make_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", N_TRAIN), ("val", 6)):
        for i in range(n):
            d = root / split / CLASSES[(i * 7) % 3]
            d.mkdir(parents=True, exist_ok=True)
            h, w = (int(v) for v in rng.integers(40, 90, 2))
            PIL_Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"img{i:03d}.JPEG")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ffcv")
    _make_folder(tmp / "imagenet")
    out = tmp / "root" / "ffcv"
    # the train file through the CLI as a user runs it; the val file in-process (saves an interpreter start)
    r = subprocess.run([sys.executable, "-m", "ds_ext.data.ffcv_imagenet", "write", "--split", "train",
                        "--src", str(tmp / "imagenet"), "--out", str(out / "train.beton"),
                        "--max-resolution", "64", "--jpeg-quality", "90", "--num-workers", "2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "100%" in r.stderr  # the progress bar
    assert fi.write_beton(tmp / "imagenet", "val", out / "val.beton", 64, 90, num_workers=2) == 6
    load_builtin()
    bundle = DATASETS.build("ffcv_imagenet", {"train_file": "ffcv/train.beton", "val_file": "ffcv/val.beton",
                                              "num_classes": 3, "train_resolution": RES, "val_resolution": RES,
                                              "threads": 2}, root=str(tmp / "root"))
    # reference: every training image through the deterministic centre-crop pipeline, in file order
    fac = bundle.loader_factory
    val_of_train = fi.FFCVLoaders({"train": bundle.train, "val": bundle.train}, fac.opts)
    ref = torch.cat([x for x, _ in val_of_train("val", range(N_TRAIN), 4, drop_last=False)])
    return {"tmp": tmp, "bundle": bundle, "ref": ref, "centre": val_of_train}


def test_labels_and_shapes_round_trip(data):
    b, tmp = data["bundle"], data["tmp"]
    classes, samples = fi.scan_folder(tmp / "imagenet" / "train")
    assert classes == sorted(CLASSES)
    assert len(b.train) == N_TRAIN and len(b.val) == 6
    assert b.train.labels.tolist() == [label for _, label in samples]
    assert b.train.max_side <= 64  # --max-resolution
    assert b.input_shape == (3, RES, RES) and b.num_classes == 3
    batches = list(b.loader("train", range(N_TRAIN), 4))
    assert len(batches) == N_TRAIN // 4
    for x, y in batches:
        assert x.shape == (4, 3, RES, RES) and x.dtype == torch.float32
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert y.dtype == torch.int64 and y.shape == (4,)
    assert torch.cat([y for _, y in batches]).tolist() == b.train.labels.tolist()
    # normalised with the ImageNet mean/std: uint8 pixels map into this range
    lo = (0 - max(fi.IMAGENET_MEAN)) / min(fi.IMAGENET_STD)
    hi = (255 - min(fi.IMAGENET_MEAN)) / min(fi.IMAGENET_STD)
    x = torch.cat([x for x, _ in batches])
    assert lo - 1e-4 <= x.min() and x.max() <= hi + 1e-4 and x.std() > 0.3
    xv = torch.cat([x for x, _ in b.loader("val", range(6), 4, drop_last=False)])
    assert xv.shape == (6, 3, RES, RES)


def test_given_order_is_followed_exactly(data):
    b, ref, centre = data["bundle"], data["ref"], data["centre"]
    for seed in (1, 2):  # two "epochs" through the same cached loader, different orders
        perm = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(seed)).tolist()
        got = torch.cat([x for x, _ in centre("val", perm, 4, drop_last=False)])
        assert torch.equal(got, ref[perm])
        ys = torch.cat([y for _, y in b.loader("train", perm, 4)])
        assert ys.tolist() == b.train.labels[perm].tolist()


def test_rank_shards_disjoint_and_cover(data):
    b, ref, centre = data["bundle"], data["ref"], data["centre"]
    seen = []
    for rank in range(2):
        order = ORDERS.build("rr", {}, len(b.train), rank, 2, 0)
        idx = order.epoch_indices(0)
        got = torch.cat([x for x, _ in centre("val", idx, 4, drop_last=False)])
        assert torch.equal(got, ref[idx])  # this rank read exactly its shard, in its order
        seen.append(set(idx))
    assert not (seen[0] & seen[1])
    assert seen[0] | seen[1] == set(range(N_TRAIN))


def test_missing_beton_names_path_and_writer_command(data, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        DATASETS.build("ffcv_imagenet", {"train_file": "nope/train.beton"}, root=str(data["tmp"] / "root"))
    msg = str(e.value)
    assert str(data["tmp"] / "root" / "nope" / "train.beton") in msg
    assert ("python -m ds_ext.data.ffcv_imagenet write --split train --src <imagenet dir with train/ and val/> "
            f"--out {data['tmp'] / 'root' / 'nope' / 'train.beton'} --max-resolution 500 --jpeg-quality 90") in msg
    with pytest.raises(FileNotFoundError, match="no data directory configured"):
        DATASETS.build("ffcv_imagenet", {}, root=None)


def test_mismatched_beton_names_path_and_writer_command(data, tmp_path):
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter

    class Ints:
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return (i,)

    (tmp_path / "ffcv").mkdir()
    DatasetWriter(str(tmp_path / "ffcv" / "train.beton"), {"x": IntField()}, num_workers=1).from_indexed_dataset(
        Ints())
    (tmp_path / "ffcv" / "val.beton").write_bytes(b"not a beton at all" * 10)
    opts = {"train_file": "ffcv/train.beton", "val_file": "ffcv/val.beton"}
    with pytest.raises(ValueError) as e:
        DATASETS.build("ffcv_imagenet", opts, root=str(tmp_path))
    assert isinstance(e.value, fi.BetonMismatch)
    assert str(tmp_path / "ffcv" / "train.beton") in str(e.value) and "fields {'x': 'IntField'}" in str(e.value)
    assert "python -m ds_ext.data.ffcv_imagenet write --split train" in str(e.value)
    # labels outside num_classes are a mismatch too (the test folder has 3 classes)
    import shutil
    shutil.copy(data["tmp"] / "root" / "ffcv" / "train.beton", tmp_path / "ffcv" / "train.beton")
    with pytest.raises(fi.BetonMismatch, match="outside"):
        DATASETS.build("ffcv_imagenet", {**opts, "num_classes": 2}, root=str(tmp_path))
    with pytest.raises(fi.BetonMismatch, match="not a readable") as e:
        DATASETS.build("ffcv_imagenet", opts, root=str(tmp_path))
    assert "--split val" in str(e.value) and str(tmp_path / "ffcv" / "val.beton") in str(e.value)


def test_numba_finalizer_keyerror_is_filtered_and_nothing_else():
    # pytest replaces sys.unraisablehook, so this runs in a fresh interpreter (no ffcv import needed)
    script = """if True:
        import weakref
        from ds_ext.data import ffcv_imagenet as fi
        fi._quiet_numba_finalizer()
        ns = {}
        exec(compile("def finalizer():\\n    raise KeyError('numba-sig')\\n", "/x/numba/core/dispatcher.py",
                     "exec"), ns)
        def other():
            raise KeyError('other-key')
        class Obj:
            pass
        for f in (ns["finalizer"], other):  # real finalizers, run when their object dies
            o = Obj()
            weakref.finalize(o, f)
            del o
    """
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "numba-sig" not in r.stderr  # dropped
    assert "other-key" in r.stderr  # anything else still reaches the default hook


def test_cli_reports_missing_source(tmp_path, capsys):
    rc = fi.main(["write", "--split", "train", "--src", str(tmp_path / "none"), "--out", str(tmp_path / "t.beton"),
                  "--max-resolution", "64", "--jpeg-quality", "90"])
    assert rc == 2 and str(tmp_path / "none" / "train") in capsys.readouterr().err
    assert not (tmp_path / "t.beton").exists()


@pytest.mark.slow  # ~60-100 s on 2 cores: a numba pipeline compile in every rank
def test_trainer_runs_on_the_beton_files_on_two_ranks(data, tmp_path):
    """The trainer end to end on the .beton files: 2 gloo ranks through DeepSpeed, FFCV loaders."""
    from tests import harness
    from tests.dist import workers
    from tests.e2e.test_trainer import QUICK

    root = data["tmp"] / "root"
    argv = ["--recipe", str(QUICK), "--set", f"log.dir={tmp_path}", "--set", "log.wandb.mode=disabled",
            "--set", "log.progress=false", "--set", "checkpoint.every_epochs=0", "--set", "train.epochs=2",
            "--set", "train.global_batch_size=8", "--set", "train.micro_batch_size=4",
            "--set", "train.check_consistency_every=1",
            "--set", f"data={{name: ffcv_imagenet, root: {root}, train_file: ffcv/train.beton, "
                     f"val_file: ffcv/val.beton, num_classes: 3, train_resolution: {RES}, "
                     f"val_resolution: {RES}, threads: 1}}",
            "--set", f"model={{name: mlp, in_features: {3 * RES * RES}, hidden: [16], num_classes: 3}}"]
    assert harness.run(workers.run_trainer, 2, argv=argv) == [0, 0]
    import json
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["steps"] == 2 * (N_TRAIN // 2 // 4) and s["val_total"] == 6
