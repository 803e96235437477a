"""Mask rules on real Flax Linen and NNX models (MLP and CNN)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import nmjax
from nmjax.masks import Custom, Masks, Transposable, is_nm
from nmjax.tree import (
    MaskRule,
    apply_masks,
    build_masks,
    path_str,
    summarize,
)


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        x = nn.LayerNorm()(x)
        return nn.Dense(8, name="head")(x)


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        return nn.Dense(4)(x.reshape(x.shape[0], -1))


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(10, 16, rngs=rngs)
        self.fc1 = nnx.Linear(16, 32, rngs=rngs)
        self.norm = nnx.LayerNorm(32, rngs=rngs)
        self.fc2 = nnx.Linear(32, 8, rngs=rngs)

    def __call__(self, tokens):
        return self.fc2(self.norm(nnx.relu(self.fc1(self.embed(tokens)))))


class NNXCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(8, 8, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), rngs=rngs)
        self.fc = nnx.Linear(16 * 16, 4, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
        return self.fc(x.reshape(x.shape[0], -1))


def key(seed=0):
    # threefry initialisers of 4-D kernels take 10-20 s to compile on a 2-core CPU; rbg ~1 s.
    return jax.random.key(seed, impl="rbg")


def linen_params(model, x):
    return model.init(key(), x)["params"]


MODELS = {
    "linen_mlp": lambda: linen_params(LinenMLP(), jnp.ones((1, 16))),
    "linen_cnn": lambda: linen_params(LinenCNN(), jnp.ones((1, 4, 4, 8))),
    "nnx_mlp": lambda: nnx.state(NNXMLP(nnx.Rngs(key())), nnx.Param),
    "nnx_cnn": lambda: nnx.state(NNXCNN(nnx.Rngs(key())), nnx.Param),
}
INPUTS = {"linen_mlp": (LinenMLP, jnp.ones((1, 16))),
          "linen_cnn": (LinenCNN, jnp.ones((1, 4, 4, 8))),
          "nnx_mlp": (NNXMLP, jnp.zeros((1, 3), jnp.int32)),
          "nnx_cnn": (NNXCNN, jnp.ones((1, 4, 4, 8)))}


def plan_for(name, rule):
    """The rule resolved against the model (its ops give each kernel's axes)."""
    cls, x = INPUTS[name]
    model = cls() if name.startswith("linen") else cls(nnx.Rngs(key()))
    return nmjax.resolve(model, rule, x)


def flat(tree):
    """``{path: leaf}``; a Masks counts as one leaf and is shown by its forward mask."""
    is_leaf = lambda x: x is None or isinstance(x, Masks)  # noqa: E731
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {path_str(p): (v.fwd if isinstance(v, Masks) else v) for p, v in leaves}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_default_rule_on_real_models(name, n, m):
    params = MODELS[name]()
    rule = plan_for(name, MaskRule(f"{n}:{m}"))
    masks = build_masks(params, rule)
    p, mk = flat(params), flat(masks)
    assert p.keys() == mk.keys()
    masked = {k for k, v in mk.items() if v is not None}
    assert masked == {k for k in p if k.endswith("kernel")}
    for k in masked:
        w = p[k]
        axis = w.ndim - 2  # Dense (in, out) -> 0; Conv HWIO -> I
        assert mk[k].shape == w.shape
        assert bool(is_nm(mk[k], n, m, axis=axis, exact=True)), k
        # Magnitude: every kept |w| >= every pruned |w| of its group.
        g = np.moveaxis(np.abs(np.asarray(w)), axis, -1).reshape(-1, m)
        kg = np.moveaxis(np.asarray(mk[k]), axis, -1).reshape(-1, m)
        assert (np.where(kg, g, np.inf).min(-1) >= np.where(kg, -np.inf, g).max(-1)).all()
    sparse = flat(apply_masks(params, masks))
    for k in p:
        expect = p[k] if mk[k] is None else jnp.where(mk[k], p[k], 0)
        np.testing.assert_array_equal(sparse[k], expect)
        assert sparse[k].dtype == p[k].dtype
    summary = summarize(params, masks, rule)
    text = str(summary)
    for k in p:
        assert k in text
    assert {r.path: r.density for r in summary.rows} == {
        k: (n / m if k in masked else 1.0) for k in p
    }
    assert summary.total == sum(v.size for v in p.values())


def test_nnx_round_trip_into_model():
    model = NNXCNN(nnx.Rngs(key()))
    params = nnx.state(model, nnx.Param)
    with pytest.raises(ValueError, match=r"layout of 'conv1/kernel'.*nmjax.resolve"):
        build_masks(params, MaskRule("2:4"))           # no model: no guessing
    sparse = apply_masks(params, build_masks(params, nmjax.resolve(model, "2:4",
                                                                   jnp.ones((1, 4, 4, 8)))))
    nnx.update(model, sparse)
    assert bool(is_nm(model.conv2.kernel[...] != 0, 2, 4, axis=2))
    y = model.fc(jnp.ones((1, 256)))
    assert y.shape == (1, 4)


def test_include_exclude_predicate():
    params = MODELS["linen_mlp"]()
    only_head = build_masks(params, plan_for("linen_mlp", MaskRule("2:4", include=r"head/kernel$")))
    assert flat(only_head)["Dense_0/kernel"] is None
    assert flat(only_head)["head/kernel"] is not None
    no_head = build_masks(params, plan_for("linen_mlp", MaskRule("2:4", exclude="head")))
    assert flat(no_head)["head/kernel"] is None and flat(no_head)["Dense_0/kernel"] is not None
    big = build_masks(params, plan_for("linen_mlp",
                                       MaskRule("2:4", predicate=lambda path, w: w.size > 300)))
    assert flat(big)["head/kernel"] is None and flat(big)["Dense_0/kernel"] is not None
    # Without a model, include= with an explicit axis takes a leaf as told.
    emb = build_masks(MODELS["nnx_mlp"](), MaskRule("2:4", include="embedding", axis=1))
    assert bool(is_nm(flat(emb)["embed/embedding"], 2, 4, axis=1))
    # With the model, the embedding is a lookup (not a product): asking for it is refused.
    with pytest.raises(ValueError, match=r"embed/embedding.*cannot be sparse|no parameter"):
        plan_for("nnx_mlp", MaskRule("2:4", include="embedding"))


def test_custom_pattern_and_jit():
    params = MODELS["linen_cnn"]()

    def keep_first(w, axis):
        idx = jnp.arange(w.shape[axis]) % 4 < 1
        return jnp.broadcast_to(jnp.expand_dims(idx, range(1, w.ndim - axis)), w.shape)

    masks = build_masks(params, MaskRule(Custom(keep_first, fwd_nm=(1, 4))))
    k = flat(masks)["Conv_1/kernel"]
    assert bool(is_nm(k, 1, 4, axis=2, exact=True))
    assert bool(k[..., 0, :].all()) and not bool(k[..., 1:4, :].any())
    rule = MaskRule("2:4")
    jitted = jax.jit(lambda p: build_masks(p, rule))(params)
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(build_masks(params, rule)),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_dense_general_is_not_guessed():
    """A rank-4 DenseGeneral kernel (contracting axes 0, 1): refused without the model,
    resolved from its dot_general with it."""

    class Proj(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.DenseGeneral(features=(4, 8), axis=(-2, -1), name="proj")(x)

    x = jnp.ones((2, 3, 8, 16))
    params = linen_params(Proj(), x)
    with pytest.raises(ValueError, match="cannot be known from the parameters alone"):
        build_masks(params, MaskRule("2:4"))
    plan = nmjax.resolve(Proj(), "2:4", x)
    assert plan.by_path["proj/kernel"].layout.contract == (0, 1)
    mask = flat(build_masks(params, plan))["proj/kernel"]            # (8, 16, 4, 8)
    assert bool(is_nm(mask.reshape(128, 32), 2, 4, axis=0, exact=True))


def test_inputs_not_mutated():
    params = MODELS["linen_mlp"]()
    before = jax.tree.map(np.array, params)
    apply_masks(params, build_masks(params, plan_for("linen_mlp", "2:4")))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_input():
    params = {"Dense_0": {"kernel": jnp.ones((6, 4))}, "g": {"kernel": jnp.ones((2, 4, 8))}}
    with pytest.raises(ValueError, match=r"parameter 'Dense_0/kernel' of shape \(6, 4\) cannot "
                                         r"take pattern '2:4 nm': its contraction axis 0 has "
                                         r"length 6, not divisible by m=4.*exclude="):
        build_masks(params, MaskRule("2:4", exclude="g"))
    assert flat(build_masks({**params, "Dense_1": {"kernel": jnp.ones((8, 4))}},
                            MaskRule("2:4", skip_indivisible=True, exclude="g")))[
        "Dense_0/kernel"] is None
    with pytest.raises(ValueError, match=r"'g/kernel' \(shape \(2, 4, 8\)\) cannot be known"):
        build_masks(params, MaskRule("2:4", include="g/"))
    masks = build_masks({"d": {"kernel": jnp.ones((8, 8))}}, MaskRule("2:4 transposable", axis=1))
    assert bool(is_nm(masks["d"]["kernel"].fwd, 2, 4, axis=1, exact=True))  # (out, in) by hand
    with pytest.raises(ValueError, match="pattern string must be 'N:M'"):
        MaskRule("2:4 magic")
    with pytest.raises(TypeError, match="pattern must be a pattern spec"):
        MaskRule(5)
    assert MaskRule("2:4", exclude=None).exclude == ()
    with pytest.raises(ValueError, match="n must be <= m"):
        MaskRule("8:4")
    with pytest.raises(ValueError, match="include regex"):
        MaskRule("2:4", include="(")
    with pytest.raises(TypeError, match="skip_indivisible must be a bool"):
        MaskRule("2:4", skip_indivisible="yes")
    good = {"d": {"kernel": jnp.ones((8, 4))}}
    with pytest.raises(ValueError, match=r"mask for 'd/kernel' has shape \(4, 4\)"):
        apply_masks(good, {"d": {"kernel": jnp.ones((4, 4), bool)}})
    with pytest.raises(TypeError, match="mask for 'd/kernel' must be a boolean"):
        apply_masks(good, {"d": {"kernel": jnp.ones((8, 4))}})


def test_masks_of_another_model_name_the_paths_that_differ():
    params = MODELS["linen_mlp"]()
    other = build_masks(MODELS["linen_cnn"](), MaskRule("2:4"))
    with pytest.raises(ValueError, match=r"do not match the parameter tree .*params paths "
                                         r"missing from masks: \['LayerNorm_0/bias'"):
        apply_masks(params, other)
    with pytest.raises(ValueError, match=r"masks paths not in params: \['Conv_0/bias'"):
        summarize(params, other)


def test_shorthand_and_specs_are_one_thing():
    assert MaskRule("2:4 transposable") == MaskRule(Transposable(2, 4))
    assert MaskRule("transposable 2:4").pattern == Transposable(2, 4)
    assert hash(MaskRule("4:8")) == hash(MaskRule("4:8"))
    with pytest.raises(ValueError, match="at most one kind"):
        MaskRule("2:4 nm transposable")
