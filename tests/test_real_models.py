"""Models nobody here wrote: Hugging Face Flax GPT-2 / BERT / ViT (tiny random configs; nothing
downloads), flax's DenseGeneral/Einsum stacks as MaxText builds them, custom einsum modules,
nn.scan / nnx.scan stacks and shared NNX layers -- through the README recipe.

Masks are checked with numpy along each kernel's real contraction axis, which the tests state
from the architectures (GPT-2's Conv1D kernels are (out, in): axis 1), not from nmjax.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import nmjax
from nmjax.masks import BiMask, Transposable
from nmjax.tree import MaskRule, apply_masks

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", message=".*TensorFlow and JAX classes are deprecated.*")

PATTERNS = ["2:4", "2:4 transposable", "2:4 bimask"]


# ------------------------------------------------------------------ independent checks


def np_nm(mask, n, m, axis, exact=False):
    """Every group of m consecutive entries along ``axis`` keeps at most (exactly) n."""
    a = np.moveaxis(np.asarray(mask), axis, -1)
    counts = a.reshape(*a.shape[:-1], -1, m).sum(-1)
    return bool((counts == n).all() if exact else (counts <= n).all())


def check_masks(masks, pattern, contract_axis, out_axis):
    """The pattern's promise on a 2-D kernel, checked with numpy only."""
    fwd, bwd = np.asarray(masks.fwd), np.asarray(masks.bwd)
    assert np_nm(fwd, 2, 4, contract_axis, exact=True)
    if "transposable" in pattern:
        assert np_nm(fwd, 2, 4, out_axis, exact=True)
        assert (fwd == bwd).all()
    elif "bimask" in pattern:
        perm = np.asarray(masks.perm)
        assert sorted(perm.tolist()) == list(range(fwd.shape[out_axis]))
        assert np_nm(np.take(bwd, perm, axis=out_axis), 2, 4, out_axis)
        assert not (bwd & ~fwd).any()
    else:
        assert (fwd == bwd).all()


def leaf(tree, path):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def sparse_calls(fn, *args):
    """Number of sparse products (nm_dense / nm_conv custom_vjp calls) in fn's jaxpr."""
    text = str(jax.make_jaxpr(fn)(*args))
    return text.count("custom_vjp_call")


def readme_recipe(module, params, plan, loss_of_output, inputs, steps=20, lr=3e-3):
    """The README's static recipe: plan -> sparsify(static) + optim.sparse; returns losses."""
    model = nmjax.nn.sparsify(module, plan, mode="static")
    tx = nmjax.optim.sparse(optax.adam(lr), plan, refresh_every=1)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        masks = nmjax.nn.collection(opt_state)

        def loss(p):
            return loss_of_output(model.apply({"params": p, "nm_masks": masks}, **inputs))

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    losses = []
    for _ in range(steps):
        params, opt_state, value = step(params, opt_state)
        losses.append(float(value))
    return losses, params, opt_state


def nnx_readme_recipe(model, plan, x, steps=20):
    """The README's NNX recipe on ``(m(x) ** 2).mean()``: ``(sparse model, optimizer,
    losses)``."""
    sparse = nmjax.nn.sparsify(model, plan, mode="static")
    optimizer = nnx.Optimizer(sparse, nmjax.optim.sparse(optax.adam(3e-3), plan), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: (m(x) ** 2).mean())(model)
        optimizer.update(model, grads)
        nmjax.nn.sync(model, optimizer)
        return loss

    return sparse, optimizer, [float(step(sparse, optimizer)) for _ in range(steps)]


# --------------------------------------------------------------------- Hugging Face


@pytest.fixture(scope="module")
def gpt2():
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1,
                                  n_head=4)
    model = transformers.FlaxGPT2LMHeadModel(cfg, seed=0)
    ids = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
    inputs = dict(input_ids=ids, attention_mask=jnp.ones((2, 8), jnp.int32),
                  position_ids=jnp.broadcast_to(jnp.arange(8), (2, 8)))
    return model, inputs


@pytest.fixture(scope="module")
def bert():
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=16, num_labels=4)
    model = transformers.FlaxBertForSequenceClassification(cfg, seed=0)
    ids = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)
    inputs = dict(input_ids=ids, attention_mask=jnp.ones((2, 8), jnp.int32),
                  token_type_ids=jnp.zeros((2, 8), jnp.int32),
                  position_ids=jnp.broadcast_to(jnp.arange(8), (2, 8)), head_mask=None)
    return model, inputs


