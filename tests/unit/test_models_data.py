"""Models (parameter counts, shapes, loss wiring) and the local-file data readers on tiny synthetic files
written in the real on-disk formats."""
import math
import pickle
import random
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ds_ext.data.base import make_loader
from ds_ext.data.criteo import parse_block
from ds_ext.data.movielens import ranking_metrics
from ds_ext.models.recsys import binary_logit
from ds_ext.registry import DATASETS, MODELS, load_builtin

load_builtin()


def nparams(m):
    return sum(p.numel() for p in m.parameters())


# ---- models: parameter counts ------------------------------------------------------------------

def test_wide_resnet50_2_matches_torchvision():
    m = MODELS.build("wide_resnet50_2", {})
    assert nparams(m) == 68_883_240  # torchvision.models.wide_resnet50_2()
    sd = m.state_dict()
    assert sd["layer1.0.conv1.weight"].shape == (128, 64, 1, 1)  # inner width doubled
    assert sd["layer1.0.conv3.weight"].shape == (256, 128, 1, 1)  # outer width unchanged
    assert sd["layer4.2.conv2.weight"].shape == (1024, 1024, 3, 3)
    assert sd["fc.weight"].shape == (1000, 2048)
    m.eval()
    with torch.no_grad():  # reduced resolution: shapes only
        assert m(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_vit_b16_matches_torchvision():
    m = MODELS.build("vit_b16", {})
    assert nparams(m) == 86_567_656  # torchvision.models.vit_b_16()
    sd = m.state_dict()
    assert sd["encoder.pos_embedding"].shape == (1, 197, 768)
    assert sd["encoder.layers.encoder_layer_11.self_attention.in_proj_weight"].shape == (2304, 768)
    assert sd["encoder.layers.encoder_layer_0.mlp.0.weight"].shape == (3072, 768)
    assert sd["heads.head.weight"].shape == (1000, 768)
    m.eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    with pytest.raises(ValueError, match="224x224"):
        m(torch.randn(1, 3, 32, 32))


def test_seed_reference_parameter_counts():
    # numbers printed in the seeds' own scripts (ExDyna run.sh table) and our measured pins
    assert nparams(MODELS.build("resnet18", {"small_input": True, "num_classes": 10})) == 11_173_962
    assert nparams(MODELS.build("lstm_lm", {"vocab_size": 28869})) == 28_949_319
    assert nparams(MODELS.build("wrn26_10", {})) == 36_481_434
    assert nparams(MODELS.build("wrn26_10", {"num_classes": 100})) == 36_539_124
    assert nparams(MODELS.build("ncf", {})) == 31_832_577
    assert nparams(MODELS.build("vgg_cifar", {})) == 20_565_834


def test_wrn26_10_layout_and_forward():
    m = MODELS.build("wrn26_10", {"num_classes": 100})
    assert len(m.layer1) == len(m.layer2) == len(m.layer3) == 4  # (26 - 2) / 6
    assert m.layer1[0].conv1.weight.shape == (160, 16, 3, 3)
    assert m.layer1[0].downsample is not None  # 16 -> 160 projection, as the DS-Sync seed
    assert m.layer3[-1].conv2.weight.shape == (640, 640, 3, 3)
    m.eval()
    with torch.no_grad():
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    with pytest.raises(ValueError, match="6n\\+2"):
        MODELS.build("wrn26_10", {"depth": 27})


# ---- models: forward shapes on tiny inputs -----------------------------------------------------

@pytest.mark.parametrize("name,opts,shape,out", [
    ("wrn26_10", {"depth": 8, "widen_factor": 1}, (2, 3, 32, 32), (2, 10)),
    ("vit_tiny", {}, (2, 3, 32, 32), (2, 10)),
    ("vit_b16", {"image_size": 32, "patch_size": 8, "depth": 1, "width": 32, "heads": 2, "mlp_dim": 16,
                 "num_classes": 5, "dropout": 0.1}, (3, 3, 32, 32), (3, 5)),
    ("vgg_cifar", {"depth": 11, "batch_norm": False, "num_classes": 100}, (2, 3, 32, 32), (2, 100)),
])
def test_image_model_forward(name, opts, shape, out):
    m = MODELS.build(name, opts)
    y = m(torch.randn(*shape))
    assert y.shape == out
    y.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_vit_options_refuse_bad_geometry():
    with pytest.raises(Exception, match="multiple of patch_size"):
        MODELS.build("vit_tiny", {"image_size": 30})
    with pytest.raises(Exception, match="divisible by heads"):
        MODELS.build("vit_tiny", {"width": 30})


def test_lstm_lm_shapes_and_trainer_loss():
    V, B, T = 50, 4, 7
    m = MODELS.build("lstm_lm", {"vocab_size": V, "emb_dim": 16, "hidden_dim": 16, "num_layers": 2})
    assert m.decoder.weight is m.encoder.weight  # tied by default (ExDyna)
    x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    out = m(x)
    assert out.shape == (B, V, T)
    loss = F.cross_entropy(out, y)  # exactly what the trainer computes
    per_token = F.cross_entropy(out.transpose(1, 2).reshape(B * T, V), y.reshape(-1))
    assert torch.allclose(loss, per_token)
    assert abs(loss.item() - math.log(V)) < 0.1  # near-uniform at init (U(-0.1, 0.1), zero bias)
    loss.backward()
    untied = MODELS.build("lstm_lm", {"vocab_size": V, "emb_dim": 8, "hidden_dim": 12, "tie_weights": False})
    assert untied.decoder.weight is not untied.encoder.weight
    with pytest.raises(Exception, match="tie_weights"):
        MODELS.build("lstm_lm", {"emb_dim": 8, "hidden_dim": 12})


def test_recsys_two_logits_equal_binary_log_loss():
    torch.manual_seed(0)
    ncf = MODELS.build("ncf", {"num_users": 7, "num_items": 11, "factors": 4, "layers": [8, 4], "dropout": 0.0})
    x = torch.tensor([[0, 1], [6, 10], [3, 5]])
    y = torch.tensor([1, 0, 1])
    out = ncf(x)
    assert out.shape == (3, 2) and torch.all(out[:, 0] == 0)
    z = binary_logit(out)
    assert torch.allclose(F.cross_entropy(out, y), F.binary_cross_entropy_with_logits(z, y.float()))

    dims = [3, 5] + [2] * 37
    dfm = MODELS.build("deepfm", {"field_dims": dims, "embed_dim": 4, "mlp_dims": [8, 8]})
    assert dfm.embedding.weight.shape == (sum(dims), 4)
    xf = torch.stack([torch.randint(0, d, (6,)) for d in dims], dim=1)
    dfm.train()
    out = dfm(xf)
    assert out.shape == (6, 2)
    yf = torch.randint(0, 2, (6,))
    assert torch.allclose(F.cross_entropy(out, yf), F.binary_cross_entropy_with_logits(binary_logit(out), yf.float()),
                          atol=1e-6)
    # field offsets: field 1's index 0 is row 3 of the shared table
    assert dfm.offsets[:3].tolist() == [0, 3, 8]
    with pytest.raises(ValueError, match="fields"):
        dfm(xf[:, :10])


def test_data_dependent_sizes_checked_against_bundle():
    class Split:
        vocab_size, num_users, num_items, field_dims = 12, 3, 4, [2] * 39

    class Bundle:
        train = Split()

    with pytest.raises(ValueError, match="vocab_size: 12"):
        MODELS.build("lstm_lm", {"vocab_size": 10}, data=Bundle())
    MODELS.build("lstm_lm", {"vocab_size": 12, "emb_dim": 4, "hidden_dim": 4}, data=Bundle())
    with pytest.raises(ValueError, match="num_users: 3"):
        MODELS.build("ncf", {"num_users": 5, "num_items": 4}, data=Bundle())
    assert MODELS.build("deepfm", {}, data=Bundle()).field_dims == [2] * 39
    with pytest.raises(ValueError, match="field_dims is not set"):
        MODELS.build("deepfm", {})
    with pytest.raises(ValueError, match="differ"):
        MODELS.build("deepfm", {"field_dims": [3] * 39}, data=Bundle())


# ---- CIFAR -------------------------------------------------------------------------------------

def _cifar_batch(path, n, label_keys, seed):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    d = {b"batch_label": b"synthetic", b"data": data}
    labels = {}
    for key, k in label_keys.items():
        labels[key] = [int(v) for v in rng.integers(0, k, size=n)]
        d[key.encode()] = labels[key]
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)
    return data, labels


