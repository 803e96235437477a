"""Train a small byte-level Transformer language model N:M-sparse with nmjax.

A Linen decoder-only Transformer (pre-LayerNorm blocks: causal self-attention whose query,
key, value and output projections are plain ``nn.Dense`` layers, and a GELU MLP) on the
Python documentation sources (Debian's ``python3-doc``; the standard library's own sources
where it is absent), one byte per token. Every Dense kernel but the 256-way output head is
made sparse with :func:`nmjax.nn.sparsify` (static mode) and trained with
:func:`nmjax.optim.sparse` (masks refreshed from the weights, SR-STE decay, Bi-Mask
permutation search). Reports the validation and test loss in nats and bits per byte.

  python examples/lm.py                                 # 2:4 transposable
  python examples/lm.py --pattern dense                 # the same model, dense
  python examples/lm.py --pattern "4:8 bimask" --steps 2000
  python examples/lm.py --fast                          # a smoke run (the tests use it)
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from train import parse_config, progress_bar, sparse_training, write_metrics  # noqa: E402

import nmjax  # noqa: E402
from nmjax.masks import as_pattern  # noqa: E402
from nmjax.tree import MaskRule, summarize  # noqa: E402

VOCAB = 256  # bytes


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: causal self-attention, then a GELU MLP (4x wide)."""

    d_model: int
    heads: int

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        h = nn.LayerNorm(name="ln_attn")(x)
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads)  # noqa: E731
        q = split(nn.Dense(d, name="query")(h))
        k = split(nn.Dense(d, name="key")(h))
        v = split(nn.Dense(d, name="value")(h))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // self.heads)
        causal = jnp.tril(jnp.ones((t, t), bool))
        attn = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
        y = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, t, d)
        x = x + nn.Dense(d, name="out")(y)
        h = nn.LayerNorm(name="ln_mlp")(x)
        h = nn.Dense(4 * d, name="mlp_in")(h)
        return x + nn.Dense(d, name="mlp_out")(nn.gelu(h))


class TransformerLM(nn.Module):
    """Byte embedding + learned positions, ``layers`` blocks, LayerNorm, a 256-way head."""

    d_model: int = 64
    heads: int = 4
    layers: int = 2
    context: int = 64

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, self.d_model, name="embed")(tokens)
        pos = self.param("pos_embedding", nn.initializers.normal(0.02),
                         (self.context, self.d_model))
        x = x + pos[: tokens.shape[1]]
        for i in range(self.layers):
            x = Block(self.d_model, self.heads, name=f"block_{i}")(x)
        return nn.Dense(VOCAB, name="head")(nn.LayerNorm(name="ln_out")(x))


@dataclasses.dataclass
class LMConfig:
    pattern: str = "2:4 transposable"   # an N:M shorthand ("4:8", "2:4 bimask"), or "dense"
    steps: int = 800
    batch: int = 16
    context: int = 64
    d_model: int = 64
    heads: int = 4
    layers: int = 2
    lr: float = 3e-3
    warmup: int = 50
    decay: float = 2e-4                 # SR-STE λ
    refresh_every: int = 1
    perm_every: int = 100               # Bi-Mask permutation search (the paper's I)
    eval_every: int = 200
    eval_windows: int = 256             # validation windows of `context` bytes
    seed: int = 0
    train_limit: int | None = None      # use only the first N training bytes (fast runs)


def rule_for(pattern: str) -> MaskRule | None:
    """Every Dense kernel but the output head (embedding, positions, norms stay dense)."""
    if pattern == "dense":
        return None
    return MaskRule(as_pattern(pattern), exclude="head", skip_indivisible=True)


