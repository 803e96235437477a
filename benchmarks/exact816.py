"""Exact transposable 8:16 at 8192 x 8192 on this CPU, under whichever jax is installed.

Run it with two interpreters (two jax versions) back to back to compare them; the figures
for jax 0.10.2 against 0.11.2 are in ``results/jax_versions.md``.

  .venv/bin/python benchmarks/exact816.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nmjax.masks import transposable_mask  # noqa: E402


def main() -> None:
    w = jnp.asarray(np.abs(np.random.default_rng(0).standard_normal((8192, 8192))),
                    jnp.float32)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(transposable_mask(w, 8, 16, method="exact"))
        times.append(time.perf_counter() - start)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"jax {jax.__version__}: first call {times[0]:.1f} s (with compile), then "
          f"{times[1]:.1f} s, {times[2]:.1f} s; load average {load}")


if __name__ == "__main__":
    main()
