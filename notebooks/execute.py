"""Execute a notebook from its jupytext source and write the ``.ipynb`` with its outputs.

The ``.py`` (jupytext "percent" format) is the source; the ``.ipynb`` is built from it, run
top to bottom in a fresh kernel of this Python (nbclient) and saved beside it, so the two
cannot drift. Full settings by default; ``--fast`` sets ``NMJAX_FAST=1``.

  python notebooks/execute.py mask_diversity              # full settings, writes the .ipynb
  python notebooks/execute.py --fast --out /tmp/x.ipynb transposable_solvers
  python notebooks/execute.py --all --fast --out-dir /tmp/nb
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NOTEBOOKS = ("mask_quality", "mask_diversity", "transposable_solvers", "training_accuracy",
             "adaprune", "kernel_speed", "oneshot")


def source(name: str) -> Path:
    return HERE / f"{name}.py"


def read(name: str):
    """The notebook built from ``notebooks/<name>.py`` (no outputs)."""
    import jupytext

    return jupytext.read(source(name))


def code_cells(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


def machine_paths() -> list[str]:
    """Absolute paths of this machine that must not appear in committed outputs."""
    paths = {str(ROOT), str(Path.home()), sys.prefix, sys.base_prefix}
    return sorted((p for p in paths if len(p) > 1), key=len, reverse=True)


def paths_in_outputs(nb) -> list[str]:
    """Output snippets that show one of :func:`machine_paths`."""
    found = []
    pattern = re.compile("|".join(re.escape(p) for p in machine_paths()))
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            texts = [out.get("text", "")] + [v for k, v in out.get("data", {}).items()
                                              if k.startswith("text/") and isinstance(v, str)]
            texts += [out.get("evalue", "")] + list(out.get("traceback", []))
            for text in texts:
                match = pattern.search(text if isinstance(text, str) else "".join(text))
                if match:
                    found.append(text[max(0, match.start() - 60):match.end() + 60])
    return found


def execute(name: str, out: Path | None = None, *, fast: bool = False,
            timeout: int | None = None, kernel_name: str = "python3", log_cells: bool = False):
    """Runs notebook ``name`` and writes it to ``out`` (default ``notebooks/<name>.ipynb``).

    Raises:
      nbclient.exceptions.CellExecutionError: a cell raised (the notebook is still written,
        with the error in its outputs, to ``out``).
      ValueError: an output shows an absolute path of this machine.
    """
    import nbformat
    from nbclient import NotebookClient

    nb = read(name)
    out = Path(out) if out is not None else HERE / f"{name}.ipynb"
    previous = os.environ.get("NMJAX_FAST")
    os.environ["NMJAX_FAST"] = "1" if fast else "0"
    try:
        t0 = time.perf_counter()

        def log(cell, cell_index, **_):
            if log_cells and cell.cell_type == "code":
                print(f"  {name}: cell {cell_index} done at {time.perf_counter() - t0:.0f} s",
                      flush=True)

        client = NotebookClient(nb, kernel_name=kernel_name, timeout=timeout,
                                resources={"metadata": {"path": str(HERE)}},
                                on_cell_executed=log)
        try:
            client.execute()
        finally:
            nbformat.write(nb, out)
    finally:
        if previous is None:
            os.environ.pop("NMJAX_FAST", None)
        else:
            os.environ["NMJAX_FAST"] = previous
    leaks = paths_in_outputs(nb)
    if leaks:
        raise ValueError(f"{name}: outputs show machine paths: {leaks[:3]}")
    return nb


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"notebooks among {', '.join(NOTEBOOKS)}")
    ap.add_argument("--all", action="store_true", help="every notebook, one after another")
    ap.add_argument("--fast", action="store_true", help="NMJAX_FAST=1 (small settings)")
    ap.add_argument("--out", help="output .ipynb (one notebook)")
    ap.add_argument("--out-dir", help="directory for the .ipynb files")
    args = ap.parse_args(argv)
    names = list(NOTEBOOKS) if args.all else args.names
    if not names:
        ap.error("name a notebook or pass --all")
    for name in names:
        out = (Path(args.out) if args.out else
               Path(args.out_dir) / f"{name}.ipynb" if args.out_dir else None)
        t0 = time.perf_counter()
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"{name}: running ({'fast' if args.fast else 'full'} settings, load average "
              f"{load})", flush=True)
        execute(name, out, fast=args.fast, log_cells=True)
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"{name}: done in {time.perf_counter() - t0:.0f} s (load average now {load})",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
