"""Flax layers with N:M-sparse kernels, and ``sparsify`` for existing Linen and NNX models.

Linen: :class:`nmjax.nn.linen.SparseDense`, :class:`nmjax.nn.linen.SparseConv`.
NNX: :class:`nmjax.nn.nnx.SparseLinear`, :class:`nmjax.nn.nnx.SparseConv`.
:func:`sparsify` takes either kind of model and a rule (a :class:`nmjax.tree.MaskRule`, a
pattern spec, or a shorthand such as ``"2:4"``).
"""

from __future__ import annotations

from typing import Any

from flax import linen as _nn
from flax import nnx as _nnx

from nmjax.nn import linen, nnx
from nmjax.nn._core import MASKS, USED_MASKS, Sparsity
from nmjax.nn.linen import SparseDense, Sparsified, linen_masks, linen_perms, to_collection
from nmjax.nn.nnx import (
    NMDecay,
    NMMask,
    SparseLinear,
    refresh_masks,
    search_perms,
    set_masks,
    sparse_layers,
)


def sparsify(model: Any, rule: Any, *, pattern: str | None = None, mode: str = "dynamic",
             decay: Any = 0.0, backend: Any = "auto") -> Any:
    """Makes the Dense/Linear and Conv layers of a Linen or NNX ``model`` that ``rule``
    selects N:M sparse in both directions of backprop.

    ``sparsify(model, "2:4")``, ``sparsify(model, "2:4", pattern="transposable")``,
    ``sparsify(model, MaskRule(BiMask(2, 4), exclude="head"), decay=2e-4)``.

    Dispatches to :func:`nmjax.nn.linen.sparsify` (returns a :class:`Sparsified` Linen module
    with the same ``params``) or :func:`nmjax.nn.nnx.sparsify` (returns a sparse copy of the
    NNX model with the same ``nnx.Param`` state); see those for details.

    Raises:
      TypeError: ``model`` is neither a Linen nor an NNX module.
    """
    kwargs = dict(pattern=pattern, mode=mode, decay=decay, backend=backend)
    if isinstance(model, _nn.Module):
        return linen.sparsify(model, rule, **kwargs)
    if isinstance(model, _nnx.Module):
        return nnx.sparsify(model, rule, **kwargs)
    raise TypeError(f"model must be a flax.linen or flax.nnx Module, got {type(model).__name__}")


def layer_kinds(model: Any, *args: Any, **kwargs: Any) -> dict[str, str | None]:
    """``{kernel path: "dense" | "conv" | None}`` from a model's real layer types, for
    :func:`nmjax.tree.build_masks` (``kinds=``): NNX models need no inputs; Linen models
    are traced abstractly with example inputs ``args``."""
    if isinstance(model, _nn.Module):
        return linen.layer_kinds(model, *args, **kwargs)
    if isinstance(model, _nnx.Module):
        if args or kwargs:
            raise TypeError("layer_kinds of an NNX model takes no inputs")
        return nnx.layer_kinds(model)
    raise TypeError(f"model must be a flax.linen or flax.nnx Module, got {type(model).__name__}")


__all__ = [
    "MASKS",
    "USED_MASKS",
    "NMDecay",
    "NMMask",
    "SparseDense",
    "SparseLinear",
    "Sparsified",
    "Sparsity",
    "layer_kinds",
    "linen",
    "linen_masks",
    "linen_perms",
    "nnx",
    "refresh_masks",
    "search_perms",
    "set_masks",
    "sparse_layers",
    "sparsify",
    "to_collection",
]
