"""Transposable N:M masks: exactly N kept per row and per column of every aligned M x M tile.

A transposable N:M mask of a Dense kernel ``w: (in, out)`` makes both ``w`` (forward,
contraction over axis 0) and ``w.T`` (input gradient, contraction over axis 1) N:M sparse
(DESIGN §2-3). Tiles are the aligned ``m x m`` blocks over two named ``axes``; every other
axis is a batch axis. Methods: ``"exact24"`` (all 90 valid 2:4 tiles scored at once),
``"greedy"`` (Hubara et al.'s greedy b-matching, optional repair), ``"exact"`` (a min-cost-flow
solver batched over all tiles in JAX) and ``"lp"`` (scipy's HiGHS, offline).
"""

from __future__ import annotations

import functools
import itertools
import math
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from nmjax import _checks

METHODS = ("auto", "exact24", "greedy", "exact", "lp")
# Tiles per chunk (at most, when the tile rows allow): small enough for the cache, large
# enough that the per-chunk loop overhead is negligible.
_CHUNK_TILES = {"exact24": 8192, "exact": 16384, "greedy": 8192}
MAX_M = 16  # cap for the JAX methods: tiles are held as dense (m, m, T) arrays


# ----------------------------------------------------------------------------- tiles


def _tile_axes(ndim: int, axes: Any) -> tuple[int, int]:
    if ndim < 2:
        raise ValueError(f"scores must have rank >= 2 to form m x m tiles, got rank {ndim}")
    try:
        a0, a1 = axes
    except (TypeError, ValueError):
        raise TypeError(f"axes must be a pair of ints, got {axes!r}") from None
    a0 = _checks.check_axis(a0, ndim, "axes[0]")
    a1 = _checks.check_axis(a1, ndim, "axes[1]")
    if a0 == a1:
        raise ValueError(f"axes must name two different axes, got {axes}")
    return a0, a1


def _check_tiled_scores(scores: Any, m: int, axes: Any, nan: str):
    """Validates scores tiled over ``axes``; returns ``(scores, a0, a1)``."""
    scores = _checks.check_scores(scores)
    a0, a1 = _tile_axes(scores.ndim, axes)
    for a in (a0, a1):
        _checks.check_divisible(scores.shape, a, m)
    if _checks.check_nan_policy(nan) == "raise":
        _checks.raise_on_nan(scores)
    return scores, a0, a1


