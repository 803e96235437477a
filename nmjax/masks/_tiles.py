"""Machinery the JAX tile solvers share: exact per-tile scaling, and loops that gather the
tiles still working into a small batch instead of iterating over every tile in lock-step.

The solvers hold tiles "tiles last": ``s[r, c, t]`` of shape ``(m, m, T)``, so every step is
an elementwise op or a short reduction over long vectors of tiles (XLA fuses and vectorises
those on the CPU; a minor axis of length m would not vectorise).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def _pow2(k: jax.Array, dtype) -> jax.Array:
    """``2.0 ** k`` exactly, for integer ``k`` in the normal exponent range of ``dtype``."""
    info = jnp.finfo(dtype)
    int_type = jnp.int32 if info.bits == 32 else jnp.int64
    bits = (k.astype(int_type) + (info.maxexp - 1)) << info.nmant
    return jax.lax.bitcast_convert_type(bits, dtype)


def normalise_tiles(s: jax.Array, n: int, m: int, tile_axes: tuple[int, int]) -> jax.Array:
    """Scales each tile by a power of two and replaces non-finite scores by finite ones.

    The scaling brings a tile's largest finite magnitude into ``[0.5, 1)``: it is exact (a
    power of two changes no comparison and no rounding of a sum), and it keeps the solvers'
    sums far from overflow near the float maximum and from flushed subnormals near zero.
    NaN and ``-inf`` then become one value below, ``+inf`` one above, every finite score of
    the tile, by a margin ``2 (n m + 1) + 2`` larger than any difference two masks can make
    on the finite entries, so an optimal mask keeps as few NaN/``-inf`` and as many ``+inf``
    entries as the constraints allow. ``tile_axes`` are the two axes of ``s`` that index
    within a tile.
    """
    info = jnp.finfo(s.dtype)
    finite = jnp.isfinite(s)
    mag = jnp.where(finite, jnp.abs(s), 0).max(tile_axes, keepdims=True)
    # exponent e with mag = f * 2**e, f in [0.5, 1) (subnormals count as the smallest normal)
    bits = jax.lax.bitcast_convert_type(mag, jnp.int32 if info.bits == 32 else jnp.int64)
    e = jnp.maximum((bits >> info.nmant) & (2 ** info.nexp - 1), 1) - (info.maxexp - 2)
    e = jnp.where(mag > 0, e, 0)
    half = e // 2  # two factors, each a normal number, whatever e is
    s = s * _pow2(-half, s.dtype) * _pow2(half - e, s.dtype)
    pad = 2 * (n * m + 1) + 2

    def replace(s):
        s = jnp.where(jnp.isnan(s) | (s == -jnp.inf), -1 - pad, s)
        return jnp.where(s == jnp.inf, 1 + pad, s).astype(s.dtype)

    return jax.lax.cond(finite.all(), lambda s: s, replace, s)


def any_tile(a: jax.Array) -> jax.Array:
    """``a: (m, m, T)`` bool -> ``(T,)``: any entry of each tile.

    Written as elementwise ors of contiguous slices of the materialised ``a``: XLA's CPU
    reduction over the two leading axes, fused with ``a``'s producer, walks the array
    across its strides (measured 10x slower).
    """
    a = jax.lax.optimization_barrier(a)
    for _ in range(2):
        a = functools.reduce(jnp.logical_or, list(a))
    return a


def compacted_loop(
    step: Callable[[Any], Any],
    state: Any,
    active: Callable[[Any], jax.Array],
    *,
    max_steps: int,
    shrink: int = 8,
    levels: int = 1,
    min_batch: int = 256,
) -> Any:
    """Applies ``step`` until no tile is ``active``, moving the stragglers together.

    ``state`` is a pytree of arrays with the tiles on their last axis; ``step`` advances
    every tile by one round and must leave inactive tiles unchanged; ``active(state)`` is a
    ``(T,)`` bool. A lock-step loop over all ``T`` tiles would run every tile as long as the
    slowest one. Here rounds run on all tiles while more than ``T / shrink`` are active;
    then the active ones are gathered into a batch of ``T / shrink`` tiles, which runs while
    more than ``T / shrink**2`` are active, and so on for ``levels`` levels (each compiles
    ``step`` once more) or down to ``min_batch`` tiles; the last batch runs to the end and
    the results are scattered back. ``max_steps`` caps each level's rounds; it must bound
    the rounds any tile needs, so that every level ends with few enough tiles active.
    """
    t = active(state).shape[0]
    batch = t // shrink

    def run(st, more):
        def body(c):
            return step(c[0]), c[1] + 1

        return jax.lax.while_loop(lambda c: more(c[0]) & (c[1] < max_steps), body, (st, 0))[0]

    if levels < 1 or batch < min_batch:
        return run(state, lambda st: active(st).any())
    state = run(state, lambda st: active(st).sum() > batch)
    # Padding repeats an inactive or an active tile; either way each copy ends equal, so
    # the scatter writes the same result for every duplicate index.
    idx = jnp.nonzero(active(state), size=batch, fill_value=0)[0]
    sub = jax.tree.map(lambda a: jnp.take(a, idx, axis=-1), state)
    sub = compacted_loop(step, sub, active, max_steps=max_steps, shrink=shrink,
                         levels=levels - 1, min_batch=min_batch)
    return jax.tree.map(lambda a, b: a.at[..., idx].set(b), state, sub)
