"""What a sparse training step costs on top of a dense one (the reference path, this CPU).

The block: Linen LayerNorm -> Dense 768->3072 -> gelu -> Dense 3072->768, 256 tokens, Adam,
SR-STE decay 2e-4. Dense is plain optax; "dynamic" runs the layers' own mask computation at
every call (masks from the current weights, decay in the layer); "wrapper, refresh k" runs
static layers reading masks from :func:`nmjax.optim.sparse`, which refreshes them every k
steps (k = 1 is the dynamic semantics computed once per step). Medians of same-process
timings, compile excluded, ratios to dense measured in the same run.

  .venv/bin/python benchmarks/train_step.py            # writes results/train.md
  .venv/bin/python benchmarks/train_step.py --quick    # fewer steps, prints only
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
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

    return tx, step, None


def dynamic_step(pattern):
    tx = optax.adam(1e-3)
    rule = MaskRule(pattern)
    model = nmjax.nn.sparsify(Block(), rule, decay=DECAY)

    def step(params, opt_state, x):
        grads = jax.grad(lambda p: _loss(model.apply({"params": p}, x)))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return tx, step, None


def wrapper_step(pattern, every):
    rule = MaskRule(pattern)
    kwargs = {"perm_every": max(every, 100)} if isinstance(rule.pattern, BiMask) else {}
    tx = nmjax.optim.sparse(optax.adam(1e-3), rule, refresh_every=every, decay=DECAY, **kwargs)
    model = nmjax.nn.sparsify(Block(), rule, mode="static")

    def step(params, opt_state, x):
        masks = nmjax.optim.linen_collection(opt_state)
        grads = jax.grad(lambda p: _loss(model.apply({"params": p, "nm_masks": masks}, x)))(
            params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return tx, step, every


def time_variant(make, steps, x, params):
    tx, step, every = make()
    opt_state = tx.init(params)
    step = jax.jit(step, donate_argnums=(0, 1))
    params = jax.tree.map(jnp.copy, params)
    t0 = time.perf_counter()
    params, opt_state = jax.block_until_ready(step(params, opt_state, x))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        params, opt_state = jax.block_until_ready(step(params, opt_state, x))
        times.append(time.perf_counter() - t0)
    # Per-step cost including refreshes: the mean over a whole number of refresh periods.
    return compile_s, statistics.median(times), statistics.fmean(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps; print only")
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()
    steps = args.steps or (20 if args.quick else 200)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((TOKENS, D)), jnp.float32)
    params = Block().init(jax.random.key(0), x)["params"]
    patterns = [("2:4 nm", "2:4"), ("2:4 transposable (exact24)", Transposable(2, 4)),
                ("2:4 Bi-Mask (swap search)", BiMask(2, 4))]
    variants = [("dense (optax.adam)", dense_step)]
    for label, pattern in patterns:
        variants.append((f"{label}, dynamic layers", lambda p=pattern: dynamic_step(p)))
        for every in (1, 10, 100):
            variants.append((f"{label}, wrapper, refresh {every}",
                             lambda p=pattern, k=every: wrapper_step(p, k)))
    rows, base = [], None
    load0 = os.getloadavg()[0]
    for label, make in variants:
        c, med, mean = time_variant(make, steps, x, params)
        base = base or med
        rows.append((label, c, med, mean))
        print(f"{label:58s} compile {c:6.2f}s  median {med * 1e3:7.2f} ms  mean "
              f"{mean * 1e3:7.2f} ms  {med / base:5.2f}x / {mean / base:5.2f}x dense", flush=True)
    load1 = os.getloadavg()[0]
    if args.quick:
        return
    lines = [
        "# Training-step cost of sparse training (reference path, CPU)",
        "",
        f"Command: `.venv/bin/python benchmarks/train_step.py` — {datetime.date.today()}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__}, load average {load0:.2f} → {load1:.2f}.",
        "",
        f"Block: LayerNorm → Dense {D}→{H} → gelu → Dense {H}→{D}, {TOKENS} tokens, Adam, "
        f"SR-STE λ = {DECAY}; {steps} timed steps per variant after a compile step. "
        "*median*: the typical step; *mean*: including the steps that refresh masks (or "
        "search Bi-Mask permutations, every 100 steps), i.e. the amortised cost. "
        "Ratios are to the dense step's median in the same run. CPU figures, not GPU figures.",
        "",
        "| variant | compile (s) | median (ms) | mean (ms) | median / dense | mean / dense |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, c, med, mean in rows:
        lines.append(f"| {label} | {c:.1f} | {med * 1e3:.1f} | {mean * 1e3:.1f} | "
                     f"{med / base:.2f}× | {mean / base:.2f}× |")
    out = ROOT / "benchmarks" / "results" / "train.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
