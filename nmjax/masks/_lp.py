"""Exact transposable N:M from the linear programme, solved offline by scipy's HiGHS."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from nmjax import _checks, _layout
from nmjax.masks import _transposable


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


def _normalised_tiles(tiles: np.ndarray, n: int, m: int) -> np.ndarray:
    """``(B, m, m)`` float64 tiles -> finite tiles of magnitude at most ``2 n m + 5``.

    HiGHS works to absolute tolerances (about 1e-7), so costs of ``|w| * 1e-9`` all look
    equal to it and costs near 1e300 overflow; each tile's objective is therefore divided by
    its largest finite magnitude (which does not change its optimum). NaN and ``-inf`` then
    sit below, ``+inf`` above, every finite score by more than any two masks can differ.
    """
    finite = np.isfinite(tiles)
    mag = np.where(finite, np.abs(tiles), 0).max((1, 2), keepdims=True)
    s = np.where(finite, tiles, 0) / np.where(mag > 0, mag, 1)
    pad = 2 * (n * m + 1) + 2  # > (hi - lo) * (n m + 1) + |hi| + |lo| for |s| <= 1
    s = np.where(np.isnan(tiles) | (tiles == -np.inf), -1 - pad, s)
    return np.where(tiles == np.inf, 1 + pad, s)


def _lp_tiles(s: np.ndarray, n: int, m: int) -> np.ndarray:
    linprog, _ = _import_linprog()
    b = s.shape[0]
    a_eq = _lp_constraints(b, m)
    b_eq = np.full(2 * b * m, float(n))
    # dual simplex returns a vertex; the constraint matrix is totally unimodular.
    res = linprog(-s.ravel(), A_eq=a_eq, b_eq=b_eq, bounds=(0, 1), method="highs-ds")
    if res.status != 0:
        raise RuntimeError(
            f"HiGHS failed on a batch of {b} tiles whose normalised scores span "
            f"[{s.min():.3g}, {s.max():.3g}]: {res.message}"
        )
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
    an integral, optimal, **exactly-N** mask. Each tile's scores are divided by their largest
    finite magnitude first (in float64), so the answer does not depend on the scale of the
    scores (HiGHS's tolerances are absolute). Tiles are solved ``batch_tiles`` at a time
    (one block-diagonal LP per batch). Slow (one LP solve per batch, on the host); use it
    as the reference for the JAX solvers, or offline. Needs the
    ``exact`` extra (``pip install nmjax[exact]``).

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
      RuntimeError: HiGHS did not solve a batch (the message gives the batch's score range).
    """
    n, m = _checks.check_nm(n, m)
    if isinstance(scores, jax.core.Tracer):
        raise ValueError("method='lp' runs on the host and needs concrete scores, not traced "
                         "ones (inside jit/vmap/grad); use method='exact' there")
    _import_linprog()
    scores, a0, a1 = _transposable.check_tiled_scores(scores, m, axes, nan, host=True)
    if isinstance(batch_tiles, bool) or not isinstance(batch_tiles, int) or batch_tiles < 1:
        raise ValueError(f"batch_tiles must be an int >= 1, got {batch_tiles!r}")
    tiles, moved = _layout.to_tiles(scores.astype(np.float64), (a0, a1), m, xp=np)
    tiles = _normalised_tiles(tiles.transpose(2, 0, 1), n, m)
    total = tiles.shape[0]
    out = np.zeros(tiles.shape, bool)
    for start in range(0, total, batch_tiles):
        stop = min(start + batch_tiles, total)
        out[start:stop] = _lp_tiles(tiles[start:stop], n, m)
        if progress is not None:
            progress(stop, total)
    return _layout.from_tiles(out.transpose(1, 2, 0), moved, (a0, a1), m, xp=np)
