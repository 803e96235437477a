"""Defects a hostile review found (issue 21, section 4), one test each. Each failed before its
fix, except the chain-order test (it pins the documented behaviour) and the ``build_masks``
shorthand (fixed on main by the plan rework meanwhile)."""

from __future__ import annotations

import copy
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.experimental import checkify

import nmjax
from nmjax import format as nmformat
from nmjax import ops
from nmjax.masks import NM, BiMask, Custom, Masks, Transposable, is_nm, nm_mask
from nmjax.nn import Sparsity
from nmjax.optim import masks_of, nm_schedule, sparse
from nmjax.tree import MaskRule, build_masks

KEY = jax.random.key(0)
PARAMS = {"Dense_0": {"kernel": jax.random.normal(KEY, (8, 8)), "bias": jnp.zeros(8)},
          "head": {"kernel": jax.random.normal(jax.random.key(1), (8, 3))}}
GRADS = jax.tree.map(lambda p: jnp.full_like(p, 0.1), PARAMS)


def test_bimask_random_search_trains_in_the_optimizer():
    # Was: the first update raised "init is an option of method='swap'".
    pattern = BiMask(2, 4, search="random", num_candidates=4)
    tx = sparse(optax.adam(1e-2), MaskRule(pattern, exclude="head"), perm_every=1)
    state = tx.init(PARAMS)
    params = PARAMS
    for _ in range(2):
        updates, state = tx.update(GRADS, state, params)
        params = optax.apply_updates(params, updates)
    assert int(state.searches) == 2
    masks = masks_of(state)["Dense_0"]["kernel"]
    assert bool(pattern.valid(masks, axis=0))


# ------------------------------------------------------------------------------ decay

GOOD_DECAYS = [0, 1, 0.5, np.float64(0.1), jnp.float32(0.1), jnp.int32(2)]
BAD_DECAYS = [(True, TypeError), (-1.0, ValueError), (float("inf"), ValueError),
              (float("nan"), ValueError), (jnp.ones(2), TypeError), ("0.1", TypeError),
              (1 + 2j, TypeError)]


def _decay_takers():
    x, w = jnp.ones((2, 8)), jnp.ones((8, 4))
    mask = nm_mask(w, 2, 4)
    return {
        "ops.nm_dense": lambda d: ops.nm_dense(x, w, mask, decay=d),
        "nn.Sparsity": lambda d: Sparsity("2:4", decay=d),
        "optim.sparse": lambda d: sparse(optax.sgd(0.1), "2:4", decay=d),
    }


@pytest.mark.parametrize("decay", GOOD_DECAYS, ids=repr)
def test_every_decay_taker_accepts_the_same_values(decay):
    for take in _decay_takers().values():
        take(decay)


@pytest.mark.parametrize(("decay", "error"), BAD_DECAYS, ids=lambda v: repr(v)[:20])
def test_every_decay_taker_refuses_the_same_values(decay, error):
    for name, take in _decay_takers().items():
        with pytest.raises(error, match="decay"):
            take(decay)
            pytest.fail(f"{name} accepted decay={decay!r}")


def test_decay_has_one_owner_in_static_mode():
    # Once: sparsify(..., mode="static", decay=λ) with optim.sparse(..., decay=λ) applied 2λ.
    for decay in (2e-4, jnp.float32(2e-4)):
        with pytest.raises(ValueError, match=r"mode='static'.*nmjax.optim.sparse\(\.\.\., "
                                             r"decay=λ\)"):
            Sparsity("2:4", mode="static", decay=decay)
    assert Sparsity("2:4", mode="static", decay=0).decay == 0.0
    assert Sparsity("2:4", mode="dynamic", decay=2e-4).decay == 2e-4


# --------------------------------------------------------------------- specs as values


@pytest.mark.parametrize("spec", [NM(2, 4), Transposable(2, 4), BiMask(2, 4),
                                  MaskRule("2:4 transposable", exclude="head")], ids=repr)
