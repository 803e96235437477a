"""Bi-Mask permutation search: backward-mask quality and search time.

  .venv/bin/python benchmarks/bimask.py            # full table, writes results/bimask.md
  .venv/bin/python benchmarks/bimask.py --quick    # small shapes, prints only

For each shape and pattern, on i.i.d. Gaussian weights (key 0): the fraction of the
forward-kept magnitude (and count) that the backward mask keeps, for the identity
permutation, the official random search (K=100, count score), random with the magnitude
score, and the pairwise-swap search. Times: the whole search (forward mask included),
``jax.block_until_ready``, median of ``--reps`` runs after a warm-up; compile time is the
first call minus that median.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from nmjax.masks import bimask, search_permutation  # noqa: E402

SHAPES = [(768, 3072), (3072, 768), (4096, 4096)]
QUICK_SHAPES = [(256, 512)]
PATTERNS = [(2, 4), (4, 8)]


def methods(m: int) -> list[tuple[str, dict | None]]:
    default_rounds = max(1, 8 // m)
    return [
        ("identity", None),
        ("random K=100, count (official)", dict(method="random", num_candidates=100)),
        ("random K=100, magnitude", dict(method="random", num_candidates=100,
                                         score="magnitude")),
        (f"swap, {default_rounds} round(s) (default)", dict(method="swap")),
        (f"swap, {4 * default_rounds} rounds", dict(method="swap", rounds=4 * default_rounds)),
        (f"swap, {16 * default_rounds} rounds", dict(method="swap", rounds=16 * default_rounds)),
    ]


def timed(fn, reps: int) -> tuple[jax.Array, float, float]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return out, median, max(first - median, 0.0)


def run(shapes, reps: int) -> list[str]:
    lines = []
    key = jax.random.key(1)
    for shape in shapes:
        w = jax.random.normal(jax.random.key(0), shape)
        mag = jnp.abs(w)
        for n, m in PATTERNS:
            lines += [f"### {shape[0]}×{shape[1]} (in × out), {n}:{m}", "",
                      "| search | bwd/fwd magnitude | bwd/fwd count | search time (s) "
                      "| time / official | compile (s) |",
                      "|---|---:|---:|---:|---:|---:|"]
            base_time = None
            for name, opts in methods(m):
                if opts is None:
                    perm, t, c = jnp.arange(shape[1], dtype=jnp.int32), 0.0, 0.0
                else:
                    search = functools.partial(search_permutation, w, n, m, key=key, **opts)
                    perm, t, c = timed(search, reps)
                fwd, bwd, _ = bimask(w, n, m, perm=perm)
                frac_mag = float(jnp.sum(mag * bwd) / jnp.sum(mag * fwd))
                frac_cnt = float(jnp.sum(bwd) / jnp.sum(fwd))
                if name.startswith("random K=100, count"):
                    base_time = t
                ratio = f"{t / base_time:.2f}" if base_time and opts is not None else "—"
                timing = f"{t:.3f}" if opts is not None else "—"
                compile_s = f"{c:.2f}" if opts is not None else "—"
                row = (f"| {name} | {frac_mag:.5f} | {frac_cnt:.5f} | {timing} | {ratio} "
                       f"| {compile_s} |")
                lines.append(row)
                print(row, flush=True)
            lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, no results file")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per method (median)")
    parser.add_argument("--shape", action="append", default=None, metavar="INxOUT",
                        help="only these shapes (repeatable), prints only")
    args = parser.parse_args()
    if args.shape:
        args.quick = True
    load_start = os.getloadavg()
    started = datetime.datetime.now(datetime.UTC)
    shapes = SHAPES
    if args.shape:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shape]
    elif args.quick:
        shapes = QUICK_SHAPES
    lines = run(shapes, args.reps)
    load_end = os.getloadavg()
    cmd = "python benchmarks/bimask.py" + (" --quick" if args.quick else "")
    header = [
        "# Bi-Mask: backward-mask quality and permutation-search time",
        "",
        f"- command: `{cmd}` (reps={args.reps}; median time, warm-up excluded)",
        f"- machine: {os.cpu_count()}-core CPU ({platform.machine()}), shared with other jobs; "
        f"jax {jax.__version__}, backend {jax.default_backend()}",
        f"- date: {started:%Y-%m-%d %H:%M} UTC",
        f"- load average (1, 5, 15 min) at start: {', '.join(f'{x:.2f}' for x in load_start)}; "
        f"at end: {', '.join(f'{x:.2f}' for x in load_end)}",
        "- weights: i.i.d. standard normal (`jax.random.key(0)`); search key "
        "`jax.random.key(1)`",
        "- bwd/fwd magnitude: `Σ|w|·bwd / Σ|w|·fwd` (the fraction of forward-kept magnitude the "
        "backward mask keeps); bwd/fwd count: the same for counts",
        "- time / official: search time over that of the official random search (K=100, count) "
        "in the same run",
        "",
    ]
    text = "\n".join(header + lines)
    if not args.quick:
        out = ROOT / "benchmarks" / "results" / "bimask.md"
        out.write_text(text)
        print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
