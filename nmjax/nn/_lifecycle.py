"""The static-mask lifecycle of a sparse model, one name per step, Linen and NNX alike.

* :func:`refresh`: the masks recomputed from the current weights.
* :func:`search`: Bi-Mask permutations searched on the current weights.
* :func:`collection`: masks from elsewhere (an optimizer state, a conversion, a mask tree)
  as a Linen model's ``"nm_masks"`` collection.
* :func:`sync`: the same masks copied into an NNX model.

NNX models hold their masks (:class:`nmjax.nn.NMMask` variables) and are updated in place;
a Linen model's masks are the ``"nm_masks"`` collection, returned. :func:`nmjax.optim.sparse`
runs refresh and search itself on its own schedule: pass its state to :func:`collection` /
:func:`sync`.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from nmjax.masks import Masks
from nmjax.nn import linen as _linen
from nmjax.nn import nnx as _nnx
from nmjax.tree import is_masks_leaf, path_str


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


def _mask_tree(source: Any) -> Any:
    """The mask tree of an optimizer state (:func:`nmjax.optim.sparse`'s), a
    :class:`nmjax.convert.Conversion`, or a mask tree itself."""
    from nmjax import optim
    from nmjax.convert import Conversion

    if isinstance(source, Conversion):
        return source.masks
    leaves = jax.tree_util.tree_leaves(source, is_leaf=is_masks_leaf)
    if leaves and all(isinstance(m, Masks) for m in leaves):
        return source
    try:
        return optim.masks_of(source)
    except ValueError as e:
        raise TypeError(f"expected nmjax.optim.sparse's state, an nmjax.convert.Conversion or "
                        f"a tree of nmjax.masks.Masks, got {type(source).__name__} ({e})") from e


def collection(source: Any) -> dict[str, Any]:
    """Masks as Linen's ``"nm_masks"`` collection for a static sparse model: a dict laid out
    like ``params`` without the leaves left dense.

    ``source``: :func:`nmjax.optim.sparse`'s state (its current masks), a
    :class:`nmjax.convert.Conversion`, or a mask tree (:func:`nmjax.tree.build_masks`)::

      logits = sparse.apply({"params": params, "nm_masks": nmjax.nn.collection(opt_state)}, x)
    """
    return _linen.to_collection(_mask_tree(source))


def sync(model: nnx.Module, source: Any) -> None:
    """Copies masks into an NNX model's static masks (in place).

    With :func:`nmjax.optim.sparse`, call it after each ``optimizer.update`` (inside the
    jitted step: the writes are state updates). ``model``: a model from
    :func:`nmjax.nn.sparsify` (``mode="static"``), or one built from
    :class:`~nmjax.nn.nnx.SparseLinear`/``SparseConv`` layers (matched by kernel path, as in
    ``nnx.state(model, nnx.Param)``). ``source``: as :func:`collection`.

    Raises:
      ValueError: a static sparse layer has no mask in ``source``, or a mask has no layer.
    """
    from nmjax.nn import _sparsify

    flat = jax.tree_util.tree_flatten_with_path(_mask_tree(source), is_leaf=is_masks_leaf)[0]
    masks = {path_str(p): m for p, m in flat if isinstance(m, Masks)}
    if _sparsify.is_sparse_nnx(model):
        planned = _sparsify.nnx_plan(model)
        if planned is None or getattr(model, "nm_masks", None) is None:
            raise ValueError("sync needs a model sparsified with a plan in static mode: "
                             "nmjax.nn.sparsify(model, plan, mode='static')")
        if set(masks) != set(planned.paths):
            raise ValueError(f"the masks and the model's plan differ: masks for "
                             f"{sorted(masks)[:4]}, plan {sorted(planned.paths)[:4]}; give both "
                             "the same plan")
        _sparsify.set_nnx_masks(model, masks)
        return
    layers = {path: layer for path, layer in _nnx.sparse_layers(model)
              if layer.sparsity.mode == "static"}
    missing, extra = sorted(set(layers) - set(masks)), sorted(set(masks) - set(layers))
    if missing or extra:
        raise ValueError(f"the masks and the model's static sparse layers differ: layers "
                         f"without masks {missing}, masks without a static layer {extra}")
    for path, layer in layers.items():
        _nnx.set_masks(layer, masks[path])


__all__ = ["collection", "refresh", "search", "sync"]
