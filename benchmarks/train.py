"""Dense vs N:M-sparse training of a Flax Linen MLP on scikit-learn's digits, side by side.

Run: ``python benchmarks/train.py [--steps 300] [--markdown]``. ``main()`` is what the demo
calls. Each sparse model is the dense model passed through ``nmjax.nn.sparsify`` (the head
stays dense); all start from the same initial parameters and see the same batches.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from nmjax.masks import BiMask
from nmjax.nn import linen_masks, linen_perms, sparsify
from nmjax.tree import MaskRule, build_masks, summarize


class MLP(nn.Module):
    hidden: int = 256

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(10, name="head")(x)


def _digits():
    from sklearn.datasets import load_digits  # the "dev" extra; shipped, no download

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def _loss(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


CONFIGS = [  # (label, rule or None for dense, mode)
    ("dense", None, "dense"),
    ("2:4 nm, dynamic (SR-STE)", MaskRule("2:4", exclude="head"), "dynamic"),
    ("2:4 transposable, dynamic (SR-STE)",
     MaskRule("2:4 transposable", exclude="head"), "dynamic"),
    ("2:4 transposable, static (refresh/50)",
     MaskRule("2:4 transposable", exclude="head"), "static"),
    ("2:4 bimask, dynamic (identity perm)", MaskRule(BiMask(2, 4, search="swap"), exclude="head"),
     "dynamic"),
    ("2:4 bimask, dynamic (swap search/100)",
     MaskRule(BiMask(2, 4, search="swap"), exclude="head"), "search"),
]


def train(rule, mode, *, steps=300, batch=128, lr=3e-3, decay=2e-4, refresh=50, search=100,
          seed=0):
    """Trains one configuration; returns a dict of measured figures.

    ``mode``: ``"dense"``, ``"dynamic"``, ``"static"`` (masks refreshed every ``refresh``
    steps) or ``"search"`` (dynamic Bi-Mask with a permutation searched every ``search``
    steps, the Bi-Mask recipe).
    """
    (x_train, y_train), (x_test, y_test) = _digits()
    model = MLP()
    params = model.init(jax.random.key(seed, impl="rbg"), x_train[:1])["params"]
    net = model if rule is None else sparsify(
        model, rule, mode="static" if mode == "static" else "dynamic", decay=decay)
    masks = linen_masks(params, rule) if mode == "static" else None
    if mode == "search":
        masks = linen_perms(params, rule, jax.random.key(seed))
    tx = optax.adam(lr)
    opt_state = tx.init(params)
    batches = np.random.default_rng(seed + 1).integers(0, len(y_train), (steps, batch))

    def variables(p, m):
        return {"params": p} if m is None else {"params": p, "nm_masks": m}

    @jax.jit
    def step(params, opt_state, masks, x, y):
        loss, grads = jax.value_and_grad(lambda p: _loss(net.apply(variables(p, masks), x), y))(
            params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    t0 = time.perf_counter()
    jax.block_until_ready(step.lower(params, opt_state, masks, x_train[:batch],
                                     y_train[:batch]).compile())
    compile_s = time.perf_counter() - t0
    times, losses = [], []
    for t in range(steps):
        if mode == "static" and t and t % refresh == 0:
            masks = linen_masks(params, rule)
        if mode == "search" and t and t % search == 0:
            masks = linen_perms(params, rule, jax.random.key(seed + t), previous=masks)
        idx = batches[t]
        t1 = time.perf_counter()
        params, opt_state, loss = jax.block_until_ready(
            step(params, opt_state, masks, x_train[idx], y_train[idx]))
        times.append(time.perf_counter() - t1)
        losses.append(float(loss))
    train_loss = float(_loss(net.apply(variables(params, masks), x_train), y_train))
    acc = float((net.apply(variables(params, masks), x_test).argmax(-1) == y_test).mean())
    density = 1.0
    if rule is not None:
        density = summarize(params, build_masks(params, rule), rule).density
    return dict(train_loss=train_loss, test_acc=acc, loss_at_100=losses[min(99, steps - 1)],
                ms_per_step=1e3 * statistics.median(times[1:]), compile_s=compile_s,
                density=density)


def main(steps: int = 300, markdown: bool = False) -> list[tuple[str, dict]]:
    """Trains the dense and sparse MLPs and prints their figures side by side."""
    load = os.getloadavg()
    rows = [(label, train(rule, mode, steps=steps)) for label, rule, mode in CONFIGS]
    dense = rows[0][1]
    head = ("model", "params kept", "loss@100", f"train loss@{steps}", "Δ vs dense",
            "test acc", "ms/step", "compile s")
    body = [(label, f"{r['density']:.3f}", f"{r['loss_at_100']:.4f}", f"{r['train_loss']:.4f}",
             f"{r['train_loss'] - dense['train_loss']:+.4f}", f"{r['test_acc']:.4f}",
             f"{r['ms_per_step']:.2f}", f"{r['compile_s']:.2f}") for label, r in rows]
    print(f"MLP 64-256-256-10 on digits (1400 train / 397 test), Adam 3e-3, batch 128, "
          f"{steps} steps, SR-STE decay 2e-4; jax {jax.__version__} on "
          f"{jax.devices()[0].platform} ({platform.machine()}), load average at start "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---" for _ in head) + "|")
        for row in body:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
        for row in [head, *body]:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    jnp.zeros(())  # initialise the backend before timing
    main(args.steps, args.markdown)
