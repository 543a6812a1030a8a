"""What the trainer says about its methods: at the start, each method's own line (``ds_ext/deepspeed/announce.py``)
and, at world size 1, the launcher command for data parallel; at the end, the attachment's summary, the launcher
command again at world size 1, and where the wandb run is (``wandb sync DIR`` for an offline one)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional, Sequence, Union

from ..deepspeed.announce import wandb_lines, world_one_line
from ..deepspeed.threads import apply_default
from ..meter import CommMeter


def launch_command(source: Optional[str]) -> str:
    """The recipe under the launcher on 2 processes: a bundled recipe by its name, any other by its path."""
    from .recipe.bundled import bundled_path

    src = source or "RECIPE"
    name = Path(src).stem if bundled_path(Path(src).stem) == Path(src) else src
    return f"deepspeed --num_gpus 2 --module ds_ext.train --recipe {name}"


def prefixed(lines: Union[str, Sequence[str]]) -> str:
    """``[ds_ext] <line>`` for every line (a text is split into its lines)."""
    items = lines.splitlines() if isinstance(lines, str) else lines
    return "\n".join(f"[ds_ext] {line}" for line in items)


def start_lines(att, world: int, source: Optional[str]) -> List[str]:
    """The run's first lines after its start-up line: what each method does, and at world size 1 that nothing is
    communicated and how to launch data parallel."""
    return list(att.description) + ([world_one_line(launch_command(source))] if world == 1 else [])


def thread_default(rank: int) -> None:
    """The CPU thread rule (``ds_ext/deepspeed/threads.py``); rank 0 prints what it changed."""
    said = apply_default()
    if said and rank == 0:
        print(f"[ds_ext] {said}", file=sys.stderr, flush=True)


def reported(meter: CommMeter, world: int) -> CommMeter:
    """The meter the run's records report: ``meter``, or at world size 1 an empty one (the methods' payload went to
    collectives that were skipped: nothing crossed a network; the trainer copies the step count over at the end)."""
    if world > 1:
        return meter
    shown = CommMeter()
    shown.world_size = 1
    return shown


def parts(meter: CommMeter, who: dict, world: int) -> dict:
    """The bytes by purpose, each purpose named by its method (``who``); at world size 1 the one line that says
    nothing was communicated."""
    if world == 1:
        return {"nothing communicated (world size 1)": 0}
    return {f"{k} ({who[k]})" if k in who else k: v for k, v in meter.by_purpose().items()}


def last_lines(world: int, source: Optional[str], run) -> List[str]:
    """The run's last lines: at world size 1 the launcher command, then the wandb run (none without one)."""
    return ([world_one_line(launch_command(source))] if world == 1 else []) + wandb_lines(run)
