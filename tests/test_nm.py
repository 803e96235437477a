"""N:M masks and the N:M / transposable validators."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nmjax.masks import is_nm, is_transposable, nm_mask

PAIRS = [(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (8, 16), (4, 16)]
SHAPES = [(16,), (16, 8), (2, 16, 4)]
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16, jnp.int32]


def reference_nm_mask(scores: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Loop reference: per group, order by (NaN last, larger first, lower index first)."""
    x = np.moveaxis(np.asarray(scores, dtype=np.float64), axis, -1)
    out = np.zeros(x.shape, bool)
    for idx in np.ndindex(*x.shape[:-1]):
        row = x[idx]
        for g in range(0, row.shape[0], m):
            grp = row[g:g + m]
            order = sorted(range(m), key=lambda i: (np.isnan(grp[i]),
                                                    -np.nan_to_num(grp[i], nan=0.0), i))
            for i in order[:n]:
                out[idx + (g + i,)] = True
    return np.moveaxis(out, -1, axis)


@st.composite
def nm_cases(draw):
    n, m = draw(st.sampled_from(PAIRS))
    shape = list(draw(st.sampled_from(SHAPES)))
    axis = draw(st.integers(0, len(shape) - 1))
    shape[axis] = 16  # every pair's m divides 16
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    ties = draw(st.booleans())
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 3, shape) if ties else rng.standard_normal(shape)
    return n, m, axis, jnp.asarray(x, dtype)


@settings(max_examples=60, deadline=None)
@given(nm_cases())
def test_nm_mask_matches_reference(case):
    n, m, axis, scores = case
    mask = nm_mask(scores, n, m, axis)
    assert mask.dtype == jnp.bool_ and mask.shape == scores.shape
    np.testing.assert_array_equal(mask, reference_nm_mask(scores.astype(jnp.float32), n, m, axis))
    assert bool(is_nm(mask, n, m, axis, exact=True))


@settings(max_examples=30, deadline=None)
@given(nm_cases())
def test_nm_mask_is_optimal(case):
    """No other choice of n per group retains a larger total score."""
    n, m, axis, scores = case
    mask = np.asarray(nm_mask(scores, n, m, axis))
    x = np.moveaxis(np.asarray(scores, np.float64), axis, -1)
    kept = np.where(np.moveaxis(mask, axis, -1), x, 0).reshape(*x.shape[:-1], -1, m).sum(-1)
    best = -np.sort(-x.reshape(*x.shape[:-1], -1, m), axis=-1)[..., :n].sum(-1)
    np.testing.assert_allclose(kept, best, rtol=1e-6)


def test_ties_go_to_lower_index():
    mask = nm_mask(jnp.ones((8, 2)), 2, 4)
    np.testing.assert_array_equal(mask[:, 0], [True, True, False, False] * 2)


def test_nan_ranks_below_every_number():
    scores = jnp.array([jnp.nan, -jnp.inf, 1.0, jnp.nan, jnp.inf, jnp.nan, jnp.nan, jnp.nan])
    mask = nm_mask(scores, 2, 4)
    np.testing.assert_array_equal(mask, [False, True, True, False, True, True, False, False])


def test_nan_raise():
    scores = jnp.array([1.0, jnp.nan, 2.0, 3.0])
    with pytest.raises(ValueError, match="1 NaN"):
        nm_mask(scores, 2, 4, nan="raise")
    with pytest.raises(ValueError, match="needs concrete scores"):
        jax.jit(lambda s: nm_mask(s, 2, 4, nan="raise"))(scores)
    assert bool(is_nm(nm_mask(jnp.nan_to_num(scores), 2, 4, nan="raise"), 2, 4))
    with pytest.raises(ValueError, match="nan must be"):
        nm_mask(scores, 2, 4, nan="ignore")


