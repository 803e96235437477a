"""Mask diversity (Hubara et al., 2021): how many masks a sparsity structure allows."""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from nmjax import _checks

KINDS = ("unstructured", "nm", "transposable")


@functools.cache
def _count_regular(n: int, m: int) -> int:
    """Forward dynamic programme over rows for K(m, n).

    State: ``c[k]`` = number of columns already holding ``k`` ones (columns are
    interchangeable except for their sums). A row places its ``n`` ones class by class,
    from the fullest class down, so a column moved up within a row is not picked twice;
    states with a column that the remaining rows can no longer fill are dropped.
    """
    states = {(m,) + (0,) * n: 1}
    for row in range(m):
        layer = {(c, n): count for c, count in states.items()}
        for k in range(n - 1, -1, -1):
            nxt: dict = defaultdict(int)
            for (c, left), count in layer.items():
                xs = [left] if k == 0 else range(min(left, c[k]) + 1)
                for x in xs:
                    if x > c[k]:
                        continue
                    c2 = list(c)
                    c2[k] -= x
                    c2[k + 1] += x
                    nxt[(tuple(c2), left - x)] += count * math.comb(c[k], x)
            layer = nxt
        rows_left = m - row - 1
        states = defaultdict(int)
        for (c, left), count in layer.items():
            if left == 0 and not any(c[: max(0, n - rows_left)]):
                states[c] += count
    return states.get((0,) * n + (m,), 0)


def transposable_count(n: int, m: int) -> int:
    """K(M, N): the number of ``m × m`` 0/1 matrices with exactly ``n`` ones per row and column.

    Exact integer arithmetic (a dynamic programme over rows whose state is the multiset of
    column sums; ``K(m, n) = K(m, m - n)`` by complement). ``transposable_count(2, 4) == 90``;
    ``transposable_count(4, 8) == 116963796250``. The result is cached; 8:16, the hardest
    case up to m = 16, takes about 10 s on one CPU core the first time. ``m`` is capped at
    16 (the largest tile the solvers take): the state space grows too fast beyond it
    (10:20 did not finish in a minute).

    Raises:
      ValueError: ``m > 16`` (or an invalid pattern).

    Args:
      n, m: ``1 <= n <= m``.

    Returns:
      Python ``int``.
    """
    n, m = _checks.check_nm(n, m, max_m=_checks.MAX_M)
    return _count_regular(min(n, m - n) if n < m else n, m)


def _log10_comb(total: int, k: int) -> float:
    if total <= 100_000:
        return math.log10(math.comb(total, k))
    lg = math.lgamma(total + 1) - math.lgamma(k + 1) - math.lgamma(total - k + 1)
    return lg / math.log(10)


def log10_mask_diversity(
    kind: str, shape: int | Sequence[int], n: int, m: int, *, axis: int = 0,
    axes: tuple[int, int] = (-2, -1),
) -> float:
    """log10 of the number of masks a structure allows on a weight of ``shape``.

    * ``"unstructured"``: any mask of the same density: ``C(T, T·n/m)``.
    * ``"nm"``: N:M with exactly ``n`` per group along one axis: ``C(m, n)^(T/m)``.
    * ``"transposable"``: exactly ``n`` per row and column of each ``m × m`` tile over
      ``axes``: ``K(m, n)^(T/m²)``.

    ``T`` is the number of weights. Counts are exact integers (for ``T <= 100000``
    unstructured counts too); the log is taken at the end, so the only error is the
    float's own rounding (large unstructured counts use ``lgamma``, relative error ~1e-15).

    Args:
      kind: one of ``"unstructured"``, ``"nm"``, ``"transposable"``.
      shape: weight shape (an int is a 1-D shape); the grouped axes must be divisible by
        ``m`` (``axis`` for ``"nm"``, both ``axes`` for ``"transposable"``, the total size
        for ``"unstructured"``).
      n, m: the pattern, ``1 <= n <= m``.
      axis: the grouped axis for ``"nm"``.
      axes: tile axes for ``"transposable"``.

    Returns:
      ``float``: log10 of the count.
    """
    n, m = _checks.check_nm(n, m)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    shape = _check_shape(shape)
    total = math.prod(shape)
    if kind == "transposable":
        if len(shape) < 2:
            raise ValueError(f"shape must have rank >= 2 for 'transposable', got {shape}")
        for a in _checks.check_axes_pair(axes, len(shape)):
            _checks.check_divisible(shape, a, m, "shape")
        return (total // (m * m)) * math.log10(transposable_count(n, m))
    if kind == "nm":
        _checks.check_divisible(shape, _checks.check_axis(axis, len(shape)), m, "shape")
        return (total // m) * math.log10(math.comb(m, n))
    if total % m:
        raise ValueError(f"shape {shape} has {total} entries, not divisible by m={m}")
    return _log10_comb(total, total // m * n)


def _check_shape(shape: Any) -> tuple[int, ...]:
    if isinstance(shape, int | np.integer) and not isinstance(shape, bool):
        shape = (shape,)
    if isinstance(shape, str) or not isinstance(shape, Sequence):
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}")
    for s in shape:
        if isinstance(s, bool) or not isinstance(s, int | np.integer):
            raise TypeError(f"shape entries must be ints, got {s!r} in shape={tuple(shape)!r}")
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"shape must be non-empty with positive sizes, got {shape}")
    return shape
