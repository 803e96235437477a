"""Train a Flax CNN N:M-sparse with nmjax, end to end.

A Linen CNN on Fashion-MNIST (Debian's ``dataset-fashion-mnist``; scikit-learn's digits where
it is absent), made sparse with :func:`nmjax.nn.sparsify` (static-mode layers) and trained
with :func:`nmjax.optim.sparse` (masks, SR-STE decay, Bi-Mask permutation search), a rich
progress bar, evaluation on the validation split, an orbax checkpoint (``--ckpt-dir``,
``--resume``), and the mask summary at the end.

  python examples/train.py                              # 2:4 transposable
  python examples/train.py --pattern "2:4 bimask" --steps 3000
  python examples/train.py --pattern dense              # the same model, dense
  python examples/train.py --pattern "2:4 unstructured" # top-k magnitude at 2:4 density
  python examples/train.py --fast                       # a smoke run (the tests use it)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nmjax  # noqa: E402
from nmjax.masks import as_pattern  # noqa: E402
from nmjax.tree import MaskRule, summarize  # noqa: E402


class CNN(nn.Module):
    """Two 3x3 convolutions with pooling, a hidden Dense layer and a 10-way head."""

    width: int = 32

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(self.width, (3, 3))(x))      # I = 1: left dense (indivisible)
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(2 * self.width, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Dense(256)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10, name="head")(x)               # 10 classes: left dense


@dataclasses.dataclass
class Config:
    pattern: str = "2:4 transposable"   # "4:8", "2:4 bimask", "2:4 unstructured", "dense"
    steps: int = 1500
    batch: int = 128
    lr: float = 2e-3
    decay: float = 2e-4                 # SR-STE λ
    refresh_every: int = 1              # 1: masks from the current weights at every step
    perm_every: int = 100               # Bi-Mask permutation search (the paper's I)
    eval_every: int = 250
    width: int = 32
    seed: int = 0
    ckpt_dir: str | None = None
    resume: bool = False
    train_limit: int | None = None      # use only the first N training images (fast runs)


def _top_k_mask(w: jax.Array, axis: int, n: int, m: int) -> jax.Array:
    """The ``size * n / m`` largest ``|w|`` of the whole kernel (ties: lower flat index)."""
    del axis  # unstructured: no grouping axis
    scores = jnp.abs(w).ravel()
    keep = scores.size * n // m
    order = jnp.argsort(-scores, stable=True)[:keep]
    return jnp.zeros(scores.shape, bool).at[order].set(True).reshape(w.shape)


def unstructured(n: int, m: int) -> nmjax.masks.Custom:
    """Unstructured magnitude pruning at the density of N:M (``n / m`` of each kernel kept,
    anywhere in it): the baseline of the mask-diversity comparison. It guarantees no N:M
    structure (``fwd_nm=None``), so only the reference backend runs its products."""
    n, m = int(n), int(m)
    if not 1 <= n <= m:
        raise ValueError(f"unstructured(n, m) needs 1 <= n <= m, got {n}:{m}")
    return nmjax.masks.Custom(functools.partial(_top_k_mask, n=n, m=m))


def rule_for(pattern: str) -> MaskRule | None:
    """The rule a pattern string trains with: ``"dense"`` (no rule), an N:M shorthand
    (``"2:4"``, ``"4:8 transposable"``, ``"2:4 bimask"``) or ``"N:M unstructured"``. The
    head and kernels whose contraction axis ``m`` does not divide stay dense; an
    unstructured rule selects the same kernels as the N:M ones."""
    if pattern == "dense":
        return None
    match = re.fullmatch(r"\s*(\d+):(\d+)\s+unstructured\s*", pattern)
    if match:
        n, m = int(match.group(1)), int(match.group(2))
        return MaskRule(unstructured(n, m), exclude="head",
                        predicate=lambda path, leaf: leaf.shape[leaf.ndim - 2] % m == 0)
    return MaskRule(as_pattern(pattern), exclude="head", skip_indivisible=True)


def _loss(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _batches(split, batch, steps, seed, limit=None):
    n = len(split.y) if limit is None else min(limit, len(split.y))
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, n, batch)
        yield split.x[idx], split.y[idx]


def _evaluate(predict, params, masks, split, batch=1000):
    correct, losses = 0, []
    for i in range(0, len(split.y), batch):
        logits = predict(params, masks, split.x[i:i + batch])
        correct += int((np.asarray(logits).argmax(-1) == split.y[i:i + batch]).sum())
        losses.append(float(_loss(logits, split.y[i:i + batch])) * len(split.y[i:i + batch]))
    return sum(losses) / len(split.y), correct / len(split.y)


def progress_bar(enabled: bool):
    """The rich progress bar the examples train under (``status`` field for live metrics)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                    disable=not enabled, transient=False)


