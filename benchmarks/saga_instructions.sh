#!/usr/bin/env bash
# Instructions per cancellation saga, counted by callgrind around the timed loop only: a
# figure that does not move with the machine's load (repeatable to 0.02% for the sequential
# saga), for comparing two trees. Needs valgrind (Debian `valgrind`).
# usage: benchmarks/saga_instructions.sh [REPO] MODE WHAT [N]
#   REPO: a checkout with its .venv (default: this one); MODE: checkpoint | sign-each;
#   WHAT: flow (sequential FlowRunner.start) | async (all at once) | raw (the raw writer)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ -d "${1:-}" ]; then repo=$(cd "$1" && pwd); shift; else repo=$(dirname "$here"); fi
mode=$1; what=$2; n=${3:-40}
out=$(mktemp /tmp/saga-ic.XXXXXX)
trap 'rm -f "$out" "$out".err "$out".cg*' EXIT
IC_UNDER_VALGRIND=1 valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out.cg" \
  "$repo/.venv/bin/python" "$here/saga_instructions.py" "$repo" "$mode" "$what" "$n" \
  2> "$out.err" >/dev/null
total=$(grep -E "Collected : " "$out.err" | awk '{print $NF}')
python3 -c "print(f'$what $mode: {$total / $n / 1e6:.3f} M instructions per saga ($n sagas, $repo)')"
