"""Packed checkpoints (nmjax.export): bit-exact round trips for every pattern, orbax, sizes,
packed inference (Linen, NNX, a Hugging Face Flax GPT-2) and the compressed-tensors writer."""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import nmjax
from nmjax import _compressed_tensors as ct
from nmjax import export
from nmjax import format as nmf
from nmjax.masks import NM, BiMask, Masks, Transposable, is_nm
from nmjax.nn import SparseDense, SparseLinear, Sparsity, pack_model, packed_variables
from nmjax.tree import MaskRule, apply_masks, build_masks, is_masks_leaf

FIXTURE = Path(__file__).parent / "data" / "ct_sparse24_fixture.safetensors"


def bits(x):
    """The raw bytes of an array: bit-exact comparison (tells -0.0 from 0.0)."""
    x = np.asarray(x)
    return x.view(np.uint8) if x.dtype != bool else x


def assert_same_tree(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(bits(x), bits(y))


def assert_same_masks(got, want):
    got = jax.tree_util.tree_leaves(got, is_leaf=is_masks_leaf)
    want = jax.tree_util.tree_leaves(want, is_leaf=is_masks_leaf)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if w is None:
            continue
        np.testing.assert_array_equal(g.fwd, w.fwd)
        np.testing.assert_array_equal(g.bwd, w.bwd)
        assert (g.perm is None) == (w.perm is None)
        if w.perm is not None:
            np.testing.assert_array_equal(g.perm, w.perm)


def small_params():
    keys = jax.random.split(jax.random.key(0), 2)
    return {
        "Dense_0": {"kernel": jax.random.normal(keys[0], (32, 16)).astype(jnp.bfloat16),
                    "bias": jnp.arange(16.0)},
        "Conv_0": {"kernel": jax.random.normal(keys[1], (3, 3, 8, 16))},
    }


AXES = {"Dense_0/kernel": 0, "Conv_0/kernel": 2}
PATTERNS = [
    NM(2, 4), NM(4, 8), NM(1, 4),
    Transposable(2, 4), Transposable(4, 8, method="greedy"),  # greedy: under-filled groups
    BiMask(2, 4),
]


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: f"{p.label}-{p.fwd_nm}")
def test_round_trip_every_pattern(pattern):
    params = small_params()
    if isinstance(pattern, BiMask):  # a searched, non-identity permutation
        masks = {name: {"kernel": pattern(leaf["kernel"], AXES[f"{name}/kernel"],
                                          key=jax.random.key(1))}
                 for name, leaf in params.items()}
        masks["Dense_0"]["bias"] = None
        assert not np.array_equal(masks["Dense_0"]["kernel"].perm, np.arange(16))
    else:
        masks = build_masks(params, MaskRule(pattern))
    packed = export.pack_params(params, masks, axes=AXES)
    assert_same_tree(export.unpack_params(packed), apply_masks(params, masks))
    assert_same_masks(export.unpack_masks(packed), masks)
    n, m = pattern.fwd_nm
    for path, axis in AXES.items():
        weight = packed[path.split("/")[0]]["kernel"].weight
        assert (weight.n, weight.m, weight.axis) == (n, m, axis)
    assert packed["Dense_0"]["bias"] is params["Dense_0"]["bias"]
    if isinstance(pattern, Transposable) and pattern.method == "greedy":
        assert packed["Dense_0"]["kernel"].kept is not None


def test_underfilled_groups_and_negative_zero_are_exact():
    w = jnp.asarray([[-0.0, 1.0], [2.0, -0.0], [3.0, 0.0], [4.0, 5.0]] * 2, jnp.float32)
    fwd = jnp.asarray([[True, True], [True, True], [False, False], [False, False],
                       [True, False], [False, True], [False, True], [False, False]])
    params = {"kernel": w}
    masks = {"kernel": Masks(fwd, fwd)}
    packed = export.pack_params(params, masks, nm=(2, 4))
    assert packed["kernel"].kept is not None  # groups with fewer than 2: flags stored
    out = export.unpack_params(packed)["kernel"]
    np.testing.assert_array_equal(bits(out), bits(jnp.where(fwd, w, 0.0)))
    assert np.signbit(np.asarray(out)[0, 0])  # a kept -0.0 stays -0.0
    np.testing.assert_array_equal(export.unpack_masks(packed)["kernel"].fwd, fwd)


