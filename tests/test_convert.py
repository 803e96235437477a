"""nmjax.convert: AdaPrune on Linen and NNX models (masks kept, never worse than magnitude
N:M on the calibration data, the least-squares solve against numpy, sequential inputs), conv
patches against the layer, inputs untouched, clear errors, N from density, global magnitude
pruning, the report, and fine-tuning from the result with nmjax.optim.sparse."""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import nmjax
from nmjax import _convert_solve
from nmjax._convert_capture import Model, stacked
from nmjax.convert import (
    adaprune,
    choose_n,
    global_magnitude_prune,
    layer_densities,
    rules_for_density,
)
from nmjax.masks import Masks, as_pattern
from nmjax.nn import collection, sync
from nmjax.optim import masks_of, sparse
from nmjax.tree import MaskRule, check_structure

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.standard_normal((64, 16)), jnp.float32)
X_HELD = jnp.asarray(RNG.standard_normal((64, 16)), jnp.float32)  # X's shape: one compile
IMAGES = jnp.asarray(RNG.standard_normal((24, 6, 6, 4)), jnp.float32)
FAST = dict(iters=60, batch=16, progress=False)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(10, name="head")(x)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
        return nn.Dense(10, name="head")(x.reshape(len(x), -1))


class NMLP(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(16, 32, rngs=rngs), nnx.Linear(32, 16, rngs=rngs)])
        self.head = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return self.head(x)


PARAMS = MLP().init(jax.random.key(0), X)["params"]
CNN_PARAMS = CNN().init(jax.random.key(1), IMAGES)["params"]
RULE = MaskRule("2:4", exclude="head")


def numpy_tree(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def nnx_twin(params):
    """An NMLP holding the Linen MLP's weights."""
    model = NMLP(nnx.Rngs(0))
    for layer, name in zip([*model.layers, model.head], ["Dense_0", "Dense_1", "head"],
                           strict=True):
        layer.kernel.set_value(params[name]["kernel"])
        layer.bias.set_value(params[name]["bias"])
    return model


def kernels(conv):
    """(path, converted kernel, Masks) of each converted layer."""
    flat = dict((jax.tree_util.keystr(p), x) for p, x in
                jax.tree_util.tree_flatten_with_path(conv.params)[0])
    masks = jax.tree_util.tree_flatten_with_path(
        conv.masks, is_leaf=lambda x: x is None or isinstance(x, Masks))[0]
    return [(jax.tree_util.keystr(p), flat[jax.tree_util.keystr(p)], m) for p, m in masks
            if isinstance(m, Masks)]


# ------------------------------------------------------------------ masks and error


@pytest.mark.parametrize(("pattern", "solver"), [
    ("2:4", "lstsq"), ("2:4", "adam"), ("2:4 transposable", "lstsq"), ("4:8", "adam"),
    ("4:8 transposable", "adam"), ("bimask 2:4", "lstsq")])
def test_converted_params_satisfy_their_masks(pattern, solver):
    rule = MaskRule(pattern, exclude="head")
    conv = adaprune((MLP(), PARAMS), X, rule, solver=solver, bias=True, **FAST)
    check_structure(conv.params, conv.masks)
    got = kernels(conv)
    assert [p for p, _, _ in got] == ["['Dense_0']['kernel']", "['Dense_1']['kernel']"]
    for _, kernel, masks in got:
        assert bool(rule.pattern.valid(masks))
        assert not bool(jnp.any((kernel != 0) & ~masks.fwd))
        assert int(jnp.sum(kernel != 0)) > 0.9 * int(jnp.sum(masks.fwd))
    np.testing.assert_array_equal(conv.params["head"]["kernel"], PARAMS["head"]["kernel"])
    np.testing.assert_array_equal(conv.params["head"]["bias"], PARAMS["head"]["bias"])
    assert not np.array_equal(conv.params["Dense_0"]["bias"], PARAMS["Dense_0"]["bias"])
    # The magnitude baseline is the dense kernel masked.
    np.testing.assert_array_equal(
        conv.magnitude_params["Dense_1"]["kernel"],
        jnp.where(conv.masks["Dense_1"]["kernel"].fwd, PARAMS["Dense_1"]["kernel"], 0))


@functools.cache
def _digits_layers():
    """A small MLP trained briefly on scikit-learn's digits: real weights and inputs."""
    from nmjax.datasets import digits

    data = digits()
    x = jnp.asarray(data.train.x.reshape(len(data.train.x), -1))
    y = jnp.asarray(data.train.y)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(64)(x))
            x = nn.relu(nn.Dense(32)(x))
            return nn.Dense(10, name="head")(x)

    params = Net().init(jax.random.key(0), x[:1])["params"]
    tx = optax.adam(3e-3)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
            Net().apply({"params": p}, x), y).mean()
        updates, state = tx.update(jax.grad(loss)(params), state)
        return optax.apply_updates(params, updates), state

    for _ in range(60):
        params, state = step(params, state)
    return Net(), params, x[:256], x[256:512]  # equal sizes: one compile for both


