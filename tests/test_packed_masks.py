"""The optimizer's compact mask state: bytes per weight for each pattern, exact round trips
of the bit packing, and the public accessors giving ordinary Masks."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import nmjax
from nmjax._packed_masks import PackedMasks, pack, pack_axis, pack_bits, unpack_bits
from nmjax.masks import Masks
from nmjax.nn import sync
from nmjax.optim import find_state, masks_of, sparse
from nmjax.plan import Layout
from nmjax.tree import MaskRule

X = jnp.ones((2, 64))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(128)(x))                                   # (64, 128)
        w = self.param("proj", nn.initializers.lecun_normal(), (32, 128))  # (out, in)
        return jnp.einsum("bi,oi->bo", h, w)


PARAMS = MLP().init(jax.random.key(0), X)["params"]


def get_path(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def mask_state_bytes(state) -> tuple[int, int]:
    """(bytes of mask state, weights they cover) over the state's packed leaves."""
    leaves = [m for m in jax.tree.leaves(state.masks, is_leaf=lambda x: isinstance(
        x, PackedMasks)) if isinstance(m, PackedMasks)]
    # The packed axis's marker (axis + 1 bytes per kernel) is left out of the count.
    assert leaves, "no packed masks in the state"
    return sum(m.nbytes for m in leaves), sum(math.prod(m.shape) for m in leaves)


# Bytes of mask state per weight: 1 bit per stored mask, plus Bi-Mask's int32 permutation
# (one per output column: 128 + 32 columns over 64*128 + 32*128 weights).
PERM_BYTES = 4 * (128 + 32) / (64 * 128 + 32 * 128)


@pytest.mark.parametrize("pattern, want", [
    ("2:4", 1 / 8), ("4:8", 1 / 8), ("2:4 transposable", 1 / 8),
    ("2:4 bimask", 2 / 8 + PERM_BYTES)])
def test_mask_state_bytes_per_weight(pattern, want):
    plan = nmjax.resolve(MLP(), pattern, X)
    tx = sparse(optax.adam(1e-3), plan, refresh_every=1)
    state = tx.init(PARAMS)
    size, weights = mask_state_bytes(state)
    assert size / weights == pytest.approx(want)
    assert size / weights <= (0.125 if "bimask" not in pattern else 0.25 + PERM_BYTES)
    # The accessor gives ordinary masks, equal to the plan's masks of the parameters.
    want_masks = plan.masks(PARAMS)
    got = masks_of(state)
    for leaf in plan.leaves:
        g, w = get_path(got, leaf.path), get_path(want_masks, leaf.path)
        assert isinstance(g, Masks) and g.fwd.dtype == jnp.bool_ and g.fwd.shape == leaf.shape
        np.testing.assert_array_equal(g.fwd, w.fwd)
        np.testing.assert_array_equal(g.bwd, w.bwd)
    # One jitted step keeps the state compact (refresh_every=1 re-packs every step).
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    _, state = jax.jit(tx.update)(grads, state, PARAMS)
    assert mask_state_bytes(state)[0] == size
    assert bool(plan.valid(masks_of(state)))


@pytest.mark.parametrize("shape, contract, out", [
    ((16, 24), (0,), (1,)),          # Dense (in, out): packed along in
    ((24, 16), (1,), (0,)),          # (out, in): packed along axis 1
    ((3, 3, 8, 12), (0, 1, 2), (3,)),  # conv HWIO: along I
    ((4, 12), (0,), (1,)),           # no axis a multiple of 8: stored unpacked
    ((8, 4), (1,), (0,)),            # (out, in) with in = 4: packed along out
])
def test_pack_bits_round_trip(shape, contract, out):
    layout = Layout(shape, (), contract, out)
    axis = pack_axis(layout)
    rng = np.random.default_rng(0)
    for _ in range(3):
        mask = jnp.asarray(rng.random(shape) < 0.5)
        bits = pack_bits(mask, axis)
        if axis is None:
            assert bits.dtype == jnp.bool_ and bits.shape == shape
        else:
            assert axis == (contract[-1] if shape[contract[-1]] % 8 == 0 else out[-1])
            assert bits.dtype == jnp.uint8
            assert bits.shape == (*shape[:axis], shape[axis] // 8, *shape[axis + 1:])
            # Bit j of byte i along the axis is entry 8 i + j.
            moved = np.moveaxis(np.asarray(mask), axis, 0)
            want = np.moveaxis(np.packbits(moved, axis=0, bitorder="little"), 0, axis)
            np.testing.assert_array_equal(bits, want)
        np.testing.assert_array_equal(unpack_bits(bits, shape, axis), mask)
        other = jnp.asarray(rng.random(shape) < 0.5)
        packed = pack(Masks(mask, other & mask), layout, same_masks=False)
        assert packed.shape == shape and packed.axis == axis
        got = packed.expand()
        np.testing.assert_array_equal(got.fwd, mask)
        np.testing.assert_array_equal(got.bwd, other & mask)


def test_init_masks_with_bwd_not_fwd_refused_for_nm():
    plan = nmjax.resolve(MLP(), "2:4", X)
    start = plan.masks(PARAMS)
    bad = jax.tree.map(lambda m: m if m is None else Masks(m.fwd, m.fwd & False),
                       start, is_leaf=lambda m: m is None or isinstance(m, Masks))
    with pytest.raises(ValueError, match=r"init_masks for 'Dense_0/kernel': bwd differs"):
        sparse(optax.sgd(0.1), plan, init_masks=bad).init(PARAMS)
    state = sparse(optax.sgd(0.1), plan, init_masks=start).init(PARAMS)
    got = masks_of(state)
    for leaf in plan.leaves:
        np.testing.assert_array_equal(get_path(got, leaf.path).fwd,
                                      get_path(start, leaf.path).fwd)


class NMLP(nnx.Module):
    def __init__(self, rngs):
        self.body = nnx.Linear(16, 32, rngs=rngs)
        self.head = nnx.Linear(32, 8, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.body(x)))


@pytest.mark.parametrize("pattern", ["2:4", "2:4 bimask"])
def test_nnx_optimizer_keeps_packed_state_and_syncs(pattern):
    x = jnp.ones((4, 16))
    model = NMLP(nnx.Rngs(0))
    plan = nmjax.resolve(model, MaskRule(pattern, exclude="head"), x)
    model = nmjax.nn.sparsify(model, plan, mode="static")
    kwargs = {"perm_every": 2} if "bimask" in pattern else {}
    optimizer = nnx.Optimizer(model, sparse(optax.adam(1e-2), plan, refresh_every=1,
                                            **kwargs), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads)
        sync(model, optimizer)

    for _ in range(3):
        step(model, optimizer)
    state = find_state(optimizer)
    assert int(state.searches) == (1 if "bimask" in pattern else 0)
    from nmjax.nn._sparsify import _nnx_masks

    got, want = _nnx_masks(model)["body/kernel"], state.masks["body"]["kernel"]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    assert bool(plan.valid(state.masks))
