# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # One-shot N:M pruning: magnitude, Wanda, SparseGPT and AdaPrune on a byte-level LM
#
# SparseGPT (Frantar & Alistarh, ICML 2023) chooses each group's mask by OBS saliency
# `w² / [H⁻¹]_jj` and updates the weights not yet pruned to compensate; Wanda (Sun et al.,
# ICLR 2024) scores `|w| · ‖x‖₂` and keeps the weights as they are; AdaPrune (Hubara et al.,
# 2021) takes the magnitude mask and re-fits the kept weights. `nmjax.convert.sparsegpt`,
# `.wanda` and `.adaprune` take the same model, calibration batch and rule, and return the
# same `Conversion`.
#
# This notebook trains the Transformer of `examples/lm.py` dense on the Python documentation
# bytes, prunes every hidden Dense layer in one shot (no training), and measures:
#
# 1. the validation loss (nats per byte) and perplexity of each method at 2:4, 4:8 and 2:4
#    transposable;
# 2. each layer's output error relative to the dense layer;
# 3. how the loss depends on the calibration-set size, for each method.
#
# The model, data and evaluation are those of `benchmarks/oneshot.py` (whose full table,
# with Bi-Mask and a sparse fine-tune, is `benchmarks/results/oneshot.md`).

# %%
import importlib.util
import math
import sys
import time
from pathlib import Path

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "nmjax").is_dir())
sys.path[:0] = [str(ROOT), str(ROOT / "notebooks")]

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from IPython.display import Markdown, display  # noqa: E402
from nbutil import FAST, machine, progress  # noqa: E402

import nmjax  # noqa: E402
from nmjax.tree import MaskRule  # noqa: E402

