"""nmjax: N:M structured-sparse training for JAX and Flax, sparse in both directions.

``nmjax.masks``, ``nmjax.tree``, ``nmjax.format``, ``nmjax.backends`` and ``nmjax.ops`` need
only JAX; ``nmjax.plan`` (:func:`nmjax.resolve`: a rule resolved against a model's ops),
``nmjax.nn`` (Flax layers, ``sparsify``), ``nmjax.optim`` (the optax wrapper),
``nmjax.convert``, ``nmjax.kernels`` and ``nmjax.export`` (packed checkpoints) load on first
access.
"""

import importlib

from nmjax import backends, format, masks, ops, tree  # noqa: A004

__version__ = "0.1.0"

_LAZY = ("plan", "nn", "optim", "convert", "kernels", "datasets", "export")

__all__ = ["backends", "format", "masks", "ops", "resolve", "tree", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"nmjax.{name}")
    if name == "resolve":
        return importlib.import_module("nmjax.plan").resolve
    raise AttributeError(f"module 'nmjax' has no attribute {name!r}")
