import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Multi-process tests run on CPU with gloo through DeepSpeed's CPU accelerator, GPU or not.
os.environ["DS_ACCELERATOR"] = os.environ.get("DS_EXT_TEST_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# no curves.png at the end of every trainer run (~1 s of CPU each for matplotlib); tests/e2e/test_run_dirs.py turns it on
os.environ.setdefault("DS_EXT_CURVES", "0")
# JIT builds in the venv's own torch extensions directory, as run/env.sh sets for the run scripts (a build killed
# in one venv never blocks another); an explicit TORCH_EXTENSIONS_DIR wins.
if sys.prefix != sys.base_prefix:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


@pytest.fixture
def host(tmp_path):
    """An empty per-host file with log_root in the test's directory (no .config_<hostname>.yml leaks in)."""
    import yaml

    p = tmp_path / "host.yml"
    p.write_text(yaml.safe_dump({"log_root": str(tmp_path / "logs")}))
    return str(p)


def pytest_sessionfinish(session, exitstatus):
    """Stop the rank pools of tests/harness.py (``run_pooled``) that this session started."""
    harness = sys.modules.get("tests.harness")
    if harness is not None:
        harness.close_pools()
