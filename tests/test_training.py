"""Sparse training on a real small dataset (scikit-learn's digits) through ``sparsify``.

Linen and NNX, MLP and CNN, dynamic (masks from the current weights, SR-STE) and static
(masks held in the "nm_masks" collection / NMMask variables, refreshed every few steps)
modes. Every step checks the masks the layers used are valid N:M; at the end the sparse
model's training loss must be within TOLERANCE of the dense model trained the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import nmjax
from nmjax.masks import Transposable, is_nm, is_transposable
from nmjax.nn import USED_MASKS, model_masks, refresh, sparsify
from nmjax.tree import MaskRule

datasets = pytest.importorskip("sklearn.datasets")  # in the "dev" extra; shipped, no download

STEPS = 200
BATCH = 128
REFRESH = 50  # static mode: masks recomputed from the weights every REFRESH steps
# The sparse model's final full-training-set loss must be at most the dense one's plus this
# (absolute, in nats; dense models reach 0.01-0.04 here, sparse ones measured 0.01-0.02
# above) and its test accuracy within 4 points.
TOLERANCE = 0.05
ACC_TOLERANCE = 0.04
# Greedy transposable masks (at most 2 per tile row and column): the exact 2:4 solver costs
# ~10 s of compile per kernel shape on this CPU; examples/demo.py trains with it.
RULE_T = MaskRule(Transposable(2, 4, method="greedy"), exclude="head", skip_indivisible=True)
RULE_NM = MaskRule("2:4", exclude="head", skip_indivisible=True)


def _digits():
    d = datasets.load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


(X_TRAIN, Y_TRAIN), (X_TEST, Y_TEST) = _digits()
BATCHES = np.random.default_rng(1).integers(0, len(Y_TRAIN), (STEPS, BATCH))


def _images(x):
    return x.reshape(-1, 8, 8, 1)


def _key(seed):
    return jax.random.key(seed, impl="rbg")  # threefry init compiles slowly on this CPU


def _loss(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _accuracy(logits, y):
    return jnp.mean(logits.argmax(-1) == y)


def _evaluate(run, x_train, x_test):
    """(train loss over 10 batches of the training set, accuracy over 3 test batches), from
    ``run(x, y) -> (loss, accuracy, ...)`` evaluated at the final parameters. Batches of the
    training step's shape reuse its compiled program: on this CPU each dynamic transposable
    layer costs ~10 s to compile."""
    losses = [float(run(x_train[i:i + BATCH], Y_TRAIN[i:i + BATCH])[0])
              for i in range(0, 10 * BATCH, BATCH)]
    accs = [float(run(x_test[i:i + BATCH], Y_TEST[i:i + BATCH])[1])
            for i in range(0, 3 * BATCH, BATCH)]
    return float(np.mean(losses)), float(np.mean(accs))


def _valid(masks, rule) -> jax.Array:
    """All used masks 2:4 along the contraction axis (exactly 2 for "nm"; at most 2 for the
    greedy transposable rule, along the output axis too, and at least half of the kernel);
    forward and backward are the same mask here."""
    ok = jnp.array(True)
    for m in masks:
        ok &= jnp.all(m.bwd == m.fwd)
        if isinstance(rule.patterns[0], Transposable):
            ok &= is_transposable(m.fwd, 2, 4, axes=(-2, -1)) & (m.fwd.mean() > 0.45)
        else:
            ok &= is_nm(m.fwd, 2, 4, axis=m.fwd.ndim - 2, exact=True)
    return ok


# ------------------------------------------------------------------------------- Linen


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(128)(x))
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10, name="head")(x)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3))(x))  # I = 1: left dense (skip_indivisible)
        x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
        x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10, name="head")(x)


def _train_linen(model, prep, mode, rule):
    """Returns (final train loss, test accuracy, number of masked layers, all steps valid)."""
    x_train, x_test = prep(X_TRAIN), prep(X_TEST)
    params = model.init(_key(0), x_train[:1])["params"]
    rule = nmjax.resolve(model, rule, x_train[:1])                 # the plan: axes from ops
    decay = 2e-4 if mode == "dynamic" else 0.0    # static: the optimizer would own it
    net = model if mode == "dense" else sparsify(model, rule, mode=mode, decay=decay)
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)
    masks = refresh(params, rule) if mode == "static" else None

    def variables(params, masks):
        return {"params": params} if masks is None else {"params": params, "nm_masks": masks}

    @jax.jit
    def step(params, opt_state, masks, x, y):
        def loss_fn(p):
            logits, used = net.apply(variables(p, masks), x, mutable=[USED_MASKS])
            return _loss(logits, y), (logits, used.get(USED_MASKS, {}))

        (loss, (logits, used)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        leaves = jax.tree.leaves(used, is_leaf=lambda m: hasattr(m, "fwd"))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, (loss, _accuracy(logits, y), _valid(leaves, rule), len(leaves))

    valid = True
    for t in range(STEPS):
        if mode == "static" and t and t % REFRESH == 0:
            masks = refresh(params, rule)
        idx = BATCHES[t]
        params, opt_state, (_, _, ok, n_masked) = step(params, opt_state, masks, x_train[idx],
                                                       Y_TRAIN[idx])
        valid &= bool(ok)
    # Evaluate with the step's own compiled program (its pre-update loss), discarding updates.
    train_loss, test_acc = _evaluate(lambda x, y: step(params, opt_state, masks, x, y)[2],
                                     x_train, x_test)
    return train_loss, test_acc, n_masked, valid


# --------------------------------------------------------------------------------- NNX


class NMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(64, 128, rngs=rngs)
        self.l2 = nnx.Linear(128, 64, rngs=rngs)
        self.head = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.l2(nnx.relu(self.l1(x)))))


class NCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)  # I = 1: left dense
        self.conv2 = nnx.Conv(16, 32, (3, 3), strides=2, rngs=rngs)
        self.fc = nnx.Linear(512, 64, rngs=rngs)
        self.head = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
        return self.head(nnx.relu(self.fc(x.reshape(x.shape[0], -1))))


def _train_nnx(cls, prep, mode, rule):
    x_train, x_test = prep(X_TRAIN), prep(X_TEST)
    model = cls(nnx.Rngs(_key(0)))
    if mode != "dense":
        rule = nmjax.resolve(model, rule, x_train[:1])
        model = sparsify(model, rule, mode=mode, decay=2e-4 if mode == "dynamic" else 0.0)
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        used = list(model_masks(model).values()) if mode != "dense" else []  # this step's
        (loss, logits), grads = nnx.value_and_grad(
            lambda m: (lambda z: (_loss(z, y), z))(m(x)), has_aux=True)(model)
        opt.update(model, grads)
        return loss, _accuracy(logits, y), _valid(used, rule), len(used)

    def probe(x, y):  # the step's pre-update loss on copies: no second compiled program
        return step(nnx.clone(model), nnx.clone(opt), x, y)

    valid = True
    for t in range(STEPS):
        if mode == "static" and t and t % REFRESH == 0:
            nmjax.nn.refresh(model)
        idx = BATCHES[t]
        _, _, ok, n_masked = step(model, opt, x_train[idx], Y_TRAIN[idx])
        valid &= bool(ok)
    train_loss, test_acc = _evaluate(probe, x_train, x_test)
    return train_loss, test_acc, n_masked, valid


CASES = {
    "linen-mlp": (_train_linen, MLP(), lambda x: x),
    "linen-cnn": (_train_linen, CNN(), _images),
    "nnx-mlp": (_train_nnx, NMLP, lambda x: x),
    "nnx-cnn": (_train_nnx, NCNN, _images),
}
# Dynamic CNNs train plain 2:4 (so both patterns are trained), the others transposable 2:4.
RULES = {("linen-cnn", "dynamic"): RULE_NM, ("nnx-cnn", "dynamic"): RULE_NM}
_DENSE: dict[str, tuple[float, float]] = {}


@pytest.mark.parametrize("mode", ["dynamic", "static"])
@pytest.mark.parametrize("case", list(CASES))
def test_sparse_training_reaches_dense_loss_with_valid_masks(case, mode):
    train, model, prep = CASES[case]
    rule = RULES.get((case, mode), RULE_T)
    if case not in _DENSE:
        dense_loss, dense_acc, n_dense, _ = train(model, prep, "dense", rule)
        assert n_dense == 0
        _DENSE[case] = dense_loss, dense_acc
    dense_loss, dense_acc = _DENSE[case]
    loss, acc, n_masked, valid = train(model, prep, mode, rule)
    assert n_masked == 2  # the rule's selection: the first conv (I = 1) and the head stay dense
    assert valid, "a layer used an invalid mask at some step"
    assert np.isfinite(loss)
    assert loss <= dense_loss + TOLERANCE, (loss, dense_loss)
    assert acc >= dense_acc - ACC_TOLERANCE, (acc, dense_acc)
