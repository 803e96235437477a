"""Mask refreshes that run on each device's shard of a kernel: no communication.

Where the kernels are sharded with ``NamedSharding`` and every N:M group and ``m x m`` tile
lies inside one shard (what :func:`nmjax.optim.check_sharding` enforces), the masks of a
shard are the shard of the masks. Under GSPMD alone the solvers' chunk loops and their
data-dependent ``while`` loops make XLA gather kernels and all-reduce loop conditions; here
each kernel's solve runs under ``jax.shard_map`` on its local block, laid out as the
kernel (:class:`~nmjax.plan.Layout` with the local shape).

A Bi-Mask backward group runs along the *permuted* output axis. A Bi-Mask kernel sharded
along its output axis keeps its permutation within each output shard (``perm[b]`` of the
shard holding channels ``[b, b + width)`` lies in that range): its masks and its permutation
search (:func:`local_search`) then run shard by shard too, the search summing its scores
over the contraction shards (one ``psum`` of the swap gains per round, when the contraction
is split as well).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nmjax._graph import Layout
from nmjax.masks import BiMask, Masks, Pattern


def _spec(sharding: NamedSharding, ndim: int) -> tuple[Any, ...]:
    spec = tuple(sharding.spec)
    return spec + (None,) * (ndim - len(spec))


def _parts(sharding: NamedSharding, entry: Any) -> int:
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(sharding.mesh.shape[n] for n in names)


def local_plan(layout: Layout, pattern: Pattern | None, sharding: Any
               ) -> tuple[Layout, tuple[Any, ...]] | None:
    """``(the local block's layout, the kernel's spec)`` when ``pattern``'s masks of the
    kernel can be computed shard by shard, else ``None`` (not sharded, or a Bi-Mask kernel
    whose output is split along an axis other than its outermost output axis, so that a
    shard's output channels are not one contiguous run)."""
    if not isinstance(sharding, NamedSharding) or pattern is None:
        return None
    spec = _spec(sharding, len(layout.shape))
    parts = [_parts(sharding, e) for e in spec]
    if all(p == 1 for p in parts):
        return None
    if isinstance(pattern, BiMask) and any(parts[a] > 1 for a in layout.out[1:]):
        return None
    if any(s % p for s, p in zip(layout.shape, parts, strict=True)):
        return None
    local = tuple(s // p for s, p in zip(layout.shape, parts, strict=True))
    return Layout(local, layout.stack, layout.contract, layout.out), spec


def _names(entry: Any) -> tuple[str, ...]:
    return () if entry is None else entry if isinstance(entry, tuple) else (entry,)


def _out_names(layout: Layout, spec: tuple[Any, ...]) -> tuple[str, ...]:
    """The mesh axes that split the (flattened) output: those of its outermost axis."""
    return _names(spec[layout.out[0]]) if layout.out else ()


def _perm_spec(layout: Layout, spec: tuple[Any, ...]) -> P:
    """A permutation ``(*stack, out)`` split like the kernel's stacked and output axes."""
    out = _out_names(layout, spec)
    return P(*(spec[a] for a in layout.stack), (out if len(out) > 1 else out[0]) if out
             else None)


def _offset(local: Layout, out_names: tuple[str, ...]) -> jax.Array:
    """Inside ``shard_map``: the first (flattened) output channel of this device's shard."""
    if not out_names:
        return jnp.zeros((), jnp.int32)
    return jax.lax.axis_index(out_names).astype(jnp.int32) * local.sizes[2]


def local_masks(pattern: Pattern, w: jax.Array, layout: Layout, sharding: NamedSharding,
                perm: Any = None, check: Callable[[jax.Array], None] | None = None
                ) -> Masks | None:
    """``pattern``'s masks of ``w`` computed on each shard (``jax.shard_map``), or ``None``
    where :func:`local_plan` says they cannot be. ``perm``: a Bi-Mask permutation of
    ``layout.perm_shape`` (``None``: the identity), kept within each output shard.
    ``check``: called inside the shard with a bool scalar, whether this shard's block of
    ``perm`` is a permutation of the shard's own output channels (Bi-Mask only)."""
    from nmjax.masks import is_permutation
    from nmjax.plan import layout_masks

    found = local_plan(layout, pattern, sharding)
    if found is None:
        return None
    local, spec = found
    out_names = _out_names(layout, spec) if isinstance(pattern, BiMask) else ()
    width = local.sizes[2]

    def solve(w_block, *perm_block):
        local_perm = None
        if perm_block:
            local_perm = perm_block[0] - _offset(local, out_names)
            if check is not None:
                check(jnp.all(jax.vmap(is_permutation)(local_perm.reshape(-1, width))))
        masks = layout_masks(pattern, w_block, local, local_perm)
        return masks.fwd, masks.bwd

    args, specs = (w,), (P(*spec),)
    if perm is not None:
        args, specs = (w, perm), (P(*spec), _perm_spec(layout, spec))
    fwd, bwd = jax.shard_map(solve, mesh=sharding.mesh, in_specs=specs,
                             out_specs=(P(*spec), P(*spec)), check_vma=False)(*args)
    if pattern.same_masks:
        bwd = fwd
    return Masks(fwd, bwd, perm)


def out_blocks(layout: Layout, pattern: Pattern | None, sharding: Any) -> int:
    """How many output shards a Bi-Mask permutation of this kernel is kept within (1: the
    output is not split, or the kernel's masks do not run shard by shard)."""
    found = local_plan(layout, pattern, sharding)
    if found is None or not isinstance(pattern, BiMask):
        return 1
    return _parts(sharding, _out_names(layout, found[1]) or None)


def local_search(pattern: BiMask, w: jax.Array, layout: Layout, sharding: NamedSharding,
                 key: jax.Array, init: Any = None) -> jax.Array | None:
    """A Bi-Mask permutation of ``w`` (``layout.perm_shape``) searched on each shard: each
    output shard permutes its own channels (its own key, folded from ``key``), the
    contraction shards of one output block sum their scores (``psum``) and agree. ``None``
    where :func:`local_plan` refuses the kernel (the search then runs on the whole kernel).
    ``init``: the warm start, kept within output shards."""
    from nmjax.plan import layout_search

    found = local_plan(layout, pattern, sharding)
    if found is None:
        return None
    local, spec = found
    out_names = _out_names(layout, spec)
    contract_names = tuple(n for a in layout.contract for n in _names(spec[a])) or None
    perm_spec = _perm_spec(layout, spec)

    def solve(w_block, key_data, *init_block):
        offset = _offset(local, out_names)
        k = jax.random.wrap_key_data(key_data)
        if out_names:  # each output shard draws its own pairings
            k = jax.random.fold_in(k, offset)
        start = init_block[0] - offset if init_block else None
        return layout_search(pattern, w_block, local, k, init=start,
                             axis_name=contract_names) + offset

    args = (w, jax.random.key_data(key))
    specs = (P(*spec), P())
    if init is not None:
        args, specs = (*args, init), (*specs, perm_spec)
    return jax.shard_map(solve, mesh=sharding.mesh, in_specs=specs, out_specs=perm_spec,
                         check_vma=False)(*args)


def shardings_by_path(shardings: Any) -> Mapping[str, Any]:
    """``{path: NamedSharding}`` of a tree of shardings like the parameters."""
    from nmjax.tree import path_str

    flat = jax.tree_util.tree_flatten_with_path(
        shardings, is_leaf=lambda s: isinstance(s, NamedSharding) or s is None)[0]
    return {path_str(p): s for p, s in flat if isinstance(s, NamedSharding)}
