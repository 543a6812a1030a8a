import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Multi-process tests run on CPU with gloo through DeepSpeed's CPU accelerator, GPU or not.
os.environ["DS_ACCELERATOR"] = os.environ.get("DS_EXT_TEST_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


def pytest_sessionfinish(session, exitstatus):
    """Stop the rank pools of tests/harness.py (``run_pooled``) that this session started."""
    harness = sys.modules.get("tests.harness")
    if harness is not None:
        harness.close_pools()
