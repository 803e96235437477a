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
# # Training accuracy: dense vs N:M vs transposable vs Bi-Mask
#
# Two models, each trained dense and with three N:M structures at 2:4 and 4:8, over several
# seeds:
#
# * **vision**: the small Linen CNN of `examples/train.py` on Fashion-MNIST (test accuracy
#   on the 10,000 test images);
# * **language**: the byte-level decoder-only Transformer of `examples/lm.py` on the Python
#   documentation sources (validation loss in nats and bits per byte, on held-out documents).
#
# | variant | forward product | input-gradient product |
# |---|---|---|
# | N:M (SR-STE) | N:M along `in` | same mask (not N:M along `out`: stays dense on hardware) |
# | transposable | N:M along `in` and `out` (one mask) | N:M (the same mask) |
# | Bi-Mask | N:M along `in` | a subset of the forward mask, N:M along a permuted `out` |
#
# Every sparse model is trained through `nmjax.optim.sparse` (masks recomputed from the
# weights after every step, SR-STE decay λ = 2e-4, Bi-Mask permutation search every 100 steps)
# with `mode="static"` sparse layers; the classifier / language-model heads stay dense. All
# variants of one seed start from the same initial weights and see the same batches. Error
# bars are the sample standard deviation over seeds.
#
# The targets: transposable 2:4 and Bi-Mask 2:4 within 1 percentage point of dense
# test accuracy on Fashion-MNIST; Bi-Mask at least as accurate as transposable; the language
# model's validation loss for each sparse method within 5% of dense. They are checked at the
# end, from this run's numbers.

# %%
import dataclasses
import math
import sys
import time
from pathlib import Path

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "nmjax").is_dir())
sys.path[:0] = [str(ROOT), str(ROOT / "examples"), str(ROOT / "notebooks")]

import lm  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from IPython.display import Markdown, display  # noqa: E402
from nbutil import FAST, machine, mean_sd, progress  # noqa: E402
from train import Config, train  # noqa: E402

import nmjax  # noqa: E402

print(machine())

# %% [markdown]
# ## Settings
#
# Full settings: the CNN (width 8) for 800 steps of batch 128 (about 1.9 epochs), 3 seeds;
# the language model (2 blocks, d_model 128, 4 heads, 64-byte context, 0.47 M parameters) for
# 1,000 steps of batch 32 (about 2 M bytes seen), 2 seeds (what the shared 2-core CPU
# affords). An earlier full run with d_model 64 (0.14 M parameters), trained the same way,
# lost 8.5–12.6% of validation loss to every sparse variant.
# `NMJAX_FAST=1`: a few steps, 2:4 only, one seed (a smoke run, not a result).

# %%
KINDS = {"N:M (SR-STE)": "nm", "transposable": "transposable", "Bi-Mask": "bimask"}
if FAST:
    NMS, SEEDS, LM_SEEDS = ["2:4"], [0], [0]
    vision_cfg = Config(steps=10, batch=32, width=8, eval_every=10, train_limit=2000)
    lm_cfg = lm.LMConfig(steps=10, batch=8, context=32, d_model=32, layers=1, warmup=3,
                         eval_every=10, eval_windows=32, train_limit=200_000)
    VAL, TEST = 500, 1000
else:
    NMS, SEEDS, LM_SEEDS = ["2:4", "4:8"], [0, 1, 2], [0, 1]
    vision_cfg = Config(steps=800, batch=128, width=8, eval_every=200)
    lm_cfg = lm.LMConfig(steps=1000, batch=32, context=64, d_model=128, heads=4, layers=2,
                         eval_every=250, eval_windows=512)
    VAL, TEST = 2000, None
VARIANTS = [("dense", "dense")] + [(f"{nm} {name}", f"{nm} {kind}")
                                   for nm in NMS for name, kind in KINDS.items()]
print("variants:", ", ".join(label for label, _ in VARIANTS))

# %% [markdown]
# ## Vision: the CNN on Fashion-MNIST

