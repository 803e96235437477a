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
# # Mask diversity against accuracy (Fashion-MNIST CNN)
#
# Hubara et al. (2021) define the **mask diversity** of a sparsity structure as the number of
# masks it allows on a weight tensor, and argue that at equal density a structure with more
# diversity trains to higher accuracy. This notebook counts the diversity of four structures,
# each at the densities of 1:4, 2:4, 4:8 and 2:8, on the sparse kernels of the small CNN of
# `examples/train.py`, and trains that CNN on Fashion-MNIST with each of them:
#
# | structure | what it constrains | log10 diversity of a tensor of `T` weights |
# |---|---|---|
# | unstructured | `T·N/M` kept anywhere in the kernel (magnitude top-k) | `log10 C(T, T·N/M)` |
# | N:M (SR-STE) | `N` of every `M` along the contraction axis | `(T/M) · log10 C(M, N)` |
# | transposable N:M | `N` per row **and** column of every `M×M` tile | `(T/M²) · log10 K(M, N)` |
# | Bi-Mask N:M | forward: N:M; backward: a subset, N:M along a permuted output axis | as N:M |
#
# **What Bi-Mask's diversity means.** The weights the model computes with are the forward
# mask's, which is a plain N:M mask, so Bi-Mask's weight structure has exactly N:M's
# diversity. Its backward mask is not a free choice: given the forward mask and the output
# permutation it is determined (the best N of M of the forward-kept weights along the
# permuted output axis). So Bi-Mask does not move along the diversity axis; it keeps N:M's
# forward mask and changes only the input gradient, which it prunes further so that the
# input-gradient product is N:M sparse too. We plot it at N:M's diversity.
#
# Every model is trained with `nmjax.optim.sparse` (masks refreshed from the weights at every
# step, SR-STE decay 2e-4) and static-mode sparse layers, from the same initial weights on the
# same batches. The first convolution (one input channel) and the 10-way head stay dense in
# every structure. One seed per point; `training_accuracy.ipynb` measures the seed-to-seed
# spread of the same model.

# %%
import dataclasses
import sys
import time
from pathlib import Path

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "nmjax").is_dir())
sys.path[:0] = [str(ROOT), str(ROOT / "examples"), str(ROOT / "notebooks")]

import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from IPython.display import Markdown, display  # noqa: E402
from nbutil import FAST, machine, progress  # noqa: E402
from train import CNN, Config, rule_for, train  # noqa: E402

import nmjax  # noqa: E402
from nmjax.masks import log10_mask_diversity  # noqa: E402

print(machine())

# %% [markdown]
# ## Settings
#
# Full settings: 600 steps of batch 128 (about 1.4 epochs), a CNN of width 8; validation on
# 2,000 held-out training images, test accuracy on all 10,000 test images. `NMJAX_FAST=1`:
# 12 steps on 2,000 images, 2:4 only, 1,000 test images (a smoke run, not a result).

# %%
if FAST:
    PATTERNS = [(2, 4)]
    cfg = Config(steps=12, batch=32, width=8, eval_every=12, train_limit=2000)
    VAL, TEST = 500, 1000
else:
    PATTERNS = [(1, 4), (2, 4), (4, 8), (2, 8)]
    cfg = Config(steps=600, batch=128, width=8, eval_every=200)
    VAL, TEST = 2000, None
STRUCTURES = {"unstructured": "unstructured", "N:M (SR-STE)": "nm",
              "transposable": "transposable", "Bi-Mask": "bimask"}

data = nmjax.datasets.vision()
data = data._replace(val=data.val._replace(x=data.val.x[:VAL], y=data.val.y[:VAL]))
if TEST:
    data = data._replace(test=data.test._replace(x=data.test.x[:TEST], y=data.test.y[:TEST]))
print(f"{data.name}: {len(data.train.y)} train, {len(data.val.y)} validation, "
      f"{len(data.test.y)} test images; {cfg.steps} steps of batch {cfg.batch}, width "
      f"{cfg.width}")

# %% [markdown]
# ## Diversity of each structure on this CNN's sparse kernels
#
# The count is over every kernel the rule makes sparse (the second convolution, `3×3×8×16`
# HWIO, grouped along `I`, tiles over `(I, O)`; the hidden Dense layer, `784×256`); the
# logarithms of the layers add up.

# %%
params = CNN(cfg.width).init(jax.random.key(0), data.train.x[:1])["params"]


def pattern_string(n, m, kind):
    return f"{n}:{m} {kind}"


