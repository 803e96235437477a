"""Bi-Mask (Zhang et al., 2023): a forward N:M mask, a backward N:M mask and a permutation.

Conventions for a Dense kernel ``w: (in, out)`` (DESIGN §2, §3):

* ``fwd``: N:M along axis 0 (``in``), the contraction axis of ``Y = X @ (w ⊙ fwd)``.
* ``perm``: ``(out,)`` int32, a permutation of the output channels such that
  ``w[:, perm]`` has each backward group as ``m`` consecutive columns (the official code's
  convention).
* ``bwd``: a subset of ``fwd``; ``bwd[:, perm]`` is N:M along axis 1, so the input gradient
  ``dX = dY @ (w ⊙ bwd).T`` contracts over groups of ``m`` permuted output channels.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nmjax import _checks
from nmjax.masks.nm import nm_mask

METHODS = ("random", "swap")
SCORES = ("count", "magnitude")
# Elements scored at once by the random search (candidates are batched to stay under this).
_RANDOM_BATCH_ELEMENTS = 1 << 24


class BiMask(NamedTuple):
    """The two masks of a Dense kernel ``w: (in, out)`` and the output permutation.

    Attributes:
      fwd: ``(in, out)`` bool, exactly N of every M along axis 0.
      bwd: ``(in, out)`` bool, ``bwd ⊆ fwd``; ``bwd[:, perm]`` keeps at most N of every M
        consecutive entries along axis 1 (exactly ``min(N, fwd-kept)`` per group).
      perm: ``(out,)`` int32 permutation of the output channels; backward group ``g`` is
        the columns ``perm[g*M:(g+1)*M]`` of ``w``.
    """

    fwd: jax.Array
    bwd: jax.Array
    perm: jax.Array


# ----------------------------------------------------------------------------- permutations


def invert_permutation(perm: Any) -> jax.Array:
    """The inverse permutation: ``inv[perm[i]] = i``, so ``a[..., perm][..., inv] == a``.

    Args:
      perm: ``(K,)`` integer permutation of ``0..K-1``.

    Returns:
      ``(K,)`` int32.
    """
    perm = _check_perm_array(perm, None)
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
    perm = _check_perm_array(perm, a.shape[-1])
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
    perm = _check_perm_array(perm, a.shape[-1])
    return jnp.take(a, invert_permutation(perm), axis=-1)


# ----------------------------------------------------------------------------- checks


def _check_perm_array(perm: Any, size: int | None, name: str = "perm") -> jax.Array:
    dtype = jnp.result_type(perm)
    if dtype == jnp.bool_ or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer index array, got dtype {dtype}")
    perm = jnp.asarray(perm)
    if perm.ndim != 1 or (size is not None and perm.shape[0] != size):
        want = f"({size},)" if size is not None else "(K,)"
        raise ValueError(f"{name} must have shape {want} (one index per output channel), "
                         f"got shape {tuple(perm.shape)}")
    if _checks.is_concrete(perm):
        values = np.asarray(perm)
        if not np.array_equal(np.sort(values), np.arange(values.shape[0])):
            raise ValueError(f"{name} of shape {tuple(perm.shape)} is not a permutation of "
                             f"0..{values.shape[0] - 1} (repeated or out-of-range indices)")
    return perm.astype(jnp.int32)


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


def _check_key(key: Any, method: str) -> jax.Array:
    if key is None:
        raise ValueError(f"method={method!r} needs a PRNG key: pass key=jax.random.key(seed)")
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    if not (typed and key.shape == ()) and not (key.dtype == jnp.uint32 and key.shape == (2,)):
        raise TypeError(f"key must be a single PRNG key (jax.random.key(seed)), got dtype "
                        f"{key.dtype} and shape {tuple(key.shape)}")
    return key


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _check_count(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be a Python int, got {value!r} ({type(value).__name__})")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {name}={value}")
    return int(value)


# ----------------------------------------------------------------------------- core math


def _forward(w: jax.Array, n: int, m: int) -> jax.Array:
    return nm_mask(jnp.abs(w), n, m, axis=0)


def _backward(w: jax.Array, fwd: jax.Array, perm: jax.Array, n: int, m: int) -> jax.Array:
    """The official backward mask for ``perm``: the top-n forward-kept ``|w|`` per group.

    Forward-pruned entries score -1, below every kept ``|w|`` (zeros included), so each
    group keeps ``min(n, kept)`` forward-kept entries: the exact optimum for this ``perm``.
    """
    score = jnp.where(fwd, jnp.abs(w), -1)
    sel = nm_mask(permute_out(score, perm), n, m, axis=1)
    return unpermute_out(sel & permute_out(fwd, perm), perm)


@functools.partial(jax.jit, static_argnames=("n", "m"))
def _masks_for(w, perm, n, m):
    fwd = _forward(w, n, m)
    return fwd, _backward(w, fwd, perm, n, m)


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
    key = _check_key(key, "random")
    out = _check_count(out, "out", 1)
    num_candidates = _check_count(num_candidates, "num_candidates", 1)
    return _candidates(key, out, num_candidates)


@functools.partial(jax.jit, static_argnames=("out", "k"))
def _candidates(key, out, k):
    return jax.vmap(lambda kk: jax.random.permutation(kk, out))(jax.random.split(key, k))


@functools.partial(jax.jit, static_argnames=("n", "m", "k", "score"))
def _random_search(w, key, n, m, k, score):
    values_t = _kept_values(w, _forward(w, n, m), score, jnp.int8)  # 0/1 counts: bytes
    out = values_t.shape[0]
    keys = jax.random.split(key, k)

    def one(kk):
        return _score_one(values_t, jax.random.permutation(kk, out), n, m, score)

    scores = jax.lax.map(one, keys, batch_size=_batch_size(k, values_t.size))
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


@functools.partial(jax.jit, static_argnames=("n", "m", "rounds", "score"))
def _swap_search(w, init, key, n, m, rounds, score):
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
        gain = gain_x + gain_y - lx[:, :, None] - ly[:, None, :]
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


# ----------------------------------------------------------------------------- public API


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
    score = _check_choice(score, "score", SCORES)
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
    num_candidates: int = 100,
    rounds: int | None = None,
    init: Any = None,
) -> jax.Array:
    """Searches a permutation of the output channels for the Bi-Mask backward mask.

    The objective: with the forward mask N:M along axis 0 of ``w``, group the output
    channels in the permuted order into groups of ``m`` and keep, per input row and group,
    the best ``n`` forward-kept entries; maximise what survives (``score``).

    Example::

      perm = search_permutation(w, 2, 4, method="swap", key=jax.random.key(0))
      fwd, bwd, perm = bimask(w, 2, 4, perm=perm)

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
      num_candidates: ``K`` for ``"random"`` (>= 1).
      rounds: pairing rounds for ``"swap"`` (>= 0); ``None`` takes ``max(1, 8 // m)``
        (2 at M=4, 1 at M=8), which on CPU costs no more than the K=100 random search
        (``benchmarks/results/bimask.md``). More rounds keep more; each costs about as much
        as 10-30 random candidates.
      init: ``(out,)`` starting permutation for ``"swap"``.

    Returns:
      ``(out,)`` int32 permutation ``perm``: ``w[:, perm]`` has each backward group as
      ``m`` consecutive columns.
    """
    n, m = _checks.check_nm(n, m)
    w = _check_weight(w, m)
    method = _check_choice(method, "method", METHODS)
    key = _check_key(key, method)
    if score is None:
        score = "count" if method == "random" else "magnitude"
    score = _check_choice(score, "score", SCORES)
    if method == "random":
        if init is not None:
            raise ValueError("init is an option of method='swap', not of method='random'")
        k = _check_count(num_candidates, "num_candidates", 1)
        return _random_search(w, key, n=n, m=m, k=k, score=score)
    rounds = max(1, 8 // m) if rounds is None else _check_count(rounds, "rounds", 0)
    out = w.shape[1]
    if init is None:
        init = jnp.arange(out, dtype=jnp.int32)
    init = _check_perm_array(init, out, "init")
    return _swap_search(w, init, key, n=n, m=m, rounds=rounds, score=score)


def bimask(
    w: Any,
    n: int,
    m: int,
    perm: Any = None,
    *,
    search: str | None = None,
    key: Any = None,
    **search_options: Any,
) -> BiMask:
    """Bi-Mask of a Dense kernel: forward N:M mask, backward N:M mask and their permutation.

    The forward mask keeps the ``n`` largest ``|w|`` of every ``m`` along axis 0 (``in``).
    The backward mask keeps, in each group of ``m`` consecutive *permuted* output channels
    and each input row, the ``n`` largest forward-kept ``|w|`` — the official Bi-Mask
    backward mask, which for a given ``perm`` keeps the most possible (``min(n, kept)`` per
    group; forward-kept zeros are preferred to pruned entries, ties to the lower permuted
    index). It is expressed in the original channel order.

    Example::

      w = jax.random.normal(key, (768, 3072))
      fwd, bwd, perm = bimask(w, 2, 4)                                   # identity perm
      fwd, bwd, perm = bimask(w, 2, 4, search="swap", key=jax.random.key(0))
      assert nmjax.masks.is_nm(bwd[:, perm], 2, 4, axis=1)

    Args:
      w: ``(in, out)`` real weights; ``in`` and ``out`` divisible by ``m``.
      n, m: the N:M pattern.
      perm: ``(out,)`` integer permutation of the output channels (``w[:, perm]`` has the
        backward groups as consecutive columns). ``None`` (default) means the identity,
        unless ``search`` is given.
      search: ``None`` or a :func:`search_permutation` method (``"swap"``, ``"random"``)
        run on ``w`` to choose ``perm``.
      key: the PRNG key for ``search``.
      **search_options: further :func:`search_permutation` options (``score``,
        ``num_candidates``, ``rounds``, ``init``).

    Returns:
      ``BiMask(fwd, bwd, perm)``: ``(in, out)`` bool, ``(in, out)`` bool, ``(out,)`` int32.
      Works under ``jit`` (``n``, ``m`` and ``search`` static); a traced ``perm`` is not
      checked for being a permutation.

    Raises:
      TypeError: boolean/complex ``w``, non-integer ``perm``, bad ``key``.
      ValueError: ``w`` not 2-D, ``in`` or ``out`` not divisible by ``m``, ``perm`` of the
        wrong shape or not a permutation, both ``perm`` and ``search`` given.
    """
    n, m = _checks.check_nm(n, m)
    w = _check_weight(w, m)
    out = w.shape[1]
    if search is not None:
        if perm is not None:
            raise ValueError("pass either perm or search, not both")
        perm = search_permutation(w, n, m, method=search, key=key, **search_options)
    else:
        if search_options or key is not None:
            given = sorted(search_options) + (["key"] if key is not None else [])
            raise ValueError(f"options {given} need search='swap' or search='random'")
        if perm is None:
            perm = jnp.arange(out, dtype=jnp.int32)
        perm = _check_perm_array(perm, out)
    return BiMask(*_masks_for(w, perm, n=n, m=m), perm)
