#!/usr/bin/env bash
# The GPU check (issue 25): the figures a first lent GPU node must give, each against a threshold,
# in at most 8 minutes on one H100; the phases, their time limits and thresholds are in the
# docstring of benchmarks/gpu_check.py (python -m tokenmill.benchmarks.gpu_check --help).
#   bash scripts/gpu_check.sh [OUT] [--dry-run] [--phases=vqgan,prior]
# OUT (default runs/gpu_check) receives gpu_check.json, gpu_table.md (the GPU results table,
# rendered from the JSON) and logs/. Exit code 0: every phase ran and every threshold held;
# otherwise the OR of the failed phases' bits (the JSON's "failed" names them); 2: no CUDA device.
# --dry-run runs every phase at toy sizes on the CPU (thresholds not enforced): it proves the
# script, the JSON and the table without a GPU; its numbers are not GPU numbers.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=runs/gpu_check
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then OUT=$1; shift; fi
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi
export RAY_USAGE_STATS_ENABLED=0 RAY_DATA_DISABLE_PROGRESS_BARS=1
mkdir -p "$OUT"
exec "$PY" -m tokenmill.benchmarks.gpu_check --out "$OUT" "$@"
