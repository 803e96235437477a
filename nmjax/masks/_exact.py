"""Exact transposable N:M for any ``m <= 16``: a min-cost-flow solver batched over tiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def one_hot2(i: jax.Array, j: jax.Array, m: int) -> jax.Array:
    """``(m, m, T)`` mask with True at ``[i[t], j[t], t]``."""
    ar = jnp.arange(m)[:, None]
    return (ar == i)[:, None, :] & (ar == j)[None, :, :]


def tile_eps(s: jax.Array, m: int, eps_rel: float | None) -> jax.Array:
    """Per-tile tolerance ``(T,)``: ``eps_rel * max|s|`` (default ``eps_rel = 4 m`` machine
    epsilons)."""
    if eps_rel is None:
        eps_rel = 4 * m * float(jnp.finfo(s.dtype).eps)
    scale = jnp.abs(s).max((0, 1))
    return eps_rel * jnp.maximum(scale, jnp.finfo(s.dtype).tiny)


def row_top_n(s: jax.Array, n: int, m: int) -> jax.Array:
    """Top ``n`` of every tile row of ``s: (m, m, T)`` (ties: lower column first)."""
    cols = jnp.arange(m)[:, None]
    rank = jnp.zeros(s.shape, jnp.int32)
    for c in range(m):  # rank[r, c'] counts the columns c that beat c'
        other = s[:, c : c + 1]
        rank += (other > s) | ((other == s) & (c < cols))
    return rank < n


def exact_tiles(s: jax.Array, n: int, m: int, eps_rel: float | None) -> jax.Array:
    """Maximum-weight b-matching (degree ``n`` on both sides) of every tile of
    ``s: (m, m, T)``, batched.

    Successive shortest paths from a row-optimal start: keep each row's top ``n`` (optimal
    when columns are unconstrained, so the residual graph has no negative cycle), then move
    one unit at a time from an over-full column to an under-full one along a shortest path of
    the residual graph (drop ``(r, c)`` costs ``+s``, keep ``(r, c')`` costs ``-s``), found
    by Bellman-Ford on all tiles at once. Shortest paths preserve the absence of negative
    cycles, so the final exactly-N mask is optimal. A distance improves only by more than
    ``eps = eps_rel * max|s|`` of its tile, which keeps float rounding from creating cycles.
    """
    t = s.shape[-1]
    inf = jnp.asarray(jnp.inf, s.dtype)
    eps = tile_eps(s, m, eps_rel)
    ar = jnp.arange(m, dtype=jnp.int32)[:, None]

    def bellman_ford(x, src):
        d_col = jnp.where(src, 0, inf).astype(s.dtype)  # (m, T)
        d_row = jnp.full((m, t), inf, s.dtype)
        p_row = jnp.full((m, t), -1, jnp.int32)  # column a row is reached from (dropped entry)
        p_col = jnp.full((m, t), -1, jnp.int32)  # row a column is reached from (kept entry)

        def body(st):
            d_row, d_col, p_row, p_col, k, _ = st
            cand = jnp.where(x, d_col[None] + s, inf)  # [r, c, t]
            best, arg = cand.min(1), cand.argmin(1).astype(jnp.int32)
            up_r = best < d_row - eps
            d_row = jnp.where(up_r, best, d_row)
            p_row = jnp.where(up_r, arg, p_row)
            cand = jnp.where(x, inf, d_row[:, None] - s)
            best, arg = cand.min(0), cand.argmin(0).astype(jnp.int32)
            up_c = best < d_col - eps
            d_col = jnp.where(up_c, best, d_col)
            p_col = jnp.where(up_c, arg, p_col)
            return d_row, d_col, p_row, p_col, k + 1, up_r.any() | up_c.any()

        cond = lambda st: st[-1] & (st[-2] <= m)
        st = (d_row, d_col, p_row, p_col, 0, jnp.asarray(True))
        return jax.lax.while_loop(cond, body, st)[:4]

    def augment(x):
        cnt = x.sum(0)  # kept per tile column, (m, T)
        _, d_col, p_row, p_col = bellman_ford(x, cnt > n)
        d_dst = jnp.where(cnt < n, d_col, inf)
        c = jnp.argmin(d_dst, 0).astype(jnp.int32)
        live = jnp.isfinite(d_dst.min(0))

        def trace(_, st):
            c, live, add_col, drop_col = st
            r = jnp.take_along_axis(p_col, c[None], 0)[0]
            live = live & (r >= 0)
            rs = jnp.maximum(r, 0)
            c_prev = jnp.take_along_axis(p_row, rs[None], 0)[0]
            hot = (ar == rs) & live
            add_col = jnp.where(hot, c, add_col)
            drop_col = jnp.where(hot, c_prev, drop_col)
            return jnp.where(live, c_prev, c), live, add_col, drop_col

        none = jnp.full((m, t), -1, jnp.int32)
        _, _, add_col, drop_col = jax.lax.fori_loop(0, m, trace, (c, live, none, none))
        flip = (add_col[:, None] == ar[None]) | (drop_col[:, None] == ar[None])
        return x ^ flip

    def cond(st):
        x, k = st
        return (k < n * m) & (x.sum(0) > n).any()

    x0 = row_top_n(s, n, m)
    return jax.lax.while_loop(cond, lambda st: (augment(st[0]), st[1] + 1), (x0, 0))[0]
