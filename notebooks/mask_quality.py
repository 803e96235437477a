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
# # Mask quality: how much magnitude each N:M structure keeps
#
# A notebook in jupytext "percent" form, paired with `mask_quality.ipynb`: run it as a script
# (`python notebooks/mask_quality.py`) or open either file in Jupyter. On one Gaussian
# `(in, out)` weight it compares the retained `Σ|w|` of N:M, transposable N:M (each method)
# and Bi-Mask, against the exact transposable optimum from the LP, and prints each
# structure's mask diversity.

# %%
import sys
from pathlib import Path

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "nmjax").is_dir())
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import nmjax  # noqa: E402
from nmjax.masks import (  # noqa: E402
    bimask,
    log10_mask_diversity,
    nm_mask,
    transposable_mask,
    transposable_mask_lp,
)

w = jax.random.normal(jax.random.key(0), (256, 512))
scores = jnp.abs(w)


def kept(mask) -> float:
    return float(jnp.sum(jnp.where(mask, scores, 0)))


# %% [markdown]
# ## Retained magnitude, relative to the exact transposable optimum

# %%
rows = []
for n, m in [(2, 4), (4, 8)]:
    optimum = kept(transposable_mask_lp(np.asarray(scores), n, m))
    candidates = {
        "N:M along in (forward only)": nm_mask(scores, n, m),
        "transposable, exact": transposable_mask(scores, n, m),
        "transposable, greedy": transposable_mask(scores, n, m, method="greedy"),
        "transposable, greedy + repair": transposable_mask(scores, n, m, method="greedy",
                                                           repair=True),
        "Bi-Mask backward (swap search)": bimask(w, n, m, search="swap",
                                                 key=jax.random.key(1)).bwd,
    }
    for name, mask in candidates.items():
        rows.append((f"{n}:{m}", name, kept(mask) / optimum))

print(f"{'pattern':8}{'mask':34}{'kept / transposable optimum':>28}")
for pattern, name, ratio in rows:
    print(f"{pattern:8}{name:34}{ratio:28.4f}")

# %% [markdown]
# N:M along one axis keeps more than any transposable mask (it has fewer constraints) but
# only the forward product can use it; the transposable masks serve both products.
#
# ## Mask diversity (log10 of the number of allowed masks)

# %%
for n, m in [(2, 4), (4, 8)]:
    line = ", ".join(f"{kind} {log10_mask_diversity(kind, w.shape, n, m):,.0f}"
                     for kind in ("unstructured", "nm", "transposable"))
    print(f"{n}:{m}: {line}")
print("nmjax", nmjax.__version__)
