"""What a sparse training step costs on top of a dense one (the reference path, this CPU).

The block: Linen LayerNorm -> Dense 768->3072 -> gelu -> Dense 3072->768, 256 tokens, Adam,
SR-STE decay 2e-4. Dense is plain optax; "dynamic" runs the layers' own mask computation at
every call (masks from the current weights, decay in the layer); "wrapper, refresh k" runs
static layers reading masks from :func:`nmjax.optim.sparse`, which refreshes them every k
steps (k = 1 is the dynamic semantics computed once per step).

A shared machine's speed drifts by 20-30% over minutes, so the variants are timed in turns:
every variant is compiled first, then each round runs a few steps of every variant (in a
rotating order) and each variant's per-round median is divided by dense's median of the same
round. The table gives the median of those ratios over the rounds. Steps are classified by
what they do (plain, mask refresh, Bi-Mask permutation search, known from the step count);
the amortised cost weighs each class's median by how often the schedule runs it.

  .venv/bin/python benchmarks/train_step.py            # writes results/train.md
  .venv/bin/python benchmarks/train_step.py --quick    # fewer rounds, prints only
  .venv/bin/python benchmarks/train_step.py --expansion --rounds 10   # unpacking the masks
  .venv/bin/python benchmarks/train_step.py --only "Bi-Mask (swap search), wrapper, refresh 100" \
      --rounds 6                   # dense and the variants whose label holds a string; prints
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nmjax  # noqa: E402
from nmjax.masks import BiMask, Transposable  # noqa: E402
from nmjax.tree import MaskRule  # noqa: E402

TOKENS, D, H = 256, 768, 3072
DECAY = 2e-4


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(H, name="up")(nn.LayerNorm()(x))
        return nn.Dense(D, name="down")(nn.gelu(h))


def _loss(y):
    return jnp.mean(y.astype(jnp.float32) ** 2)


def dense_step():
    tx = optax.adam(1e-3)
    model = Block()

    def step(params, opt_state, x):
        grads = jax.grad(lambda p: _loss(model.apply({"params": p}, x)))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return tx, step, None, None


def _plan(pattern):
    return nmjax.resolve(Block(), MaskRule(pattern), jax.ShapeDtypeStruct((TOKENS, D),
                                                                          jnp.float32))


def dynamic_step(pattern):
    tx = optax.adam(1e-3)
    model = nmjax.nn.sparsify(Block(), _plan(pattern), decay=DECAY)

    def step(params, opt_state, x):
        grads = jax.grad(lambda p: _loss(model.apply({"params": p}, x)))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return tx, step, None, None


def wrapper_step(pattern, every):
    plan = _plan(pattern)
    kwargs = {"perm_every": max(every, 100)} if isinstance(plan.patterns[0], BiMask) else {}
    tx = nmjax.optim.sparse(optax.adam(1e-3), plan, refresh_every=every, decay=DECAY, **kwargs)
    model = nmjax.nn.sparsify(Block(), plan, mode="static")

    def step(params, opt_state, x):
        masks = nmjax.nn.collection(opt_state)
        grads = jax.grad(lambda p: _loss(model.apply({"params": p, "nm_masks": masks}, x)))(
            params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return tx, step, every, kwargs.get("perm_every")


class Variant:
    """One compiled training step, its live state, and its per-step times by kind."""

    def __init__(self, label, make, x, params):
        # every: the refresh interval, search_every: the Bi-Mask search interval (None: none)
        tx, step, self.every, self.search_every = make()
        self.label, self.x = label, x
        self.step = jax.jit(step, donate_argnums=(0, 1))
        self.state = (jax.tree.map(jnp.copy, params), tx.init(params))
        self.count = 0
        t0 = time.perf_counter()
        self.run_one()
        self.compile_s = time.perf_counter() - t0
        self.times: dict[str, list[float]] = {"plain": [], "refresh": [], "search": []}
        self.rounds: list[float] = []   # per-round medians of the plain steps

    def kind(self, count: int) -> str:
        """What the optimizer does at the step that starts at ``count``."""
        nxt = count + 1
        if self.search_every and nxt % self.search_every == 0:
            return "search"
        if self.every and self.every > 1 and nxt % self.every == 0:
            return "refresh"
        return "plain"

    def run_one(self) -> float:
        t0 = time.perf_counter()
        self.state = jax.block_until_ready(self.step(*self.state, self.x))
        self.count += 1
        return time.perf_counter() - t0

    def run_round(self, steps: int) -> None:
        plain = []
        for _ in range(steps):
            kind = self.kind(self.count)
            t = self.run_one()
            self.times[kind].append(t)
            if kind == "plain":
                plain.append(t)
        self.rounds.append(statistics.median(plain) if plain else float("nan"))

    def amortised(self) -> float:
        """Mean step cost over the schedule: each kind's median, weighted by its frequency
        (with ``every`` 1 or no schedule: the plain median; Bi-Mask's search steps every 100
        are then left out, about 1% of the steps)."""
        med = {k: statistics.median(v) for k, v in self.times.items() if v}
        if self.every is None or self.every == 1:
            return med["plain"]
        f_search = 1 / self.search_every if self.search_every else 0.0
        f_refresh = 1 / self.every - f_search
        total = (1 - f_refresh - f_search) * med["plain"]
        total += f_refresh * med.get("refresh", med["plain"])
        total += f_search * med.get("search", med.get("refresh", med["plain"]))
        return total


# glibc serves allocations above its mmap threshold (at most 32 MiB, adjusted at run time)
# with fresh pages, so XLA's per-execution temporary buffers page-fault on every step: on this
# block that cost ~4 ms per masked kernel copy, more than the copy itself. A fixed high
# threshold keeps them on the heap (tcmalloc or jemalloc do the same). Both dense and sparse
# steps run under the same allocator; the table says which one.
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "2000000000", "MALLOC_TRIM_THRESHOLD_": "4000000000",
                "MALLOC_TOP_PAD_": "536870912"}


def allocator() -> str:
    if all(os.environ.get(k) == v for k, v in TUNED_MALLOC.items()):
        return "glibc malloc, heap-kept buffers (" + " ".join(
            f"{k}={v}" for k, v in TUNED_MALLOC.items()) + ")"
    return "glibc malloc, default settings"


def measure(rounds: int, steps: int, only: list[str] | None = None):
    """Times every variant (``only``: those whose label contains one of these strings, and
    dense) in turns; returns the table rows and the timing context."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((TOKENS, D)), jnp.float32)
    params = Block().init(jax.random.key(0), x)["params"]
    patterns = [("2:4 nm", "2:4"), ("2:4 transposable (exact24)", Transposable(2, 4)),
                ("2:4 Bi-Mask (swap search)", BiMask(2, 4))]
    makers = [("dense (optax.adam)", dense_step)]
    for label, pattern in patterns:
        makers.append((f"{label}, dynamic layers", lambda p=pattern: dynamic_step(p)))
        for every in (1, 10, 100):
            makers.append((f"{label}, wrapper, refresh {every}",
                           lambda p=pattern, k=every: wrapper_step(p, k)))
    if only:
        makers = makers[:1] + [(label, make) for label, make in makers[1:]
                               if any(o in label for o in only)]
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    variants = []
    for label, make in makers:
        variants.append(Variant(label, make, x, params))
        print(f"compiled {label} ({variants[-1].compile_s:.1f} s)", flush=True)
    for r in range(rounds):
        shift = r % len(variants)
        for v in variants[shift:] + variants[:shift]:
            v.run_round(steps)
        print(f"round {r + 1}/{rounds}: dense {variants[0].rounds[-1] * 1e3:.1f} ms", flush=True)
    dense = variants[0]
    rows = []
    for v in variants:
        ratios = [a / b for a, b in zip(v.rounds, dense.rounds, strict=True)]
        med = {k: statistics.median(t) * 1e3 for k, t in v.times.items() if t}
        amort = v.amortised() / statistics.median(dense.times["plain"])
        rows.append((v.label, v.compile_s, med, statistics.median(ratios), min(ratios),
                     max(ratios), amort))
        print(f"{v.label:58s} plain {med['plain']:7.2f} ms  {statistics.median(ratios):5.2f}x "
              f"[{min(ratios):.2f}-{max(ratios):.2f}]  amortised {amort:5.2f}x  " + "  ".join(
                  f"{k} {t:.1f} ms" for k, t in med.items() if k != "plain"), flush=True)
    context = (f"{allocator()}; load average {' '.join(f'{v:.2f}' for v in load0)} → "
               f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
               f"{time.perf_counter() - t_start:.0f} s")
    return rows, context