def test_specs_pickle_and_deepcopy_equal(spec):
    for again in (pickle.loads(pickle.dumps(spec)), copy.deepcopy(spec)):
        assert again == spec and hash(again) == hash(spec)


def test_equal_rules_do_not_recompile():
    traces = []

    @jax.jit
    def masked(w, rule):
        traces.append(rule)
        return build_masks({"k": w}, rule)["k"].fwd

    masked = jax.jit(masked.__wrapped__, static_argnums=1)
    w = jnp.arange(32.0).reshape(8, 4)
    rule = MaskRule("2:4", include="k", axis=0)
    first = masked(w, rule)
    np.testing.assert_array_equal(masked(w, copy.deepcopy(rule)), first)
    assert len(traces) == 1


def test_deep_copied_sparse_layer_keeps_an_equal_sparsity():
    # Was: a deep copy's NM(2, 4) held another jnp.abs, so its Sparsity compared unequal
    # ("sparse already (2:4 nm) ... other settings (2:4 nm)").
    layer = nmjax.nn.nnx.SparseLinear(8, 4, sparsity=Sparsity("2:4"), rngs=nnx.Rngs(0))
    again = copy.deepcopy(layer)
    assert again.sparsity == layer.sparsity and hash(again.sparsity) == hash(layer.sparsity)
    x = jnp.ones((2, 8))
    np.testing.assert_array_equal(again(x), layer(x))


# ------------------------------------------------------------------- checked traced paths


def test_jitted_pack_of_a_mask_that_is_not_nm_is_caught_by_checkify():
    w = jnp.arange(8.0).reshape(8, 1)
    dense = jnp.ones((8, 1), bool)  # keeps 4 of every 4: not 2:4
    with pytest.raises(ValueError, match="keeps more than n=2"):
        nmformat.pack(w, dense, 2, 4)
    checked = checkify.checkify(jax.jit(nmformat.pack, static_argnums=(2, 3, 4)))
    err, _ = checked(w, dense, 2, 4)
    with pytest.raises(checkify.JaxRuntimeError, match="keeps more than n=2 of some group"):
        err.throw()
    err, packed = checked(w, nm_mask(w, 2, 4), 2, 4)
    assert err.get() is None and packed.values.shape == (4, 1)


def _bimask_step(check_perms=True):
    tx = sparse(optax.sgd(0.1), MaskRule(BiMask(2, 4), exclude="head"), perm_every=1000,
                check_perms=check_perms)
    return tx, jax.jit(tx.update)


def _with_perm(state, perm):
    masks = masks_of(state)
    masks["Dense_0"]["kernel"] = masks["Dense_0"]["kernel"]._replace(perm=perm)
    return state._replace(masks=masks)


def test_optimizer_refresh_refuses_an_invalid_traced_permutation():
    # Was: a zero permutation gave an all-false backward mask (dX of the layer 0), silently.
    tx, update = _bimask_step()
    state = tx.init(PARAMS)
    _, good = update(GRADS, state, PARAMS)
    assert bool(is_nm(masks_of(good)["Dense_0"]["kernel"].fwd, 2, 4))
    bad = _with_perm(state, jnp.zeros(8, jnp.int32))
    with pytest.raises(Exception, match=r"permutation of \['Dense_0/kernel'\] is not a "
                                        r"permutation"):
        jax.block_until_ready(update(GRADS, bad, PARAMS))
    # check_perms=False: the documented cost of skipping the check is a wrong mask.
    tx, update = _bimask_step(check_perms=False)
    _, state = update(GRADS, _with_perm(tx.init(PARAMS), jnp.zeros(8, jnp.int32)), PARAMS)
    assert not bool(masks_of(state)["Dense_0"]["kernel"].bwd.any())