def test_axis_read_from_the_mask():
    # GPT-2 FlaxConv1D kernels are (out, in): their 2:4 groups run along axis 1.
    w = jax.random.normal(jax.random.key(0), (24, 64))
    mask = NM(2, 4)(w, axis=1).fwd
    packed = export.pack_params({"kernel": w}, {"kernel": Masks(mask, mask)})
    assert (packed["kernel"].weight.axis, packed["kernel"].weight.m) == (1, 4)
    np.testing.assert_array_equal(export.unpack_params(packed)["kernel"],
                                  jnp.where(mask, w, 0))


def test_refuses_what_it_cannot_tell():
    w = jax.random.normal(jax.random.key(0), (16, 16))
    t = Transposable(2, 4)(w)
    with pytest.raises(ValueError, match=r"cannot be told.*axes="):
        export.pack_params({"k": w}, {"k": t})  # N:M along both axes
    assert export.pack_params({"k": w}, {"k": t}, axes=0)["k"].weight.axis == 0
    dense = jnp.ones((16, 16), bool)
    with pytest.raises(ValueError, match="is not N:M"):
        export.pack_params({"k": w}, {"k": Masks(dense, dense)})
    fwd = NM(2, 4)(w).fwd
    with pytest.raises(ValueError, match="is not 2:4 along axis 1"):
        export.pack_params({"k": w}, {"k": Masks(fwd, fwd)}, axes={"k": 1}, nm=(2, 4))
    with pytest.raises(ValueError, match="subset"):
        export.pack_params({"k": w}, {"k": Masks(fwd, ~fwd)}, axes=0)
    with pytest.raises(ValueError, match="do not match"):
        export.pack_params({"k": w, "b": w}, {"k": Masks(fwd, fwd)})
    with pytest.raises(TypeError, match="axes must be"):
        export.pack_params({"k": w}, {"k": Masks(fwd, fwd)}, axes="0")


def test_axes_from_a_plan():
    model = MLP(width=64)
    x = jnp.ones((2, 32), jnp.bfloat16)
    params = model.init(jax.random.key(0), x)["params"]
    plan = nmjax.resolve(model, "2:4 transposable", x, params=params)
    masks = build_masks(params, plan)
    with pytest.raises(ValueError, match="axes="):  # N:M along both axes
        export.pack_params(params, masks)
    packed = export.pack_params(params, masks, axes=plan)
    for leaf in plan.leaves:
        *layer, name = leaf.path.split("/")
        weight = packed[layer[0]][name].weight
        assert (weight.axis, weight.n, weight.m) == (leaf.layout.contract[-1], 2, 4)
    assert_same_tree(export.unpack_params(packed), apply_masks(params, masks))


def test_orbax_save_restore(tmp_path):
    params = small_params()
    bimask = BiMask(2, 4)(params["Dense_0"]["kernel"], key=jax.random.key(1))
    greedy = Transposable(4, 8, method="greedy")
    masks = {"Dense_0": {"kernel": bimask, "bias": None},
             "Conv_0": {"kernel": greedy(params["Conv_0"]["kernel"], 2)}}
    packed = export.pack_params(params, masks, axes=AXES)
    assert packed["Conv_0"]["kernel"].kept is not None
    export.save(tmp_path / "ckpt", packed)
    restored = export.restore(tmp_path / "ckpt")
    assert isinstance(restored["Dense_0"]["kernel"], export.PackedLeaf)
    assert_same_tree(restored, packed)
    assert_same_tree(export.unpack_params(restored), apply_masks(params, masks))
    assert_same_masks(export.unpack_masks(restored), masks)
    # orbax reads each array with a fixed cost: the packed leaves' index metadata, flags and
    # permutations share one flat array per dtype, so the checkpoint holds as many arrays as
    # the dense tree's (one values array per packed leaf) plus one per index dtype.
    layout = json.loads((tmp_path / "ckpt" / "layout" / "metadata").read_text())
    assert len(layout["arrays"]) == len(jax.tree.leaves(params))
    leaves = [x for x in jax.tree.leaves(packed, is_leaf=export.is_packed)
              if export.is_packed(x)]
    small = [x.weight.meta for x in leaves] + [x.kept for x in leaves] + \
        [x.bwd for x in leaves] + [x.perm for x in leaves]
    assert layout["index"] == {
        "uint32": sum(x.size for x in small if x is not None and x.dtype == jnp.uint32),
        "int32": 16}  # Bi-Mask's permutation of Dense_0's 16 outputs
    with pytest.raises(ValueError, match="exists"):
        export.save(tmp_path / "ckpt", packed)
    export.save(tmp_path / "dense", params)  # no packed leaf: no index
    assert_same_tree(export.restore(tmp_path / "dense"), params)


