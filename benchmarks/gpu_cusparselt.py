"""The cuSPARSELt backend on a GPU: build, correctness, plan cache, timings, speedup table.

  PYTHONPATH=. python3 benchmarks/gpu_cusparselt.py OUT.jsonl [--table T.json] [--md T.md]
      [--prebuilt LIB.so] [--quick] [--iters 20] [--append]

Steps, each guarded (a failure is recorded and the next step runs), each appending one JSON
line to OUT.jsonl as soon as it ends:

1. ``env``: device, jax, where the toolchain pieces were found.
2. ``build``: build the FFI library (timed) or take ``--prebuilt``; load; cuSPARSELt versions.
3. ``correct``: ``forward`` / ``input_grad`` (plain and Bi-Mask ``perm``) against the
   reference backend and an fp32 product, several shapes, bf16 and fp16, 2:4 / transposable /
   1:4 masks, zeros among the kept weights, ``search`` on and off.
4. ``plans``: repeated calls of a shape build no new plan; the cached plans and algorithms.
5. ``nm_dense``: forward + backward (y, dx, dw) through ``nmjax.ops.nm_dense`` with the backend
   against the reference backend (a local ``custom_vjp`` of the same contract if this
   ``nmjax.ops`` does not take a Backend value).
6. ``gemm``: each product vs dense XLA bf16 (and the Pallas backend where it runs) in this
   process; rewrites ``--table`` (the speedup table ``"auto"`` reads) after every shape.
7. ``layer``: ``nm_dense`` forward + backward vs dense XLA, the reference and Pallas.

Steps 6 and 7 also write one line per measurement (and refresh ``--md``) as they go; the
GEMMs come first, so a run cut short still leaves the speedup table. ``--quick`` (the GPU
check's budget) trims the correctness cases to one per mask kind, bf16 (plus one fp16), and
the shapes. ``--append`` adds the lines to OUT.jsonl (another script's, e.g. the GPU check's
``results.jsonl``) with each step named ``cusparselt <step>`` instead of starting it afresh.

Timing: CUPTI kernel time (``jax.experimental.mosaic.gpu.profiler.measure``, as
``benchmarks/kernels.py``), median of ``--iters`` runs after a warm-up (which includes the
one-time algorithm search), and wall-clock median of the same number of jitted calls.
Random normal inputs (never zeros), magnitude masks. TFLOP/s count the dense-equivalent
``2·M·N·K``. The cusparselt time covers the whole product: masking (and the Bi-Mask gathers),
cuSPARSELt's compress of W (every call: W changes every step), and the sparse matmul.
The exit status is 0 only if the library loaded and every correctness check passed.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nmjax import backends  # noqa: E402
from nmjax.backends import REFERENCE, Problem  # noqa: E402
from nmjax.kernels import cusparselt as cslt  # noqa: E402
from nmjax.kernels.cusparselt import _build, _ffi  # noqa: E402
from nmjax.masks import bimask, nm_mask, transposable_mask  # noqa: E402

# (rows, in, out), dtypes, mask kind
CORRECT_CASES = [
    ((64, 128, 256), ("bfloat16", "float16"), "transposable"),
    ((24, 64, 48), ("bfloat16", "float16"), "transposable"),  # rows 8·odd, in/out 16·odd
    ((256, 512, 768), ("bfloat16", "float16"), "bimask"),
    ((512, 768, 3072), ("bfloat16",), "nm"),
    ((1024, 3072, 768), ("bfloat16",), "bimask"),
    ((128, 256, 512), ("bfloat16",), "one_of_four"),
    ((128, 256, 512), ("bfloat16",), "zeros_kept"),
    ((2048, 4096, 4096), ("bfloat16",), "nm"),
]
# (M, N, K) of the sparse GEMM, as benchmarks/kernels.py: forward (out, rows, in),
# input grad (in, rows, out)
GEMM_SHAPES = [  # the most informative first: a timeout keeps what was measured
    (4096, 8192, 4096), (3072, 8192, 768), (768, 8192, 3072), (8192, 8192, 8192),
    (4096, 4096, 4096), (2048, 2048, 2048), (16384, 8192, 4096), (4096, 8192, 16384),
]
PERM_SHAPES = [(4096, 8192, 4096), (768, 8192, 3072)]
FP16_SHAPES = [(4096, 4096, 4096), (4096, 8192, 4096)]
LAYER_SHAPES = [(8192, 4096, 4096), (8192, 768, 3072), (8192, 3072, 768)]  # (rows, in, out)
QUICK = dict(gemm=[(4096, 4096, 4096), (3072, 8192, 768)], perm=[(3072, 8192, 768)],
             fp16=[], layer=[(8192, 768, 3072)])
QUICK_CORRECT_CASES = [  # one per mask kind, the odd-multiple shape, one fp16
    ((24, 64, 48), ("bfloat16", "float16"), "transposable"),
    ((256, 512, 768), ("bfloat16",), "bimask"),
    ((512, 768, 3072), ("bfloat16",), "nm"),
    ((128, 256, 512), ("bfloat16",), "one_of_four"),
    ((128, 256, 512), ("bfloat16",), "zeros_kept"),
]
TOL = 1e-2  # relative Frobenius error of a bf16/fp16 result with fp32 accumulation


class Recorder:
    """Appends one JSON line per step to the results file, as it goes."""

    def __init__(self, path: Path, append: bool = False):
        self.path, self.prefix = path, "cusparselt " if append else ""
        path.parent.mkdir(parents=True, exist_ok=True)
        if not append:
            path.write_text("")
        self.failed: list[str] = []

    def write(self, record: dict) -> None:
        if self.prefix and "step" in record:
            record = {**record, "step": self.prefix + record["step"]}
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        print(json.dumps(record, default=str)[:2000], flush=True)

    def step(self, name: str, fn, *args, **kwargs):
        """Runs one guarded step; records its result or its error."""
        start = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
            ok = not (isinstance(result, dict) and result.get("ok") is False)
        except Exception as e:  # noqa: BLE001  (every step is guarded, by design)
            result = dict(error=f"{type(e).__name__}: {e}",
                          traceback=traceback.format_exc()[-3000:])
            ok = False
        if not ok:
            self.failed.append(name)
        record = dict(step=name, ok=ok, seconds=round(time.perf_counter() - start, 2))
        record.update(result if isinstance(result, dict) else dict(result=result))
        self.write(record)
        return result if ok else None


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if not np.all(np.isfinite(out)):
        return float("inf")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def median_ms(f, *args, iters: int) -> dict:
    """CUPTI kernel time and wall-clock time (ms, medians) of ``f(*args)``, after a warm-up."""
    jf = jax.jit(f)
    jax.block_until_ready(jf(*args))
    out = {}
    try:
        from jax.experimental.mosaic.gpu import profiler

        _, times = profiler.measure(jf, iterations=iters)(*args)
        out["cupti"] = statistics.median(times) if times else None
    except Exception as e:  # noqa: BLE001
        out["cupti_error"] = f"{type(e).__name__}: {e}"
    walls = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(jf(*args))
        walls.append(time.perf_counter() - t)
    out["wall"] = 1e3 * statistics.median(walls)
    out["ms"] = out.get("cupti") or out["wall"]
    return out


def kernel_breakdown(f, *args) -> list | None:
    """Per-kernel CUPTI times (name, ms) of one call: where the cusparselt time goes."""
    try:
        from jax.experimental.mosaic.gpu import profiler

        _, kernels = profiler.measure(jax.jit(f), aggregate=False)(*args)
        return [(name[:80], round(ms, 4)) for name, ms in (kernels or [])]
    except Exception as e:  # noqa: BLE001
        return [("error", f"{type(e).__name__}: {e}")]


def device_problem(direction, rows, n_in, n_out, dtype, permuted=False) -> Problem:
    platform, kind, cc = backends.device_facts()
    return Problem(direction, rows, n_in, n_out, jnp.dtype(dtype), platform, kind, cc, (2, 4),
                   permuted)


def operands(key, rows, n_in, n_out, dtype):
    k1, k2, k3 = jax.random.split(key, 3)
    w32 = jax.random.normal(k1, (n_in, n_out), jnp.float32)
    x = jax.random.normal(k2, (rows, n_in), jnp.float32).astype(dtype)
    dy = jax.random.normal(k3, (rows, n_out), jnp.float32).astype(dtype)
    return x, w32.astype(dtype), dy, w32


def masks(kind, w32, key):
    """(fwd, bwd, perm): fwd at most 2 of 4 along in, bwd along out (in perm order)."""
    absw = jnp.abs(w32)
    if kind == "transposable":
        m = transposable_mask(absw, 2, 4)
        return m, m, None
    if kind == "bimask":
        perm = jax.random.permutation(key, w32.shape[1]).astype(jnp.int32)
        fwd, bwd, perm = bimask(w32, 2, 4, perm)
        return fwd, bwd, perm
    n = 1 if kind == "one_of_four" else 2
    return nm_mask(absw, n, 4, axis=0), nm_mask(absw, n, 4, axis=1), None


# ----------------------------------------------------------------------------------- steps


def step_env() -> dict:
    platform, kind, cc = backends.device_facts()
    info = dict(jax=jax.__version__, devices=str(jax.devices()), platform=platform,
                device_kind=kind, compute_capability=cc, cache=str(_build.cache_dir()),
                unavailable=_build.unavailable())
    try:
        tc = _build.find_toolchain(need_compiler=False)
        info["toolchain"] = {k: str(v) for k, v in vars(tc).items()}
    except cslt.BuildError as e:
        info["toolchain_error"] = str(e)
    return info


def step_build(prebuilt: str | None) -> dict:
    out: dict = {}
    try:
        start = time.perf_counter()
        out["library"] = str(_build.prebuilt() or _build.build())
        out["build_seconds"] = round(time.perf_counter() - start, 2)
    except cslt.BuildError as e:
        out["build_error"] = str(e)
        if not prebuilt or not Path(prebuilt).is_file():
            raise cslt.BuildError(
                f"cannot build here ({e}) and no prebuilt library was given (--prebuilt): build "
                "one on a machine with g++ and the CUDA headers (python -m "
                "nmjax.kernels.cusparselt build) and carry it") from e
        os.environ[_build.ENV_LIBRARY] = str(Path(prebuilt).resolve())
        _build.unavailable.cache_clear()
        out["library"] = os.environ[_build.ENV_LIBRARY]
    _ffi.load.cache_clear()
    _ffi.load()
    header, runtime = _ffi.versions()
    out.update(header_version=header, runtime_version=runtime)
    problem = device_problem("forward", 64, 128, 256, jnp.bfloat16)
    out["supports"] = cslt.cusparselt_backend().supports(problem)
    out["ok"] = out["supports"] is None
    return out


def step_correct(cases=CORRECT_CASES) -> dict:
    results, worst = [], 0.0
    key = jax.random.key(0)
    for (rows, n_in, n_out), dtypes, kind in cases:
        for dtype_name in dtypes:
            dtype = jnp.dtype(dtype_name)
            key, k1, k2 = jax.random.split(key, 3)
            x, w, dy, w32 = operands(k1, rows, n_in, n_out, dtype)
            fwd, bwd, perm = masks(kind, w32, k2)
            if kind == "zeros_kept":  # kept weights that are 0: groups with < 2 nonzeros
                w = jnp.where(jax.random.bernoulli(k2, 0.3, w.shape), 0, w).astype(dtype)
            hi = jax.lax.Precision.HIGHEST
            exact = [
                REFERENCE.forward(x.astype(jnp.float32), w.astype(jnp.float32), fwd,
                                  precision=hi),
                REFERENCE.input_grad(dy.astype(jnp.float32), w.astype(jnp.float32), bwd, perm,
                                     precision=hi)]
            for search in ((True, False) if kind == "transposable" else (True,)):
                b = cslt.cusparselt_backend(search=search)
                got = [jax.jit(b.forward)(x, w, fwd), jax.jit(b.input_grad)(dy, w, bwd, perm)]
                ref = [REFERENCE.forward(x, w, fwd), REFERENCE.input_grad(dy, w, bwd, perm)]
                for name, g, r, e in zip(("forward", "input_grad"), got, ref, exact,
                                         strict=True):
                    err, err_ref = rel_err(g, e), rel_err(r, e)
                    ok = g.dtype == dtype and g.shape == r.shape and err < TOL
                    worst = max(worst, err)
                    results.append(dict(shape=(rows, n_in, n_out), dtype=dtype_name, masks=kind,
                                        perm=perm is not None, search=search, product=name,
                                        rel_err=err, reference_rel_err=err_ref, ok=bool(ok)))
                    print(f"correct {rows}x{n_in}x{n_out} {dtype_name} {kind} {name} "
                          f"search={search} rel_err {err:.2e} (reference {err_ref:.2e}) "
                          f"{'OK' if ok else 'FAIL'}", flush=True)
    return dict(ok=all(r["ok"] for r in results), worst_rel_err=worst, cases=results)


def step_plans() -> dict:
    x, w, _, w32 = operands(jax.random.key(1), 256, 512, 768, jnp.bfloat16)
    fwd, _, _ = masks("nm", w32, None)
    f = jax.jit(cslt.cusparselt_backend().forward)
    jax.block_until_ready(f(x, w, fwd))
    before = len(_ffi.plans())
    for _ in range(3):
        jax.block_until_ready(f(x, w, fwd))
    after = len(_ffi.plans())
    return dict(ok=before == after, plans_before=before, plans_after=after, plans=_ffi.plans())


def local_nm_dense(backend):
    """``nm_dense``'s 2-D contract as a custom_vjp over ``backend``'s two products (used when
    this checkout's ``nmjax.ops`` does not take a Backend value)."""
    @jax.custom_vjp
    def f(x, w, fwd, bwd, perm):
        return backend.forward(x, w, fwd)

    def f_fwd(x, w, fwd, bwd, perm):
        return backend.forward(x, w, fwd), (x, w, fwd, bwd, perm)

    def f_bwd(res, dy):
        x, w, fwd, bwd, perm = res
        dx = backend.input_grad(dy, w, bwd, perm)
        dw = jnp.matmul(x.T, dy, preferred_element_type=jnp.float32).astype(w.dtype)
        return dx, dw, None, None, None

    f.defvjp(f_fwd, f_bwd)
    return f


def layer_fn(backend):
    """(x, w, fwd, bwd, perm, g) -> (y, dx, dw) with ``backend``; says which path it took."""
    from nmjax import ops

    def step(x, w, fwd, bwd, perm, g, product):
        y, vjp = jax.vjp(lambda x, w: product(x, w, fwd, bwd, perm), x, w)
        return (y, *vjp(g))

    def via_ops(x, w, fwd, bwd, perm):
        return ops.nm_dense(x, w, fwd, bwd, perm=perm, backend=backend, fwd_nm=(2, 4),
                            bwd_nm=(2, 4))

    try:  # does this nmjax.ops take a Backend value?
        probe = jnp.ones((16, 16), jnp.bfloat16), jnp.ones((16, 16), bool)
        jax.eval_shape(lambda x, m: via_ops(x, x, m, m, None), *probe)
        product, path = via_ops, "nmjax.ops.nm_dense"
    except (TypeError, ValueError) as e:
        if backend is REFERENCE:
            product, path = (lambda x, w, fwd, bwd, perm: ops.nm_dense(
                x, w, fwd, bwd, perm=perm, backend="reference")), "nmjax.ops.nm_dense"
        else:
            why = f"{type(e).__name__}: {e!s:.100}"
            product, path = local_nm_dense(backend), f"local custom_vjp ({why})"
    return functools.partial(step, product=product), path


def step_nm_dense() -> dict:
    results = []
    for (rows, n_in, n_out), kind in (((256, 512, 768), "transposable"),
                                      ((1024, 3072, 768), "bimask")):
        x, w, g, w32 = operands(jax.random.key(2), rows, n_in, n_out, jnp.bfloat16)
        fwd, bwd, perm = masks(kind, w32, jax.random.key(3))
        sparse, path = layer_fn(cslt.cusparselt_backend())
        ref, _ = layer_fn(REFERENCE)
        got = jax.jit(sparse)(x, w, fwd, bwd, perm, g)
        want = jax.jit(ref)(x, w, fwd, bwd, perm, g)
        errs = {n: rel_err(a, b) for n, a, b in zip(("y", "dx", "dw"), got, want, strict=True)}
        results.append(dict(shape=(rows, n_in, n_out), masks=kind, path=path, rel_err=errs,
                            ok=max(errs.values()) < TOL))
    return dict(ok=all(r["ok"] for r in results), cases=results)


def pallas_backend():
    try:
        return backends.named("pallas"), None
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"


class Table:
    """The speedup table ``"auto"`` reads, rewritten after every measurement."""

    def __init__(self, path: Path | None):
        self.path, self.entries = path, []

    def add(self, direction, dtype, permuted, gemm, speedup) -> None:
        _, kind, _ = backends.device_facts()
        self.entries.append(dict(device_kind=kind, direction=direction, dtype=dtype,
                                 permuted=permuted, gemm=list(gemm), speedup=round(speedup, 3)))
        if self.path is None:
            return
        _, runtime = _ffi.versions()
        self.path.write_text(json.dumps(dict(
            about=("Measured speedups of the cusparselt backend over dense XLA, per device "
                   "kind, product direction, dtype and GEMM shape (M, N, K). Written by "
                   "benchmarks/gpu_cusparselt.py --table; never edit by hand."),
            measured=dict(date=datetime.date.today().isoformat(), jax=jax.__version__,
                          cusparselt=runtime, device_kind=kind),
            entries=self.entries), indent=1) + "\n")


def step_gemm(table: Table, shapes, perm_shapes, fp16_shapes, iters: int, emit) -> dict:
    pallas, pallas_why = pallas_backend()
    b = cslt.cusparselt_backend()
    rows_out = []
    key = jax.random.key(4)
    cases = [(s, "bfloat16", False) for s in shapes] + [(s, "bfloat16", True) for s in
                                                        perm_shapes]
    cases += [(s, "float16", False) for s in fp16_shapes]
    for (m, n, k), dtype_name, permuted in cases:
        dtype = jnp.dtype(dtype_name)
        for direction in ("forward", "input_grad") if not permuted else ("input_grad",):
            key, k1, k2 = jax.random.split(key, 3)
            if direction == "forward":  # Y (rows=N, out=M) = X (N, in=K) · W (K, M)
                rows, n_in, n_out = n, k, m
            else:  # dX (rows=N, in=M) = dY (N, out=K) · Wᵀ
                rows, n_in, n_out = n, m, k
            x, w, dy, w32 = operands(k1, rows, n_in, n_out, dtype)
            fwd, bwd, perm = masks("nm", w32, None)
            if permuted:
                perm = jax.random.permutation(k2, n_out).astype(jnp.int32)
                bwd = jnp.zeros_like(bwd).at[:, perm].set(
                    nm_mask(jnp.abs(w32[:, perm]), 2, 4, axis=1))
            if direction == "forward":
                dense_f, dense_args = (lambda a, w: a @ w), (x, w)
                sparse_f, sparse_args = b.forward, (x, w, fwd)
                pallas_args = (x, w, fwd)
            else:
                dense_f, dense_args = (lambda a, w: a @ w.T), (dy, w)
                sparse_f = (lambda a, w, msk, p: b.input_grad(a, w, msk, p))
                sparse_args = (dy, w, bwd, perm)
                pallas_args = (dy, w, bwd, perm)
            flops = 2.0 * m * n * k
            dense = median_ms(dense_f, *dense_args, iters=iters)
            sparse = median_ms(sparse_f, *sparse_args, iters=iters)
            row = dict(gemm=(m, n, k), direction=direction, dtype=dtype_name, permuted=permuted,
                       dense_ms=dense, cusparselt_ms=sparse,
                       dense_tflops=flops / dense["ms"] / 1e9,
                       cusparselt_tflops=flops / sparse["ms"] / 1e9,
                       speedup=dense["ms"] / sparse["ms"])
            if pallas is not None:
                problem = device_problem(direction, rows, n_in, n_out, dtype, permuted)
                why = pallas.supports(problem)
                if why is None:
                    fn = pallas.forward if direction == "forward" else pallas.input_grad
                    try:
                        p = median_ms(fn, *pallas_args, iters=iters)
                        row.update(pallas_ms=p, pallas_speedup=dense["ms"] / p["ms"])
                    except Exception as e:  # noqa: BLE001
                        row["pallas_error"] = f"{type(e).__name__}: {e}"[:300]
                else:
                    row["pallas_error"] = why
            else:
                row["pallas_error"] = pallas_why
            if (m, n, k) == (8192, 8192, 8192) and not permuted:
                row["cusparselt_kernels"] = kernel_breakdown(sparse_f, *sparse_args)
            rows_out.append(row)
            emit("gemm", row, rows_out)
            table.add(direction, dtype_name, permuted, (m, n, k), row["speedup"])
            print(f"gemm {direction} M={m} N={n} K={k} {dtype_name} perm={permuted}: dense "
                  f"{row['dense_tflops']:.0f} TF/s cusparselt {row['cusparselt_tflops']:.0f} TF/s"
                  f" ratio {row['speedup']:.2f}x"
                  + (f" pallas {row['pallas_speedup']:.2f}x" if "pallas_speedup" in row else ""),
                  flush=True)
    return dict(rows=rows_out)


def step_layer(shapes, iters: int, emit) -> dict:
    pallas, pallas_why = pallas_backend()
    rows_out = []
    for (rows, n_in, n_out) in shapes:
        x, w, g, w32 = operands(jax.random.key(5), rows, n_in, n_out, jnp.bfloat16)
        fwd, bwd, _ = masks("nm", w32, None)

        def dense_step(x, w, g):
            y, vjp = jax.vjp(jnp.dot, x, w)  # bf16 in/out, fp32 accumulation in cuBLAS
            return (y, *vjp(g))

        sparse, path = layer_fn(cslt.cusparselt_backend())
        ref, _ = layer_fn(REFERENCE)
        t_dense = median_ms(dense_step, x, w, g, iters=iters)
        t_ref = median_ms(ref, x, w, fwd, bwd, None, g, iters=iters)
        t_sp = median_ms(sparse, x, w, fwd, bwd, None, g, iters=iters)
        got, want = jax.jit(sparse)(x, w, fwd, bwd, None, g), jax.jit(ref)(x, w, fwd, bwd, None,
                                                                            g)
        row = dict(shape=(rows, n_in, n_out), path=path, dense_ms=t_dense, reference_ms=t_ref,
                   cusparselt_ms=t_sp, speedup_vs_dense=t_dense["ms"] / t_sp["ms"],
                   speedup_vs_reference=t_ref["ms"] / t_sp["ms"],
                   max_rel_err=max(rel_err(a, b) for a, b in zip(got, want, strict=True)))
        if pallas is not None:
            try:
                pal, _ = layer_fn(pallas)
                t_p = median_ms(pal, x, w, fwd, bwd, None, g, iters=iters)
                row.update(pallas_ms=t_p, pallas_speedup_vs_dense=t_dense["ms"] / t_p["ms"])
            except Exception as e:  # noqa: BLE001
                row["pallas_error"] = f"{type(e).__name__}: {e}"[:300]
        else:
            row["pallas_error"] = pallas_why
        rows_out.append(row)
        emit("layer", row, rows_out)
        print(f"layer rows={rows} in={n_in} out={n_out}: dense {t_dense['ms']:.3f} ms reference "
              f"{t_ref['ms']:.3f} ms cusparselt {t_sp['ms']:.3f} ms "
              f"({row['speedup_vs_dense']:.2f}x dense) err {row['max_rel_err']:.1e}", flush=True)
    return dict(ok=all(r["max_rel_err"] < TOL for r in rows_out), rows=rows_out)


def markdown(build, gemm, layer) -> str:
    _, kind, cc = backends.device_facts()
    version = (build or {}).get("runtime_version") or 0
    lines = [f"device: {kind} (sm {cc}); jax {jax.__version__}; cuSPARSELt "
             f"{version // 10000}.{version // 100 % 100}.{version % 100}; "
             f"{datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}", ""]
    if gemm and gemm["rows"]:
        lines += ["### Sparse products vs dense XLA bf16 (cusparselt = mask + compress + matmul)",
                  "", "| product | M | N | K | dtype | perm | dense TFLOP/s | cusparselt TFLOP/s "
                  "| cusparselt/dense | pallas/dense |", "|---|---:|---:|---:|---|---|---:|---:|"
                  "---:|---:|"]
        for r in gemm["rows"]:
            m, n, k = r["gemm"]
            pal = f"{r['pallas_speedup']:.2f}x" if "pallas_speedup" in r else "–"
            lines.append(f"| {r['direction']} | {m} | {n} | {k} | {r['dtype']} | "
                         f"{'yes' if r['permuted'] else ''} | {r['dense_tflops']:.0f} | "
                         f"{r['cusparselt_tflops']:.0f} | {r['speedup']:.2f}x | {pal} |")
    if layer and layer["rows"]:
        lines += ["", "### `nm_dense` forward + backward (y, dx, dw), bf16", "",
                  "| rows | in | out | dense ms | reference ms | cusparselt ms | pallas ms "
                  "| dense/cusparselt | max rel err |", "|---:|---:|---:|---:|---:|---:|---:|"
                  "---:|---:|"]
        for r in layer["rows"]:
            rows, n_in, n_out = r["shape"]
            pal = f"{r['pallas_ms']['ms']:.3f}" if "pallas_ms" in r else "–"
            lines.append(f"| {rows} | {n_in} | {n_out} | {r['dense_ms']['ms']:.3f} | "
                         f"{r['reference_ms']['ms']:.3f} | {r['cusparselt_ms']['ms']:.3f} | {pal} "
                         f"| {r['speedup_vs_dense']:.2f}x | {r['max_rel_err']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, help="JSON lines, one per step, written as it goes")
    ap.add_argument("--table", type=Path, default=None,
                    help="write the speedup table here (copy it to "
                         "nmjax/kernels/cusparselt/speedups.json to let 'auto' use it)")
    ap.add_argument("--md", type=Path, default=None, help="write markdown tables here")
    ap.add_argument("--prebuilt", default=None,
                    help="handler library to use if it cannot be built on this machine")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--quick", action="store_true",
                    help="fewer correctness cases and shapes (under a minute)")
    ap.add_argument("--append", action="store_true",
                    help="append to RESULTS, steps named 'cusparselt <step>'")
    args = ap.parse_args(argv)

    rec = Recorder(args.results, append=args.append)
    rec.step("env", step_env)
    build = rec.step("build", step_build, args.prebuilt)
    if build is None:
        print("gpu_cusparselt: the library is not usable here; see the build record", flush=True)
        return 2
    rec.step("correct", step_correct, QUICK_CORRECT_CASES if args.quick else CORRECT_CASES)
    rec.step("plans", step_plans)
    rec.step("nm_dense", step_nm_dense)
    table = Table(args.table)
    q = QUICK if args.quick else dict(gemm=GEMM_SHAPES, perm=PERM_SHAPES, fp16=FP16_SHAPES,
                                      layer=LAYER_SHAPES)
    so_far: dict = {"layer": [], "gemm": []}

    def emit(step: str, row: dict, rows: list) -> None:
        """One line per measurement and a fresh markdown file, so a timeout keeps them."""
        rec.write(dict(step=f"{step}_row", **row))
        so_far[step] = rows
        if args.md:
            args.md.write_text(markdown(build, dict(rows=so_far["gemm"]),
                                        dict(rows=so_far["layer"])))

    rec.step("gemm", step_gemm, table, q["gemm"], q["perm"], q["fp16"], args.iters, emit)
    rec.step("layer", step_layer, q["layer"], max(5, args.iters // 2), emit)
    rec.write(dict(step="done", failed=rec.failed))
    return 1 if rec.failed else 0


if __name__ == "__main__":
    sys.exit(main())
