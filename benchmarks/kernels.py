"""GPU checks and timings of the 2:4 sparse kernels (sm_90a), as resumable JSON lines.

Each subcommand appends one JSON record per item to ``--jsonl`` as soon as it has it, and with
``--resume`` skips the items a killed run already started (a hung kernel costs one item, not
the step): ``benchmarks/gpu_check.sh`` runs them in order under one time budget.

  probe   metadata-layout probe of each metadata read path (B = identity, C decoded); the
          decoded 64x8 slot map of every block that differs from the expected layout
  check   correctness of each variant (2 shapes, rel. error vs fp32 < 1e-2), then, as separate
          items, the error map of a failed check (per 64-row block and 128-column tile, NaN
          and unwritten counts with a poisoned output) and the variant's rank timing
  bench   GEMM TFLOP/s of the best variants beside dense XLA, torch dense (cuBLAS) and torch's
          2:4 GEMMs (cuSPARSELt, CUTLASS), in this process; the pack costs
  layer   nm_dense forward + backward vs dense, and the sparse products with static masks
  table   the markdown table (benchmarks/results/kernels.md) and the measured table the
          "auto" dispatch reads (nmjax/kernels/measured.json), from the JSON lines
  pack-cpu  CPU only: full pack vs values-only pack, a relative figure (not a GPU time)

Timing (every row, every framework): after a warm-up, ``--iters`` back-to-back calls, then one
device sync; the median of 5 such runs, per call. Random normal bf16 operands (never zeros),
magnitude 2:4 masks. TFLOP/s count the dense-equivalent ``2*M*N*K``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import faulthandler
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nmjax.kernels import (  # noqa: E402
    VARIANTS,
    Packed24,
    SparseMatmulConfig,
    pack_24,
    pack_weight_24,
    pack_weight_values_24,
    plan_weight_24,
    sparse_matmul_24,
)
from nmjax.masks import nm_mask  # noqa: E402

_NT = (((1,), (1,)), ((), ()))  # contract axis 1 of both: (N, K) x (M, K) -> (N, M)

# Every variant tiles both (M: 256, N: 256, K / 128 a multiple of 3 and 4); on 132 SMs each
# is multi-CTA with CTAs looping over 2 tiles, and 12 or 36 k-tiles per tile.
CHECK_SHAPES = [(4096, 2048, 1536), (2048, 4096, 4608)]
RANK_SHAPE = (8192, 8192, 7680)  # every variant tiles it (K / 128 = 60 steps: 3 and 4 divide)
ERR_TOL = 1e-2
POISON = float(jnp.finfo(jnp.bfloat16).min)  # what a diagnostic output holds where unwritten
BENCH_SHAPES = [  # (M, N, K) of the backend's GEMM: M = out (fwd) or in (dX), N = tokens
    (8192, 8192, 8192), (4096, 4096, 4096),
    (3072, 8192, 768),  # MLP fc1: 8192 tokens, 768 -> 3072
    (768, 8192, 3072),  # MLP fc2: 8192 tokens, 3072 -> 768
]
LAYER_SHAPES = [(8192, 4096, 4096), (8192, 768, 3072), (8192, 3072, 768)]  # rows, in, out
PROBE_VARIANTS = ("v1", "v1_mf", "ws64", "ws", "ws64_mc")  # distinct metadata read paths
# v1 (the one variant correct on hardware so far) and the two main warp-specialised tiles
# first; the clusters and ws_pt last (ws_mc hangs now and then in interpret mode): if the
# step's time runs out or one item hangs, the variants that matter have been checked
CHECK_ORDER = ("v1", "ws64", "ws", "v1_mf", "ws64_n256", "ws64_pt", "ws64_mc", "ws64_mc_pt",
               "ws_pt", "ws_mc")
TIMING = dict(reps=5)
# --smoke (CPU): the emulation branch in interpret mode on small shapes, to test this script
KERNEL_KW: dict = {}
FAULT = [""]  # --smoke --fault: the variant whose check reference is made wrong
SMOKE_SHAPES = [(256, 256, 1536), (512, 256, 1536)]


# ------------------------------------------------------------------------ records
class Records:
    """Append-only JSON lines; ``started`` marks an item before it runs (for --resume)."""

    def __init__(self, path: str, resume: bool):
        self.path = path
        self.seen = set()
        if resume and os.path.exists(path):
            for line in open(path):
                with contextlib.suppress(ValueError):
                    r = json.loads(line)
                    self.seen.add((r.get("step"), r.get("item")))

    def add(self, **record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(json.dumps(record, default=float), flush=True)

    def start(self, step: str, item: str) -> bool:
        """False when a previous run already started ``item`` (finished, or killed in it)."""
        if (step, item) in self.seen:
            return False
        self.add(step=step, item=item, status="started")
        return True


@contextlib.contextmanager
def watchdog(seconds: float):
    """Ends the process (exit code 1, traceback on stderr) if the block outlasts ``seconds``:
    a hung GPU kernel cannot be interrupted from Python. The caller's --resume skips it."""
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def time_ms(fn, *args, iters=20, reps=None, sync=jax.block_until_ready):
    """Median over ``reps`` of (``iters`` back-to-back calls, one sync) / ``iters``, in ms."""
    reps = reps or TIMING["reps"]
    sync(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        sync(out)
        times.append((time.perf_counter() - t0) / iters)
    return 1e3 * statistics.median(times)


@jax.jit
def _rel_err(out, ref):
    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    err = jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)
    return jnp.where(jnp.all(jnp.isfinite(out)), err, jnp.inf)


