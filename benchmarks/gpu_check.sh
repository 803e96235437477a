#!/usr/bin/env bash
# The one GPU run of the 2:4 kernels (issue 11), at most BUDGET seconds (default 400: under
# 7 minutes with start-up), steps in this order, each under a hard time limit:
#
#   step                                            limit  what comes out
#   0 info: nvidia-smi, jax / torch / cuSPARSELt        15  gpu_check.log
#   1 metadata-layout probe (each metadata read path)  45  results.jsonl (step "probe")
#   2 correctness of every variant, 4 shapes, + a      120  results.jsonl ("check")
#     rank timing at 8192x8192x7680
#   3 GEMM TFLOP/s: the 3 best variants on 8192^3,      85  results.jsonl ("gemm")
#     4096^3 and the MLP shapes, beside dense XLA,
#     torch dense, torch cuSPARSELt and CUTLASS
#     (same process)
#   4 table: measured.json for the "auto" dispatch      10  measured.json, kernels.md
#   5 nm_dense fwd+bwd vs dense; pack costs             50  results.jsonl ("layer")
#   6 cuSPARSELt backend: correctness, products and    60  cusparselt_table.md,
#     nm_dense vs dense XLA and Pallas (--quick)            cusparselt_speedups.json
#   7 transposable solvers at 8192^2 (2:4, 4:8, 8:16)   30  masks_gpu.md
#   8 final table                                       10  kernels.md, measured.json
#   9 pytest -m gpu, only with >= 90 s left            rest
#
# Python steps append JSON lines as they go and, when one item hangs (a per-item watchdog ends
# the process), restart with --resume past it. The table is regenerated from the JSON lines,
# never edited by hand: $OUT/kernels.md -> benchmarks/results/kernels.md and
# $OUT/measured.json -> nmjax/kernels/measured.json (also copied there in this tree).
#
#   bash benchmarks/gpu_check.sh                   (repository root, on an sm_90 GPU)
#   SMOKE=1 OUT=/tmp/smoke bash benchmarks/gpu_check.sh   (CPU: the script itself, emulated)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# torch allocates beside JAX in the same process: no 75% preallocation by JAX.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}"
PY="${PYTHON:-python3}"
O="${OUT:-/tmp/gpu_check}"
mkdir -p "$O"
BUDGET="${BUDGET:-400}"
J="$O/results.jsonl"
CMD="bash benchmarks/gpu_check.sh"
MEASURED="nmjax/kernels/measured.json"
RESULTS_MD="benchmarks/results/kernels.md"
EXTRA=()
SEL=()  # VARIANTS="a b": probe and check only these
if [ -n "${VARIANTS:-}" ]; then read -ra SEL <<<"$VARIANTS"; SEL=(--variants "${SEL[@]}"); fi
if [ "${SMOKE:-0}" = 1 ]; then  # CPU test of this script: nothing in the tree is written
  EXTRA=(--smoke); CMD="SMOKE=1 $CMD"
  cp "$MEASURED" "$O/measured_in.json"; MEASURED="$O/measured_in.json"; RESULTS_MD="$O/kernels_md.copy"
fi
K=("$PY" benchmarks/kernels.py)

# step NAME LIMIT CMD...: CMD under a hard limit of min(LIMIT, BUDGET - elapsed - 10) s
# (10 s stay for the final table); sets RC.
step() {
  local name=$1 want=$2; shift 2
  local left=$(( BUDGET - SECONDS - 10 ))
  local t=$(( want < left ? want : left ))
  if (( t < 5 )); then echo "== $name: skipped, no time left (${SECONDS}s)"; RC=124; return; fi
  echo "== $name: limit ${t}s, start ${SECONDS}s"
  timeout -k 5 "$t" "$@"
  RC=$?
  echo "== $name: exit $RC at ${SECONDS}s"
}

# resumable NAME LIMIT ARGS...: benchmarks/kernels.py ARGS --resume until it exits 0, its
# limit is spent, or 4 restarts (each after a watchdog ended a hung item).
resumable() {
  local name=$1 want=$2; shift 2
  local end=$(( SECONDS + want )) try
  for try in 1 2 3 4 5; do
    step "$name (run $try)" $(( end - SECONDS )) "${K[@]}" "$@" --jsonl "$J" --resume \
      "${EXTRA[@]}"
    if (( RC == 0 || RC == 124 || RC == 137 )); then return; fi
  done
}

table() {
  step "$1" 10 "${K[@]}" table --inputs "$J" --md "$O/kernels.md" --measured "$MEASURED" \
    --command "$CMD"
  cp "$MEASURED" "$O/measured.json" 2>/dev/null
  [ -f "$O/kernels.md" ] && cp "$O/kernels.md" "$RESULTS_MD"
}

{
  echo "gpu_check: $(date -u +%FT%TZ), budget ${BUDGET}s, out $O"
  step "0 info" 15 bash -c "nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm \
    --format=csv; $PY -c 'import jax; print(\"jax\", jax.__version__, jax.devices())'; \
    $PY -c 'import torch; print(\"torch\", torch.__version__, torch.version.cuda, \
    \"cusparselt\", torch.backends.cusparselt.version())'"
  resumable "1 probe" 45 probe --item-timeout 30 "${SEL[@]}"
  resumable "2 check" 120 check --item-timeout 40 "${SEL[@]}"
  resumable "3 gemm" 85 bench --check-jsonl "$J" --top 3 --item-timeout 45
  table "4 table (for the dispatch)"
  resumable "5 layer" 50 layer --item-timeout 30

  # 6 the cuSPARSELt backend: build (or the carried .cusparselt-prebuilt/), correctness
  # against the reference, products and nm_dense vs dense XLA and Pallas, its speedup table
  # (3 files). --quick fits the shared budget; CUSPARSELT_ARGS= and a larger limit for more.
  if [ -f benchmarks/gpu_cusparselt.py ]; then
    step "6 cusparselt" "${CUSPARSELT_TIMEOUT:-60}" "$PY" benchmarks/gpu_cusparselt.py \
      "$O/cusparselt.jsonl" --table "$O/cusparselt_speedups.json" \
      --md "$O/cusparselt_table.md" --prebuilt .cusparselt-prebuilt/libnmjax_cusparselt.so \
      ${CUSPARSELT_ARGS---quick}
  else
    echo "== 6 cusparselt: benchmarks/gpu_cusparselt.py not in this tree"
  fi
  # 7 the transposable solvers at 8192^2 (2:4, 4:8, 8:16) on the GPU (1 file).
  if [ -f benchmarks/gpu_masks.py ]; then
    step "7 masks" "${MASKS_TIMEOUT:-30}" "$PY" benchmarks/gpu_masks.py "$O/masks_gpu.md" \
      --budget 8 --repeats 5
  else
    echo "== 7 masks: placeholder (benchmarks/gpu_masks.py not in this tree)"
  fi

  table "8 table"
  if (( BUDGET - SECONDS >= 90 )) && [ "${SMOKE:-0}" != 1 ]; then
    step "9 pytest -m gpu" $(( BUDGET - SECONDS - 10 )) "$PY" -m pytest -q -x -m gpu \
      tests/test_kernels.py -p no:cacheprovider
  fi
  echo "gpu_check: done in ${SECONDS}s"
} 2>&1 | tee "$O/gpu_check.log"
