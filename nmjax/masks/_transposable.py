"""Transposable N:M masks: the public dispatcher over the per-solver modules.

A transposable N:M mask of a Dense kernel ``w: (in, out)`` makes both ``w`` (forward,
contraction over axis 0) and ``w.T`` (input gradient, contraction over axis 1) N:M sparse
(``docs/design.md``, *Axis contract*). Tiles are the aligned ``m x m`` blocks over two
named ``axes``; every other axis is a batch axis. Solvers: ``_exact24`` (all 90 valid 2:4
tiles scored at once), ``_greedy`` (Hubara et al.'s greedy b-matching), ``_exact`` (a
min-cost-flow solver batched over all tiles in JAX, and the greedy's repair) and ``_lp``
(scipy's HiGHS, offline); ``_tiles`` holds what the JAX solvers share.
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
from nmjax.masks import _exact, _exact24, _greedy, _tiles

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


@functools.partial(jax.jit, static_argnames=("axes", "n", "m", "method", "repair", "eps_rel"))
def _solve(scores, *, axes, n, m, method, repair, eps_rel):
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
        c = _tiles.normalise_tiles(c, n, m, (1, 3))
        if method == "exact24":  # tile entries as strided slices: no transpose at all
            keep = _exact24.exact24([[c[:, r, :, k] for k in range(4)] for r in range(4)])
            return jnp.stack([jnp.stack(row, -1) for row in keep], 1)
        s = jnp.transpose(c, (1, 3, 0, 2)).reshape(m, m, group * cols)
        # Materialise the tiles-last copy once: XLA would otherwise fuse the transpose into
        # each of the solvers' many readers and redo it (strided) every time.
        s = jax.lax.optimization_barrier(s)
        if method == "exact":
            keep = _exact.exact_tiles(s, n, m, eps_rel)
        elif repair:
            keep = _exact.approx_tiles(s, n, m)
        else:
            keep = _greedy.greedy_tiles(s, n, m)
        return jnp.transpose(keep.reshape(m, m, group, cols), (2, 0, 3, 1))

    keep = chunk(x[0]) if rows == group else jax.lax.map(chunk, x)
    return jnp.moveaxis(keep.reshape(moved), (-2, -1), axes)


GUARANTEES = ("optimal", "exactly_n", "at_most_n")


def _resolve_method(method: str, n: int, m: int, guarantee: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if guarantee not in GUARANTEES:
        raise ValueError(f"guarantee must be one of {GUARANTEES}, got {guarantee!r}")
    if method == "auto":
        if m > MAX_M:
            if guarantee != "optimal":
                raise ValueError(f"guarantee={guarantee!r} has no solver for m={m} > {MAX_M}; "
                                 "use method='lp' (optimal)")
            raise ValueError(
                f"method='auto' has no JAX solver for m={m} > {MAX_M}; pass method='lp'"
            )
        # The fastest method that meets the guarantee, as measured on the CPU
        # (benchmarks/results/masks.md): at 2:4 "exact24" is as fast as the greedy and
        # faster than the rest, and its mask meets every guarantee; elsewhere the greedy,
        # its repair and "exact" rank in that order.
        if (n, m) == (2, 4):
            return "exact24"
        return {"optimal": "exact", "exactly_n": "repair", "at_most_n": "greedy"}[guarantee]
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
    guarantee: str = "optimal",
    eps_rel: float | None = None,
    batch_tiles: int = 4096,
) -> Any:
    """Transposable N:M mask: ``n`` kept per row and per column of every ``m x m`` tile.

    Tiles are the aligned blocks ``[i*m:(i+1)*m, j*m:(j+1)*m]`` over ``axes`` (default the
    last two: ``(in, out)`` of a Dense kernel); every other axis is a batch axis (an
    ``HWIO`` conv kernel uses ``axes=(2, 3)``). Both ``mask`` and ``mask.T`` are then N:M
    along their contraction axes, so the forward and the input-gradient
    products can both run on sparse tensor cores.

    Example::

      w = jax.random.normal(key, (768, 3072))                 # Dense kernel (in, out)
      mask = transposable_mask(jnp.abs(w), 2, 4)              # exact 2:4 (method="exact24")
      mask = transposable_mask(jnp.abs(w), 4, 8)              # exact 4:8 (method="exact")
      assert is_transposable(mask, 4, 8, exact=True)
      fast = transposable_mask(jnp.abs(w), 8, 16, guarantee="exactly_n")  # greedy + repair

    Methods (the objective is the sum of kept scores in each tile):

    * ``"exact24"``: 2:4 only. Scores all 90 valid ``4 x 4`` tiles and keeps the best
      (ties: the first in a fixed pattern order). Exactly N; optimal. Jit-able.
    * ``"exact"``: any N:M with ``m <= 16``. A min-cost-flow solver batched over all
      tiles: integer scores (each tile's rounded to a grid of ``2**24`` to ``2**27`` steps
      of its largest magnitude, finer for smaller ``m``), column prices from three auction
      steps, each row's top ``n`` under them, then successive shortest paths (Bellman-Ford)
      until every column holds ``n``. Exactly N; optimal for the rounded scores, so within
      ``n * m`` grid steps of the optimum (about ``1e-5`` of a tile's largest score at
      8:16, ``1e-6`` at 4:8). Jit-able.
    * ``"greedy"``: ``m <= 16``. Hubara et al.'s greedy b-matching: entries in decreasing
      score (ties: lower row-major index first), kept while their row and column both hold
      fewer than ``n`` (computed in parallel rounds, the same masks). **At most N**: a row
      or column may be left short, but only where every free entry of it meets a full
      column or row (the mask is maximal). Keeps at least half the optimum (measured about
      0.985-0.991 on Gaussian weights). Jit-able.
    * ``"greedy"`` with ``repair=True``: **exactly N**, near-optimal (measured at least
      0.9995 of the optimum on Gaussian weights, no bound). Not a fix-up of the greedy mask:
      the exact solver's start, then augmenting paths from a Bellman-Ford cut after two
      iterations, which is cheaper than running the shortest paths to the end. Jit-able.
    * ``"lp"``: any N:M, offline: :func:`transposable_mask_lp` (scipy's HiGHS; numpy in
      and out; not jit-able). Exactly N; optimal.
    * ``"auto"`` (default): the fastest method, as measured on the CPU, that meets
      ``guarantee``: ``"exact24"`` for 2:4 whatever the guarantee (as fast as the greedy
      there); otherwise ``"optimal"`` -> ``"exact"``, ``"exactly_n"`` -> ``"greedy"`` with
      ``repair``, ``"at_most_n"`` -> ``"greedy"``. ``m > 16`` needs ``method="lp"``.

    Scores of any magnitude are handled: each tile is scaled by a power of two (exact)
    before the solvers sum scores.

    Args:
      scores: real array of rank >= 2, e.g. ``jnp.abs(w)``; both ``axes`` divisible by
        ``m``. Integer scores are solved in float32.
      n, m: the pattern, ``1 <= n <= m`` (``n == m`` keeps everything).
      method: see above.
      axes: the two axes forming the tiles: tile rows run along ``axes[0]`` (the
        contraction axis), tile columns along ``axes[1]``.
      nan: ``"smallest"`` (default): NaN and ``-inf`` rank below every number (kept only
        where a row or column has too few others), ``+inf`` above. ``"raise"``:
        ValueError if concrete scores hold NaN (refuses traced scores).
      repair: ``"greedy"`` only: return the exactly-N near-optimal mask described above.
      guarantee: ``"auto"`` only: ``"optimal"`` (default), ``"exactly_n"`` or
        ``"at_most_n"``.
      eps_rel: ``"exact"`` only: a coarser grid, in fractions of a tile's largest score
        (``None``: the finest grid whose sums cannot overflow int32).
      batch_tiles: ``"lp"`` only: tiles per LP.

    Returns:
      Boolean array of ``scores.shape`` (a numpy array for ``"lp"``). Deterministic:
      equal inputs give equal masks; among tied optima the choice is fixed but unspecified.

    Raises:
      TypeError: boolean/complex scores, non-integer ``n``/``m``, bad ``axes``.
      ValueError: ``n > m``, ``n < 1``, an axis not divisible by ``m``, ``m > 16`` for a
        JAX method, ``"exact24"`` with another pattern, an unknown method or guarantee,
        ``guarantee`` or ``eps_rel`` or ``repair`` with a method they do not apply to, NaN
        with ``nan="raise"``.
      ImportError: ``"lp"`` without scipy.
    """
    n, m = _checks.check_nm(n, m)
    if guarantee != "optimal" and method != "auto":
        raise ValueError(f"guarantee applies to method='auto' only, got method={method!r}; "
                         "the method itself fixes what the mask guarantees")
    method = _resolve_method(method, n, m, guarantee)
    if method == "repair":
        method, repair = "greedy", True
    if method == "lp":
        from nmjax.masks._lp import transposable_mask_lp  # _lp builds on this module's checks

        return transposable_mask_lp(scores, n, m, axes=axes, nan=nan, batch_tiles=batch_tiles)
    scores, a0, a1 = check_tiled_scores(scores, m, axes, nan)
    if repair and method != "greedy":
        raise ValueError(f"repair=True applies to method='greedy' only, got method={method!r}")
    if eps_rel is not None:
        if method != "exact":
            raise ValueError(f"eps_rel applies to method='exact' only, got method={method!r}")
        if not (isinstance(eps_rel, float) and 0 <= eps_rel < 1):
            raise ValueError(f"eps_rel must be a float in [0, 1) or None, got {eps_rel!r}")
    scores = jax.lax.stop_gradient(scores)
    if scores.size == 0 or n == m:  # n == m keeps everything (NaN included)
        return jnp.ones(scores.shape, bool)
    return _solve(scores, axes=(a0, a1), n=n, m=m, method=method, repair=bool(repair),
                  eps_rel=eps_rel)