def rel_err(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ on the device (fp32), ``inf`` if ``out`` has a non-finite entry."""
    return float(_rel_err(out, ref))


def random_case(key, m, n, k, underfill=False):
    """``a (m, k)`` bf16 with a magnitude 2:4 mask along K (with ``underfill`` about a
    quarter of the kept entries dropped: groups with 0, 1 or 2 kept), ``b_t (n, k)``."""
    k1, k2, k3 = jax.random.split(key, 3)
    a = jax.random.normal(k1, (m, k), jnp.float32).astype(jnp.bfloat16)
    mask = nm_mask(jnp.abs(a.astype(jnp.float32)), 2, 4, axis=1)
    if underfill:
        mask = mask & (jax.random.uniform(k3, mask.shape) > 0.25)
    b_t = jax.random.normal(k2, (n, k), jnp.float32).astype(jnp.bfloat16)
    return a, mask, b_t


def dense_xla(a_masked, b_t):
    """Dense XLA bf16 of the backend's layout: ``b_t (N, K) · a (M, K)ᵀ -> (N, M)``."""
    return jax.lax.dot_general(b_t, a_masked, _NT, preferred_element_type=jnp.float32
                               ).astype(jnp.bfloat16)


def kernel_fn(cfg: SparseMatmulConfig, transpose_out=True):
    return jax.jit(lambda v, mt, b: sparse_matmul_24(Packed24(v, mt), b, config=cfg,
                                                     transpose_out=transpose_out, **KERNEL_KW))


def device_kind() -> str:
    dev = jax.devices()[0]
    return getattr(dev, "device_kind", dev.platform)


# -------------------------------------------------------------------------- probe
_PAIRS = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def probe_words() -> np.ndarray:
    """Metadata ``(1, 1, 64, 4)`` giving every (thread word, nibble) slot of every k32 slice a
    distinct index pair: slot ``8t + j`` of slice ``s`` carries base-6 digit ``s`` of ``8t + j``."""
    slot = np.arange(512)
    words = np.zeros((1, 1, 64, 4), np.uint32)
    for s in range(4):
        lo, hi = np.array(_PAIRS)[(slot // 6**s) % 6].T
        nib = (lo | (hi << 2)).astype(np.uint32).reshape(64, 8)
        words[0, 0, :, s] = np.bitwise_or.reduce(nib << (4 * np.arange(8, dtype=np.uint32)), 1)
    return words


def probe_decode(c: np.ndarray) -> tuple[bool, np.ndarray]:
    """``C (64, 128)`` of one 64-row block (A with values 1, 2 per group, B = identity) ->
    (decodable, found[row, group] = slot)."""
    found = np.full((64, 8), -1)
    ok = True
    for r in range(64):
        for j in range(8):
            code = 0
            for s in range(4):
                grp = c[r, 32 * s + 4 * j: 32 * s + 4 * j + 4]
                p1, p2 = np.where(grp == 1)[0], np.where(grp == 2)[0]
                if len(p1) != 1 or len(p2) != 1 or (p1[0], p2[0]) not in _PAIRS:
                    ok = False
                    continue
                code += _PAIRS.index((p1[0], p2[0])) * 6**s
            found[r, j] = code
    return ok, found


def probe_expected() -> np.ndarray:
    """docs/design.md (*Sparse tensor cores*) / KERNEL_NOTES: row ``16w + 8h + g``, group
    ``4q + j`` of a slice <- word ``16w + 2g + q``, nibble ``4h + j``."""
    hyp = np.zeros((64, 8), int)
    for r in range(64):
        for j in range(8):
            t = 16 * (r // 16) + 2 * (r % 8) + j // 4
            hyp[r, j] = 8 * t + j % 4 + 4 * ((r % 16) // 8)
    return hyp


def probe(name: str) -> dict:
    """Runs the layout probe through variant ``name``'s metadata read path: one k-tile, every
    64-row block of the CTA tile (each warpgroup's) carrying the probe words."""
    cfg = VARIANTS[name]
    m, n = cfg.cta_m, cfg.tile_n * cfg.cluster_n
    k = 128 * (cfg.max_concurrent_steps if cfg.pipeline_across_tiles else 1)
    if cfg.pipeline_across_tiles:
        n *= 2  # two tiles (the cross-tile pipeline's START and STOP); B's extra rows are 0
    meta = np.tile(probe_words(), (m // 64, k // 128, 1, 1))
    values = np.tile(np.array([1.0, 2.0]), (m, k // 4))
    packed = Packed24(jnp.asarray(values, jnp.bfloat16), jnp.asarray(meta))
    b_t = jnp.eye(n, k, dtype=jnp.bfloat16)
    c = np.asarray(kernel_fn(cfg, False)(*packed, b_t), np.float32)
    return probe_result(c, m // 64)


def probe_result(c: np.ndarray, blocks: int) -> dict:
    """``decodable`` and ``matches_layout`` of the probe's output ``C (64 * blocks, >= 128)``;
    for each 64-row block that differs, its decoded slot map: ``slot_map[row][group] =
    8 * word + nibble`` (the thread word and nibble the instruction took that row's group
    from, if every k32 slice agrees; -1: undecodable), its mismatch count and the first 8
    mismatches as ``[row, group, expected, found]``."""
    hyp = probe_expected()
    ok, match, diffs = True, True, []
    for b in range(blocks):
        dec, found = probe_decode(c[64 * b: 64 * b + 64, :128])
        ok &= dec
        same = bool(dec and np.array_equal(found, hyp))
        match &= same
        if not same:
            rows, groups = np.nonzero(found != hyp)
            diffs.append(dict(
                block=b, decodable=bool(dec), mismatches=int(rows.size),
                first=[[int(r), int(g), int(hyp[r, g]), int(found[r, g])]
                       for r, g in zip(rows[:8], groups[:8], strict=True)],
                slot_map=found.tolist()))
    res = dict(decodable=bool(ok), matches_layout=bool(match))
    if diffs:
        res["blocks"] = diffs
    return res


def run_probe(args, rec: Records):
    for name in args.variants or PROBE_VARIANTS:
        if not rec.start("probe", name):
            continue
        with watchdog(args.item_timeout):
            t0 = time.time()
            try:
                res = probe(name)
            except Exception as e:  # noqa: BLE001  (record the failure, go on)
                res = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
            rec.add(step="probe", item=name, seconds=round(time.time() - t0, 1), **res)


# -------------------------------------------------------------------------- check
def _check_cases():
    key = jax.random.key(3)
    cases = []
    for (m, n, k) in CHECK_SHAPES:
        key, sub = jax.random.split(key)
        a, mask, b_t = random_case(sub, m, n, k, underfill=True)
        packed = jax.jit(pack_24)(a, mask)
        ref = jax.lax.dot_general(b_t.astype(jnp.float32),
                                  jnp.where(mask, a, 0).astype(jnp.float32), _NT,
                                  precision=jax.lax.Precision.HIGHEST)
        cases.append(((m, n, k), packed, b_t, ref))
    return cases


def run_check(args, rec: Records):
    """Per variant (CHECK_ORDER), three items, each recorded before the next starts: "check"
    (rel. error on CHECK_SHAPES with underfilled masks, the transposed output the backend
    runs), "diag" (only after a failed check: :func:`error_map` of each failed shape, the
    output poisoned first) and "rank" (kernel vs dense XLA time at RANK_SHAPE, correct
    variants only)."""
    cases = _check_cases()
    rank = {}
    if FAULT[0]:  # the error map's test: A's rows 64..127 x C's columns 0..127 off by 1
        wrong = [(s, p, b, ref.at[:128, 64:128].add(1.0)) for s, p, b, ref in cases]
    order = [*CHECK_ORDER, *(v for v in VARIANTS if v not in CHECK_ORDER)]
    for name in args.variants or order:
        cfg = VARIANTS[name]
        failed, ok = [], _previous_ok(rec.path, name)
        if rec.start("check", name):
            with watchdog(args.item_timeout):
                res, failed = _check_variant(name, cfg, wrong if name == FAULT[0] else cases)
                rec.add(**res)
                ok = res["ok"]
        if failed and rec.start("diag", name):
            with watchdog(args.item_timeout):
                rec.add(step="diag", item=name, **_diagnose(cfg, failed))
        if ok and rec.start("rank", name):
            with watchdog(args.item_timeout):
                rec.add(**_rank_variant(name, cfg, rank, args.iters))


def _previous_ok(path: str, name: str) -> bool:
    """Whether an earlier run's check of ``name`` in ``path`` passed (for --resume)."""
    ok = False
    if os.path.exists(path):
        for line in open(path):
            with contextlib.suppress(ValueError):
                r = json.loads(line)
                if r.get("step") == "check" and r.get("item") == name and "ok" in r:
                    ok = bool(r["ok"])
    return ok


def _check_variant(name, cfg, cases):
    """The check record of one variant and its failed cases ``(shape, out, ref)`` (host)."""
    t0 = time.time()
    errs, error, failed = {}, None, []
    try:
        for (m, n, k), packed, b_t, ref in cases:
            if cfg.shape_error(m, n, k):
                continue
            out = kernel_fn(cfg)(packed.values, packed.meta, b_t)
            err = rel_err(out, ref)
            errs[f"{m}x{n}x{k}"] = err
            if not err < ERR_TOL:
                failed.append(((m, n, k), packed, b_t, np.asarray(out, np.float32),
                               np.asarray(ref, np.float32)))
    except Exception as e:  # noqa: BLE001  (record the failure, go on)
        error = f"{type(e).__name__}: {str(e)[:400]}"
    worst = max(errs.values(), default=float("inf"))
    ok = error is None and len(errs) == len(cases) and worst < ERR_TOL
    return dict(step="check", item=name, ok=ok, worst_err=worst, errs=errs, error=error,
                check_seconds=round(time.time() - t0, 1)), failed


def error_map(out: np.ndarray, ref: np.ndarray, poisoned: np.ndarray | None = None) -> dict:
    """Where a kernel's ``out`` differs from ``ref`` (both ``(N, M)``, the transposed output
    the check runs): per 64-row block of A (``M / 64``) and per 128-column tile of C
    (``N / 128``) the worst relative error of its 64x128 cells (‖out − ref‖ / ‖ref‖ per cell;
    ``inf`` where ``out`` is not finite), the NaN and infinity counts, and with ``poisoned``
    (the output of a run writing into a buffer filled with POISON) the count of entries left
    unwritten, per block and per tile."""
    c, r = out.T.astype(np.float64), ref.T.astype(np.float64)  # (M, N): A's rows first
    m, n = r.shape
    cells = lambda x: x.reshape(m // 64, 64, n // 128, 128)  # noqa: E731
    num = np.sqrt(np.nansum(cells(c - r) ** 2, axis=(1, 3)))
    den = np.sqrt(np.sum(cells(r) ** 2, axis=(1, 3)))
    bad = ~np.isfinite(cells(c)).all(axis=(1, 3))
    err = np.where(bad, np.inf, num / np.maximum(den, 1e-30))
    res = dict(shape_mn=[m, n], cell=[64, 128],
               worst_per_row_block=[float(f"{e:.2e}") for e in err.max(axis=1)],
               worst_per_col_tile=[float(f"{e:.2e}") for e in err.max(axis=0)],
               bad_cells=int((err >= ERR_TOL).sum()), cells=int(err.size),
               nan=int(np.isnan(c).sum()), inf=int(np.isinf(c).sum()))
    if poisoned is not None:
        left = cells(poisoned.T == POISON).sum(axis=(1, 3))
        res.update(unwritten=int(left.sum()),
                   unwritten_per_row_block=left.sum(axis=1).tolist(),
                   unwritten_per_col_tile=left.sum(axis=0).tolist())
    return res


def _diagnose(cfg, failed) -> dict:
    """:func:`error_map` of each failed case, with a run into a poisoned output."""
    maps = {}
    for (m, n, k), packed, b_t, out, ref in failed:
        poisoned, why = None, None
        try:
            init = jnp.full((n, m), POISON, jnp.bfloat16)
            poisoned = np.asarray(jax.jit(lambda v, mt, b, i: sparse_matmul_24(
                Packed24(v, mt), b, config=cfg, transpose_out=True, out_init=i,
                **KERNEL_KW))(packed.values, packed.meta, b_t, init), np.float32)
        except Exception as e:  # noqa: BLE001  (the map without the unwritten count)
            why = f"{type(e).__name__}: {str(e)[:300]}"
        maps[f"{m}x{n}x{k}"] = dict(error_map(out, ref, poisoned), poison_error=why)
    return dict(maps=maps)


def _rank_variant(name, cfg, rank, iters) -> dict:
    """Kernel vs dense XLA time at RANK_SHAPE (the dense time and operands made once)."""
    if not rank:
        rank.update(zip(("a_masked", "packed", "b_t", "dense_ms"), _rank_case(), strict=True))
    try:
        ms = time_ms(kernel_fn(cfg), rank["packed"].values, rank["packed"].meta, rank["b_t"],
                     iters=iters)
    except Exception as e:  # noqa: BLE001
        return dict(step="rank", item=name, error=f"{type(e).__name__}: {str(e)[:300]}")
    return dict(step="rank", item=name, rank_shape=list(RANK_SHAPE), rank_ms=ms,
                rank_dense_ms=rank["dense_ms"], rank_ratio=rank["dense_ms"] / ms,
                rank_tflops=2 * np.prod(RANK_SHAPE, dtype=float) / ms / 1e9)


def _rank_case():
    m, n, k = RANK_SHAPE
    a, mask, b_t = random_case(jax.random.key(11), m, n, k)
    a_masked = jnp.where(mask, a, 0).astype(jnp.bfloat16)
    packed = jax.jit(pack_24)(a, mask)
    return a_masked, packed, b_t, time_ms(jax.jit(dense_xla), a_masked, b_t)


def ranked_variants(check_jsonl: str) -> list[str]:
    """The correct variants, fastest at the rank shape first (then the correct ones without a
    rank timing, in check order); the last record of each item wins."""
    checks, ranks = {}, {}
    if check_jsonl and os.path.exists(check_jsonl):
        for line in open(check_jsonl):
            with contextlib.suppress(ValueError):
                r = json.loads(line)
                if r.get("step") == "check" and "ok" in r:
                    checks[r["item"]] = r
                elif r.get("step") == "rank" and r.get("rank_ratio"):
                    ranks[r["item"]] = r["rank_ratio"]
    good = [v for v, r in checks.items() if r["ok"]]
    return (sorted((v for v in good if v in ranks), key=lambda v: -ranks[v])
            + [v for v in good if v not in ranks])


def bench_variants(ranked: list[str], shape, top: int) -> list[str]:
    """The first ``top`` of ``ranked`` that tile ``shape`` (v1 if none was checked)."""
    fits = [v for v in ranked if VARIANTS[v].shape_error(*shape) is None]
    return fits[:top] if ranked else ["v1"]


# -------------------------------------------------------------------------- bench
def _torch_peers(m, n, k, iters):
    """torch dense (cuBLAS) and torch's 2:4 GEMMs of ``(M, K) 2:4 x (K, N)``: results keyed by
    implementation, each ``(ms, rel_err, note)``; an unavailable one gives ``(None, None,
    reason)``. B is tried K-major and N-major; the faster counts."""
    import torch
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(m + n + k)
    a = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=gen)
    idx = a.abs().reshape(m, k // 4, 4).topk(2, dim=-1).indices
    mask = torch.zeros(m, k // 4, 4, device=dev, dtype=torch.bool)
    mask.scatter_(-1, idx, True)
    a = torch.where(mask.reshape(m, k), a, torch.zeros((), dtype=a.dtype, device=dev))
    b_kn = torch.randn(k, n, device=dev, dtype=torch.bfloat16, generator=gen)
    layouts = {"B row-major": b_kn, "B K-major": b_kn.t().contiguous().t()}
    ref = a.float() @ b_kn.float()
    sync = lambda _: torch.cuda.synchronize()  # noqa: E731
    out = {}

    def best(name, fn):
        res = []
        for label, b in layouts.items():
            try:
                ms = time_ms(fn, b, iters=iters, sync=sync)
                c = fn(b).float()
                err = float(torch.linalg.norm(c - ref) / torch.linalg.norm(ref))
                res.append((ms, err if bool(torch.isfinite(c).all()) else float("inf"), label))
            except Exception as e:  # noqa: BLE001
                res.append((None, None, f"{label}: {type(e).__name__}: {str(e)[:160]}"))
        timed = [r for r in res if r[0] is not None]
        out[name] = min(timed) if timed else res[0]

    best("torch dense", lambda b: torch.mm(a, b))
    packed = None
    try:
        packed = torch._cslt_compress(a)
        best("torch cuSPARSELt", lambda b: torch._cslt_sparse_mm(packed, b))
    except Exception as e:  # noqa: BLE001
        out["torch cuSPARSELt"] = (None, None, f"{type(e).__name__}: {str(e)[:200]}")
    if packed is not None and hasattr(torch, "_cslt_sparse_mm_search"):
        try:  # its own try: a failing search keeps the default timing above
            alg = torch._cslt_sparse_mm_search(packed, layouts["B row-major"])
            alg = alg[0] if isinstance(alg, tuple) else alg
            best(f"torch cuSPARSELt (alg {alg}, searched)",
                 lambda b: torch._cslt_sparse_mm(packed, b, alg_id=alg))
        except Exception as e:  # noqa: BLE001
            out["torch cuSPARSELt (searched)"] = (None, None,
                                                  f"{type(e).__name__}: {str(e)[:200]}")
    try:
        SparseSemiStructuredTensor._FORCE_CUTLASS = True
        sp = to_sparse_semi_structured(a)
        best("torch CUTLASS", lambda b: torch._sparse_semi_structured_mm(sp.packed, sp.meta, b))
    except Exception as e:  # noqa: BLE001
        out["torch CUTLASS"] = (None, None, f"{type(e).__name__}: {str(e)[:200]}")
    return out


def run_bench(args, rec: Records):
    ranked = args.variants or ranked_variants(args.check_jsonl)
    key = jax.random.key(1)
    for (m, n, k) in BENCH_SHAPES:
        shape = f"{m}x{n}x{k}"
        names = bench_variants(ranked, (m, n, k), args.top)
        rec.add(step="bench", item=f"{shape} variants", variants=names)
        key, sub = jax.random.split(key)
        a, mask, b_t = random_case(sub, m, n, k)
        a_masked = jnp.where(mask, a, 0).astype(jnp.bfloat16)
        packed = jax.jit(pack_24)(a, mask)
        ref = None
        flops = 2.0 * m * n * k
        if rec.start("gemm", f"{shape} xla"):
            with watchdog(args.item_timeout):
                ms = time_ms(jax.jit(dense_xla), a_masked, b_t, iters=args.iters)
                rec.add(step="gemm", item=f"{shape} xla", shape=[m, n, k], impl="XLA dense",
                        ms=ms, tflops=flops / ms / 1e9)
        for name in names:
            cfg = VARIANTS[name]
            if not rec.start("gemm", f"{shape} {name}"):
                continue
            with watchdog(args.item_timeout):
                f = kernel_fn(cfg)
                ms = time_ms(f, packed.values, packed.meta, b_t, iters=args.iters)
                if ref is None:
                    ref = jax.lax.dot_general(b_t.astype(jnp.float32),
                                              a_masked.astype(jnp.float32), _NT,
                                              precision=jax.lax.Precision.HIGHEST)
                err = rel_err(f(packed.values, packed.meta, b_t), ref)
                rec.add(step="gemm", item=f"{shape} {name}", shape=[m, n, k],
                        impl=f"pallas {name}", variant=name, ms=ms, tflops=flops / ms / 1e9,
                        rel_err=err)
        if args.torch and rec.start("gemm", f"{shape} torch"):
            with watchdog(args.item_timeout):
                try:
                    peers = _torch_peers(m, n, k, args.iters)
                except Exception as e:  # noqa: BLE001
                    peers = {"torch": (None, None, f"{type(e).__name__}: {str(e)[:200]}")}
                for impl, (ms, err, note) in peers.items():
                    rec.add(step="gemm", item=f"{shape} {impl}", shape=[m, n, k], impl=impl,
                            ms=ms, tflops=flops / ms / 1e9 if ms else None, rel_err=err,
                            note=note)


# -------------------------------------------------------------------------- layer
def run_layer(args, rec: Records):
    """nm_dense fwd + bwd (y, dx, dw) in bf16: dense, the masked reference, the pallas backend
    (packs W twice per call from the masks), and the same products with static masks (values
    gathered per call from a plan); plus each pack alone."""
    from nmjax.kernels import measured_table

    measured_table.cache_clear()  # the bench step may have just written it
    key = jax.random.key(2)
    for (rows, n_in, n_out) in LAYER_SHAPES:
        key, sub = jax.random.split(key)
        _layer_shape(args, rec, sub, rows, n_in, n_out)


def _layer_step(x, w, g, fwd, bwd, backend):
    from nmjax import ops

    y, vjp = jax.vjp(lambda x, w: ops.nm_dense(x, w, fwd, bwd, backend=backend), x, w)
    return (y, *vjp(g))


def _dense_step(x, w, g):
    y, vjp = jax.vjp(jnp.dot, x, w)  # bf16 in and out, fp32 accumulation in XLA
    return (y, *vjp(g))


def _static_step(x, w, g, plan):
    """What a backend given a mask plan would run: values-only pack, the two sparse GEMMs
    (the per-shape measured kernels) and the dense weight gradient."""
    from nmjax.kernels import measured_config

    rows, (n_in, n_out) = x.shape[0], w.shape
    pw = pack_weight_values_24(w, plan)
    y = sparse_matmul_24(pw.fwd, x, config=measured_config((n_out, rows, n_in)),
                         transpose_out=True, **KERNEL_KW)
    dx = sparse_matmul_24(pw.bwd, g, config=measured_config((n_in, rows, n_out)),
                          transpose_out=True, **KERNEL_KW)
    dw = jnp.matmul(x.T, g, preferred_element_type=jnp.float32).astype(w.dtype)
    return y, dx, dw


def _sparse_gemms(x, g, packed):
    """The two sparse products alone, on packed operands (the denominator of the pack cost)."""
    from nmjax.kernels import measured_config

    rows, (n_out, n_in) = x.shape[0], (packed.fwd.values.shape[0], x.shape[1])
    y = sparse_matmul_24(packed.fwd, x, config=measured_config((n_out, rows, n_in)),
                         transpose_out=True, **KERNEL_KW)
    dx = sparse_matmul_24(packed.bwd, g, config=measured_config((n_in, rows, n_out)),
                          transpose_out=True, **KERNEL_KW)
    return y, dx


def _layer_shape(args, rec, key, rows, n_in, n_out):
    from nmjax.kernels import pallas_backend

    shape = f"{rows}x{n_in}x{n_out}"
    k1, k2, k3 = jax.random.split(key, 3)
    w = jax.random.normal(k1, (n_in, n_out), jnp.float32).astype(jnp.bfloat16)
    x = jax.random.normal(k2, (rows, n_in), jnp.float32).astype(jnp.bfloat16)
    g = jax.random.normal(k3, (rows, n_out), jnp.float32).astype(jnp.bfloat16)
    wf = jnp.abs(w.astype(jnp.float32))
    fwd, bwd = nm_mask(wf, 2, 4, axis=0), nm_mask(wf, 2, 4, axis=1)
    plan = jax.jit(plan_weight_24)(fwd, bwd)
    backend = pallas_backend()  # per GEMM shape, the measured best variant (else v1)
    impls = {
        "dense": (jax.jit(_dense_step), (x, w, g)),
        "masked reference": (jax.jit(functools.partial(_layer_step, backend="reference")),
                             (x, w, g, fwd, bwd)),
        "pallas (nm_dense)": (jax.jit(functools.partial(_layer_step, backend=backend)),
                              (x, w, g, fwd, bwd)),
        "pallas, static masks": (jax.jit(_static_step), (x, w, g, plan)),
        "sparse GEMMs (fwd + dX)": (jax.jit(_sparse_gemms), (x, g, pack_weight_24(w, fwd, bwd))),
        "pack_weight_24 (full)": (jax.jit(pack_weight_24), (w, fwd, bwd)),
        "pack_weight_values_24": (jax.jit(pack_weight_values_24), (w, plan)),
    }
    want = None
    for impl, (fn, fargs) in impls.items():
        if not rec.start("layer", f"{shape} {impl}"):
            continue
        with watchdog(args.item_timeout):
            try:
                ms = time_ms(fn, *fargs, iters=max(5, args.iters // 2))
                err = None
                if not impl.startswith(("pack", "sparse GEMMs")):
                    got = fn(*fargs)
                    if impl == "masked reference":
                        want = got
                    elif want is not None and impl != "dense":
                        err = max(rel_err(a, b) for a, b in zip(got, want, strict=True))
                rec.add(step="layer", item=f"{shape} {impl}", shape=[rows, n_in, n_out],
                        impl=impl, ms=ms, rel_err=err)
            except Exception as e:  # noqa: BLE001
                rec.add(step="layer", item=f"{shape} {impl}", shape=[rows, n_in, n_out],
                        impl=impl, error=f"{type(e).__name__}: {str(e)[:300]}")


# -------------------------------------------------------------------------- table
def _load(paths):
    out = []
    for p in paths:
        if os.path.exists(p):
            for line in open(p):
                with contextlib.suppress(ValueError):
                    r = json.loads(line)
                    if r.get("status") != "started":
                        out.append(r)
    return out


def _started_unfinished(paths):
    started, done = set(), set()
    for p in paths:
        if os.path.exists(p):
            for line in open(p):
                with contextlib.suppress(ValueError):
                    r = json.loads(line)
                    (started if r.get("status") == "started" else done).add(
                        (r.get("step"), r.get("item")))
    return sorted(started - done)


def run_table(args, _rec=None):
    """Writes the markdown table and the measured table from the JSON lines."""
    recs = _load(args.inputs)
    kind = args.device or device_kind()
    date = args.date or datetime.date.today().isoformat()
    gemm = [r for r in recs if r.get("step") == "gemm"]
    shapes = list(dict.fromkeys(tuple(r["shape"]) for r in gemm))
    impls = list(dict.fromkeys(r["impl"] for r in gemm if r["impl"] != "XLA dense"))
    by = {(tuple(r["shape"]), r["impl"]): r for r in gemm}
    lines = [f"# Sparse 2:4 kernel measurements ({kind})", "",
             f"Date: {date}. Device: {kind}; jax {jax.__version__}. Command (GPU machine, "
             f"repository root): `{args.command}`.", "",
             "Method: each row's implementations in one process; per call the median of 5 runs "
             "of back-to-back calls after a warm-up; random normal bf16 operands, magnitude 2:4 "
             "masks. Cells: time of dense XLA bf16 over the implementation's (>1: faster), and "
             "dense-equivalent TFLOP/s. Pallas rows run the transposed output the backend "
             "uses (`C = B·Aᵀ`, `(N, M)`); XLA dense is the same product; torch rows compute "
             "`(M, K) 2:4 · (K, N)` (faster of B row-major / K-major).", ""]
    head = "| M×N×K | XLA dense TFLOP/s | " + " | ".join(impls) + " |"
    lines += ["## Sparse GEMM, ratio to dense XLA", "", head,
              "|---|---:|" + "---:|" * len(impls)]
    for s in shapes:
        base = by.get((s, "XLA dense"))
        cells = [f"{base['tflops']:.0f}" if base else "–"]
        for impl in impls:
            r = by.get((s, impl))
            if not r or not r.get("ms") or not base:
                cells.append("–" if not r else (r.get("note") or "n/a")[:40])
                continue
            bad = r.get("rel_err") is not None and not r["rel_err"] < 1e-2
            cells.append(f"{base['ms'] / r['ms']:.2f}x ({r['tflops']:.0f})"
                         + (" WRONG" if bad else ""))
        lines.append(f"| {'×'.join(map(str, s))} | " + " | ".join(cells) + " |")
    layer = [r for r in recs if r.get("step") == "layer"]
    if layer:
        lshapes = list(dict.fromkeys(tuple(r["shape"]) for r in layer))
        limpls = list(dict.fromkeys(r["impl"] for r in layer))
        lby = {(tuple(r["shape"]), r["impl"]): r for r in layer}
        lines += ["", "## `nm_dense` forward + backward (y, dx, dw), bf16; ms (dense / it)", "",
                  "| rows×in×out | " + " | ".join(limpls) + " |",
                  "|---|" + "---:|" * len(limpls)]
        for s in lshapes:
            base = lby.get((s, "dense"))
            cells = []
            for impl in limpls:
                r = lby.get((s, impl))
                if not r or not r.get("ms"):
                    cells.append(r.get("error", "–")[:40] if r else "–")
                    continue
                gemms = lby.get((s, "sparse GEMMs (fwd + dX)"))
                if impl.startswith("pack") or impl.startswith("sparse GEMMs"):
                    ratio = (f" ({100 * r['ms'] / gemms['ms']:.0f}% of the GEMMs)"
                             if impl.startswith("pack") and gemms and gemms.get("ms") else "")
                else:
                    ratio = f" ({base['ms'] / r['ms']:.2f}x)" if base and impl != "dense" else ""
                err = f", err {r['rel_err']:.1e}" if r.get("rel_err") is not None else ""
                cells.append(f"{r['ms']:.3f}{ratio}{err}")
            lines.append(f"| {'×'.join(map(str, s))} | " + " | ".join(cells) + " |")
        lines += ["", "Cells: ms per call, (dense time / it). 'pallas (nm_dense)' packs W from "
                  "the masks on every call (the Backend interface passes masks); 'pallas, static "
                  "masks' gathers only the values from a plan. Pack rows: the pack alone, as a "
                  "share of the two sparse GEMMs it feeds ('sparse GEMMs (fwd + dX)')."]
    checks = [r for r in recs if r.get("step") == "check"]
    probes = [r for r in recs if r.get("step") == "probe"]
    ranks = {r["item"]: r for r in recs if r.get("step") == "rank"}
    diags = {r["item"]: r for r in recs if r.get("step") == "diag"}
    if checks or probes:
        lines += ["", "## Probe and correctness", "",
                  "| variant | layout probe | rel. err (worst of the check shapes) | rank shape: "
                  "ratio to XLA (TFLOP/s) | error |",
                  "|---|---|---:|---:|---|"]
        pr = {r["item"]: r for r in probes}
        for r in checks:
            p = pr.get(r["item"], {})
            ptxt = ("ok" if p.get("matches_layout") else "MISMATCH" if p else "–")
            q = ranks.get(r["item"], {})
            rank = (f"{'×'.join(map(str, q['rank_shape']))}: {q['rank_ratio']:.2f}x "
                    f"({q['rank_tflops']:.0f})" if q.get("rank_ratio") else
                    (q.get("error") or "–")[:40])
            lines.append(f"| {r['item']} | {ptxt} | {r.get('worst_err', float('nan')):.1e} "
                         f"| {rank} | {(r.get('error') or '')[:80]}{_diag_text(diags, r)} |")
    hung = _started_unfinished(args.inputs)
    if hung:
        lines += ["", "Started but never finished (killed by the step's time limit or a hang): "
                  + ", ".join(f"{s} {i}" for s, i in hung) + "."]
    text = "\n".join(lines) + "\n"
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    print(text)
    if args.measured:
        write_measured(args.measured, kind, date, args.command, gemm,
                       [{**r, **ranks.get(r["item"], {})} for r in checks])


def _diag_text(diags, check) -> str:
    """A failed check's error map in a few words (the full map is in the JSON lines)."""
    d = diags.get(check["item"])
    if not d or not d.get("maps"):
        return ""
    parts = []
    for shape, e in d["maps"].items():
        parts.append(f"{shape}: {e['bad_cells']}/{e['cells']} cells bad, {e['nan']} NaN"
                     + (f", {e['unwritten']} unwritten" if "unwritten" in e else ""))
    return " (" + "; ".join(parts) + ")"


def write_measured(path, kind, date, command, gemm, checks):
    """The "auto" dispatch table: per variant and shape, dense XLA time / kernel time of
    correct runs. Other devices' tables in the file are kept."""
    from nmjax.kernels._backend import table_entry

    base = {tuple(r["shape"]): r["ms"] for r in gemm if r["impl"] == "XLA dense"}
    entries = []
    for r in gemm:
        s = tuple(r["shape"])
        if r.get("variant") and r.get("ms") and s in base and (r.get("rel_err") or 1) < 1e-2:
            entries.append(table_entry(r["variant"], VARIANTS[r["variant"]], s,
                                       base[s] / r["ms"], r["rel_err"]))
    for r in checks:
        if r.get("ok") and r.get("rank_ratio"):
            entries.append(table_entry(r["item"], VARIANTS[r["item"]], r["rank_shape"],
                                       r["rank_ratio"], r["worst_err"]))
    table = {"note": "Written by benchmarks/gpu_check.sh (python benchmarks/kernels.py table); "
                     "never edited by hand.", "devices": {}}
    if os.path.exists(path):
        with contextlib.suppress(ValueError):
            table["devices"] = json.load(open(path)).get("devices", {})
    table["devices"][kind] = dict(date=date, command=command, jax=jax.__version__,
                                  entries=entries)
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")


# ------------------------------------------------------------------------ pack-cpu
def run_pack_cpu(args, _rec=None):
    """CPU wall times (not GPU figures) of the full pack vs the values-only pack of a layer."""
    for (n_in, n_out) in [(768, 3072), (4096, 4096)]:
        w = jax.random.normal(jax.random.key(0), (n_in, n_out), jnp.float32).astype(
            jnp.bfloat16)
        wf = jnp.abs(w.astype(jnp.float32))
        fwd, bwd = nm_mask(wf, 2, 4, axis=0), nm_mask(wf, 2, 4, axis=1)
        plan = jax.jit(plan_weight_24)(fwd, bwd)
        full = time_ms(jax.jit(pack_weight_24), w, fwd, bwd, iters=3, reps=3)
        vals = time_ms(jax.jit(pack_weight_values_24), w, plan, iters=3, reps=3)
        print(f"CPU (not a GPU figure) {n_in}x{n_out}: pack_weight_24 {full:.1f} ms, "
              f"pack_weight_values_24 {vals:.1f} ms ({full / vals:.1f}x less)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["probe", "check", "bench", "layer", "table", "pack-cpu"])
    ap.add_argument("--jsonl", default="kernels.jsonl")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--variants", nargs="*", default=None)
    ap.add_argument("--check-jsonl", default="", help="bench: pick the best variants from it")
    ap.add_argument("--top", type=int, default=3, help="bench: variants per shape")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--item-timeout", type=float, default=60)
    ap.add_argument("--no-torch", dest="torch", action="store_false")
    ap.add_argument("--inputs", nargs="*", default=[], help="table: the JSON lines files")
    ap.add_argument("--md", default="")
    ap.add_argument("--measured", default="")
    ap.add_argument("--device", default="")
    ap.add_argument("--date", default="")
    ap.add_argument("--command", default="bash benchmarks/gpu_check.sh")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU test of this script: emulated kernels, small shapes")
    ap.add_argument("--fault", default="", help="--smoke only: this variant's check compares "
                    "against a reference with one 64x128 cell off (runs the error map)")
    args = ap.parse_args(argv)
    if args.fault and not args.smoke:
        ap.error("--fault is a test of this script: only with --smoke")
    FAULT[0] = args.fault
    if args.smoke:
        from jax.experimental.pallas import mosaic_gpu as plgpu

        global CHECK_SHAPES, RANK_SHAPE, BENCH_SHAPES, LAYER_SHAPES
        KERNEL_KW.update(branch="emulate", interpret=plgpu.InterpretGPUParams())
        CHECK_SHAPES, RANK_SHAPE = SMOKE_SHAPES, SMOKE_SHAPES[0]
        BENCH_SHAPES, LAYER_SHAPES = SMOKE_SHAPES[:1], [(256, 256, 256)]
        args.iters = 1
        TIMING["reps"] = 1
    run = dict(probe=run_probe, check=run_check, bench=run_bench, layer=run_layer,
               table=run_table, **{"pack-cpu": run_pack_cpu})[args.what]
    rec = None if args.what in ("table", "pack-cpu") else Records(args.jsonl, args.resume)
    run(args, rec)


if __name__ == "__main__":
    main()