def _loss(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def _windows(stream: np.ndarray, starts: np.ndarray, context: int) -> np.ndarray:
    return stream[starts[:, None] + np.arange(context + 1)].astype(np.int32)


def _eval_starts(stream: np.ndarray, context: int, count: int) -> np.ndarray:
    """``count`` evenly spaced, non-overlapping windows (the same every time)."""
    count = max(1, min(count, (len(stream) - 1) // (context + 1)))
    return np.linspace(0, len(stream) - context - 2, count).astype(np.int64)


def _evaluate(predict, params, masks, stream, context, count, batch=64) -> float:
    starts = _eval_starts(stream, context, count)
    total = 0.0
    for i in range(0, len(starts), batch):
        w = _windows(stream, starts[i:i + batch], context)
        total += float(_loss(predict(params, masks, w[:, :-1]), w[:, 1:])) * len(w)
    return total / len(starts)


def train(cfg: LMConfig, data=None, *, progress: bool = True) -> dict[str, Any]:
    """Trains one language model; returns its curves, final losses and timings."""
    data = data or nmjax.datasets.text()
    model = TransformerLM(cfg.d_model, cfg.heads, cfg.layers, cfg.context)
    rule = rule_for(cfg.pattern)
    params = model.init(jax.random.key(cfg.seed), jnp.zeros((1, cfg.context), jnp.int32))
    params = params["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, cfg.steps,
                                                  cfg.lr / 10)
    inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    tx, net, plan = sparse_training(model, rule, inner, cfg,
                                    jnp.zeros((1, cfg.context), jnp.int32))
    opt_state = tx.init(params)

    def masks_now(opt_state):
        return nmjax.nn.collection(opt_state) if rule is not None else None

    def apply(params, masks, tokens):
        return net.apply({"params": params, **({"nm_masks": masks} if masks else {})}, tokens)

    @jax.jit
    def step(params, opt_state, windows):
        def loss(p):
            return _loss(apply(p, masks_now(opt_state), windows[:, :-1]), windows[:, 1:])

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    predict = jax.jit(apply)
    train_stream = data.train if cfg.train_limit is None else data.train[:cfg.train_limit]
    rng = np.random.default_rng(cfg.seed + 1)
    curve, evals, step_times, t_compile = [], [], [], None
    with progress_bar(progress) as bar:
        task = bar.add_task(f"{cfg.pattern:>18s}", total=cfg.steps, status="")
        for t in range(cfg.steps):
            starts = rng.integers(0, len(train_stream) - cfg.context - 1, cfg.batch)
            windows = _windows(train_stream, starts, cfg.context)
            t0 = time.perf_counter()
            params, opt_state, value = step(params, opt_state, windows)
            value = float(value)
            if t_compile is None:
                t_compile = time.perf_counter() - t0
            else:
                step_times.append(time.perf_counter() - t0)
            curve.append((t, value))
            if (t + 1) % cfg.eval_every == 0 or t + 1 == cfg.steps:
                val = _evaluate(predict, params, masks_now(opt_state), data.val, cfg.context,
                                cfg.eval_windows)
                evals.append((t + 1, val))
                bar.update(task, status=f"loss {value:.3f}  val {val / math.log(2):.3f} "
                                        "bits/byte")
            bar.advance(task)
    val_loss = evals[-1][1]
    test_loss = _evaluate(predict, params, masks_now(opt_state), data.test, cfg.context,
                          cfg.eval_windows)
    result = dict(pattern=cfg.pattern, dataset=data.name, steps=cfg.steps, curve=curve,
                  evals=evals, val_loss=val_loss, val_bpb=val_loss / math.log(2),
                  test_loss=test_loss, test_bpb=test_loss / math.log(2),
                  final_loss=float(np.mean([v for _, v in curve[-50:]])),
                  compile_s=t_compile,
                  step_ms=1e3 * float(np.median(step_times)) if step_times else None,
                  n_params=int(sum(x.size for x in jax.tree.leaves(params))))
    if rule is not None:
        masks = nmjax.optim.masks_of(opt_state)
        result["masks_valid"] = bool(plan.valid(masks))
        summary = summarize(params, masks, plan)
        result["summary"], result["density"] = str(summary), summary.density
        state = nmjax.optim.find_state(opt_state)
        result["refreshes"], result["searches"] = int(state.refreshes), int(state.searches)
    result["params"] = params
    return result


def main(argv=None):
    cfg, out = parse_config(
        LMConfig, argv, description=__doc__.splitlines()[0],
        fast_help="a smoke run: 20 steps of a one-block model on 200 kB",
        fast=dict(steps=20, eval_every=10, d_model=32, layers=1, context=32, batch=8,
                  eval_windows=32, warmup=5, train_limit=200_000))
    result = train(cfg)
    print(f"\n{result['dataset']}: {cfg.pattern}, {cfg.steps} steps: validation loss "
          f"{result['val_loss']:.4f} nats ({result['val_bpb']:.3f} bits/byte), test "
          f"{result['test_bpb']:.3f} bits/byte, {result['step_ms']:.1f} ms/step")
    if "summary" in result:
        print(f"masks valid: {result['masks_valid']}; refreshes {result['refreshes']}, "
              f"permutation searches {result['searches']}\n")
        print(result["summary"])
    write_metrics(result, out)
    return result


if __name__ == "__main__":
    main()
