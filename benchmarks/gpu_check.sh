#!/usr/bin/env bash
# The one GPU run of the 2:4 kernels (issue 20), at most BUDGET seconds (default 400: under
# 7 minutes with start-up), steps in this order, each under a hard time limit:
#
#   step                                            limit  what comes out
#   t=0 cuSPARSELt handler build, in the background     -  (its log folds into gpu_check.log)
#   0 info: nvidia-smi, jax / torch / cuSPARSELt,      15  gpu_check.log
#     the device kind the table steps use
#   1 metadata-layout probe (each metadata read path;   45  results.jsonl (step "probe")
#     the decoded 64x8 slot map when it differs)
#   2 correctness of every variant on 2 shapes (v1,    120  results.jsonl ("check"; "diag":
#     ws64, ws first; the clusters, ws_pt, ws_mc last)      error map of a failed check;
#     and, as separate items, its rank timing at            "rank")
#     8192x8192x7680
#   3 GEMM TFLOP/s: per shape the 3 fastest correct     85  results.jsonl ("gemm")
#     variants that tile it, on 8192^3, 4096^3 and the
#     MLP shapes, beside dense XLA, torch dense, torch
#     cuSPARSELt and CUTLASS (same process)
#   4 table (JAX on the CPU): measured.json for the     10  measured.json, kernels.md
#     "auto" dispatch
#   5 nm_dense fwd+bwd vs dense; pack costs             50  results.jsonl ("layer")
#   6 cuSPARSELt backend: correctness, GEMMs, then      60  results.jsonl ("cusparselt ..."),
#     nm_dense vs dense XLA and Pallas (--quick)            cusparselt_speedups.json,
#                                                           cusparselt_table.md
#   7 transposable solvers at 8192^2 (2:4, 4:8, 8:16)   30  masks_gpu.md
#   7b a refresh at 4096x11008 and 8192x28672 (N:M,     40  masks_gpu.md (appended)
#     exact24, exact 4:8, Bi-Mask masks and search)
#     beside one dense training step of the layer
#   8 final table (JAX on the CPU)                      10  kernels.md, measured.json
#   9 pytest -m gpu, only with >= 90 s left            rest
#
# $OUT gets 7 files (the device tool brings back 8 at most: one stays free for a diagnostic);
# scratch goes to a temporary folder. Python steps append JSON lines as they go and, when one
# item hangs (a per-item watchdog, 20-30 s, ends the process), restart with --resume past it.
# The table is regenerated from the JSON lines, never edited by hand: $OUT/kernels.md ->
# benchmarks/results/kernels.md and $OUT/measured.json -> nmjax/kernels/measured.json (also
# copied there in this tree).
#
#   bash benchmarks/gpu_check.sh                   (repository root, on an sm_90 GPU)
#   SMOKE=1 OUT=/tmp/smoke bash benchmarks/gpu_check.sh   (CPU: the script itself, emulated
#     kernels in interpret mode on small shapes; nothing in the tree is written. The Python
#     steps' limits and the budget are SMOKE_SCALE (3) times longer, and the check of
#     SMOKE_FAULT (v1_mf) compares against a wrong reference, to run the error map.)
#
# A carried .cusparselt-prebuilt/libnmjax_cusparselt.so is used (NMJAX_CUSPARSELT_LIBRARY)
# only if the background build fails.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# torch allocates beside JAX in the same process: no 75% preallocation by JAX.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}"
PY="${PYTHON:-python3}"
O="${OUT:-/tmp/gpu_check}"
mkdir -p "$O"
T="$(mktemp -d)"  # scratch: not in $OUT, so it does not come back
S=1  # the Python steps' limits, times S
if [ "${SMOKE:-0}" = 1 ]; then S="${SMOKE_SCALE:-3}"; fi
BUDGET="${BUDGET:-$(( 400 * S ))}"
J="$O/results.jsonl"
CMD="bash benchmarks/gpu_check.sh"
MEASURED="nmjax/kernels/measured.json"
RESULTS_MD="benchmarks/results/kernels.md"
PREBUILT=".cusparselt-prebuilt/libnmjax_cusparselt.so"
EXTRA=()
SEL=()  # VARIANTS="a b": probe and check only these
if [ -n "${VARIANTS:-}" ]; then read -ra SEL <<<"$VARIANTS"; SEL=(--variants "${SEL[@]}"); fi
if [ "${SMOKE:-0}" = 1 ]; then  # CPU test of this script: nothing in the tree is written
  EXTRA=(--smoke --fault "${SMOKE_FAULT-v1_mf}"); CMD="SMOKE=1 $CMD"
  SMOKE_MASKS=(--allow-cpu --shrink 32)
  cp "$MEASURED" "$T/measured_in.json"; MEASURED="$T/measured_in.json"; RESULTS_MD="$T/kernels.md"
fi
K=("$PY" benchmarks/kernels.py)

# t = 0: the cuSPARSELt handler library, built on idle cores while the kernels run (the
# build takes a file lock, so step 6 waits for it rather than building twice).
(
  JAX_PLATFORMS=cpu timeout 300 "$PY" -m nmjax.kernels.cusparselt build >"$T/cslt_build.log" 2>&1 &
  echo $! >"$T/cslt_build.pid"
  wait $!
  echo $? >"$T/cslt_build.rc"
) >/dev/null 2>&1 &
BUILD_PID=$!

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