# %%
vision = nmjax.datasets.vision()
vision = vision._replace(val=vision.val._replace(x=vision.val.x[:VAL], y=vision.val.y[:VAL]))
if TEST:
    vision = vision._replace(test=vision.test._replace(x=vision.test.x[:TEST],
                                                       y=vision.test.y[:TEST]))
print(f"{vision.name}: {len(vision.train.y)} train, {len(vision.val.y)} validation, "
      f"{len(vision.test.y)} test images; {vision_cfg.steps} steps of batch "
      f"{vision_cfg.batch}, seeds {SEEDS}")

vis = {}
t0 = time.perf_counter()
with progress(len(VARIANTS) * len(SEEDS), "vision runs") as bar:
    for seed in SEEDS:
        for label, pattern in VARIANTS:
            r = train(dataclasses.replace(vision_cfg, pattern=pattern, seed=seed), vision,
                      progress=False)
            vis[label, seed] = r
            bar.console.print(f"seed {seed} {label:>22}: test accuracy {r['test_acc']:.4f}, "
                              f"masks valid {r.get('masks_valid', '—')}, "
                              f"{r['step_ms']:.0f} ms/step")
            bar.step()
vision_minutes = (time.perf_counter() - t0) / 60
print(f"{len(vis)} vision models in {vision_minutes:.1f} min")

# %%
def vision_row(label):
    accs = [vis[label, s]["test_acc"] for s in SEEDS]
    deltas = [vis[label, s]["test_acc"] - vis["dense", s]["test_acc"] for s in SEEDS]
    valid = all(vis[label, s].get("masks_valid", True) for s in SEEDS)
    step_ms = np.median([vis[label, s]["step_ms"] for s in SEEDS])
    return dict(label=label, acc=mean_sd(accs), delta=mean_sd(deltas), valid=valid,
                step_ms=step_ms)


vision_rows = {label: vision_row(label) for label, _ in VARIANTS}
print(f"{'variant':>24}{'test accuracy (mean ± sd)':>28}{'Δ vs dense (paired)':>24}"
      f"{'masks valid':>13}{'ms/step':>9}")
for row in vision_rows.values():
    (a, sa), (d, sd) = row["acc"], row["delta"]
    print(f"{row['label']:>24}{100 * a:20.2f} ± {100 * sa:4.2f} %{100 * d:+15.2f} ± "
          f"{100 * sd:4.2f} pt{str(row['valid']):>13}{row['step_ms']:9.0f}")
print(f"\n{len(SEEDS)} seed(s); ms/step is the median wall time of one jitted step on this "
      "CPU (masked dense products: no sparse speed-up on a CPU)")

# %%
colors = {label: c for (label, _), c in zip(VARIANTS, plt.cm.tab10.colors, strict=False)}
fig, (ax_bar, ax_curve) = plt.subplots(1, 2, figsize=(13, 4.5))
labels = list(vision_rows)
means = [100 * vision_rows[k]["acc"][0] for k in labels]
sds = [100 * vision_rows[k]["acc"][1] for k in labels]
ax_bar.bar(range(len(labels)), means, yerr=sds, capsize=4,
           color=[colors[k] for k in labels])
ax_bar.axhspan(means[0] - 1, means[0], color="grey", alpha=0.15,
               label="within 1 pt of dense (target band)")
ax_bar.set(xticks=range(len(labels)), ylabel="test accuracy (%)",
           ylim=(min(m - s for m, s in zip(means, sds, strict=True)) - 1.5,
                 max(m + s for m, s in zip(means, sds, strict=True)) + 0.8),
           title=f"{vision.name} CNN: test accuracy, mean ± sd over {len(SEEDS)} seed(s)")
ax_bar.set_xticklabels(labels, rotation=30, ha="right")
ax_bar.legend(fontsize=8)
for label in labels:
    steps = [e[0] for e in vis[label, SEEDS[0]]["evals"]]
    accs = np.array([[100 * e[2] for e in vis[label, s]["evals"]] for s in SEEDS])
    ax_curve.plot(steps, accs.mean(0), marker="o", color=colors[label], label=label)
    if len(SEEDS) > 1:
        ax_curve.fill_between(steps, accs.mean(0) - accs.std(0, ddof=1),
                              accs.mean(0) + accs.std(0, ddof=1), color=colors[label],
                              alpha=0.15)
