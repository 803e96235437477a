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
from nmjax.nn._lifecycle import collection, refresh, search, sync
from nmjax.nn._packed import PackedLinear, pack_model, packed_variables
from nmjax.nn._sparsify import SparseModel, model_masks
from nmjax.nn.linen import SparseDense
from nmjax.nn.nnx import (
    NMDecay,
    NMMask,
    SparseLinear,
    set_masks,
    sparse_layers,
)


def sparsify(model: Any, rule: Any, *, pattern: str | None = None, mode: str = "dynamic",
             decay: Any = 0.0, backend: Any = "auto") -> Any:
    """Makes the products of a Linen or NNX ``model`` that a plan selects N:M sparse in
    both directions of backprop, whatever layer classes the model uses.

    The preferred input is a :class:`nmjax.plan.Plan`, resolved once from the model and
    example inputs and shared with the optimizer, so the two cannot disagree::

      plan = nmjax.resolve(model, MaskRule("2:4 transposable", exclude="head"), x)
      print(plan)                                    # what becomes sparse, along which axes
      sparse = nmjax.nn.sparsify(model, plan, mode="static")
      tx = nmjax.optim.sparse(optax.adam(1e-3), plan)

    A rule (a :class:`~nmjax.tree.MaskRule`, pattern spec or ``"2:4"``) instead of a plan is
    resolved at each trace (dynamic mode only for NNX).

    The model is traced to a jaxpr and each selected parameter is followed to the
    ``dot_general`` / ``einsum`` / convolution that uses it: the op's dimension numbers give
    the contraction axes (forward N:M groups) and output axes (input-gradient groups), so
    ``nn.Dense``, GPT-2's ``(out, in)`` ``Conv1D``, ``DenseGeneral``, ``Einsum``, layers
    stacked by ``scan`` and custom modules calling ``jnp.dot`` all work. Those products run
    through :func:`nmjax.ops.nm_dense` / :func:`nmjax.ops.nm_conv`; everything else runs as
    in the dense model, and the parameters keep their names, shapes and tree.

    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> from nmjax.plan import resolve
    >>> from nmjax.tree import MaskRule
    >>> class MLP(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return nn.Dense(10, name="head")(nn.relu(nn.Dense(32)(x)))
    >>> x = jnp.ones((4, 16))
    >>> params = MLP().init(jax.random.key(0), x)["params"]
    >>> plan = resolve(MLP(), MaskRule("2:4 transposable", exclude="head"), x)
    >>> plan.paths
    ('Dense_0/kernel',)
    >>> sparsify(MLP(), plan).apply({"params": params}, x).shape
    (4, 10)

    Args:
      model: a Linen or NNX module.
      rule: a :class:`~nmjax.plan.Plan` (preferred), or rules to resolve.
      pattern: with a shorthand string rule, its kind (``"transposable"``, ``"bimask"``).
      mode: ``"dynamic"`` (masks from the current weights at every call) or ``"static"``
        (Linen: from ``variables["nm_masks"]``; NNX: from the model's ``NMMask``
        variables, set by :func:`nmjax.nn.sync`).
      decay: SR-STE ``λ`` on the products (dynamic training without :mod:`nmjax.optim`).
      backend: product backend (:mod:`nmjax.backends`).

    Returns:
      Linen: a :class:`~nmjax.nn._sparsify.SparseModel` (``init``/``apply``). NNX: a copy of
      the model whose calls run sparse (same ``nnx.Param`` state).

    Raises:
      TypeError: ``model`` is neither a Linen nor an NNX module.
      ValueError: bad settings; at resolution (here for a plan, at the first call for a
        rule): a rule that selects nothing, or a selected parameter that cannot be sparse
        (the message names it and why).
    """
    from nmjax.nn import _sparsify

    target = _sparsify.as_target(rule, pattern)
    patterns = target.patterns if isinstance(target, _sparsify.Plan) else tuple(
        r.pattern for r in target)
    sp = Sparsity(patterns[0], mode=mode, backend=backend, decay=decay)
    if isinstance(model, _sparsify.SparseModel) or _sparsify.is_sparse_nnx(model):
        raise ValueError("model is sparsified already; sparsify the dense model with a plan "
                         "of several rules (nmjax.resolve(model, [rule1, rule2], x))")
    if isinstance(model, _nn.Module):
        return _sparsify.SparseModel(model, target, sp)
    if isinstance(model, _nnx.Module):
        return _sparsify.sparsify_nnx(model, target, sp)
    raise TypeError(f"model must be a flax.linen or flax.nnx Module, got {type(model).__name__}")


__all__ = [
    "MASKS",
    "USED_MASKS",
    "NMDecay",
    "NMMask",
    "PackedLinear",
    "SparseDense",
    "SparseLinear",
    "SparseModel",
    "Sparsity",
    "collection",
    "linen",
    "model_masks",
    "nnx",
    "pack_model",
    "packed_variables",
    "refresh",
    "search",
    "set_masks",
    "sparse_layers",
    "sparsify",
    "sync",
]
