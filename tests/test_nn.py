"""Flax Linen and NNX sparse layers and sparsify: parameters, values, gradients, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import nmjax
from nmjax.masks import (
    NM,
    BiMask,
    Masks,
    Transposable,
    is_nm,
    is_transposable,
    nm_mask,
    transposable_mask,
)
from nmjax.nn import Sparsity, refresh, sparsify
from nmjax.nn import linen as nl
from nmjax.nn import nnx as nx
from nmjax.tree import MaskRule

RNG = np.random.default_rng(0)


# Threefry initialisers take up to ~25 s to compile per 4-D shape on this CPU; rbg keys ~1 s.
def key(seed):
    return jax.random.key(seed, impl="rbg")


def rngs(seed):
    return nnx.Rngs(key(seed))


X = jnp.asarray(RNG.standard_normal((4, 8)), jnp.float32)
IMG = jnp.asarray(RNG.standard_normal((2, 6, 6, 4)), jnp.float32)
RULE_T = MaskRule("2:4 transposable", exclude="head")
# The conv tests use plain N:M: each transposable shape costs seconds of compile here.
RULE_NM = MaskRule("2:4", exclude="head")
USED = nmjax.nn.USED_MASKS


def shapes(tree):
    return jax.tree.map(jnp.shape, tree)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x))
        x = nn.relu(nn.Dense(12)(x))
        return nn.Dense(10, name="head")(x)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(8, (1, 1))(x))
        x = nn.relu(nn.Conv(12, (3, 3), strides=2, padding="CIRCULAR")(x))
        return nn.Dense(10, name="head")(x.reshape(x.shape[0], -1))


def masked_params(params, plan):
    return nmjax.tree.apply_masks(params, nmjax.tree.build_masks(params, plan))


# ------------------------------------------------------------------------------- Linen


@pytest.mark.parametrize("pattern", ["nm", "transposable"])
def test_sparse_dense_matches_nn_dense_params_and_masked_values(pattern):
    dense = nn.Dense(16)
    sparse = nl.SparseDense(16, sparsity=Sparsity(f"2:4 {pattern}"))
    params = dense.init(key(0), X)
    assert shapes(sparse.init(key(0), X)) == shapes(params)
    w = params["params"]["kernel"]
    mask = nm_mask(jnp.abs(w), 2, 4) if pattern == "nm" else transposable_mask(jnp.abs(w), 2, 4)
    y = sparse.apply(params, X)
    ref = dense.apply({"params": {**params["params"], "kernel": jnp.where(mask, w, 0)}}, X)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    # The kernel's gradient is straight-through: dense, not zero outside the mask.
    g = jax.grad(lambda p: sparse.apply(p, X).sum())(params)["params"]["kernel"]
    np.testing.assert_allclose(g, X.T @ jnp.ones((4, 16)), rtol=1e-5, atol=1e-5)


def test_sparse_conv_matches_nn_conv_params_and_masked_values():
    conv = nn.Conv(8, (3, 3), strides=2, padding="CIRCULAR")
    sparse = nl.SparseConv(8, (3, 3), strides=2, padding="CIRCULAR")
    params = conv.init(key(0), IMG)
    assert shapes(sparse.init(key(0), IMG)) == shapes(params)
    w = params["params"]["kernel"]
    mask = nm_mask(jnp.abs(w), 2, 4, axis=2)
    ref = conv.apply({"params": {**params["params"], "kernel": jnp.where(mask, w, 0)}}, IMG)
    np.testing.assert_allclose(sparse.apply(params, IMG), ref, rtol=1e-5, atol=1e-5)
    # Extra batch dims are flattened like nn.Conv does.
    y = sparse.apply(params, IMG[None])
    np.testing.assert_allclose(y[0], ref, rtol=1e-5, atol=1e-5)


def _is_valid(mask, rule):
    if isinstance(rule.pattern, Transposable):
        return bool(is_transposable(mask, 2, 4, axes=(-2, -1), exact=True))
    return bool(is_nm(mask, 2, 4, axis=mask.ndim - 2, exact=True))


class WithGeneral(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.DenseGeneral((2, 8), name="general")(x)


# --------------------------------------------------------------------------------- NNX


class NMLP(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 12, rngs=rngs)])
        self.head = nnx.Linear(12, 10, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return self.head(x)


class NCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(4, 8, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(8, 12, (3, 3), strides=2, padding="CIRCULAR", rngs=rngs)
        self.head = nnx.Linear(108, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
        return self.head(x.reshape(x.shape[0], -1))


def _nnx_masked_reference(model, rule, x):
    ref = nnx.clone(model)
    state = nnx.state(ref, nnx.Param)
    nnx.update(ref, masked_params(state, rule))
    return ref(x)


def test_nnx_layers_mirror_nnx_linear_and_conv():
    dense = nnx.Linear(8, 16, rngs=rngs(0))
    sparse = nx.SparseLinear(8, 16, sparsity=Sparsity("2:4 transposable"), rngs=rngs(0))
    assert shapes(nnx.state(sparse, nnx.Param)) == shapes(nnx.state(dense, nnx.Param))
    np.testing.assert_allclose(sparse.kernel[...], dense.kernel[...])
    masks = sparse.masks()
    assert bool(is_transposable(masks.fwd, 2, 4)) and bool(is_nm(masks.fwd, 2, 4, exact=True))
    ref = X @ jnp.where(masks.fwd, dense.kernel[...], 0) + dense.bias[...]
    np.testing.assert_allclose(sparse(X), ref, rtol=1e-5, atol=1e-5)
    conv = nx.SparseConv(4, 8, (3, 3), rngs=rngs(0))
    dconv = nnx.Conv(4, 8, (3, 3), rngs=rngs(0))
    assert shapes(nnx.state(conv, nnx.Param)) == shapes(nnx.state(dconv, nnx.Param))
    assert bool(is_nm(conv.masks().fwd, 2, 4, axis=2, exact=True))


def test_bimask_layers_use_forward_and_backward_masks():
    from nmjax.masks import bimask

    sp = Sparsity("2:4 bimask")
    layer = nl.SparseDense(16, sparsity=sp)
    params = layer.init(key(3), X)
    w = params["params"]["kernel"]
    fwd, bwd, perm = bimask(w, 2, 4)
    assert not bool(jnp.all(fwd == bwd))
    dy = jnp.asarray(RNG.standard_normal((4, 16)), jnp.float32)
    y, vjp = jax.vjp(lambda x: layer.apply(params, x), X)
    np.testing.assert_allclose(y, X @ jnp.where(fwd, w, 0) + params["params"]["bias"],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(vjp(dy)[0], dy @ jnp.where(bwd, w, 0).T, rtol=1e-5, atol=1e-5)
    # NNX, static: the stored permutation and backward mask are the ones used.
    lin = nx.SparseLinear(8, 16, sparsity=Sparsity("2:4 bimask", mode="static"), rngs=rngs(3))
    m = lin.masks()
    assert m.perm is not None and bool(is_nm(m.bwd[:, m.perm], 2, 4, axis=1))
    _, vjp = jax.vjp(lambda x: lin(x), X)
    np.testing.assert_allclose(vjp(dy)[0], dy @ jnp.where(m.bwd, lin.kernel[...], 0).T,
                               rtol=1e-5, atol=1e-5)


class TwoHeads(nn.Module):
    def setup(self):
        self.body = nn.Dense(16)
        self.head = nn.Dense(10)

    def __call__(self, x):
        return self.head(nn.relu(self.body(x)))

    def features(self, x):
        return self.body(x)


def test_stored_perm_gives_the_bimask_of_that_perm():
    from nmjax.masks import bimask
    from nmjax.nn import _core

    w = jax.random.normal(jax.random.key(0), (8, 16))
    perm = jax.random.permutation(jax.random.key(1), 16)
    sp = Sparsity(BiMask(2, 4, search="swap", rounds=3))
    got = _core.compute_masks(w, 0, sp, perm=perm)
    want = bimask(w, 2, 4, perm=perm)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="a stored permutation applies to a Bi-Mask pattern"):
        _core.compute_masks(w, 0, Sparsity("2:4"), perm=perm)


# ------------------------------------------------------------------ defects (issue 9)


class LinenEinsum(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Einsum((16, 8), "bi,oi->bo")(x)     # kernel (out=16, in=8): contracts axis 1
        return nn.Dense(8)(x)


def test_traced_decay_changes_without_recompiling():
    x, w = X, jnp.asarray(RNG.standard_normal((8, 16)), jnp.float32)
    fwd = nm_mask(jnp.abs(w), 2, 4)
    traces = []

    @jax.jit
    def grad_w(lam):
        traces.append(1)
        layer = nl.SparseDense(16, use_bias=False, sparsity=Sparsity(decay=lam))
        return jax.grad(lambda k: layer.apply({"params": {"kernel": k}}, x).sum())(w)

    g1, g2 = grad_w(jnp.float32(0.0)), grad_w(jnp.float32(0.5))
    assert len(traces) == 1
    np.testing.assert_allclose(g1, x.T @ jnp.ones((4, 16)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g2 - g1, 0.5 * jnp.where(fwd, 0, w), rtol=1e-5, atol=1e-5)
    # NNX: a JAX-array decay is layer state, changed in place without recompiling.
    lin = nx.SparseLinear(8, 16, sparsity=Sparsity(decay=jnp.float32(0.0)), rngs=rngs(0))
    step = nnx.jit(lambda m: nnx.grad(lambda m: m(x).sum())(m))
    d0 = step(lin).kernel[...]
    lin.decay.set_value(jnp.float32(0.5))
    d1 = step(lin).kernel[...]
    k = lin.kernel[...]
    np.testing.assert_allclose(d1 - d0, 0.5 * jnp.where(lin.masks().fwd, 0, k), rtol=1e-5,
                               atol=1e-5)


def test_nnx_out_sharding_is_honoured():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:1]), ("d",))
    lin = nx.SparseLinear(8, 16, rngs=rngs(0))
    sharding = NamedSharding(mesh, PartitionSpec(None, "d"))
    y = jax.jit(lambda x: lin(x, out_sharding=sharding))(X)
    assert y.sharding.is_equivalent_to(sharding, 2)
    np.testing.assert_allclose(y, lin(X), rtol=1e-6)


# ------------------------------------------------- sparsify: the op-level rewrite of a plan


def _is_valid(mask, rule):
    if isinstance(rule.pattern, Transposable):
        return bool(is_transposable(mask, 2, 4, axes=(-2, -1), exact=True))
    return bool(is_nm(mask, 2, 4, axis=mask.ndim - 2, exact=True))


def plan_of(model, rule, x):
    return nmjax.resolve(model, rule, x)


@pytest.mark.parametrize("model,rule", [(MLP(), RULE_T), (CNN(), RULE_NM)], ids=["mlp", "cnn"])
def test_linen_sparsify_restores_dense_checkpoint_and_masks_selected_layers(model, rule):
    x = X if isinstance(model, MLP) else IMG
    params = model.init(key(1), x)
    plan = plan_of(model, rule, x)
    sparse = sparsify(model, plan)
    assert shapes(sparse.init(key(1), x)) == shapes(params)       # the dense model's params
    y = jax.jit(sparse.apply)(params, x)
    ref = model.apply({"params": masked_params(params["params"], plan)}, x)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(y - model.apply(params, x)).max()) > 1e-3  # it is not the dense model
    built = refresh(params["params"], plan)
    assert set(built) == {p.split("/")[0] for p in plan.paths}
    assert "head" not in built
    for path, m in jax.tree_util.tree_leaves_with_path(
            built, is_leaf=lambda m: isinstance(m, Masks)):
        assert _is_valid(m.fwd, rule), path


def test_linen_static_mode_reads_the_nm_masks_collection():
    params = MLP().init(key(2), X)["params"]
    plan = plan_of(MLP(), RULE_T, X)
    static = sparsify(MLP(), plan, mode="static")
    variables = static.init(key(2), X)
    assert set(variables) == {"params", nmjax.nn.MASKS}
    masks = refresh(params, plan)
    assert shapes(variables[nmjax.nn.MASKS]) == shapes(masks)
    y = static.apply({"params": params, nmjax.nn.MASKS: masks}, X)
    np.testing.assert_allclose(y, MLP().apply({"params": masked_params(params, plan)}, X),
                               rtol=1e-5, atol=1e-5)
    # Masks come from the collection, not the weights: all-True masks give the dense model.
    ones = jax.tree.map(lambda m: jnp.ones_like(m), masks)
    np.testing.assert_allclose(static.apply({"params": params, nmjax.nn.MASKS: ones}, X),
                               MLP().apply({"params": params}, X), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"static masks: no mask for 'Dense_0/kernel'"):
        static.apply({"params": params}, X)
    bad = {**masks, "Dense_0": {"kernel": Masks(*[jnp.ones((4, 16), bool)] * 2)}}
    with pytest.raises(ValueError, match=r"static fwd mask for 'Dense_0/kernel' has shape \(4, 16"):
        static.apply({"params": params, nmjax.nn.MASKS: bad}, X)


def test_sparsify_general_layers_indivisible_kernel_bad_args():
    # DenseGeneral is no longer refused: its dot_general says which axes it contracts.
    params = WithGeneral().init(key(0), X)["params"]
    plan = plan_of(WithGeneral(), "2:4", X)
    assert plan.by_path["general/kernel"].layout.contract == (0,)
    y = sparsify(WithGeneral(), plan).apply({"params": params}, X)
    np.testing.assert_allclose(y, WithGeneral().apply(
        {"params": masked_params(params, plan)}, X), rtol=1e-5, atol=1e-5)

    class Odd(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(x[:, :6])

    with pytest.raises(ValueError, match=r"'Dense_0/kernel' of shape \(6, 4\).*not divisible"
                                         r".*exclude=r\"Dense_0/kernel\$\""):
        sparsify(Odd(), MaskRule("2:4")).init(key(0), X)
    with pytest.raises(ValueError, match=r"kernel 'kernel' of shape \(6, 4\) cannot take"):
        nl.SparseDense(4).init(key(0), X[:, :6])
    with pytest.raises(TypeError, match="rule must be an nmjax.tree.MaskRule, a pattern spec"):
        sparsify(MLP(), {"n": 2})
    with pytest.raises(TypeError, match="model must be a flax.linen or flax.nnx Module"):
        sparsify(object(), RULE_T)
    with pytest.raises(ValueError, match="mode must be one of"):
        sparsify(MLP(), RULE_T, mode="sometimes")
    with pytest.raises(ValueError, match="decay must be >= 0"):
        Sparsity(decay=-1.0)
    with pytest.raises(TypeError, match="decay must be a real scalar, got True"):
        Sparsity(decay=True)
    assert Sparsity(decay=np.float32(0.5)).decay == 0.5  # numpy scalars, as nm_dense takes
    with pytest.raises(ValueError, match="pattern string must be 'N:M'"):
        Sparsity(pattern="random")
    with pytest.raises(ValueError, match="n must be <= m"):
        Sparsity("5:4")
    with pytest.raises(TypeError, match="backend must be a string or an nmjax.backends.Backend"):
        Sparsity(backend=3)
    with pytest.raises(ValueError, match="backend 'pallas' cannot run the forward product"):
        sparsify(MLP(), RULE_T, backend="pallas").apply(MLP().init(key(0), X), X)
    with pytest.raises(ValueError, match="sparsified already"):
        sparsify(sparsify(MLP(), RULE_T), RULE_T)


@pytest.mark.parametrize("cls", [NMLP, NCNN], ids=["mlp", "cnn"])
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_nnx_sparsify_keeps_params_and_restores_dense_state(cls, mode):
    x, rule = (X, RULE_T) if cls is NMLP else (IMG, RULE_NM)
    dense = cls(rngs(0))
    before = nnx.state(dense, nnx.Param)
    plan = plan_of(dense, rule, x)
    assert "head/kernel" not in plan.by_path
    sparse = sparsify(dense, plan, mode=mode)
    # The input model is untouched; the copy has the same Param state and layer types.
    assert all(type(layer) is nnx.Linear for layer in getattr(sparse, "layers", []))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), before,
                                     nnx.state(dense, nnx.Param)))
    assert shapes(nnx.state(sparse, nnx.Param)) == shapes(before)
    ref = _nnx_masked_reference(dense, plan, x)
    np.testing.assert_allclose(sparse(x), ref, rtol=1e-5, atol=1e-5)
    # A dense checkpoint from elsewhere restores with nnx.update, under nnx.jit too.
    other = cls(rngs(7))
    nnx.update(sparse, nnx.state(other, nnx.Param))
    if mode == "static":
        nmjax.nn.refresh(sparse)
    y = nnx.jit(lambda m, x: m(x))(sparse, x)
    np.testing.assert_allclose(y, _nnx_masked_reference(other, plan, x), rtol=1e-5, atol=1e-5)
    n_masks = len(jax.tree.leaves(nnx.state(sparse, nx.NMMask)))
    assert n_masks == (0 if mode == "dynamic" else 2 * len(plan.leaves))   # fwd + bwd each


def test_nnx_optimizer_skips_static_masks():
    import optax

    sparse = sparsify(NMLP(rngs(0)), plan_of(NMLP(rngs(0)), RULE_T, X), mode="static")
    opt = nnx.Optimizer(sparse, optax.sgd(0.1), wrt=nnx.Param)
    masks_before = nnx.state(sparse, nx.NMMask)

    @nnx.jit
    def step(model, opt, x):
        grads = nnx.grad(lambda m: (m(x) ** 2).mean())(model)
        opt.update(model, grads)

    step(sparse, opt, X)
    after = nnx.state(sparse, nx.NMMask)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), masks_before, after))


def test_nnx_general_layers_bimask_convs_and_indivisible_kernels():
    class WithGeneral(nnx.Module):
        def __init__(self, rngs):
            self.general = nnx.LinearGeneral(8, (2, 8), rngs=rngs)

        def __call__(self, x):
            return self.general(x)

    model = WithGeneral(rngs(0))
    plan = plan_of(model, "2:4 transposable", X)
    assert plan.by_path["general/kernel"].layout.out == (1, 2)     # (in, 2, 8): out (2, 8)
    assert sparsify(model, plan)(X).shape == (4, 2, 8)

    class Odd(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(6, 4, rngs=rngs)

        def __call__(self, x):
            return self.lin(x)

    with pytest.raises(ValueError, match=r"'lin/kernel' of shape \(6, 4\).*not divisible"):
        plan_of(Odd(rngs(0)), MaskRule("2:4"), X[:, :6])
    with pytest.raises(ValueError, match="not divisible by m=4"):
        nx.SparseLinear(6, 4, sparsity=Sparsity(mode="static"), rngs=rngs(0))
    with pytest.raises(TypeError, match="sparsity must be an nmjax.nn.Sparsity"):
        nx.SparseLinear(8, 4, sparsity=(2, 4), rngs=rngs(0))
    with pytest.raises(ValueError, match="output axis 3 has length 6, not divisible by m=4"):
        nx.SparseConv(4, 6, (3, 3), sparsity=Sparsity("2:4 bimask", mode="static"),
                      rngs=rngs(0))
    # Bi-Mask convs: one output permutation for every spatial position.
    conv = nx.SparseConv(4, 8, (3, 3), sparsity=Sparsity("2:4 bimask", mode="static"),
                         rngs=rngs(0))
    assert bool(BiMask(2, 4).valid(conv.masks(), axis=2))
    cnn = NCNN(rngs(1))
    conv_model = sparsify(cnn, plan_of(cnn, MaskRule("2:4 bimask", exclude="head"), IMG),
                          mode="static")
    before = conv_model.nm_masks["conv2.kernel"]["perm"][...]
    nmjax.nn.search(conv_model, key(3))
    assert conv_model.nm_masks["conv2.kernel"]["perm"][...].shape == before.shape == (12,)
    assert conv_model(IMG).shape == (2, 10)


def test_linen_other_methods_and_low_precision_layers():
    params = TwoHeads().init(key(4), X)
    plan = nmjax.resolve(TwoHeads(), RULE_T, X, method="features")
    assert plan.paths == ("body/kernel",)
    sparse = sparsify(TwoHeads(), plan)
    w = params["params"]["body"]["kernel"]
    mask = transposable_mask(jnp.abs(w), 2, 4)
    feats = sparse.apply(params, X, method="features")
    np.testing.assert_allclose(feats, X @ jnp.where(mask, w, 0) + params["params"]["body"]["bias"],
                               rtol=1e-5, atol=1e-5)
    # bf16 compute, fp32 parameters: output dtype and values as nn.Dense on the masked kernel.
    layer = nl.SparseDense(16, dtype=jnp.bfloat16)
    p = layer.init(key(5), X)
    y = layer.apply(p, X)
    kernel = p["params"]["kernel"]
    ref = nn.Dense(16, dtype=jnp.bfloat16).apply(
        {"params": {**p["params"], "kernel": jnp.where(nm_mask(jnp.abs(kernel), 2, 4), kernel, 0)}},
        X)
    assert y.dtype == jnp.bfloat16 and p["params"]["kernel"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32),
                               rtol=2e-2, atol=2e-2)
    # The same through sparsify: the model's bf16 casts are followed to the product.
    dense = nn.Dense(16, dtype=jnp.bfloat16)
    got = sparsify(dense, plan_of(dense, "2:4", X)).apply(p, X)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32),
                               rtol=2e-2, atol=2e-2)
    g = jax.grad(lambda p: layer.apply(p, X).astype(jnp.float32).sum())(p)
    assert g["params"]["kernel"].dtype == jnp.float32


def test_dynamic_bimask_uses_a_searched_permutation():
    from nmjax.masks import bimask

    rule = MaskRule(BiMask(2, 4, search="random", num_candidates=8), exclude="head")
    params = MLP().init(key(6), X)["params"]
    plan = plan_of(MLP(), rule, X)
    perms = nmjax.nn.search(params, key(7), plan)
    assert shapes(perms) == {"Dense_0": {"kernel": (16,)}, "Dense_1": {"kernel": (12,)}}
    sparse = sparsify(MLP(), plan)
    y = sparse.apply({"params": params, nmjax.nn.MASKS: perms}, X)
    np.testing.assert_allclose(y, MLP().apply({"params": masked_params(params, plan)}, X),
                               rtol=1e-5, atol=1e-5)       # forward: the forward masks
    # The input gradient uses the backward mask of that permutation.
    dx = jax.grad(lambda x: sparse.apply({"params": params, nmjax.nn.MASKS: perms},
                                         x).sum())(X)

    def reference(x):
        h = x
        for layer in ("Dense_0", "Dense_1"):
            w, b = params[layer]["kernel"], params[layer]["bias"]
            m = bimask(w, 2, 4, perms[layer]["kernel"])
            h = nn.relu(_bimask_dense(h, w, m.fwd, m.bwd) + b)
        return nn.Dense(10).apply({"params": params["head"]}, h).sum()

    np.testing.assert_allclose(dx, jax.grad(reference)(X), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="search needs a plan with Bi-Mask patterns"):
        nmjax.nn.search(params, key(7), plan_of(MLP(), RULE_T, X))


@jax.custom_vjp
def _bimask_dense(x, w, fwd, bwd):
    return x @ jnp.where(fwd, w, 0)


def _bimask_dense_fwd(x, w, fwd, bwd):
    return _bimask_dense(x, w, fwd, bwd), (x, w, bwd)


def _bimask_dense_bwd(res, dy):
    x, w, bwd = res
    return dy @ jnp.where(bwd, w, 0).T, x.T @ dy, None, None


_bimask_dense.defvjp(_bimask_dense_fwd, _bimask_dense_bwd)


def test_einsum_out_in_kernel_is_resolved_from_its_op():
    params = LinenEinsum().init(key(0), X)["params"]
    assert params["Einsum_0"]["kernel"].shape == (16, 8)
    with pytest.raises(ValueError, match="Einsum_0/kernel.*cannot be known"):
        nmjax.tree.build_masks(params, MaskRule("2:4"))       # no guessing without the model
    plan = plan_of(LinenEinsum(), "2:4", X)
    assert plan.by_path["Einsum_0/kernel"].layout.contract == (1,)
    built = nmjax.tree.build_masks(params, plan)
    assert bool(is_nm(built["Einsum_0"]["kernel"].fwd, 2, 4, axis=1, exact=True))
    y = sparsify(LinenEinsum(), plan).apply({"params": params}, X)
    np.testing.assert_allclose(y, LinenEinsum().apply({"params": masked_params(params, plan)},
                                                      X), rtol=1e-5, atol=1e-5)


def test_nnx_tied_layer_one_mask():
    class Tied(nnx.Module):
        def __init__(self, rngs):
            shared = nnx.Linear(8, 8, rngs=rngs)
            self.enc, self.dec = shared, shared

        def __call__(self, x):
            return self.dec(self.enc(x))

    model = Tied(rngs(1))
    plan = plan_of(model, "2:4", X)
    assert len(plan.leaves) == 1
    tied = sparsify(model, plan)
    w = tied.enc.kernel[...]
    mw = jnp.where(nm_mask(jnp.abs(w), 2, 4), w, 0)
    b = tied.enc.bias[...]
    np.testing.assert_allclose(tied(X), (X @ mw + b) @ mw + b, rtol=1e-5, atol=1e-5)


def test_several_rules_in_one_plan():
    params = MLP().init(key(1), X)["params"]
    plan = plan_of(MLP(), [MaskRule("2:4", exclude="head"), MaskRule("1:2", include="head")], X)
    assert plan.by_path["head/kernel"].pattern == NM(1, 2)
    built = nmjax.tree.build_masks(params, plan)
    assert bool(is_nm(built["head"]["kernel"].fwd, 1, 2, exact=True))
    assert bool(is_nm(built["Dense_0"]["kernel"].fwd, 2, 4, exact=True))
    with pytest.raises(ValueError, match="'Dense_0/kernel' is selected by 2 rules with different"):
        plan_of(MLP(), [RULE_T, MaskRule("2:4")], X)


def test_indivisible_output_axis_names_the_leaf_and_is_skipped_on_request():
    params = MLP().init(key(2), X)["params"]           # head: (12, 10), 10 % 4 != 0
    with pytest.raises(ValueError, match=r"parameter 'head/kernel' of shape \(12, 10\) cannot "
                       r"take pattern '2:4 transposable': its output axis 1 has length 10"):
        plan_of(MLP(), MaskRule("2:4 transposable"), X)
    skip = plan_of(MLP(), MaskRule("2:4 transposable", skip_indivisible=True), X)
    built = nmjax.tree.build_masks(params, skip)
    assert built["head"]["kernel"] is None and built["Dense_1"]["kernel"] is not None
    assert "head/kernel" in dict(skip.dense)
    with pytest.raises(ValueError, match=r"'head/kernel' .* output axis 1 has length 10"):
        plan_of(MLP(), MaskRule(BiMask(2, 4)), X)