def directory_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


class MLP(nn.Module):
    width: int = 256

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.width, param_dtype=jnp.bfloat16)(x))
        return nn.Dense(x.shape[-1] // 2, param_dtype=jnp.bfloat16)(x)


# (pattern, bound on packed / dense bytes): values n/m, indices n/m * index_bits(m) bits
# per weight, and 1/32 for kept flags where a group can be under-filled.
SIZE_TARGETS = [
    (NM(2, 4), 0.57),                 # 0.5 + 1 bit / 16 = 0.5625
    (NM(4, 8), 0.63),                 # 0.5 + 2 bits / 16 = 0.625
    (Transposable(2, 4), 0.57),
    (Transposable(4, 8, method="greedy"), 0.66),  # + kept flags
]


@pytest.fixture(scope="module")
def mlp_params():
    return MLP().init(jax.random.key(0), jnp.ones((1, 128)))["params"]


@pytest.mark.parametrize("pattern, target", SIZE_TARGETS, ids=lambda x: getattr(x, "label", ""))
def test_size_targets(pattern, target, mlp_params):
    masks = build_masks(mlp_params, MaskRule(pattern))
    packed = export.pack_params(mlp_params, masks, axes=0)
    assert export.nbytes(packed) / export.nbytes(mlp_params) <= target


def test_size_on_disk(tmp_path):
    """The orbax checkpoint of a packed 2:4 bf16 model against the dense checkpoint of the
    same model (orbax compresses both)."""
    params = MLP(width=512).init(jax.random.key(0), jnp.ones((1, 256)))["params"]
    packed = export.pack_params(params, build_masks(params, MaskRule("2:4")))
    export.save(tmp_path / "packed", packed)
    export.save(tmp_path / "dense", params)
    assert directory_bytes(tmp_path / "packed") / directory_bytes(tmp_path / "dense") <= 0.57


class SparseMLP(nn.Module):
    """MLP with its first layer a SparseDense (same parameter names and shapes)."""

    mode: str

    @nn.compact
    def __call__(self, x):
        sparsity = Sparsity("2:4", mode=self.mode)
        x = nn.relu(SparseDense(256, param_dtype=jnp.bfloat16, sparsity=sparsity,
                                name="Dense_0")(x))
        return nn.Dense(x.shape[-1] // 2, param_dtype=jnp.bfloat16, name="Dense_1")(x)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_linen_packed_inference(mode, mlp_params):
    x = jax.random.normal(jax.random.key(2), (4, 128))
    masks = build_masks(mlp_params, MaskRule("2:4", exclude="Dense_1"))
    packed = export.pack_params(mlp_params, masks)
    dense = jax.jit(MLP().apply)({"params": apply_masks(mlp_params, masks)}, x)
    for model in (SparseMLP(mode), MLP()):  # static SparseDense reads the boxed masks
        logits = jax.jit(model.apply)(packed_variables(packed), x)
        np.testing.assert_array_equal(logits, dense)
    # The compiled forward's arguments are the packed parameters.
    packed_mem = jax.jit(MLP().apply).lower(packed_variables(packed), x).compile() \
        .memory_analysis()
    dense_mem = jax.jit(MLP().apply).lower({"params": mlp_params}, x).compile() \
        .memory_analysis()
    saved = export.nbytes(mlp_params) - export.nbytes(packed)
    assert saved > 0
    assert dense_mem.argument_size_in_bytes - packed_mem.argument_size_in_bytes == saved


class NNXMLP(nnx.Module):
    def __init__(self, sparsity, rngs):
        self.body = SparseLinear(64, 128, sparsity=sparsity, rngs=rngs)
        self.head = nnx.Linear(128, 16, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.body(x)))


@pytest.mark.parametrize("pattern", ["2:4", "2:4 bimask"])
def test_nnx_packed_inference(pattern):
    sparse = NNXMLP(Sparsity(pattern, mode="static"), nnx.Rngs(0))
    packed = pack_model(sparse)
    assert type(packed.body).__name__ == "PackedLinear"
    dense = nnx.clone(sparse)
    dense.body.kernel.set_value(jnp.where(sparse.body.masks().fwd,
                                          sparse.body.kernel.get_value(), 0))
    dense.body.sparsity = Sparsity(pattern, mode="dynamic")  # masks of masked weights
    reference = nnx.Linear(64, 128, rngs=nnx.Rngs(0))
    reference.kernel.set_value(dense.body.kernel.get_value())
    reference.bias.set_value(dense.body.bias.get_value())
    x = jax.random.normal(jax.random.key(3), (4, 64))
    forward = nnx.jit(lambda mdl, x: mdl(x))
    want = forward(sparse.head, nnx.relu(forward(reference, x)))
    np.testing.assert_array_equal(forward(packed, x), want)
    params_bytes = export.nbytes(nnx.state(packed, nnx.Param))
    assert params_bytes < export.nbytes(nnx.state(sparse, nnx.Param))
    with pytest.raises(ValueError, match="no SparseLinear"):
        pack_model(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))


