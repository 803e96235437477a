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
# # AdaPrune: converting a trained dense model to N:M without retraining
#
# Hubara et al. (NeurIPS 2021, §5) convert a trained dense network to N:M by pruning each
# layer by magnitude and then re-fitting the kept weights so the layer's outputs on a small
# calibration batch match the dense layer's ("AdaPrune"); they report little or no accuracy
# loss from a few hundred unlabelled images, and a short fine-tune to close what is left.
# `nmjax.convert.adaprune` implements it for Flax Linen and NNX models.
#
# This notebook trains a small CNN on Fashion-MNIST, converts it to 2:4, 4:8 and their
# transposable forms, and measures on the 10,000 test images:
#
# 1. test accuracy of magnitude N:M, AdaPrune, and AdaPrune + a short sparse fine-tune
#    (with the magnitude model fine-tuned the same way and the dense model given the same
#    steps, as controls);
# 2. each layer's output error (relative to the dense layer) before and after AdaPrune;
# 3. how many calibration images AdaPrune needs.
#
# The model and training helpers are those of `benchmarks/convert.py` (whose table is
# `benchmarks/results/convert.md`).

# %%
import importlib.util
import sys
import time
from pathlib import Path

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "nmjax").is_dir())
sys.path[:0] = [str(ROOT), str(ROOT / "notebooks")]

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from IPython.display import Markdown, display  # noqa: E402
from nbutil import FAST, machine, progress  # noqa: E402

from nmjax.convert import adaprune  # noqa: E402
from nmjax.datasets import vision  # noqa: E402
from nmjax.tree import MaskRule  # noqa: E402

