"""Tests for nmjax.masks.bimask: validity, the official algorithm, the swap search, helpers."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nmjax.masks import (
    BiMask,
    Masks,
    bimask,
    invert_permutation,
    is_nm,
    permute_out,
    random_candidates,
    score_permutations,
    search_permutation,
    unpermute_out,
)
from nmjax.tree import MaskRule, apply_masks, build_masks

# (n, m, (in, out)): a small fixed set, so JAX compiles each function only a few times.
CASES = [(2, 4, (8, 16)), (1, 4, (12, 8)), (4, 8, (16, 16)), (3, 4, (8, 12))]


def _weights(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape)


# ----------------------------------------------------------------------------- numpy references


def ref_forward(w, n, m):
    a = np.abs(np.asarray(w))
    fwd = np.zeros(a.shape, bool)
    for col in range(a.shape[1]):
        for start in range(0, a.shape[0], m):
            order = np.argsort(-a[start : start + m, col], kind="stable")
            fwd[start + order[:n], col] = True
    return fwd


def ref_backward(w, fwd, perm, n, m):
    """Per row and permuted group: the n largest forward-kept |w|, ties to lower position."""
    a = np.abs(np.asarray(w))
    perm = np.asarray(perm)
    bwd = np.zeros(a.shape, bool)
    for row in range(a.shape[0]):
        for start in range(0, a.shape[1], m):
            cols = [c for c in perm[start : start + m] if fwd[row, c]]
            cols = sorted(cols, key=lambda c: -a[row, c])  # stable: permuted order on ties
            bwd[row, cols[:n]] = True
    return bwd


def official_scores(w, n, m, candidates, score="count"):
    """A numpy port of the official get_best_permutation scoring loop."""
    a = np.abs(np.asarray(w))
    fwd = ref_forward(w, n, m)
    scores = []
    for p in np.asarray(candidates):
        ws = (a * fwd)[:, p]  # (in, out) in permuted order, pruned weights zeroed
        groups = ws.reshape(a.shape[0], -1, m)
        thresh = -np.sort(-groups, axis=-1)[..., n - 1 : n]
        keep = (groups >= thresh) & (groups > 0)
        kept = keep.sum() if score == "count" else (groups * keep).sum()
        scores.append(kept)
    return np.array(scores)


def single_swap_scores(w, n, m, perm, score):
    """Score of every single swap between two groups of an 8-channel layer (m=4)."""
    perm = np.asarray(perm)
    out = []
    for i, j in itertools.product(range(m), range(m, 2 * m)):
        p = perm.copy()
        p[i], p[j] = p[j], p[i]
        out.append(p)
    return np.asarray(score_permutations(w, n, m, np.stack(out), score=score))


# ----------------------------------------------------------------------------- validity


def _check_valid(masks, w, n, m):
    fwd, bwd, perm = masks
    assert fwd.shape == bwd.shape == w.shape and fwd.dtype == bwd.dtype == jnp.bool_
    assert perm.shape == (w.shape[1],) and perm.dtype == jnp.int32
    assert sorted(np.asarray(perm).tolist()) == list(range(w.shape[1]))
    assert bool(is_nm(fwd, n, m, axis=0, exact=True))
    assert bool(is_nm(bwd[:, perm], n, m, axis=1))
    assert not bool(jnp.any(bwd & ~fwd))
    # exact optimum for its permutation: min(n, forward-kept) survivors per group
    fwd_counts = np.asarray(fwd[:, perm]).reshape(w.shape[0], -1, m).sum(-1)
    bwd_counts = np.asarray(bwd[:, perm]).reshape(w.shape[0], -1, m).sum(-1)
    np.testing.assert_array_equal(bwd_counts, np.minimum(fwd_counts, n))


@settings(max_examples=15, deadline=None)
@given(case=st.sampled_from(CASES), seed=st.integers(0, 2**16), perm_seed=st.integers(0, 2**16))
def test_valid_for_any_permutation(case, seed, perm_seed):
    n, m, shape = case
    w = _weights(seed, shape)
    perm = jax.random.permutation(jax.random.key(perm_seed), shape[1])
    masks = bimask(w, n, m, perm=perm)
    assert isinstance(masks, Masks)
    _check_valid(masks, w, n, m)
    np.testing.assert_array_equal(np.asarray(masks.perm), np.asarray(perm))
    np.testing.assert_array_equal(masks.bwd, ref_backward(w, ref_forward(w, n, m), perm, n, m))


@pytest.mark.parametrize(
    "case, search",
    [(CASES[0], "random"), (CASES[2], "random")] + [(case, "swap") for case in CASES],
)
def test_valid_with_search(case, search):
    n, m, shape = case
    w = _weights(1, shape)
    masks = bimask(w, n, m, search=search, key=jax.random.key(3))
    _check_valid(masks, w, n, m)


@pytest.mark.parametrize("case", CASES)
def test_identity_matches_direct_computation(case):
    n, m, shape = case
    w = _weights(2, shape)
    fwd, bwd, perm = bimask(w, n, m)
    np.testing.assert_array_equal(perm, np.arange(shape[1]))
    ref_fwd = ref_forward(w, n, m)
    np.testing.assert_array_equal(fwd, ref_fwd)
    np.testing.assert_array_equal(bwd, ref_backward(w, ref_fwd, np.arange(shape[1]), n, m))


def test_forward_kept_zero_preferred_to_pruned_entry():
    # column 1's forward-kept rows hold exact zeros; the backward mask still keeps them
    w = jnp.array([[1.0, 0.0, 3.0, 4.0], [2.0, 0.0, 1.0, 1.0],
                   [0.5, -1.0, 0.1, 0.2], [0.1, -2.0, 0.3, 0.1]]).T
    fwd, bwd, _ = bimask(w, 2, 4)
    _check_valid((fwd, bwd, jnp.arange(4, dtype=jnp.int32)), w, 2, 4)
    assert not bool(jnp.any(bwd & ~fwd))


# ----------------------------------------------------------------------------- official algorithm


def _hand_example():
    """in=4, out=8, 2:4. Columns 0-3 keep rows {0, 1}; columns 4-7 keep rows {2, 3}."""
    w = np.full((4, 8), 0.1, np.float32)
    for c in range(4):
        w[0:2, c] = c + 1.0  # 1, 2, 3, 4
        w[2:4, c + 4] = c + 5.0  # 5, 6, 7, 8
    identity = np.arange(8)
    mixed = np.array([0, 4, 1, 2, 3, 5, 6, 7])
    paired = np.array([0, 1, 4, 5, 2, 3, 6, 7])
    return jnp.asarray(w), np.stack([identity, mixed, paired])


def test_hand_checked_scores():
    w, perms = _hand_example()
    # identity: each group has 4 kept in 2 rows -> 2 + 2 per group; paired: nothing lost;
    # mixed: group {0,4,1,2} keeps 2+2+1+1, group {3,5,6,7} keeps 1+1+2+2.
    np.testing.assert_array_equal(score_permutations(w, 2, 4, perms), [8, 12, 16])
    # magnitudes: identity 2*(3+4) + 2*(7+8); mixed 2*(2+3) + 2*5 + 2*4 + 2*(7+8)
    np.testing.assert_allclose(score_permutations(w, 2, 4, perms, score="magnitude"),
                               [44.0, 58.0, 72.0])
    np.testing.assert_array_equal(official_scores(w, 2, 4, perms), [8, 12, 16])
    assert int(score_permutations(w, 2, 4, perms[2])) == 16


@pytest.mark.parametrize("score", ["count", "magnitude"])
def test_random_search_reproduces_official_choice(score):
    w, _ = _hand_example()
    key = jax.random.key(7)
    cands = np.asarray(random_candidates(key, 8, 20))
    ref = official_scores(w, 2, 4, cands, score)
    np.testing.assert_allclose(score_permutations(w, 2, 4, cands, score=score), ref, rtol=1e-6)
    chosen = search_permutation(w, 2, 4, method="random", key=key, num_candidates=20,
                                score=score)
    np.testing.assert_array_equal(chosen, cands[int(np.argmax(ref))])  # first best wins


def test_random_search_official_choice_on_random_weights():
    n, m, shape = CASES[0]
    w = _weights(5, shape)
    key = jax.random.key(11)
    cands = np.asarray(random_candidates(key, shape[1], 100))
    ref = official_scores(w, n, m, cands)
    np.testing.assert_array_equal(score_permutations(w, n, m, cands), ref)
    chosen = search_permutation(w, n, m, method="random", key=key)  # K=100
    np.testing.assert_array_equal(chosen, cands[int(np.argmax(ref))])


def test_random_candidates_are_permutations():
    cands = np.asarray(random_candidates(jax.random.key(0), 12, 5))
    assert cands.shape == (5, 12)
    assert all(sorted(c.tolist()) == list(range(12)) for c in cands)
    assert len({tuple(c) for c in cands}) > 1


# ----------------------------------------------------------------------------- swap search


@settings(max_examples=10, deadline=None)
@given(case=st.sampled_from([CASES[0], CASES[2]]), seed=st.integers(0, 2**16),
       score=st.sampled_from(["count", "magnitude"]))
def test_swap_never_lowers_score(case, seed, score):
    n, m, shape = case
    w = _weights(seed, shape)
    init = jax.random.permutation(jax.random.key(seed + 1), shape[1])
    perm = search_permutation(w, n, m, method="swap", key=jax.random.key(seed), score=score,
                              init=init)
    before, after = score_permutations(w, n, m, jnp.stack([init, perm]), score=score)
    assert float(after) >= float(before) - 1e-4


@pytest.mark.parametrize("score", ["count", "magnitude"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_swap_round_applies_the_best_swap(score, seed):
    # out = 8, m = 4: two groups, so every round pairs them; one round = the best single swap
    w = _weights(seed, (8, 8))
    init = np.asarray(jax.random.permutation(jax.random.key(seed), 8))
    base = float(score_permutations(w, 2, 4, init, score=score))
    neighbours = single_swap_scores(w, 2, 4, init, score)
    perm = search_permutation(w, 2, 4, method="swap", key=jax.random.key(0), score=score,
                              rounds=1, init=init)
    got = float(score_permutations(w, 2, 4, perm, score=score))
    np.testing.assert_allclose(got, max(base, neighbours.max()), rtol=1e-6)
    if neighbours.max() <= base:
        np.testing.assert_array_equal(perm, init)


@pytest.mark.parametrize("seed", [3, 4])
def test_swap_converges_to_a_local_optimum(seed):
    w = _weights(seed, (8, 8))
    perm = search_permutation(w, 2, 4, method="swap", key=jax.random.key(seed), rounds=16)
    got = float(score_permutations(w, 2, 4, perm, score="magnitude"))
    neighbours = single_swap_scores(w, 2, 4, perm, "magnitude")
    assert neighbours.max() <= got * (1 + 1e-6)


def test_swap_beats_identity_and_random_on_a_layer():
    n, m = 2, 4
    w = _weights(9, (64, 128))
    key = jax.random.key(0)
    swap = search_permutation(w, n, m, method="swap", key=key)  # default rounds
    rand = search_permutation(w, n, m, method="random", key=key, num_candidates=100)
    scores = score_permutations(w, n, m, jnp.stack([jnp.arange(128), rand, swap]),
                                score="magnitude")
    assert float(scores[2]) > float(scores[1]) and float(scores[2]) > float(scores[0])


# ----------------------------------------------------------------------------- jit, determinism


@pytest.mark.parametrize("method", ["random", "swap"])
def test_search_deterministic_and_jittable(method):
    n, m, shape = CASES[0]
    w = _weights(4, shape)
    key = jax.random.key(5)
    eager = search_permutation(w, n, m, method=method, key=key)
    again = search_permutation(w, n, m, method=method, key=key)
    jitted = jax.jit(functools.partial(search_permutation, n=n, m=m, method=method))(w, key=key)
    np.testing.assert_array_equal(eager, again)
    np.testing.assert_array_equal(eager, jitted)


@pytest.mark.parametrize("method", ["random", "swap"])
def test_search_over_row_blocks_summed_by_axis_name_is_the_whole_search(method):
    # The rows (in) split in 4 blocks, one per mapped device (vmap stands in for shard_map's
    # mesh axis); count scores are integers, so the summed scores are exactly the whole's.
    w = _weights(6, (32, 16))
    key = jax.random.key(2)
    kw = dict(method=method, key=key, score="count")
    if method == "random":
        kw["num_candidates"] = 8
    whole = search_permutation(w, 2, 4, **kw)
    blocks = jax.vmap(lambda b: search_permutation(b, 2, 4, axis_name="rows", **kw),
                      axis_name="rows")(w.reshape(4, 8, 16))
    for perm in blocks:
        np.testing.assert_array_equal(perm, whole)
    with pytest.raises(TypeError, match="axis_name"):
        search_permutation(w, 2, 4, axis_name=3, **kw)


def test_random_search_depends_on_key():
    n, m, shape = CASES[0]
    w = _weights(4, shape)
    perms = {tuple(np.asarray(search_permutation(w, n, m, method="random",
                                                 key=jax.random.key(s))))
             for s in range(4)}
    assert len(perms) > 1


def test_bimask_under_jit_matches_eager():
    n, m, shape = CASES[2]
    w = _weights(6, shape)
    perm = jax.random.permutation(jax.random.key(1), shape[1])
    fn = jax.jit(functools.partial(bimask, n=n, m=m))
    for got, want in zip(fn(w, perm=perm), bimask(w, n, m, perm=perm), strict=True):
        np.testing.assert_array_equal(got, want)
    fn = jax.jit(functools.partial(bimask, n=n, m=m, search="swap"))
    key = jax.random.key(2)
    for got, want in zip(fn(w, key=key), bimask(w, n, m, search="swap", key=key), strict=True):
        np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- permutation helpers


def test_permutation_helpers_round_trip():
    perm = jax.random.permutation(jax.random.key(0), 12)
    inv = invert_permutation(perm)
    np.testing.assert_array_equal(perm[inv], np.arange(12))
    np.testing.assert_array_equal(inv[perm], np.arange(12))
    a = _weights(1, (3, 5, 12))
    np.testing.assert_array_equal(permute_out(a, perm), a[..., perm])
    np.testing.assert_array_equal(unpermute_out(permute_out(a, perm), perm), a)
    np.testing.assert_array_equal(permute_out(unpermute_out(a, perm), perm), a)


@pytest.mark.parametrize("case", CASES)
def test_input_gradient_in_permuted_order(case):
    n, m, shape = case
    w = _weights(7, shape)
    fwd, bwd, perm = bimask(w, n, m, search="swap", key=jax.random.key(1))
    dy = _weights(8, (5, shape[1]))
    w_bwd = jnp.where(bwd, w, 0)
    dx = dy @ w_bwd.T
    dx_perm = permute_out(dy, perm) @ permute_out(w_bwd, perm).T
    np.testing.assert_allclose(dx_perm, dx, rtol=1e-5, atol=1e-5)
    # the permuted backward weight is N:M with contiguous groups along out
    assert bool(is_nm(permute_out(bwd, perm), n, m, axis=1))
    # and the custom-VJP view: the input gradient of x @ (w*fwd) with w*bwd in its place
    x = _weights(9, (5, shape[0]))
    _, vjp = jax.vjp(lambda x_: x_ @ w_bwd, x)
    np.testing.assert_allclose(vjp(dy)[0], dx_perm, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- pytrees


def test_tree_rule_builds_bimasks():
    params = {"Dense_0": {"kernel": _weights(0, (8, 16)), "bias": jnp.zeros(16)},
              "Dense_1": {"kernel": _weights(1, (16, 8)), "bias": jnp.zeros(8)}}
    spec = BiMask(2, 4, search="swap")
    rule = MaskRule(spec)
    masks = build_masks(params, rule)          # identity permutations until a search runs
    assert masks["Dense_0"]["bias"] is None
    for name in ("Dense_0", "Dense_1"):
        leaf = masks[name]["kernel"]
        assert isinstance(leaf, Masks)
        _check_valid(leaf, params[name]["kernel"], 2, 4)
        np.testing.assert_array_equal(leaf.perm, np.arange(leaf.perm.shape[0]))
        assert bool(spec.valid(leaf))
        searched = spec(params[name]["kernel"], key=jax.random.key(0))
        direct = bimask(params[name]["kernel"], 2, 4, search="swap", key=jax.random.key(0))
        for a, b in zip(searched, direct, strict=True):
            np.testing.assert_array_equal(a, b)
    sparse = apply_masks(params, masks)
    np.testing.assert_array_equal(
        sparse["Dense_0"]["kernel"],
        jnp.where(masks["Dense_0"]["kernel"].fwd, params["Dense_0"]["kernel"], 0))


# ----------------------------------------------------------------------------- bad input


W = jnp.ones((8, 8))
KEY = jax.random.key(0)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: bimask(jnp.ones(8), 2, 4), ValueError, r"Dense kernel of shape \(in, out\)"),
        (lambda: bimask(jnp.ones((4, 4, 4)), 2, 4), ValueError, r"got shape \(4, 4, 4\)"),
        (lambda: bimask(jnp.ones((6, 8)), 2, 4), ValueError, r"axis 0 \(length 6\).*m=4"),
        (lambda: bimask(jnp.ones((8, 6)), 2, 4), ValueError, r"axis 1 \(length 6\).*m=4"),
        (lambda: bimask(W > 0, 2, 4), TypeError, "boolean"),
        (lambda: bimask(W, 5, 4), ValueError, "n must be <= m"),
        (lambda: bimask(W, 2.0, 4), TypeError, "n must be a Python int"),
        (lambda: bimask(W, 2, 4, perm=jnp.arange(7)), ValueError, r"shape \(8,\)"),
        (lambda: bimask(W, 2, 4, perm=jnp.zeros(8, int)), ValueError, "not a permutation"),
        (lambda: bimask(W, 2, 4, perm=jnp.arange(8.0)), TypeError, "integer index array"),
        (lambda: bimask(W, 2, 4, perm=jnp.arange(8), search="swap", key=KEY), ValueError,
         "either perm or search"),
        (lambda: bimask(W, 2, 4, key=KEY), ValueError, r"\['key'\] need search="),
        (lambda: bimask(W, 2, 4, rounds=3), ValueError, r"\['rounds'\] need search="),
        (lambda: bimask(W, 2, 4, search="greedy", key=KEY), ValueError, "method must be one of"),
        (lambda: search_permutation(W, 2, 4, method="random"), ValueError, "needs a PRNG key"),
        (lambda: search_permutation(W, 2, 4, key=jnp.ones(3)), TypeError,
         "single PRNG key"),
        (lambda: search_permutation(W, 2, 4, key=KEY, score="l2"), ValueError,
         "score must be one of"),
        (lambda: search_permutation(W, 2, 4, method="random", key=KEY, num_candidates=0),
         ValueError, "num_candidates must be >= 1"),
        (lambda: search_permutation(W, 2, 4, key=KEY, rounds=-1), ValueError,
         "rounds must be >= 0"),
        (lambda: search_permutation(W, 2, 4, key=KEY, rounds=1.5), TypeError,
         "rounds must be a Python int"),
        (lambda: search_permutation(W, 2, 4, key=KEY, init=jnp.arange(8)[::-1][:4]),
         ValueError, r"init must have shape \(8,\)"),
        (lambda: search_permutation(W, 2, 4, method="random", key=KEY, init=jnp.arange(8)),
         ValueError, "init is an option of method='swap'"),
        (lambda: search_permutation(W, 2, 4, method="random", key=KEY, rounds=2),
         ValueError, "rounds is an option of method='swap'"),
        (lambda: search_permutation(W, 2, 4, method="swap", key=KEY, num_candidates=5),
         ValueError, "num_candidates is an option of method='random'"),
        (lambda: BiMask(2, 4, search="swap", num_candidates=5), ValueError,
         "num_candidates is an option of search='random'"),
        (lambda: BiMask(2, 4)(W, perm=jnp.arange(8), key=KEY), ValueError,
         "either perm .* or key"),
        (lambda: score_permutations(W, 2, 4, jnp.zeros((2, 8), int)), ValueError,
         r"perms\[0\] is not a permutation"),
        (lambda: score_permutations(W, 2, 4, jnp.zeros((2, 6), int)), ValueError,
         r"perms must have shape \(K, 8\)"),
        (lambda: score_permutations(W, 2, 4, jnp.zeros((2, 8))), TypeError,
         "perms must be an integer index array"),
        (lambda: invert_permutation(jnp.array([0, 0, 1])), ValueError, "not a permutation"),
        (lambda: permute_out(jnp.ones((3, 4)), jnp.arange(5)), ValueError, r"shape \(4,\)"),
        (lambda: unpermute_out(jnp.float32(1), jnp.arange(1)), ValueError, "scalar"),
        (lambda: random_candidates(KEY, 8, 0), ValueError, "num_candidates must be >= 1"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()



def test_conv_kernels_take_one_output_permutation_for_every_position():
    from nmjax import ops

    w = _weights(3, (3, 3, 8, 16))                       # HWIO
    spec = BiMask(2, 4)
    fwd, bwd, perm = masks = spec(w, 2, key=jax.random.key(0))
    assert bool(spec.valid(masks, axis=2))
    assert bool(is_nm(fwd, 2, 4, axis=2, exact=True))
    assert bool(is_nm(bwd[..., perm], 2, 4, axis=3))
    # The same masks as the Dense Bi-Mask of the (H*W*I, O) view, position by position.
    flat = bimask(w.reshape(-1, 16), 2, 4, perm)
    np.testing.assert_array_equal(bwd, flat.bwd.reshape(w.shape))
    # nm_conv's input gradient uses bwd (in perm order): the masked reference's gradient.
    x = _weights(4, (2, 6, 6, 8))
    dy = _weights(5, (2, 6, 6, 16))
    _, vjp = jax.vjp(lambda x: ops.nm_conv(x, w, masks), x)
    _, ref = jax.vjp(lambda x: jax.lax.conv_general_dilated(
        x, jnp.where(bwd, w, 0), (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC")), x)
    np.testing.assert_allclose(vjp(dy)[0], ref(dy)[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="contraction axis is next to the output axis"):
        spec(w, 1)