# table NAME: the markdown and measured tables from the JSON lines, with JAX on the CPU (no
# CUDA start-up inside the 10 s) and the device kind step 0 read from the GPU.
table() {
  local kind
  kind="$(cat "$T/kind" 2>/dev/null)"
  if [ -n "$kind" ]; then
    step "$1" 10 env JAX_PLATFORMS=cpu "${K[@]}" table --inputs "$J" --md "$O/kernels.md" \
      --measured "$MEASURED" --command "$CMD" --device "$kind"
  else  # step 0 found no device kind: the table asks the device itself
    step "$1" 10 "${K[@]}" table --inputs "$J" --md "$O/kernels.md" --measured "$MEASURED" \
      --command "$CMD"
  fi
  cp "$MEASURED" "$O/measured.json" 2>/dev/null
  [ -f "$O/kernels.md" ] && cp "$O/kernels.md" "$RESULTS_MD"
}

# cusparselt_env: after the background build (waited for up to 30 s), the environment step 6
# runs in: the carried prebuilt library only if the build failed.
cusparselt_env() {
  local end=$(( SECONDS + 30 ))
  while kill -0 "$BUILD_PID" 2>/dev/null && (( SECONDS < end )); do sleep 1; done
  echo "== cuSPARSELt build (background, exit $(cat "$T/cslt_build.rc" 2>/dev/null || \
    echo 'still running')):"
  cat "$T/cslt_build.log" 2>/dev/null
  CSLT_ENV=()
  if [ "$(cat "$T/cslt_build.rc" 2>/dev/null)" != 0 ] && [ -f "$PREBUILT" ]; then
    echo "== cuSPARSELt: using the carried $PREBUILT"
    CSLT_ENV=("NMJAX_CUSPARSELT_LIBRARY=$PWD/$PREBUILT")
  fi
}

{
  echo "gpu_check: $(date -u +%FT%TZ), budget ${BUDGET}s, out $O"
  step "0 info" 15 bash -c "nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm \
    --format=csv; $PY -c 'import sys, jax; d = jax.devices()[0]; \
    print(\"jax\", jax.__version__, jax.devices()); \
    open(sys.argv[1], \"w\").write(getattr(d, \"device_kind\", d.platform))' '$T/kind'; \
    $PY -c 'import torch; print(\"torch\", torch.__version__, torch.version.cuda, \
    \"cusparselt\", torch.backends.cusparselt.version())'"
  echo "device kind: $(cat "$T/kind" 2>/dev/null || echo '(unknown)')"
  resumable "1 probe" $(( 45 * S )) probe --item-timeout $(( 20 * S )) "${SEL[@]}"
  resumable "2 check" $(( 120 * S )) check --item-timeout $(( 25 * S )) "${SEL[@]}"
  resumable "3 gemm" $(( 85 * S )) bench --check-jsonl "$J" --top 3 --item-timeout $(( 30 * S ))
  table "4 table (for the dispatch)"
  resumable "5 layer" $(( 50 * S )) layer --item-timeout $(( 25 * S ))

  # 6 the cuSPARSELt backend: correctness against the reference, its GEMMs (the speedup
  # table), then nm_dense vs dense XLA and Pallas. --quick fits the shared budget;
  # CUSPARSELT_ARGS= and a larger CUSPARSELT_TIMEOUT for more.
  if [ -f benchmarks/gpu_cusparselt.py ]; then
    cusparselt_env
    step "6 cusparselt" "${CUSPARSELT_TIMEOUT:-60}" env "${CSLT_ENV[@]}" "$PY" \
      benchmarks/gpu_cusparselt.py "$J" --append --table "$O/cusparselt_speedups.json" \
      --md "$O/cusparselt_table.md" --prebuilt "$PREBUILT" ${CUSPARSELT_ARGS---quick}
  else
    echo "== 6 cusparselt: benchmarks/gpu_cusparselt.py not in this tree"
  fi
  # 7 the transposable solvers at 8192^2 (2:4, 4:8, 8:16) on the GPU, then the refresh
  # at LLM layer shapes against a dense training step (issue 22); rows are written as they
  # finish (1 file).
  if [ -f benchmarks/gpu_masks.py ]; then
    step "7 masks" "${MASKS_TIMEOUT:-30}" "$PY" benchmarks/gpu_masks.py "$O/masks_gpu.md" \
      --budget 4 --repeats 3 --parts square ${SMOKE_MASKS[@]+"${SMOKE_MASKS[@]}"}
    step "7b masks at LLM shapes" "${MASKS_LLM_TIMEOUT:-40}" "$PY" benchmarks/gpu_masks.py \
      "$O/masks_gpu.md" --append --budget 3 --repeats 3 --parts llm \
      ${SMOKE_MASKS[@]+"${SMOKE_MASKS[@]}"}
  else
    echo "== 7 masks: placeholder (benchmarks/gpu_masks.py not in this tree)"
  fi

  table "8 table"
  if (( BUDGET - SECONDS >= 90 )) && [ "${SMOKE:-0}" != 1 ]; then
    step "9 pytest -m gpu" $(( BUDGET - SECONDS - 10 )) "$PY" -m pytest -q -x -m gpu \
      tests/test_kernels.py -p no:cacheprovider
  fi
  kill -0 "$BUILD_PID" 2>/dev/null && kill "$(cat "$T/cslt_build.pid")" 2>/dev/null
  echo "gpu_check: done in ${SECONDS}s; $O holds $(find "$O" -maxdepth 1 -type f | wc -l) files:" \
    "$(cd "$O" && ls | tr '\n' ' ')"
} 2>&1 | tee "$O/gpu_check.log"
rm -rf "$T"