def diversity(n, m, kind):
    """log10 of the number of masks the structure allows on this CNN's sparse kernels."""
    rule = rule_for(pattern_string(n, m, "nm"))  # the same kernels for every structure
    total = 0.0
    for planned in nmjax.plan.plan_for_params(params, rule).leaves:
        shape, axis = planned.shape, planned.layout.contract[-1]
        if kind == "transposable":
            total += log10_mask_diversity("transposable", shape, n, m,
                                          axes=(axis, len(shape) - 1))
        elif kind in ("nm", "bimask"):
            total += log10_mask_diversity("nm", shape, n, m, axis=axis)
        else:
            total += log10_mask_diversity("unstructured", shape, n, m)
    return total


div = {(n, m, kind): diversity(n, m, kind) for n, m in PATTERNS for kind in STRUCTURES.values()}
print(f"{'N:M':>5} " + "".join(f"{name:>16}" for name in STRUCTURES))
for n, m in PATTERNS:
    print(f"{n}:{m:<3} " + "".join(f"{div[n, m, k]:16,.0f}" for k in STRUCTURES.values()))

# %% [markdown]
# ## Training
#
# One dense model, then each structure at each N:M. Unstructured masks have no groups, so
# "2:4 unstructured" and "4:8 unstructured" (like 1:4 and 2:8) are one structure at one
# density: it is trained once per density and shown under both names.

# %%
def density(pattern):
    n, m = map(int, pattern.split()[0].split(":"))
    return n / m


runs = ["dense"] + [pattern_string(n, m, kind) for n, m in PATTERNS
                    for kind in STRUCTURES.values()]
results = {}
t0 = time.perf_counter()
with progress(len(runs), "training") as bar:
    for pattern in runs:
        twin = next((p for p in results if pattern.endswith("unstructured")
                     and p.endswith("unstructured") and density(p) == density(pattern)), None)
        if twin:
            results[pattern] = results[twin]
            bar.console.print(f"{pattern:>20}: the same structure as {twin}, not retrained")
            bar.step()
            continue
        r = train(dataclasses.replace(cfg, pattern=pattern), data, progress=False)
        results[pattern] = r
        bar.console.print(f"{pattern:>20}: test accuracy {r['test_acc']:.4f}, final loss "
                          f"{r['final_loss']:.3f}, masks valid {r.get('masks_valid', '—')}, "
                          f"{r['step_ms']:.0f} ms/step")
        bar.step()
elapsed = time.perf_counter() - t0
print(f"{len({id(r) for r in results.values()})} models trained in {elapsed / 60:.1f} min")

# %% [markdown]
# ## Results

# %%
dense_acc = results["dense"]["test_acc"]
rows = []
for n, m in PATTERNS:
    for name, kind in STRUCTURES.items():
        r = results[pattern_string(n, m, kind)]
        rows.append(dict(nm=f"{n}:{m}", n=n, m=m, structure=name, kind=kind,
                         density=n / m, diversity=div[n, m, kind], acc=r["test_acc"],
                         delta=100 * (r["test_acc"] - dense_acc), valid=r["masks_valid"]))
print(f"dense: test accuracy {dense_acc:.4f}\n")
print(f"{'N:M':5}{'structure':>15}{'density':>9}{'log10 diversity':>17}{'test acc':>10}"
      f"{'Δ vs dense':>12}{'masks valid':>13}")
for row in rows:
    print(f"{row['nm']:5}{row['structure']:>15}{row['density']:9.3f}{row['diversity']:17,.0f}"
          f"{row['acc']:10.4f}{row['delta']:+10.2f} pt{str(row['valid']):>13}")