def emulated_pallas(calls=None):
    """The Pallas backend with its kernel's emulated branch in Pallas interpret mode (no GPU
    runs the tests); ``calls`` counts its ``forward_packed`` calls."""
    import importlib

    from jax.experimental.pallas import mosaic_gpu as plgpu

    from nmjax import backends
    from nmjax.kernels import SparseMatmulConfig

    pallas = importlib.import_module("nmjax.kernels._backend")._Pallas(
        SparseMatmulConfig(tile_m=64, tile_n=64, max_concurrent_steps=2), branch="emulate",
        interpret=plgpu.InterpretGPUParams())

    def forward_packed(x2d, packed, **kw):
        if calls is not None:
            calls.append(packed.shape)
        return pallas.forward_packed(x2d, packed, **kw)

    return backends.Backend("pallas-emulated", pallas.forward, pallas.input_grad,
                            lambda problem: None, forward_packed=forward_packed)


def test_packed_layers_feed_a_kernel_the_packed_operand(monkeypatch):
    """With a kernel backend that takes the packed operand (the Pallas sparse-wgmma GEMM;
    here its emulated branch in Pallas interpret mode, as no GPU runs the tests), NNX's
    PackedLinear and Linen's SparseDense (packed_variables) hand it the packed values and
    metadata: no dense kernel is built (the unpacking functions are disabled), and the
    result is the kernel reference's on the dense masked kernel."""
    from nmjax import backends
    from nmjax.kernels import pack_24, sparse_matmul_24_reference
    from nmjax.nn import PackedLinear

    emulated = emulated_pallas()
    keys = jax.random.split(jax.random.key(5), 3)
    w = jax.random.normal(keys[0], (256, 128), jnp.bfloat16)  # (in, out)
    masks = build_masks({"kernel": w}, MaskRule("2:4", axis=0))
    packed = export.pack_params({"kernel": w}, masks, axes=0)["kernel"]
    bias = jax.random.normal(keys[1], (128,), jnp.bfloat16)
    x = jax.random.normal(keys[2], (4, 16, 256), jnp.bfloat16)
    forward = nnx.jit(lambda layer, x: layer(x))
    dense_path = forward(PackedLinear(packed, bias, backend="reference"), x)
    for name in ("unpack_leaf", "leaf_masks"):
        monkeypatch.setattr(export, name, lambda *a: pytest.fail("the kernel was unpacked"))
    got = forward(PackedLinear(packed, bias, backend=emulated), x)
    fwd = masks["kernel"].fwd
    want = sparse_matmul_24_reference(pack_24(w.T, fwd.T), x.reshape(64, 256),
                                      transpose_out=True).reshape(4, 16, 128) + bias
    assert got.shape == (4, 16, 128) and got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(dense_path, np.float32),
                               rtol=2e-2, atol=2e-2)
    # Linen: a SparseDense served from packed_variables takes the same route.
    layer = SparseDense(128, param_dtype=jnp.bfloat16,
                        sparsity=Sparsity("2:4", mode="static", backend=emulated))
    variables = packed_variables({"kernel": packed, "bias": bias})
    linen = jax.jit(layer.apply)(variables, x)
    np.testing.assert_array_equal(np.asarray(linen, np.float32), np.asarray(got, np.float32))
    if backends.device_facts()[0] != "gpu":  # an explicit kernel backend does not fall back
        with pytest.raises(ValueError, match="sm_90"):
            PackedLinear(packed, bias, backend="pallas")(x)


