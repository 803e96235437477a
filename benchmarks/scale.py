"""A 1.1B-parameter sparse training step, planned on 8 host devices: memory and collectives.

A Llama-style decoder (d_model 2048, FFN 5632 SwiGLU, 22 layers, 32 query / 4 key-value
heads, vocabulary 32000; RMSNorm, no rotary embedding), its layers stacked with ``nn.scan``
(one compiled layer body: compiling 22 unrolled layers is too slow on a shared CPU). The
parameters are abstract (``jax.eval_shape``); nothing of model size is allocated. The
kernels are sharded FSDP x TP over a 2 x 4 mesh of host CPU devices: q, k, v, gate, up
``(layers, in, out)`` as ``P(None, "fsdp", "tp")``, o and down as ``P(None, "tp", "fsdp")``.

For the dense Adam step and the sparse steps (``nmjax.optim.sparse`` around the same Adam,
masks refreshed every step, static sparse layers reading them; 2:4, transposable 2:4, and
Bi-Mask 2:4 with a permutation search every 100 steps), the script lowers and compiles the
jitted step and reports XLA's ``memory_analysis()`` per device and the collectives in the
compiled HLO. It then times the refresh of one real layer's seven kernels on this CPU (one
device, random weights) and extrapolates per billion weights.

  .venv/bin/python benchmarks/scale.py            # writes results/scale.md
  .venv/bin/python benchmarks/scale.py --quick    # a 2-layer, d_model 256 model; prints only
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nmjax  # noqa: E402
from nmjax._hlo import collectives  # noqa: E402
from nmjax.plan import from_axis, layout_masks, layout_search  # noqa: E402
from nmjax.tree import MaskRule  # noqa: E402

FULL = dict(d=2048, ffn=5632, layers=22, heads=32, kv_heads=4, vocab=32000)
QUICK = dict(d=256, ffn=704, layers=2, heads=4, kv_heads=2, vocab=1024)
BATCH, SEQ = 8, 512
PATTERNS = ("2:4", "2:4 transposable", "2:4 bimask")


def rms_norm(x, scale):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale


class Layer(nn.Module):
    d: int
    ffn: int
    heads: int
    kv_heads: int

    @nn.compact
    def __call__(self, x, _):
        hd = self.d // self.heads
        h = rms_norm(x, self.param("attn_norm", nn.initializers.ones, (self.d,)))
        q = nn.Dense(self.d, use_bias=False, name="q")(h)
        k = nn.Dense(self.kv_heads * hd, use_bias=False, name="k")(h)
        v = nn.Dense(self.kv_heads * hd, use_bias=False, name="v")(h)
        b, s, _ = x.shape
        q = q.reshape(b, s, self.kv_heads, self.heads // self.kv_heads, hd)
        k, v = k.reshape(b, s, self.kv_heads, hd), v.reshape(b, s, self.kv_heads, hd)
        logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, k) / np.sqrt(hd)
        logits = jnp.where(jnp.tril(jnp.ones((s, s), bool)), logits, -1e9)
        att = jnp.einsum("bhgqk,bkhd->bqhgd", jax.nn.softmax(logits, -1), v)
        x = x + nn.Dense(self.d, use_bias=False, name="o")(att.reshape(b, s, self.d))
        h = rms_norm(x, self.param("mlp_norm", nn.initializers.ones, (self.d,)))
        gate = nn.Dense(self.ffn, use_bias=False, name="gate")(h)
        up = nn.Dense(self.ffn, use_bias=False, name="up")(h)
        return x + nn.Dense(self.d, use_bias=False, name="down")(nn.silu(gate) * up), None


class Decoder(nn.Module):
    d: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.d, name="embed")(tokens)
        stack = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=self.layers)
        x, _ = stack(self.d, self.ffn, self.heads, self.kv_heads, name="layers")(x, None)
        x = rms_norm(x, self.param("norm", nn.initializers.ones, (self.d,)))
        return nn.Dense(self.vocab, use_bias=False, name="lm_head")(x)


def kernel_spec(path: str, ndim: int) -> P:
    """The parameters' FSDP x TP layout (``path``: ``"layers/q/kernel"``)."""
    name = path.split("/")[-2] if path.endswith("kernel") else path.split("/")[-1]
    if name in ("q", "k", "v", "gate", "up"):
        return P(None, "fsdp", "tp")
    if name in ("o", "down"):
        return P(None, "tp", "fsdp")
    if name == "embedding":
        return P("tp", "fsdp")
    if name == "lm_head":
        return P("fsdp", "tp")
    return P(*(None,) * ndim)


