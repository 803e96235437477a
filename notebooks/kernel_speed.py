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
# # Kernel and training-step speed: what has been measured
#
# This notebook measures nothing itself. It reads the measurement files the benchmarks wrote,
# `benchmarks/results/kernels.md` (sparse GEMM and `nm_dense` on a GPU) and
# `benchmarks/results/train.md` (training steps on the CPU), parses their tables, and plots
# **only the numbers in them**, with the device, date and command each file states. Where a
# file says a kernel or backend has not been measured, the notebook says so instead of
# plotting anything. Rerun it after the benchmarks refresh those files.

# %%
import re
import sys
from pathlib import Path

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "nmjax").is_dir())
sys.path[:0] = [str(ROOT), str(ROOT / "notebooks")]

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from IPython.display import Markdown, display  # noqa: E402
from nbutil import machine  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
print(machine())


def sections(path: Path) -> list[dict]:
    """The file's markdown tables, each with the headings above it and its rows as dicts
    (cells as strings), plus the text of every section (for "not measured" notes)."""
    lines = path.read_text().splitlines()
    out, heads, i = [], [], 0
    while i < len(lines):
        line = lines[i]
        match = re.match(r"^(#+)\s+(.*)", line)
        if match:
            level = len(match.group(1))
            heads = [h for h in heads if h[0] < level] + [(level, match.group(2).strip())]
        if line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$",
                                                                      lines[i + 1].strip()):
            header = [c.strip() for c in line.strip().strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                rows.append(dict(zip(header, cells, strict=False)))
                i += 1
            out.append(dict(headings=[h for _, h in heads], header=header, rows=rows))
            continue
        i += 1
    return out


def number(cell: str) -> float | None:
    """The first number in a cell (``"0.85x"`` -> 0.85, ``"1.7e-03"``), else None."""
    match = re.search(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", cell or "")
    return float(match.group(0)) if match else None


def column(table: dict, *words: str) -> str | None:
    """The first header containing every word (case-insensitive)."""
    for name in table["header"]:
        if all(w.lower() in name.lower() for w in words):
            return name
    return None


def provenance(text: str) -> str:
    """The file's own preamble (between its title and its first section or table): where,
    when and how it was measured, in its words."""
    lines = []
    for line in text.splitlines()[1:]:
        if line.startswith(("#", "|")):
            break
        lines.append(line)
    return "\n".join(lines).strip() or "(the file states no date, device or command)"


def kernel_name(table: dict) -> str:
    """``"v1 (default)"`` from the section heading ``"v1 (default): one warpgroup, ..."``."""
    return table["headings"][1].split(":")[0] if len(table["headings"]) > 1 else "kernels.md"


# %% [markdown]
# ## Sparse GEMM and `nm_dense` on the GPU (`kernels.md`)

# %%
kernels_path = RESULTS / "kernels.md"
kernels_text = kernels_path.read_text() if kernels_path.exists() else ""
kernel_tables = sections(kernels_path) if kernels_path.exists() else []
print(provenance(kernels_text) if kernels_text else "benchmarks/results/kernels.md is missing")
unmeasured = [m.group(1).strip() for m in re.finditer(r"^#+\s+(.*not (?:yet )?measured.*)$",
                                                      kernels_text, re.M | re.I)]
for heading in unmeasured:
    print(f"NOT MEASURED (no numbers in the file): {heading}")

# %%
gemm = [t for t in kernel_tables if column(t, "sparse/dense") and column(t, "TFLOP")]
layer = [t for t in kernel_tables if column(t, "dense/pallas") or column(t, "pallas ms")]
plotted = []
if gemm or layer:
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    if gemm:
        table = gemm[0]
        shapes = [f"{r['M']}×{r['N']}×{r['K']}" for r in table["rows"]]
        dense = [number(r[column(table, "dense", "TFLOP")]) for r in table["rows"]]
        sparse = [number(r[column(table, "sparse kernel", "TFLOP")]) for r in table["rows"]]
        x = np.arange(len(shapes))
        axes[0].bar(x - 0.2, dense, 0.4, label="dense XLA bf16")
        axes[0].bar(x + 0.2, sparse, 0.4, label="nmjax 2:4 sparse kernel")
        axes[0].set(xticks=x, ylabel="TFLOP/s (dense-equivalent 2·M·N·K)",
                    title=f"2:4 sparse GEMM M×N×K vs dense ({kernel_name(table)})")
        axes[0].set_xticklabels(shapes, rotation=30, ha="right", fontsize=8)
        axes[0].legend(fontsize=8)
        plotted.append(("GEMM", shapes, [s / d for s, d in zip(sparse, dense, strict=True)]))
    if layer:
        table = layer[0]
        shapes = [f"{r['rows']}×{r['in']}→{r['out']}" for r in table["rows"]]
        ratio = [number(r[column(table, "dense/pallas")]) for r in table["rows"]]
        axes[1].bar(range(len(shapes)), ratio, color="tab:purple")
        axes[1].axhline(1.0, color="k", ls="--", lw=1, label="dense speed (1.0×)")
        axes[1].set(xticks=range(len(shapes)), ylabel="speed-up over dense (dense ms / sparse ms)",
                    title="nm_dense forward + backward (bf16)")
        axes[1].set_xticklabels(shapes, rotation=30, ha="right", fontsize=8)
        axes[1].legend(fontsize=8)
        plotted.append(("nm_dense fwd+bwd", shapes, ratio))
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    device = re.search(r"Device:\s*([^,(]+)", kernels_text)
    date = re.search(r"Date:\s*([0-9-]+)", kernels_text)
    fig.suptitle(f"measured on {device.group(1).strip() if device else 'a GPU'}"
                 f"{', ' + date.group(1) if date else ''} (GPU figures, from kernels.md)")
    fig.tight_layout()
    plt.show()
else:
    print("kernels.md holds no GEMM or nm_dense table: nothing measured to plot")

# %% [markdown]
# ## Training-step time (`train.md`)
#
# CPU figures: on a CPU every sparse product runs nmjax's reference backend (masked dense
# products), so a sparse step can only cost more than a dense one; they measure the overhead
# of the mask computation, not a sparse speed-up.

# %%
train_path = RESULTS / "train.md"
train_text = train_path.read_text() if train_path.exists() else ""
print(provenance(train_text) if train_text else "benchmarks/results/train.md is missing")
step_tables = []
for table in (sections(train_path) if train_path.exists() else []):
    col = column(table, "median", "ms") or column(table, "ms/step") or column(table, "ms")
    if col:
        step_tables.append((table, col))
step_plotted = []
if step_tables:
    fig, axes = plt.subplots(1, len(step_tables), figsize=(7 * len(step_tables), 4.5),
                             squeeze=False)
    for ax, (table, col) in zip(axes[0], step_tables, strict=True):
        first = table["header"][0]
        labels = [r[first] for r in table["rows"]]
        ms = [number(r[col]) for r in table["rows"]]
        dense = next((v for lab, v in zip(labels, ms, strict=True)
                      if lab.lower().startswith("dense")), None)
        ax.barh(range(len(labels)), ms, color="tab:gray")
        ax.set(yticks=range(len(labels)), xlabel=f"{col} per training step (CPU)",
               title=" / ".join(table["headings"][-1:]) or "train.md")
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
        if dense:
            for k, v in enumerate(ms):
                ax.text(v, k, f" {v / dense:.2f}× dense", va="center", fontsize=8)
        ax.grid(alpha=0.3, axis="x")
        step_plotted.append((labels, ms, dense))
    fig.suptitle("training-step wall time on the shared 2-core CPU (not a GPU figure)")
    fig.tight_layout()
    plt.show()
else:
    print("train.md holds no step-time table: nothing measured to plot")

# %% [markdown]
# ## What exists and what does not (generated from the files)

# %%
lines = []
for name, shapes, ratios in plotted:
    lines.append(f"- **{name}** (GPU, `kernels.md`): {len(shapes)} shapes measured; sparse "
                 f"over dense {min(ratios):.2f}–{max(ratios):.2f}× — "
                 + ("faster than dense somewhere." if max(ratios) > 1 else
                    "**slower than dense at every measured shape**."))
if not plotted:
    lines.append("- **GPU kernels**: no measured table in `kernels.md`.")
for heading in unmeasured:
    lines.append(f"- **Not measured yet**: {heading} — the file holds no numbers for it, so "
                 "nothing is plotted.")
for labels, ms, dense in step_plotted:
    worst = max(zip(ms, labels, strict=True))
    lines.append(f"- **Training steps** (CPU, `train.md`): {len(labels)} variants, "
                 f"{min(ms):.3g}–{max(ms):.3g} ms per step"
                 + (f"; the slowest, {worst[1]}, at {worst[0] / dense:.2f}× dense" if dense
                    else "") + ". CPU figures: they are not GPU speed.")
if not step_plotted:
    lines.append("- **Training steps**: no step-time table in `train.md`.")
if not re.search(r"^(Device|Machine)[^:]*:.*(GPU|H100|H200|A100)", train_text, re.M):
    lines.append("- **Training steps on a GPU**: none measured (`train.md` is a CPU "
                 "measurement), so there is nothing to plot.")
display(Markdown("\n".join(line for line in lines if line)))
