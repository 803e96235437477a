"""Small helpers the notebooks share: fast mode, the machine line, a progress bar over runs.

``NMJAX_FAST=1`` selects each notebook's small settings (CI runs every notebook that way);
without it a notebook runs its full settings.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import sys
from collections.abc import Iterator

import numpy as np

FAST = os.environ.get("NMJAX_FAST", "") not in ("", "0")


def load_average() -> str:
    """The 1/5/15-minute load averages, e.g. ``"6.12 5.80 4.95"``."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        return "n/a"


def machine() -> str:
    """What ran the notebook: date, devices, CPU cores, load average, jax version."""
    import jax

    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return (f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; jax {jax.__version__} "
            f"on {len(devices)} {jax.default_backend()} device(s) ({', '.join(kinds)}); "
            f"{os.cpu_count()} CPU cores ({platform.machine()}), load average "
            f"{load_average()}; {'FAST' if FAST else 'full'} settings")


@contextlib.contextmanager
def progress(total: int, description: str) -> Iterator:
    """A rich progress bar over ``total`` runs: live in a terminal; in a notebook, one line
    per finished run (``bar.console.print``) and the final bar (no widgets needed)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    tty = sys.stdout.isatty()  # a notebook's stdout is not: no live redraws, no colours there
    console = Console(file=sys.stdout, force_jupyter=False, force_terminal=tty,
                      force_interactive=tty, color_system="auto" if tty else None,
                      highlight=False, width=110)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=console)
    with bar:
        task = bar.add_task(description, total=total)
        bar.step = lambda: bar.advance(task)  # type: ignore[attr-defined]
        yield bar


def mean_sd(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = np.asarray(values, float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0