def state_shardings(state, param_sh, mesh):
    """The optimizer state laid out like the parameters: each leaf under a parameter's
    path with the parameter's rank takes its sharding (moments, packed masks); a Bi-Mask
    permutation ``(layers, out)`` of a kernel ``(layers, in, out)`` its output axis's."""
    by_key = {jax.tree_util.keystr(p): s for p, s in
              jax.tree_util.tree_flatten_with_path(param_sh)[0]}

    def one(path, leaf):
        key = jax.tree_util.keystr(path)
        hits = [k for k in by_key if k in key and len(by_key[k].spec) == leaf.ndim]
        if hits:
            return by_key[max(hits, key=len)]
        kernels = [k for k in by_key if k in key and len(by_key[k].spec) == leaf.ndim + 1]
        if key.endswith(".perm") and kernels:
            spec = by_key[max(kernels, key=len)].spec
            return NamedSharding(mesh, P(*spec[:-2], spec[-1]))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, state)


def plan_step(cfg, pattern, mesh):
    """Compiles one training step; returns (memory_analysis, collectives, seconds)."""
    model = Decoder(**cfg)
    tokens = jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32)
    params = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 8), jnp.int32)),
                            jax.random.key(0))["params"]
    param_sh = jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, kernel_spec(nmjax.tree.path_str(p), x.ndim)), params)
    if pattern is None:
        tx, apply = optax.adam(1e-4), model.apply
        masks_of = None
    else:
        plan = nmjax.resolve(model, MaskRule(pattern, exclude="lm_head"),
                             jnp.zeros((1, 8), jnp.int32))
        tx = nmjax.optim.sparse(optax.adam(1e-4), plan, refresh_every=1, decay=2e-4,
                                perm_every=100 if "bimask" in pattern else None,
                                shardings=param_sh)
        sparse_model = nmjax.nn.sparsify(model, plan, mode="static")
        apply, masks_of = sparse_model.apply, nmjax.nn.collection
    state = jax.eval_shape(tx.init, params)
    state_sh = state_shardings(state, param_sh, mesh)
    data_sh = NamedSharding(mesh, P("fsdp", None))

    def step(params, state, tokens):
        extra = {} if masks_of is None else {"nm_masks": masks_of(state)}

        def loss(p):
            logits = apply({"params": p, **extra}, tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), tokens[:, 1:]).mean()

        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    start = time.perf_counter()
    compiled = jax.jit(step, in_shardings=(param_sh, state_sh, data_sh),
                       out_shardings=(param_sh, state_sh), donate_argnums=(0, 1)).lower(
        params, state, tokens).compile()
    seconds = time.perf_counter() - start
    weights = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return compiled.memory_analysis(), collectives(compiled.as_text()), seconds, weights


def layer_refresh_times(cfg, repeats):
    """Seconds to refresh one layer's seven kernels on one CPU device, per pattern (and
    the Bi-Mask permutation search), and the layer's weight count."""
    d, ffn, kv = cfg["d"], cfg["ffn"], cfg["kv_heads"] * cfg["d"] // cfg["heads"]
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, ffn), (d, ffn), (ffn, d)]
    rng = np.random.default_rng(0)
    kernels = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
    weights = sum(int(np.prod(s)) for s in shapes)
    out = {}
    for spec in PATTERNS:
        pattern = nmjax.masks.as_pattern(spec)

        def refresh(ws, pattern=pattern):
            return [layout_masks(pattern, w, from_axis(w.shape, 0)) for w in ws]

        out[spec] = _time(jax.jit(refresh), kernels, repeats)
        if spec == "2:4 bimask":
            def search(ws, pattern=pattern):
                keys = jax.random.split(jax.random.key(0), len(ws))
                return [layout_search(pattern, w, from_axis(w.shape, 0), k)
                        for w, k in zip(ws, keys, strict=True)]

            out["2:4 bimask search"] = _time(jax.jit(search), kernels, repeats)
    return out, weights


