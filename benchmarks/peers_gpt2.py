"""nmjax and jaxpruner on a Hugging Face Flax GPT-2, in one run: user lines, the axis each
library's masks run along, and the training step time against dense.

    python benchmarks/peers_gpt2.py                       # nmjax vs dense only
    JAXPRUNER_SRC=<checkout of google-research/jaxpruner> python benchmarks/peers_gpt2.py

jaxpruner is not on the package registry this project installs from; the benchmark imports
it from a source checkout given by ``JAXPRUNER_SRC`` (it needs ``chex`` and
``ml-collections``) and is skipped otherwise. GPT-2 is built from a config (random init;
nothing downloads). Step times are medians of jitted steps after a warm-up, on whatever
device JAX runs on (the figures in ``results/peers_gpt2.md`` are CPU figures: nmjax runs its
reference products there, so the sparse step is not expected to be faster).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
warnings.filterwarnings("ignore", message=".*TensorFlow and JAX classes are deprecated.*")

import nmjax  # noqa: E402
from nmjax.tree import MaskRule  # noqa: E402

KERNELS = ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")


def np_nm_fraction(mask: np.ndarray, axis: int, n: int = 2, m: int = 4) -> float:
    """Fraction of groups of m along ``axis`` that keep at most n (numpy, independent)."""
    a = np.moveaxis(np.asarray(mask, bool), axis, -1)
    counts = a.reshape(*a.shape[:-1], -1, m).sum(-1)
    return float((counts <= n).mean())


def median_ms(step, state, batches, repeats):
    state = step(state, batches[0])                       # compile + warm-up
    jax.block_until_ready(state)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        state = step(state, batches[(i + 1) % len(batches)])
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times)), state


def build(args):
    from transformers import FlaxGPT2LMHeadModel, GPT2Config

    cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.width,
                     n_layer=args.layers, n_head=args.heads)
    model = FlaxGPT2LMHeadModel(cfg, seed=0)
    rng = np.random.default_rng(0)
    batches = [jnp.asarray(rng.integers(0, args.vocab, (args.batch, args.seq)), jnp.int32)
               for _ in range(4)]
    return model, batches


def loss_fn(module, params, ids, extra=None):
    kw = dict(attention_mask=jnp.ones_like(ids),
              position_ids=jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape))
    variables = {"params": params, **(extra or {})}
    logits = module.apply(variables, ids, **kw).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def run_dense(model, batches, repeats):
    tx = optax.adam(1e-3)

    @jax.jit
    def step(state, ids):
        params, opt = state
        grads = jax.grad(lambda p: loss_fn(model.module, p, ids))(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    ms, _ = median_ms(step, (model.params, tx.init(model.params)), batches, repeats)
    return ms


def run_nmjax(model, batches, repeats, refresh_every):
    ids = batches[0]
    kw = dict(attention_mask=jnp.ones_like(ids),
              position_ids=jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape))
    # --- the user's lines ---------------------------------------------------------------
    plan = nmjax.resolve(model.module, MaskRule("2:4"), ids, params=model.params, **kw)
    sparse = nmjax.nn.sparsify(model.module, plan, mode="static")
    tx = nmjax.optim.sparse(optax.adam(1e-3), plan, refresh_every=refresh_every, decay=2e-4)

    @jax.jit
    def step(state, ids):
        params, opt = state
        masks = nmjax.nn.collection(opt)
        grads = jax.grad(lambda p: loss_fn(sparse, p, ids, {"nm_masks": masks}))(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt
    # -------------------------------------------------------------------------------------

    ms, (params, opt) = median_ms(step, (model.params, tx.init(model.params)), batches, repeats)
    masks = nmjax.optim.masks_of(opt)
    fwd = {k: np.asarray(_leaf(masks, k).fwd) for k in _kernel_paths(model)}
    return ms, fwd, plan


def run_jaxpruner(model, batches, repeats):
    # jaxpruner's last release calls jax.tree_map, which jax 0.11 removed: alias it for this
    # benchmark process only (jax.tree.map is the same function).
    if not hasattr(jax, "tree_map"):
        jax.tree_map = jax.tree.map
    import jaxpruner

    # --- the user's lines ---------------------------------------------------------------
    pruner = jaxpruner.SteMagnitudePruning(
        sparsity_type=jaxpruner.sparsity_types.NByM(2, 4),
        sparsity_distribution_fn=lambda p, sparsity=0.5: jaxpruner.sparsity_distributions
        .uniform(p, sparsity, filter_fn=lambda key, w: key[-1] == "kernel"))
    tx = pruner.wrap_optax(optax.adam(1e-3))

    @jax.jit
    def step(state, ids):
        params, opt = state
        forward = pruner.pre_forward_update(params, opt)
        grads = jax.grad(lambda p: loss_fn(model.module, p, ids))(forward)
        updates, opt = tx.update(grads, opt, params)
        params = pruner.post_gradient_update(optax.apply_updates(params, updates), opt)
        return params, opt
    # -------------------------------------------------------------------------------------

    ms, (params, opt) = median_ms(step, (model.params, tx.init(model.params)), batches, repeats)
    forward = pruner.pre_forward_update(params, opt)
    fwd = {k: np.asarray(_leaf(forward, k)) != 0 for k in _kernel_paths(model)}
    return ms, fwd


def _kernel_paths(model):
    layers = len(model.params["transformer"]["h"])
    return [f"transformer/h/{i}/{k}/kernel" for i in range(layers) for k in KERNELS]


def _leaf(tree, path):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=None, help="write the markdown table here too")
    args = ap.parse_args(argv)
    src = os.environ.get("JAXPRUNER_SRC")
    if src:
        sys.path.insert(0, src)
    model, batches = build(args)
    rows = []
    dense_ms = run_dense(model, batches, args.repeats)
    rows.append(("dense (optax.adam)", dense_ms, None))
    for every in (1, 100):
        ms, fwd, plan = run_nmjax(model, batches, args.repeats, every)
        rows.append((f"nmjax 2:4, refresh_every={every}", ms, fwd))
    if src:
        ms, fwd = run_jaxpruner(model, batches, args.repeats)
        rows.append(("jaxpruner SteMagnitudePruning NByM(2, 4)", ms, fwd))
    lines = [
        f"GPT-2 (HF Flax, random init): width {args.width}, {args.layers} layers, vocab "
        f"{args.vocab}, batch {args.batch}x{args.seq}; {jax.devices()[0].device_kind} "
        f"({platform.machine()}), jax {jax.__version__}, {datetime.date.today()}; "
        f"median of {args.repeats} jitted steps, same run.",
        "",
        "| library | step (ms) | vs dense | 2:4 groups along the contraction (in, axis 1) "
        "| along the output (out, axis 0) |",
        "|---|---|---|---|---|",
    ]
    for name, ms, fwd in rows:
        if fwd is None:
            lines.append(f"| {name} | {ms:.1f} | 1.00x | - | - |")
            continue
        along_in = np.mean([np_nm_fraction(m, 1) for m in fwd.values()])
        along_out = np.mean([np_nm_fraction(m, 0) for m in fwd.values()])
        lines.append(f"| {name} | {ms:.1f} | {ms / dense_ms:.2f}x | {along_in:.1%} "
                     f"| {along_out:.1%} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
