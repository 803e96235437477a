"""Transposable N:M by Hubara et al.'s greedy b-matching, with an optional fill/swap repair."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nmjax.masks._exact import one_hot2, tile_eps


def greedy_tiles(s: jax.Array, n: int, m: int) -> jax.Array:
    """Greedy b-matching on every tile of ``s: (m, m, T)`` at once: entries in decreasing
    score (ties: lower row-major index first), kept while their row and column each hold
    fewer than ``n``."""
    t = s.shape[-1]
    flat = s.reshape(m * m, t).T
    order = jnp.argsort(-flat, axis=-1, stable=True).astype(jnp.int32).T  # (m*m, T)
    ar = jnp.arange(m, dtype=jnp.int32)[:, None]

    def step(counts, idx):
        row_cnt, col_cnt = counts  # (m, T)
        hot_r = ar == idx // m
        hot_c = ar == idx % m
        cr = jnp.sum(jnp.where(hot_r, row_cnt, 0), 0)
        cc = jnp.sum(jnp.where(hot_c, col_cnt, 0), 0)
        ok = (cr < n) & (cc < n)
        return (row_cnt + (hot_r & ok), col_cnt + (hot_c & ok)), ok

    zeros = jnp.zeros((m, t), jnp.int32)
    _, kept = jax.lax.scan(step, (zeros, zeros), order)  # kept[k, t]: k-th visited entry
    out = jnp.zeros((m * m, t), bool).at[order, jnp.arange(t)[None, :]].set(kept)
    return out.reshape(m, m, t)


def fill_tiles(s: jax.Array, x: jax.Array, n: int, m: int) -> jax.Array:
    """Completes an at-most-N mask ``x: (m, m, T)`` to exactly N per row and column.

    Each round adds, in every tile still short, the best free entry whose row and column are
    both short; when no such entry exists it applies the best 3-edge augmentation
    (add ``(r, c')``, drop ``(r', c')``, add ``(r', c)``) from the first short row ``r`` to a
    short column ``c``. One of the two always exists (a short row has at least ``m - n + 1``
    free columns and a short column at least ``m - n + 1`` free rows, so some full column
    ``c'`` free in row ``r`` shares a row ``r' != r`` with the free rows of ``c``), so
    ``n * m`` rounds always suffice.
    """
    neg = jnp.asarray(-jnp.inf, s.dtype)
    ar = jnp.arange(m)[:, None]

    def body(_, x):
        row_short = x.sum(1) < n  # (m, T)
        col_short = x.sum(0) < n
        direct = row_short[:, None] & col_short[None, :] & ~x
        gain1 = jnp.where(direct, s, neg).reshape(m * m, -1)
        best1 = jnp.argmax(gain1, 0)
        has1 = jnp.isfinite(gain1.max(0))
        add1 = one_hot2(best1 // m, best1 % m, m) & has1
        # 3-edge path from the first short row r: gain[c, c', r'] = s[r,c'] - s[r',c'] + s[r',c]
        r = jnp.argmax(row_short, 0)
        hot_r = ar == r  # (m, T)
        s_r = jnp.sum(jnp.where(hot_r[:, None], s, 0), 0)  # (m, T) = s[r, :]
        x_r = jnp.any(hot_r[:, None] & x, 0)
        xt = jnp.swapaxes(x, 0, 1)  # [col, row, t]
        st = jnp.swapaxes(s, 0, 1)
        valid = (
            col_short[:, None, None]
            & ~x_r[None, :, None]
            & xt[None, :, :]
            & ~xt[:, None, :]
            & ~hot_r[None, None]
        )
        gain3 = s_r[None, :, None] - st[None, :, :] + st[:, None, :]
        gain3 = jnp.where(valid, gain3, neg).reshape(m * m * m, -1)
        best3 = jnp.argmax(gain3, 0)
        has3 = jnp.isfinite(gain3.max(0)) & ~has1 & row_short.any(0)
        c, rest = best3 // (m * m), best3 % (m * m)
        c2, r2 = rest // m, rest % m
        flip3 = (one_hot2(r, c2, m) | one_hot2(r2, c2, m) | one_hot2(r2, c, m)) & has3
        return x ^ add1 ^ flip3

    def cond(st):
        x, k = st
        return (k < n * m) & (x.sum(1) < n).any()

    return jax.lax.while_loop(cond, lambda st: (body(0, st[0]), st[1] + 1), (x, 0))[0]


def swap_tiles(
    s: jax.Array, x: jax.Array, m: int, rounds: int, eps_rel: float | None
) -> jax.Array:
    """Improving 2-swaps on ``x: (m, m, T)`` until none gains more than the tolerance (or
    ``rounds`` rounds).

    A 2-swap drops kept ``(r1, c1), (r2, c2)`` and keeps free ``(r1, c2), (r2, c1)``;
    row and column counts are unchanged. Each round applies the best swap of every tile;
    the best one separates into two per-row-pair maxima (``O(m³)`` per tile).
    """
    eps = tile_eps(s, m, eps_rel)
    neg = jnp.asarray(-jnp.inf, s.dtype)
    diff = s[None, :, :, :] - s[:, None, :, :]  # [r1, r2, c] = s[r2, c] - s[r1, c]

    def body(state):
        x, it, _ = state
        ok = x[:, None] & ~x[None, :]  # c kept by r1, free in r2
        val = jnp.where(ok, diff, neg)
        half, arg = val.max(2), val.argmax(2)  # (m, m, T)
        gain = (half + jnp.swapaxes(half, 0, 1)).reshape(m * m, -1)
        k = jnp.argmax(gain, 0)
        do = gain.max(0) > eps
        r1, r2 = k // m, k % m
        flat_arg = arg.reshape(m * m, -1)
        c1 = jnp.take_along_axis(flat_arg, k[None], 0)[0]
        c2 = jnp.take_along_axis(flat_arg, (r2 * m + r1)[None], 0)[0]
        flip = one_hot2(r1, c1, m) | one_hot2(r2, c2, m) | one_hot2(r1, c2, m)
        flip = (flip | one_hot2(r2, c1, m)) & do
        return x ^ flip, it + 1, do.any()

    cond = lambda state: state[2] & (state[1] < rounds)
    return jax.lax.while_loop(cond, body, (x, 0, jnp.asarray(True)))[0]