_spec = importlib.util.spec_from_file_location("oneshot_bench",
                                               ROOT / "benchmarks" / "oneshot.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

print(machine())

# %% [markdown]
# ## Settings
#
# Full settings: `d_model` 64, two blocks, context 64, trained dense for 1,200 steps of 16
# windows; calibration on 64 training windows of 64 bytes; validation loss over 256
# windows. Every Dense kernel but the 256-way head is pruned (query, key, value, out,
# mlp_in, mlp_out of each block), layers calibrated in sequence. `NMJAX_FAST=1`: the
# benchmark's smoke settings (a one-block model trained 30 steps; 2:4 only), not a result.

# %%
if FAST:
    S = dict(bench.FAST)
    PATTERNS, SIZES = ("2:4",), (4, 16)
else:
    S = dict(bench.FULL, d_model=64, steps=1200, eval_windows=256, calib=64,
             eval_every=1200, sizes=(4, 16, 64, 256))
    PATTERNS, SIZES = ("2:4", "4:8", "2:4 transposable"), S["sizes"]
S["sizes"] = SIZES
METHODS = ("wanda", "sparsegpt", "adaprune")
NAMES = {"magnitude": "magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT",
         "adaprune": "AdaPrune"}

t0 = time.perf_counter()
lm = bench.Bench(S, nmjax.datasets.text())
dense = lm.loss(lm.params)
calib = lm.calib[:S["calib"]]
print(f"dense: validation loss {dense:.4f} nats/byte, perplexity {math.exp(dense):.3f} "
      f"({time.perf_counter() - t0:.0f} s to train and evaluate)")

# %% [markdown]
# ## 1. Validation loss after one-shot pruning

# %%
losses, conversions, seconds = {}, {}, {}
with progress(len(PATTERNS) * len(METHODS), "conversions") as bar:
    for pattern in PATTERNS:
        rule = MaskRule(pattern, exclude="head")
        losses[pattern] = {}
        for method in METHODS:
            conv, sec = bench.convert(lm, method, rule, calib)
            conversions[pattern, method] = conv
            seconds[pattern, method] = sec
            losses[pattern][method] = lm.loss(conv.params)
            bar.console.print(f"{pattern:18s} {NAMES[method]:10s} loss "
                              f"{losses[pattern][method]:.4f} ({sec:.1f} s)")
            bar.step()
        losses[pattern]["magnitude"] = lm.loss(conversions[pattern, "wanda"].magnitude_params)

# %%
ORDER = ("magnitude", *METHODS)
fig, ax = plt.subplots(figsize=(8, 3.8))
width = 0.8 / len(ORDER)
xs = np.arange(len(PATTERNS))
for i, method in enumerate(ORDER):
    ax.bar(xs + (i - (len(ORDER) - 1) / 2) * width,
           [math.exp(losses[p][method]) for p in PATTERNS], width, label=NAMES[method])
ax.axhline(math.exp(dense), color="k", lw=1.2, label="dense")
ax.set_xticks(xs, PATTERNS)
ax.set_ylabel("validation perplexity (per byte)")
ax.set_title("One-shot N:M pruning of a byte-level Transformer LM")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Per-layer output error at 2:4
#
# `‖X·W − X·Ŵ‖ / ‖X·W‖` on each layer's calibration inputs (from the model with the earlier
# layers already pruned by the same method). Magnitude's error is that of each method's
# own inputs; the Wanda run's is shown.

# %%
layers = conversions["2:4", "wanda"].layers
names = ["/".join(r.path.split("/")[:2]) for r in layers]
pos = np.arange(len(layers))
fig, ax = plt.subplots(figsize=(9, 3.5))
ax.bar(pos - 0.3, [r.error_magnitude for r in layers], 0.2, label="magnitude")
for i, method in enumerate(METHODS):
    ax.bar(pos + (i - 0.5) * 0.2, [r.error_adaprune for r in conversions["2:4", method].layers],
           0.2, label=NAMES[method])
ax.set_xticks(pos, names, fontsize=7, rotation=45, ha="right")
ax.set_ylabel("relative output error")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
print(conversions["2:4", "sparsegpt"].report())

# %% [markdown]
# ## 3. Calibration-set size (2:4)

# %%
curve = {method: [] for method in METHODS}
rule = MaskRule("2:4", exclude="head")
with progress(len(SIZES) * len(METHODS), "calibration sizes") as bar:
    for size in SIZES:
        for method in METHODS:
            conv, _ = bench.convert(lm, method, rule, lm.calib[:size])
            curve[method].append(lm.loss(conv.params))
            bar.console.print(f"{size:4d} windows  {NAMES[method]:10s} loss "
                              f"{curve[method][-1]:.4f}")
            bar.step()

fig, ax = plt.subplots(figsize=(6, 3.5))
for method in METHODS:
    ax.semilogx(SIZES, [math.exp(v) for v in curve[method]], "o-", base=2,
                label=NAMES[method])
ax.axhline(math.exp(dense), color="k", lw=1, label="dense")
ax.axhline(math.exp(losses["2:4"]["magnitude"]), color="C3", lw=1, ls=":",
           label="magnitude 2:4")
ax.set_xlabel(f"calibration windows ({S['context']} bytes each)")
ax.set_ylabel("validation perplexity")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Conclusion (from this run's numbers)

# %%
lines = [f"Dense validation perplexity {math.exp(dense):.3f} per byte.", "",
         "| pattern | " + " | ".join(NAMES[m] for m in ORDER) + " |",
         "|---|" + "---:|" * len(ORDER)]
for p in PATTERNS:
    lines.append(f"| {p} | " + " | ".join(f"{math.exp(losses[p][m]):.3f}" for m in ORDER)
                 + " |")
p24 = {m: math.exp(v) for m, v in losses["2:4"].items()}
best = min(METHODS, key=p24.get)
lines += ["",
          f"* At 2:4 the best one-shot method here is {NAMES[best]} "
          f"({p24[best]:.3f}, dense {math.exp(dense):.3f}, magnitude {p24['magnitude']:.3f}).",
          f"* The papers' ordering SparseGPT <= Wanda <= magnitude "
          f"{'holds' if p24['sparsegpt'] <= p24['wanda'] <= p24['magnitude'] else 'does not hold'}"
          f" on this model ({p24['sparsegpt']:.3f} / {p24['wanda']:.3f} / "
          f"{p24['magnitude']:.3f}).",
          "* Calibration: " + "; ".join(
              f"{NAMES[m]} {math.exp(curve[m][0]):.3f} with {SIZES[0]} windows, "
              f"{math.exp(curve[m][-1]):.3f} with {SIZES[-1]}" for m in METHODS) + "."]
display(Markdown("\n".join(lines)))
