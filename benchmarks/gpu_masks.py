"""GPU timings of the mask solvers: the transposable ones at 8192x8192 (2:4, 4:8, 8:16),
and a refresh at LLM layer shapes against one dense training step of the same layer.

  python benchmarks/gpu_masks.py OUT.md                 # on a machine with a GPU
  python benchmarks/gpu_masks.py OUT.md --budget 60     # at most ~60 s of timing per case
  python benchmarks/gpu_masks.py OUT.md --parts llm     # only the LLM shapes

The LLM part (issue 22): at 4096x11008 and 8192x28672 (``in x out``), N:M 2:4, exact24
transposable 2:4, exact transposable 4:8, Bi-Mask 2:4's masks for a given permutation and its
permutation search (swap), each beside one dense bf16 training step of the same layer (the
forward product and both gradients, 4096 tokens), with the refresh time per billion weights
and the number of training steps one refresh costs, so a reader can choose
``refresh_every``.

Writes a markdown table to ``OUT.md`` after every case (so a run killed by an outer
timeout keeps the rows it finished) and prints each row as it goes. Each case runs under
its own try/except: an error (out of memory, a compile failure) becomes a row saying so and
the next case runs. Timing (docs/design.md, *Measuring*): the first call (compile) is
reported apart; then calls are repeated, ``jax.block_until_ready`` each, until ``--repeats``
or ``--budget`` seconds, and the median is reported. Scores are ``|w|`` of Gaussian weights
(float32); "retained" is the kept ``Σ|w|`` over that of the ``exact`` mask of the same
pattern. The TSENOR row is the published figure (H100, approximate), not a measurement.

Refuses to run without a GPU unless ``--allow-cpu`` is given, and the table names the
device it ran on, so a CPU figure cannot pass for a GPU one.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nmjax.masks import BiMask, is_transposable, nm_mask, transposable_mask  # noqa: E402

SIZE = (8192, 8192)
CASES = (((2, 4), ("exact24", "exact", "greedy", "greedy+repair")),
         ((4, 8), ("exact", "greedy", "greedy+repair")),
         ((8, 16), ("exact", "greedy", "greedy+repair")))
LLM_SHAPES = ((4096, 11008), (8192, 28672))
LLM_TOKENS = 4096
LLM_CASES = (
    ("2:4 nm", lambda w, s, p: nm_mask(s, 2, 4, axis=0)),
    ("2:4 transposable (exact24)", lambda w, s, p: transposable_mask(s, 2, 4, method="exact24")),
    ("4:8 transposable (exact)", lambda w, s, p: transposable_mask(s, 4, 8, method="exact")),
    ("2:4 Bi-Mask masks (given permutation)", lambda w, s, p: BiMask(2, 4)(w, 0, perm=p).bwd),
    ("2:4 Bi-Mask permutation search (swap)",
     lambda w, s, p: BiMask(2, 4).search_permutation(w, jax.random.key(1), init=p)),
)
PUBLISHED = ("| 8192x8192 | 8:16 | TSENOR (published: H100, approximate, 1-10% error) | - | "
             "0.12 | - | - | - |")


def timed(fn, repeats: int, budget: float):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    start = time.perf_counter()
    while len(times) < repeats and time.perf_counter() - start < budget:
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    if not times:  # the budget ran out: only the first call (compile included) was timed
        return f"{first:.2f} (first call)", "-", 0, out
    med = statistics.median(times)
    return f"{max(first - med, 0.0):.2f}", f"{med:.4f}", len(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="markdown file to write")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--budget", type=float, default=120.0, help="seconds of timing per case")
    p.add_argument("--allow-cpu", action="store_true", help="run without a GPU (testing)")
    p.add_argument("--parts", default="square,llm",
                   help="comma-separated, in order: square (8192^2 transposable), llm")
    p.add_argument("--append", action="store_true",
                   help="keep what OUT.md holds and add this run's tables after it")
    p.add_argument("--shrink", type=int, default=1,
                   help="divide every size by this (a CPU smoke run of the script)")
    args = p.parse_args()
    device = jax.devices()[0]
    if device.platform != "gpu" and not args.allow_cpu:
        sys.exit(f"no GPU: jax's first device is {device} ({device.platform}); "
                 "pass --allow-cpu to run anyway (the table then says so)")
    kind = getattr(device, "device_kind", device.platform)
    head = [f"# Mask solvers on {kind} ({device.platform})", "",
            f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, jax {jax.__version__}, "
            f"device {device}. Command: `python benchmarks/gpu_masks.py {' '.join(sys.argv[1:])}`",
            "", "| size | N:M | method | compile s | median s | runs | retained / exact | "
            "exactly N |", "|---|---|---|---:|---:|---:|---:|---|"]
    rows: list[str] = []
    llm_rows: list[str] = []
    llm_head = ["", "## Refresh at LLM layer shapes", "",
                "| layer (in x out) | what | compile s | median s | runs | s per 1e9 weights | "
                "dense training steps per refresh |", "|---|---|---:|---:|---:|---:|---:|"]

    before = args.out.read_text() + "\n" if args.append and args.out.exists() else ""

    def write() -> None:
        parts = ([*head, *rows, PUBLISHED] if rows else head[:3]) + (
            [*llm_head, *llm_rows] if llm_rows else [])
        args.out.write_text(before + "\n".join([*parts, ""]))

    parts = args.parts.split(",")
    for part in parts:
        if part == "llm":
            llm(args, llm_rows, write)
        elif part == "square":
            square(args, rows, write)
        else:
            sys.exit(f"--parts takes square and llm, got {part!r}")
    print(f"wrote {args.out}")


def llm(args, rows: list[str], write) -> None:
    """The LLM shapes: each solver's time beside one dense training step of the layer."""
    for d_in, d_out in LLM_SHAPES:
        d_in, d_out = d_in // args.shrink, d_out // args.shrink
        label = f"{d_in}x{d_out}"
        try:
            w = jax.random.normal(jax.random.key(0), (d_in, d_out), jnp.float32)
            x = jax.random.normal(jax.random.key(2), (LLM_TOKENS // args.shrink, d_in),
                                  jnp.bfloat16)
            wb = w.astype(jnp.bfloat16)
            step = jax.jit(jax.grad(lambda x, w: jnp.sum((x @ w).astype(jnp.float32)),
                                    argnums=(0, 1)))
            comp, dense, runs, _ = timed(functools.partial(step, x, wb), args.repeats,
                                         args.budget)
            rows.append(f"| {label} | dense bf16 training step ({x.shape[0]} tokens: "
                        f"forward, dX, dW) | {comp} | {dense} | {runs} | - | 1 |")
        except Exception as e:  # noqa: BLE001 - report and go on
            rows.append(f"| {label} | dense step | error: {type(e).__name__} | | | | |")
            dense = "-"
        print(rows[-1], flush=True)
        write()
        scores = jnp.abs(w)
        perm = jnp.arange(d_out, dtype=jnp.int32)
        for name, fn in LLM_CASES:
            try:
                solve = functools.partial(jax.jit(fn), w, scores, perm)
                comp, med, runs, _ = timed(solve, args.repeats, args.budget)
                per = (f"{float(med) * 1e9 / (d_in * d_out):.2f}" if runs else "-")
                steps = (f"{float(med) / float(dense):.1f}" if runs and dense != "-" else "-")
                rows.append(f"| {label} | {name} | {comp} | {med} | {runs} | {per} | "
                            f"{steps} |")
            except Exception as e:  # noqa: BLE001 - one failed case must not stop the rest
                msg = str(e).splitlines()[0][:120] if str(e) else ""
                rows.append(f"| {label} | {name} | error: {type(e).__name__}: {msg} | | | | |")
                traceback.print_exc()
            print(rows[-1], flush=True)
            write()


def square(args, rows: list[str], write) -> None:
    """The transposable solvers at 8192x8192 against the exact optimum."""
    size = (SIZE[0] // args.shrink, SIZE[1] // args.shrink)
    label = f"{size[0]}x{size[1]}"
    w = jax.random.normal(jax.random.key(0), size, jnp.float32)
    scores = jnp.abs(w)
    s_np = np.asarray(scores, np.float64)
    a = jnp.asarray(w, jnp.bfloat16)
    try:  # the scale of a training step: one dense bf16 product of the same size
        comp, med, runs, _ = timed(lambda: a @ a, args.repeats, args.budget)
        rows.append(f"| {label} | - | dense bf16 matmul {size[0]}^3 (for scale) | {comp} | {med} | "
                    f"{runs} | - | - |")
    except Exception as e:  # noqa: BLE001 - report and go on
        rows.append(f"| {label} | - | dense bf16 matmul | error: {type(e).__name__} | | | | |")
    print(rows[-1], flush=True)
    write()
    for (n, m), methods in CASES:
        opt = None
        for method in ("exact", *[x for x in methods if x != "exact"]):
            kw = {"method": method.split("+")[0], "repair": method.endswith("repair")}
            try:
                comp, med, runs, mask = timed(
                    lambda kw=kw, n=n, m=m: transposable_mask(scores, n, m, **kw),
                    args.repeats, args.budget)
                kept = float(np.sum(s_np * np.asarray(mask)))
                if method == "exact":
                    opt = kept
                ratio = f"{kept / opt:.6f}" if opt else "-"
                exact_n = bool(is_transposable(mask, n, m, exact=True))
                rows.append(f"| {label} | {n}:{m} | {method} | {comp} | {med} | {runs} | "
                            f"{ratio} | {'yes' if exact_n else 'no (at most N)'} |")
            except Exception as e:  # noqa: BLE001 - one failed case must not stop the rest
                msg = str(e).splitlines()[0][:120] if str(e) else ""
                rows.append(f"| {label} | {n}:{m} | {method} | error: {type(e).__name__}: "
                            f"{msg} | | | | |")
                traceback.print_exc()
            print(rows[-1], flush=True)
            write()


if __name__ == "__main__":
    main()
