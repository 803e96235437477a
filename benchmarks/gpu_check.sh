#!/usr/bin/env bash
# One command for the GPU machine: kernel tests on the GPU, correctness over
# many shapes, the metadata-layout probe and the timing table.
#   bash benchmarks/gpu_check.sh            (from the repository root)
set -uo pipefail
export PYTHONPATH="${PYTHONPATH:-}:." PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
LOG="${OUT:-/tmp}/gpu_check.log"
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv || true
  "$PY" -m pytest -q -m gpu tests/test_kernels.py 2>&1 | tail -n 15
  "$PY" benchmarks/kernels.py info probe check
  "$PY" benchmarks/kernels.py bench layer --iters 30 --md "${OUT:-/tmp}/kernels_table.md" ${BENCH_ARGS:-}
} 2>&1 | tee "$LOG"
