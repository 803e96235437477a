"""Packed checkpoints and packed inference on a Flax GPT-2 (random init, bfloat16): bytes,
orbax checkpoint size, save and restore times against the dense checkpoint, and the
packed forward's parameter memory; writes ``benchmarks/results/export.md``.

  .venv/bin/python benchmarks/export.py                 # n_embd 512, 4 layers
  .venv/bin/python benchmarks/export.py --quick         # n_embd 256, 2 layers, 3 repeats

The masked leaves are the ``c_attn``/``c_proj``/``c_fc`` kernels (``FlaxConv1D``,
``(out, in)``, groups along ``in``); embeddings and norms stay dense. Restore times are
medians over ``--repeats`` restores of each checkpoint in turns (dense, packed), each into
a fresh tree with ``jax.block_until_ready``; "restore + unpack" adds
:func:`nmjax.export.unpack_params` (jitted, compiled beforehand). Memory: the compiled
forward's ``memory_analysis()`` (arguments = the resident parameters and the tokens;
temporaries include the unpacked kernels) and the bytes of ``jax.live_arrays()`` holding
the parameters.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from nmjax import export  # noqa: E402
from nmjax.masks import BiMask, Masks, Transposable  # noqa: E402
from nmjax.nn import packed_variables  # noqa: E402
from nmjax.tree import MaskRule, apply_masks, build_masks  # noqa: E402

PATTERNS = [("2:4", "2:4"), ("4:8", "4:8"), ("2:4 transposable", Transposable(2, 4)),
            ("4:8 transposable (greedy)", Transposable(4, 8, method="greedy")),
            ("2:4 Bi-Mask", BiMask(2, 4))]
INCLUDE = r"c_(attn|proj|fc)/kernel$"


def transposed_masks(params, pattern):
    """Masks of a pattern that pairs the contraction axis with the last one (transposable,
    Bi-Mask), for the ``(out, in)`` kernels: computed on ``kernel.T`` (``(in, out)``) and
    transposed back (Bi-Mask's permutation stays one of ``out``)."""
    selected = build_masks(params, MaskRule("2:4", include=INCLUDE, axis=1))

    def one(w, m):
        if m is None:
            return None
        kw = {"key": jax.random.key(0)} if isinstance(pattern, BiMask) else {}
        t = pattern(w.T, 0, **kw)
        return Masks(t.fwd.T, t.bwd.T, t.perm)

    return jax.tree.map(one, params, selected, is_leaf=lambda x: x is None or
                        isinstance(x, Masks))


def directory_bytes(path: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def timed(fn) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def live_bytes() -> int:
    return sum(a.nbytes for a in jax.live_arrays())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "export.md"))
    args = parser.parse_args()
    from transformers import FlaxGPT2LMHeadModel, GPT2Config

    embd, layers = (256, 2) if args.quick else (512, 4)
    repeats = 3 if args.quick else args.repeats
    config = GPT2Config(vocab_size=4096, n_positions=128, n_embd=embd, n_layer=layers,
                        n_head=8)
    model = FlaxGPT2LMHeadModel(config, seed=0, dtype=jnp.bfloat16)
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), model.params)
    tokens = jnp.arange(2 * 64).reshape(2, 64) % config.vocab_size
    forward = jax.jit(lambda p: model(tokens, params=p).logits)
    dense_bytes = export.nbytes(params)
    lines = [
        f"# Packed checkpoints and packed inference ({datetime.date.today()})",
        "",
        f"Command: `benchmarks/export.py{' --quick' if args.quick else ''}"
        f"{f' --repeats {args.repeats}' if not args.quick else ''}`; machine: "
        f"shared 2-core CPU ({platform.machine()}), jax {jax.__version__}, CPU backend. "
        f"Model: Flax GPT-2, n_embd={embd}, {layers} layers, vocab {config.vocab_size}, "
        f"bfloat16, {dense_bytes / 2**20:.1f} MiB of parameters. Restore: median of "
        f"{repeats}, load average at start {os.getloadavg()[0]:.1f}.",
        "",
        "| pattern | masked leaves: packed/dense bytes | whole model: packed/dense bytes "
        "| orbax dir: packed/dense | orbax dir: packed/dense masked | restore dense (s) "
        "| restore packed (s) | ratio | restore+unpack (s) | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    tmp = Path(tempfile.mkdtemp())
    try:
        export.save(tmp / "dense", params)
        for label, pattern in PATTERNS:
            masks = build_masks(params, MaskRule(pattern, include=INCLUDE, axis=1)) \
                if isinstance(pattern, str) else transposed_masks(params, pattern)
            packed = export.pack_params(params, masks, axes=1)
            masked = apply_masks(params, masks)
            leaves = [(w, p) for w, p in zip(jax.tree.leaves(params),
                                               jax.tree.leaves(packed, is_leaf=export.is_packed),
                                               strict=True) if export.is_packed(p)]
            leaf_ratio = (sum(export.nbytes(p) for _, p in leaves)
                          / sum(export.nbytes(w) for w, _ in leaves))
            name = label.replace(" ", "_").replace(":", "")
            export.save(tmp / name, packed)
            export.save(tmp / f"{name}_masked", masked)
            unpack = jax.jit(export.unpack_params)
            jax.block_until_ready(unpack(packed))
            times = {"dense": [], "packed": [], "unpack": []}
            for _ in range(repeats):
                times["dense"].append(timed(lambda: export.restore(tmp / "dense")))
                times["packed"].append(timed(lambda n=name: export.restore(tmp / n)))
                times["unpack"].append(
                    timed(lambda n=name, f=unpack: f(export.restore(tmp / n))))
            med = {k: statistics.median(v) for k, v in times.items()}
            lines.append(
                f"| {label} | {leaf_ratio:.4f} | {export.nbytes(packed) / dense_bytes:.4f} | "
                f"{directory_bytes(tmp / name) / directory_bytes(tmp / 'dense'):.3f} | "
                f"{directory_bytes(tmp / name) / directory_bytes(tmp / f'{name}_masked'):.3f} | "
                f"{med['dense']:.3f} | {med['packed']:.3f} | "
                f"{med['packed'] / med['dense']:.2f} | {med['unpack']:.3f} | "
                f"{med['unpack'] / med['dense']:.2f} |")
            print(lines[-1], flush=True)
            if label == "2:4":
                inference = packed_inference(forward, params, masked, packed)
        lines += ["", *inference]
    finally:
        shutil.rmtree(tmp)
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    kept = out.read_text().split("\n## compressed-tensors check", 1) if out.exists() else []
    if len(kept) == 2:  # benchmarks/compressed_tensors_check.py --record's section
        text += "\n## compressed-tensors check" + kept[1]
    out.write_text(text)
    print(text)


def packed_inference(forward, params, masked, packed) -> list[str]:
    """2:4 packed forward against the dense one on masked weights: equality and memory."""
    variables = packed_variables(packed)["params"]
    same = bool((forward(variables) == forward(masked)).all())
    dense_mem = forward.lower(masked).compile().memory_analysis()
    packed_mem = forward.lower(variables).compile().memory_analysis()
    base = live_bytes()
    resident_dense = jax.tree.map(jnp.copy, params)
    jax.block_until_ready(resident_dense)
    dense_live = live_bytes() - base
    del resident_dense
    base = live_bytes()
    resident_packed = jax.tree.map(jnp.copy, variables)
    jax.block_until_ready(resident_packed)
    packed_live = live_bytes() - base
    del resident_packed
    t_dense = statistics.median(timed(lambda: forward(masked)) for _ in range(5))
    t_packed = statistics.median(timed(lambda: forward(variables)) for _ in range(5))
    mib = 2**20
    return [
        "Packed inference (2:4; `packed_variables`, unpacked inside the jitted forward, "
        "tokens (2, 64)):",
        "",
        f"- logits equal to the dense model on masked weights (bit for bit): {same}",
        f"- parameters held (`jax.live_arrays`): dense {dense_live / mib:.2f} MiB, packed "
        f"{packed_live / mib:.2f} MiB ({packed_live / dense_live:.3f}x)",
        f"- compiled forward `memory_analysis()`: arguments dense "
        f"{dense_mem.argument_size_in_bytes / mib:.2f} MiB, packed "
        f"{packed_mem.argument_size_in_bytes / mib:.2f} MiB; temporaries dense "
        f"{dense_mem.temp_size_in_bytes / mib:.2f} MiB, packed "
        f"{packed_mem.temp_size_in_bytes / mib:.2f} MiB (the unpacked kernels live there)",
        f"- forward time (CPU, median of 5): dense {t_dense * 1e3:.1f} ms, packed "
        f"{t_packed * 1e3:.1f} ms ({t_packed / t_dense:.2f}x)",
    ]


if __name__ == "__main__":
    main()
