"""Transposable N:M by Hubara et al.'s greedy b-matching, in rounds instead of a sort and a scan.

The greedy visits a tile's entries in decreasing score (ties: lower row-major index first)
and keeps one while its row and its column each hold fewer than ``n``. With one total order
shared by rows and columns, its result is the unique stable b-matching, which depends only
on how entries compare within their row and within their column, so it can be built in
parallel rounds without sorting the tile: call an entry *alive* while it is kept or both
its row and its column are short, and keep, in one round, every alive entry that is among
the first ``n`` alive entries of its row and among the first ``n`` of its column. Each such
entry is one the greedy keeps (fewer than ``n`` entries before it in its row or its column
can be kept), every round keeps at least the first alive entry of the tile, and the rounds
end on a maximal mask, which is then the greedy's. Gaussian tiles need about 2 (2:4), 3
(4:8) and 4 (8:16) rounds; the stragglers finish in a small gathered batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nmjax.masks import _exact, _tiles


def greedy_tiles(s: jax.Array, n: int, m: int) -> jax.Array:
    """Greedy b-matching of every tile of ``s: (m, m, T)``; returns the kept ``(m, m, T)``,
    at most ``n`` per row and column, maximal."""
    # Materialise: XLA would otherwise recompute the m-term ranks inside every consumer.
    row_bit, col_bit = jax.lax.optimization_barrier(
        (jnp.left_shift(1, _exact.row_rank(s, m)), jnp.left_shift(1, _exact.col_rank(s, m))))
    keep = (row_bit < (1 << n)) & (col_bit < (1 << n))  # first round: top n of both

    def step(state):
        row_bit, col_bit, keep, _ = state
        row_short = keep.sum(1) < n
        col_short = keep.sum(0) < n
        alive = keep | (row_short[:, None] & col_short[None])
        # alive entries of each row (column) as a bit set over their ranks
        row_alive = jnp.where(alive, row_bit, 0).sum(1)
        col_alive = jnp.where(alive, col_bit, 0).sum(0)
        # entries among the first n alive of their row and of their column
        row_first = jax.lax.population_count(row_alive[:, None] & (row_bit - 1)) < n
        col_first = jax.lax.population_count(col_alive[None] & (col_bit - 1)) < n
        add = alive & ~keep & row_first & col_first
        return row_bit, col_bit, keep | add, _tiles.any_tile(add)

    state = (row_bit, col_bit, keep, jnp.ones(s.shape[-1], bool))
    return _tiles.compacted_loop(step, state, lambda st: st[3], max_steps=n * m)[2]