def table(rows) -> list[str]:
    lines = ["| variant | compile (s) | plain (ms) | plain / dense | range | refresh (ms) | "
             "search (ms) | amortised / dense |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, c, med, ratio, lo, hi, amort in rows:
        cells = [label, f"{c:.1f}", f"{med['plain']:.1f}", f"{ratio:.2f}×", f"{lo:.2f}–{hi:.2f}",
                 *(f"{med[k]:.1f}" if k in med else "–" for k in ("refresh", "search")),
                 f"{amort:.2f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def expansion(rounds: int) -> None:
    """Prints what expanding the state's packed masks costs against one dense step, timed
    in turns in the same run: the step-cost block's two kernels, each pattern's masks
    unpacked as ``nmjax.nn.collection`` does inside a step."""
    from nmjax.nn import collection

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((TOKENS, D)), jnp.float32)
    params = Block().init(jax.random.key(0), x)["params"]
    dense = Variant("dense", dense_step, x, params)
    runs = []
    for label in ("2:4", "2:4 transposable", "2:4 bimask"):
        state = nmjax.optim.sparse(optax.adam(1e-3), _plan(label)).init(params)
        runs.append((label, jax.jit(collection), state))
    ratios: dict[str, list[float]] = {label: [] for label, _, _ in runs}
    for _ in range(rounds):
        base = statistics.median(dense.run_one() for _ in range(5))
        for label, fn, state in runs:
            jax.block_until_ready(fn(state))
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(state))
                times.append(time.perf_counter() - t0)
            ratios[label].append(statistics.median(times) / base)
    for label, r in ratios.items():
        print(f"expanding {label} masks: {statistics.median(r):.3f} x one dense step "
              f"(median of {rounds} rounds)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds; print only")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    ap.add_argument("--system-malloc", action="store_true",
                    help="keep glibc's default malloc settings (print only)")
    ap.add_argument("--table-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--only", action="append", default=None, metavar="TEXT",
                    help="time dense and the variants whose label contains TEXT (repeatable); "
                         "print only")
    ap.add_argument("--expansion", action="store_true",
                    help="time the expansion of the state's packed masks alone; print only")
    args = ap.parse_args()
    if not args.system_malloc and allocator().endswith("default settings"):
        # glibc reads its settings at start-up: run again with them set.
        env = {**os.environ, **TUNED_MALLOC}
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)
    rounds = args.rounds or (3 if args.quick else 20)
    if args.expansion:
        expansion(rounds)
        return
    rows, context = measure(rounds, args.steps, args.only)
    if args.table_only:
        print("TABLE-START\n" + context + "\n" + "\n".join(table(rows)), flush=True)
        return
    if args.quick or args.system_malloc or args.only:
        return
    # The same variants under glibc's default settings, in a fresh process (fewer rounds).
    other = subprocess.run(
        [sys.executable, __file__, "--system-malloc", "--table-only", "--rounds",
         str(max(3, rounds // 2)), "--steps", str(args.steps)],
        env={k: v for k, v in os.environ.items() if k not in TUNED_MALLOC},
        capture_output=True, text=True, check=True).stdout.split("TABLE-START\n", 1)[1]
    other_context, other_table = other.split("\n", 1)
    lines = [
        "# Training-step cost of sparse training (reference path, CPU)",
        "",
        f"Command: `.venv/bin/python benchmarks/train_step.py` — "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared), "
        f"jax {jax.__version__}.",
        "",
        f"Block: LayerNorm → Dense {D}→{H} → gelu → Dense {H}→{D}, {TOKENS} tokens, Adam, "
        f"SR-STE λ = {DECAY}, parameters and optimizer state donated. {rounds} rounds × "
        f"{args.steps} steps of every variant, in turns (see the script's docstring). "
        "*plain / dense*: median over rounds of (the variant's median plain step ÷ dense's "
        "median in the same round), with the range over rounds; *refresh*, *search*: median "
        "times of the steps that recompute masks / search Bi-Mask permutations (every 100 "
        "steps); *amortised / dense*: each kind's median weighted by how often it runs, over "
        "dense's median. CPU figures, not GPU figures.",
        "",
        "## Heap-kept buffers",
        "",
        context + ".",
        "",
        *table(rows),
        "",
        "## glibc's default malloc",
        "",
        other_context + ".",
        "",
        "Large temporaries are fresh pages on every step: every step pays page faults on "
        "each buffer XLA allocates, which the masked kernels add to.",
        "",
        other_table.rstrip(),
    ]
    out = ROOT / "benchmarks" / "results" / "train.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
