"""GPU timings of the transposable N:M solvers: 8192x8192 at 2:4, 4:8 and 8:16.

  python benchmarks/gpu_masks.py OUT.md                 # on a machine with a GPU
  python benchmarks/gpu_masks.py OUT.md --budget 60     # at most ~60 s of timing per case

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
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nmjax.masks import is_transposable, transposable_mask  # noqa: E402

SIZE = (8192, 8192)
CASES = (((2, 4), ("exact24", "exact", "greedy", "greedy+repair")),
         ((4, 8), ("exact", "greedy", "greedy+repair")),
         ((8, 16), ("exact", "greedy", "greedy+repair")))
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
    args = p.parse_args()
    device = jax.devices()[0]
    if device.platform != "gpu" and not args.allow_cpu:
        sys.exit(f"no GPU: jax's first device is {device} ({device.platform}); "
                 "pass --allow-cpu to run anyway (the table then says so)")
    kind = getattr(device, "device_kind", device.platform)
    head = [f"# Transposable N:M solvers on {kind} ({device.platform})", "",
            f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, jax {jax.__version__}, "
            f"device {device}. Command: `python benchmarks/gpu_masks.py {' '.join(sys.argv[1:])}`",
            "", "| size | N:M | method | compile s | median s | runs | retained / exact | "
            "exactly N |", "|---|---|---|---:|---:|---:|---:|---|"]
    rows: list[str] = []

    def write() -> None:
        args.out.write_text("\n".join([*head, *rows, PUBLISHED, ""]))

    label = f"{SIZE[0]}x{SIZE[1]}"
    w = jax.random.normal(jax.random.key(0), SIZE, jnp.float32)
    scores = jnp.abs(w)
    s_np = np.asarray(scores, np.float64)
    a = jnp.asarray(w, jnp.bfloat16)
    try:  # the scale of a training step: one dense bf16 product of the same size
        comp, med, runs, _ = timed(lambda: a @ a, args.repeats, args.budget)
        rows.append(f"| {label} | - | dense bf16 matmul {SIZE[0]}^3 (for scale) | {comp} | {med} | "
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
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