_spec = importlib.util.spec_from_file_location("convert_bench",
                                               ROOT / "benchmarks" / "convert.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

print(machine())

# %% [markdown]
# ## Settings
#
# Full settings: the dense CNN (conv 16 → conv 32 → dense 128 → dense 64 → head) trained 2
# epochs on the 55,000 training images (Adam 1e-3, batch 128); calibration on 1,024 training
# images, held-out layer errors on 1,024 validation images; fine-tune 200 steps (Adam 3e-4,
# batch 128, masks fixed to the conversion's) through `nmjax.optim.sparse`. The first conv
# (one input channel) and the head stay dense, as in the paper. `NMJAX_FAST=1`: one epoch on
# 4,096 images, 2:4 only, a few fine-tune steps (a smoke run, not a result).

# %%
data = vision()
if FAST:
    EPOCHS, LIMIT, CALIB, HELD, STEPS = 1, 4096, 256, 256, 20
    PATTERNS, SWEEP, TEST = ("2:4",), (32, 256), 2000
else:
    EPOCHS, LIMIT, CALIB, HELD, STEPS = 2, None, 1024, 1024, 200
    PATTERNS = ("2:4", "4:8", "2:4 transposable", "4:8 transposable")
    SWEEP, TEST = (8, 32, 128, 512, 2048), None
EXCLUDE = list(bench.EXCLUDE)
test_x, test_y = data.test.x[:TEST], data.test.y[:TEST]
calib, held = data.train.x[:CALIB], data.val.x[:HELD]
print(f"dataset: {data.name}; {len(test_y)} test images")

t0 = time.perf_counter()
model, params = bench.train_dense(data, epochs=EPOCHS, limit=LIMIT)
dense = bench.evaluate(model, params, test_x, test_y)
dense_tuned = bench.evaluate(model, bench.finetune_dense(model, params, data, steps=STEPS),
                             test_x, test_y)
print(f"dense: test accuracy {dense['accuracy']:.4f}, loss {dense['loss']:.3f} "
      f"({time.perf_counter() - t0:.0f} s); with {STEPS} more steps (the control): "
      f"{dense_tuned['accuracy']:.4f}")

# %% [markdown]
# ## 1. Accuracy: magnitude vs AdaPrune vs AdaPrune + fine-tune

# %%
results, conversions = {}, {}
with progress(len(PATTERNS), "patterns") as bar:
    for pattern in PATTERNS:
        rule = MaskRule(pattern, exclude=EXCLUDE)
        t0 = time.perf_counter()
        conv = adaprune((model, params), calib, rule, held_out=held, progress=False)
        seconds = time.perf_counter() - t0
        conversions[pattern] = conv
        res = {
            "magnitude": bench.evaluate(model, conv.magnitude_params, test_x, test_y),
            "AdaPrune": bench.evaluate(model, conv.params, test_x, test_y),
            "AdaPrune + fine-tune": bench.evaluate(model, bench.finetune(
                conv, rule, data, params=conv.params, steps=STEPS), test_x, test_y),
            "magnitude + fine-tune": bench.evaluate(model, bench.finetune(
                conv, rule, data, params=conv.magnitude_params, steps=STEPS), test_x, test_y),
        }
        results[pattern] = res
        bar.console.print(f"{pattern:18s} convert {seconds:5.1f} s   " + "   ".join(
            f"{k} {v['accuracy']:.4f}" for k, v in res.items()))
        bar.step()

# %%
METHODS = ("magnitude", "AdaPrune", "magnitude + fine-tune", "AdaPrune + fine-tune")
fig, ax = plt.subplots(figsize=(9, 4))
width = 0.8 / len(METHODS)
xs = np.arange(len(PATTERNS))
for i, method in enumerate(METHODS):
    accs = [100 * results[p][method]["accuracy"] for p in PATTERNS]
    ax.bar(xs + (i - (len(METHODS) - 1) / 2) * width, accs, width, label=method)
ax.axhline(100 * dense["accuracy"], color="k", lw=1.2, label="dense")
ax.axhline(100 * dense_tuned["accuracy"], color="k", lw=1, ls="--",
           label=f"dense + {STEPS} steps (control)")
low = min(100 * results[p][m]["accuracy"] for p in PATTERNS for m in METHODS)
ax.set_ylim(max(0, low - 3), 100 * max(dense["accuracy"], dense_tuned["accuracy"]) + 2)
ax.set_xticks(xs, PATTERNS)
ax.set_ylabel("test accuracy (%)")
ax.set_title(f"Converting a trained CNN to N:M ({data.name})")
ax.legend(fontsize=8, loc="lower right", ncol=2)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Per-layer output error: magnitude pruning vs AdaPrune
#
# `‖X·W − X·Ŵ‖ / ‖X·W‖` on the held-out validation images, for each converted layer (with
# `sequential=True`, a layer's inputs come from the model with the earlier layers already
# converted).

# %%
fig, axes = plt.subplots(1, len(PATTERNS), figsize=(3.2 * len(PATTERNS), 3.2), sharey=True,
                         squeeze=False)
for ax, pattern in zip(axes[0], PATTERNS, strict=True):
    layers = conversions[pattern].layers
    names = [r.path.split("/")[0] for r in layers]
    pos = np.arange(len(layers))
    ax.bar(pos - 0.2, [r.error_magnitude for r in layers], 0.4, label="magnitude")
    ax.bar(pos + 0.2, [r.error_adaprune for r in layers], 0.4, label="AdaPrune")
    ax.set_xticks(pos, names, fontsize=8)
    ax.set_title(pattern)
axes[0][0].set_ylabel("relative output error (held out)")
axes[0][0].legend(fontsize=8)
plt.tight_layout()
plt.show()
print(conversions[PATTERNS[0]].report())

# %% [markdown]
# ## 3. How much calibration data AdaPrune needs (2:4)

# %%
sweep = []
rule = MaskRule("2:4", exclude=EXCLUDE)
with progress(len(SWEEP), "calibration sizes") as bar:
    for size in SWEEP:
        conv = adaprune((model, params), data.train.x[:size], rule, held_out=held,
                        progress=False)
        acc = bench.evaluate(model, conv.params, test_x, test_y)["accuracy"]
        sweep.append((size, acc, [r.error_adaprune for r in conv.layers],
                      [r.solver for r in conv.layers]))
        bar.console.print(f"{size:5d} calibration images: test accuracy {acc:.4f}, held-out "
                          "errors " + " / ".join(f"{e:.4f}" for e in sweep[-1][2]))
        bar.step()

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.semilogx([s for s, *_ in sweep], [100 * a for _, a, *_ in sweep], "o-",
            label="AdaPrune 2:4", base=2)
ax.axhline(100 * dense["accuracy"], color="k", lw=1, label="dense")
ax.axhline(100 * results["2:4"]["magnitude"]["accuracy"], color="C3", lw=1, ls=":",
           label="magnitude 2:4")
ax.set_xlabel("calibration images")
ax.set_ylabel("test accuracy (%)")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Conclusion (from this run's numbers)

# %%
d = dense["accuracy"]
lines = [f"Dense test accuracy {100 * d:.2f}% ({data.name}, {len(test_y)} test images).", ""]
lines.append("| pattern | magnitude | AdaPrune | AdaPrune − dense | AdaPrune + fine-tune |")
lines.append("|---|---:|---:|---:|---:|")
for p in PATTERNS:
    r = results[p]
    lines.append(f"| {p} | {100 * r['magnitude']['accuracy']:.2f}% | "
                 f"{100 * r['AdaPrune']['accuracy']:.2f}% | "
                 f"{100 * (r['AdaPrune']['accuracy'] - d):+.2f} pp | "
                 f"{100 * r['AdaPrune + fine-tune']['accuracy']:.2f}% |")
gaps = [100 * (results[p]["AdaPrune"]["accuracy"] - d) for p in PATTERNS]
gains = [100 * (results[p]["AdaPrune"]["accuracy"] - results[p]["magnitude"]["accuracy"])
         for p in PATTERNS]
lines += ["",
          f"* Without any retraining, AdaPrune lands between {min(gaps):+.2f} and "
          f"{max(gaps):+.2f} percentage points of the dense model, recovering "
          f"{min(gains):.1f}–{max(gains):.1f} points over magnitude pruning "
          f"({'within' if min(gaps) > -1 else 'not within'} 1 point of dense everywhere).",
          f"* After {STEPS} fine-tune steps AdaPrune models reach "
          f"{100 * min(results[p]['AdaPrune + fine-tune']['accuracy'] for p in PATTERNS):.2f}"
          f"–{100 * max(results[p]['AdaPrune + fine-tune']['accuracy'] for p in PATTERNS):.2f}%"
          f"; the dense model given the same steps reaches {100 * dense_tuned['accuracy']:.2f}% "
          "(it was trained only briefly, so the extra steps help it too)."]
small = min(sweep, key=lambda s: s[0])
best = max(a for _, a, *_ in sweep)
enough = next((s for s, a, *_ in sweep if a >= best - 0.005), None)
lines.append(f"* Calibration: with {small[0]} images AdaPrune reaches {100 * small[1]:.2f}%; "
             f"{enough} images come within 0.5 point of the best of the sweep "
             f"({100 * best:.2f}%).")
display(Markdown("\n".join(lines)))
