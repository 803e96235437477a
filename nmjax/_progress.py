"""The progress bars of nmjax's long host-driven work (conversions, LP mask solves): one rich
bar per item, on ``file`` (stderr by default), fed by a callback."""

from __future__ import annotations

import contextlib
import sys
from typing import Any, TextIO


class Bars:
    """A rich progress display (nothing when ``enabled`` is false).

    >>> import io
    >>> with Bars(True, file=io.StringIO()) as bars:
    ...     with bars.item("layer 1", total=4) as update:
    ...         update(4)
    ...     bars.done("layer 1: ok")
    """

    def __init__(self, enabled: bool, file: TextIO | None = None):
        self.enabled = enabled
        self.file = file
        self.progress: Any = None
        self.task: Any = None

    def __enter__(self) -> Bars:
        if self.enabled:
            from rich import progress as rp
            from rich.console import Console

            self.progress = rp.Progress(
                rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(),
                rp.TimeElapsedColumn(),
                console=Console(file=self.file if self.file is not None else sys.stderr))
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    @contextlib.contextmanager
    def item(self, label: str, total: int):
        """A bar for one item; yields ``update(done, total=None)``, or ``None`` without a
        display (so a solver can skip its progress callbacks)."""
        if self.progress is None:
            yield None
            return
        self.task = task = self.progress.add_task(label, total=total)

        def update(done: int, total: int | None = None) -> None:
            self.progress.update(task, completed=done,
                                 **({} if total is None else {"total": total}))

        yield update

    def print(self, text: str) -> None:
        """A line under the bars (nothing without a display)."""
        if self.progress is not None:
            self.progress.console.print(text)

    def done(self, description: str) -> None:
        """Marks the last item's bar complete, with a final description."""
        if self.progress is not None and self.task is not None:
            total = self.progress.tasks[-1].total
            self.progress.update(self.task, completed=total, description=description)


__all__ = ["Bars"]
