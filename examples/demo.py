"""``make demo``: dense vs 2:4 N:M vs 2:4 transposable vs 2:4 Bi-Mask, on real data.

A small Linen CNN on Fashion-MNIST (scikit-learn's digits where Debian's
``dataset-fashion-mnist`` is absent) trained four ways through nmjax's training layer
(:func:`nmjax.optim.sparse` with static-mode sparse layers; SR-STE decay; Bi-Mask permutation
searches), with progress bars; then a comparison table (test accuracy, final training loss,
mask validity, step time against dense, which backend ran the sparse products) and a PNG of
the loss and accuracy curves. The defaults take a few minutes on 2 CPU cores; on a GPU the
products run on the fastest measured backend ("auto").

  python examples/demo.py                 # the defaults
  python examples/demo.py --steps 3000    # longer
  python examples/demo.py --fast          # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train import Config, train  # noqa: E402

import nmjax  # noqa: E402

VARIANTS = (("dense", "dense"), ("2:4 N:M (SR-STE)", "2:4"),
            ("2:4 transposable", "2:4 transposable"), ("2:4 Bi-Mask", "2:4 bimask"))


def _smooth(values, width=25):
    values = np.asarray(values, float)
    if len(values) < width:
        return values
    kernel = np.ones(width) / width
    return np.convolve(values, kernel, mode="valid")


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for label, r in results:
        steps, losses = zip(*r["curve"], strict=True)
        smooth = _smooth(losses)
        ax_loss.plot(np.asarray(steps)[len(steps) - len(smooth):], smooth, label=label)
        e_steps, _, e_acc = zip(*r["evals"], strict=True)
        ax_acc.plot(e_steps, e_acc, marker="o", label=label)
    ax_loss.set(title="training loss (moving average of 25 steps)", xlabel="step",
                ylabel="cross-entropy", yscale="log")
    ax_acc.set(title="validation accuracy", xlabel="step", ylabel="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{results[0][1]['dataset']}: dense vs 2:4-sparse training (nmjax)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results) -> str:
    from rich.console import Console
    from rich.table import Table

    dense = results[0][1]
    t = Table(title=f"{dense['dataset']}, {dense['steps']} steps each")
    for col in ("variant", "test acc", "Δ vs dense", "final loss", "masks valid",
                "step time vs dense", "refreshes / searches", "backend (fwd / dX)"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for label, r in results:
        sparse = "masks_valid" in r
        t.add_row(
            label, f"{r['test_acc']:.4f}", f"{100 * (r['test_acc'] - dense['test_acc']):+.2f} pt",
            f"{r['final_loss']:.4f}", ("yes" if r["masks_valid"] else "NO") if sparse else "—",
            f"{r['step_ms'] / dense['step_ms']:.2f}×",
            f"{r['refreshes']} / {r['searches']}" if sparse else "—",
            " / ".join(r["backends"]) if sparse else "dense XLA")
    console = Console(width=140, record=True)
    console.print(t)
    return console.export_text()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--width", type=int, default=16, help="channels of the first conv")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--out", default="demo.png", help="where to save the plot")
    ap.add_argument("--fast", action="store_true", help="a smoke run (tests)")
    args = ap.parse_args(argv)
    cfg = Config(steps=args.steps, width=args.width, batch=args.batch,
                 eval_every=args.eval_every)
    if args.fast:
        cfg = dataclasses.replace(cfg, steps=20, eval_every=10, width=8, batch=32,
                                  train_limit=2000)
    data = nmjax.datasets.vision()
    print(f"nmjax {nmjax.__version__}: {data.name}, {len(data.train.y)} training images; "
          f"{len(VARIANTS)} models, {cfg.steps} steps each\n", flush=True)
    t0 = time.perf_counter()
    results = [(label, train(dataclasses.replace(cfg, pattern=pattern), data))
               for label, pattern in VARIANTS]
    print()
    table(results)
    print("\n" + results[2][1]["summary"])
    plot(results, Path(args.out))
    print(f"\ncurves saved to {args.out}; {time.perf_counter() - t0:.0f} s in all")
    return 0 if all(r.get("masks_valid", True) for _, r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
