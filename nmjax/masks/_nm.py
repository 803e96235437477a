"""N:M masks along one axis, and validators for N:M and transposable N:M masks."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from nmjax import _checks
from nmjax._layout import to_groups

# Up to this group size the rank is an O(M²) comparison count (no sort; vectorises over
# all groups); above it a stable sort, O(M log M) time and O(M) memory per group.
_COUNT_RANK_MAX_M = 32


def _rank_keys(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(nan, value)``: NaN flags and the values with NaN replaced (for comparisons)."""
    if jnp.issubdtype(x.dtype, jnp.floating):
        nan = jnp.isnan(x)
        return nan, jnp.where(nan, jnp.zeros((), x.dtype), x)
    return jnp.zeros(x.shape, bool), x


def group_rank(groups: jax.Array, axis: int = -1) -> jax.Array:
    """Rank of each entry within its group of ``M`` along ``axis``, 0 = largest.

    Ties go to the lower index; NaN ranks below every number (``-inf`` included). Small
    groups (M ≤ 32) count, for each entry, the entries that beat it, in place along
    ``axis`` (no transpose: the minor axis stays minor, which is what vectorises on a CPU);
    larger ones sort.

    Args:
      groups: real scores; ``groups.shape[axis] = M``.
      axis: the group axis.

    Returns:
      int32 ranks of ``groups.shape``, a permutation of ``0..M-1`` along ``axis``.
    """
    axis = axis % groups.ndim
    m = groups.shape[axis]
    nan, val = _rank_keys(groups)
    if m > _COUNT_RANK_MAX_M:
        # Sort keys: NaN last, then larger first (``~v`` for integers: no overflow), then
        # the lower index first; the rank is the inverse of the sorted order.
        neg = ~val if jnp.issubdtype(val.dtype, jnp.integer) else -val
        iota = jax.lax.broadcasted_iota(jnp.int32, groups.shape, axis)
        order = jax.lax.sort((nan.astype(jnp.int8), neg, iota), dimension=axis, num_keys=3)[2]
        return jnp.argsort(order, axis=axis).astype(jnp.int32)
    # [..., i, j, ...]: entry j of the group beats entry i.
    vi, vj = jnp.expand_dims(val, axis + 1), jnp.expand_dims(val, axis)
    ni, nj = jnp.expand_dims(nan, axis + 1), jnp.expand_dims(nan, axis)
    shape = [1] * (groups.ndim + 1)
    shape[axis], shape[axis + 1] = m, m
    lower = (jnp.arange(m)[None, :] < jnp.arange(m)[:, None]).reshape(shape)  # j < i
    beats = (ni & ~nj) | ((ni == nj) & ((vj > vi) | ((vj == vi) & lower)))
    return beats.sum(axis + 1, dtype=jnp.int32)


def nm_mask(scores: Any, n: int, m: int, axis: int = 0, *, nan: str = "smallest") -> jax.Array:
    """Keeps the ``n`` largest scores in every group of ``m`` consecutive entries along ``axis``.

    For a Flax ``Dense`` kernel ``w: (in, out)`` the product ``x @ w`` contracts over axis 0,
    so the default ``axis=0`` makes the forward product N:M sparse (``docs/design.md``,
    *Axis contract*). For a conv
    kernel ``HWIO`` pass ``axis=2`` (the ``I`` axis).

    Example:

    >>> import jax, jax.numpy as jnp
    >>> from nmjax.masks import nm_mask
    >>> w = jnp.array([[0.1, -2.0], [3.0, 0.5], [-0.2, 0.0], [1.0, 4.0]])  # (in=4, out=2)
    >>> nm_mask(jnp.abs(w), 2, 4)                  # 2 of every 4 along axis 0 (in)
    Array([[False,  True],
           [ True, False],
           [False, False],
           [ True,  True]], dtype=bool)

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
      ValueError: ``n > m``, ``n < 1``, axis out of range, axis length not divisible by
        ``m``, host integer scores outside int32 while JAX's x64 mode is off (float64 host
        scores that tie only in float32 give a warning).
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
    # One compiled program per (shape, dtype, n, m, axis), also when called eagerly. The
    # groups stay in place: (pre, K / m, m, post), ranked along the m axis.
    shape = scores.shape
    pre, post = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
    groups = scores.reshape(pre, shape[axis] // m, m, post)
    return (group_rank(groups, axis=2) < n).reshape(shape)


def _group_counts(mask: jax.Array, axis: int, m: int) -> jax.Array:
    return to_groups(mask, axis, m).sum(-1, dtype=jnp.int32)


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
    a0, a1 = _checks.check_axes_pair(axes, mask.ndim)
    for a in (a0, a1):
        _checks.check_divisible(mask.shape, a, m, "mask")
    return _is_nm(mask, n, m, a0, exact) & _is_nm(mask, n, m, a1, exact)


def is_permutation(perm: Any) -> jax.Array:
    """Whether ``perm: (K,)`` holds every index ``0..K-1`` once; a JAX boolean scalar.

    Jit-able, so it checks traced permutations too (which :func:`nmjax.ops.nm_dense` cannot:
    an invalid traced ``perm`` gives a wrong input gradient silently). Call it where
    permutations are made, e.g. with ``jax.experimental.checkify`` or at a mask refresh.

    >>> import jax.numpy as jnp
    >>> bool(is_permutation(jnp.array([2, 0, 1]))), bool(is_permutation(jnp.array([0, 0, 1])))
    (True, False)
    """
    perm = _checks._as_array(perm, "perm")
    if perm.dtype == jnp.bool_ or not jnp.issubdtype(perm.dtype, jnp.integer):
        raise TypeError(f"perm must be an integer index array, got dtype {perm.dtype}")
    if perm.ndim != 1:
        raise ValueError(f"perm must have shape (K,), got shape {tuple(perm.shape)}")
    return _is_permutation(jnp.asarray(perm))


@jax.jit
def _is_permutation(perm: jax.Array) -> jax.Array:
    size = perm.shape[0]
    inside = (perm >= 0) & (perm < size)
    seen = jnp.zeros(size, jnp.int32).at[jnp.where(inside, perm, 0)].add(inside)
    return inside.all() & (seen == 1).all()