@pytest.mark.parametrize("source", ["random", "digits"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8 transposable"])
def test_adaprune_never_raises_the_calibration_error_above_magnitude(source, pattern):
    if source == "random":
        model, params, calib, held = MLP(), PARAMS, X, X_HELD
    else:
        model, params, calib, held = _digits_layers()
    rule = MaskRule(pattern, exclude="head")
    configs = [("lstsq", True), ("adam", True)]
    if source == "random":
        configs.append(("lstsq", False))
    for solver, bias in configs:
        conv = adaprune((model, params), calib, rule, held_out=held, solver=solver, bias=bias,
                        iters=150, batch=16, progress=False)
        for r in conv.layers:
            assert r.fit_error_adaprune <= r.fit_error_magnitude + 1e-6, (solver, bias, r)
            assert 0 < r.fit_error_magnitude < 1
        # On real layers the gain is large and carries over to held-out data.
        if source == "digits":
            assert all(r.fit_error_adaprune < 0.8 * r.fit_error_magnitude
                       for r in conv.layers), (solver, bias)
            assert all(r.error_adaprune < r.error_magnitude for r in conv.layers), (solver, bias)


def _reference_lstsq(x, w, b, mask, anchor, damping, fit_bias):
    """Per column, the damped normal equations solved by numpy (float64)."""
    x, w, b = (np.asarray(a, np.float64) for a in (x, w, b))
    rows = np.concatenate([x, np.ones((len(x), 1))], 1) if fit_bias else x
    target = x @ w + b
    g = rows.T @ rows
    lam = damping * np.mean(np.diag(g))
    out = np.zeros_like(w)
    new_b = b.copy()
    for j in range(w.shape[1]):
        keep = np.flatnonzero(mask[:, j])
        cols = np.concatenate([keep, [rows.shape[1] - 1]]) if fit_bias else keep
        a_j = np.concatenate([anchor[keep, j], [b[j]]]) if fit_bias else anchor[keep, j]
        y = target[:, j] - (0 if fit_bias else b[j])
        sol = np.linalg.solve(g[np.ix_(cols, cols)] + lam * np.eye(len(cols)),
                              rows[:, cols].T @ y + lam * a_j)
        out[keep, j] = sol[:len(keep)]
        if fit_bias:
            new_b[j] = sol[-1]
    return out, new_b


@pytest.mark.parametrize("fit_bias", [False, True])
def test_sequential_lstsq_solves_each_layer_on_the_converted_models_inputs(fit_bias):
    conv = adaprune((MLP(), PARAMS), X, RULE, solver="lstsq", bias=fit_bias, damping=0.05,
                    progress=False)
    inputs = np.asarray(X, np.float64)
    for name in ("Dense_0", "Dense_1"):
        w, b = (np.asarray(PARAMS[name][k]) for k in ("kernel", "bias"))
        mask = np.asarray(conv.masks[name]["kernel"].fwd)
        want_w, want_b = _reference_lstsq(inputs, w, b, mask, np.where(mask, w, 0), 0.05,
                                          fit_bias)
        np.testing.assert_allclose(conv.params[name]["kernel"], want_w, atol=2e-4, rtol=2e-3)
        np.testing.assert_allclose(conv.params[name]["bias"], want_b, atol=2e-4, rtol=2e-3)
        # The next layer sees this layer's converted output (sequential mode).
        inputs = np.maximum(inputs @ np.asarray(conv.params[name]["kernel"], np.float64)
                            + np.asarray(conv.params[name]["bias"], np.float64), 0)


def test_parallel_mode_takes_every_layers_inputs_from_the_dense_model():
    seq = adaprune((MLP(), PARAMS), X, RULE, solver="lstsq", progress=False)
    par = adaprune((MLP(), PARAMS), X, RULE, solver="lstsq", sequential=False, progress=False)
    np.testing.assert_array_equal(seq.params["Dense_0"]["kernel"], par.params["Dense_0"]["kernel"])
    hidden = np.maximum(np.asarray(X) @ np.asarray(PARAMS["Dense_0"]["kernel"])
                        + np.asarray(PARAMS["Dense_0"]["bias"]), 0)
    w = np.asarray(PARAMS["Dense_1"]["kernel"])
    mask = np.asarray(par.masks["Dense_1"]["kernel"].fwd)
    want, _ = _reference_lstsq(hidden, w, np.asarray(PARAMS["Dense_1"]["bias"]), mask,
                               np.where(mask, w, 0), 0.01, False)
    np.testing.assert_allclose(par.params["Dense_1"]["kernel"], want, atol=2e-4, rtol=2e-3)
    assert not np.allclose(seq.params["Dense_1"]["kernel"], par.params["Dense_1"]["kernel"])


def test_absorb_mean_starts_adam_from_the_corrected_weights():
    w = np.asarray(PARAMS["Dense_0"]["kernel"])
    conv = adaprune((MLP(), PARAMS), X, MaskRule("2:4", exclude=["head", "Dense_1"]),
                    solver="adam", absorb_mean=True, lr=1e-9, bias_lr=1e-9, **FAST)
    mask = np.asarray(conv.masks["Dense_0"]["kernel"].fwd)
    groups = w.reshape(4, 4, 32), mask.reshape(4, 4, 32)
    shift = np.where(groups[1], 0, groups[0]).sum(1, keepdims=True) / 2
    want = np.where(groups[1], groups[0] + shift, 0).reshape(16, 32)
    np.testing.assert_allclose(conv.params["Dense_0"]["kernel"], want, atol=1e-5)


# ----------------------------------------------------------------------- Linen and NNX


def test_nnx_model_converts_like_its_linen_twin():
    model = nnx_twin(PARAMS)
    rule = MaskRule("2:4", exclude="head")
    linen = adaprune((MLP(), PARAMS), X, rule, solver="lstsq", bias=True, progress=False)
    conv = adaprune(model, X, rule, solver="lstsq", bias=True, progress=False)
    assert [r.path for r in conv.layers] == ["layers/0/kernel", "layers/1/kernel"]
    for i, name in enumerate(["Dense_0", "Dense_1"]):
        for leaf in ("kernel", "bias"):
            np.testing.assert_allclose(conv.params["layers"][i][leaf].get_value(),
                                       linen.params[name][leaf], atol=1e-5)
        assert conv.layers[i].fit_error_adaprune == pytest.approx(
            linen.layers[i].fit_error_adaprune, rel=1e-4)
    # The returned model is static-sparse, holds the masks, and computes with the params.
    sparse_model = conv.model
    assert type(sparse_model.layers[0]) is nnx.Linear         # the model's own layers
    assert conv.plan.paths == ("layers/0/kernel", "layers/1/kernel")
    np.testing.assert_array_equal(nmjax.nn.model_masks(sparse_model)["layers/0/kernel"].fwd,
                                  conv.masks["layers"][0]["kernel"].fwd)
    linen_out = linen.model.apply({"params": linen.params, "nm_masks": collection(linen)}, X)
    np.testing.assert_allclose(sparse_model(X), linen_out, atol=1e-4)


def test_conv_layers_convert_and_tied_nnx_layers_see_every_call():
    conv = adaprune((CNN(), CNN_PARAMS), IMAGES, MaskRule("2:4", exclude="head"),
                    solver="lstsq", progress=False)
    assert [r.path for r in conv.layers] == ["Conv_0/kernel", "Conv_1/kernel"]
    assert all(r.fit_error_adaprune <= r.fit_error_magnitude + 1e-6 for r in conv.layers)

    class NCNN(nnx.Module):  # the Linen CNN's NNX twin, holding its weights
        def __init__(self, rngs):
            self.c0 = nnx.Conv(4, 8, (3, 3), rngs=rngs)
            self.c1 = nnx.Conv(8, 8, (3, 3), strides=2, rngs=rngs)
            self.head = nnx.Linear(72, 10, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.c1(nnx.relu(self.c0(x))))
            return self.head(x.reshape(len(x), -1))

    twin = NCNN(nnx.Rngs(0))
    for layer, name in ((twin.c0, "Conv_0"), (twin.c1, "Conv_1"), (twin.head, "head")):
        layer.kernel.set_value(CNN_PARAMS[name]["kernel"])
        layer.bias.set_value(CNN_PARAMS[name]["bias"])
    nconv = adaprune(twin, IMAGES, MaskRule("2:4", exclude="head"), solver="lstsq",
                     progress=False)
    for layer, name in (("c0", "Conv_0"), ("c1", "Conv_1")):
        np.testing.assert_allclose(nconv.params[layer]["kernel"].get_value(),
                                   conv.params[name]["kernel"], atol=1e-5)

    class Tied(nnx.Module):
        def __init__(self, rngs):
            self.shared = nnx.Linear(16, 16, rngs=rngs)
            self.again = self.shared
            self.head = nnx.Linear(16, 10, rngs=rngs)

        def __call__(self, x):
            return self.head(self.again(nnx.relu(self.shared(x))))

    model = Tied(nnx.Rngs(0))
    got = adaprune(model, X, MaskRule("2:4", exclude="head"), solver="lstsq", progress=False)
    # One layer under its first path in nnx.state ("again": attributes sort by name) ...
    assert [r.path for r in got.layers] == ["again/kernel"]
    # ... whose two calls' inputs enter one least-squares problem: x and relu(x W + b).
    w, b = (np.asarray(getattr(model.shared, k).get_value(), np.float64) for k in ("kernel",
                                                                                    "bias"))
    rows = np.concatenate([np.asarray(X), np.maximum(np.asarray(X) @ w + b, 0)])
    mask = np.asarray(got.masks["again"]["kernel"].fwd)
    want, _ = _reference_lstsq(rows, w, b, mask, np.where(mask, w, 0), 0.01, False)
    np.testing.assert_allclose(got.params["again"]["kernel"].get_value(), want, atol=3e-4,
                               rtol=3e-3)
    assert got.model.shared is got.model.again


@pytest.mark.parametrize("settings", [
    dict(features=8, kernel_size=(3, 3), strides=2, padding="SAME"),
    dict(features=8, kernel_size=(2, 3), padding="VALID", kernel_dilation=(2, 1)),
    dict(features=8, kernel_size=(3, 3), padding="CIRCULAR"),
    dict(features=8, kernel_size=(3, 3), padding=((1, 0), (2, 1)), input_dilation=2),
    dict(features=8, kernel_size=(3,), padding="CAUSAL"),
])
def test_conv_rows_times_the_kernel_are_the_layers_output(settings):
    x = IMAGES[:4] if len(settings["kernel_size"]) == 2 else IMAGES[:4, 0]
    layer = nn.Conv(use_bias=False, **settings)
    params = layer.init(jax.random.key(2), x)["params"]
    kernel = params["kernel"]
    # The captured input of the conv equation (after Flax's own CIRCULAR/CAUSAL padding)
    # and the geometry read from the equation.
    model = Model((layer, params), MaskRule("1:2"), (x,), None, {})
    (site,) = model.sites((x,), "test")
    (key, record), = model.capture(params, (x,), frozenset({"kernel"}))["kernel"]
    rows = jax.jit(_convert_solve.rows, static_argnums=0)(site.geometry,
                                                          stacked(record, key, 1)[0])
    want = layer.apply({"params": params}, x).reshape(len(x), -1, kernel.shape[-1])
    np.testing.assert_allclose(rows @ kernel.reshape(-1, kernel.shape[-1]), want, atol=1e-5)


def test_inputs_are_not_modified():
    params = numpy_tree(PARAMS)
    frozen = copy.deepcopy(params)
    x = np.array(X)
    conv = adaprune((MLP().apply, params), x, RULE, solver="adam", bias=True, **FAST)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(frozen), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(x, np.asarray(X))
    # module.apply (a TrainState's apply_fn) still gives the static sparse module; a bare
    # function cannot.
    assert conv.model.apply({"params": conv.params, "nm_masks": collection(conv)}, X).shape \
        == (64, 10)
    bare = adaprune((lambda v, x: MLP().apply(v, x), params), x, RULE, solver="lstsq",
                    progress=False)
    assert bare.model is None
    np.testing.assert_array_equal(bare.params["Dense_1"]["kernel"],
                                  adaprune((MLP(), params), x, RULE, solver="lstsq",
                                           progress=False).params["Dense_1"]["kernel"])

    model = nnx_twin(PARAMS)
    before = numpy_tree(nnx.state(model))
    adaprune(model, X, RULE, solver="lstsq", bias=True, progress=False)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)
    assert type(model.layers[0]) is nnx.Linear


# ------------------------------------------------------------------------- bad input


def test_bad_input_fails_with_a_clear_message():
    model = (MLP(), PARAMS)
    with pytest.raises(ValueError, match=r"calibration_batch of shape \(64, 15\) failed"):
        adaprune(model, X[:, :15], RULE, progress=False)
    with pytest.raises(ValueError, match=r"held_out of shape \(64, 12\) must match "
                                         r"calibration_batch of shape \(64, 16\)"):
        adaprune(model, X, RULE, held_out=X_HELD[:, :12], progress=False)
    with pytest.raises(ValueError, match=r"'2:4 nm' selects no parameter of MLP.*Dense_0/kernel"):
        adaprune(model, X, MaskRule("2:4", include="nothing/kernel$", axis=0), progress=False)
    with pytest.raises(ValueError, match=r"'head/kernel' of shape \(16, 10\) cannot take "
                                         r"pattern '2:4 transposable'"):
        adaprune(model, X, MaskRule("2:4 transposable"), progress=False)
    with pytest.raises(ValueError, match=r"'Dense_0/kernel' of shape \(16, 32\) cannot take "
                                         r"pattern '3:12 nm'.*not divisible by m=12"):
        adaprune(model, X, MaskRule("3:12", exclude="head"), progress=False)
    with pytest.raises(ValueError, match=r"batch=100 exceeds calibration_batch's 64 samples"):
        adaprune(model, X, RULE, solver="adam", batch=100, progress=False)
    with pytest.raises(ValueError, match="samples along axis 0, got a scalar"):
        adaprune(model, jnp.float32(1), RULE, progress=False)
    with pytest.raises(TypeError, match=r"pass \(module, params\)"):
        adaprune(MLP(), X, RULE, progress=False)
    with pytest.raises(ValueError, match="solver must be one of"):
        adaprune(model, X, RULE, solver="sgd", progress=False)
    with pytest.raises(ValueError, match="damping must be >= 0"):
        adaprune(model, X, RULE, damping=-1.0, progress=False)
    # A feature that is always 0 makes XᵀX singular: without damping that is an error.
    dead = X.at[:, :4].set(0.0)
    with pytest.raises(ValueError, match="'Dense_0/kernel'.*singular or ill-conditioned: "
                                         "pass damping > 0"):
        adaprune(model, dead, MaskRule("2:4", exclude=["head", "Dense_1"]), solver="lstsq",
                 damping=0.0, progress=False)


def test_non_finite_calibration_inputs_are_named():
    model = (MLP(), PARAMS)
    # Once said "the lstsq solve gave non-finite weights; lower lr" (lstsq has no lr).
    with pytest.raises(ValueError, match=r"calibration_batch of shape \(64, 16\) holds 1 "
                                         r"non-finite value"):
        adaprune(model, X.at[3, 5].set(jnp.nan), RULE, solver="lstsq", progress=False)
    with pytest.raises(ValueError, match=r"held_out of shape \(64, 16\) holds 2 non-finite"):
        adaprune(model, X, RULE, held_out=X_HELD.at[0, :2].set(jnp.inf), progress=False)
    # A finite batch that an earlier layer overflows: the layer whose inputs broke is named.
    huge = jax.tree_util.tree_map_with_path(
        lambda kp, w: w * 1e30 if "Dense" in str(kp) and "kernel" in str(kp) else w, PARAMS)
    with pytest.raises(ValueError, match=r"layer 'head/kernel': its inputs.*non-finite"):
        adaprune((MLP(), huge), X, MaskRule("2:4", include=r"head/kernel$", axis=0),
                 solver="lstsq", progress=False)


def test_layers_adaprune_cannot_take_are_refused_by_name():
    class Grouped(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(8, (3, 3), feature_group_count=2)(x)
            return nn.Dense(4, name="head")(x.reshape(len(x), -1))

    images = jnp.concatenate([IMAGES, IMAGES], axis=-1)
    params = Grouped().init(jax.random.key(0), images)["params"]
    with pytest.raises(ValueError, match=r"'Conv_0/kernel'.*grouped convolution"):
        adaprune((Grouped(), params), images, MaskRule("2:4", exclude="head"), progress=False)

    class Unused(nn.Module):
        @nn.compact
        def __call__(self, x):
            nn.Dense(8, name="spare")
            return nn.Dense(16, name="body")(x)

    # A kernel no op of the traced call uses is not a product weight: the plan leaves it
    # out, and the conversion leaves it as it is.
    params = {"body": PARAMS["Dense_1"], "spare": PARAMS["Dense_1"]}
    conv = adaprune((Unused(), params), jnp.ones((8, 32)), MaskRule("2:4", include="kernel$"),
                    solver="lstsq", progress=False)
    assert conv.plan.paths == ("body/kernel",)
    np.testing.assert_array_equal(conv.params["spare"]["kernel"], params["spare"]["kernel"])


# -------------------------------------------------------------------- N from density


def test_choose_n_is_the_smallest_n_whose_binomial_tail_clears_the_confidence():
    from scipy.stats import binom

    for m in (4, 8, 16):
        for density in (0.0, 0.05, 0.2, 0.37, 0.5, 0.8, 1.0):
            for confidence in (0.9, 0.95, 0.99):
                n = choose_n(density, m, confidence=confidence)
                assert 1 <= n <= m
                assert binom.cdf(n, m, density) > confidence or n == m
                if n > 1:
                    assert binom.cdf(n - 1, m, density) <= confidence
    assert choose_n(0.5, 8) > choose_n(0.25, 8) > choose_n(0.05, 8)
    with pytest.raises(ValueError, match="density must be in"):
        choose_n(1.5, 4)
    with pytest.raises(ValueError, match="confidence must be"):
        choose_n(0.5, 4, confidence=1.0)


def test_global_magnitude_prune_keeps_the_largest_weights_across_layers():
    pruned = global_magnitude_prune(PARAMS, 0.3, exclude="head")
    kernels_ = [np.asarray(PARAMS[k]["kernel"]) for k in ("Dense_0", "Dense_1")]
    total = sum(k.size for k in kernels_)
    kept = [np.asarray(pruned.masks[k]["kernel"]) for k in ("Dense_0", "Dense_1")]
    assert sum(int(m.sum()) for m in kept) == round(0.3 * total)
    kept_abs = np.concatenate([np.abs(k[m]) for k, m in zip(kernels_, kept, strict=True)])
    pruned_abs = np.concatenate([np.abs(k[~m]) for k, m in zip(kernels_, kept, strict=True)])
    assert kept_abs.min() >= pruned_abs.max()
    np.testing.assert_array_equal(pruned.params["head"]["kernel"], PARAMS["head"]["kernel"])
    assert pruned.masks["head"]["kernel"] is None and pruned.masks["Dense_0"]["bias"] is None
    densities = layer_densities(pruned.params, exclude="head")
    assert set(densities) == {"Dense_0/kernel", "Dense_1/kernel"}
    assert densities["Dense_0/kernel"] == pytest.approx(kept[0].mean())
    # NNX states prune alike, given the model's plan (their layer names show no layout).
    twin = nnx_twin(PARAMS)
    state = nnx.state(twin, nnx.Param)
    with pytest.raises(ValueError, match="cannot be known from the parameters alone"):
        global_magnitude_prune(state, 0.3, exclude="head")
    plan = nmjax.resolve(twin, MaskRule("2:4", exclude="head"), X)
    pruned_nnx = global_magnitude_prune(state, 0.3, plan)
    np.testing.assert_array_equal(pruned_nnx.params["layers"][1]["kernel"].get_value(),
                                  pruned.params["Dense_1"]["kernel"])
    with pytest.raises(ValueError, match="density must be in"):
        global_magnitude_prune(PARAMS, 0.0)


def test_rules_for_density_pick_n_per_layer_and_adaprune_takes_them():
    pruned = global_magnitude_prune(PARAMS, 0.35, exclude="head").params
    densities = layer_densities(pruned, exclude="head")
    rules = rules_for_density(pruned, 8, exclude="head")
    planned = nmjax.plan.plan_for_params(pruned, rules).by_path
    for path, density in densities.items():
        assert planned[path].pattern == as_pattern(f"{choose_n(density, 8)}:8")
    conv = adaprune((MLP(), pruned), X, rules, solver="lstsq", progress=False)
    assert {r.pattern for r in conv.layers} == {r.label for r in rules}
    for r in conv.layers:
        assert r.density == pytest.approx(densities[r.path])
        assert r.fit_error_adaprune <= r.fit_error_magnitude + 1e-6
    with pytest.raises(ValueError, match=r"'head/kernel' of shape \(16, 10\) cannot take"):
        rules_for_density(pruned, 8, nmjax.resolve(MLP(), "2:4", X, params=pruned),
                          kind="transposable")
    # With a model's plan: the kernels and layouts it names (here, head left out).
    plan = nmjax.resolve(MLP(), MaskRule("2:4", exclude="head"), X, params=pruned)
    assert layer_densities(pruned, plan) == densities
    assert rules_for_density(pruned, 8, plan) == rules


# --------------------------------------------------------------- report and fine-tune


def test_report_table_and_dict(capsys):
    conv = adaprune((MLP(), PARAMS), X, RULE, held_out=X_HELD, solver="lstsq", progress=True)
    assert "Dense_1/kernel" in capsys.readouterr().err        # the progress bars
    metrics = {"dense": {"loss": 0.1, "accuracy": 0.9}, "adaprune": {"accuracy": 0.8}}
    report = conv.report(metrics)
    text = str(report)
    for r in conv.layers:
        assert r.path in text and f"{r.error_adaprune:.4f}" in text
    assert "held-out" in text and "0.9000" in text and "adaprune" in text
    d = report.as_dict()
    assert d["held_out"] is True and d["model"] == metrics
    assert [row["path"] for row in d["layers"]] == ["Dense_0/kernel", "Dense_1/kernel"]
    assert d["layers"][1]["error_adaprune"] == conv.layers[1].error_adaprune
    assert conv.layers[0].error_adaprune != conv.layers[0].fit_error_adaprune
    with pytest.raises(TypeError, match="metrics must be a mapping"):
        conv.report({"dense": 0.9})


def test_finetuning_goes_straight_on_from_the_conversion():
    rule = MaskRule("2:4", exclude="head")
    conv = adaprune((MLP(), PARAMS), X, rule, solver="lstsq", progress=False)
    # The optimizer's own masks of the converted weights are the conversion's.
    tx = sparse(optax.adam(1e-3), rule, refresh_every=1000)
    state = tx.init(conv.params)
    for path in ("Dense_0", "Dense_1"):
        np.testing.assert_array_equal(masks_of(state)[path]["kernel"].fwd,
                                      conv.masks[path]["kernel"].fwd)
    target = jnp.asarray(RNG.standard_normal((64, 10)), jnp.float32)

    def loss(params, collection):
        out = conv.model.apply({"params": params, "nm_masks": collection}, X)
        return jnp.mean((out - target) ** 2)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params, collection(state))
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = conv.params
    first = loss(params, collection(conv))
    for _ in range(20):
        params, state = step(params, state)
    assert loss(params, collection(state)) < first

    # NNX: the returned sparse model trains with an nnx.Optimizer around the conversion's
    # plan (a bare rule cannot know an NNX kernel's layout: refused, never guessed).
    nconv = adaprune(nnx_twin(PARAMS), X, rule, solver="lstsq", progress=False)
    model = nconv.model
    with pytest.raises(ValueError, match="cannot be known from the parameters alone"):
        nnx.Optimizer(model, sparse(optax.adam(1e-3), rule), wrt=nnx.Param)
    optimizer = nnx.Optimizer(model, sparse(optax.adam(1e-3), nconv.plan, refresh_every=1000),
                              wrt=nnx.Param)
    np.testing.assert_array_equal(
        masks_of(optimizer.opt_state)["layers"][0]["kernel"].fwd,
        nconv.masks["layers"][0]["kernel"].fwd)

    @nnx.jit
    def nstep(model, optimizer):
        value, grads = nnx.value_and_grad(lambda m: jnp.mean((m(X) - target) ** 2))(model)
        optimizer.update(model, grads)
        sync(model, optimizer.opt_state)
        return value

    values = [float(nstep(model, optimizer)) for _ in range(20)]
    assert values[-1] < values[0]
