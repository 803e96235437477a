"""Flax layers with N:M-sparse kernels, and ``sparsify`` for existing Linen and NNX models.

Linen: :class:`nmjax.nn.linen.SparseDense`, :class:`nmjax.nn.linen.SparseConv`.
NNX: :class:`nmjax.nn.nnx.SparseLinear`, :class:`nmjax.nn.nnx.SparseConv`.
:func:`sparsify` takes either kind of model and a :class:`nmjax.tree.MaskRule`.
"""

from __future__ import annotations

from typing import Any

from flax import linen as _nn
from flax import nnx as _nnx

from nmjax.nn import linen, nnx
from nmjax.nn._core import MASKS, USED_MASKS, LayerMasks, Sparsity
from nmjax.nn.linen import SparseDense, Sparsified, linen_masks, linen_perms
from nmjax.nn.nnx import NMMask, SparseLinear, refresh_masks, search_perms
from nmjax.tree import MaskRule


def sparsify(model: Any, rule: MaskRule, *, mode: str = "dynamic", decay: float = 0.0,
             backend: str = "auto") -> Any:
    """Makes the Dense/Linear and Conv layers of a Linen or NNX ``model`` that ``rule``
    selects N:M sparse in both directions of backprop.

    Dispatches to :func:`nmjax.nn.linen.sparsify` (returns a :class:`Sparsified` Linen module
    with the same ``params``) or :func:`nmjax.nn.nnx.sparsify` (returns a sparse copy of the
    NNX model with the same ``nnx.Param`` state); see those for details.

    Raises:
      TypeError: ``model`` is neither a Linen nor an NNX module.
    """
    if isinstance(model, _nn.Module):
        return linen.sparsify(model, rule, mode=mode, decay=decay, backend=backend)
    if isinstance(model, _nnx.Module):
        return nnx.sparsify(model, rule, mode=mode, decay=decay, backend=backend)
    raise TypeError(f"model must be a flax.linen or flax.nnx Module, got {type(model).__name__}")


__all__ = [
    "MASKS",
    "USED_MASKS",
    "LayerMasks",
    "NMMask",
    "SparseDense",
    "SparseLinear",
    "Sparsified",
    "Sparsity",
    "linen",
    "linen_masks",
    "linen_perms",
    "nnx",
    "refresh_masks",
    "search_perms",
    "sparsify",
]