def _time(fn, args, repeats):
    jax.block_until_ready(fn(args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def mib(x: float) -> str:
    return f"{x / 2**20:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    cfg = QUICK if args.quick else FULL
    mesh = jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)
    load0 = os.getloadavg()
    rows, dense = [], None
    for pattern in (None, *PATTERNS):
        mem, coll, seconds, weights = plan_step(cfg, pattern, mesh)
        # What the step holds at once: its arguments, its outputs not aliased to them
        # (donated), and its temporaries (the CPU backend's peak_memory_in_bytes counts
        # less than the temporaries, so it is not used).
        peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
        row = dict(label=pattern or "dense Adam", peak=peak, arg=mem.argument_size_in_bytes,
                   temp=mem.temp_size_in_bytes, coll=coll, compile=seconds)
        dense = dense or row
        rows.append(row)
        print(f"{row['label']:18s} peak {mib(peak)} MiB (x{peak / dense['peak']:.3f}), "
              f"args {mib(row['arg'])} MiB, temp {mib(row['temp'])} MiB, compile "
              f"{seconds:.0f} s, collectives {coll}", flush=True)
    times, layer_weights = layer_refresh_times(cfg, repeats=1 if args.quick else 3)
    for name, t in times.items():
        print(f"refresh {name}: {t * 1e3:.0f} ms per layer ({layer_weights:,} weights), "
              f"{t / layer_weights * 1e9:.2f} s per 1e9 weights", flush=True)
    if args.quick:
        return
    load = " ".join(f"{v:.2f}" for v in load0) + " → " + " ".join(
        f"{v:.2f}" for v in os.getloadavg())
    write(rows, times, layer_weights, weights, load)


def _coll_text(coll: dict) -> str:
    return ", ".join(f"{k} {c} ({mib(b)} MiB)" for k, (c, b) in sorted(coll.items())) or "none"


BIMASK_NOTE = (
    "Bi-Mask's extra all-reduces are its permutation search's (run every `perm_every` "
    "steps): each output shard searches its own channels, and the contraction shards of "
    "one output block sum their swap gains, one all-reduce per kernel of 2 float32 per "
    "output channel of the shard (7 kernels, 43 KiB per device in all). What every "
    "sparse step adds to the temporaries (462 MiB per device here, 4 B per sparse weight "
    "this device holds) is each layer's masked kernel, kept by the forward pass for the "
    "input gradient; the masks enter the layer scan bit-packed.")


def write(rows, times, layer_weights, weights, load) -> None:
    sparse_weights = FULL["layers"] * layer_weights
    dense = rows[0]
    lines = [
        "# A 1.1B-parameter step, planned on 8 host devices",
        "",
        f"Measured {datetime.date.today()} on a shared 2-core CPU ({platform.machine()}), "
        f"jax {jax.__version__}, 8 host devices forced with `--xla_force_host_platform_device_"
        f"count=8`; load average {load}. Command: `python benchmarks/scale.py`.",
        "",
        f"Model: Llama-style decoder, d_model {FULL['d']}, FFN {FULL['ffn']} (SwiGLU), "
        f"{FULL['layers']} layers stacked with `nn.scan`, {FULL['heads']} query / "
        f"{FULL['kv_heads']} key-value heads, vocabulary {FULL['vocab']}: "
        f"{weights / 1e9:.3f} B parameters, abstract (`jax.eval_shape`). Mesh 2 (fsdp) x 4 "
        "(tp), kernels FSDP x TP (`benchmarks/scale.py`'s `kernel_spec`), optimizer state "
        f"laid out like the parameters, batch {BATCH} x {SEQ} tokens over fsdp. Every "
        "kernel of the 22 layers is sparse (the embedding and the LM head stay dense); "
        "Bi-Mask permutations are laid out like their kernel's output axis. "
        "Sparse steps: `nmjax.optim.sparse(optax.adam(1e-4), plan, refresh_every=1, "
        "shardings=...)` (Bi-Mask: `perm_every=100`), static sparse layers reading the "
        "state's masks (expanded from the packed state inside the step).",
        "",
        "XLA's `memory_analysis()` of the compiled step, per device (CPU compiler: the "
        "figures are the CPU backend's buffer assignment, not a GPU's). Peak = arguments + "
        "outputs + temporaries - aliased (donated) bytes. Collectives: ops in the compiled "
        "HLO text and their result bytes per device, each op counted once (an op inside the "
        "layer scan's loop runs once per layer).",
        "",
        "| step | peak MiB | vs dense | arguments MiB | mask state MiB (B per sparse weight) "
        "| temp MiB | collectives (count, bytes per device) | compile s |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        extra = r["arg"] - dense["arg"]  # the state's masks: all the sparse step adds
        per_weight = extra * 8 / sparse_weights
        lines.append(f"| {r['label']} | {mib(r['peak'])} | {r['peak'] / dense['peak']:.3f} "
                     f"| {mib(r['arg'])} | {mib(extra)} ({per_weight:.3f}) | {mib(r['temp'])} "
                     f"| {_coll_text(r['coll'])} | {r['compile']:.0f} |")
    lines += [
        "",
        f"Mask state = the step's arguments beyond dense Adam's, per device; "
        f"{sparse_weights / 1e9:.3f} B weights are sparse (8 devices hold one copy of the "
        "state between them). Bi-Mask's includes its int32 permutations.",
        "",
        BIMASK_NOTE,
    ]
    lines += [
        "",
        f"Refresh of one real layer's seven kernels ({layer_weights:,} weights: q, k, v, o, "
        "gate, up, down at full size, random normal weights), jitted, on one CPU device of "
        "this shared 2-core machine (median of 3), extrapolated linearly per billion "
        "weights. A CPU figure: not a GPU's.",
        "",
        "| refresh | ms per layer | s per 1e9 weights (extrapolated) |",
        "|---|---:|---:|",
    ]
    names = {"2:4 bimask": "2:4 bimask (masks for a given permutation)",
             "2:4 bimask search": "2:4 bimask permutation search (swap)"}
    for name, t in times.items():
        lines.append(f"| {names.get(name, name)} | {t * 1e3:,.0f} | "
                     f"{t / layer_weights * 1e9:.2f} |")
    out = ROOT / "benchmarks" / "results" / "scale.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