def sparse_training(model, rule: MaskRule | None, inner, cfg, example):
    """``(tx, net, plan)``: ``inner``, ``model`` and ``None`` for a dense run (``rule``
    None); else the rule resolved against the model on ``example`` inputs
    (:func:`nmjax.resolve`), :func:`nmjax.optim.sparse` around ``inner`` with that plan
    (``cfg.refresh_every``, ``cfg.decay``, ``cfg.seed``, and ``cfg.perm_every`` for
    Bi-Mask) and the static-mode sparse model that reads its masks (the same plan)."""
    if rule is None:
        return inner, model, None
    plan = nmjax.resolve(model, rule, example)
    kwargs = dict(refresh_every=cfg.refresh_every, decay=cfg.decay, seed=cfg.seed)
    if isinstance(rule.pattern, nmjax.masks.BiMask):
        kwargs["perm_every"] = cfg.perm_every
    return (nmjax.optim.sparse(inner, plan, **kwargs),
            nmjax.nn.sparsify(model, plan, mode="static"), plan)


def train(cfg: Config, data=None, *, progress: bool = True, log=print) -> dict[str, Any]:
    """Trains one model; returns the curves, the final metrics and the timings."""
    data = data or nmjax.datasets.vision()
    model = CNN(cfg.width)
    rule = rule_for(cfg.pattern)
    x0 = jnp.asarray(data.train.x[:1])
    params = model.init(jax.random.key(cfg.seed), x0)["params"]
    tx, net, plan = sparse_training(model, rule, optax.adam(cfg.lr), cfg, x0)
    opt_state = tx.init(params)
    start = 0
    checkpointer = None
    if cfg.ckpt_dir:
        import orbax.checkpoint as ocp

        checkpointer = ocp.StandardCheckpointer()
        path = Path(cfg.ckpt_dir).absolute()
        if cfg.resume and path.exists():
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                    {"params": params, "opt_state": opt_state, "step": 0})
            restored = checkpointer.restore(path, abstract)
            params, opt_state = restored["params"], restored["opt_state"]
            start = int(restored["step"])
            log(f"resumed from {path} at step {start}")

    def variables(params, opt_state):
        if rule is None:
            return {"params": params}
        return {"params": params, "nm_masks": nmjax.nn.collection(opt_state)}

    @jax.jit
    def step(params, opt_state, x, y):
        def loss(p):
            return _loss(net.apply({**variables(params, opt_state), "params": p}, x), y)

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    @jax.jit
    def predict(params, masks, x):
        return net.apply({"params": params, **({"nm_masks": masks} if masks else {})}, x)

    def masks_now(opt_state):
        return nmjax.nn.collection(opt_state) if rule is not None else None

    curve, evals, step_times = [], [], []
    batches = _batches(data.train, cfg.batch, cfg.steps, cfg.seed + 1, cfg.train_limit)
    for _ in range(start):  # the same batches after a resume as without one
        next(batches)
    t_compile = None
    with progress_bar(progress) as bar:
        task = bar.add_task(f"{cfg.pattern:>18s}", total=cfg.steps, completed=start,
                            status="")
        for t in range(start, cfg.steps):
            x, y = next(batches)
            t0 = time.perf_counter()
            params, opt_state, value = step(params, opt_state, x, y)
            value = float(value)
            if t_compile is None:
                t_compile = time.perf_counter() - t0
            else:
                step_times.append(time.perf_counter() - t0)
            curve.append((t, value))
            if (t + 1) % cfg.eval_every == 0 or t + 1 == cfg.steps:
                val_loss, val_acc = _evaluate(predict, params, masks_now(opt_state), data.val)
                evals.append((t + 1, val_loss, val_acc))
                bar.update(task, status=f"loss {value:.3f}  val acc {val_acc:.3f}")
            bar.advance(task)
    if checkpointer is not None:
        checkpointer.save(Path(cfg.ckpt_dir).absolute(),
                          {"params": params, "opt_state": opt_state, "step": cfg.steps},
                          force=True)
        checkpointer.wait_until_finished()
    test_loss, test_acc = _evaluate(predict, params, masks_now(opt_state), data.test)
    result = dict(pattern=cfg.pattern, dataset=data.name, steps=cfg.steps,
                  curve=curve, evals=evals, test_loss=test_loss, test_acc=test_acc,
                  final_loss=float(np.mean([v for _, v in curve[-50:]])) if curve else None,
                  compile_s=t_compile, step_ms=1e3 * float(np.median(step_times))
                  if step_times else None)
    if rule is not None:
        masks = nmjax.optim.masks_of(opt_state)
        result["masks_valid"] = bool(plan.valid(masks))
        result["summary"] = str(summarize(params, masks, plan))
        result["density"] = summarize(params, masks, plan).density
        dense_kernel = params["Dense_0"]["kernel"]
        result["backends"] = nmjax.ops.which_backends(
            (cfg.batch, dense_kernel.shape[0]), dense_kernel.shape,
            fwd_nm=rule.pattern.fwd_nm, bwd_nm=rule.pattern.bwd_nm,
            permuted=isinstance(rule.pattern, nmjax.masks.BiMask))
        state = nmjax.optim.find_state(opt_state)
        result["refreshes"] = int(state.refreshes)
        result["searches"] = int(state.searches)
    result["params"] = params
    return result