def test_cifar10_reader(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    parts = [_cifar_batch(d / f"data_batch_{i}", 4, {"labels": 10}, i) for i in range(1, 6)]
    test_data, test_labels = _cifar_batch(d / "test_batch", 6, {"labels": 10}, 99)
    b = DATASETS.build("cifar10", {}, root=str(tmp_path))
    assert (len(b.train), len(b.val), b.input_shape, b.num_classes) == (20, 6, (3, 32, 32), 10)
    all_labels = sum((p[1]["labels"] for p in parts), [])
    assert [int(b.train[i][1]) for i in range(20)] == all_labels
    assert [int(b.val[i][1]) for i in range(6)] == test_labels["labels"]
    # validation: channel-major layout, normalised with the CIFAR-10 statistics, no augmentation
    x, _ = b.val[2]
    raw = torch.from_numpy(test_data[2].reshape(3, 32, 32)).float() / 255
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    assert torch.allclose(x, (raw - mean) / std)
    # training: every draw is one of the 9x9 shifts of the zero-padded image, possibly flipped
    raw = torch.from_numpy(parts[1][0][3].reshape(3, 32, 32)).float() / 255
    padded = F.pad(raw, (4, 4, 4, 4))
    crops = [padded[:, t:t + 32, l:l + 32] for t in range(9) for l in range(9)]
    crops += [c.flip(-1) for c in crops]
    torch.manual_seed(0)
    seen = []
    for _ in range(40):
        img = b.train[7][0] * std + mean
        hits = [k for k, c in enumerate(crops) if torch.allclose(img, c, atol=1e-5)]
        assert len(hits) == 1, "augmented image is not a padded crop/flip of the original"
        flip, t, l = hits[0] // 81, hits[0] % 81 // 9, hits[0] % 9
        seen.append((t, l, flip))
    # independent random offsets in both directions and random flips
    assert len({t for t, _, _ in seen}) > 4 and len({l for _, l, _ in seen}) > 4
    assert any(t != l for t, l, _ in seen) and {f for _, _, f in seen} == {0, 1}
    off = DATASETS.build("cifar10", {"augment": False, "max_train": 5}, root=str(tmp_path))
    assert len(off.train) == 5
    raw = torch.from_numpy(parts[1][0][0].reshape(3, 32, 32)).float() / 255  # train index 4 = data_batch_2[0]
    assert torch.allclose(off.train[4][0], (raw - mean) / std)


def test_cifar100_reader_fine_and_coarse(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    _, tr = _cifar_batch(d / "train", 20, {"fine_labels": 100, "coarse_labels": 20}, 1)
    _, te = _cifar_batch(d / "test", 5, {"fine_labels": 100, "coarse_labels": 20}, 2)
    b = DATASETS.build("cifar100", {"augment": False}, root=str(tmp_path))
    assert (len(b.train), len(b.val), b.num_classes) == (20, 5, 100)
    assert [int(b.train[i][1]) for i in range(20)] == tr["fine_labels"]
    c = DATASETS.build("cifar100", {"labels": "coarse"}, root=str(tmp_path))
    assert c.num_classes == 20 and [int(c.val[i][1]) for i in range(5)] == te["coarse_labels"]
    assert c.train[0][0].shape == (3, 32, 32) and c.train[0][0].dtype == torch.float32
    with pytest.raises(Exception, match="3 values"):
        DATASETS.build("cifar100", {"mean": [0.5, 0.5]}, root=str(tmp_path))


def test_cifar_augmentation_off_returns_exact_pixels(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    parts = [_cifar_batch(d / f"data_batch_{i}", 2, {"labels": 10}, i) for i in range(1, 6)]
    _cifar_batch(d / "test_batch", 2, {"labels": 10}, 9)
    b = DATASETS.build("cifar10", {"augment": False, "mean": [0, 0, 0], "std": [1, 1, 1], "max_train": 3},
                       root=str(tmp_path))
    assert len(b.train) == 3
    expect = torch.from_numpy(parts[1][0][0].reshape(3, 32, 32)).float() / 255
    assert torch.equal(b.train[2][0], expect)


# ---- WikiText-2 ----------------------------------------------------------------------------------

def test_wikitext2_reader(tmp_path):
    d = tmp_path / "wikitext-2"
    d.mkdir()
    (d / "wiki.train.tokens").write_text(" = Title = \n the cat sat \n the dog sat on the cat \n")
    (d / "wiki.valid.tokens").write_text(" the bird sat \n the cat sat on \n")
    (d / "wiki.test.tokens").write_text(" the cat \n")
    b = DATASETS.build("wikitext2", {"bptt": 4}, root=str(tmp_path))
    vocab = b.train.itos
    assert vocab[:9] == ["=", "Title", "<eos>", "the", "cat", "sat", "dog", "on", "<unk>"]
    assert b.num_classes == b.train.vocab_size == b.val.vocab_size == 9  # <unk> added for "bird"
    stream = [vocab.index(w) for w in "= Title = <eos> the cat sat <eos> the dog sat on the cat <eos>".split()]
    assert len(b.train) == (len(stream) - 1) // 4 == 3
    for i in range(3):
        x, y = b.train[i]
        assert x.dtype == torch.long and x.shape == y.shape == (4,)
        assert x.tolist() == stream[4 * i:4 * i + 4] and y.tolist() == stream[4 * i + 1:4 * i + 5]
    assert b.val.stream.tolist() == [3, 8, 5, 2, 3, 4, 5, 7, 2] and len(b.val) == 2
    with pytest.raises(IndexError):
        b.train[3]
    # the whole path the trainer takes: loader -> model -> cross_entropy
    x, y = next(iter(make_loader(b.train, [2, 0], batch_size=2)))
    assert x.shape == y.shape == (2, 4)
    m = MODELS.build("lstm_lm", {"vocab_size": b.train.vocab_size, "emb_dim": 8, "hidden_dim": 8}, data=b)
    F.cross_entropy(m(x), y).backward()
    low = DATASETS.build("wikitext2", {"bptt": 2, "lowercase": True, "val_split": "test"}, root=str(tmp_path))
    assert low.train.itos[:2] == ["=", "title"] and low.val.stream.tolist() == [3, 4, 2]


# ---- MovieLens-20M ---------------------------------------------------------------------------------

RATINGS = [  # userId, movieId, timestamp (user 30 has 5 ratings: dropped with min_ratings 6)
    (10, 100, 1), (10, 101, 2), (10, 102, 4), (10, 103, 9), (10, 104, 5), (10, 105, 6), (10, 106, 7), (10, 107, 3),
    (20, 101, 5), (20, 108, 5), (20, 109, 5), (20, 110, 5), (20, 111, 5), (20, 112, 5), (20, 113, 1),
    (30, 100, 1), (30, 101, 2), (30, 102, 3), (30, 103, 4), (30, 104, 5),
]


def _write_ratings(root):
    d = root / "ml-20m"
    d.mkdir()
    lines = ["userId,movieId,rating,timestamp"] + [f"{u},{i},{(u + i) % 5 + 0.5},{t}" for u, i, t in RATINGS]
    (d / "ratings.csv").write_text("\n".join(lines) + "\n")


def test_ml20m_reader(tmp_path):
    _write_ratings(tmp_path)
    opts = {"min_ratings": 6, "negatives": 2, "test_negatives": 3, "seed": 5}
    b = DATASETS.build("ml20m", opts, root=str(tmp_path))
    tr, va = b.train, b.val
    # ids in order of first appearance: users 10, 20 -> 0, 1; movies 100..113 -> 0..13
    assert (tr.num_users, tr.num_items) == (2, 14)
    # leave-one-out by timestamp: user 10's last is movie 103; user 20's last of the tied ts=5 rows is 112
    assert va.candidates[:, -1].tolist() == [3, 12]
    # training positives: grouped by user, time order inside (ties keep file order)
    P = 13
    assert tr.P == P and len(tr) == P * 3
    pos = [tr[j] for j in range(P)]
    expect = [[0, i] for i in [0, 1, 7, 2, 4, 5, 6]] + [[1, i] for i in [13, 1, 8, 9, 10, 11]]
    assert [x.tolist() for x, _ in pos] == expect
    assert all(int(y) == 1 for _, y in pos)
    neg = [tr[j] for j in range(P, 3 * P)]
    assert all(int(y) == 0 for _, y in neg)
    assert [int(x[0]) for x, _ in neg] == [int(x[0]) for x, _ in pos] * 2  # r-th negative of positive j
    items0 = tr.neg_items.copy()
    assert items0.min() >= 0 and items0.max() < 14
    # per-epoch redraw, identical for every rank (same seed)
    tr.set_epoch(1)
    assert not np.array_equal(items0, tr.neg_items)
    again = DATASETS.build("ml20m", opts, root=str(tmp_path)).train
    assert np.array_equal(again.neg_items, items0)
    # validation: 3 distinct never-rated items, then the positive
    rated = {0: set(range(8)), 1: {13, 1, 8, 9, 10, 11, 12}}
    for u in range(2):
        negs = va.candidates[u, :-1].tolist()
        assert len(set(negs)) == 3 and not set(negs) & rated[u]
    assert len(va) == 8 and [int(va[k][1]) for k in range(8)] == [0, 0, 0, 1] * 2
    assert va[5][0].tolist() == [1, int(va.candidates[1, 1])]
    # batched fetch through the trainer's loader
    x, y = next(iter(make_loader(tr, [0, 13, 26, 5], batch_size=4)))
    assert x.shape == (4, 2) and x.dtype == torch.long and y.tolist() == [1, 0, 0, 1]
    assert x[:, 0].tolist() == [0, 0, 0, 0]


def test_ml20m_ranking_metrics(tmp_path):
    _write_ratings(tmp_path)
    b = DATASETS.build("ml20m", {"min_ratings": 6, "test_negatives": 3}, root=str(tmp_path))
    positives = {(u, int(b.val.candidates[u, -1])) for u in range(2)}  # (user, held-out item)

    class Oracle(torch.nn.Module):  # scores the held-out items high (or low)
        def __init__(self, sign):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.sign = sign

        def forward(self, x):
            z = torch.tensor([self.sign * (1.0 if (int(u), int(i)) in positives else -1.0) for u, i in x.tolist()])
            return torch.stack([torch.zeros_like(z), z], 1)

    assert ranking_metrics(Oracle(1), b.val, k=1) == {"hr": 1.0, "ndcg": 1.0}
    worst = ranking_metrics(Oracle(-1), b.val, k=3)
    assert worst["hr"] == 0.0
    hr4 = ranking_metrics(Oracle(-1), b.val, k=4)
    assert hr4["hr"] == 1.0 and hr4["ndcg"] == pytest.approx(1 / math.log2(5))


def test_ml20m_refuses_impossible_negatives(tmp_path):
    _write_ratings(tmp_path)
    with pytest.raises(ValueError, match="test_negatives=7"):
        DATASETS.build("ml20m", {"min_ratings": 6, "test_negatives": 7}, root=str(tmp_path))


# ---- Criteo ------------------------------------------------------------------------------------

I1 = ["", "5", "1", "5", "5", "0", "-1", "100", "5", "1"]
C1 = ["68fd1e64"] * 4 + ["deadbeef"] + [""] * 5


def _criteo_lines():
    lines = []
    for r in range(10):
        ints = [I1[r]] + ["1"] * 12
        cats = [C1[r]] + ["abcdef12"] * 25
        lines.append("\t".join([str(r % 2)] + ints + cats))
    lines.insert(4, "1\t2\t3")  # malformed: skipped, as the seed does
    return lines


def test_criteo_reader(tmp_path):
    d = tmp_path / "criteo"
    d.mkdir()
    (d / "train.txt").write_text("\n".join(_criteo_lines()) + "\n")
    opts = {"min_count": 2, "cache_dir": str(tmp_path / "cache"), "chunk_rows": 3}
    b = DATASETS.build("criteo", opts, root=str(tmp_path))
    assert (len(b.train), len(b.val), b.input_shape, b.num_classes) == (9, 1, (39,), 2)
    # I1: "1" (token 1 - 2 = -1, exactly min_count=2 times) and "5" (token floor(ln(5)^2) = 2, 4 times) are
    # kept as indices 0, 1 (sorted tokens); "", "0", "-1", "100" occur once and share index 2.
    # C1: "" (5x) and "68fd1e64" (4x) kept (sorted tokens: "" first), "deadbeef" -> out-of-vocabulary 2
    assert b.train.field_dims == [3] + [2] * 12 + [3] + [2] * 25
    feats = np.asarray(b.train.features)
    assert feats[:, 0].tolist() == [2, 1, 0, 1, 1, 2, 2, 2, 1, 0]
    assert feats[:, 13].tolist() == [1, 1, 1, 1, 2, 0, 0, 0, 0, 0]
    assert (feats[:, 1:13] == 0).all() and (feats[:, 14:] == 0).all()
    assert np.asarray(b.train.labels).tolist() == [r % 2 for r in range(10)]
    # DS-Sync's split: torch.utils.data.random_split after torch.manual_seed(42)
    ref = torch.utils.data.random_split(range(10), [9, 1], generator=torch.Generator().manual_seed(42))
    assert b.train.rows.tolist() == list(ref[0].indices) and b.val.rows.tolist() == list(ref[1].indices)
    r = int(b.val.rows[0])
    x, y = b.val[0]
    assert x.dtype == torch.long and x.tolist() == feats[r].tolist() and int(y) == r % 2
    # cached, memory-mapped, and independent of the chunking
    assert len(list((tmp_path / "cache").glob("criteo-*.features.npy"))) == 1
    again = DATASETS.build("criteo", {**opts, "chunk_rows": 100}, root=str(tmp_path))
    assert isinstance(again.train.features, np.memmap)
    assert np.array_equal(np.asarray(again.train.features), feats)
    mem = DATASETS.build("criteo", {"min_count": 2, "cache": False, "max_rows": 6}, root=str(tmp_path))
    assert len(mem.train) + len(mem.val) == 5  # first 6 lines, one malformed
    # through the trainer's loader and into the model
    xb, yb = next(iter(make_loader(b.train, list(range(4)), batch_size=4)))
    assert xb.shape == (4, 39) and yb.shape == (4,)
    m = MODELS.build("deepfm", {"embed_dim": 3, "mlp_dims": [4]}, data=b)
    F.cross_entropy(m(xb), yb).backward()


def test_criteo_parser_matches_python_reference():
    rnd = random.Random(1)
    lines = []
    for _ in range(300):
        ints = [str(rnd.choice([rnd.randint(-3, 3), rnd.randint(0, 10 ** 9)])) if rnd.random() > 0.3 else ""
                for _ in range(13)]
        cats = [rnd.choice(["%08x" % rnd.getrandbits(8), "", "a-much-longer-category-%d" % rnd.randint(0, 2)])
                for _ in range(26)]
        lines.append("\t".join([str(rnd.randint(0, 1))] + ints + cats))
    labels, tok = parse_block(("\r\n".join(lines)).encode())  # CRLF, no final newline
    for r, line in enumerate(lines):
        f = line.split("\t")
        assert labels[r] == int(f[0])
        for k in range(13):
            v = f[1 + k]
            want = np.iinfo(np.int64).min if v == "" else (int(math.log(int(v)) ** 2) if int(v) > 2 else int(v) - 2)
            assert tok[r, k] == want
    for c in range(13, 39):  # equal strings <-> equal tokens
        pairs = {(line.split("\t")[1 + c], int(tok[r, c])) for r, line in enumerate(lines)}
        assert len({s for s, _ in pairs}) == len({t for _, t in pairs}) == len(pairs)
    with pytest.raises(ValueError, match="non-numeric"):
        parse_block(("0\tx" + "\t1" * 12 + "\tab" * 26 + "\n").encode())


# ---- missing files -----------------------------------------------------------------------------

@pytest.mark.parametrize("name,rel,archive", [
    ("cifar10", "cifar-10-batches-py/data_batch_1", "cifar-10-python.tar.gz"),
    ("cifar100", "cifar-100-python/train", "cifar-100-python.tar.gz"),
    ("wikitext2", "wikitext-2/wiki.train.tokens", "wikitext-2-v1.zip"),
    ("ml20m", "ml-20m/ratings.csv", "ml-20m.zip"),
    ("criteo", "criteo/train.txt", "dac.tar.gz"),
])
def test_missing_file_errors_name_path_setting_and_fix(tmp_path, name, rel, archive):
    with pytest.raises(FileNotFoundError) as e:
        DATASETS.build(name, {}, root=str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / rel) in msg
    assert "data.root" in msg and "data_root" in msg and ".config_" in msg
    assert archive in msg
    with pytest.raises(FileNotFoundError, match="no data directory configured"):
        DATASETS.build(name, {}, root=None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DATASETS.build(name, {}, root=str(tmp_path / "nope"))


def test_missing_split_file_is_named(tmp_path):
    d = tmp_path / "wikitext-2"
    d.mkdir()
    (d / "wiki.train.tokens").write_text("a b c d e\n")
    with pytest.raises(FileNotFoundError, match=str(d / "wiki.valid.tokens")):
        DATASETS.build("wikitext2", {"bptt": 2}, root=str(tmp_path))


def test_reader_options_refuse_unknown_keys():
    with pytest.raises(Exception, match="extra"):
        DATASETS.build("cifar10", {"augmentation": True}, root="/nonexistent")


def test_digits_are_read_without_importing_scikit_learn(monkeypatch):
    """Issue 30, item 10 (start-up): the digits come from scikit-learn's own ``digits.csv.gz`` without importing
    scikit-learn (2.4-3.7 s per rank, scipy included), and are exactly what ``load_digits`` returns."""
    import numpy as np
    from sklearn.datasets import load_digits

    from ds_ext.data.digits import digits_arrays

    d = load_digits()
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "sklearn.datasets", None)  # load_digits (the fallback) now raises ImportError
        images, target = digits_arrays()
    assert np.array_equal(images, d.images) and images.dtype == d.images.dtype
    assert np.array_equal(target, d.target) and target.dtype == d.target.dtype