def test_jit_vmap_grad_and_purity():
    w = np.random.default_rng(0).standard_normal((3, 16, 8)).astype(np.float32)
    before = w.copy()
    eager = nm_mask(jnp.abs(w), 2, 4, axis=1)
    jitted = jax.jit(lambda s: nm_mask(s, 2, 4, axis=1))(jnp.abs(w))
    vmapped = jax.vmap(lambda s: nm_mask(s, 2, 4, axis=0))(jnp.abs(w))
    np.testing.assert_array_equal(eager, jitted)
    np.testing.assert_array_equal(eager, vmapped)
    np.testing.assert_array_equal(w, before)
    g = jax.grad(lambda v: jnp.sum(jnp.where(nm_mask(jnp.abs(v), 2, 4, axis=1), v, 0)))(w)
    np.testing.assert_array_equal(g, np.asarray(eager, np.float32))


def test_is_nm_detects_violations():
    mask = np.asarray(nm_mask(jnp.arange(32.0).reshape(16, 2), 2, 4))
    assert bool(is_nm(mask, 2, 4)) and bool(is_nm(mask, 2, 4, exact=True))
    over = mask.copy()
    over[0, 0] = over[1, 0] = over[2, 0] = True
    assert not bool(is_nm(over, 2, 4))
    under = mask.copy()
    under[:4, 1] = False
    assert bool(is_nm(under, 2, 4)) and not bool(is_nm(under, 2, 4, exact=True))
    # Grouped along the wrong axis, the same mask is not 2:4.
    assert not bool(is_nm(np.eye(4, dtype=bool).repeat(2, 1), 1, 2, axis=1))


