"""The trainer's checkpoint store: staged atomic saves with ``meta.json`` and fingerprints, choosing
and verifying the checkpoint to resume from, pruning and loading (``store``), one job per directory
(``lock``), and what a resumed run must share with its checkpoint (``resume``). The per-rank state file
and ``meta.json``'s fingerprints are written and read by ``ds_ext/deepspeed/checkpoint.py``."""
from ...deepspeed.checkpoint import (FORMAT, INTEGRITY, META, OWN_LOOP, CheckpointError, CheckpointSaveError,
                                     free_space, rank_file, shared_verdict)
from .lock import EXIT_BUSY, LOCK, DirectoryBusy, DirLock, job_identity, lock_dirs, verify_all
from .resume import (FIXED_TRAIN_KEYS, FREE_DATA_OPTIONS, FREE_DEEPSPEED_KEYS, MAY_CHANGE, ORDERS_FIXING_MICRO,
                     CheckpointMismatch, check_meta, resume_fields, run_meta)
from .store import (EXIT_SAVE, candidates, choose, complete_checkpoints, latest, latest_tag_text, load, read_meta,
                    resolve, save, step_of, verify)

__all__ = ["CheckpointError", "CheckpointMismatch", "CheckpointSaveError", "DirLock", "DirectoryBusy", "EXIT_BUSY",
           "EXIT_SAVE", "FIXED_TRAIN_KEYS", "FORMAT", "FREE_DATA_OPTIONS", "FREE_DEEPSPEED_KEYS", "INTEGRITY", "LOCK",
           "MAY_CHANGE", "META", "ORDERS_FIXING_MICRO", "OWN_LOOP", "candidates", "check_meta", "choose",
           "complete_checkpoints", "free_space", "job_identity", "latest", "latest_tag_text", "load", "lock_dirs",
           "rank_file", "read_meta", "resolve", "resume_fields", "run_meta", "save", "shared_verdict", "step_of",
           "verify", "verify_all"]
