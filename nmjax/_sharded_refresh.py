"""Mask refreshes that run on each device's shard of a kernel: no communication.

Where the kernels are sharded with ``NamedSharding`` and every N:M group and ``m x m`` tile
lies inside one shard (what :func:`nmjax.optim.check_sharding` enforces), the masks of a
shard are the shard of the masks. Under GSPMD alone the solvers' chunk loops and their
data-dependent ``while`` loops make XLA gather kernels and all-reduce loop conditions; here
each kernel's solve runs under ``jax.shard_map`` on its local block, laid out as the
kernel (:class:`~nmjax.plan.Layout` with the local shape).

A Bi-Mask backward group runs along the *permuted* output axis, across output shards: a
Bi-Mask kernel sharded along its output axis keeps the global (GSPMD) computation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
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
    sharded along its output)."""
    if not isinstance(sharding, NamedSharding) or pattern is None:
        return None
    spec = _spec(sharding, len(layout.shape))
    parts = [_parts(sharding, e) for e in spec]
    if all(p == 1 for p in parts):
        return None
    if isinstance(pattern, BiMask) and any(parts[a] > 1 for a in layout.out):
        return None
    if any(s % p for s, p in zip(layout.shape, parts, strict=True)):
        return None
    local = tuple(s // p for s, p in zip(layout.shape, parts, strict=True))
    return Layout(local, layout.stack, layout.contract, layout.out), spec


def local_masks(pattern: Pattern, w: jax.Array, layout: Layout, sharding: NamedSharding,
                perm: Any = None) -> Masks | None:
    """``pattern``'s masks of ``w`` computed on each shard (``jax.shard_map``), or ``None``
    where :func:`local_plan` says they cannot be. ``perm``: a Bi-Mask permutation of
    ``layout.perm_shape`` (``None``: the identity)."""
    from nmjax.plan import layout_masks

    found = local_plan(layout, pattern, sharding)
    if found is None:
        return None
    local, spec = found
    perm_spec = P(*(spec[a] for a in layout.stack), None)

    def solve(w_block, *perm_block):
        masks = layout_masks(pattern, w_block, local, *perm_block)
        return masks.fwd, masks.bwd

    args, specs = ((w,), (P(*spec),)) if perm is None else ((w, perm), (P(*spec), perm_spec))
    fwd, bwd = jax.shard_map(solve, mesh=sharding.mesh, in_specs=specs,
                             out_specs=(P(*spec), P(*spec)), check_vma=False)(*args)
    if pattern.same_masks:
        bwd = fwd
    return Masks(fwd, bwd, perm)


def shardings_by_path(shardings: Any) -> Mapping[str, Any]:
    """``{path: NamedSharding}`` of a tree of shardings like the parameters."""
    from nmjax.tree import path_str

    flat = jax.tree_util.tree_flatten_with_path(
        shardings, is_leaf=lambda s: isinstance(s, NamedSharding) or s is None)[0]
    return {path_str(p): s for p, s in flat if isinstance(s, NamedSharding)}