@pytest.fixture(scope="module")
def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2,
                                     n_head=2)
    model = transformers.FlaxGPT2LMHeadModel(config, seed=0)
    ids = jnp.arange(16).reshape(2, 8) % 128
    plan = nmjax.resolve(model.module, MaskRule("2:4", include=r"c_(attn|proj|fc)/kernel$"),
                         params=model.params, input_ids=ids,
                         attention_mask=jnp.ones((2, 8), jnp.int32),
                         position_ids=jnp.broadcast_to(jnp.arange(8), (2, 8)))
    # FlaxConv1D kernels are (out, in): the plan groups them along in (axis 1).
    assert {leaf.layout.contract for leaf in plan.leaves} == {(1,)}
    return model, config, model.params, build_masks(model.params, plan), plan


def test_hf_gpt2_packed_inference(tiny_gpt2):
    model, _, params, masks, plan = tiny_gpt2
    packed = export.pack_params(params, masks, axes=plan)
    tokens = jnp.arange(16).reshape(2, 8) % 128
    logits = jax.jit(lambda p: model(tokens, params=p).logits)
    got = logits(packed_variables(packed)["params"])
    np.testing.assert_array_equal(got, logits(apply_masks(params, masks)))


def load_fixture():
    safetensors = pytest.importorskip("safetensors")
    from safetensors.numpy import load_file

    with safetensors.safe_open(str(FIXTURE), "np") as f:
        meta = f.metadata()
    dense = load_file(str(FIXTURE.with_name(FIXTURE.stem + "_input.safetensors")))
    return load_file(str(FIXTURE)), dense, meta


def test_writer_matches_the_compressed_tensors_fixture():
    """The fixture was written by compressed-tensors 0.14.0.1 itself
    (benchmarks/compressed_tensors_check.py --write-fixture): the library's compressor on
    nn.Linear (out, in) weights, 2:4 along in."""
    library, dense, meta = load_fixture()
    for name, value in ct.decompress(library).items():  # our reader, the library's file
        np.testing.assert_array_equal(bits(value), bits(dense[name]))
    # The same weights as a Flax tree: Dense kernels (in, out), masks along in (axis 0).
    params, masks = {}, {}
    for name, value in dense.items():
        *layer, leaf = name.split(".")
        node, mnode = params, masks
        for part in layer:
            node, mnode = node.setdefault(part, {}), mnode.setdefault(part, {})
        if value.ndim == 2:
            kernel = jnp.asarray(value.T)
            node["kernel"] = kernel
            mnode["kernel"] = Masks(kernel != 0, kernel != 0)
            assert bool(is_nm(kernel != 0, 2, 4, axis=0))
        else:
            node[leaf], mnode[leaf] = jnp.asarray(value), None
    tensors, targets, _ = ct.state_dict(export.pack_params(params, masks, nm=(2, 4)))
    assert sorted(tensors) == sorted(library)
    for name, value in library.items():
        assert tensors[name].dtype == value.dtype and tensors[name].shape == value.shape, name
        np.testing.assert_array_equal(bits(tensors[name]), bits(value))
    library_config = json.loads(meta["config"])
    assert sorted(targets) == sorted(library_config["targets"])