@pytest.fixture(scope="module")
def vit():
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=4, hidden_size=32,
                                 num_hidden_layers=1, num_attention_heads=4,
                                 intermediate_size=64, num_labels=4)
    model = transformers.FlaxViTForImageClassification(cfg, seed=0)
    pixels = jax.random.normal(jax.random.key(2), (2, 8, 8, 4))   # NHWC for the module
    return model, dict(pixel_values=pixels)


# (fixture, rule, the real axes of each selected kernel: (path suffix, contract, out), loss)
GPT2_AXES = [(f"transformer/h/{i}/{p}/kernel", 1, 0) for i in range(1)
             for p in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")]
BERT_AXES = [(f"bert/encoder/layer/0/{p}/kernel", 0, 1) for p in (
    "attention/self/query", "attention/self/key", "attention/self/value",
    "attention/output/dense", "intermediate/dense", "output/dense")] + [
    ("bert/pooler/dense/kernel", 0, 1)]
VIT_AXES = [(f"vit/encoder/layer/0/{p}/kernel", 0, 1) for p in (
    "attention/attention/query", "attention/attention/key", "attention/attention/value",
    "attention/output/dense", "intermediate/dense", "output/dense")]


def lm_loss(out, ids):
    return optax.softmax_cross_entropy_with_integer_labels(out.logits[:, :-1], ids[:, 1:]).mean()


def cls_loss(out):
    return optax.softmax_cross_entropy_with_integer_labels(
        out.logits, jnp.array([0, 3])).mean()


CASES = {
    "gpt2": (GPT2_AXES, MaskRule, lambda inputs: lambda o: lm_loss(o, inputs["input_ids"])),
    "bert": (BERT_AXES, lambda p: MaskRule(p, exclude="classifier"), lambda _: cls_loss),
    "vit": (VIT_AXES, lambda p: MaskRule(p, exclude="classifier"), lambda _: cls_loss),
}


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("name", ["gpt2", "bert", "vit"])
def test_hf_models_every_projection_sparse_valid_exact_and_training(name, pattern, request):
    hf, inputs = request.getfixturevalue(name)
    axes, make_rule, make_loss = CASES[name]
    plan = nmjax.resolve(hf.module, make_rule(pattern), params=hf.params, **inputs)
    planned = plan.by_path
    for path, contract, out in axes:               # every projection, along its real axis
        assert path in planned, (path, str(plan))
        assert planned[path].layout.contract == (contract,)
        assert planned[path].layout.out == (out,)

    sparse = nmjax.nn.sparsify(hf.module, plan, mode="static")
    tx = nmjax.optim.sparse(optax.adam(3e-3), plan, refresh_every=1)
    opt_state = tx.init(hf.params)
    masks = nmjax.optim.masks_of(opt_state)
    for path, contract, out in axes:
        check_masks(leaf(masks, path), pattern, contract, out)
    loss_of = make_loss(inputs)

    def logits(p, collection):
        got = sparse.apply({"params": p, "nm_masks": collection}, **inputs).logits
        return got, hf.module.apply({"params": apply_masks(p, masks)}, **inputs).logits

    collection = nmjax.nn.collection(opt_state)
    got, want = jax.jit(logits)(hf.params, collection)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert sparse_calls(lambda p: logits(p, collection)[0], hf.params) >= len(plan.leaves)

    @jax.jit
    def step(params, opt_state):                    # the README's static recipe
        collection = nmjax.nn.collection(opt_state)
        value, grads = jax.value_and_grad(lambda p: loss_of(
            sparse.apply({"params": p, "nm_masks": collection}, **inputs)))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    params, losses = hf.params, []
    for _ in range(20):
        params, opt_state, value = step(params, opt_state)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    masks = nmjax.optim.masks_of(opt_state)
    for path, contract, out in axes:
        check_masks(leaf(masks, path), pattern, contract, out)


def test_gpt2_bare_rule_refuses_instead_of_the_wrong_axis(gpt2):
    hf, _ = gpt2
    # Case 1: (out, in) Conv1D kernels under unknown names: refused, with the fix.
    with pytest.raises(ValueError, match=r"transformer/h/0/attn/c_attn/kernel.*nmjax.resolve"):
        nmjax.optim.sparse(optax.adamw(1e-3), "2:4").init(hf.params)
    with pytest.raises(ValueError, match="cannot be known from the parameters alone"):
        nmjax.tree.build_masks(hf.params, MaskRule("2:4"))


def test_gpt2_sparsify_with_a_rule_makes_every_projection_sparse(gpt2):
    hf, inputs = gpt2
    # Case 2: sparsify(gpt2.module, "2:4") used to make only the tied head sparse.
    sparse = nmjax.nn.sparsify(hf.module, "2:4")
    jaxpr = str(jax.make_jaxpr(lambda p: sparse.apply({"params": p}, **inputs))(hf.params))
    assert jaxpr.count("custom_vjp_call") == 4            # 1 layer x 4 projections
    plan = sparse.resolve(hf.params, **inputs)
    assert "tied" in dict(plan.dense)["transformer/wte/embedding"]


def test_gpt2_keyword_only_call(gpt2):
    hf, inputs = gpt2
    # Case 6: keyword-only calls crashed in the interceptor (KeyError: 'inputs').
    sparse = nmjax.nn.sparsify(hf.module, "2:4 transposable")
    out = jax.jit(lambda p: sparse.apply({"params": p}, **inputs).logits)(hf.params)
    assert out.shape == (2, 8, 64)


def test_gpt2_tied_head_named_when_asked_for(gpt2):
    hf, inputs = gpt2
    # Case 4: asking for the tied embedding names the tying (never "no mask for 'kernel'").
    with pytest.raises(ValueError, match=r"wte/embedding.*tied.*gather"):
        nmjax.resolve(hf.module, MaskRule("2:4", include="wte"), params=hf.params, **inputs)


def test_vit_patch_conv_same_selection_for_model_and_optimizer(vit):
    hf, inputs = vit
    # Case 5: the patch conv (named "projection") made model and optimizer disagree.
    plan = nmjax.resolve(hf.module, MaskRule("2:4", exclude="classifier"), params=hf.params,
                         **inputs)
    conv = plan.by_path["vit/embeddings/patch_embeddings/projection/kernel"]
    assert conv.op == "conv_general_dilated"
    assert conv.layout.contract == (0, 1, 2) and conv.layout.out == (3,)   # HWIO, along I
    masks = nmjax.tree.build_masks(hf.params, plan)
    mask = leaf(masks, "vit/embeddings/patch_embeddings/projection/kernel").fwd
    assert np_nm(mask, 2, 4, 2, exact=True)
    losses, _, _ = readme_recipe(hf.module, hf.params, plan, cls_loss, inputs, steps=5)
    assert np.isfinite(losses).all()


def test_indivisible_layer_message_leads_somewhere(bert):
    hf, inputs = bert
    # Case 8: the refusal used to advise skip_indivisible=True ("selects no parameter").
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=16, num_labels=3)
    model = transformers.FlaxBertForSequenceClassification(cfg, seed=0)
    with pytest.raises(ValueError, match=r"classifier/kernel.*exclude=") as err:
        nmjax.resolve(model.module, "2:4 transposable", params=model.params, **inputs)
    hint = str(err.value).split("exclude=r\"")[1].split("\"")[0]
    plan = nmjax.resolve(model.module, MaskRule("2:4 transposable", exclude=hint),
                         params=model.params, **inputs)
    assert "classifier/kernel" not in plan.by_path and len(plan.leaves) == 7


