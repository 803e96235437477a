"""N:M masks along one axis, and validators for N:M and transposable N:M masks."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from nmjax import _checks


def _to_groups(x: jax.Array, axis: int, m: int) -> jax.Array:
    """(..., K, ...) with K along ``axis`` -> (rest..., K // m, m), groups last."""
    x = jnp.moveaxis(x, axis, -1)
    return x.reshape(*x.shape[:-1], x.shape[-1] // m, m)


def _from_groups(g: jax.Array, axis: int) -> jax.Array:
    """Inverse of :func:`_to_groups`."""
    x = g.reshape(*g.shape[:-2], g.shape[-2] * g.shape[-1])
    return jnp.moveaxis(x, -1, axis)


def group_rank(groups: jax.Array) -> jax.Array:
    """Rank of each entry within its group (last axis), 0 = largest.

    Ties go to the lower index; NaN ranks below every number (``-inf`` included).
    Exact and branch-free: each entry counts the entries that beat it (O(M²) per group,
    which for M ≤ 32 is cheaper than a sort and vectorises over all groups).

    Args:
      groups: ``(..., M)`` real scores.

    Returns:
      ``(..., M)`` int32 ranks, a permutation of ``0..M-1`` in every group.
    """
    m = groups.shape[-1]
    if jnp.issubdtype(groups.dtype, jnp.floating):
        nan = jnp.isnan(groups)
        val = jnp.where(nan, jnp.zeros((), groups.dtype), groups)
    else:
        nan = jnp.zeros(groups.shape, bool)
        val = groups
    vi, vj = val[..., :, None], val[..., None, :]
    ni, nj = nan[..., :, None], nan[..., None, :]
    lower = jnp.arange(m)[None, :] < jnp.arange(m)[:, None]  # [i, j]: j < i
    beats = (ni & ~nj) | ((ni == nj) & ((vj > vi) | ((vj == vi) & lower)))
    return beats.sum(-1, dtype=jnp.int32)


def nm_mask(scores: Any, n: int, m: int, axis: int = 0, *, nan: str = "smallest") -> jax.Array:
    """Keeps the ``n`` largest scores in every group of ``m`` consecutive entries along ``axis``.

    For a Flax ``Dense`` kernel ``w: (in, out)`` the product ``x @ w`` contracts over axis 0,
    so the default ``axis=0`` makes the forward product N:M sparse (DESIGN §2). For a conv
    kernel ``HWIO`` pass ``axis=2`` (the ``I`` axis).

    Example::

      w = jax.random.normal(key, (768, 3072))
      mask = nm_mask(jnp.abs(w), 2, 4)          # (768, 3072) bool, 2 of every 4 along axis 0
      sparse_w = jnp.where(mask, w, 0)

    Args:
      scores: real array of any rank, e.g. ``jnp.abs(w)`` (magnitude pruning); integer or
        floating dtype. ``scores.shape[axis]`` must be divisible by ``m``.
      n: entries kept per group, ``1 <= n <= m``.
      m: group size.
      axis: the axis the groups run along (default 0, the contraction axis of a Dense kernel).
      nan: ``"smallest"`` (default) ranks NaN below every number, so NaN entries are
        pruned first and kept only when a group has fewer than ``n`` numbers; ``+inf`` is
        the largest score and ``-inf`` the smallest number. ``"raise"`` raises ValueError
        if concrete scores hold NaN (and refuses traced scores, which cannot be checked).

    Returns:
      Boolean array of ``scores.shape`` with exactly ``n`` True in every group. Ties are
      broken by the lower index, so the result is deterministic. Works under ``jit``,
      ``vmap`` and ``grad`` (the mask carries no gradient).

    Raises:
      TypeError: boolean/complex scores, non-integer ``n``/``m``/``axis``.
      ValueError: ``n > m``, ``n < 1``, axis out of range, axis length not divisible by ``m``.
    """
    n, m = _checks.check_nm(n, m)
    scores = _checks.check_scores(scores)
    if scores.ndim == 0:
        raise ValueError("scores must have at least one axis, got a scalar")
    axis = _checks.check_axis(axis, scores.ndim)
    _checks.check_divisible(scores.shape, axis, m)
    if _checks.check_nan_policy(nan) == "raise":
        _checks.raise_on_nan(scores)
    return _nm_mask(jax.lax.stop_gradient(scores), n, m, axis)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _nm_mask(scores: jax.Array, n: int, m: int, axis: int) -> jax.Array:
    # One compiled program per (shape, dtype, n, m, axis), also when called eagerly.
    return _from_groups(group_rank(_to_groups(scores, axis, m)) < n, axis)


def _group_counts(mask: jax.Array, axis: int, m: int) -> jax.Array:
    return _to_groups(mask, axis, m).sum(-1, dtype=jnp.int32)


def _check_mask_args(mask, n, m, name="mask"):
    n, m = _checks.check_nm(n, m)
    mask = _checks.check_mask(mask, name)
    if mask.ndim == 0:
        raise ValueError(f"{name} must have at least one axis, got a scalar")
    return mask, n, m


def is_nm(mask: Any, n: int, m: int, axis: int = 0, *, exact: bool = False) -> jax.Array:
    """Whether ``mask`` keeps at most ``n`` (``exact``: exactly ``n``) of each ``m`` along ``axis``.

    "At most N" is what sparse tensor cores need; "exactly N" is the definition used by
    mask diversity and by :func:`nm_mask`'s output.

    Args:
      mask: boolean array; ``mask.shape[axis]`` must be divisible by ``m``.
      n, m: the N:M pattern.
      axis: the axis the groups run along (default 0).
      exact: require exactly ``n`` kept entries per group.

    Returns:
      A JAX boolean scalar (use ``bool(...)`` outside ``jit``).
    """
    mask, n, m = _check_mask_args(mask, n, m)
    axis = _checks.check_axis(axis, mask.ndim)
    _checks.check_divisible(mask.shape, axis, m, "mask")
    return _is_nm(mask, n, m, axis, exact)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _is_nm(mask: jax.Array, n: int, m: int, axis: int, exact: bool) -> jax.Array:
    counts = _group_counts(mask, axis, m)
    return jnp.all(counts == n) if exact else jnp.all(counts <= n)


def is_transposable(
    mask: Any, n: int, m: int, *, axes: tuple[int, int] = (-2, -1), exact: bool = False
) -> jax.Array:
    """Whether ``mask`` is N:M along both of ``axes``, tile by tile.

    A transposable N:M mask of ``w: (in, out)`` has, in every aligned ``m × m`` tile
    ``w[i*m:(i+1)*m, j*m:(j+1)*m]``, at most ``n`` (``exact``: exactly ``n``) kept entries
    in each row and each column, so both ``w`` and ``w.T`` are N:M along their
    contraction axes. Leading axes (e.g. ``H, W`` of an ``HWIO`` conv kernel) are batch.

    Args:
      mask: boolean array of rank >= 2; both ``axes`` divisible by ``m``.
      n, m: the N:M pattern.
      axes: the two axes forming the tiles (default the last two: ``(in, out)``).
      exact: require exactly ``n`` per tile row and column.

    Returns:
      A JAX boolean scalar.
    """
    mask, n, m = _check_mask_args(mask, n, m)
    if mask.ndim < 2:
        raise ValueError(f"mask must have rank >= 2 for a transposable check, got {mask.shape}")
    if not isinstance(axes, tuple | list) or len(axes) != 2:
        raise TypeError(f"axes must be a pair of ints, got {axes!r}")
    a0 = _checks.check_axis(axes[0], mask.ndim, "axes[0]")
    a1 = _checks.check_axis(axes[1], mask.ndim, "axes[1]")
    if a0 == a1:
        raise ValueError(f"axes must name two different axes, got {axes}")
    for a in (a0, a1):
        _checks.check_divisible(mask.shape, a, m, "mask")
    return _is_nm(mask, n, m, a0, exact) & _is_nm(mask, n, m, a1, exact)