def _to_tiles(x: Any, axes: tuple[int, int], m: int, xp=jnp):
    """``x`` -> ``(m, m, T)`` tiles ("tiles last"): ``[r, c, t]`` with tile rows along
    ``axes[0]`` and tile columns along ``axes[1]``; one transpose.

    Returns the tiles and the moved shape needed by :func:`_from_tiles`.
    """
    x = xp.moveaxis(x, axes, (-2, -1))
    moved = x.shape
    batch = len(moved) - 2
    x = x.reshape(*moved[:-2], moved[-2] // m, m, moved[-1] // m, m)
    order = (batch + 1, batch + 3, *range(batch), batch, batch + 2)
    return xp.transpose(x, order).reshape(m, m, -1), moved


def _from_tiles(tiles: Any, moved: tuple[int, ...], axes: tuple[int, int], m: int, xp=jnp):
    batch = len(moved) - 2
    x = tiles.reshape(m, m, *moved[:-2], moved[-2] // m, moved[-1] // m)
    # axes of x: r, c, batch..., R/m, C/m  ->  batch..., R/m, r, C/m, c
    order = (*range(2, 2 + batch), 2 + batch, 0, 3 + batch, 1)
    x = xp.transpose(x, order).reshape(moved)
    return xp.moveaxis(x, (-2, -1), axes)


def _work_dtype(dtype) -> Any:
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.promote_types(dtype, jnp.float32)
    return jnp.dtype(jnp.float32)


def _finite_tiles(s: jax.Array, n: int, m: int, tile_axes: tuple[int, int] = (0, 1)):
    """Replaces non-finite scores so that every method sees finite numbers.

    NaN and ``-inf`` become one value below, ``+inf`` one value above, every finite score of
    the tile, by a margin ``P`` larger than any difference two masks can make on the finite
    entries (``n*m`` kept entries each), so an optimal mask keeps as few NaN/``-inf`` and
    as many ``+inf`` entries as the constraints allow. Tiles of finite scores are unchanged.
    ``tile_axes`` are the two axes of ``s`` that index within a tile.
    """
    finite = jnp.isfinite(s)
    any_finite = finite.any(tile_axes, keepdims=True)
    lo = jnp.where(finite, s, jnp.inf).min(tile_axes, keepdims=True)
    hi = jnp.where(finite, s, -jnp.inf).max(tile_axes, keepdims=True)
    lo = jnp.where(any_finite, lo, 0)
    hi = jnp.where(any_finite, hi, 0)
    pad = (hi - lo) * (n * m + 1) + jnp.abs(hi) + jnp.abs(lo) + 1
    low, high = lo - pad, hi + pad
    s = jnp.where(jnp.isnan(s) | (s == -jnp.inf), low, s)
    return jnp.where(s == jnp.inf, high, s)


# ----------------------------------------------------------------------------- exact 2:4
#
# The JAX methods hold tiles "tiles last": ``s[r, c, t]`` of shape ``(m, m, T)``, so every
# step is an elementwise or small-axis reduction over long vectors of tiles (XLA fuses and
# vectorises those on CPU; a minor axis of length m would not vectorise).

_PAIRS = tuple(itertools.combinations(range(4), 2))  # the 6 ways to keep 2 of a row's 4


@functools.cache
def _patterns24() -> tuple[tuple[int, int, int, int], ...]:
    """The 90 valid 2:4 tiles as pair indices per row (into ``_PAIRS``), lexicographic."""
    out = []
    for p in itertools.product(range(6), repeat=4):
        counts = [0] * 4
        for r in range(4):
            for c in _PAIRS[p[r]]:
                counts[c] += 1
        if counts == [2] * 4:
            out.append(p)
    assert len(out) == 90
    return tuple(out)


@functools.cache
def _tables24() -> tuple[np.ndarray, ...]:
    """Index tables for :func:`_exact24` (pair columns, row-pair combinations,
    patterns as combinations, and each pattern as a 16-bit code of its kept entries)."""
    pats = _patterns24()
    first, second = np.array(_PAIRS).T
    halves = sorted({p[:2] for p in pats})
    index = {h: i for i, h in enumerate(halves)}
    h0, h1 = np.array(halves).T
    top = np.array([index[p[:2]] for p in pats])
    bottom = np.array([index[p[2:]] for p in pats])
    codes = np.array(
        [sum(1 << (4 * r + c) for r in range(4) for c in _PAIRS[p[r]]) for p in pats], np.int32
    )
    return first, second, h0, h1, top, bottom, codes


def _exact24(entry: list[list[jax.Array]]) -> list[list[jax.Array]]:
    """Exact 2:4: the best of the 90 valid tiles, by enumeration, for many tiles at once.

    ``entry[r][c]`` holds score ``(r, c)`` of every tile (arrays of one shape, one value per
    tile); returns the kept flags in the same form. Sums each row's 6 pairs, the top and the
    bottom row pairs' 36 combinations, then the 90 valid tiles (one addition each), and takes
    the first maximum (ties: the first tile in lexicographic order of its rows' pairs).
    """
    first, second, h0, h1, top, bottom, codes = _tables24()
    del first, second
    pair = jnp.stack([jnp.stack([entry[r][a] + entry[r][b] for a, b in _PAIRS])
                      for r in range(4)])  # (4, 6, ...)
    up = pair[0, h0] + pair[1, h1]  # (36, ...)
    down = pair[2, h0] + pair[3, h1]
    total = up[top] + down[bottom]  # (90, ...)
    index = jnp.arange(90).reshape((90,) + (1,) * (total.ndim - 1))
    best = jnp.min(jnp.where(total == total.max(0), index, 90), 0)
    code = jnp.asarray(codes)[best]
    return [[((code >> (4 * r + c)) & 1).astype(bool) for c in range(4)] for r in range(4)]


# ----------------------------------------------------------------------------- greedy


def _one_hot2(i: jax.Array, j: jax.Array, m: int) -> jax.Array:
    """``(m, m, T)`` mask with True at ``[i[t], j[t], t]``."""
    ar = jnp.arange(m)[:, None]
    return (ar == i)[:, None, :] & (ar == j)[None, :, :]


def _greedy_tiles(s: jax.Array, n: int, m: int) -> jax.Array:
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


def _tile_eps(s: jax.Array, m: int, eps_rel: float | None) -> jax.Array:
    """Per-tile tolerance ``(T,)``: ``eps_rel * max|s|`` (default ``eps_rel = 4 m`` machine
    epsilons)."""
    if eps_rel is None:
        eps_rel = 4 * m * float(jnp.finfo(s.dtype).eps)
    scale = jnp.abs(s).max((0, 1))
    return eps_rel * jnp.maximum(scale, jnp.finfo(s.dtype).tiny)


def _fill_tiles(s: jax.Array, x: jax.Array, n: int, m: int) -> jax.Array:
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
        add1 = _one_hot2(best1 // m, best1 % m, m) & has1
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
        flip3 = (_one_hot2(r, c2, m) | _one_hot2(r2, c2, m) | _one_hot2(r2, c, m)) & has3
        return x ^ add1 ^ flip3

    def cond(st):
        x, k = st
        return (k < n * m) & (x.sum(1) < n).any()

    return jax.lax.while_loop(cond, lambda st: (body(0, st[0]), st[1] + 1), (x, 0))[0]


def _swap_tiles(
    s: jax.Array, x: jax.Array, m: int, rounds: int, eps_rel: float | None
) -> jax.Array:
    """Improving 2-swaps on ``x: (m, m, T)`` until none gains more than the tolerance (or
    ``rounds`` rounds).

    A 2-swap drops kept ``(r1, c1), (r2, c2)`` and keeps free ``(r1, c2), (r2, c1)``;
    row and column counts are unchanged. Each round applies the best swap of every tile;
    the best one separates into two per-row-pair maxima (``O(m³)`` per tile).
    """
    eps = _tile_eps(s, m, eps_rel)
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
        flip = _one_hot2(r1, c1, m) | _one_hot2(r2, c2, m) | _one_hot2(r1, c2, m)
        flip = (flip | _one_hot2(r2, c1, m)) & do
        return x ^ flip, it + 1, do.any()

    cond = lambda state: state[2] & (state[1] < rounds)
    return jax.lax.while_loop(cond, body, (x, 0, jnp.asarray(True)))[0]


# ----------------------------------------------------------------------------- exact (JAX)


def _row_top_n(s: jax.Array, n: int, m: int) -> jax.Array:
    """Top ``n`` of every tile row of ``s: (m, m, T)`` (ties: lower column first)."""
    cols = jnp.arange(m)[:, None]
    rank = jnp.zeros(s.shape, jnp.int32)
    for c in range(m):  # rank[r, c'] counts the columns c that beat c'
        other = s[:, c : c + 1]
        rank += (other > s) | ((other == s) & (c < cols))
    return rank < n


def _exact_tiles(s: jax.Array, n: int, m: int, eps_rel: float | None) -> jax.Array:
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
    eps = _tile_eps(s, m, eps_rel)
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

    x0 = _row_top_n(s, n, m)
    return jax.lax.while_loop(cond, lambda st: (augment(st[0]), st[1] + 1), (x0, 0))[0]


# ----------------------------------------------------------------------------- public API


@functools.partial(
    jax.jit, static_argnames=("axes", "n", "m", "method", "repair", "swap_rounds", "eps_rel")
)
def _solve(scores, *, axes, n, m, method, repair, swap_rounds, eps_rel):
    """Scores -> mask of the same shape; one compiled program per shape and options.

    The tiles are solved in chunks of whole tile rows (``lax.map``): a chunk is a free
    reshape of the input, is transposed to the tiles-last layout in cache (``"exact24"``
    reads the tile entries as strided slices instead), and the exact solver's loops stop per
    chunk rather than on the slowest tile of the whole array.
    """
    x = jnp.moveaxis(scores.astype(_work_dtype(scores.dtype)), axes, (-2, -1))
    moved = x.shape
    rows, cols = math.prod(moved[:-1]) // m, moved[-1] // m  # tile rows, tiles per tile row
    target = _CHUNK_TILES[method]
    group = max((g for g in range(1, rows + 1) if rows % g == 0 and g * cols <= target),
                default=1)
    x = x.reshape(rows // group, group, m, cols, m)

    def chunk(c):  # (group, m, cols, m) -> same, solved
        if method == "exact24":  # tile entries as strided slices: no transpose at all
            c = jax.lax.cond(jnp.isfinite(c).all(), lambda c: c,
                             lambda c: _finite_tiles(c, n, m, (1, 3)), c)
            keep = _exact24([[c[:, r, :, k] for k in range(4)] for r in range(4)])
            return jnp.stack([jnp.stack(row, -1) for row in keep], 1)
        s = jnp.transpose(c, (1, 3, 0, 2)).reshape(m, m, group * cols)
        keep = _solve_tiles(s, n=n, m=m, method=method, repair=repair,
                            swap_rounds=swap_rounds, eps_rel=eps_rel)
        return jnp.transpose(keep.reshape(m, m, group, cols), (2, 0, 3, 1))

    keep = chunk(x[0]) if rows == group else jax.lax.map(chunk, x)
    return jnp.moveaxis(keep.reshape(moved), (-2, -1), axes)


def _solve_tiles(s, *, n, m, method, repair, swap_rounds, eps_rel):
    """``s: (m, m, T)`` -> kept ``(m, m, T)``."""
    s = jax.lax.cond(jnp.isfinite(s).all(), lambda s: s, lambda s: _finite_tiles(s, n, m), s)
    if method == "exact":
        x = _exact_tiles(s, n, m, eps_rel)
    else:
        x = _greedy_tiles(s, n, m)
        if repair:
            x = _fill_tiles(s, x, n, m)
            x = _swap_tiles(s, x, m, swap_rounds, eps_rel)
    return x


def _resolve_method(method: str, n: int, m: int) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        if (n, m) == (2, 4):
            return "exact24"
        if m > MAX_M:
            raise ValueError(
                f"method='auto' has no JAX solver for m={m} > {MAX_M}; pass method='lp'"
            )
        return "exact"
    if method == "exact24" and (n, m) != (2, 4):
        raise ValueError(f"method='exact24' solves 2:4 only, got n={n}, m={m}; use 'exact'")
    if method in ("greedy", "exact") and m > MAX_M:
        raise ValueError(f"m must be <= {MAX_M} for method={method!r}, got m={m}; use 'lp'")
    return method


def transposable_mask(
    scores: Any,
    n: int,
    m: int,
    *,
    method: str = "auto",
    axes: tuple[int, int] = (-2, -1),
    nan: str = "smallest",
    repair: bool = False,
    swap_rounds: int = 64,
    eps_rel: float | None = None,
    batch_tiles: int = 4096,
) -> Any:
    """Transposable N:M mask: ``n`` kept per row and per column of every ``m x m`` tile.

    Tiles are the aligned blocks ``[i*m:(i+1)*m, j*m:(j+1)*m]`` over ``axes`` (default the
    last two: ``(in, out)`` of a Dense kernel); every other axis is a batch axis (an
    ``HWIO`` conv kernel uses ``axes=(2, 3)``). Both ``mask`` and ``mask.T`` are then N:M
    along their contraction axes (DESIGN §2), so the forward and the input-gradient
    products can both run on sparse tensor cores.

    Example::

      w = jax.random.normal(key, (768, 3072))                 # Dense kernel (in, out)
      mask = transposable_mask(jnp.abs(w), 2, 4)              # exact 2:4 (method="exact24")
      mask = transposable_mask(jnp.abs(w), 4, 8)              # exact 4:8 (method="exact")
      assert is_transposable(mask, 4, 8, exact=True)

    Methods (the objective is the sum of kept scores in each tile):

    * ``"exact24"``: 2:4 only. Scores all 90 valid ``4 x 4`` tiles and keeps the best
      (ties: the first in a fixed pattern order). Exactly N; optimal. Jit-able.
    * ``"exact"``: any N:M with ``m <= 16``. A min-cost-flow solver (successive shortest
      paths with Bellman-Ford) batched over all tiles. Exactly N; optimal up to a float
      tolerance of ``eps_rel * max|score|`` per tile and path step (``eps_rel`` defaults to
      ``4 m`` machine epsilons: about ``4e-6`` for float32 at m=8). Jit-able.
    * ``"greedy"``: ``m <= 16``. Hubara et al.'s greedy b-matching: entries in decreasing
      score (ties: lower row-major index first), kept while their row and column both hold
      fewer than ``n``. **At most N**: a row or column may be left short, but only where
      every free entry of it meets a full column or row (the mask is maximal). Keeps at
      least half the optimum. With ``repair=True`` short rows and columns are filled to
      **exactly N** (best free entry, or a 3-edge augmenting path), then improving 2-swaps
      run until none is left (at most ``swap_rounds`` rounds). Jit-able.
    * ``"lp"``: any N:M, offline: :func:`transposable_mask_lp` (scipy's HiGHS; numpy in
      and out; not jit-able). Exactly N; optimal.
    * ``"auto"`` (default): ``"exact24"`` for 2:4, ``"exact"`` otherwise (the fastest
      exact method of each case), ``"lp"`` required for ``m > 16``.

    Args:
      scores: real array of rank >= 2, e.g. ``jnp.abs(w)``; both ``axes`` divisible by
        ``m``. Integer scores are solved in float32.
      n, m: the pattern, ``1 <= n <= m``.
      method: see above.
      axes: the two axes forming the tiles: tile rows run along ``axes[0]`` (the
        contraction axis), tile columns along ``axes[1]``.
      nan: ``"smallest"`` (default): NaN and ``-inf`` rank below every number (kept only
        where a row or column has too few others), ``+inf`` above. ``"raise"``:
        ValueError if concrete scores hold NaN (refuses traced scores).
      repair: ``"greedy"`` only: fill then 2-swap (see above).
      swap_rounds: ``"greedy"`` with ``repair`` only: the cap on 2-swap rounds.
      eps_rel: tolerance of the ``"exact"`` solver and of the improving-swap test.
      batch_tiles: ``"lp"`` only: tiles per LP.

    Returns:
      Boolean array of ``scores.shape`` (a numpy array for ``"lp"``). Deterministic:
      equal inputs give equal masks; among tied optima the choice is fixed but unspecified.

    Raises:
      TypeError: boolean/complex scores, non-integer ``n``/``m``, bad ``axes``.
      ValueError: ``n > m``, ``n < 1``, an axis not divisible by ``m``, ``m > 16`` for a
        JAX method, ``"exact24"`` with another pattern, an unknown method, NaN with
        ``nan="raise"``.
      ImportError: ``"lp"`` without scipy.
    """
    n, m = _checks.check_nm(n, m)
    method = _resolve_method(method, n, m)
    if method == "lp":
        return transposable_mask_lp(scores, n, m, axes=axes, nan=nan, batch_tiles=batch_tiles)
    scores, a0, a1 = _check_tiled_scores(scores, m, axes, nan)
    if isinstance(swap_rounds, bool) or not isinstance(swap_rounds, int) or swap_rounds < 0:
        raise ValueError(f"swap_rounds must be an int >= 0, got {swap_rounds!r}")
    if repair and method != "greedy":
        raise ValueError(f"repair=True applies to method='greedy' only, got method={method!r}")
    if eps_rel is not None and not (isinstance(eps_rel, float) and 0 <= eps_rel < 1):
        raise ValueError(f"eps_rel must be a float in [0, 1) or None, got {eps_rel!r}")
    scores = jax.lax.stop_gradient(scores)
    if scores.size == 0:
        return jnp.zeros(scores.shape, bool)
    return _solve(
        scores, axes=(a0, a1), n=n, m=m, method=method, repair=bool(repair),
        swap_rounds=swap_rounds, eps_rel=eps_rel,
    )


# ----------------------------------------------------------------------------- LP (scipy)


def _import_linprog():
    try:
        from scipy.optimize import linprog
        from scipy.sparse import coo_matrix
    except ImportError as e:  # pragma: no cover - scipy is installed in dev
        raise ImportError(
            "method='lp' needs scipy (HiGHS); install the extra: pip install nmjax[exact]"
        ) from e
    return linprog, coo_matrix


@functools.cache
def _lp_constraints(b: int, m: int):
    """Equality constraints for ``b`` tiles: one row per tile row and per tile column."""
    _, coo_matrix = _import_linprog()
    var = np.arange(b * m * m).reshape(b, m, m)
    row_con = np.arange(b * m).reshape(b, m)[:, :, None].repeat(m, 2)  # [t, r, c] -> t*m + r
    col_con = (b * m + np.arange(b * m).reshape(b, m))[:, None, :].repeat(m, 1)
    rows = np.concatenate([row_con.ravel(), col_con.ravel()])
    cols = np.concatenate([var.ravel(), var.ravel()])
    data = np.ones(rows.size)
    return coo_matrix((data, (rows, cols)), shape=(2 * b * m, b * m * m)).tocsr()


def _lp_tiles(s: np.ndarray, n: int, m: int) -> np.ndarray:
    linprog, _ = _import_linprog()
    b = s.shape[0]
    a_eq = _lp_constraints(b, m)
    b_eq = np.full(2 * b * m, float(n))
    # dual simplex returns a vertex; the constraint matrix is totally unimodular.
    res = linprog(-s.ravel(), A_eq=a_eq, b_eq=b_eq, bounds=(0, 1), method="highs-ds")
    if res.status != 0:
        raise RuntimeError(f"HiGHS failed on a batch of {b} tiles: {res.message}")
    x = res.x.reshape(b, m, m)
    if np.abs(x - np.round(x)).max() > 1e-6:
        raise RuntimeError("HiGHS returned a fractional vertex; please report this input")
    return x > 0.5


def transposable_mask_lp(
    scores: Any,
    n: int,
    m: int,
    *,
    axes: tuple[int, int] = (-2, -1),
    nan: str = "smallest",
    batch_tiles: int = 4096,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Exact transposable N:M mask from the linear programme, solved offline by HiGHS.

    Per tile the LP ``max Σ s·x`` subject to ``n`` per row and per column and
    ``0 <= x <= 1`` has a totally unimodular constraint matrix, so the dual simplex returns
    an integral, optimal, **exactly-N** mask. Tiles are solved ``batch_tiles`` at a time
    (one block-diagonal LP per batch). Slow (3072 tiles of 8 x 8 took 4.5 s on the shared
    2-core CPU); use it as the reference for the JAX solvers, or offline. Needs the ``exact`` extra
    (``pip install nmjax[exact]``).

    Example::

      mask = transposable_mask_lp(np.abs(w), 4, 8)    # numpy bool (in, out)

    Args:
      scores: real array-like of rank >= 2 (numpy or JAX, concrete); both ``axes``
        divisible by ``m``. Any ``m`` works.
      n, m: the pattern, ``1 <= n <= m``.
      axes: the tile axes, as in :func:`transposable_mask`.
      nan: ``"smallest"`` (NaN/``-inf`` below every number, ``+inf`` above) or
        ``"raise"``.
      batch_tiles: tiles per LP (memory grows linearly with it).
      progress: optional ``fn(done_tiles, total_tiles)`` called after each batch.

    Returns:
      numpy boolean array of ``scores.shape``.

    Raises:
      ImportError: scipy is missing (names ``pip install nmjax[exact]``).
      TypeError / ValueError: as :func:`transposable_mask`; traced scores.
    """
    n, m = _checks.check_nm(n, m)
    if isinstance(scores, jax.core.Tracer):
        raise ValueError("method='lp' runs on the host and needs concrete scores, not traced "
                         "ones (inside jit/vmap/grad); use method='exact' there")
    _import_linprog()
    scores, a0, a1 = _check_tiled_scores(scores, m, axes, nan)
    if isinstance(batch_tiles, bool) or not isinstance(batch_tiles, int) or batch_tiles < 1:
        raise ValueError(f"batch_tiles must be an int >= 1, got {batch_tiles!r}")
    tiles, moved = _to_tiles(scores.astype(_work_dtype(scores.dtype)), (a0, a1), m)
    tiles = np.asarray(_finite_tiles(tiles, n, m), np.float64).transpose(2, 0, 1)
    total = tiles.shape[0]
    out = np.zeros(tiles.shape, bool)
    for start in range(0, total, batch_tiles):
        stop = min(start + batch_tiles, total)
        out[start:stop] = _lp_tiles(tiles[start:stop], n, m)
        if progress is not None:
            progress(stop, total)
    return _from_tiles(out.transpose(1, 2, 0), moved, (a0, a1), m, xp=np)


def build_masks_lp(
    params: Any, rule: Any, *, progress: bool = True, file: TextIO | None = None
) -> Any:
    """``nmjax.tree.build_masks`` for a ``"transposable"`` rule, solved offline by the LP.

    Walks the selected leaves of ``params`` one by one, solving each with
    :func:`transposable_mask_lp` (tiles over the leaf's contraction axis and its last
    axis, as the ``"transposable"`` pattern does), and prints a progress bar over the
    leaves (and the tiles of the current leaf) to ``file`` (default ``sys.stderr``).

    Example::

      rule = MaskRule(4, 8, pattern="transposable", exclude=r"head")
      masks = build_masks_lp(params, rule)        # numpy masks; None at dense leaves

    Args:
      params: parameter pytree (concrete arrays).
      rule: an ``nmjax.tree.MaskRule`` with ``pattern="transposable"``; its
        ``score_fn`` and ``pattern_kwargs`` (``nan``, ``batch_tiles``) apply.
      progress: print the progress bar.
      file: stream for the bar.

    Returns:
      A pytree of ``params``' structure with a numpy boolean mask at each selected leaf and
      ``None`` elsewhere.
    """
    from nmjax.tree import path_str

    if getattr(rule, "pattern", None) != "transposable":
        raise ValueError(f"build_masks_lp needs a MaskRule with pattern='transposable', "
                         f"got {getattr(rule, 'pattern', rule)!r}")
    # The LP's own options; the JAX methods' options (repair, eps_rel, ...) do not apply.
    kwargs = {k: v for k, v in dict(rule.pattern_kwargs).items() if k in ("nan", "batch_tiles")}
    if dict(rule.pattern_kwargs).get("method", "lp") not in ("lp", "auto"):
        raise ValueError("build_masks_lp solves with the LP; drop 'method' from pattern_kwargs")
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    chosen = []
    for key_path, leaf in leaves:
        path = path_str(key_path)
        axis = rule.select(path, leaf)
        if axis is not None:
            chosen.append(path)
    stream = file if file is not None else sys.stderr
    t0 = time.perf_counter()
    done = 0

    def bar(path: str, tiles_done: int, tiles_total: int) -> None:
        width = 24
        filled = int(width * done / max(len(chosen), 1))
        stream.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] leaf {done + 1}/{len(chosen)} "
            f"{path} tiles {tiles_done}/{tiles_total} {time.perf_counter() - t0:.1f}s"
        )
        stream.flush()

    def one(key_path, leaf):
        nonlocal done
        path = path_str(key_path)
        axis = rule.select(path, leaf)
        if axis is None:
            return None
        leaf = np.asarray(leaf)
        report = (lambda a, b: bar(path, a, b)) if progress else None
        mask = transposable_mask_lp(
            np.asarray(rule.score_fn(leaf)), rule.n, rule.m, axes=(axis, leaf.ndim - 1),
            progress=report, **kwargs,
        )
        done += 1
        return mask

    masks = jax.tree_util.tree_map_with_path(one, params)
    if progress and chosen:
        stream.write(f"\n{len(chosen)} leaves solved in {time.perf_counter() - t0:.1f}s\n")
        stream.flush()
    return masks