ax_curve.set(xlabel="training step", ylabel="validation accuracy (%)",
             title=f"validation accuracy ({len(vision.val.y)} held-out images), mean ± sd")
ax_curve.legend(fontsize=8)
for ax in (ax_bar, ax_curve):
    ax.grid(alpha=0.3)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Language model: a byte-level Transformer on the Python docs

# %%
text = nmjax.datasets.text()
print(f"{text.name}: {len(text.train):,} training bytes, {len(text.val):,} validation "
      f"bytes, {len(text.test):,} test bytes (split by document); {lm_cfg.steps} steps of "
      f"{lm_cfg.batch} x {lm_cfg.context} bytes, seeds {LM_SEEDS}")

lms = {}
t0 = time.perf_counter()
with progress(len(VARIANTS) * len(LM_SEEDS), "language-model runs") as bar:
    for seed in LM_SEEDS:
        for label, pattern in VARIANTS:
            r = lm.train(dataclasses.replace(lm_cfg, pattern=pattern, seed=seed), text,
                         progress=False)
            lms[label, seed] = r
            bar.console.print(f"seed {seed} {label:>22}: validation {r['val_loss']:.4f} nats "
                              f"({r['val_bpb']:.3f} bits/byte), masks valid "
                              f"{r.get('masks_valid', '—')}, {r['step_ms']:.0f} ms/step")
            bar.step()
lm_minutes = (time.perf_counter() - t0) / 60
print(f"{len(lms)} language models ({lms['dense', LM_SEEDS[0]]['n_params']:,} parameters "
      f"each) in {lm_minutes:.1f} min")


# %%
def lm_row(label):
    vals = [lms[label, s]["val_loss"] for s in LM_SEEDS]
    rel = [lms[label, s]["val_loss"] / lms["dense", s]["val_loss"] - 1 for s in LM_SEEDS]
    tests = [lms[label, s]["test_bpb"] for s in LM_SEEDS]
    valid = all(lms[label, s].get("masks_valid", True) for s in LM_SEEDS)
    return dict(label=label, val=mean_sd(vals), rel=mean_sd(rel), test_bpb=mean_sd(tests),
                valid=valid, step_ms=np.median([lms[label, s]["step_ms"] for s in LM_SEEDS]))


lm_rows = {label: lm_row(label) for label, _ in VARIANTS}
print(f"{'variant':>24}{'val loss, nats':>20}{'val bits/byte':>15}{'vs dense (paired)':>21}"
      f"{'test bits/byte':>16}{'masks valid':>13}{'ms/step':>9}")
for row in lm_rows.values():
    (v, sv), (r, sr), (tb, _) = row["val"], row["rel"], row["test_bpb"]
    print(f"{row['label']:>24}{v:13.4f} ± {sv:.4f}{v / math.log(2):15.3f}"
          f"{100 * r:+14.2f} ± {100 * sr:4.2f} %{tb:16.3f}{str(row['valid']):>13}"
          f"{row['step_ms']:9.0f}")

# %%
fig, (ax_bar, ax_curve) = plt.subplots(1, 2, figsize=(13, 4.5))
means = [lm_rows[k]["val"][0] for k in labels]
sds = [lm_rows[k]["val"][1] for k in labels]
ax_bar.bar(range(len(labels)), means, yerr=sds, capsize=4, color=[colors[k] for k in labels])
ax_bar.axhspan(means[0], 1.05 * means[0], color="grey", alpha=0.15,
               label="within 5% of dense (target band)")
ax_bar.set(xticks=range(len(labels)), ylabel="validation loss (nats per byte)",
           ylim=(0.97 * min(means), 1.03 * max(max(means), 1.05 * means[0])),
           title=f"byte-level Transformer: validation loss, mean ± sd over {len(LM_SEEDS)} "
                 "seed(s)")