def test_wrapper_before_other_transforms_refreshes_from_parameters_never_applied():
    # Documented at nmjax.optim.sparse: the refresh reads params + inner's updates, so a
    # transform after it in a chain makes the masks lag the real parameters.
    pattern = NM(1, 4)
    rule = MaskRule(pattern, include="k", axis=0)
    params = {"k": jnp.array([[5.0], [2.0], [3.0], [4.0]])}
    grads = {"k": jnp.array([[5.0], [0.0], [0.0], [0.0]])}
    tx = optax.chain(sparse(optax.sgd(1.0), rule), optax.scale(-1.0))
    updates, state = tx.update(grads, tx.init(params), params)
    applied = optax.apply_updates(params, updates)["k"]                   # [10, 2, 3, 4]
    seen = params["k"] - grads["k"]                                       # [0, 2, 3, 4]
    got = masks_of(state)["k"].fwd
    np.testing.assert_array_equal(got, pattern(seen).fwd)
    assert not bool((got == pattern(applied).fwd).all())
    # Last in the chain, the masks follow the applied parameters.
    tx = optax.chain(optax.scale(-1.0), sparse(optax.sgd(1.0), rule))
    updates, state = tx.update(grads, tx.init(params), params)
    applied = optax.apply_updates(params, updates)["k"]
    np.testing.assert_array_equal(masks_of(state)["k"].fwd, pattern(applied).fwd)


def test_custom_pattern_declarations_are_checked():
    w = jnp.ones((8, 4))
    dense = Custom(lambda w, axis: jnp.ones(w.shape, bool), fwd_nm=(2, 4))
    with pytest.raises(ValueError, match=r"declares fwd_nm=\(2, 4\).*keeps more than 2"):
        dense(w)
    loose_bwd = Custom(lambda w, axis: Masks(nm_mask(jnp.abs(w), 2, 4, axis),
                                             jnp.ones(w.shape, bool), None),
                       fwd_nm=(2, 4), bwd_nm=(2, 4))
    with pytest.raises(ValueError, match=r"declares bwd_nm=\(2, 4\).*output axis"):
        loose_bwd(w)
    err, _ = checkify.checkify(jax.jit(lambda w: dense(w).fwd))(w)
    with pytest.raises(checkify.JaxRuntimeError, match="declares fwd_nm"):
        err.throw()
    honest = Custom(lambda w, axis: nm_mask(jnp.abs(w), 2, 4, axis), fwd_nm=(2, 4))
    assert int(honest(jax.random.normal(KEY, (8, 4))).fwd.sum()) == 16


# ---------------------------------------------------------------- refused at the call


@pytest.mark.parametrize("make", [
    lambda: sparse(optax.sgd(0.1), "2:4", refresh_every=2**40),
    lambda: sparse(optax.sgd(0.1), "2:4 bimask", perm_every=2**31),
    lambda: nm_schedule("2:4", finetune_from=2**40),
    lambda: nm_schedule("2:4", warmup=2**31),
    lambda: sparse(optax.sgd(0.1), "2:4", stages=((0, None), (2**31, "2:4"))),
], ids=["refresh_every", "perm_every", "finetune_from", "warmup", "stage start"])
def test_step_counts_beyond_int32_are_refused(make):
    with pytest.raises(ValueError, match=r"beyond int32 \(max 2147483647\)"):
        make()
    assert nm_schedule("2:4", finetune_from=2**31 - 1)[-1] == (2**31 - 1, None)


def test_a_ramp_shorter_than_its_patterns_says_so():
    with pytest.raises(ValueError, match=r"ramp=3 is shorter than the 6 intermediate patterns "
                                         r"of a ramp to '1:8 nm' \(7:8, 6:8, .*2:8\).*>= 6"):
        nm_schedule("1:8", warmup=5, ramp=3)
    stages = nm_schedule("1:8", warmup=5, ramp=6)
    assert [s for s, _ in stages] == [0, 5, 6, 7, 8, 9, 10, 11]