def _field_type(field: dataclasses.Field) -> type:
    """The command-line type of a config field from its annotation (``int | None`` -> int)."""
    text = field.type if isinstance(field.type, str) else str(field.type)
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if re.search(rf"\b{name}\b", text):
            return kind
    return str


def parse_config(config_cls, argv, *, description: str, fast_help: str, fast: dict):
    """``(config, json_path)`` from the command line: one ``--flag`` per field of the
    dataclass ``config_cls``, ``--fast`` (which sets the ``fast`` defaults) and ``--json``."""
    ap = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(config_cls):
        flag, kind = f"--{f.name.replace('_', '-')}", _field_type(f)
        if kind is bool:
            ap.add_argument(flag, action="store_true", default=f.default)
        else:
            ap.add_argument(flag, type=kind, default=f.default)
    ap.add_argument("--fast", action="store_true", help=fast_help)
    ap.add_argument("--json", help="write the metrics to this file")
    argv = sys.argv[1:] if argv is None else argv
    if "--fast" in argv:
        ap.set_defaults(**fast)
    args = vars(ap.parse_args(argv))
    args.pop("fast")
    out = args.pop("json")
    return config_cls(**args), out


def write_metrics(result: dict, path: str | None) -> None:
    """The run's metrics (everything but the parameters) as JSON, when ``path`` is given."""
    if path:
        keep = {k: v for k, v in result.items() if k != "params"}
        Path(path).write_text(json.dumps(keep, indent=1, default=float))


def main(argv=None):
    cfg, out = parse_config(
        Config, argv, description=__doc__.splitlines()[0],
        fast_help="a smoke run: defaults of 30 steps on 2,000 images, a narrow model",
        fast=dict(steps=30, eval_every=15, width=8, train_limit=2000, batch=32))
    result = train(cfg)
    print(f"\n{result['dataset']}: {cfg.pattern}, {cfg.steps} steps: test accuracy "
          f"{result['test_acc']:.4f}, final train loss {result['final_loss']:.4f}, "
          f"{result['step_ms']:.1f} ms/step")
    if "summary" in result:
        print(f"masks valid: {result['masks_valid']}; refreshes {result['refreshes']}, "
              f"permutation searches {result['searches']}; products on "
              f"{'/'.join(result['backends'])}\n")
        print(result["summary"])
    write_metrics(result, out)
    return result


if __name__ == "__main__":
    main()
