#!/usr/bin/env bash
# Rewrite sections of bench/gates.json where CI measures them: clean clones of HEAD, each with a .venv of
# its own (scripts/setup.sh, the extras scripts/test.sh installs); the instructions are each scenario's
# median over the clones, the other sections the first clone's (counts and sass are exact; the ratios,
# timings, are best rewritten on a quiet machine: python -m bench.gates update --only ratios). Each clone lies at another path,
# and the paths move the heap's layout: the same commit counted up to 1.8% apart on a scenario from one
# clone to the next (2026-11-29), 1.9% in the working tree's own .venv, so one run's figure can sit at
# one end of the spread CI then draws from.
# Usage: bash scripts/gates_update.sh [SECTIONS] [CLONES]   (a comma list, as `python -m bench.gates update
# --only`, default instructions; CLONES default 3, about 2 minutes each on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
sections=${1:-instructions}
clones=${2:-3}
if ! git diff --quiet HEAD -- bench/gates.json; then
  echo "gates_update: bench/gates.json has changes not committed: commit or drop them first" >&2
  exit 2
fi
git diff --quiet HEAD || echo "gates_update: changes not committed are not measured (the clones are HEAD, $(git rev-parse --short HEAD))" >&2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for i in $(seq "$clones"); do
  d=$(mktemp -d -p "$tmp")
  git clone -q . "$d/p"
  (
    cd "$d/p"
    unset PYTHONDONTWRITEBYTECODE                 # as scripts/test.sh runs
    bash scripts/setup.sh dev,cuda,bench,distributed,docs,torchtitan >"$d/setup.log" 2>&1 ||
      { cat "$d/setup.log"; exit 1; }
    echo "gates_update: clone $i of $clones ($d/p)"
    .venv/bin/python -m bench.gates update --only "$sections"
  )
  cp "$d/p/bench/gates.json" "$tmp/gates-$i.json"
  mkdir -p bench/out
  cp "$d/p"/bench/out/gates-*.json bench/out/
  rm -rf "$d"
done
python3 - "$tmp" "$clones" <<'PY'
import json, sys
sys.path.insert(0, ".")
from bench.gates.record import clones_median
tmp, n = sys.argv[1], int(sys.argv[2])
out, notes = clones_median([json.load(open(f"{tmp}/gates-{i}.json")) for i in range(1, n + 1)])
for line in notes:
    print(f"gates_update: {line}")
open("bench/gates.json", "w").write(json.dumps(out, indent=1, sort_keys=True) + "\n")
PY
echo "gates_update: bench/gates.json written from $clones clean clone(s) of $(git rev-parse --short HEAD) ($sections)"