def test_gpt2_export_decompresses_to_pytorch_names_and_layouts(tmp_path, tiny_gpt2):
    meta = load_fixture()[2]
    _, config, params, masks, plan = tiny_gpt2
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    targets = export.save_compressed_tensors(tmp_path / "gpt2", params, masks, config,
                                             architecture="GPT2LMHeadModel", axes=plan)
    assert len(targets) == 8
    from safetensors.numpy import load_file

    state = ct.decompress(load_file(str(tmp_path / "gpt2" / "model.safetensors")))
    # Names and shapes of transformers' PyTorch GPT2LMHeadModel (recorded in the fixture by
    # the real library run); lm_head.weight is tied to wte and not stored.
    torch_shapes = json.loads(meta["gpt2_state_dict"])
    assert set(torch_shapes) - set(state) == {"lm_head.weight"}
    assert {k: list(v.shape) for k, v in state.items()} == \
        {k: v for k, v in torch_shapes.items() if k != "lm_head.weight"}
    masked = apply_masks(params, masks)
    for kp, leaf in jax.tree_util.tree_flatten_with_path(masked)[0]:
        name, axes = ct.torch_name_and_axes(ct._key_parts(kp), leaf.ndim)
        np.testing.assert_array_equal(bits(state[name]), bits(np.transpose(leaf, axes)))
    config_json = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    sparsity = config_json["quantization_config"]["sparsity_config"]
    assert sparsity["format"] == "sparse-24-bitmask" and sorted(sparsity["targets"]) == \
        sorted(targets)
    assert set(sparsity) == set(json.loads(meta["config"]))
    assert config_json["architectures"] == ["GPT2LMHeadModel"]
    with pytest.raises(ValueError, match="2:4"):
        four_eight = build_masks(params, MaskRule("4:8", include=r"c_fc/kernel$", axis=1))
        export.save_compressed_tensors(tmp_path / "x", params, four_eight, config)


@pytest.fixture(scope="module")
def tiny_llama():
    """A random-init Flax Llama (grouped-query attention), its ``*_proj`` kernels 2:4 along
    ``in`` as the plan finds them (``nn.Dense`` kernels are ``(in, out)``)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.FlaxLlamaForCausalLM(config, seed=0)
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), model.params)
    ids = jnp.arange(16).reshape(2, 8) % 128
    plan = nmjax.resolve(model.module, MaskRule("2:4", include=r"_proj/kernel$"),
                         params=params, input_ids=ids,
                         attention_mask=jnp.ones((2, 8), jnp.int32),
                         position_ids=jnp.broadcast_to(jnp.arange(8), (2, 8)))
    assert {leaf.layout.contract for leaf in plan.leaves} == {(0,)}
    return config, params, build_masks(params, plan), plan


def test_llama_export_has_pytorch_names_row_wise_24_and_config(tmp_path, tiny_llama):
    from safetensors.numpy import load_file

    config, params, masks, plan = tiny_llama
    targets = export.save_compressed_tensors(tmp_path / "llama", params, masks, config,
                                             axes=plan, architecture="LlamaForCausalLM")
    modules = {f"model.layers.{i}.{block}.{proj}_proj" for i in range(2)
               for block, projs in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down")))
               for proj in projs}
    assert sorted(targets) == sorted(modules)
    raw = load_file(str(tmp_path / "llama" / "model.safetensors"))
    state = ct.decompress(raw)
    # transformers' PyTorch LlamaForCausalLM names and shapes, recorded in the fixture by
    # the real library run (benchmarks/compressed_tensors_check.py); the head is untied.
    torch_shapes = json.loads(load_fixture()[2]["llama_state_dict"])
    assert {k: list(v.shape) for k, v in state.items()} == torch_shapes
    masked = apply_masks(params, masks)
    for kp, leaf in jax.tree_util.tree_flatten_with_path(masked)[0]:
        name, _ = ct.torch_name_and_axes(ct._key_parts(kp), leaf.ndim)
        want = np.asarray(leaf).T if ct._key_parts(kp)[-1] == "kernel" else np.asarray(leaf)
        want = np.ascontiguousarray(want)
        np.testing.assert_array_equal(bits(state[name]), bits(want))  # weights [out, in]
    for module in modules:  # 2:4 along each row (in): what row-wise kernels (vLLM) read
        *path, proj = module.split(".")
        kernel_t = np.ascontiguousarray(
            np.asarray(masked["model"]["layers"][path[2]][path[3]][proj]["kernel"]).T)
        rows, cols = kernel_t.shape
        kept = np.unpackbits(raw[f"{module}.bitmask"], axis=-1, count=cols,
                             bitorder="little").astype(bool)
        assert (kept.reshape(rows, cols // 4, 4).sum(-1) == 2).all()
        assert not (kernel_t[~kept] != 0).any()
        np.testing.assert_array_equal(bits(raw[f"{module}.compressed"]),
                                      bits(kernel_t[kept].reshape(rows, cols // 2)))
    config_json = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert config_json["architectures"] == ["LlamaForCausalLM"]
    assert (config_json["model_type"], config_json["num_key_value_heads"],
            config_json["tie_word_embeddings"]) == ("llama", 2, False)
    sparsity = config_json["quantization_config"]["sparsity_config"]
    assert (sparsity["format"], sparsity["sparsity_structure"]) == ("sparse-24-bitmask", "2:4")
    assert sorted(sparsity["targets"]) == sorted(modules)


def test_flags_round_trip():
    flags = jax.random.bernoulli(jax.random.key(0), 0.3, (5, 70))
    words = nmf.pack_flags(flags, axis=1)
    assert words.shape == (5, 3) and words.dtype == jnp.uint32
    np.testing.assert_array_equal(nmf.unpack_flags(words, 70, axis=1), flags)


@pytest.mark.parametrize("pattern", ["2:4 transposable", "2:4 bimask"])
def test_op_level_sparse_model_serves_from_packed_params(pattern):
    """A model sparsified with a plan (nmjax.nn.sparsify) takes the packed tree directly:
    its kernels unpack inside the jitted forward and their masks become the static masks."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=4)
    gpt2 = transformers.FlaxGPT2LMHeadModel(cfg, seed=0)
    ids = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
    inputs = dict(input_ids=ids, attention_mask=jnp.ones_like(ids),
                  position_ids=jnp.broadcast_to(jnp.arange(8), (2, 8)))
    plan = nmjax.resolve(gpt2.module, pattern, params=gpt2.params, **inputs)
    masks = build_masks(gpt2.params, plan)
    packed = export.pack_params(gpt2.params, masks, axes=plan)
    sparse = nmjax.nn.sparsify(gpt2.module, plan, mode="static")
    got = jax.jit(lambda p: sparse.apply({"params": p}, **inputs).logits)(packed)
    want = gpt2.module.apply({"params": apply_masks(gpt2.params, masks)}, **inputs).logits
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert export.nbytes(packed) < 0.8 * export.nbytes(gpt2.params)



