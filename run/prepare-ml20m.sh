#!/usr/bin/env bash
# Check (and if needed unpack) MovieLens-20M where the `ml20m` reader looks for it. Nothing is downloaded.
#
#   usage: run/prepare-ml20m.sh [DATA_ROOT]
#
# DATA_ROOT defaults to data_root of the per-host file .config_<hostname>.yml (the same setting that
# `data.root` falls back to in a recipe). The reader reads exactly one file:
#
#   DATA_ROOT/ml-20m/ratings.csv     header "userId,movieId,rating,timestamp", 20,000,263 ratings
#
# Get ml-20m.zip (about 190 MB) from https://grouplens.org/datasets/movielens/20m/ on a machine with
# internet and copy it to DATA_ROOT/ml-20m.zip (this script unpacks it) or unzip it there yourself:
#   unzip ml-20m.zip -d DATA_ROOT
# Preprocessing (leave-one-out split, negatives) happens in the reader at start-up; see
# ds_ext/data/movielens.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

ROOT=${1:-}
if [ -z "$ROOT" ]; then
  ROOT=$("$PY" -c 'from ds_ext.trainer.recipe import find_host_config, load_host_config
print(load_host_config(find_host_config()).data_root or "")')
fi
if [ -z "$ROOT" ]; then
  echo "prepare-ml20m: no data root. Pass one (run/prepare-ml20m.sh /path/to/data) or set data_root in" \
       ".config_$(hostname).yml" >&2
  exit 2
fi

CSV="$ROOT/ml-20m/ratings.csv"
ZIP="$ROOT/ml-20m.zip"
if [ ! -f "$CSV" ] && [ -f "$ZIP" ]; then
  echo "prepare-ml20m: unpacking $ZIP into $ROOT"
  "$PY" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("ml-20m/ratings.csv", sys.argv[2])' "$ZIP" "$ROOT"
fi
if [ ! -f "$CSV" ]; then
  cat >&2 <<EOF
prepare-ml20m: missing $CSV
  Download ml-20m.zip from https://grouplens.org/datasets/movielens/20m/ (no download happens here),
  copy it to $ZIP and rerun this script, or run: unzip ml-20m.zip -d $ROOT
EOF
  exit 1
fi

HEADER=$(head -n 1 "$CSV" | tr -d '\r')
if [ "$HEADER" != "userId,movieId,rating,timestamp" ]; then
  echo "prepare-ml20m: $CSV starts with '$HEADER', expected 'userId,movieId,rating,timestamp'" >&2
  exit 1
fi
LINES=$(wc -l < "$CSV")
RATINGS=$((LINES - 1))
if [ "$RATINGS" -ne 20000263 ]; then
  echo "prepare-ml20m: warning: $RATINGS ratings in $CSV; the full MovieLens-20M has 20000263" \
       "(a subset works, but the model's num_users/num_items defaults assume the full set)" >&2
fi
echo "prepare-ml20m: OK: $CSV ($RATINGS ratings). Use data: {name: ml20m} with data.root=$ROOT."
