"""Bi-Mask's output-channel permutations: applying them, scoring them, searching for one.

For a Dense kernel ``w: (in, out)`` a permutation ``perm: (out,)`` orders the output channels
so that ``w[:, perm]`` has each backward group as ``m`` consecutive columns (the official
Bi-Mask code's convention). The search maximises what the backward mask keeps: per input row
and group of ``m`` permuted channels, the best ``n`` forward-kept entries (``docs/design.md``,
*Algorithms*).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nmjax import _checks
from nmjax.masks._nm import nm_mask

METHODS = ("random", "swap")
SCORES = ("count", "magnitude")
# Elements scored at once by the random search (candidates are batched to stay under this).
_RANDOM_BATCH_ELEMENTS = 1 << 24


def invert_permutation(perm: Any) -> jax.Array:
    """The inverse permutation: ``inv[perm[i]] = i``, so ``a[..., perm][..., inv] == a``.

    Args:
      perm: ``(K,)`` integer permutation of ``0..K-1``.

    Returns:
      ``(K,)`` int32.
    """
    perm = _checks.check_perm(perm, None)
    size = perm.shape[0]
    return jnp.zeros(size, jnp.int32).at[perm].set(jnp.arange(size, dtype=jnp.int32))


def permute_out(a: Any, perm: Any) -> jax.Array:
    """Puts the output channels (last axis) of ``a`` in permuted order: ``a[..., perm]``.

    With a Bi-Mask ``(fwd, bwd, perm)`` of ``w: (in, out)`` and an output gradient
    ``dy: (batch, out)``, the input gradient is computed with contiguous backward groups as::

      dx = dy @ (w * bwd).T
         = permute_out(dy, perm) @ permute_out(w * bwd, perm).T   # dy[:, perm] @ (w*bwd)[:, perm].T

    because a product contracting over ``out`` does not depend on the order of ``out``.
    ``permute_out(w * bwd, perm)`` is N:M along axis 1 (groups of ``m`` consecutive permuted
    channels), so it packs with ``nmjax.format.pack(permute_out(w, perm),
    permute_out(bwd, perm), n, m, axis=1)``; ``dx`` needs no un-permutation (its axis is
    ``in``). The weight gradient ``dw = x.T @ dy`` stays in the original order.

    Args:
      a: ``(..., out)`` array (``w: (in, out)``, a mask, or ``dy: (batch, out)``).
      perm: ``(out,)`` integer permutation.

    Returns:
      ``(..., out)``: ``a[..., perm]``.
    """
    a = jnp.asarray(a)
    if a.ndim == 0:
        raise ValueError("a must have at least one axis (the output channels), got a scalar")
    perm = _checks.check_perm(perm, a.shape[-1])
    return jnp.take(a, perm, axis=-1)


def unpermute_out(a: Any, perm: Any) -> jax.Array:
    """Inverse of :func:`permute_out`: ``unpermute_out(permute_out(a, perm), perm) == a``.

    Args:
      a: ``(..., out)`` array in permuted order.
      perm: ``(out,)`` integer permutation.

    Returns:
      ``(..., out)`` in the original order: ``b`` with ``b[..., perm] == a``.
    """
    a = jnp.asarray(a)
    if a.ndim == 0:
        raise ValueError("a must have at least one axis (the output channels), got a scalar")
    perm = _checks.check_perm(perm, a.shape[-1])
    return jnp.take(a, invert_permutation(perm), axis=-1)


def _check_perm_rows(perms: jax.Array, size: int) -> jax.Array:
    if perms.dtype == jnp.bool_ or not jnp.issubdtype(perms.dtype, jnp.integer):
        raise TypeError(f"perms must be an integer index array, got dtype {perms.dtype}")
    if perms.shape[1] != size:
        raise ValueError(f"perms must have shape (K, {size}), got {tuple(perms.shape)}")
    if _checks.is_concrete(perms):
        values = np.asarray(perms)
        bad = ~np.all(np.sort(values, axis=1) == np.arange(size), axis=1)
        if bad.any():
            raise ValueError(f"perms[{int(np.argmax(bad))}] is not a permutation of 0..{size - 1}")
    return perms.astype(jnp.int32)


def _check_weight(w: Any, m: int) -> jax.Array:
    w = _checks.check_scores(w, "w")
    if w.ndim != 2:
        raise ValueError(f"w must be a Dense kernel of shape (in, out), got shape {tuple(w.shape)}")
    _checks.check_divisible(w.shape, 0, m, "w")  # forward groups along in
    _checks.check_divisible(w.shape, 1, m, "w")  # backward groups along out
    return w


def _forward(w: jax.Array, n: int, m: int) -> jax.Array:
    return nm_mask(jnp.abs(w), n, m, axis=0)


def _kept_values(w: jax.Array, fwd: jax.Array, score: str, count_dtype=jnp.float32) -> jax.Array:
    """``(out, in)`` values the search maximises: fwd as 0/1, or float32 ``|w| ⊙ fwd``."""
    if score == "count":
        values = fwd.astype(count_dtype)
    else:
        a = jnp.abs(w).astype(jnp.float32)
        values = jnp.where(fwd & ~jnp.isnan(a), a, 0.0)
    # transpose a materialised array: fused with the producer, XLA's CPU transpose is ~3x slower
    return jax.lax.optimization_barrier(values).T


def _slice_ranks(vals: list[jax.Array]) -> list[jax.Array]:
    """Ranks of ``m`` same-shape slices, elementwise (0 = largest, ties to the lower index).

    Unrolled comparisons between slices of a major axis: sorting tiny rows, or ranking
    along the minor axis, is far slower on CPU. Callers whose ranks feed several consumers
    materialise them (``optimization_barrier``): fused, XLA recomputes them per consumer.
    """
    dtype = jnp.int8 if len(vals) <= 127 else jnp.int32  # a byte is cheaper to materialise
    ranks = []
    for i, vi in enumerate(vals):
        r = jnp.zeros(vi.shape, dtype)
        for j, vj in enumerate(vals):
            if j != i:
                r = r + (vj >= vi if j < i else vj > vi).astype(dtype)
        ranks.append(r)
    return ranks


def _topn_sum(g: jax.Array, n: int) -> jax.Array:
    """``g: (G, m, L)`` -> scalar: the sum of the ``n`` largest of every group along axis 1."""
    vals = [g[:, i, :] for i in range(g.shape[1])]
    ranks = jax.lax.optimization_barrier(_slice_ranks(vals))
    return sum(jnp.where(r < n, v, 0.0).sum() for r, v in zip(ranks, vals, strict=True))


def _score_one(values_t: jax.Array, perm: jax.Array, n: int, m: int, score: str) -> jax.Array:
    """Score of one permutation. ``values_t: (out, in)``; count as int32, magnitude float32."""
    out, size_in = values_t.shape
    groups = values_t[perm].reshape(out // m, m, size_in)
    if score == "count":
        kept = groups.sum(1, dtype=jnp.int32)
        return jnp.minimum(kept, n).sum()
    return _topn_sum(groups, n)


def _axis_names(axis_name: Any) -> tuple[str, ...] | None:
    if axis_name is None:
        return None
    names = (axis_name,) if isinstance(axis_name, str) else axis_name
    if not isinstance(names, tuple) or not names or not all(isinstance(a, str) for a in names):
        raise TypeError(f"axis_name must be a mesh axis name or a non-empty tuple of them, "
                        f"got {axis_name!r}")
    return names


def _batch_size(k: int, elements: int) -> int:
    return max(1, min(k, _RANDOM_BATCH_ELEMENTS // max(elements, 1)))


@functools.partial(jax.jit, static_argnames=("n", "m", "score"))
def _score_many(w, perms, n, m, score):
    values_t = _kept_values(w, _forward(w, n, m), score, jnp.int8)  # 0/1 counts: bytes
    one = functools.partial(_score_one, values_t, n=n, m=m, score=score)
    return jax.lax.map(one, perms, batch_size=_batch_size(perms.shape[0], values_t.size))


def random_candidates(key: Any, out: int, num_candidates: int) -> jax.Array:
    """The candidates of the random search: ``(K, out)`` int32 permutations.

    Candidate ``k`` is ``jax.random.permutation(jax.random.split(key, K)[k], out)``.
    """
    key = _checks.check_key(key, "random")
    out = _checks.check_count(out, "out", 1)
    num_candidates = _checks.check_count(num_candidates, "num_candidates", 1)
    return _candidates(key, out, num_candidates)


@functools.partial(jax.jit, static_argnames=("out", "k"))
def _candidates(key, out, k):
    return jax.vmap(lambda kk: jax.random.permutation(kk, out))(jax.random.split(key, k))


def _total(x: jax.Array, axis_name: tuple[str, ...] | None) -> jax.Array:
    """``x`` summed over the named axes the rows of ``w`` are split across (``None``: as is)."""
    return x if axis_name is None else jax.lax.psum(x, axis_name)


@functools.partial(jax.jit, static_argnames=("n", "m", "k", "score", "axis_name"))
def _random_search(w, key, n, m, k, score, axis_name=None):
    values_t = _kept_values(w, _forward(w, n, m), score, jnp.int8)  # 0/1 counts: bytes
    out = values_t.shape[0]
    keys = jax.random.split(key, k)

    def one(kk):
        return _score_one(values_t, jax.random.permutation(kk, out), n, m, score)

    scores = _total(jax.lax.map(one, keys, batch_size=_batch_size(k, values_t.size)),
                    axis_name)
    best = jnp.argmax(scores)  # first maximum: ties go to the earlier candidate, as officially
    return jax.random.permutation(keys[best], out).astype(jnp.int32)


def _removal_stats(g: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """For groups ``g: (P, m, in)`` of non-negative values, per member ``i``:

    * ``thresh[p, i, r]``: the n-th largest value of group ``p`` without ``i`` in row ``r``
      (0 when fewer than n remain), so adding ``v`` there gains ``max(0, v - thresh)``;
    * ``loss[p, i]``: how much the group's top-n sum drops, summed over rows, when ``i``
      leaves.
    """
    vals = [g[:, i, :] for i in range(g.shape[1])]
    # materialise the ranks once: fused into each consumer, XLA recomputes them (slow at m=8)
    ranks = jax.lax.optimization_barrier(_slice_ranks(vals))
    s_last = sum(jnp.where(r == n - 1, v, 0.0) for r, v in zip(ranks, vals, strict=True))
    s_next = sum(jnp.where(r == n, v, 0.0) for r, v in zip(ranks, vals, strict=True))
    thresh = jnp.stack([jnp.where(r < n, s_next, s_last) for r in ranks], axis=1)
    loss = jnp.stack([jnp.where(r < n, v - s_next, 0.0).sum(-1)
                      for r, v in zip(ranks, vals, strict=True)], axis=1)
    return thresh, loss


@functools.partial(jax.jit, static_argnames=("n", "m", "rounds", "score", "axis_name"))
def _swap_search(w, init, key, n, m, rounds, score, axis_name=None):
    values_t = _kept_values(w, _forward(w, n, m), score)
    out, size_in = values_t.shape
    num_groups = out // m
    pairs = num_groups // 2
    if pairs == 0 or rounds == 0:
        return init
    perm_groups = init.reshape(num_groups, m)
    groups = values_t[init].reshape(num_groups, m, size_in)
    rows = jnp.arange(pairs)

    def one_round(r, carry):
        perm_groups, groups = carry
        order = jax.random.permutation(jax.random.fold_in(key, r), num_groups)
        x, y = order[:pairs], order[pairs : 2 * pairs]
        gx, gy = groups[x], groups[y]  # (P, m, in)
        tx, lx = _removal_stats(gx, n)
        ty, ly = _removal_stats(gy, n)
        # gain[p, i, j] of swapping member i of x[p] with member j of y[p]
        gain_x = jnp.maximum(gy[:, None, :, :] - tx[:, :, None, :], 0.0).sum(-1)
        gain_y = jnp.maximum(gx[:, :, None, :] - ty[:, None, :, :], 0.0).sum(-1)
        gain = _total(gain_x + gain_y - lx[:, :, None] - ly[:, None, :], axis_name)
        flat = gain.reshape(pairs, m * m)
        best = jnp.argmax(flat, axis=-1)  # ties: lowest (i, j)
        do = flat[rows, best] > 0
        bi, bj = best // m, best % m
        row_x, row_y = gx[rows, bi], gy[rows, bj]
        dox = do[:, None]
        groups = groups.at[x, bi].set(jnp.where(dox, row_y, row_x))
        groups = groups.at[y, bj].set(jnp.where(dox, row_x, row_y))
        px, py = perm_groups[x, bi], perm_groups[y, bj]
        perm_groups = perm_groups.at[x, bi].set(jnp.where(do, py, px))
        perm_groups = perm_groups.at[y, bj].set(jnp.where(do, px, py))
        return perm_groups, groups

    perm_groups, _ = jax.lax.fori_loop(0, rounds, one_round, (perm_groups, groups))
    return perm_groups.reshape(out)


def score_permutations(w: Any, n: int, m: int, perms: Any, *, score: str = "count") -> jax.Array:
    """Scores candidate output permutations the way the Bi-Mask search does.

    For each candidate, the forward-kept weights (N:M along axis 0 of ``w``) are grouped in
    ``m`` consecutive permuted output channels and the best ``n`` of each group's forward-kept
    entries survive (per input row). ``"count"`` (the official score) counts the survivors,
    ``sum(min(n, kept))``; ``"magnitude"`` sums their ``|w|``.

    Args:
      w: ``(in, out)`` real weights, both axes divisible by ``m``.
      n, m: the N:M pattern.
      perms: ``(K, out)`` integer permutations (or one ``(out,)``).
      score: ``"count"`` or ``"magnitude"``.

    Returns:
      ``(K,)`` scores (``()`` for one permutation): int32 counts or float32 magnitudes.
    """
    n, m = _checks.check_nm(n, m)
    w = _check_weight(w, m)
    score = _checks.check_choice(score, "score", SCORES)
    perms_arr = jnp.asarray(perms)
    single = perms_arr.ndim == 1
    perms_arr = perms_arr[None] if single else perms_arr
    if perms_arr.ndim != 2:
        raise ValueError(f"perms must have shape (K, {w.shape[1]}), got {tuple(perms_arr.shape)}")
    checked = _check_perm_rows(perms_arr, w.shape[1])
    scores = _score_many(w, checked, n=n, m=m, score=score)
    return scores[0] if single else scores


def search_permutation(
    w: Any,
    n: int,
    m: int,
    *,
    method: str = "swap",
    key: Any = None,
    score: str | None = None,
    num_candidates: int | None = None,
    rounds: int | None = None,
    init: Any = None,
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    """Searches a permutation of the output channels for the Bi-Mask backward mask.

    The objective: with the forward mask N:M along axis 0 of ``w``, group the output
    channels in the permuted order into groups of ``m`` and keep, per input row and group,
    the best ``n`` forward-kept entries; maximise what survives (``score``).

    >>> import jax
    >>> from nmjax.masks import bimask
    >>> w = jax.random.normal(jax.random.key(0), (16, 32))             # (in, out)
    >>> perm = search_permutation(w, 2, 4, method="swap", key=jax.random.key(1))
    >>> fwd, bwd, perm = bimask(w, 2, 4, perm=perm)
    >>> identity = jax.numpy.arange(32)                   # swap never lowers its score
    >>> bool(score_permutations(w, 2, 4, perm, score="magnitude")
    ...      >= score_permutations(w, 2, 4, identity, score="magnitude"))
    True

    Methods:
      * ``"random"`` — the official search: ``num_candidates`` random permutations
        (candidate ``k`` is ``jax.random.permutation(jax.random.split(key, K)[k], out)``,
        see :func:`random_candidates`), scored in vmapped batches, the first best wins.
        Default ``score="count"`` as in the official code (K=100, the official setting).
      * ``"swap"`` — iterated pairwise channel swaps: each of ``rounds`` rounds pairs the
        groups at random (from ``key``), evaluates every swap of one channel between the two
        groups of a pair exactly (in closed form from each group's n-th/(n+1)-th largest
        values per row) and applies the best one when it improves the score. Starts from
        ``init`` (identity by default; pass the previous permutation to warm-start during
        training). Never lowers the score. Default ``score="magnitude"``.

    Both are deterministic for a fixed ``key`` and jit-able (``n``, ``m`` and the options
    static).

    Args:
      w: ``(in, out)`` real weights (a Dense kernel); both axes divisible by ``m``.
      n, m: the N:M pattern.
      method: ``"swap"`` (default) or ``"random"``.
      key: a PRNG key (required).
      score: ``"count"`` (survivors) or ``"magnitude"`` (their ``|w|``); ``None`` takes the
        method's default.
      num_candidates: ``K`` for ``"random"`` (>= 1; default 100, the official setting).
      rounds: pairing rounds for ``"swap"`` (>= 0); ``None`` takes ``max(1, 8 // m)``
        (2 at M=4, 1 at M=8). More rounds keep more, at the cost of one more pass each.
      init: ``(out,)`` starting permutation for ``"swap"``.
      axis_name: inside ``jax.shard_map``, the mesh axis name(s) across which the rows
        (``in``) of ``w`` are split: each device holds a block of rows and the scores are
        summed over these axes (one ``psum`` of the candidates' scores, or of a round's
        ``(out / 2m, m, m)`` swap gains), so every device finds the same permutation as the
        unsplit ``w`` would. ``None`` (default): ``w`` is whole.

    Returns:
      ``(out,)`` int32 permutation ``perm``: ``w[:, perm]`` has each backward group as
      ``m`` consecutive columns.
    """
    n, m = _checks.check_nm(n, m)
    w = _check_weight(w, m)
    method = _checks.check_choice(method, "method", METHODS)
    key = _checks.check_key(key, method)
    axis_name = _axis_names(axis_name)
    if score is None:
        score = "count" if method == "random" else "magnitude"
    score = _checks.check_choice(score, "score", SCORES)
    if method == "random":
        for name, value in (("init", init), ("rounds", rounds)):
            if value is not None:
                raise ValueError(f"{name} is an option of method='swap', not of "
                                 "method='random'")
        k = 100 if num_candidates is None else num_candidates
        k = _checks.check_count(k, "num_candidates", 1)
        return _random_search(w, key, n=n, m=m, k=k, score=score, axis_name=axis_name)
    if num_candidates is not None:
        raise ValueError("num_candidates is an option of method='random', not of "
                         "method='swap' (which takes rounds)")
    rounds = max(1, 8 // m) if rounds is None else _checks.check_count(rounds, "rounds", 0)
    out = w.shape[1]
    if init is None:
        init = jnp.arange(out, dtype=jnp.int32)
    init = _checks.check_perm(init, out, "init")
    return _swap_search(w, init, key, n=n, m=m, rounds=rounds, score=score,
                        axis_name=axis_name)
