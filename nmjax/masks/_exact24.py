"""Exact transposable 2:4 by enumeration: the best of the 90 valid ``4 x 4`` tiles."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

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
    """Index tables for :func:`exact24`: row-pair combinations (``h0, h1``), each pattern as
    a top and a bottom combination, and each pattern as a 16-bit code of its kept entries."""
    pats = _patterns24()
    halves = sorted({p[:2] for p in pats})
    index = {h: i for i, h in enumerate(halves)}
    h0, h1 = np.array(halves).T
    top = np.array([index[p[:2]] for p in pats])
    bottom = np.array([index[p[2:]] for p in pats])
    codes = np.array(
        [sum(1 << (4 * r + c) for r in range(4) for c in _PAIRS[p[r]]) for p in pats], np.int32
    )
    return h0, h1, top, bottom, codes


def exact24(entry: list[list[jax.Array]]) -> list[list[jax.Array]]:
    """Exact 2:4: the best of the 90 valid tiles, by enumeration, for many tiles at once.

    ``entry[r][c]`` holds score ``(r, c)`` of every tile (arrays of one shape, one value per
    tile, finite and small enough that sums of 8 cannot overflow); returns the kept flags in
    the same form. Sums each row's 6 pairs, the top and the bottom row pairs' 36
    combinations, then the 90 valid tiles (one addition each), and takes the first maximum
    (ties: the first tile in lexicographic order of its rows' pairs).
    """
    h0, h1, top, bottom, codes = _tables24()
    pair = jnp.stack([jnp.stack([entry[r][a] + entry[r][b] for a, b in _PAIRS])
                      for r in range(4)])  # (4, 6, ...)
    up = pair[0, h0] + pair[1, h1]  # (36, ...)
    down = pair[2, h0] + pair[3, h1]
    total = up[top] + down[bottom]  # (90, ...)
    index = jnp.arange(90).reshape((90,) + (1,) * (total.ndim - 1))
    best = jnp.min(jnp.where(total == total.max(0), index, 90), 0)
    code = jnp.asarray(codes)[best]
    return [[((code >> (4 * r + c)) & 1).astype(bool) for c in range(4)] for r in range(4)]
