"""The code blocks of README.md and docs/ that are meant to be run, run as written.

A block is marked by an HTML comment on the line before its fence (invisible on a rendered page):

    <!-- test: bash -->            bash -e, in a fresh directory
    <!-- test: launch -->          a Python file run by the deepspeed launcher on 2 processes (--num_gpus 2)
    <!-- test: python -->          a Python file run by the interpreter, one process
    ... slow                       only in the slow suite
    ... expect=TEXT                the output must contain TEXT (e.g. proof that a method compressed)
    <!-- test: skip REASON -->     deliberately not run here (e.g. a pip install; REASON says what covers it)

Every block runs on CPU (``DS_ACCELERATOR=cpu``, ``OMP_NUM_THREADS=1``, as the README's CPU line says) in its own
temporary directory, with the venv's ``bin`` on ``PATH`` (last: a ``ninja`` found earlier stays the one that builds
the shared torch extensions, see docs/guide/troubleshooting.md) and this checkout on ``PYTHONPATH``. The only thing
added to a block is a free port: ``deepspeed`` and ``accelerate`` on ``PATH`` are two-line wrappers that put
``--master_port`` / ``--main_process_port`` before the block's own arguments, so that runs beside each other do not
meet on the launchers' default port 29500. One launch per block; the README's quick starts stay in the fast suite.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import pytest

from tests.harness import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MARK = re.compile(r"^<!--\s*test:\s*(?P<spec>.*?)\s*-->\s*$")
MODES = ("bash", "launch", "python", "skip")
TIMEOUT = 600


@dataclass
class Snippet:
    name: str  # FILE:LINE of the fence
    mode: str
    code: str
    slow: bool = False
    expect: List[str] = field(default_factory=list)


def doc_files() -> List[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))


def parse(path: Path, root: Path = ROOT) -> List[Snippet]:
    """Every marked block of one Markdown file. A mark must sit right above a fence; a bad mark is an error."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for i, ln in enumerate(lines):
        m = MARK.match(ln)
        if not m:
            continue
        words = shlex.split(m["spec"])
        where = f"{path.relative_to(root).as_posix()}:{i + 1}"
        assert words and words[0] in MODES, f"{where}: test mark needs a mode of {MODES}: {ln!r}"
        assert i + 1 < len(lines) and lines[i + 1].startswith("```"), f"{where}: a test mark must precede a fence"
        end = next((j for j in range(i + 2, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{where}: the fence never closes"
        s = Snippet(f"{path.relative_to(root).as_posix()}:{i + 2}", words[0], "\n".join(lines[i + 2:end]) + "\n")
        if s.mode == "skip":
            assert len(words) > 1, f"{where}: 'skip' needs a reason"
            out.append(s)
            continue
        for w in words[1:]:
            if w == "slow":
                s.slow = True
            elif w.startswith("expect="):
                s.expect.append(w[len("expect="):])
            else:
                raise AssertionError(f"{where}: unknown word {w!r} in the test mark")
        out.append(s)
    return out


MARKED = [s for f in doc_files() for s in parse(f)]
SNIPPETS = [s for s in MARKED if s.mode != "skip"]


def _wrappers(d: Path, port: int) -> Path:
    """``d/bin`` with ``deepspeed`` and ``accelerate`` wrappers that add a free port to the real commands, and
    ``python`` / ``python3`` as this suite's interpreter."""
    b = d / "bin"
    b.mkdir()
    (b / "deepspeed").write_text(f'#!/usr/bin/env bash\nexec "{BIN}/deepspeed" --master_port {port} "$@"\n')
    (b / "accelerate").write_text(
        f'#!/usr/bin/env bash\nif [ "${{1:-}}" = launch ]; then shift; exec "{BIN}/accelerate" launch '
        f'--main_process_port {port} "$@"; fi\nexec "{BIN}/accelerate" "$@"\n')
    for name in ("python", "python3"):  # the interpreter of this suite, whatever else PATH holds
        (b / name).write_text(f'#!/usr/bin/env bash\nexec "{sys.executable}" "$@"\n')
    for f in b.iterdir():
        f.chmod(0o755)
    return b


def run_snippet(s: Snippet, work: Path) -> subprocess.CompletedProcess:
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    wrappers = _wrappers(work, port)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               PATH=os.pathsep.join([str(wrappers), os.environ.get("PATH", ""), str(BIN)]),
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    if s.mode == "bash":
        cmd = ["bash", "-e", "-o", "pipefail", "-c", s.code]
    else:
        script = work / "snippet.py"
        script.write_text(s.code)
        cmd = ([str(wrappers / "deepspeed"), "--num_gpus", "2", str(script)] if s.mode == "launch"
               else [sys.executable, str(script)])
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.mark.parametrize("snippet", [pytest.param(s, id=s.name, marks=[pytest.mark.slow] if s.slow else [])
                                     for s in SNIPPETS])
def test_snippet_runs_as_written(snippet: Snippet, tmp_path):
    r = run_snippet(snippet, tmp_path / "work")
    text = r.stdout + r.stderr
    assert r.returncode == 0, f"{snippet.name} ({snippet.mode}) exited {r.returncode}:\n{text[-6000:]}"
    for want in snippet.expect:
        assert want in text, f"{snippet.name}: {want!r} not in the output:\n{text[-6000:]}"


def test_every_docs_code_block_is_marked():
    """Every Python and shell block of docs/ (design notes aside) carries a test mark: run, or skipped with the
    reason. Transcripts (``$`` prompts and output) use a ``console`` or ``text`` fence instead."""
    unmarked = []
    for f in sorted((ROOT / "docs").rglob("*.md")):
        if "notes" in f.relative_to(ROOT / "docs").parts:
            continue
        lines = f.read_text(encoding="utf-8").splitlines()
        inside = False
        for i, ln in enumerate(lines):
            if ln.startswith("```"):
                if not inside and re.match(r"^```(python|bash|sh)\b", ln) and not (i and MARK.match(lines[i - 1])):
                    unmarked.append(f"{f.relative_to(ROOT)}:{i + 1}")
                inside = not inside
    assert unmarked == [], "code blocks without a test mark (<!-- test: MODE --> or <!-- test: skip REASON -->): " + \
        ", ".join(unmarked)


def test_every_readme_code_block_is_run_and_fast():
    """README.md's Python and shell blocks are all marked (the first block, the two repository commands, is run by
    CI itself), and none is slow: the three quick starts stay in the fast suite."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    fences = [i for i, ln in enumerate(lines) if re.match(r"^```(python|bash|sh)\b", ln)]
    unmarked = [i + 1 for i in fences[1:] if not MARK.match(lines[i - 1])]
    assert unmarked == [], f"README.md: code blocks without a test mark at lines {unmarked}"
    readme = [s for s in SNIPPETS if s.name.startswith("README.md:")]
    assert len(readme) >= 3 and not any(s.slow for s in readme), [s.name for s in readme]
    assert {s.mode for s in readme} >= {"bash", "launch"}


def test_the_readme_starts_with_the_two_commands():
    first = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()[:4]
    assert first[0] == "```bash" and first[3] == "```", first
    assert first[1].startswith("bash run/quickstart.sh ") and first[2].startswith("bash run/test.sh "), first


def test_marks_are_parsed(tmp_path):
    """The parser finds a marked block with its options, and refuses a mark that is not above a fence."""
    good = tmp_path / "good.md"
    good.write_text("text\n<!-- test: launch slow expect=powersgd_p -->\n```python\nprint(1)\n```\n```bash\nx\n```\n")
    (s,) = parse(good, tmp_path)
    assert (s.name, s.mode, s.slow, s.expect, s.code) == ("good.md:3", "launch", True, ["powersgd_p"], "print(1)\n")
    bad = tmp_path / "bad.md"
    bad.write_text("<!-- test: bash -->\n\n```bash\nx\n```\n")
    with pytest.raises(AssertionError, match="must precede a fence"):
        parse(bad, tmp_path)


def test_cpu_state_without_a_launcher_says_how_to_launch(monkeypatch):
    """In-process: with the launcher's variables missing, ``cpu_deepspeed_state`` raises one line naming both
    launch commands before Accelerate is asked for a process group (torch's "Default process group has not been
    initialized" before)."""
    pytest.importorskip("accelerate")
    import ds_ext.hf

    for k in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(RuntimeError) as e:
        ds_ext.hf.cpu_deepspeed_state()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("ds_ext.hf.cpu_deepspeed_state: LOCAL_RANK/WORLD_SIZE unset"), msg
    assert "`deepspeed --num_gpus N script.py`" in msg and "`accelerate launch --use_deepspeed --num_processes N" in msg
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(RuntimeError, match="WORLD_SIZE unset"):
        ds_ext.hf.cpu_deepspeed_state()


@pytest.mark.slow
def test_plain_accelerate_launch_on_cpu_says_how_to_launch(tmp_path):
    """``accelerate launch`` without ``--use_deepspeed`` starts one process without the launcher's environment on
    CPU: the example stops with ``cpu_deepspeed_state``'s one line naming both launch commands, without a traceback
    of its own (accelerate's launcher then prints its own ``CalledProcessError`` for any child's non-zero exit)."""
    pytest.importorskip("accelerate")
    s = Snippet("plain accelerate", "bash", "accelerate launch --num_processes 2 -m ds_ext.examples.hf_trainer --steps 2\n")
    r = run_snippet(s, tmp_path / "work")
    text = r.stdout + r.stderr
    assert r.returncode != 0, text[-3000:]
    line = next((ln for ln in text.splitlines() if "cpu_deepspeed_state" in ln), "")
    assert line.startswith("error: ds_ext.hf.cpu_deepspeed_state: LOCAL_RANK/WORLD_SIZE unset"), text[-3000:]
    assert "`deepspeed --num_gpus N script.py`" in line and "`accelerate launch --use_deepspeed" in line, line
    assert "ds_ext/" not in "".join(ln for ln in text.splitlines() if ln.lstrip().startswith('File "')), text[-3000:]


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
IN_HOUSE = re.compile(r"\bissue \d|\bthe seed\b|\bseed's\b|\bround \d|\bour machines\b", re.I)


def _prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return "\n".join(ln for i, ln in enumerate(re.split(r"^```.*$", text, flags=re.M)) if i % 2 == 0)


def test_links_resolve_and_no_in_house_words():
    """Every relative link of README.md and docs/ names a file or folder that exists (anchors aside), and the text
    speaks of the reference code and of files, not of this project's own history ("issue 19", "the seed")."""
    problems = []
    for f in doc_files():
        text = f.read_text(encoding="utf-8")
        for target in LINK.findall(_prose(text)):
            path = target.split("#", 1)[0]
            if not path or re.match(r"^[a-z]+:", path):
                continue
            if not (f.parent / path).exists():
                problems.append(f"{f.relative_to(ROOT)}: link to {target} (missing)")
        for m in IN_HOUSE.finditer(text):
            problems.append(f"{f.relative_to(ROOT)}: in-house wording {m.group(0)!r}")
    assert problems == [], "\n".join(problems)
