"""nmjax.optim: refresh and search schedules, SR-STE, stages, optax combinators, Flax Linen
TrainState and NNX Optimizer, orbax round trip, 8-device sharding and two processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import nmjax
from nmjax.masks import NM, BiMask, Masks, Transposable, is_nm, is_transposable
from nmjax.nn import collection, sync
from nmjax.optim import (
    check_stages,
    masks_of,
    nm_schedule,
    param_labels,
    pattern_at,
    selected,
    sparse,
    stage_at,
)
from nmjax.tree import MaskRule

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.standard_normal((8, 8)), jnp.float32)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x))
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(10, name="head")(x)


PARAMS = MLP().init(jax.random.key(0), X)["params"]


def loss_fn(model, params, masks=None):
    variables = {"params": params}
    if masks is not None:
        variables["nm_masks"] = masks
    return jnp.mean(model.apply(variables, X) ** 2)


def random_grads(seed, params):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)


def tree_equal(a, b):
    return all(bool(jnp.array_equal(x, y)) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


# --------------------------------------------------------------------------- schedules


def test_refreshes_and_searches_happen_exactly_at_their_steps():
    spec = BiMask(2, 4)
    rule = MaskRule(spec, exclude="head")
    tx = sparse(optax.sgd(0.1), rule, refresh_every=3, perm_every=5, decay=1e-2)
    params, state = PARAMS, tx.init(PARAMS)
    step = jax.jit(tx.update)
    for t in range(12):
        before = masks_of(state)
        updates, state = step(random_grads(t, params), state, params)
        params = optax.apply_updates(params, updates)
        refreshed = (t + 1) % 3 == 0 or (t + 1) % 5 == 0
        searched = (t + 1) % 5 == 0
        assert int(state.count) == t + 1
        assert int(state.refreshes) == sum((s + 1) % 3 == 0 or (s + 1) % 5 == 0
                                           for s in range(t + 1))
        assert int(state.searches) == sum((s + 1) % 5 == 0 for s in range(t + 1))
        for layer in ("Dense_0", "Dense_1"):
            old, new = before[layer]["kernel"], masks_of(state)[layer]["kernel"]
            assert bool(spec.valid(new))
            if not refreshed:
                assert tree_equal(old, new)
                continue
            # A refresh: the masks of the updated weights, in the (new) permutation.
            want = spec(params[layer]["kernel"], perm=new.perm)
            assert tree_equal(want, new)
            if not searched:
                np.testing.assert_array_equal(new.perm, old.perm)
        assert masks_of(state)["head"]["kernel"] is None


@pytest.mark.parametrize("pattern", ["2:4", "2:4 transposable"])
def test_refresh_every_step_is_the_dynamic_layers_training(pattern):
    """Masks refreshed every step from the updated weights, decay in the optimizer ==
    dynamic layers (masks from the current weights at every call, decay in the layer)."""
    rule = MaskRule(pattern, exclude="head")
    lam = 0.05
    dynamic = nmjax.nn.sparsify(MLP(), rule, decay=lam)
    static = nmjax.nn.sparsify(MLP(), rule, mode="static")
    adam = optax.adam(1e-2)
    tx = sparse(optax.adam(1e-2), rule, refresh_every=1, decay=lam)

    @jax.jit
    def dyn_step(params, opt):
        grads = jax.grad(lambda p: loss_fn(dynamic, p))(params)
        updates, opt = adam.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    @jax.jit
    def wrapped_step(params, opt):
        grads = jax.grad(lambda p: loss_fn(static, p, collection(opt)))(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    p1, o1 = PARAMS, adam.init(PARAMS)
    p2, o2 = PARAMS, tx.init(PARAMS)
    for _ in range(5):
        p1, o1 = dyn_step(p1, o1)
        p2, o2 = wrapped_step(p2, o2)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(p2["Dense_0"]["kernel"] - PARAMS["Dense_0"]["kernel"]).max()) > 1e-3


def test_decay_only_on_pruned_entries_and_as_a_schedule():
    rule = MaskRule("2:4", exclude="head")
    lam = optax.linear_schedule(0.5, 0.0, 4)
    tx = sparse(optax.sgd(1.0), rule, refresh_every=100, decay=lam)
    state = tx.init(PARAMS)
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    update = jax.jit(tx.update)
    for t in range(5):
        updates, new_state = update(zeros, state, PARAMS)
        for layer in ("Dense_0", "Dense_1"):
            w = PARAMS[layer]["kernel"]
            fwd = masks_of(state)[layer]["kernel"].fwd
            np.testing.assert_allclose(updates[layer]["kernel"],
                                       -float(lam(t)) * jnp.where(fwd, 0, w), rtol=1e-6)
            assert not bool(updates[layer]["bias"].any())
        assert not bool(updates["head"]["kernel"].any())  # not selected: no decay
        state = new_state


def test_stages_switch_patterns_at_their_boundaries():
    stages = nm_schedule("2:4", warmup=2, ramp=2, finetune_from=7)
    assert [(s, p.label if p else None) for s, p in stages] == [
        (0, None), (2, "3:4 nm"), (4, "2:4 nm"), (7, None)]
    assert [stage_at(stages, t) for t in range(9)] == [0, 0, 1, 1, 2, 2, 2, 3, 3]
    assert pattern_at(stages, 5) == NM(2, 4) and pattern_at(stages, 8) is None
    rule = MaskRule("2:4", exclude="head")
    tx = sparse(optax.sgd(0.1), rule, refresh_every=100, stages=stages, decay=0.1)
    params, state = PARAMS, tx.init(PARAMS)
    step = jax.jit(tx.update)
    for t in range(9):
        fwd = masks_of(state)["Dense_1"]["kernel"].fwd
        pattern = pattern_at(stages, t)
        if pattern is None:
            assert bool(fwd.all())
        else:
            assert bool(is_nm(fwd, pattern.n, 4, exact=True))
            assert bool(fwd.mean() == pattern.n / 4)
        updates, state = step(random_grads(t, params), state, params)
        if pattern is None:  # dense phases: masks keep everything, so no decay term
            np.testing.assert_allclose(updates["Dense_1"]["kernel"],
                                       -0.1 * random_grads(t, params)["Dense_1"]["kernel"],
                                       rtol=1e-6)
        params = optax.apply_updates(params, updates)
    assert int(state.refreshes) == 3  # only the stage boundaries (steps 2, 4, 7)


def test_stage_and_interval_errors():
    with pytest.raises(ValueError, match="needs n < m - 1"):
        nm_schedule("3:4", ramp=5)
    with pytest.raises(ValueError, match="finetune_from=3 must come after"):
        nm_schedule("2:4", warmup=3, finetune_from=3)
    with pytest.raises(ValueError, match="must begin at 0 and increase strictly"):
        check_stages([(0, None), (5, "2:4"), (5, None)])
    with pytest.raises(TypeError, match=r"\(start_step, pattern or None\) pair"):
        check_stages([(0, "2:4", 3)])
    with pytest.raises(ValueError, match="refresh_every must be >= 1"):
        sparse(optax.sgd(0.1), "2:4", refresh_every=0)
    with pytest.raises(TypeError, match="refresh_every must be an int"):
        sparse(optax.sgd(0.1), "2:4", refresh_every=1.5)
    with pytest.raises(ValueError, match="perm_every applies to Bi-Mask patterns"):
        sparse(optax.sgd(0.1), "2:4", perm_every=10)
    with pytest.raises(ValueError, match="decay must be >= 0"):
        sparse(optax.sgd(0.1), "2:4", decay=-1.0)
    with pytest.raises(TypeError, match="inner must be an optax.GradientTransformation"):
        sparse(lambda g: g, "2:4")


def test_bad_configuration_fails_at_init_or_update():
    with pytest.raises(ValueError, match="selects no parameter of this parameter tree"):
        sparse(optax.sgd(0.1), MaskRule("2:4", include="nothing")).init(PARAMS)
    # Without the model, the user-named head's layout is unknown: refused, never guessed.
    with pytest.raises(ValueError, match=r"layout of 'head/kernel'.*nmjax.resolve"):
        sparse(optax.sgd(0.1), "2:4").init(PARAMS)
    # The 10-wide head cannot take a transposable 2:4 stage.
    tx = sparse(optax.sgd(0.1), nmjax.resolve(MLP(), "2:4", X),
                stages=[(0, "2:4"), (5, "2:4 transposable")])
    with pytest.raises(ValueError, match=r"'head/kernel' of shape \(16, 10\) cannot take the "
                                         r"pattern '2:4 transposable' of the stage from step 5"):
        tx.init(PARAMS)
    tx = sparse(optax.sgd(0.1), MaskRule("2:4", exclude="head"))
    state = tx.init(PARAMS)
    other = {"Dense_0": PARAMS["Dense_0"]}
    with pytest.raises(ValueError, match=r"the state's masks do not match .*the state's "
                                         r"masks paths not in params: \['Dense_1/bias'"):
        tx.update(other, state, other)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(PARAMS, state)


# --------------------------------------------------------------------- ecosystem fit


def test_inside_optax_chain_inject_hyperparams_multi_transform_and_masked():
    rule = MaskRule("2:4", exclude="head")
    grads = random_grads(1, PARAMS)
    # chain: clipping first, the wrapper last (it forms the updated parameters).
    tx = optax.chain(optax.clip_by_global_norm(1.0), sparse(optax.sgd(0.1), rule, decay=0.1))
    state = tx.init(PARAMS)
    updates, state = jax.jit(tx.update)(grads, state, PARAMS)
    assert int(nmjax.optim.find_state(state).count) == 1
    # inject_hyperparams: decay changes without retracing.
    traces = []
    tx = optax.inject_hyperparams(sparse, static_args=("inner", "rule"))(
        inner=optax.sgd(1.0), rule=rule, decay=0.0)
    state = tx.init(PARAMS)

    @jax.jit
    def update(grads, state):
        traces.append(1)
        return tx.update(grads, state, PARAMS)

    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    u0, state = update(zeros, state)
    state.hyperparams["decay"] = jnp.float32(0.5)
    u1, state = update(zeros, state)
    assert len(traces) == 1
    assert not bool(u0["Dense_0"]["kernel"].any()) and bool(u1["Dense_0"]["kernel"].any())
    # multi_transform with the rule's labels; masked with its selection.
    labels = param_labels(PARAMS, rule)
    assert labels["Dense_0"]["kernel"] == "sparse" and labels["head"]["kernel"] == "dense"
    assert labels["Dense_0"]["bias"] == "dense"
    tx = optax.multi_transform({"sparse": sparse(optax.sgd(0.1), rule, decay=0.1),
                                "dense": optax.adam(1e-3)}, labels)
    state = tx.init(PARAMS)
    updates, state = jax.jit(tx.update)(grads, state, PARAMS)
    masks = masks_of(state)
    assert bool(is_nm(masks["Dense_0"]["kernel"].fwd, 2, 4, exact=True))
    tx = optax.masked(sparse(optax.sgd(0.1), rule), selected(PARAMS, rule))
    state = tx.init(PARAMS)
    updates, _ = jax.jit(tx.update)(grads, state, PARAMS)
    np.testing.assert_allclose(updates["Dense_0"]["kernel"], -0.1 * grads["Dense_0"]["kernel"])
    np.testing.assert_array_equal(updates["head"]["kernel"], grads["head"]["kernel"])


def test_linen_train_state():
    from flax.training.train_state import TrainState

    rule = MaskRule(Transposable(2, 4, method="greedy"), exclude="head")
    model = nmjax.nn.sparsify(MLP(), rule, mode="static")
    state = TrainState.create(apply_fn=model.apply, params=PARAMS,
                              tx=sparse(optax.adam(1e-2), rule, refresh_every=2, decay=2e-4))

    @jax.jit
    def step(state):
        masks = collection(state)
        grads = jax.grad(lambda p: jnp.mean(state.apply_fn(
            {"params": p, "nm_masks": masks}, X) ** 2))(state.params)
        return state.apply_gradients(grads=grads)

    for _ in range(3):
        state = step(state)
        mask = masks_of(state)["Dense_0"]["kernel"].fwd
        assert bool(is_transposable(mask, 2, 4))


class NMLP(nnx.Module):
    def __init__(self, rngs):
        self.body = nnx.Linear(8, 16, rngs=rngs)
        self.mid = nnx.Linear(16, 16, rngs=rngs)
        self.head = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.mid(nnx.relu(self.body(x)))))


def test_nnx_optimizer_and_sync():
    dense = NMLP(nnx.Rngs(0))
    rule = nmjax.resolve(dense, MaskRule(BiMask(2, 4), exclude="head"), X)    # the plan
    model = nmjax.nn.sparsify(dense, rule, mode="static")
    tx = sparse(optax.adam(1e-2), rule, refresh_every=2, perm_every=2, decay=2e-4)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.mean(m(X) ** 2))(model)
        optimizer.update(model, grads)
        sync(model, optimizer)

    for _ in range(3):
        step(model, optimizer)
    masks = masks_of(optimizer)
    assert int(nmjax.optim.find_state(optimizer).searches) == 1
    for name in ("body", "mid"):
        stored = model.nm_masks[f"{name}.kernel"]
        got = Masks(stored["fwd"][...], stored["bwd"][...], stored["perm"][...])
        want = masks[name]["kernel"]
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
        assert bool(BiMask(2, 4).valid(got))
    assert bool(rule.valid(masks))
    with pytest.raises(ValueError, match=r"the masks and the model's plan differ"):
        other_dense = NMLP(nnx.Rngs(1))
        other = nmjax.nn.sparsify(other_dense, nmjax.resolve(
            other_dense, MaskRule("2:4", exclude="head"), X), mode="static")
        sync(other, {"x": nmjax.optim.find_state(optimizer)._replace(
            masks=jax.tree.map(lambda m: None, masks, is_leaf=lambda m: isinstance(m, Masks)))})


def test_orbax_round_trip_continues_bit_for_bit(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    rule = MaskRule(BiMask(2, 4), exclude="head")
    tx = sparse(optax.adam(1e-2), rule, refresh_every=2, perm_every=3, decay=1e-3)
    model = nmjax.nn.sparsify(MLP(), rule, mode="static")

    @jax.jit
    def step(params, opt):
        grads = jax.grad(lambda p: loss_fn(model, p, collection(opt)))(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    params, opt = PARAMS, tx.init(PARAMS)
    for _ in range(3):
        params, opt = step(params, opt)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", {"params": params, "opt": opt})
    checkpointer.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt": opt})
    restored = checkpointer.restore(tmp_path / "ckpt", abstract)
    p2, o2 = restored["params"], restored["opt"]
    assert isinstance(o2, nmjax.optim.SparseState)
    for _ in range(4):
        params, opt = step(params, opt)
        p2, o2 = step(p2, o2)
    assert tree_equal(params, p2) and tree_equal(opt, o2)


# ------------------------------------------------------------------ sharding, processes


def _run(args, env_extra=None, timeout=240):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "distributed_worker.py"),
                             *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _single_device_result():
    sys.path.insert(0, str(ROOT / "tests"))
    import distributed_worker

    params, opt = distributed_worker.train()
    masks = masks_of(opt)
    out = {f"{layer}/{k}": np.asarray(v) for layer, leaves in params.items()
           for k, v in leaves.items()}
    out.update({f"mask:{layer}": np.asarray(m["kernel"].fwd) for layer, m in masks.items()})
    return out


def _compare(path, want):
    got = dict(np.load(path))
    assert got.keys() == want.keys()
    for k in want:
        if k.startswith("mask:"):
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        else:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_sharded_8_devices_equals_one_device(tmp_path):
    out = tmp_path / "mesh8.npz"
    proc = _run(["mesh8", str(out)])
    text, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, text
    assert "refused: leaf 'up/kernel'" in text
    assert "refused under jit: leaf 'up/kernel'" in text
    assert "down: kernel and masks sharded P('model'" in text  # masks follow the kernels
    _compare(out, _single_device_result())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    out, port = tmp_path / "procs.npz", str(_free_port())
    procs = [_run(["process", str(i), "2", port, str(out)]) for i in range(2)]
    texts = []
    try:
        for proc in procs:
            texts.append(proc.communicate(timeout=240)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, text in zip(procs, texts, strict=True):
        assert proc.returncode == 0, text[-3000:]
    _compare(out, _single_device_result())


def test_several_rules_and_starting_masks():
    rules = [MaskRule("2:4", include="Dense_0/kernel"), MaskRule("1:4", include="Dense_1/kernel")]
    tx = sparse(optax.sgd(0.1), rules, refresh_every=2)
    state = tx.init(PARAMS)
    masks = masks_of(state)
    assert bool(is_nm(masks["Dense_0"]["kernel"].fwd, 2, 4, exact=True))
    assert bool(is_nm(masks["Dense_1"]["kernel"].fwd, 1, 4, exact=True))
    assert masks["head"]["kernel"] is None
    _, state = jax.jit(tx.update)(random_grads(0, PARAMS), state, PARAMS)
    _, state = jax.jit(tx.update)(random_grads(1, PARAMS), state, PARAMS)
    assert bool(is_nm(masks_of(state)["Dense_1"]["kernel"].fwd, 1, 4, exact=True))
    with pytest.raises(ValueError, match=r"'Dense_0/kernel' is selected by 2 rules"):
        sparse(optax.sgd(0.1), nmjax.resolve(MLP(), ["2:4", MaskRule(
            "1:4", include="Dense_0/kernel")], X))
    with pytest.raises(ValueError, match="stages apply to one pattern"):
        sparse(optax.sgd(0.1), rules, stages=[(0, "2:4")])
    # Starting masks (e.g. a conversion's): used as given, and checked.
    rule = MaskRule("2:4", exclude="head")
    start = nmjax.tree.build_masks(jax.tree.map(lambda p: -p, PARAMS), rule)
    state = sparse(optax.sgd(0.1), rule, init_masks=start).init(PARAMS)
    assert tree_equal(masks_of(state), start)
    wrong = nmjax.tree.build_masks(PARAMS, MaskRule("3:4", exclude="head"))
    with pytest.raises(ValueError, match=r"init_masks for 'Dense_0/kernel' are not valid "
                                         r"'2:4 nm' masks"):
        sparse(optax.sgd(0.1), rule, init_masks=wrong).init(PARAMS)
    partial = {**start, "Dense_1": {"kernel": None, "bias": None}}
    with pytest.raises(ValueError, match=r"missing \['Dense_1/kernel'\]"):
        sparse(optax.sgd(0.1), rule, init_masks=partial).init(PARAMS)