# ----------------------------------------------------- MaxText-style layers, custom ops


class DenseGeneralBlock(nn.Module):
    """Attention projections and MLP as MaxText writes them: DenseGeneral with several
    contraction axes (heads, head_dim -> embed), and an Einsum with an (out, in) kernel."""

    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((4, 8), axis=-1, name="query")(x)             # embed -> heads, d
        o = nn.DenseGeneral(32, axis=(-2, -1), name="out")(q)               # heads, d -> embed
        h = nn.Einsum((64, 32), "bte,fe->btf", name="wi")(o)                # (out, in) kernel
        return nn.DenseGeneral(32, name="wo")(nn.gelu(h))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_dense_general_and_einsum_stack(pattern):
    x = jax.random.normal(jax.random.key(0), (2, 4, 32))
    module = DenseGeneralBlock()
    params = module.init(jax.random.key(1), x)["params"]
    plan = nmjax.resolve(module, pattern, x)
    got = {leaf.path: (leaf.layout.contract, leaf.layout.out) for leaf in plan.leaves}
    assert got == {"query/kernel": ((0,), (1, 2)), "out/kernel": ((0, 1), (2,)),
                   "wi/kernel": ((1,), (0,)), "wo/kernel": ((0,), (1,))}
    masks = nmjax.tree.build_masks(params, plan)
    # out/kernel (heads, d, embed) contracts (heads, d): groups along the flattened pair
    out = masks["out"]["kernel"]
    check_masks(out._replace(fwd=out.fwd.reshape(32, 32), bwd=out.bwd.reshape(32, 32)),
                pattern, 0, 1)
    q = masks["query"]["kernel"]                          # (embed, heads, d): out is (heads, d)
    check_masks(q._replace(fwd=q.fwd.reshape(32, 32), bwd=q.bwd.reshape(32, 32)), pattern, 0, 1)
    check_masks(masks["wi"]["kernel"], pattern, 1, 0)
    got = nmjax.nn.sparsify(module, plan).apply({"params": params}, x)
    want = module.apply({"params": apply_masks(params, masks)}, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    losses, _, _ = readme_recipe(module, params, plan, lambda y: (y ** 2).mean(), {"x": x})
    assert losses[-1] < losses[0]


class EinsumOutIn(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.lecun_normal(), (16, 32))   # (out, in)
        return jnp.einsum("bi,oi->bo", x, w)


def test_custom_einsum_out_in_kernel_both_directions():
    x = jax.random.normal(jax.random.key(0), (4, 32))
    params = EinsumOutIn().init(jax.random.key(1), x)["params"]
    plan = nmjax.resolve(EinsumOutIn(), Transposable(2, 4), x)
    assert plan.by_path["w"].layout.contract == (1,)
    masks = nmjax.tree.build_masks(params, plan)
    check_masks(masks["w"], "transposable", 1, 0)
    sparse = nmjax.nn.sparsify(EinsumOutIn(), plan)
    dx = jax.grad(lambda x: sparse.apply({"params": params}, x).sum())(x)
    w = np.asarray(params["w"]) * np.asarray(masks["w"].fwd)
    np.testing.assert_allclose(dx, np.ones((4, 16)) @ w, rtol=1e-5, atol=1e-5)


class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.relu(nn.Dense(16, name="fc")(x)), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(nn.remat(Layer), variable_axes={"params": 0},   # as MaxText stacks
                        split_rngs={"params": True}, length=3)
        x, _ = stack(name="layers")(x, None)
        return nn.Dense(4, name="head")(x)


@pytest.mark.parametrize("pattern", ["2:4 transposable", "2:4 bimask"])
def test_linen_scan_trains_static_with_per_layer_masks(pattern):
    # Case 7: stacked (layers, in, out) kernels were not recognised by the optimizer.
    x = jax.random.normal(jax.random.key(0), (8, 16))
    module = Scanned()
    params = module.init(jax.random.key(1), x)["params"]
    plan = nmjax.resolve(module, MaskRule(pattern, exclude="head"), x)
    layout = plan.by_path["layers/fc/kernel"].layout
    assert (layout.stack, layout.contract, layout.out) == ((0,), (1,), (2,))
    losses, params, opt_state = readme_recipe(module, params, plan, lambda y: (y ** 2).mean(),
                                              {"x": x})
    assert losses[-1] < losses[0]
    masks = nmjax.optim.masks_of(opt_state)["layers"]["fc"]["kernel"]
    assert masks.fwd.shape == (3, 16, 16)
    for i in range(3):
        check_masks(type(masks)(masks.fwd[i], masks.bwd[i],
                                None if masks.perm is None else masks.perm[i]), pattern, 0, 1)


class NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(16, 16, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.fc(x))


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.inp = nnx.Linear(8, 16, rngs=rngs)
        self.shared = nnx.Linear(16, 16, rngs=rngs)
        self.again = self.shared                             # reachable from two places

        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return NNXBlock(rngs)

        self.blocks = make(rngs)
        self.head = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        x = self.again(self.shared(self.inp(x)))

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)

        return self.head(body(x, self.blocks))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_nnx_scan_and_shared_layer_train_static(pattern):
    model = NNXNet(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (8, 8))
    plan = nmjax.resolve(model, MaskRule(pattern, exclude="head"), x)
    assert len(plan.leaves) == 3                          # inp, the shared layer once, blocks
    assert plan.by_path["blocks/fc/kernel"].layout.stack == (0,)
    sparse, optimizer, losses = nnx_readme_recipe(model, plan, x)
    assert losses[-1] < losses[0]
    masks = nmjax.optim.masks_of(optimizer.opt_state)
    blocks = masks["blocks"]["fc"]["kernel"]
    for i in range(3):
        check_masks(type(blocks)(blocks.fwd[i], blocks.bwd[i],
                                 None if blocks.perm is None else blocks.perm[i]), pattern, 0, 1)
    by_path = nmjax.nn._sparsify.masks_by_path(masks)
    params = nnx.to_pure_dict(nnx.state(sparse, nnx.Param))
    masked = jax.tree_util.tree_map_with_path(
        lambda kp, w: w * by_path[nmjax.tree.path_str(kp)].fwd
        if nmjax.tree.path_str(kp) in by_path else w, params)
    dense = nnx.clone(model)
    state = nnx.state(dense, nnx.Param)
    nnx.replace_by_pure_dict(state, masked)
    nnx.update(dense, state)
    np.testing.assert_allclose(sparse(x), dense(x), rtol=1e-5, atol=1e-5)