def test_bad_rule_fields_and_kernel_shapes_raise_clear_errors():
    with pytest.raises(TypeError, match="include must be a regex string or a sequence"):
        MaskRule(include=5)
    with pytest.raises(TypeError, match="exclude must be a regex string"):
        MaskRule(exclude=3.0)
    with pytest.raises(ValueError, match=r"w_shape must be a 2-D kernel shape \(in, out\), "
                                         r"got \(3, 8, 4\)"):
        ops.which_backends((2, 8), (3, 8, 4))
    with pytest.raises(ValueError, match="must end with the kernel's in = 8"):
        ops.which_backends((2, 6), (8, 4))
    with pytest.raises(TypeError, match="x_shape must be a sequence of non-negative ints"):
        ops.which_backends(8, (8, 4))


def test_build_masks_takes_the_shorthand():
    params = {"Dense_0": PARAMS["Dense_0"], "Dense_1": {"kernel": PARAMS["head"]["kernel"]}}
    short = build_masks(params, "2:4")
    full = build_masks(params, MaskRule("2:4"))
    for a, b in zip(jax.tree.leaves(short), jax.tree.leaves(full), strict=True):
        np.testing.assert_array_equal(a, b)
    assert short["Dense_0"]["bias"] is None
    np.testing.assert_array_equal(build_masks(params, NM(2, 4))["Dense_1"]["kernel"].fwd,
                                  full["Dense_1"]["kernel"].fwd)


# ------------------------------------------------------- the backend protocol (section 2)


def test_precision_is_part_of_the_problem_a_backend_sees_and_may_refuse():
    from jax import lax

    from nmjax import backends

    seen = []

    def forward(x2d, w, mask, *, precision):
        seen.append(("forward", precision))
        return backends.reference_forward(x2d, w, mask, precision=precision)

    def input_grad(dy2d, w, mask, perm, *, precision):
        seen.append(("input_grad", precision))
        return backends.reference_input_grad(dy2d, w, mask, perm, precision=precision)

    def supports(problem):
        return "it runs DEFAULT only" if problem.precision not in (None, lax.Precision.DEFAULT) \
            else None

    fake = backends.Backend("fake", forward, input_grad, supports)
    x, w = jax.random.normal(KEY, (4, 8)), jax.random.normal(jax.random.key(1), (8, 4))
    mask = nm_mask(jnp.abs(w), 2, 4)
    f = lambda x, **kw: jax.grad(lambda x: ops.nm_dense(x, w, mask, **kw).sum())(x)  # noqa: E731
    np.testing.assert_allclose(f(x, backend=fake, precision="default"),
                               f(x, backend="reference"), rtol=1e-6)
    assert seen == [("forward", lax.Precision.DEFAULT), ("input_grad", lax.Precision.DEFAULT)]
    with pytest.raises(ValueError, match="backend 'fake' cannot run the forward.*DEFAULT only"):
        f(x, backend=fake, precision=lax.Precision.HIGHEST)
    with pytest.raises(TypeError, match="precision must be None, a jax.lax.Precision"):
        ops.nm_dense(x, w, mask, precision="quickest")


# ---------------------------------------------------------------- NNX layers (section 2)


def test_nnx_sparse_layers_set_their_fields_in_init_and_refuse_preferred_element_type():
    layer = nmjax.nn.nnx.SparseLinear(8, 4, sparsity=Sparsity("2:4", mode="static"),
                                      rngs=nnx.Rngs(0))
    fields = vars(layer)
    assert {"sparsity", "fwd_mask", "bwd_mask", "perm", "decay"} <= fields.keys()
    assert bool(is_nm(layer.fwd_mask.get_value(), 2, 4)) and layer.perm is None
    # Was copied from the dense layer and ignored: the products return the promoted dtype.
    with pytest.raises(ValueError, match="SparseLinear does not take preferred_element_type"):
        nmjax.nn.nnx.SparseLinear(8, 4, preferred_element_type=jnp.float32, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="SparseConv does not take preferred_element_type"):
        nmjax.nn.nnx.SparseConv(4, 8, (3, 3), preferred_element_type=jnp.float32,
                                rngs=nnx.Rngs(0))
