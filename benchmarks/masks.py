"""Mask benchmarks on the CPU: transposable N:M methods against exact baselines, and N:M.

  .venv/bin/python benchmarks/masks.py                 # everything (several minutes)
  .venv/bin/python benchmarks/masks.py --quick         # 1024x1024 only, fewer repeats
  .venv/bin/python benchmarks/masks.py --only nm       # the N:M table only
  .venv/bin/python benchmarks/masks.py --sizes 1024x1024 --patterns 4:8 --methods exact,ortools

Prints markdown tables. Timing (DESIGN §5): ``jax.block_until_ready``; the first call is
reported as compile (first call minus the median of the next ones); median of
``--repeats`` further calls. Scores are ``|w|`` of Gaussian weights. "retained" is the kept
``Σ|w|`` over that of the exact optimum on the same matrix (the ``exact`` method's mask,
cross-checked against OR-tools when installed). Baselines (optional imports, the ``bench``
extra): OR-tools' min-cost flow with all tiles in one graph (integer costs: scores scaled
to 2^30 / max), and networkx's min-cost flow per tile on a sample of tiles, extrapolated.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nmjax.masks import is_transposable, nm_mask, transposable_mask  # noqa: E402
from nmjax.tree import MaskRule, build_masks  # noqa: E402

SIZES = ((1024, 1024), (4096, 4096), (768, 3072))
PATTERNS = ((2, 4), (4, 8), (8, 16))
METHODS = ("exact24", "exact", "greedy", "greedy+repair", "ortools", "networkx")


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float, object]:
    """(compile-ish first-call overhead, median seconds, result)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    med = statistics.median(times) if times else first
    return max(first - med, 0.0), med, out


