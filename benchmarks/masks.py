"""Mask benchmarks on the CPU: the transposable N:M solvers against each other and exact
baselines, and N:M masks; writes the tables to ``benchmarks/results/masks.md``.

  .venv/bin/python benchmarks/masks.py                          # issue-13 table (long)
  .venv/bin/python benchmarks/masks.py --quick                  # 1024x1024 only
  .venv/bin/python benchmarks/masks.py --only nm                # the N:M table only
  .venv/bin/python benchmarks/masks.py --sizes 8192x8192 --patterns 8:16 --methods exact

Timing (docs/design.md, *Measuring*): ``jax.block_until_ready``; every method of one (size,
pattern) is compiled first (compile = first call minus the median), then the methods are
timed in turns, ``--repeats`` rounds, so that a change of load hits all of them alike; the
medians are reported, with ``os.getloadavg()`` at the start and after each row. Scores are
``|w|`` of Gaussian weights. "retained" is the kept ``Σ|w|`` over that of the exact optimum
on the same matrix (the ``exact`` method's mask; OR-tools, when run, solves the same problem
independently with integer costs and is compared to it). Baselines (optional imports, the
``bench`` extra): OR-tools' min-cost flow with all tiles in one graph, and networkx's min-
cost flow per tile on a sample of tiles, extrapolated.

The output file is made of sections between ``<!-- begin:NAME -->`` and ``<!-- end:NAME -->``
markers; a run replaces the sections it produced and keeps the others.
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

SIZES = ((1024, 1024), (4096, 4096), (8192, 8192))
PATTERNS = ((2, 4), (4, 8), (8, 16))
METHODS = ("exact24", "exact", "greedy", "greedy+repair", "ortools", "networkx")
JAX_METHODS = ("exact24", "exact", "greedy", "greedy+repair")
RESULTS = Path(__file__).resolve().parent / "results" / "masks.md"


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


def load() -> str:
    return "(" + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + ")"


def jax_fn(method: str, s, n: int, m: int) -> Callable[[], object]:
    kw = {"method": method.split("+")[0], "repair": method.endswith("repair")}
    return lambda: transposable_mask(s, n, m, **kw)


def time_in_turns(fns: dict[str, Callable[[], object]], repeats: int):
    """Compile (first call) each, then ``repeats`` rounds of one call of each, in turn.

    Returns ``{name: (compile s, median s, result)}``."""
    first, out, times = {}, {}, {k: [] for k in fns}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        out[name] = jax.block_until_ready(fn())
        first[name] = time.perf_counter() - t0
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out[name] = jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    res = {}
    for name in fns:
        med = statistics.median(times[name]) if times[name] else first[name]
        res[name] = (max(first[name] - med, 0.0), med, out[name])
    return res


def transposable_table(args) -> tuple[list[str], dict]:
    rows = ["| size | N:M | method | compile s | median s | exact / this (speed) | "
            "retained / optimum | exactly N | load after |",
            "|---|---|---|---:|---:|---:|---:|---|---|"]
    summary: dict = {}
    for shape in args.sizes:
        w = jax.random.normal(jax.random.key(0), shape, jnp.float32)
        s = jnp.abs(w)
        s_np = np.asarray(s, np.float64)
        for n, m in args.patterns:
            methods = [x for x in args.methods if not (x == "exact24" and (n, m) != (2, 4))]
            jax_methods = [x for x in JAX_METHODS if x in methods or x == "exact"]
            label = f"{shape[0]}x{shape[1]} {n}:{m}"
            print(f"  {label}: {', '.join(jax_methods)} ...", file=sys.stderr, flush=True)
            res = time_in_turns({k: jax_fn(k, s, n, m) for k in jax_methods}, args.repeats)
            opt_mask = np.asarray(res["exact"][2])
            opt = float(np.sum(s_np * opt_mask))
            exact_s = res["exact"][1]
            lines = []
            for k in jax_methods:
                comp, med, mask = res[k]
                mask = np.asarray(mask)
                ratio = float(np.sum(s_np * mask)) / opt
                exact_n = bool(is_transposable(mask, n, m, exact=True))
                summary[(shape, (n, m), k)] = (med, ratio, exact_n)
                lines.append((k, f"{comp:.2f}", f"{med:.3f}", f"{exact_s / med:.2f}",
                              f"{ratio:.6f}", "yes" if exact_n else "no (at most N)"))
            if "ortools" in methods and have("ortools") and shape[0] * shape[1] <= args.ortools_max:
                print(f"  {label}: ortools ...", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                mask = ortools_mask(np.asarray(s), n, m)
                med = time.perf_counter() - t0
                ratio = float(np.sum(s_np * mask)) / opt
                summary[(shape, (n, m), "ortools")] = (med, ratio, True)
                lines.append(("ortools", "-", f"{med:.3f}", f"{exact_s / med:.2f}",
                              f"{ratio:.6f}", "yes"))
            if "networkx" in methods and have("networkx"):
                all_tiles = tiles(np.asarray(s), m)
                pick = np.random.default_rng(0).choice(len(all_tiles), args.nx_sample,
                                                       replace=False)
                t0 = time.perf_counter()
                for i in pick:
                    networkx_tile(all_tiles[i], n)
                est = (time.perf_counter() - t0) / len(pick) * len(all_tiles)
                lines.append(("networkx", "-", f"{est:.1f} (extrapolated, {args.nx_sample} "
                              "tiles)", f"{exact_s / est:.3f}", "(sample)", "yes"))
            for line in lines:
                rows.append(f"| {shape[0]}x{shape[1]} | {n}:{m} | " + " | ".join(line)
                            + f" | {load()} |")
                print(rows[-1], flush=True)
    return rows, summary


def targets(summary: dict) -> list[str]:
    """The issue-13 targets, checked on the rows just measured."""
    out = ["| target | case | measured | met |", "|---|---|---|---|"]
    shapes = sorted({k[0] for k in summary})
    patterns = sorted({k[1] for k in summary})

    def get(shape, nm, method):
        return summary.get((shape, nm, method))

    for shape in shapes:
        if shape[0] < 4096:
            continue
        size = f"{shape[0]}x{shape[1]}"
        for nm in patterns:
            ex, gr, rp = (get(shape, nm, k) for k in ("exact", "greedy", "greedy+repair"))
            case = f"{size} {nm[0]}:{nm[1]}"
            if ex and gr:
                x = ex[0] / gr[0]
                out.append(f"| greedy >= 5x faster than exact | {case} | {x:.2f}x "
                           f"(retained {gr[1]:.5f}) | {'yes' if x >= 5 else 'no'} |")
            if ex and rp:
                ok = rp[1] >= 0.999 and rp[0] < ex[0] and rp[2]
                out.append(f"| repair >= 0.999, exactly N, faster than exact | {case} | "
                           f"{rp[1]:.5f}, {rp[0]:.3f} s vs {ex[0]:.3f} s | "
                           f"{'yes' if ok else 'no'} |")
    ex = get((8192, 8192), (8, 16), "exact")
    if ex:
        out.append(f"| exact 8:16 on 8192x8192 <= 5 s | 8192x8192 8:16 | {ex[0]:.3f} s | "
                   f"{'yes' if ex[0] <= 5 else 'no'} |")
    for nm in patterns:  # time per tile across sizes: linear in tiles means a flat column
        per = []
        for shape in shapes:
            rp = get(shape, nm, "greedy+repair")
            if rp:
                tiles_m = shape[0] * shape[1] / nm[1] ** 2 / 1e6
                per.append(f"{shape[0]}: {rp[0] / tiles_m:.3f}")
        if len(per) > 1:
            out.append(f"| repair time linear in tiles | {nm[0]}:{nm[1]} | s per million "
                       f"tiles, {'; '.join(per)} | (see the trend) |")
    return out


def write_sections(path: Path, sections: dict[str, str], preamble: str) -> None:
    """Replaces the named sections of ``path`` (between begin/end markers), keeping the
    rest; a missing file or section is created."""
    text = path.read_text() if path.exists() else preamble
    for name, body in sections.items():
        begin, end = f"<!-- begin:{name} -->", f"<!-- end:{name} -->"
        block = f"{begin}\n{body.rstrip()}\n{end}"
        if begin in text and end in text:
            i, j = text.index(begin), text.index(end) + len(end)
            text = text[:i] + block + text[j:]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


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
    rules = [(MaskRule("2:4"), "N:M 2:4"), (MaskRule("4:8"), "N:M 4:8"),
             (MaskRule("2:4 transposable"), "transposable 2:4 (exact24)"),
             (MaskRule("4:8 transposable"), "transposable 4:8 (exact)")]
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


PREAMBLE = """# Mask benchmarks (CPU)

