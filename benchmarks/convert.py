"""AdaPrune on a CNN trained here on Fashion-MNIST: dense vs magnitude N:M vs AdaPrune vs
AdaPrune + a short fine-tune, at 2:4 and 4:8, plain and transposable.

Run: ``python benchmarks/convert.py [--quick] [--out benchmarks/results/convert.md]``.

1. Trains a small Linen CNN (conv 16, conv 32, dense 128, dense 64, head) on the training
   split of :func:`nmjax.datasets.vision` (Fashion-MNIST; scikit-learn's digits where it is
   not installed).
2. For each pattern converts the second conv and both hidden dense layers (the first conv has
   one input channel, the head ten outputs: both stay dense, as in the paper) with
   :func:`nmjax.convert.adaprune` (default settings), calibrating on training images and
   measuring the layer errors on validation images.
3. Fine-tunes the AdaPrune model, and for comparison the magnitude N:M model, for a few
   hundred steps with :func:`nmjax.optim.sparse` and the static-mode sparse layers (masks
   fixed to the conversion's).
4. Compares the two solvers (least squares, Adam as in the reference) on the 2:4 conversion,
   and converts a 50% unstructured (global magnitude) model with N per layer from
   :func:`nmjax.convert.choose_n`.

Accuracy and loss are on the 10,000 test images. ``--crossover`` instead times both
solvers on synthetic Dense layers of growing size (the measurement behind ``solver="auto"``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from nmjax.convert import adaprune, global_magnitude_prune, layer_densities, rules_for_density
from nmjax.datasets import vision
from nmjax.nn import collection
from nmjax.optim import masks_of, sparse
from nmjax.tree import MaskRule, apply_masks


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Dense(128)(x.reshape(len(x), -1)))
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10, name="head")(x)


PATTERNS = ("2:4", "4:8", "2:4 transposable", "4:8 transposable")
EXCLUDE = ("Conv_0", "head")


def _loss(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def evaluate(model, params, x, y, batch=2000):
    """``{"loss", "accuracy"}`` of ``model`` on ``(x, y)``; ``params`` used as they are."""
    apply = jax.jit(lambda p, xb: model.apply({"params": p}, xb))
    losses, hits = [], []
    for i in range(0, len(y), batch):
        logits = apply(params, x[i:i + batch])
        losses.append(float(_loss(logits, y[i:i + batch])) * len(logits))
        hits.append(int(jnp.sum(jnp.argmax(logits, -1) == y[i:i + batch])))
    return {"loss": sum(losses) / len(y), "accuracy": sum(hits) / len(y)}


def _adam_step(model, tx, collections=lambda state: {}):
    """One jitted step of ``tx`` on the cross-entropy of ``model`` (``collections(state)``:
    extra variable collections, e.g. the optimizer's masks for a static sparse model)."""

    @jax.jit
    def step(params, state, xb, yb):
        variables = collections(state)
        grads = jax.grad(lambda p: _loss(model.apply({**variables, "params": p}, xb), yb))(
            params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def _random_batches(step, params, state, data, *, steps, batch, seed):
    """``steps`` steps on training batches drawn with replacement; ``(params, state)``."""
    rng = np.random.default_rng(seed)
    x, y = data.train.x, data.train.y
    for _ in range(steps):
        idx = rng.integers(0, len(y), batch)
        params, state = step(params, state, x[idx], y[idx])
    return params, state


def train_dense(data, *, epochs, batch=128, lr=1e-3, seed=0, limit=None):
    model = CNN()
    x, y = data.train.x, data.train.y
    if limit is not None:
        x, y = x[:limit], y[:limit]
    params = model.init(jax.random.key(seed), x[:1])["params"]
    tx = optax.adam(lr)
    state = tx.init(params)
    step = _adam_step(model, tx)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i:i + batch]
            params, state = step(params, state, x[idx], y[idx])
    return model, params


def finetune(conv, rule, data, *, params, steps, batch=128, lr=3e-4, seed=1):
    """``steps`` of Adam through :func:`nmjax.optim.sparse` on the static sparse model, the
    masks those of the conversion (``params`` is the converted or the magnitude model).
    Returns the parameters with the masks applied. (``rule``: the conversion's; its plan,
    ``conv.plan``, is what the optimizer and ``conv.model`` share.)"""
    del rule
    tx = sparse(optax.adam(lr), conv.plan, refresh_every=steps + 1)
    state = tx.init(params)
    for path, masks in jax.tree_util.tree_flatten_with_path(
            conv.masks, is_leaf=lambda m: m is None or hasattr(m, "fwd"))[0]:
        if masks is not None:  # the optimizer's masks of the converted weights: the same
            got = masks_of(state)
            for k in path:
                got = got[k.key]
            assert bool(jnp.array_equal(got.fwd, masks.fwd)), path
    step = _adam_step(conv.model, tx, lambda state: {"nm_masks": collection(state)})
    params, state = _random_batches(step, params, state, data, steps=steps, batch=batch,
                                    seed=seed)
    return apply_masks(params, masks_of(state))


def finetune_dense(model, params, data, *, steps, batch=128, lr=3e-4, seed=1):
    """The same steps as :func:`finetune` on the dense model (the control)."""
    tx = optax.adam(lr)
    params, _ = _random_batches(_adam_step(model, tx), params, tx.init(params), data,
                                steps=steps, batch=batch, seed=seed)
    return params


def _md_table(head, rows):
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _layer_rows(label, conv):
    return [(label, r.path, r.solver, f"{r.kept:.3f}", f"{r.error_magnitude:.4f}",
             f"{r.error_adaprune:.4f}", f"{r.fit_error_adaprune:.4f}", f"{r.seconds:.1f}")
            for r in conv.layers]


LAYER_HEAD = ("pattern", "layer", "solver", "kept", "rel. err magnitude", "rel. err AdaPrune",
              "(fit data)", "s")


def run(args) -> str:
    out = []
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    data = vision()
    quick = args.quick
    epochs = 1 if quick else args.epochs
    t0 = time.perf_counter()
    model, params = train_dense(data, epochs=epochs, limit=4096 if quick else None)
    train_s = time.perf_counter() - t0
    test_x, test_y = data.test.x, data.test.y
    if quick:
        test_x, test_y = test_x[:2000], test_y[:2000]
    dense = evaluate(model, params, test_x, test_y)
    log(f"dense: {dense} ({train_s:.0f} s)")
    calib = data.train.x[:256 if quick else args.calib]
    held = data.val.x[:256 if quick else args.held]
    steps = 30 if quick else args.finetune_steps

    # The control for the fine-tune columns: the dense model given the same steps.
    t0 = time.perf_counter()
    tuned_dense = finetune_dense(model, params, data, steps=steps)
    dense_tuned = evaluate(model, tuned_dense, test_x, test_y)
    log(f"dense + fine-tune: {dense_tuned} ({time.perf_counter() - t0:.0f} s)")

    rows, layer_rows, conversions = [], [], {}
    for pattern in PATTERNS[:2] if quick else PATTERNS:
        rule = MaskRule(pattern, exclude=list(EXCLUDE))
        t0 = time.perf_counter()
        conv = adaprune((model, params), calib, rule, held_out=held, progress=args.progress)
        conv_s = time.perf_counter() - t0
        conversions[pattern] = conv
        stats = {"dense": dense,
                 "magnitude": evaluate(model, conv.magnitude_params, test_x, test_y),
                 "adaprune": evaluate(model, conv.params, test_x, test_y)}
        t0 = time.perf_counter()
        tuned = finetune(conv, rule, data, params=conv.params, steps=steps)
        stats["adaprune + fine-tune"] = evaluate(model, tuned, test_x, test_y)
        tune_s = time.perf_counter() - t0
        tuned_mag = finetune(conv, rule, data, params=conv.magnitude_params, steps=steps)
        stats["magnitude + fine-tune"] = evaluate(model, tuned_mag, test_x, test_y)
        log(conv.report(stats))
        rows.append((pattern, *(f"{stats[k]['accuracy']:.4f}" for k in (
            "dense", "magnitude", "adaprune", "adaprune + fine-tune", "magnitude + fine-tune")),
            f"{dense_tuned['accuracy']:.4f}",
            f"{stats['magnitude']['loss']:.3f} / {stats['adaprune']['loss']:.3f} / "
            f"{stats['adaprune + fine-tune']['loss']:.3f}", f"{conv_s:.0f}", f"{tune_s:.0f}"))
        layer_rows += _layer_rows(pattern, conv)

    out.append("## Accuracy (test set)\n")
    out.append(_md_table(("pattern", "dense", "magnitude N:M", "AdaPrune", "AdaPrune + fine-tune",
                          "magnitude + fine-tune", "dense + fine-tune (control)",
                          "test loss mag / AdaPrune / +ft", "convert s", "fine-tune s"), rows))
    out.append(f"\nFine-tune: {steps} steps of Adam 3e-4, batch 128, through "
               "`nmjax.optim.sparse` on the static sparse model, masks fixed to the "
               "conversion's; the magnitude column is fine-tuned the same way, and the dense "
               "control gets the same steps with plain Adam (the dense model is trained for "
               "only a few epochs, so extra steps help it too).\n")
    out.append("## Per layer (relative output error vs the dense layer)\n")
    out.append(_md_table(LAYER_HEAD, layer_rows))

    # Solvers: least squares vs the reference's Adam on the same 2:4 conversion.
    solver_rows = []
    rule = MaskRule("2:4", exclude=list(EXCLUDE))
    variants = [("lstsq", dict(solver="lstsq")),
                ("adam (1000 it, batch 50, lr 1e-3)", dict(solver="adam")),
                ("adam + absorb_mean, bias", dict(solver="adam", absorb_mean=True, bias=True))]
    if quick:
        variants = [("lstsq", dict(solver="lstsq")),
                    ("adam (100 it)", dict(solver="adam", iters=100))]
    for label, kwargs in variants:
        t0 = time.perf_counter()
        conv = adaprune((model, params), calib, rule, held_out=held, progress=args.progress,
                        **kwargs)
        seconds = time.perf_counter() - t0
        acc = evaluate(model, conv.params, test_x, test_y)["accuracy"]
        errs = " / ".join(f"{r.error_adaprune:.4f}" for r in conv.layers)
        times = " / ".join(f"{r.seconds:.1f}" for r in conv.layers)
        solver_rows.append((label, f"{acc:.4f}", errs, times, f"{seconds:.0f}"))
    out.append("\n## Solvers (2:4, same calibration)\n")
    out.append(_md_table(("solver", "AdaPrune acc", "held-out rel. err per layer "
                          "(Conv_1 / Dense_0 / Dense_1)", "s per layer", "total s"),
                         solver_rows))

    # Unstructured (global magnitude) -> N:8 per layer from its density.
    for density in (0.5, 0.3):
        pruned = global_magnitude_prune(params, density, exclude=list(EXCLUDE))
        densities = layer_densities(pruned.params, exclude=list(EXCLUDE))
        rules = rules_for_density(pruned.params, 8, exclude=list(EXCLUDE))
        conv = adaprune((model, pruned.params), calib, rules, held_out=held,
                        progress=args.progress)
        un_rows = [(r.path, f"{densities[r.path]:.3f}", r.pattern, f"{r.error_magnitude:.4f}",
                    f"{r.error_adaprune:.4f}") for r in conv.layers]
        accs = {k: evaluate(model, p, test_x, test_y)["accuracy"] for k, p in (
            (f"unstructured {density:.0%}", pruned.params),
            ("magnitude N:8", conv.magnitude_params), ("AdaPrune N:8", conv.params))}
        out.append(f"\n## Unstructured {density:.0%} (global magnitude) -> N:8 per layer "
                   "(`choose_n`, confidence 0.95)\n")
        out.append(_md_table(("layer", "density", "chosen", "rel. err magnitude",
                              "rel. err AdaPrune"), un_rows))
        out.append("\nTest accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in accs.items())
                   + f" (dense {dense['accuracy']:.4f}).\n")
    total = time.perf_counter() - t_start
    header = [
        f"Dataset: {data.name}; dense model trained {epochs} epoch(s) "
        f"({'first 4096 images' if quick else f'{len(data.train.y)} images'}, Adam 1e-3, "
        f"batch 128) in {train_s:.0f} s. Calibration: {len(calib)} training images; "
        f"held-out layer errors: {len(held)} validation images; accuracy: "
        f"{len(test_y)} test images. Converted layers: Conv_1 (3x3x16x32), Dense_0 "
        "(1568x128), Dense_1 (128x64); Conv_0 (one input channel) and the head stay dense. "
        f"`adaprune` defaults (solver auto, damping 0.01, sequential). Total {total:.0f} s.",
    ]
    return "\n".join(header) + "\n\n" + "\n".join(out)


def _solve_once(name, geom, x, w, mask, start, kmax):
    from nmjax import _convert_solve as solve

    if name == "lstsq":
        return solve.lstsq(geom, (x,), w, mask, start, jnp.float32(0.01), fit_bias=False,
                           kmax=kmax, block=solve.solve_block(kmax), progress=False)
    return solve.adam(geom, (x,), w, mask, start, jnp.float32(1e-3), jnp.float32(1e-2),
                      jax.random.key(0), iters=1000, batch=50, fit_bias=False, progress=False)


def crossover(args) -> str:
    """Both solvers on synthetic 2:4 Dense layers (correlated inputs, 1024 samples): time
    against the cost model that ``solver="auto"`` uses."""
    from nmjax import _convert_solve as solve
    from nmjax.masks import nm_mask

    rng = np.random.default_rng(0)
    rows = []
    shapes = ((128, 128), (256, 128)) if args.quick else (
        (256, 256), (512, 512), (1024, 1024), (1568, 128), (3072, 256))
    for d, out in shapes:
        geom = solve.Geometry("dense", (d, out))
        basis = rng.standard_normal((64, d)).astype(np.float32)
        x = jnp.asarray(rng.standard_normal((1024, 64)).astype(np.float32) @ basis
                        + 0.3 * rng.standard_normal((1024, d)).astype(np.float32))
        w = jnp.asarray(rng.standard_normal((d + 1, out)).astype(np.float32) / np.sqrt(d))
        mask = nm_mask(jnp.abs(w[:d]), 2, 4)
        start = jnp.where(jnp.concatenate([mask, jnp.ones((1, out), bool)]), w, 0)
        kmax = d // 2
        times = {}
        problem = (geom, x, w, mask, start, kmax)
        for name in ("lstsq", "adam"):
            jax.block_until_ready(_solve_once(name, *problem))  # compile
            t0 = time.perf_counter()
            new = jax.block_until_ready(_solve_once(name, *problem))
            times[name] = time.perf_counter() - t0
            ref, errs = solve.output_errors(geom, (x,), w, (start, new))
            cost = (solve.lstsq_cost(geom, 1024, kmax) if name == "lstsq"
                    else solve.adam_cost(geom, 1, 1000, 50))
            rows.append([f"{d}x{out}", name, f"{cost / 1e9:.1f}", f"{times[name]:.2f}",
                         f"{cost / 1e9 / times[name]:.1f}",
                         f"{float(np.sqrt(errs[0] / ref)):.3f} -> "
                         f"{float(np.sqrt(errs[1] / ref)):.3f}", ""])
            print(rows[-1], file=sys.stderr, flush=True)
        model = ("lstsq" if solve.lstsq_cost(geom, 1024, kmax)
                 <= solve.adam_cost(geom, 1, 1000, 50) else "adam")
        faster = min(times, key=times.get)
        rows[-1][-1] = rows[-2][-1] = f"model: {model}, measured: {faster}"
    note = ("Synthetic 2:4 Dense layers `in x out` with correlated inputs (rank 64 plus "
            "noise), 1024 samples; `lstsq` with damping 0.01, `adam` with the reference's "
            "1000 steps of batch 50, lr 1e-3. Time of a second, compiled call. The cost model "
            "(`lstsq_cost`, `adam_cost` in `nmjax/_convert_solve.py`, LU weighed "
            f"x{solve.LU_SLOWDOWN:g}) is what `solver=\"auto\"` compares; the last column "
            "sets its pick beside the solver measured faster.\n\n")
    return note + _md_table(("layer", "solver", "model cost (G flop-equivalents)", "s (warm)",
                             "cost / s", "rel. err magnitude -> solver", "auto picks"), rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (about a minute)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--calib", type=int, default=1024)
    parser.add_argument("--held", type=int, default=1024)
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--crossover", action="store_true",
                        help="time the solvers on synthetic layers instead")
    parser.add_argument("--progress", action="store_true", help="show AdaPrune's bars")
    parser.add_argument("--out", help="write the markdown here (default: stdout)")
    parser.add_argument("--append", action="store_true", help="append to --out")
    args = parser.parse_args(argv)
    load = os.getloadavg()
    started = datetime.datetime.now(datetime.UTC)
    body = crossover(args) if args.crossover else run(args)
    command = "python benchmarks/convert.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]))
    machine = (f"{platform.machine()} CPU, {os.cpu_count()} cores (shared with other work), "
               f"jax {jax.__version__} on {jax.devices()[0].platform}")
    title = "## Solver crossover" if args.crossover else "# AdaPrune conversion"
    text = (f"{title}\n\n"
            f"Command: `{command.strip()}`. Machine: {machine}. Load average at start "
            f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, at end "
            + " ".join(f"{v:.2f}" for v in os.getloadavg())
            + f". Date: {started:%Y-%m-%d %H:%M} UTC.\n\n{body}\n")
    if args.out:
        with open(args.out, "a" if args.append else "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
