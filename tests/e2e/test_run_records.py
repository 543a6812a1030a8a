"""What a run records (issue 18, item 4), on 2 gloo ranks through the trainer: one Local SGD run stopped at
step 7 (``train.stop_at_step``) and resumed (``checkpoint.resume=auto``) to step 10, wandb offline.

* bytes are attributed to what sent them: parameter averaging (the synchronizer), not "reducer=none";
* ``summary.json``'s history covers every logged step of the whole run once (a record logged after the
  checkpoint by a killed run is dropped on resume), and the resumed run continues the same wandb run id;
* the wandb records carry ``train/step_time_s``, ``train/samples_per_s`` and the run name from the recipe.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from tests import harness
from tests.dist import workers
from tests.e2e.test_resume_matrix import argv

COMBO = ("none", "local", "rr")  # reducer none, Local SGD (QSR, H >= 3), random reshuffling
LOGGED = [2, 4, 5, 6, 8, 10]  # log.every_steps=2 and each epoch's last step (5 steps per epoch, 2 epochs)


def wandb_records(path: Path) -> list:
    """The records of an offline run's ``run-<id>.wandb`` file (wandb's LevelDB-style log of protobuf
    ``Record``s: a 7-byte file header, then 32 KiB blocks of chunks with a 7-byte header each)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, out, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def wandb_history(run_dir: Path) -> tuple:
    """``(display names, {step: {key: value}})`` over every offline wandb run directory of ``run_dir``."""
    names, steps = [], {}
    for f in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                names.append(r.run.display_name)
            elif kind == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
                steps.setdefault(int(row["_step"]), {}).update(row)
    return names, steps


def test_stopped_and_resumed_local_sgd_run_records(tmp_path, capfd):
    run = tmp_path / "run"
    extra = ["log.wandb.mode=offline", "log.every_steps=2"]
    assert harness.run(workers.run_trainer, 2, argv=argv(run, COMBO, *extra, "train.stop_at_step=7")) == [0, 0]
    assert (run / "checkpoints" / "step_0000007" / "meta.json").is_file() and not (run / "summary.json").exists()
    rid = (run / "wandb_run_id").read_text().strip()
    first = [json.loads(x)["step"] for x in (run / "history.jsonl").read_text().splitlines()]
    assert first == [2, 4, 5, 6]
    # as if the first run had been killed after logging step 8 (its last checkpoint: step 7)
    with open(run / "history.jsonl", "a") as f:
        f.write(json.dumps({"step": 8, "train/loss": -1.0}) + "\n")
    capfd.readouterr()
    assert harness.run(workers.run_trainer, 2, argv=argv(run, COMBO, *extra, "checkpoint.resume=auto")) == [0, 0]
    got = capfd.readouterr()
    console = got.out + got.err

    # bytes: parameter averaging by the synchronizer, on the console and in summary.json
    line = next(x for x in console.splitlines() if x.startswith("[ds_ext] communicated"))
    assert "/step; parameter averaging (sync=local))" in line and "reducer=none" not in line, line
    s = json.loads((run / "summary.json").read_text())
    assert s["comm_bytes_by_purpose"] == {"parameter averaging (sync=local)": s["comm_bytes_total"]}
    assert s["comm_bytes_total"] > 0

    # the whole run's history, each logged step once, the record after the checkpoint replaced
    assert [h["step"] for h in s["history"]] == LOGGED and s["steps"] == 10
    by_step = {h["step"]: h for h in s["history"]}
    assert by_step[8]["train/loss"] > 0
    for h in s["history"]:
        assert h["train/step_time_s"] > 0 and h["train/samples_per_s"] > 0
        assert h.get("comm/bytes_total/parameter_averaging", 0) == h["comm/bytes_total"]  # none before the 1st
        assert h["sync/H"] >= 1  # the synchronizer's statistics ride along
    assert [json.loads(x)["step"] for x in (run / "history.jsonl").read_text().splitlines()] == LOGGED

    # one wandb run id, two offline segments of it, named after the recipe, with the step time and rate
    assert (run / "wandb_run_id").read_text().strip() == rid
    segments = sorted(run.glob("wandb/offline-run-*"))
    assert len(segments) == 2 and all(d.name.endswith("-" + rid) for d in segments)
    names, steps = wandb_history(run)
    assert names == ["quickstart", "quickstart"]
    for step in LOGGED:
        row = steps[step]
        assert row["train/step_time_s"] > 0 and row["train/samples_per_s"] > 0, row
        assert row["train/loss"] == by_step[step]["train/loss"]
    assert "summary/comm_bytes/parameter_averaging" in steps[10]