Written by `benchmarks/masks.py` (see its docstring for the method). The machine is the
team's shared 2-core x86_64 VM (no GPU); other engineers' jobs run on it, so every run
records `os.getloadavg()` (with 2 cores, a load of 4 leaves about half the machine) and a
calibration line (plain XLA ops timed at that moment). Compare timings within a run.
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("transposable", "nm"), default=None)
    p.add_argument("--quick", action="store_true", help="1024x1024 only, 3 repeats")
    p.add_argument("--sizes", type=lambda s: [parse_shape(x) for x in s.split(",")],
                   default=list(SIZES))
    p.add_argument("--patterns", type=lambda s: [parse_pattern(x) for x in s.split(",")],
                   default=list(PATTERNS))
    p.add_argument("--methods", type=lambda s: s.split(","),
                   default=["exact24", "exact", "greedy", "greedy+repair"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--nx-sample", type=int, default=64, help="networkx tiles timed")
    p.add_argument("--ortools-max", type=int, default=4096 * 4096,
                   help="largest matrix (entries) given to OR-tools (8192^2 needs ~9 GB)")
    p.add_argument("--out", type=Path, default=RESULTS, help="markdown file to update")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args()
    if args.quick:
        args.sizes, args.repeats = [(1024, 1024)], 3
    bad = set(args.methods) - set(METHODS)
    if bad:
        p.error(f"unknown methods {sorted(bad)}; choose from {METHODS}")
    argv = sys.argv[1:]
    if "--out" in argv:  # where the tables go is not part of how they were measured
        i = argv.index("--out")
        argv = argv[:i] + argv[i + 2:]
    command = "python " + " ".join(["benchmarks/masks.py", *argv])
    head = (f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, jax {jax.__version__}, "
            f"{platform.machine()}, {os.cpu_count()} CPUs, load average at start {load()}")
    print(f"# masks benchmark, {head}\ncommand: `{command}`\n")
    cal = calibration()
    print(cal + "\n")
    sections = {}
    if args.only in (None, "transposable"):
        rows, summary = transposable_table(args)
        body = ["## Transposable N:M (issue 13)", "", f"Run: {head}.", "",
                f"Command: `{command}`", "", cal, "", *rows, "",
                f"Load average at the end {load()}.", "", "### Targets", "",
                *targets(summary)]
        print("\n".join(body[-len(targets(summary)) - 2:]))
        sections["transposable"] = "\n".join(body)
    if args.only in (None, "nm"):
        rows = nm_table(args)
        sections["nm"] = "\n".join(["## N:M masks and whole-model trees", "",
                                     f"Run: {head}.", "", f"Command: `{command}`", "", cal,
                                     "", *rows])
    if not args.no_write:
        write_sections(args.out, sections, PREAMBLE)
        print(f"updated {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