class Outer(nn.Module):
    @nn.compact
    def __call__(self, tokens, scale=1.0):
        return nn.Dense(8)(tokens) * scale


def test_linen_keyword_only_call_and_flags():
    x = jnp.ones((2, 16))
    params = Outer().init(jax.random.key(0), x)["params"]
    out = nmjax.nn.sparsify(Outer(), BiMask(2, 4)).apply({"params": params}, tokens=x, scale=2.0)
    assert out.shape == (2, 8)


def test_rule_that_selects_nothing_raises():
    x = jnp.ones((2, 16))
    with pytest.raises(ValueError, match="selects no parameter"):
        nmjax.resolve(Outer(), MaskRule("2:4", include="nothing_here"), x)


def test_shared_by_different_axes_is_refused():
    class Both(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("w", nn.initializers.lecun_normal(), (16, 16))
            return x @ w + x @ w.T

    with pytest.raises(ValueError, match=r"'w'.*different axes"):
        nmjax.resolve(Both(), MaskRule("2:4", include="w"), jnp.ones((2, 16)))


def test_plain_function_and_summary_axes():
    w = jax.random.normal(jax.random.key(0), (32, 16))            # (out, in)
    params = {"proj": w, "b": jnp.zeros(32)}
    fn = lambda p, x: x @ p["proj"].T + p["b"]
    plan = nmjax.resolve(fn, "2:4", jnp.ones((2, 16)), params=params)
    assert plan.paths == ("proj",)
    masks = nmjax.tree.build_masks(params, plan)
    assert np_nm(masks["proj"].fwd, 2, 4, 1, exact=True)
    table = str(nmjax.tree.summarize(params, masks, plan))
    assert "(1,)" in table and "(0,)" in table


class Experts(nn.Module):
    """Per-expert kernels (a dot_general batch axis) and a kernel used as the left operand."""

    @nn.compact
    def __call__(self, x):                                          # x: (experts, tokens, d)
        w = self.param("experts", nn.initializers.lecun_normal(), (2, 16, 32))   # (e, in, out)
        h = jnp.einsum("etd,edf->etf", x, w)
        v = self.param("left", nn.initializers.lecun_normal(), (8, 32))          # (out, in)
        return jnp.einsum("oi,eti->eot", v, h)                       # kernel on the left


@pytest.mark.parametrize("pattern", ["2:4 transposable", "2:4 bimask"])
def test_batch_axes_and_kernel_on_the_left(pattern):
    x = jax.random.normal(jax.random.key(0), (2, 4, 16))
    params = Experts().init(jax.random.key(1), x)["params"]
    plan = nmjax.resolve(Experts(), pattern, x)
    experts, left = plan.by_path["experts"].layout, plan.by_path["left"].layout
    assert (experts.stack, experts.contract, experts.out) == ((0,), (1,), (2,))
    assert (left.contract, left.out) == ((1,), (0,))
    masks = nmjax.tree.build_masks(params, plan)
    for e in range(2):
        m = masks["experts"]
        check_masks(type(m)(m.fwd[e], m.bwd[e], None if m.perm is None else m.perm[e]),
                    pattern, 0, 1)
    check_masks(masks["left"], pattern, 1, 0)
    sparse = nmjax.nn.sparsify(Experts(), plan)
    got = sparse.apply({"params": params}, x)
    want = Experts().apply({"params": apply_masks(params, masks)}, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Straight-through weight gradients, the dense model's on the masked weights.
    if "transposable" in pattern:
        g = jax.grad(lambda p: sparse.apply({"params": p}, x).sum())(params)
        gd = jax.grad(lambda p: Experts().apply({"params": p}, x).sum())(apply_masks(params,
                                                                                   masks))
        for k in ("experts", "left"):
            np.testing.assert_allclose(g[k], gd[k], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------- MaxText's layers


def _maxtext_model():
    linears = pytest.importorskip("maxtext.layers.linears")
    from maxtext.common.common_types import ShardMode

    class Config:                # the fields MlpBlock and DenseGeneral read, nothing else
        weight_dtype = dtype = jnp.float32
        fused_mlp = mlp_bias = dense_fsdp_use_two_stage_all_gather = False
        debug_sharding = activations_in_float32 = False
        dropout_rate, matmul_precision, weight_block_size = 0.0, "default", None
        shard_mode = ShardMode.AUTO

    mesh = jax.sharding.Mesh(jax.devices()[:1], ("fsdp",))

    class Block(nnx.Module):
        """MaxText's attention projections (DenseGeneral over heads) and its MLP block."""

        def __init__(self, rngs):
            self.query = linears.DenseGeneral(32, (4, 8), rngs=rngs)
            self.out = linears.DenseGeneral((4, 8), 32, axis=(-2, -1), rngs=rngs)
            self.mlp = linears.MlpBlock(Config(), mesh, in_features=32, intermediate_dim=64,
                                        activations=("silu", "linear"),
                                        intermediate_dropout_rate=0.0, rngs=rngs)

        def __call__(self, x):
            x = x + self.out(self.query(x))
            return x + self.mlp(x, deterministic=True)

    return Block(nnx.Rngs(0))


@pytest.mark.parametrize("pattern", ["2:4 transposable", "2:4 bimask"])
def test_maxtext_dense_general_and_mlp_block(pattern):
    model = _maxtext_model()
    x = jax.random.normal(jax.random.key(1), (2, 4, 32))
    plan = nmjax.resolve(model, pattern, x)
    axes = {leaf.path: (leaf.layout.contract, leaf.layout.out) for leaf in plan.leaves}
    assert axes == {"query/kernel": ((0,), (1, 2)), "out/kernel": ((0, 1), (2,)),
                    "mlp/wi_0/kernel": ((0,), (1,)), "mlp/wi_1/kernel": ((0,), (1,)),
                    "mlp/wo/kernel": ((0,), (1,))}
    sparse, optimizer, losses = nnx_readme_recipe(model, plan, x)
    assert losses[-1] < losses[0]
    masks = nmjax.nn._sparsify.masks_by_path(nmjax.optim.masks_of(optimizer.opt_state))
    for path in ("mlp/wi_0/kernel", "mlp/wi_1/kernel", "mlp/wo/kernel"):
        check_masks(masks[path], pattern, 0, 1)
    out = masks["out/kernel"]                   # (heads, d, embed): groups along heads x d
    check_masks(type(out)(out.fwd.reshape(32, 32), out.bwd.reshape(32, 32), out.perm),
                pattern, 0, 1)
    q = masks["query/kernel"]                   # (embed, heads, d): output heads x d
    check_masks(type(q)(q.fwd.reshape(32, 32), q.bwd.reshape(32, 32), q.perm), pattern, 0, 1)
    assert bool(plan.valid(nmjax.optim.masks_of(optimizer.opt_state)))


class NormDropout(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3))(x))
        x = nn.Dropout(0.1, deterministic=not train)(x)
        return nn.Dense(8)(x.reshape(x.shape[0], -1))


def test_batch_stats_dropout_and_flags_through_resolve_and_sparsify():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 4))
    variables = NormDropout().init(jax.random.key(1), x, train=False)
    # A training-mode trace updates batch statistics and draws dropout: both just work.
    plan = nmjax.resolve(NormDropout(), "2:4", x, params=variables["params"], train=True,
                         rngs={"dropout": jax.random.key(2)})
    assert plan.paths == ("Conv_0/kernel", "Dense_0/kernel")
    sparse = nmjax.nn.sparsify(NormDropout(), plan, mode="static")
    masks = nmjax.nn.refresh(variables["params"], plan)
    y, updates = jax.jit(lambda v, k: sparse.apply(
        {**v, "nm_masks": masks}, x, train=True, rngs={"dropout": k},
        mutable=["batch_stats"]))(variables, jax.random.key(3))
    want, want_updates = NormDropout().apply(
        {**variables, "params": apply_masks(variables["params"], nmjax.tree.build_masks(
            variables["params"], plan))}, x, train=True,
        rngs={"dropout": jax.random.key(3)}, mutable=["batch_stats"])
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["BatchNorm_0"]["mean"],
                               want_updates["batch_stats"]["BatchNorm_0"]["mean"], rtol=1e-5,
                               atol=1e-6)