# %%
markers = {"unstructured": "o", "nm": "s", "transposable": "^", "bimask": "x"}
colors = dict(zip([f"{n}:{m}" for n, m in PATTERNS], plt.cm.tab10.colors, strict=False))
fig, (ax_div, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
names = list(STRUCTURES)
width = 0.8 / len(PATTERNS)
for i, (n, m) in enumerate(PATTERNS):
    values = [div[n, m, k] for k in STRUCTURES.values()]
    ax_div.bar(np.arange(len(names)) + (i - (len(PATTERNS) - 1) / 2) * width, values, width,
               label=f"{n}:{m} (density {n / m:.3g})", color=colors[f"{n}:{m}"])
ax_div.set(xticks=np.arange(len(names)), xticklabels=names,
           ylabel="log10(number of allowed masks)",
           title="mask diversity on the CNN's sparse kernels")
ax_div.legend(fontsize=8)
for row in rows:
    ax_acc.scatter(row["diversity"], 100 * row["acc"], marker=markers[row["kind"]], s=60,
                   color=colors[row["nm"]],
                   label=f"{row['nm']} {row['structure']}")
ax_acc.axhline(100 * dense_acc, color="k", ls="--", lw=1, label="dense")
ax_acc.set(xlabel="log10(number of allowed masks)", ylabel="test accuracy (%)",
           title=f"{data.name}: test accuracy after {cfg.steps} steps (one seed)")
ax_acc.legend(fontsize=7, ncol=2)
for ax in (ax_div, ax_acc):
    ax.grid(alpha=0.3)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Conclusion (generated from the numbers above)


# %%
def ranks(values):
    order = np.argsort(np.argsort(values, kind="stable"), kind="stable")
    return order.astype(float)


def spearman(x, y):
    rx, ry = ranks(np.asarray(x)), ranks(np.asarray(y))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


by = {(row["nm"], row["kind"]): row for row in rows}
lines = []
for n, m in PATTERNS:
    key = f"{n}:{m}"
    order = sorted(["unstructured", "nm", "transposable"],
                   key=lambda k: -by[key, k]["diversity"])
    accs = [by[key, k]["acc"] for k in order]
    names_ = {"unstructured": "unstructured", "nm": "N:M", "transposable": "transposable"}
    follows = all(a >= b for a, b in zip(accs, accs[1:], strict=False))
    lines.append(
        f"- **{key}** (density {n / m:.3g}): diversity orders the structures "
        + " > ".join(names_[k] for k in order)
        + "; their test accuracies are "
        + ", ".join(f"{100 * by[key, k]['acc']:.2f}%" for k in order)
        + (" — **the same order**." if follows else " — **not the same order**.")
        + f" Bi-Mask (N:M's forward diversity): {100 * by[key, 'bimask']['acc']:.2f}% "
        f"({100 * (by[key, 'bimask']['acc'] - by[key, 'nm']['acc']):+.2f} pt vs N:M).")
points = [r for r in rows if r["kind"] != "bimask"]
rho_all = spearman([r["diversity"] for r in points], [r["acc"] for r in points])
same_density = []
for (n1, m1), (n2, m2) in [((2, 4), (4, 8)), ((1, 4), (2, 8))]:
    if (n1, m1) in PATTERNS and (n2, m2) in PATTERNS:
        for kind, name in [("nm", "N:M"), ("transposable", "transposable")]:
            a, b = by[f"{n1}:{m1}", kind], by[f"{n2}:{m2}", kind]
            same_density.append(
                f"{name} {n2}:{m2} vs {n1}:{m1} (same density {n1 / m1:.3g}, "
                f"{b['diversity'] - a['diversity']:+,.0f} in log10 diversity): "
                f"{100 * (b['acc'] - a['acc']):+.2f} pt")
text = [f"Dense test accuracy: {100 * dense_acc:.2f}%. Every sparse model's masks were valid: "
        f"{all(r['valid'] for r in rows)}.", "", *lines, ""]
if not np.isnan(rho_all):
    within = []
    for density in sorted({r["density"] for r in points}):
        sel = [r for r in points if r["density"] == density]
        rho = spearman([r["diversity"] for r in sel], [r["acc"] for r in sel])
        if len(sel) > 2 and not np.isnan(rho):
            within.append(f"{rho:+.2f} at density {density:.3g} ({len(sel)} points)")
    text.append(f"Across all {len(points)} (structure, N:M) points (Bi-Mask left out: it "
                f"shares N:M's diversity), the Spearman rank correlation between log10 "
                f"diversity and test accuracy is **{rho_all:+.2f}**"
                + (f"; within one density it is {' and '.join(within)}." if within else "."))
same_unstructured = [f"{a}/{b}" for a, b in [("2:4", "4:8"), ("1:4", "2:8")]
                     if (a, "unstructured") in by and (b, "unstructured") in by
                     and by[a, "unstructured"]["acc"] == by[b, "unstructured"]["acc"]]
if same_unstructured:
    text.append(f"(Unstructured {' and '.join(same_unstructured)} are one structure — the same "
                "density, no groups — trained once each, so their points coincide.)")
if same_density:
    text += ["", "At equal density, a larger M (more diversity): " + "; ".join(same_density)
             + "."]
text += ["", f"One seed per point, {cfg.steps} steps: a difference of a few tenths of a point "
         "is within the seed-to-seed spread (`training_accuracy.ipynb` measures it)."]
if FAST:
    text.insert(0, "*Fast mode (a smoke run): these numbers are not a result.*\n")
display(Markdown("\n".join(text)))