def test_op_level_sparse_model_feeds_a_kernel_the_packed_operand():
    """A GPT-2 sparsified with a plan, served from packed parameters with a kernel backend
    that takes the packed operand (emulated, interpret mode): the planned FlaxConv1D
    kernel's forward (``(out, in)``, grouped along ``in``) reaches the kernel packed, and
    the logits are those of the reference backend on the same packed tree."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=128, n_layer=1,
                                  n_head=4)
    gpt2 = transformers.FlaxGPT2LMHeadModel(cfg, seed=0, dtype=jnp.bfloat16)
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), gpt2.params)
    ids = jax.random.randint(jax.random.key(0), (2, 32), 0, 64)  # 64 rows: one kernel tile
    inputs = dict(input_ids=ids, attention_mask=jnp.ones_like(ids),
                  position_ids=jnp.broadcast_to(jnp.arange(32), (2, 32)))
    plan = nmjax.resolve(gpt2.module, MaskRule("2:4", include=r"mlp/c_fc/kernel$"),
                         params=params, **inputs)
    packed = export.pack_params(params, build_masks(params, plan), axes=plan)
    calls = []
    logits = {}
    for name, backend in (("kernel", emulated_pallas(calls)), ("reference", "reference")):
        sparse = nmjax.nn.sparsify(gpt2.module, plan, mode="static", backend=backend)
        logits[name] = np.asarray(jax.jit(
            lambda p, s=sparse: s.apply({"params": p}, **inputs).logits)(packed), np.float32)
    assert calls == [(128, 512)]  # c_fc's (in, out) view, once
    np.testing.assert_allclose(logits["kernel"], logits["reference"], rtol=1e-2, atol=1e-2)
    dense = np.asarray(gpt2.module.apply({"params": params}, **inputs).logits, np.float32)
    assert np.abs(dense - logits["reference"]).max() > 0.1  # the mask shows in the logits
