"""Every reference in nmjax's docstrings and comments resolves: Sphinx roles name objects
that exist, repository paths name files in the repository, no file outside it is cited."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "nmjax").rglob("*.py"))
ROLE = re.compile(r":(?:func|class|meth|attr|mod|data):`~?(nmjax(?:\.\w+)+)`")
REPO_PATH = re.compile(
    r"\b((?:docs|tests|benchmarks|examples|notebooks)/[\w./-]+\.(?:md|py|sh|json))")


def _resolve(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError:
            return False
        return True
    return False


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_sphinx_references_name_objects_that_exist():
    pytest.importorskip("flax")
    missing = sorted({(str(p.relative_to(ROOT)), ref) for p in SOURCES
                      for ref in ROLE.findall(_text(p)) if not _resolve(ref)})
    assert not missing, missing


def test_repository_paths_exist_and_nothing_outside_is_cited():
    missing = sorted({(str(p.relative_to(ROOT)), ref) for p in SOURCES
                      for ref in REPO_PATH.findall(_text(p)) if not (ROOT / ref).exists()})
    assert not missing, missing
    outside = [str(p.relative_to(ROOT)) for p in SOURCES
               if re.search(r"DESIGN §|\.\./shared|KERNEL_NOTES", _text(p))]
    assert not outside, outside
    assert (ROOT / "docs" / "design.md").exists()


PUBLIC = ["nmjax", "nmjax.masks", "nmjax.plan", "nmjax.tree", "nmjax.format", "nmjax.backends",
          "nmjax.ops", "nmjax.nn", "nmjax.nn.linen", "nmjax.nn.nnx", "nmjax.optim",
          "nmjax.convert", "nmjax.kernels", "nmjax.datasets"]


@pytest.mark.parametrize("name", PUBLIC)
def test_public_modules_declare_all_and_every_name_exists(name):
    pytest.importorskip("flax")
    module = importlib.import_module(name)
    assert isinstance(getattr(module, "__all__", None), list), f"{name} has no __all__"
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing and len(set(module.__all__)) == len(module.__all__), missing