ax_bar.set_xticklabels(labels, rotation=30, ha="right")
ax_bar.legend(fontsize=8)
for label in labels:
    steps = [e[0] for e in lms[label, LM_SEEDS[0]]["evals"]]
    vals = np.array([[e[1] / math.log(2) for e in lms[label, s]["evals"]] for s in LM_SEEDS])
    ax_curve.plot(steps, vals.mean(0), marker="o", color=colors[label], label=label)
ax_curve.set(xlabel="training step", ylabel="validation bits per byte",
             title="validation loss during training (mean over seeds)")
ax_curve.legend(fontsize=8)
for ax in (ax_bar, ax_curve):
    ax.grid(alpha=0.3)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Targets and conclusion (generated from the numbers above)


# %%
def pt(x):
    return f"{100 * x:+.2f} pt"


checks = []
dense_acc = vision_rows["dense"]["acc"][0]
for nm in NMS:
    for name in ("transposable", "Bi-Mask"):
        row = vision_rows[f"{nm} {name}"]
        gap = row["acc"][0] - dense_acc
        if nm == "2:4":
            checks.append((f"{name} {nm} within 1 pt of dense test accuracy (Fashion-MNIST)",
                           gap >= -0.01,
                           f"{100 * row['acc'][0]:.2f}% vs dense {100 * dense_acc:.2f}%: "
                           f"{pt(gap)}"))
    bi, tr = vision_rows[f"{nm} Bi-Mask"]["acc"][0], vision_rows[f"{nm} transposable"]["acc"][0]
    checks.append((f"Bi-Mask {nm} at least as accurate as transposable {nm}", bi >= tr,
                   f"{100 * bi:.2f}% vs {100 * tr:.2f}%: {pt(bi - tr)}"))
dense_val = lm_rows["dense"]["val"][0]
for label, _ in VARIANTS[1:]:
    row = lm_rows[label]
    rel = row["val"][0] / dense_val - 1
    checks.append((f"language model, {label}: validation loss within 5% of dense",
                   rel <= 0.05,
                   f"{row['val'][0]:.4f} vs dense {dense_val:.4f} nats: {100 * rel:+.2f}%"))

lines = ["| target | met | numbers (means over seeds) |", "|---|---|---|"]
lines += [f"| {what} | {'**yes**' if ok else '**NO — missed**'} | {numbers} |"
          for what, ok, numbers in checks]
best_sparse = max((k for k in vision_rows if k != "dense"),
                  key=lambda k: vision_rows[k]["acc"][0])
worst_sparse = min((k for k in vision_rows if k != "dense"),
                   key=lambda k: vision_rows[k]["acc"][0])
spread = max(vision_rows[k]["acc"][1] for k in vision_rows)
text_lines = [
    "", f"**Vision** ({len(SEEDS)} seed(s), {vision_cfg.steps} steps): dense reaches "
    f"{100 * dense_acc:.2f}% test accuracy; the best sparse variant is {best_sparse} "
    f"({pt(vision_rows[best_sparse]['acc'][0] - dense_acc)}), the worst {worst_sparse} "
    f"({pt(vision_rows[worst_sparse]['acc'][0] - dense_acc)}). "
    + (f"The largest seed-to-seed standard deviation of a variant is {100 * spread:.2f} pt, "
       "so gaps smaller than that are not resolved by this many seeds." if len(SEEDS) > 1
       else "One seed: no seed-to-seed spread is measured."),
    "", f"**Language model** ({len(LM_SEEDS)} seed(s), {lm_cfg.steps} steps): dense reaches "
    f"{dense_val:.4f} nats ({dense_val / math.log(2):.3f} bits/byte) on the validation "
    "documents; the sparse variants are "
    + ", ".join(f"{k} {100 * (lm_rows[k]['val'][0] / dense_val - 1):+.2f}%"
                for k in lm_rows if k != "dense") + " relative to it.",
    "", f"Every sparse model's masks were valid at the end of training: "
    f"{all(r['valid'] for r in [*vision_rows.values(), *lm_rows.values()])}. "
    f"{sum(ok for _, ok, _ in checks)} of {len(checks)} targets met."]
if FAST:
    lines.insert(0, "*Fast mode (a smoke run): these numbers are not a result.*\n")
display(Markdown("\n".join(lines + text_lines)))
