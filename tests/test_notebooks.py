"""The notebooks run and stay in sync with their jupytext sources.

Each ``notebooks/<name>.py`` (jupytext "percent") is converted to a notebook and executed
with nbclient in fast mode (``NMJAX_FAST=1``, small settings), so the notebooks cannot rot.
The committed ``<name>.ipynb`` must hold the same code cells as its ``.py`` (so its outputs
come from that code), carry outputs, and show no machine paths.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "notebooks"))

import execute  # noqa: E402

ABSOLUTE = re.compile(r"(?<![\w.])/(?:home|root|Users|work|tmp|opt|usr/local)/")


@pytest.mark.parametrize("name", execute.NOTEBOOKS)
def test_notebook_runs_in_fast_mode(name, tmp_path):
    nb = execute.execute(name, tmp_path / f"{name}.ipynb", fast=True, timeout=900)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("name", execute.NOTEBOOKS)
def test_committed_notebook_matches_its_source(name):
    path = ROOT / "notebooks" / f"{name}.ipynb"
    assert path.exists(), f"{path.name} is missing: python notebooks/execute.py {name}"
    committed = nbformat.read(path, as_version=4)
    assert execute.code_cells(committed) == execute.code_cells(execute.read(name)), (
        f"{path.name} is out of date with {name}.py: rerun python notebooks/execute.py {name}")
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert any(c.get("outputs") for c in code), f"{path.name} was committed without outputs"
    errors = [o for c in code for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"{path.name} was committed with an error in its outputs"
    for cell in code:
        for out in cell.get("outputs", []):
            text = out.get("text", "") + "".join(
                v for k, v in out.get("data", {}).items() if k.startswith("text/"))
            assert not ABSOLUTE.search(text), f"{path.name} shows a machine path: {text[:200]}"


def test_committed_notebooks_ran_full_settings():
    for name in execute.NOTEBOOKS:
        committed = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
        text = "".join(o.get("text", "") for c in committed.cells
                       for o in c.get("outputs", []))
        assert "FAST settings" not in text, f"{name}.ipynb was committed from a fast run"