# ------------------------------------------------ one-shot conversion on the same models


@pytest.mark.parametrize(("method", "pattern"), [
    ("sparsegpt", "2:4"), ("wanda", "2:4 transposable")])
def test_conversions_take_gpt2_from_its_plan(gpt2, method, pattern):
    # GPT-2's FlaxConv1D stores (out, in) and contracts axis 1: the converters read that
    # from the op, as the training path does, and never from the layer's class or name.
    hf, inputs = gpt2
    batch = (inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"])
    conv = getattr(nmjax.convert, method)((hf.module, hf.params), batch, MaskRule(pattern),
                                          progress=False)
    assert [r.path for r in conv.layers] == [p for p, _, _ in GPT2_AXES]
    assert bool(conv.plan.valid(conv.masks))
    for path, contract, out in GPT2_AXES:
        masks = leaf(conv.masks, path)
        check_masks(masks, pattern, contract, out)
        kernel = np.asarray(leaf(conv.params, path))
        assert not kernel[~np.asarray(masks.fwd)].any()         # 0 outside the mask
    if method == "sparsegpt":      # Wanda is a heuristic: no such promise
        for r in conv.layers:
            assert r.error_adaprune <= r.error_magnitude + 1e-6, r
    # The returned static-sparse model computes the dense model on the converted weights.
    got = conv.model.apply({"params": conv.params, "nm_masks": nmjax.nn.collection(conv)}, *batch)
    want = hf.module.apply({"params": conv.params}, *batch)
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)


