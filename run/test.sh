#!/usr/bin/env bash
# Install (if needed), then run the test suite.
#   bash run/test.sh            # fast default (slow cases skipped)
#   bash run/test.sh --slow     # everything
#   bash run/test.sh -k recipe  # extra arguments go to pytest
#   bash run/test.sh tests/unit # one tier: tests/unit (in-process), tests/dist (gloo ranks), tests/e2e
# The 25 slowest tests are printed at the end (--durations=25; a later --durations=N overrides it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$(bash "$ROOT/run/setup.sh" | tail -n 1)"
cd "$ROOT"
source "$ROOT/run/env.sh"
args=()
marker=(-m "not slow")
for a in "$@"; do
  if [ "$a" = "--slow" ]; then marker=(); else args+=("$a"); fi
done
exec "$PY" -m pytest "${marker[@]}" --durations=25 "${args[@]}"
