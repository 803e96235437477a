"""The static-mask lifecycle of a sparse model, one name per step, Linen and NNX alike.

* :func:`refresh`: the masks recomputed from the current weights.
* :func:`search`: Bi-Mask permutations searched on the current weights.

NNX models hold their masks (:class:`nmjax.nn.NMMask` variables) and are updated in place;
a Linen model's masks are the ``"nm_masks"`` collection, returned. :func:`nmjax.optim.sparse`
runs both steps itself on its own schedule (read its masks with
:func:`nmjax.optim.linen_collection` / :func:`nmjax.optim.sync_nnx`); these are for
training loops that keep the masks themselves.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from nmjax.nn import linen as _linen
from nmjax.nn import nnx as _nnx


def _linen_plan(target: Any, plan: Any, name: str) -> None:
    if plan is None:
        raise TypeError(f"{name}(params, ...) of a Linen model needs its plan: "
                        f"{name}(params, {'key, ' if name == 'search' else ''}plan) (a "
                        "Plan from nmjax.resolve, or a rule)")


def refresh(target: Any, plan: Any = None) -> dict[str, Any] | None:
    """Recomputes static masks from the current weights.

    * ``refresh(model)``: an NNX model (from :func:`nmjax.nn.sparsify` with
      ``mode="static"``, or built from :class:`~nmjax.nn.SparseLinear`/``SparseConv``
      layers), in place; a stored Bi-Mask permutation is kept. Returns ``None``.
    * ``refresh(params, plan)``: a Linen model's ``params`` and its
      :class:`~nmjax.plan.Plan` (or a rule); returns the ``"nm_masks"`` collection (a dict
      laid out like ``params``, a :class:`~nmjax.masks.Masks` at each sparse kernel)::

        variables = {"params": params, "nm_masks": nmjax.nn.refresh(params, plan)}
    """
    if isinstance(target, nnx.Module):
        _nnx.refresh_model(target)
        return None
    _linen_plan(target, plan, "refresh")
    return _linen.masks_collection(target, plan)


def search(target: Any, key: jax.Array, plan: Any = None, *, previous: Any = None
           ) -> dict[str, Any] | None:
    """Searches new Bi-Mask permutations on the current weights, each with its pattern's
    search settings (the Bi-Mask recipe: every I steps, the paper's I = 100).

    * ``search(model, key)``: an NNX model, in place, each search warm-started from the
      stored permutation; static layers also refresh their masks. Returns ``None``.
    * ``search(params, key, plan, previous=perms)``: a Linen model's ``params`` and its
      Bi-Mask plan; returns the permutations laid out like ``params`` (an int32 array per
      Bi-Mask kernel, one ``(N,)`` row per stacked matrix), warm-started from ``previous``.
      Pass them as ``variables["nm_masks"]`` to a dynamic :func:`nmjax.nn.sparsify` model,
      whose masks are still recomputed from the weights at every call, the backward one in
      that permutation's order::

        perms = nmjax.nn.search(params, jax.random.key(step), plan, previous=perms)
        logits = sparse.apply({"params": params, "nm_masks": perms}, x)

    Raises:
      ValueError: a Linen plan with no Bi-Mask pattern.
    """
    if isinstance(target, nnx.Module):
        _nnx.search_model(target, key)
        return None
    _linen_plan(target, plan, "search")
    return _linen.perms_collection(target, plan, key, previous=previous)


__all__ = ["refresh", "search"]
