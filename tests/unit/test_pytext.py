"""The ``pytext`` data set (issue 31): the split by path hash is deterministic and disjoint, the cache is built once
and reused, a missing or changed source tree is named in one clear error; ``gpt_small`` fits it."""
from __future__ import annotations

import os

import pytest
import torch

from ds_ext.data import pytext as P
from ds_ext.registry import DATASETS, MODELS


def _tree(root):
    for i in range(40):
        d = root / ("pkg" if i % 2 else "") / ("test" if i % 7 == 0 else "")
        d.mkdir(parents=True, exist_ok=True)
        (d / f"m{i:02d}.py").write_text(f"def f{i}(x):\n    return x * {i}  # module {i}\n" * (3 + i % 5))
    (root / "pkg" / "notes.txt").write_text("not python")
    return root


def _opts(src, cache, **kw):
    return {"source": str(src), "cache_dir": str(cache), "bptt": 16, "val_fraction": 0.25, **kw}


def test_split_is_deterministic_disjoint_and_by_path(tmp_path):
    src = _tree(tmp_path / "src")
    a = DATASETS.build("pytext", _opts(src, tmp_path / "c1"))
    b = DATASETS.build("pytext", _opts(src, tmp_path / "c2"))  # a second cache: built again, the same bytes
    assert torch.equal(a.train.stream, b.train.stream) and torch.equal(a.val.stream, b.val.stream)
    files = P.scan(src, P.PyTextOptions().exclude)
    assert len(files) == 40 - len(range(0, 40, 7)) and all("test/" not in r for r, _ in files)  # test dirs skipped
    val = {r for r, _ in files if P.is_val(r, 0.25)}
    train = {r for r, _ in files} - val
    assert val and train and not (val & train)
    assert a.manifest["train"]["files"] == len(train) and a.manifest["val"]["files"] == len(val)
    assert a.manifest["train"]["bytes"] + a.manifest["val"]["bytes"] == sum(p.stat().st_size + 1 for _, p in files)
    text = bytes(a.val.stream.tolist()).decode()
    assert all(p.read_text() in text for r, p in files if r in val)
    assert not any(p.read_text() in text for r, p in files if r in train)  # every file's text is unique here
    x, y = a.train[0]
    assert x.dtype == torch.int64 and x.shape == (16,) and torch.equal(x[1:], y[:-1])
    assert a.manifest["python"] == P.python_version()


def test_cache_is_reused_and_a_changed_or_missing_tree_is_named(tmp_path, monkeypatch):
    src = _tree(tmp_path / "src")
    first = DATASETS.build("pytext", _opts(src, tmp_path / "c"))
    assert first.manifest["cache"] == "built"
    monkeypatch.setattr(P, "_build", lambda *a: pytest.fail("rebuilt although the cache exists"))
    again = DATASETS.build("pytext", _opts(src, tmp_path / "c", max_train_windows=5))
    assert again.manifest["cache"] == "reused" and len(again.train) == 5
    assert torch.equal(again.train.stream, first.train.stream)
    # same size, new content and a new modification time: found by its sha256
    victim = src / "pkg" / "m01.py"
    raw = victim.read_bytes()
    victim.write_bytes(raw.replace(b"x * 1", b"y * 1"))
    os.utime(victim, ns=(1, 1))
    with pytest.raises(P.PyTextSourceError, match=f"{src}.*changed.*{victim}.*delete"):
        DATASETS.build("pytext", _opts(src, tmp_path / "c"))
    victim.write_bytes(raw)
    (src / "new.py").write_text("x = 1\n")
    with pytest.raises(P.PyTextSourceError, match=r"new file\(s\) \(first: new.py\)"):
        DATASETS.build("pytext", _opts(src, tmp_path / "c"))
    missing = tmp_path / "nowhere"
    with pytest.raises(P.PyTextSourceError, match=f"source directory {missing} does not exist"):
        DATASETS.build("pytext", _opts(missing, tmp_path / "c"))


def test_gpt_small_is_causal_and_checks_the_data():
    torch.manual_seed(0)
    m = MODELS.build("gpt_small", {"width": 32, "num_layers": 2, "heads": 4, "context": 16})
    x = torch.randint(0, 256, (2, 16))
    out = m(x)
    assert out.shape == (2, 256, 16)
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 1) % 256  # later tokens do not change earlier outputs
    assert torch.allclose(m(x2)[:, :, :10], out[:, :, :10], atol=1e-6)
    assert not torch.allclose(m(x2)[:, :, 10:], out[:, :, 10:])

    class Bundle:
        input_shape = (32,)
        train = type("T", (), {"vocab_size": 256})()

    with pytest.raises(ValueError, match="exceed model.context 16"):
        MODELS.build("gpt_small", {"context": 16}, data=Bundle())
