"""Group and tile reshapes shared by the masks, the packed format and the kernels.

* groups: ``m`` consecutive entries along one axis, moved last: ``(rest..., K // m, m)``;
* tiles: the aligned ``m x m`` blocks over two axes, "tiles last": ``(m, m, T)``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def to_groups(x: Any, axis: int, m: int, xp=jnp) -> Any:
    """``(..., K, ...)`` with ``K`` along ``axis`` -> ``(rest..., K // m, m)``, groups last."""
    x = xp.moveaxis(x, axis, -1)
    return x.reshape(*x.shape[:-1], x.shape[-1] // m, m)


def from_groups(g: Any, axis: int, xp=jnp) -> Any:
    """Inverse of :func:`to_groups`."""
    x = g.reshape(*g.shape[:-2], g.shape[-2] * g.shape[-1])
    return xp.moveaxis(x, -1, axis)


def to_tiles(x: Any, axes: tuple[int, int], m: int, xp=jnp) -> tuple[Any, tuple[int, ...]]:
    """``x`` -> ``(m, m, T)`` tiles: ``[r, c, t]`` with tile rows along ``axes[0]`` and tile
    columns along ``axes[1]``; one transpose.

    Returns the tiles and the moved shape :func:`from_tiles` needs.
    """
    x = xp.moveaxis(x, axes, (-2, -1))
    moved = x.shape
    batch = len(moved) - 2
    x = x.reshape(*moved[:-2], moved[-2] // m, m, moved[-1] // m, m)
    order = (batch + 1, batch + 3, *range(batch), batch, batch + 2)
    return xp.transpose(x, order).reshape(m, m, -1), moved


def from_tiles(tiles: Any, moved: tuple[int, ...], axes: tuple[int, int], m: int,
               xp=jnp) -> Any:
    """Inverse of :func:`to_tiles`."""
    batch = len(moved) - 2
    x = tiles.reshape(m, m, *moved[:-2], moved[-2] // m, moved[-1] // m)
    # axes of x: r, c, batch..., R/m, C/m  ->  batch..., R/m, r, C/m, c
    order = (*range(2, 2 + batch), 2 + batch, 0, 3 + batch, 1)
    x = xp.transpose(x, order).reshape(moved)
    return xp.moveaxis(x, (-2, -1), axes)