class Unrolled(nn.Module):
    """Scanned's twin with three separate layers."""

    @nn.compact
    def __call__(self, x):
        for i in range(3):
            x = nn.relu(nn.Dense(16, name=f"fc{i}")(x))
        return nn.Dense(4, name="head")(x)


@pytest.mark.parametrize("method", ["sparsegpt", "adaprune"])
def test_conversions_take_scanned_layers_one_by_one(method):
    # A kernel stacked for nn.scan (inside nn.remat) is converted layer by layer, in order,
    # each layer on the inputs of the already-converted layers below it: as its unrolled twin.
    x = jax.random.normal(jax.random.key(0), (64, 16))
    params = Scanned().init(jax.random.key(1), x)["params"]
    twin = {f"fc{i}": jax.tree.map(lambda a, i=i: a[i], params["layers"]["fc"])
            for i in range(3)} | {"head": params["head"]}
    fn = getattr(nmjax.convert, method)
    options = dict(solver="lstsq") if method == "adaprune" else {}
    conv = fn((Scanned(), params), x, MaskRule("2:4", exclude="head"), progress=False,
              **options)
    ref = fn((Unrolled(), twin), x, MaskRule("2:4", exclude="head"), progress=False, **options)
    assert [r.path for r in conv.layers] == [f"layers/fc/kernel[{i}]" for i in range(3)]
    masks = conv.masks["layers"]["fc"]["kernel"]
    for i in range(3):
        np.testing.assert_allclose(conv.params["layers"]["fc"]["kernel"][i],
                                   ref.params[f"fc{i}"]["kernel"], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(masks.fwd[i], ref.masks[f"fc{i}"]["kernel"].fwd)
        assert conv.layers[i].error_adaprune == pytest.approx(ref.layers[i].error_adaprune,
                                                              rel=1e-3, abs=1e-6)
