"""GPU checks and timings of the 2:4 sparse kernels (run on an sm_90a GPU).

  PYTHONPATH=. python benchmarks/kernels.py probe   # metadata-layout probe
  PYTHONPATH=. python benchmarks/kernels.py check   # correctness, many shapes
  PYTHONPATH=. python benchmarks/kernels.py bench   # table vs dense XLA GEMM

Timing: CUPTI kernel times (``jax.experimental.mosaic.gpu.profiler.measure``),
after a warm-up, median over ``--iters`` runs, random bf16 inputs (never zeros),
the dense ``lax.dot_general`` of the same shape and layout timed in the same run.
TFLOP/s count dense-equivalent flops ``2*M*N*K`` for both.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from nmjax.kernels import pack as P
from nmjax.masks import nm_mask

SM = sys.modules  # the package shadows the module name with a function
import nmjax.kernels.sparse_matmul  # noqa: E402,F401

S = SM["nmjax.kernels.sparse_matmul"]

_NT = (((1,), (1,)), ((), ()))  # contract axis 1 of both: A (M,K) x b_t (N,K)


def random_24(key, rows, k, dtype=jnp.bfloat16):
    """Random ``(rows, K)`` matrix and its magnitude 2:4 mask along axis 1."""
    a = jax.random.normal(key, (rows, k), jnp.float32).astype(dtype)
    return a, nm_mask(jnp.abs(a.astype(jnp.float32)), 2, 4, axis=1)


def random_case(key, m, n, k):
    """A 2:4 ``(m, k)`` operand (packed), a dense ``(n, k)`` one, and the fp32 reference."""
    k1, k2 = jax.random.split(key)
    a, mask = random_24(k1, m, k)
    b_t = jax.random.normal(k2, (n, k), jnp.float32).astype(jnp.bfloat16)
    packed = jax.jit(P.pack_24)(a, mask)
    ref = jax.lax.dot_general(
        jnp.where(mask, a, 0).astype(jnp.float32), b_t.astype(jnp.float32), _NT,
        precision=jax.lax.Precision.HIGHEST)
    return packed, b_t, ref


def rel_err(out, ref):
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    if not np.all(np.isfinite(out)):
        return float("inf")
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def gpu_time_ms(f, *args, iters=50):
    """Median kernel time (ms) of ``f(*args)``: CUPTI if available, else wall clock."""
    try:
        from jax.experimental.mosaic.gpu import profiler

        _, times = profiler.measure(f, iterations=iters)(*args)
        if times:
            return statistics.median(times), "cupti"
    except Exception as e:  # noqa: BLE001
        print("  (cupti unavailable:", type(e).__name__, e, ")")
    jf = jax.jit(f)
    jax.block_until_ready(jf(*args))
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(jf(*args))
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts), "wall"


# ------------------------------------------------------------------ layout probe
_PAIRS = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def probe(cfg=None, **kernel_kw):
    """Finds which (thread word, nibble) of ``sp-meta`` feeds which (row, group).

    One 64x128 A block, B = identity (so C = dense A). Slot ``(t, n)`` of k32
    slice ``s`` carries digit ``s`` (base 6) of ``8*t + n`` as its index pair;
    stored values are 1 (first) and 2 (second), so C shows both positions.
    """
    cfg = cfg or S.SparseMatmulConfig(tile_m=64, tile_n=128, max_concurrent_steps=2)
    m, k, n = 64, 128, 128
    slot = np.arange(512)
    nib = np.zeros((4, 512), np.uint32)
    for s in range(4):
        digit = (slot // 6**s) % 6
        lo, hi = np.array(_PAIRS)[digit].T
        nib[s] = lo | (hi << 2)
    words = np.zeros((1, 4, 64), np.uint32)
    for s in range(4):
        w = nib[s].reshape(64, 8)
        words[0, s] = np.bitwise_or.reduce(w << (4 * np.arange(8, dtype=np.uint32)), axis=1)
    values = np.tile(np.array([1.0, 2.0]), (m, k // 4))
    packed = P.Packed24(jnp.asarray(values, jnp.bfloat16), jnp.asarray(words))
    b_t = jnp.eye(n, k, dtype=jnp.bfloat16)
    c = np.asarray(S.sparse_matmul_24(packed, b_t, config=cfg, **kernel_kw), np.float32)
    found = np.full((64, 8), -1)  # (row, group in slice) -> slot index
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
    hyp = np.zeros((64, 8), int)
    for r in range(64):
        for j in range(8):
            t = 16 * (r // 16) + 2 * (r % 8) + j // 4
            nn = j % 4 + 4 * ((r % 16) // 8)
            hyp[r, j] = 8 * t + nn
    match = bool(ok and np.array_equal(found, hyp))
    print(f"probe: decodable={ok} bijective={len(set(found.ravel())) == 512} "
          f"matches_DESIGN_layout={match}")
    if not match:
        np.set_printoptions(linewidth=200)
        print("found (row, group) -> (word, nibble) for rows 0..17:")
        for r in range(18):
            print(r, [divmod(int(x), 8) if x >= 0 else None for x in found[r]])
        print("C[0:2, 0:32]=", c[0:2, 0:32])
    return match


# ---------------------------------------------------------------------- variants
def variants():
    """Named kernel configurations measured by ``tune`` (``v1`` = the fallback)."""
    ws = S.SparseMatmulConfig(warp_specialized=True, mma_in_flight=0, epilogue_n=32,
                              max_concurrent_steps=3)
    return {
        "v1": S.FALLBACK_CONFIG,
        # v1 with the k-step's metadata loaded before one wgmma.fence (no injected
        # warpgroup.arrive between the wgmmas; checked in SASS, not yet timed)
        "v1_mf": dataclasses.replace(S.FALLBACK_CONFIG, meta_before_fence=True),
        "ws_mf": dataclasses.replace(ws, meta_before_fence=True),
        # 2 consumer warpgroups x (128x128), CTA 256x128, persistent, snake N-minor
        "ws": ws,
        "ws_mminor": dataclasses.replace(ws, grid_minor_dim=0),
        # branchless grouped tile order instead of planar_snake (no lax.cond in the loop)
        "ws_g": dataclasses.replace(ws, grid_order="grouped"),
        # one CTA per tile, all wgmma groups awaited every k-step
        "ws_np0": dataclasses.replace(ws, persistent=False),
        # epilogue double-buffered (2 x 16 columns per warpgroup): stores overlap
        "ws_e2": dataclasses.replace(ws, epilogue_n=16, epilogue_slots=2),
        # one CTA per tile: no persistent loop, so one wgmma group may stay in flight
        "ws_np": dataclasses.replace(ws, persistent=False, mma_in_flight=1),
        # 2 consumer warpgroups x (64x256), CTA 128x256 (m64n256 instructions), 2 stages
        "ws_n256": dataclasses.replace(ws, tile_m=64, tile_n=256, max_concurrent_steps=2),
    }


def get_config(name):
    if name in (None, "", "default"):
        return S.SparseMatmulConfig()
    return variants()[name]


TUNE_CHECK = [(256, 256, 256), (512, 768, 1024), (2048, 1024, 768), (1024, 2048, 4096)]
TUNE_TIME = [(8192, 8192, 8192), (4096, 8192, 4096)]


def tune(name, iters=30, out_jsonl=None):
    """Correctness (plain + transposed, several shapes) and timing of one variant."""
    import json

    cfg = get_config(name)
    t0 = time.time()
    ok = True
    worst = 0.0
    key = jax.random.key(3)
    for (m, n, k) in TUNE_CHECK:
        if m % cfg.cta_m or n % cfg.tile_n:
            continue
        key, sub = jax.random.split(key)
        packed, b_t, ref = random_case(sub, m, n, k)
        for tr in (False, True):
            f = jax.jit(functools.partial(S.sparse_matmul_24, config=cfg, transpose_out=tr))
            t1 = time.time()
            f = f.lower(packed, b_t).compile()  # compile separately: tells a hang apart
            t2 = time.time()
            out = jax.block_until_ready(f(packed, b_t))
            err = rel_err(out.T if tr else out, ref)
            print(f"TUNE {name} {m}x{n}x{k} T={int(tr)} compile {t2 - t1:.1f}s "
                  f"run {time.time() - t2:.1f}s rel_err {err:.1e}", flush=True)
            worst = max(worst, err)
            ok &= err < 1e-2
    print(f"TUNE {name} check worst rel_err {worst:.2e} {'PASS' if ok else 'FAIL'} "
          f"({time.time() - t0:.0f}s)", flush=True)
    res = dict(name=name, ok=bool(ok), worst_err=worst, times={})
    for (m, n, k) in TUNE_TIME:
        key, k1, k2 = jax.random.split(key, 3)
        a, mask = random_24(k1, m, k)
        b_t = jax.random.normal(k2, (n, k), jnp.float32).astype(jnp.bfloat16)
        a_masked = jnp.where(mask, a, 0).astype(jnp.bfloat16)
        packed = jax.jit(P.pack_24)(a, mask)
        flops = 2.0 * m * n * k
        dense_ms, _ = gpu_time_ms(
            lambda x, y: jax.lax.dot_general(x, y, _NT, preferred_element_type=jnp.float32
                                             ).astype(jnp.bfloat16), a_masked, b_t, iters=iters)
        line = f"TUNE {name} {m}x{n}x{k} dense {flops / dense_ms / 1e9:.0f}"
        for tr in (False, True):
            f = functools.partial(S.sparse_matmul_24, config=cfg, transpose_out=tr)
            sp_ms, _ = gpu_time_ms(lambda v, mt, y, f=f: f(P.Packed24(v, mt), y),
                                   packed.values, packed.meta, b_t, iters=iters)
            res["times"][f"{m}x{n}x{k}{'T' if tr else ''}"] = [dense_ms, sp_ms]
            line += (f" | T={int(tr)} {flops / sp_ms / 1e9:.0f} TF/s "
                     f"ratio {dense_ms / sp_ms:.2f}x")
        print(line, f"({time.time() - t0:.0f}s)", flush=True)
        if out_jsonl:
            with open(out_jsonl, "a") as fh:
                fh.write(json.dumps(res) + "\n")
    return res


def pick(jsonl):
    """Best correct variant by 8192^3 transposed-out time (the backend's layout)."""
    import json

    best, best_ms = "v1", float("inf")
    last = {}
    for line in open(jsonl):
        r = json.loads(line)
        last[r["name"]] = r
    for name, r in last.items():
        t = r["times"].get("8192x8192x8192T") or r["times"].get("8192x8192x8192")
        if r["ok"] and t and t[1] < best_ms:
            best, best_ms = name, t[1]
    return best


# ------------------------------------------------------------------ correctness
CHECK_SHAPES = [  # (M, N, K) of C = A(M,K) @ B(K,N)
    (128, 128, 128), (256, 128, 256), (128, 384, 512), (512, 256, 768),
    (768, 1024, 384), (1024, 512, 2048), (2048, 2048, 2048), (3072, 8192, 768),
]


def check(shapes=CHECK_SHAPES, cfgs=None, seed=0):
    cfgs = cfgs or [S.SparseMatmulConfig()]
    worst = 0.0
    key = jax.random.key(seed)
    for (m, n, k) in shapes:
        key, sub = jax.random.split(key)
        packed, b_t, ref = random_case(sub, m, n, k)
        for cfg in cfgs:
            if m % cfg.cta_m or n % cfg.tile_n:
                continue
            for tr in (False, True):
                out = S.sparse_matmul_24(packed, b_t, config=cfg, transpose_out=tr)
                err = rel_err(out.T if tr else out, ref)
                worst = max(worst, err)
                print(f"check M={m} N={n} K={k} tiles=({cfg.tile_m},{cfg.tile_n}) "
                      f"T={int(tr)} rel_err={err:.2e} {'OK' if err < 1e-2 else 'FAIL'}")
    print(f"check: worst rel_err {worst:.2e} ({'PASS' if worst < 1e-2 else 'FAIL'})")
    return worst < 1e-2


# ------------------------------------------------------------------------- bench
BENCH_SHAPES = [
    (2048, 2048, 2048), (4096, 4096, 4096), (8192, 8192, 8192),
    (3072, 8192, 768), (768, 8192, 3072),  # BERT/ViT-B MLP, 8192 tokens
    (4096, 8192, 4096), (16384, 8192, 4096), (4096, 8192, 16384),
]


def bench(shapes=BENCH_SHAPES, cfg=None, iters=50, out_rows=None):
    cfg = cfg or S.SparseMatmulConfig()
    rows = []
    key = jax.random.key(1)
    for (m, n, k) in shapes:
        key, k1, k2 = jax.random.split(key, 3)
        a, mask = random_24(k1, m, k)
        b_t = jax.random.normal(k2, (n, k), jnp.float32).astype(jnp.bfloat16)
        a_masked = jnp.where(mask, a, 0).astype(jnp.bfloat16)
        pack = jax.jit(P.pack_24)
        packed = pack(a, mask)
        flops = 2.0 * m * n * k
        dense_ms, how = gpu_time_ms(
            lambda x, y: jax.lax.dot_general(x, y, _NT, preferred_element_type=jnp.float32
                                             ).astype(jnp.bfloat16), a_masked, b_t, iters=iters)
        sp = lambda v, mt, y: S.sparse_matmul_24(P.Packed24(v, mt), y, config=cfg)
        sparse_ms, _ = gpu_time_ms(sp, packed.values, packed.meta, b_t, iters=iters)
        v1 = lambda v, mt, y: S.sparse_matmul_24(P.Packed24(v, mt), y,
                                                 config=S.FALLBACK_CONFIG)
        v1_ms = (sparse_ms if cfg == S.FALLBACK_CONFIG
                 else gpu_time_ms(v1, packed.values, packed.meta, b_t, iters=iters)[0])
        spt = lambda v, mt, y: S.sparse_matmul_24(P.Packed24(v, mt), y, config=cfg,
                                                  transpose_out=True)
        sparse_t_ms, _ = gpu_time_ms(spt, packed.values, packed.meta, b_t, iters=iters)
        print(f"  transposed-out kernel: {flops / sparse_t_ms / 1e9:.0f} TF/s", flush=True)
        pack_ms, _ = gpu_time_ms(pack, a, mask, iters=max(10, iters // 5))
        out = sp(packed.values, packed.meta, b_t)
        err = rel_err(out, jax.lax.dot_general(
            a_masked.astype(jnp.float32), b_t.astype(jnp.float32), _NT,
            precision=jax.lax.Precision.HIGHEST))
        row = (m, n, k, flops / dense_ms / 1e9, flops / sparse_ms / 1e9,
               dense_ms / sparse_ms, pack_ms, err, how, flops / v1_ms / 1e9,
               flops / sparse_t_ms / 1e9, dense_ms / sparse_t_ms)
        rows.append(row)
        print(f"bench M={m} N={n} K={k} dense {row[3]:.0f} TF/s sparse {row[4]:.0f} TF/s "
              f"ratio {row[5]:.2f}x (transposed out {row[11]:.2f}x, v1 {row[9]:.0f} TF/s) "
              f"pack {pack_ms:.3f} ms err {err:.1e} ({how})", flush=True)
    return rows


LAYER_SHAPES = [(8192, 4096, 4096), (8192, 768, 3072), (8192, 3072, 768)]  # (rows, in, out)


def bench_layer(shapes=LAYER_SHAPES, iters=30, cfg=None):
    """``nm_dense`` forward + both backward products: pallas vs reference vs plain dense."""
    import nmjax.kernels  # noqa: F401  (registers "pallas")
    from nmjax import ops
    from nmjax.kernels import backend

    if cfg is not None:
        backend.DEFAULT_CONFIG = cfg

    rows_out = []
    key = jax.random.key(2)
    for (rows, n_in, n_out) in shapes:
        key, k1, k2, k3 = jax.random.split(key, 4)
        w = jax.random.normal(k1, (n_in, n_out), jnp.float32).astype(jnp.bfloat16)
        x = jax.random.normal(k2, (rows, n_in), jnp.float32).astype(jnp.bfloat16)
        g = jax.random.normal(k3, (rows, n_out), jnp.float32).astype(jnp.bfloat16)
        # a transposable-enough stand-in: 2:4 along in (fwd) and along out (bwd)
        _, fwd_t = random_24(k1, n_out, n_in)
        _, bwd = random_24(k2, n_in, n_out)
        fwd = fwd_t.T

        def step(x, w, fwd, bwd, g, backend):
            y, vjp = jax.vjp(lambda x, w: ops.nm_dense(x, w, fwd, bwd, backend=backend), x, w)
            return (y, *vjp(g))

        def dense_step(x, w, g):
            y, vjp = jax.vjp(jnp.dot, x, w)  # bf16 in/out; XLA accumulates in fp32
            return (y, *vjp(g))

        sp = jax.jit(functools.partial(step, backend="pallas"))
        ref = jax.jit(functools.partial(step, backend="reference"))
        t_sp, _ = gpu_time_ms(sp, x, w, fwd, bwd, g, iters=iters)
        t_ref, _ = gpu_time_ms(ref, x, w, fwd, bwd, g, iters=iters)
        t_dense, _ = gpu_time_ms(dense_step, x, w, g, iters=iters)
        got, want = sp(x, w, fwd, bwd, g), ref(x, w, fwd, bwd, g)
        errs = [rel_err(a, b) for a, b in zip(got, want, strict=True)]
        row = (rows, n_in, n_out, t_dense, t_ref, t_sp, t_dense / t_sp, t_ref / t_sp, max(errs))
        rows_out.append(row)
        print(f"layer rows={rows} in={n_in} out={n_out} dense {t_dense:.3f} ms masked-ref "
              f"{t_ref:.3f} ms pallas {t_sp:.3f} ms speedup vs dense {row[6]:.2f}x "
              f"vs ref {row[7]:.2f}x err {row[8]:.1e}", flush=True)
    return rows_out


def format_layer_table(rows):
    lines = [
        "| rows | in | out | dense fwd+bwd ms | masked reference ms | pallas ms "
        "| dense/pallas | reference/pallas | max rel err |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (r, i, o, td, tr, tp, s1, s2, e) in rows:
        lines.append(f"| {r} | {i} | {o} | {td:.3f} | {tr:.3f} | {tp:.3f} | {s1:.2f}x "
                     f"| {s2:.2f}x | {e:.1e} |")
    return "\n".join(lines)


def format_table(rows, cfg):
    lines = [
        "| M | N | K | dense XLA bf16 TFLOP/s | sparse kernel TFLOP/s | sparse/dense "
        "| transposed-out TFLOP/s | transposed/dense | v1 kernel TFLOP/s | pack ms | rel err |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (m, n, k, dt, st, ratio, pk, err, _, v1t, stt, rt) in rows:
        lines.append(
            f"| {m} | {n} | {k} | {dt:.0f} | {st:.0f} | {ratio:.2f}x | {stt:.0f} | {rt:.2f}x "
            f"| {v1t:.0f} | {pk:.3f} | {err:.1e} |")
    lines.append(f"\nconfig: {cfg}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("what", nargs="+",
                    choices=["probe", "check", "bench", "layer", "info", "tune", "pick"])
    ap.add_argument("--variant", default="",
                    help=f"named config (overrides the tile flags): {sorted(variants())}")
    ap.add_argument("--jsonl", default="", help="tune: append results here; pick: read")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--tile-m", type=int, default=128)
    ap.add_argument("--tile-n", type=int, default=128)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--in-flight", type=int, default=1)
    ap.add_argument("--md", default="", help="also write the tables (markdown) here")
    ap.add_argument("--shapes", default="")
    args = ap.parse_args(argv)
    cfg = S.SparseMatmulConfig(tile_m=args.tile_m, tile_n=args.tile_n,
                               max_concurrent_steps=args.stages,
                               mma_in_flight=args.in_flight)
    if args.variant:
        cfg = get_config(args.variant)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",") if s]
    if "pick" in args.what:
        print(pick(args.jsonl))
        return
    if "tune" in args.what:
        tune(args.variant or "default", iters=args.iters, out_jsonl=args.jsonl or None)
    if "info" in args.what:
        print("devices:", jax.devices(), "jax", jax.__version__)
    if "probe" in args.what:
        probe()
    if "check" in args.what:
        check(cfgs=[cfg] if cfg == S.FALLBACK_CONFIG else [cfg, S.FALLBACK_CONFIG])
    tables = []
    if "bench" in args.what:
        rows = bench(shapes or BENCH_SHAPES, cfg=cfg, iters=args.iters)
        tables.append("### Sparse GEMM `C = A·B`, A 2:4 (M×K), B given as (N×K)\n\n"
                      + format_table(rows, cfg))
        print("SPEEDUP_TABLE =", {r[:3]: round(r[5], 2) for r in rows})
    if "layer" in args.what:
        tables.append("### `nm_dense` forward + backward (y, dx, dw), bf16\n\n"
                      + format_layer_table(bench_layer(iters=max(10, args.iters // 2),
                                                       cfg=cfg)))
    for t in tables:
        print(t)
    if args.md and tables:
        dev = jax.devices()[0]
        with open(args.md, "w") as f:
            f.write(f"device: {getattr(dev, 'device_kind', dev)}; jax {jax.__version__}; "
                    f"command: python benchmarks/kernels.py {' '.join(args.what)}"
                    f"{' --variant ' + args.variant if args.variant else ''}\n\n")
            f.write("\n\n".join(tables) + "\n")


if __name__ == "__main__":
    main()