def tiles(x: np.ndarray, m: int) -> np.ndarray:
    r, c = x.shape
    return x.reshape(r // m, m, c // m, m).swapaxes(1, 2).reshape(-1, m, m)


def untile(t: np.ndarray, shape: tuple[int, int], m: int) -> np.ndarray:
    r, c = shape
    return t.reshape(r // m, c // m, m, m).swapaxes(1, 2).reshape(r, c)


def int_costs(s: np.ndarray) -> np.ndarray:
    """Scores as int64 for the integer min-cost-flow solvers (2^30 / max scale)."""
    scale = float(2**30) / max(float(s.max()), 1e-30)
    return np.rint(s.astype(np.float64) * scale).astype(np.int64)


def ortools_mask(s: np.ndarray, n: int, m: int) -> np.ndarray:
    """All tiles in one OR-tools min-cost flow: per tile m row nodes (supply n), m column
    nodes (demand n), m^2 unit-capacity arcs of cost -score."""
    from ortools.graph.python import min_cost_flow

    t = tiles(s, m)
    nt = t.shape[0]
    cost = -int_costs(t)
    tile = np.arange(nt)[:, None, None]
    r = np.arange(m)[None, :, None]
    c = np.arange(m)[None, None, :]
    tails = np.broadcast_to(tile * 2 * m + r, t.shape).ravel()
    heads = np.broadcast_to(tile * 2 * m + m + c, t.shape).ravel()
    flow = min_cost_flow.SimpleMinCostFlow()
    arcs = flow.add_arcs_with_capacity_and_unit_cost(
        tails.astype(np.int32), heads.astype(np.int32), np.ones(tails.size, np.int64),
        cost.ravel())
    nodes = np.arange(nt * 2 * m, dtype=np.int32)
    supplies = np.where(nodes % (2 * m) < m, n, -n).astype(np.int64)
    flow.set_nodes_supplies(nodes, supplies)
    status = flow.solve()
    if status != flow.OPTIMAL:
        raise RuntimeError(f"OR-tools min-cost flow status {status}")
    kept = flow.flows(arcs).reshape(t.shape) > 0
    return untile(kept, s.shape, m)


def networkx_tile(tile: np.ndarray, n: int) -> np.ndarray:
    import networkx as nx

    m = tile.shape[0]
    cost = int_costs(tile)
    g = nx.DiGraph()
    for i in range(m):
        g.add_node(("r", i), demand=-n)
        g.add_node(("c", i), demand=n)
    for i in range(m):
        for j in range(m):
            g.add_edge(("r", i), ("c", j), capacity=1, weight=-int(cost[i, j]))
    flow = nx.min_cost_flow(g)
    return np.array([[flow[("r", i)][("c", j)] > 0 for j in range(m)] for i in range(m)])


def have(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def transposable_table(args) -> list[str]:
    rows = ["| size | N:M | method | compile s | median s | retained / optimum | exactly N |",
            "|---|---|---|---:|---:|---:|---|"]
    greedy_ratios: dict[str, list[float]] = {}
    for shape in args.sizes:
        w = jax.random.normal(jax.random.key(0), shape, jnp.float32)
        s = jnp.abs(w)
        s_np = np.asarray(s)
        for n, m in args.patterns:
            opt_mask = None
            results = []
            methods = [x for x in args.methods if not (x == "exact24" and (n, m) != (2, 4))]
            if "exact" not in methods:
                methods = ["exact", *methods]
            for method in methods:
                label = f"{shape[0]}x{shape[1]} {n}:{m} {method}"
                print(f"  {label} ...", file=sys.stderr, flush=True)
                if method in ("exact24", "exact", "greedy", "greedy+repair"):
                    kw = {"method": method.split("+")[0], "repair": method.endswith("repair")}
                    fn = lambda kw=kw, s=s, n=n, m=m: transposable_mask(s, n, m, **kw)  # noqa: E731
                    compile_s, med, mask = timed(fn, args.repeats)
                    mask = np.asarray(mask)
                elif method == "ortools":
                    if not have("ortools"):
                        continue
                    fn = lambda s=s_np, n=n, m=m: ortools_mask(s, n, m)  # noqa: E731
                    _, med, mask = timed(fn, args.base_repeats)
                    compile_s = None
                else:  # networkx, per tile on a sample, extrapolated
                    if not have("networkx"):
                        continue
                    all_tiles = tiles(s_np, m)
                    pick = np.random.default_rng(0).choice(len(all_tiles), args.nx_sample,
                                                           replace=False)
                    t0 = time.perf_counter()
                    for i in pick:
                        networkx_tile(all_tiles[i], n)
                    per_tile = (time.perf_counter() - t0) / len(pick)
                    results.append((method, None, per_tile * len(all_tiles), None, None))
                    continue
                if method == "exact":
                    opt_mask = mask
                exact_n = bool(is_transposable(mask, n, m, exact=True))
                results.append((method, compile_s, med, mask, exact_n))
            opt = float(np.sum(s_np * opt_mask, dtype=np.float64))
            for method, compile_s, med, mask, exact_n in results:
                if mask is None:
                    ratio = "(sample)"
                    exact_cell = "yes"
                    time_cell = f"{med:.1f} (extrapolated, {args.nx_sample} tiles)"
                else:
                    r = float(np.sum(s_np * mask, dtype=np.float64)) / opt
                    ratio = f"{r:.6f}"
                    exact_cell = "yes" if exact_n else "no (at most N)"
                    time_cell = f"{med:.3f}"
                    if method.startswith("greedy"):
                        greedy_ratios.setdefault(f"{method} {n}:{m}", []).append(r)
                comp = "-" if compile_s is None else f"{compile_s:.2f}"
                rows.append(f"| {shape[0]}x{shape[1]} | {n}:{m} | {method} | {comp} | "
                            f"{time_cell} | {ratio} | {exact_cell} |")
                print(rows[-1], flush=True)
    rows.append("")
    rows.append("Greedy quality, mean retained / optimum over the sizes above:")
    rows.append("")
    for k, v in greedy_ratios.items():
        rows.append(f"- {k}: {statistics.mean(v):.5f}")
    return rows


def vit_b_params() -> dict:
    key = jax.random.key(1)
    shapes = {"qkv": (768, 2304), "proj": (768, 768), "fc1": (768, 3072), "fc2": (3072, 768)}
    params = {}
    for b in range(12):
        params[f"block_{b}"] = {}
        for name, shape in shapes.items():
            key, sub = jax.random.split(key)
            params[f"block_{b}"][name] = {"kernel": jax.random.normal(sub, shape) * 0.02}
    params["head"] = {"kernel": jax.random.normal(key, (768, 1000)) * 0.02}
    return params


def nm_table(args) -> list[str]:
    rows = ["| input | mask | compile s | median s |", "|---|---|---:|---:|"]
    w = jax.random.normal(jax.random.key(0), (4096, 4096), jnp.float32)
    for n, m in ((2, 4), (4, 8)):
        fn = jax.jit(lambda w, n=n, m=m: nm_mask(jnp.abs(w), n, m))
        c, med, _ = timed(lambda fn=fn: fn(w), args.repeats)
        rows.append(f"| 4096x4096 | nm_mask {n}:{m} (jit) | {c:.2f} | {med:.4f} |")
        print(rows[-1], flush=True)
    params = vit_b_params()
    rules = [(MaskRule(2, 4), "N:M 2:4"), (MaskRule(4, 8), "N:M 4:8"),
             (MaskRule(2, 4, pattern="transposable"), "transposable 2:4 (exact24)"),
             (MaskRule(4, 8, pattern="transposable"), "transposable 4:8 (exact)")]
    for rule, label in rules:
        if rule.pattern == "nm":
            fn, how = jax.jit(lambda p, rule=rule: build_masks(p, rule)), "jit"
        else:  # eager: one compiled solver per distinct leaf shape (5), not one per leaf (49)
            fn, how = (lambda p, rule=rule: build_masks(p, rule)), "eager"
        c, med, _ = timed(lambda fn=fn: fn(params), args.repeats)
        rows.append(f"| ViT-B tree (85.8M) | build_masks {label} ({how}) | {c:.2f} | {med:.4f} |")
        print(rows[-1], flush=True)
    return rows


def calibration() -> str:
    """Reference timings, so runs on a shared machine can be compared: an elementwise pass
    over a 4096x4096 float32 array (XLA) and a 1024^3 float32 matmul (XLA)."""
    x = jnp.ones((4096, 4096), jnp.float32)
    a = jnp.ones((1024, 1024), jnp.float32)
    _, add = timed(lambda: jax.jit(lambda x: x + 1)(x), 5)[:2]
    _, mm = timed(lambda: jax.jit(lambda a: a @ a)(a), 5)[:2]
    return (f"calibration: x + 1 on 4096x4096 f32 {add * 1e3:.1f} ms; 1024^3 f32 matmul "
            f"{mm * 1e3:.1f} ms; load average now {os.getloadavg()}")


def parse_shape(x: str) -> tuple[int, int]:
    a, b = x.lower().split("x")
    return int(a), int(b)


def parse_pattern(x: str) -> tuple[int, int]:
    a, b = x.split(":")
    return int(a), int(b)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("transposable", "nm"), default=None)
    p.add_argument("--quick", action="store_true", help="1024x1024 only, 3 repeats")
    p.add_argument("--sizes", type=lambda s: [parse_shape(x) for x in s.split(",")],
                   default=list(SIZES))
    p.add_argument("--patterns", type=lambda s: [parse_pattern(x) for x in s.split(",")],
                   default=list(PATTERNS))
    p.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--base-repeats", type=int, default=1, help="OR-tools timing runs")
    p.add_argument("--nx-sample", type=int, default=64, help="networkx tiles timed")
    args = p.parse_args()
    if args.quick:
        args.sizes, args.repeats = [(1024, 1024)], 3
    bad = set(args.methods) - set(METHODS)
    if bad:
        p.error(f"unknown methods {sorted(bad)}; choose from {METHODS}")
    print(f"# masks benchmark, {datetime.date.today()}, jax {jax.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average at start {os.getloadavg()}")
    print(f"command: {' '.join(sys.argv)}\n")
    print(calibration() + "\n")
    if args.only in (None, "transposable"):
        print("\n".join(transposable_table(args)))
        print()
    if args.only in (None, "nm"):
        print("\n".join(nm_table(args)))


if __name__ == "__main__":
    main()