def _tile_mask(rng, n, m, rows, cols):
    """A transposable mask made of shifted-diagonal tiles: n ones per tile row/column."""
    tile = np.zeros((m, m), bool)
    for k in range(n):
        tile[np.arange(m), (np.arange(m) + k) % m] = True
    out = np.zeros((rows, cols), bool)
    for i in range(0, rows, m):
        for j in range(0, cols, m):
            out[i:i + m, j:j + m] = tile[rng.permutation(m)][:, rng.permutation(m)]
    return out


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_is_transposable(n, m):
    rng = np.random.default_rng(n * m)
    mask = _tile_mask(rng, n, m, 2 * m, 3 * m)
    assert bool(is_transposable(mask, n, m, exact=True))
    assert bool(is_transposable(np.stack([mask, mask]), n, m, axes=(1, 2)))
    assert bool(is_transposable(mask.T, n, m, exact=True))
    broken = mask.copy()
    broken[0, :m] = True  # a full tile row
    assert not bool(is_transposable(broken, n, m))
    sparse = mask.copy()
    sparse[0] = False
    assert bool(is_transposable(sparse, n, m)) and not bool(is_transposable(sparse, n, m,
                                                                               exact=True))
    # An N:M-along-axis-0 mask is usually not transposable.
    nm = np.asarray(nm_mask(jnp.asarray(rng.standard_normal((2 * m, 3 * m))), n, m))
    assert bool(is_nm(nm, n, m)) and not bool(is_transposable(nm, n, m))


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: nm_mask(jnp.ones(8), 5, 4), ValueError, "n must be <= m"),
        (lambda: nm_mask(jnp.ones(8), 0, 4), ValueError, "n must be >= 1"),
        (lambda: nm_mask(jnp.ones(8), 2.0, 4), TypeError, "n must be a Python int"),
        (lambda: nm_mask(jnp.ones(8), 2, 0), ValueError, "m must be >= 1"),
        (lambda: nm_mask(jnp.ones((6, 4)), 2, 4), ValueError,
         r"shape \(6, 4\); its axis 0 \(length 6\) must be divisible by m=4"),
        (lambda: nm_mask(jnp.ones((8, 4)), 2, 4, axis=2), ValueError, "axis=2 is out of range"),
        (lambda: nm_mask(jnp.ones((8, 4)), 2, 4, axis=0.5), TypeError, "axis must be an int"),
        (lambda: nm_mask(jnp.ones(8, bool), 2, 4), TypeError, "got a boolean array"),
        (lambda: nm_mask(jnp.ones(8, jnp.complex64), 2, 4), TypeError, "complex"),
        (lambda: nm_mask(jnp.float32(1.0), 1, 1), ValueError, "scalar"),
        (lambda: is_nm(jnp.ones(8), 2, 4), TypeError, "mask must be a boolean array"),
        (lambda: is_nm(jnp.ones(6, bool), 2, 4), ValueError, "divisible by m=4"),
        (lambda: is_transposable(jnp.ones(8, bool), 2, 4), ValueError, "rank >= 2"),
        (lambda: is_transposable(jnp.ones((8, 6), bool), 2, 4), ValueError, "length 6"),
        (lambda: is_transposable(jnp.ones((8, 8), bool), 2, 4, axes=(1, 1)), ValueError,
         "two different axes"),
        (lambda: is_transposable(jnp.ones((8, 8), bool), 2, 4, axes=0), TypeError,
         "axes must be a pair of ints, got 0"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_python_lists_are_accepted():
    assert bool(is_nm([True, False, True, False], 2, 4, exact=True))
    np.testing.assert_array_equal(nm_mask([3.0, 1.0, 2.0, 0.0], 2, 4), [True, False, True, False])
    with pytest.raises(TypeError, match="got a boolean array"):
        nm_mask([True, False], 1, 2)


def _ref_rank_mask(scores, n, axis):
    """Stable numpy reference: NaN last, larger first, ties to the lower index."""
    g = np.moveaxis(np.asarray(scores, np.float64), axis, -1)
    key = np.where(np.isnan(g), np.inf, -g)
    order = np.argsort(key, axis=-1, kind="stable")
    keep = np.zeros(g.shape, bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    return np.moveaxis(keep, -1, axis)


@pytest.mark.parametrize("m", [40, 64])
def test_large_groups_sort_with_the_same_ties_and_nan_rule(m):
    rng = np.random.default_rng(m)
    scores = rng.integers(0, 5, (m, 6)).astype(np.float32)   # many ties
    scores[rng.random(scores.shape) < 0.1] = np.nan
    scores[0, 0] = np.inf
    scores[1, 1] = -np.inf
    got = np.asarray(nm_mask(scores, 7, m))
    np.testing.assert_array_equal(got, _ref_rank_mask(scores, 7, 0))
    ints = rng.integers(-2**31, 2**31 - 1, (m, 3)).astype(np.int32)  # ~x, not -x: no overflow
    np.testing.assert_array_equal(np.asarray(nm_mask(ints, 3, m)), _ref_rank_mask(ints, 3, 0))


def test_one_group_of_4096_stays_small():
    """A group of M = 4096 ranks by sorting (O(M log M)), not by an M x M comparison."""
    scores = jnp.asarray(np.random.default_rng(0).standard_normal((4096, 256)), jnp.float32)
    compiled = jax.jit(lambda s: nm_mask(s, 2, 4096)).lower(scores).compile()
    analysis = compiled.memory_analysis()
    if analysis is not None:  # the M x M path needed > 17 GB of temporaries
        assert analysis.temp_size_in_bytes < 64 * 2**20
    mask = np.asarray(nm_mask(scores, 2, 4096))
    assert (mask.sum(0) == 2).all()
    np.testing.assert_array_equal(mask, _ref_rank_mask(np.asarray(scores), 2, 0))


def test_host_scores_are_never_narrowed_silently():
    big = np.array([2**40, 3, 1, 2], np.int64)
    with pytest.raises(ValueError, match=r"outside int32; JAX \(x64 off\) would wrap them"):
        nm_mask(big, 2, 4)
    close = np.array([1.0, 1.0 + 1e-12, 0.5, 0.25])
    with pytest.warns(UserWarning, match="1 distinct value"):
        nm_mask(close, 1, 4)
    np.testing.assert_array_equal(nm_mask(np.array([4, 3, 1, 2], np.int64), 2, 4),
                                  [True, True, False, False])  # in range: fine


def test_is_permutation_is_jittable():
    from nmjax.masks import is_permutation

    check = jax.jit(is_permutation)
    assert bool(check(jnp.array([3, 1, 0, 2])))
    assert not bool(check(jnp.array([3, 1, 1, 2])))
    assert not bool(check(jnp.array([0, 1, 2, 4])))
    assert not bool(check(jnp.array([-1, 1, 2, 0])))
    with pytest.raises(TypeError, match="integer index array"):
        is_permutation(jnp.arange(3.0))
