"""Transposable N:M masks: the public dispatcher over the per-solver modules.

A transposable N:M mask of a Dense kernel ``w: (in, out)`` makes both ``w`` (forward,
contraction over axis 0) and ``w.T`` (input gradient, contraction over axis 1) N:M sparse
(DESIGN §2-3). Tiles are the aligned ``m x m`` blocks over two named ``axes``; every other
axis is a batch axis. Solvers: ``_exact24`` (all 90 valid 2:4 tiles scored at once),
``_greedy`` (Hubara et al.'s greedy b-matching, optional repair), ``_exact`` (a min-cost-flow
solver batched over all tiles in JAX) and ``_lp`` (scipy's HiGHS, offline).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nmjax import _checks
from nmjax._checks import MAX_M
from nmjax.masks import _exact, _exact24, _greedy

METHODS = ("auto", "exact24", "greedy", "exact", "lp")
# Tiles per chunk (at most, when the tile rows allow): small enough for the cache, large
# enough that the per-chunk loop overhead is negligible.
_CHUNK_TILES = {"exact24": 8192, "exact": 16384, "greedy": 8192}


def check_tiled_scores(scores: Any, m: int, axes: Any, nan: str, *, host: bool = False):
    """Validates scores tiled over ``axes``; returns ``(scores, a0, a1)``.

    ``host=True`` keeps the scores as a numpy array of their own dtype (the LP solves in
    float64, so float64 scores beyond the float32 range must not pass through JAX).
    """
    if host:
        scores = np.asarray(scores)
        _checks.check_scores(np.zeros((), scores.dtype))
    else:
        scores = _checks.check_scores(scores)
    if scores.ndim < 2:
        raise ValueError(
            f"scores must have rank >= 2 to form m x m tiles, got shape {tuple(scores.shape)}"
        )
    a0, a1 = _checks.check_axes_pair(axes, scores.ndim)
    for a in (a0, a1):
        _checks.check_divisible(scores.shape, a, m)
    if _checks.check_nan_policy(nan) == "raise":
        if host:  # the same message as _checks.raise_on_nan, without a float32 copy
            count = int(np.isnan(scores).sum()) if jnp.issubdtype(scores.dtype, jnp.floating) else 0
            if count:
                raise ValueError(
                    f"scores of shape {tuple(scores.shape)} contain {count} NaN value(s); "
                    "fix the weights, or pass nan='smallest' to rank NaN below every number"
                )
        else:
            _checks.raise_on_nan(scores)
    return scores, a0, a1


def _work_dtype(dtype) -> Any:
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.promote_types(dtype, jnp.float32)
    return jnp.dtype(jnp.float32)


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
    sums of up to ``2 m`` scores far from overflow near the float maximum and from
    flushed subnormals near zero. NaN and ``-inf`` then become one value below, ``+inf`` one
    above, every finite score of the tile, by a margin ``2 (n m + 1) + 2`` larger than any
    difference two masks can make on the finite entries, so an optimal mask keeps as few
    NaN/``-inf`` and as many ``+inf`` entries as the constraints allow. ``tile_axes`` are
    the two axes of ``s`` that index within a tile.
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
        c = normalise_tiles(c, n, m, (1, 3))
        if method == "exact24":  # tile entries as strided slices: no transpose at all
            keep = _exact24.exact24([[c[:, r, :, k] for k in range(4)] for r in range(4)])
            return jnp.stack([jnp.stack(row, -1) for row in keep], 1)
        s = jnp.transpose(c, (1, 3, 0, 2)).reshape(m, m, group * cols)
        if method == "exact":
            keep = _exact.exact_tiles(s, n, m, eps_rel)
        else:
            keep = _greedy.greedy_tiles(s, n, m)
            if repair:
                keep = _greedy.fill_tiles(s, keep, n, m)
                keep = _greedy.swap_tiles(s, keep, m, swap_rounds, eps_rel)
        return jnp.transpose(keep.reshape(m, m, group, cols), (2, 0, 3, 1))

    keep = chunk(x[0]) if rows == group else jax.lax.map(chunk, x)
    return jnp.moveaxis(keep.reshape(moved), (-2, -1), axes)


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

    Scores of any magnitude are handled: each tile is scaled by a power of two (exact)
    before the solvers sum scores.

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
        from nmjax.masks._lp import transposable_mask_lp  # _lp builds on this module's checks

        return transposable_mask_lp(scores, n, m, axes=axes, nan=nan, batch_tiles=batch_tiles)
    scores, a0, a1 = check_tiled_scores(scores, m, axes, nan)
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
