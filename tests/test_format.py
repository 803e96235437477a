"""The canonical packed N:M format: exact round trips and the documented bit layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nmjax import format as nmf
from nmjax.masks import nm_mask

PAIRS = [(1, 1), (1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (3, 8), (8, 16), (5, 16), (16, 16)]


@st.composite
def pack_cases(draw):
    n, m = draw(st.sampled_from(PAIRS))
    shape = list(draw(st.sampled_from([(32,), (32, 3), (2, 32, 5)])))
    axis = draw(st.integers(0, len(shape) - 1))
    shape[axis] = 32
    dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16, jnp.int8]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    w = jnp.asarray(rng.integers(-9, 10, shape), dtype)
    mask = np.asarray(nm_mask(jnp.asarray(rng.random(shape)), n, m, axis))
    if draw(st.booleans()):  # under-filled groups: drop some kept entries
        mask = mask & (rng.random(shape) < 0.6)
    return w, jnp.asarray(mask), n, m, axis


@settings(max_examples=30, deadline=None)
@given(pack_cases())
def test_round_trip(case):
    w, mask, n, m, axis = case
    packed = nmf.pack(w, mask, n, m, axis)
    k = w.shape[axis]
    assert packed.values.shape == w.shape[:axis] + (k * n // m,) + w.shape[axis + 1:]
    assert packed.values.dtype == w.dtype and packed.meta.dtype == jnp.uint32
    np.testing.assert_array_equal(nmf.unpack(packed), jnp.where(mask, w, 0))
    # Every group names n distinct ascending indices (the hardware rule).
    idx = np.moveaxis(np.asarray(nmf.slot_indices(packed)), axis, -1)
    idx = idx.reshape(*idx.shape[:-1], -1, n)
    assert ((idx >= 0) & (idx < m)).all()
    assert (np.diff(idx, axis=-1) > 0).all()
    # The mask is recoverable wherever kept values are nonzero.
    np.testing.assert_array_equal(nmf.unpack_mask(packed), mask & (w != 0))


def test_meta_is_compact():
    w = jnp.ones((64, 8))
    mask = nm_mask(w, 2, 4)
    packed = nmf.pack(w, mask, 2, 4)
    # 16 groups x 2 indices x 2 bits = 64 bits = 2 words per column.
    assert packed.meta.shape == (2, 8)
    packed = nmf.pack(w, nm_mask(w, 8, 16), 8, 16)
    assert packed.meta.shape == (4, 8)  # 4 groups x 8 indices x 4 bits


def test_24_nibble_layout():
    """2:4: one nibble per group, lower index in the low bits, group j at bits 4j."""
    keep = [(0, 1), (1, 3), (0, 2), (2, 3), (0, 3), (1, 2), (0, 1), (2, 3)]
    mask = np.zeros(32, bool)
    for g, (a, b) in enumerate(keep):
        mask[4 * g + a] = mask[4 * g + b] = True
    packed = nmf.pack(jnp.arange(1.0, 33.0), jnp.asarray(mask), 2, 4)
    expected = sum((a | (b << 2)) << (4 * g) for g, (a, b) in enumerate(keep))
    assert int(packed.meta[0]) == expected
    np.testing.assert_array_equal(packed.values, np.flatnonzero(mask) + 1.0)


def test_underfilled_group_uses_distinct_indices():
    mask = jnp.asarray([False, False, True, False, False, False, False, False])
    packed = nmf.pack(jnp.arange(1.0, 9.0), mask, 2, 4)
    np.testing.assert_array_equal(nmf.slot_indices(packed), [0, 2, 0, 1])
    np.testing.assert_array_equal(packed.values, [0.0, 3.0, 0.0, 0.0])


def test_jit_and_pytree():
    w = jax.random.normal(jax.random.key(0), (16, 4))
    mask = nm_mask(jnp.abs(w), 2, 4)
    packed = jax.jit(lambda a, b: nmf.pack(a, b, 2, 4))(w, mask)
    np.testing.assert_array_equal(jax.jit(nmf.unpack)(packed), jnp.where(mask, w, 0))
    leaves = jax.tree.leaves(packed)
    assert len(leaves) == 2  # values and meta; the pattern is static


@pytest.mark.parametrize(
    "args, exc, match",
    [
        ((jnp.ones((8, 2)), jnp.ones((8, 2), bool), 2, 4), ValueError,
         r"keeps more than n=2 of some group of m=4"),
        ((jnp.ones((8, 2)), jnp.ones((8, 3), bool), 2, 4), ValueError,
         r"mask shape \(8, 3\) must equal w shape \(8, 2\)"),
        ((jnp.ones((8, 2)), jnp.ones((8, 2)), 2, 4), TypeError, "mask must be a boolean"),
        ((jnp.ones((64, 2)), jnp.ones((64, 2), bool), 2, 32), ValueError, "m must be <= 16"),
        ((jnp.ones((6, 2)), jnp.ones((6, 2), bool), 2, 4), ValueError, "divisible by m=4"),
        ((jnp.ones((8, 2)), jnp.ones((8, 2), bool), 3, 2), ValueError, "n must be <= m"),
    ],
)
def test_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        nmf.pack(*args)


@pytest.mark.parametrize("m", [2, 4, 8])
def test_slot_table_equals_the_sorting_rule_for_every_group(m):
    """Groups of m <= 8 look their slots up by bit code; the rule is the sorting one."""
    import itertools

    from nmjax import format as fmt

    groups = jnp.asarray(list(itertools.product([False, True], repeat=m)))
    for n in range(1, m + 1):
        key = jnp.where(groups, 0, m) + jnp.arange(m)  # kept first, then by index
        want = jnp.sort(jnp.sort(key, axis=-1)[..., :n] % m, axis=-1)
        np.testing.assert_array_equal(fmt._slot_indices(groups, n), want)
