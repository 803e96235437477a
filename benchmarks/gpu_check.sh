#!/usr/bin/env bash
# One command for the GPU machine: per-variant correctness + timing (`tune`, each in its
# own process under a timeout, so a hang costs one variant), then the timing table of the
# best correct variant (or BEST=<name>), then the GPU tests. Variants that did not finish leave
# their PTX / ptxas output / SASS in $OUT/kernel_dumps.tgz.
#   bash benchmarks/gpu_check.sh            (from the repository root)
#   VARIANTS="ws ws_np" BEST=ws PYTEST=0 bash benchmarks/gpu_check.sh
set -uo pipefail
export PYTHONPATH="${PYTHONPATH:-}:." PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
O="${OUT:-/tmp}"
LOG="$O/gpu_check.log"
VARIANTS="${VARIANTS:-v1 v1_mf ws_mf ws ws_np}"
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv || true
  timeout 60 "$PY" benchmarks/kernels.py info probe || echo "probe exited $?"
  rm -f "$O/tune.jsonl"
  for v in $VARIANTS; do
    timeout "${TUNE_TIMEOUT:-90}" "$PY" benchmarks/kernels.py tune --variant "$v" --iters 20 \
      --jsonl "$O/tune.jsonl" || echo "TUNE $v exited $?"
  done
  # PTX / ptxas / SASS of every variant that did not finish its tune (for ptxas/nvdisasm here)
  for v in $VARIANTS; do
    grep -q "\"name\": \"$v\"" "$O/tune.jsonl" 2>/dev/null && continue
    mkdir -p "/tmp/kdump/$v"
    MOSAIC_GPU_DUMP_TO="/tmp/kdump/$v" timeout "${DUMP_TIMEOUT:-60}" "$PY" benchmarks/dump_ptx.py "$v" \
      || echo "dump_ptx $v exited $?"
  done
  [ -d /tmp/kdump ] && tar czf "$O/kernel_dumps.tgz" --exclude='*mlir-passes*' -C /tmp kdump
  best="${BEST:-$("$PY" benchmarks/kernels.py pick --jsonl "$O/tune.jsonl" 2>/dev/null || echo v1)}"
  echo "BEST=$best"
  timeout "${BENCH_TIMEOUT:-200}" "$PY" benchmarks/kernels.py bench layer --variant "$best" \
    --iters 20 --md "$O/kernels_table.md" ${BENCH_ARGS:-} || echo "bench exited $?"
  # cuSPARSELt backend: build (or .cusparselt-prebuilt/, carried), correctness, timings, table
  timeout "${CUSPARSELT_TIMEOUT:-240}" "$PY" benchmarks/gpu_cusparselt.py "$O/cusparselt.jsonl" --table "$O/cusparselt_speedups.json" --md "$O/cusparselt_table.md" --prebuilt .cusparselt-prebuilt/libnmjax_cusparselt.so ${CUSPARSELT_ARGS:-} || echo "gpu_cusparselt exited $?"
  if [ "${PYTEST:-1}" = 1 ]; then
    timeout "${PYTEST_TIMEOUT:-150}" "$PY" -m pytest -q -m gpu tests/test_kernels.py 2>&1 | tail -n 15
  fi
  echo "elapsed ${SECONDS}s"
} 2>&1 | tee "$LOG"
