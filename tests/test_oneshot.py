"""nmjax.convert.sparsegpt and .wanda: SparseGPT's per-layer reconstruction against a numpy
implementation of the paper's algorithm, Wanda's scores against numpy, every pattern's masks
valid along the contraction axis (Dense and conv), the model never modified, deterministic
results, Linen and NNX alike, clear errors."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from nmjax import _convert_solve, _oneshot
from nmjax.convert import sparsegpt, wanda
from nmjax.masks import NM, Custom, Masks, Transposable, as_pattern, is_nm
from nmjax.nn import collection
from nmjax.tree import MaskRule

RNG = np.random.default_rng(0)
# Correlated features of unequal scale (what makes OBS and Wanda differ from magnitude).
_BASIS = RNG.standard_normal((16, 16)) * np.linspace(0.3, 2.0, 16)
X = jnp.asarray(RNG.standard_normal((96, 16)) @ _BASIS, jnp.float32)
X_HELD = jnp.asarray(RNG.standard_normal((96, 16)) @ _BASIS, jnp.float32)
IMAGES = jnp.asarray(RNG.standard_normal((12, 6, 6, 8)), jnp.float32)
METHODS = {"sparsegpt": sparsegpt, "wanda": wanda}
PATTERNS = ("2:4", "4:8", "2:4 transposable", "4:8 transposable", "bimask 2:4")


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


def converted(conv):
    """(path, kernel, Masks) of each converted layer."""
    flat = {jax.tree_util.keystr(p): x
            for p, x in jax.tree_util.tree_flatten_with_path(conv.params)[0]}
    masks = jax.tree_util.tree_flatten_with_path(
        conv.masks, is_leaf=lambda x: x is None or isinstance(x, Masks))[0]
    return [(jax.tree_util.keystr(p), flat[jax.tree_util.keystr(p)], m) for p, m in masks
            if isinstance(m, Masks)]


# ----------------------------------------------------------- the paper's algorithm, numpy

# The 90 4x4 0/1 tiles with two ones in every row and column (exact 2:4 transposable).
_TILES = np.array([t for t in itertools.product((0, 1), repeat=16)
                   if np.all(np.reshape(t, (4, 4)).sum(0) == 2)
                   and np.all(np.reshape(t, (4, 4)).sum(1) == 2)], bool).reshape(-1, 4, 4)


def _keep(scores, n, m, transposable):
    """Mask of an (m, out) slab of scores: the n best per column, or per m x m tile the valid
    2:4 tile of the largest total score."""
    if not transposable:
        order = np.argsort(-scores, axis=0, kind="stable")
        keep = np.zeros(scores.shape, bool)
        np.put_along_axis(keep, order[:n], True, axis=0)
        return keep
    assert (n, m) == (2, 4)
    keep = np.zeros(scores.shape, bool)
    for j in range(0, scores.shape[1], 4):
        tile = scores[:, j:j + 4]
        keep[:, j:j + 4] = _TILES[np.argmax((_TILES * tile).sum((1, 2)))]
    return keep


def sparsegpt_numpy(x, w, n, m, damping, transposable=False):
    """SparseGPT as the paper states it, in float64: the input rows in order; at the first
    row of each group of m, the group's mask from the OBS saliency w_j² / [H_{F_j}⁻¹]_jj
    (F_j: the rows from j on); each row pruned and the OBS update
    δ_F = −(w_c − q_c) / [H_F⁻¹]_cc · H_F⁻¹[:, c] on the rows not yet processed, with
    H_F⁻¹ the inverse of H restricted to them. No Cholesky factor, no lazy blocks."""
    h = x.T.astype(np.float64) @ x.astype(np.float64)
    w = np.array(w, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h += damping * np.mean(np.diag(h)) * np.eye(len(h))
    d = len(h)
    mask = np.zeros(w.shape, bool)
    for c in range(d):
        if c % m == 0:
            diag = np.array([np.linalg.inv(h[j:, j:])[0, 0] for j in range(c, c + m)])
            mask[c:c + m] = _keep(w[c:c + m] ** 2 / diag[:, None], n, m, transposable)
        hinv = np.linalg.inv(h[c:, c:])
        q = np.where(mask[c], w[c], 0.0)
        w[c:] -= np.outer(hinv[:, 0], (w[c] - q) / hinv[0, 0])
        w[c] = q
    return w, mask


@pytest.mark.parametrize(("pattern", "d", "block"), [
    ("2:4", 40, 16),              # d padded to 48: three blocks, the last one short
    ("4:8", 48, 48),              # one block
    ("2:4 transposable", 32, 8),  # four blocks
])
def test_sparsegpt_layer_matches_the_papers_algorithm(pattern, d, block):
    spec = as_pattern(pattern)
    out = 16
    basis = RNG.standard_normal((d, d)) * np.linspace(0.5, 2.0, d)
    x = RNG.standard_normal((256, d)) @ basis
    x[:, 5] = 0.0                                      # an input that is never used
    w = RNG.standard_normal((d, out))
    geom = _convert_solve.Geometry("dense", (d, out))
    got, mask = _oneshot.sparsegpt(geom, (jnp.asarray(x, jnp.float32),),
                                   jnp.asarray(w, jnp.float32), jnp.float32(0.01),
                                   pattern=spec, block=block, progress=False)
    want, want_mask = sparsegpt_numpy(x, w, *spec.fwd_nm, 0.01,
                                      transposable=isinstance(spec, Transposable))
    np.testing.assert_array_equal(np.asarray(mask), want_mask)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5 * np.abs(w).max(), rtol=0)
    assert not np.any(np.asarray(got)[~want_mask])
    # The OBS update lowers the layer's output error below plain masking with the same mask.
    err = lambda v: np.linalg.norm(x @ (w - v))  # noqa: E731
    assert err(np.asarray(got, np.float64)) < err(np.where(want_mask, w, 0.0))


def test_wanda_scores_weights_by_their_inputs_norm():
    conv = wanda((MLP(), PARAMS), X, MaskRule("2:4", include="Dense_0/kernel"), progress=False)
    w = np.asarray(PARAMS["Dense_0"]["kernel"], np.float64)
    scores = np.abs(w) * np.linalg.norm(np.asarray(X, np.float64), axis=0)[:, None]
    want = np.concatenate([_keep(scores[i:i + 4], 2, 4, False) for i in range(0, 16, 4)])
    np.testing.assert_array_equal(conv.masks["Dense_0"]["kernel"].fwd, want)
    np.testing.assert_array_equal(conv.params["Dense_0"]["kernel"], np.where(want, w, 0.0))
    # The activations differ in scale, so this is not the magnitude mask.
    assert not np.array_equal(want, np.asarray(NM(2, 4)(w).fwd))


# ------------------------------------------------------------------ masks along the axis


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_masks_are_valid_along_the_contraction_axis(method, pattern):
    rule = MaskRule(pattern, exclude="head")
    conv = METHODS[method]((MLP(), PARAMS), X, rule, held_out=X_HELD, progress=False)
    spec = rule.pattern
    n, m = spec.fwd_nm
    assert [r.path for r in conv.layers] == ["Dense_0/kernel", "Dense_1/kernel"]
    for path, kernel, masks in converted(conv):
        assert bool(spec.valid(masks, axis=0)), path
        assert bool(is_nm(masks.fwd, n, m, axis=0)) and int(masks.fwd.sum()) * m == \
            n * kernel.size, path                       # exactly n of m along `in`
        assert not np.any(np.asarray(kernel)[~np.asarray(masks.fwd)]), path
        if spec.kind == "transposable":
            assert bool(is_nm(masks.fwd, n, m, axis=1)), path
    for r in conv.layers:
        assert r.solver == method and r.kept == n / m
        assert np.isfinite(r.error_adaprune) and r.error_adaprune != r.fit_error_adaprune
    # The baseline is the dense model under the pattern's magnitude masks.
    mag = conv.magnitude_params["Dense_0"]["kernel"]
    np.testing.assert_array_equal(mag, rule.pattern(PARAMS["Dense_0"]["kernel"], 0).fwd
                                  * PARAMS["Dense_0"]["kernel"])
    # The static sparse model runs on the conversion.
    y = conv.model.apply({"params": conv.params, "nm_masks": collection(conv)}, X)
    assert y.shape == (96, 10)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", ["4:8", "2:4 transposable", "bimask 2:4"])
def test_conv_kernels_are_grouped_along_their_input_channels(method, pattern):
    rule = MaskRule(pattern, exclude="head")
    conv = METHODS[method]((CNN(), CNN_PARAMS), IMAGES, rule, progress=False)
    ((path, kernel, masks),) = converted(conv)
    n, m = rule.pattern.fwd_nm
    assert kernel.shape == (3, 3, 8, 8)
    assert bool(rule.pattern.valid(masks, axis=2))
    assert bool(is_nm(masks.fwd, n, m, axis=2))
    assert not np.any(np.asarray(kernel)[~np.asarray(masks.fwd)])


# --------------------------------------------------------- untouched, deterministic, NNX


@pytest.mark.parametrize("method", METHODS)
def test_the_model_is_never_modified_and_results_are_deterministic(method):
    params = jax.tree.map(lambda a: np.array(a, copy=True), PARAMS)
    before = jax.tree.map(np.copy, params)
    x = np.array(X)
    rule = MaskRule("bimask 2:4", exclude="head")
    first = METHODS[method]((MLP(), params), x, rule, key=3, progress=False)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(x, np.asarray(X))
    again = METHODS[method]((MLP(), params), x, rule, key=3, progress=False)
    for a, b in zip(jax.tree.leaves((first.params, first.masks)),
                    jax.tree.leaves((again.params, again.masks)), strict=True):
        np.testing.assert_array_equal(a, b)

    model = NMLP(nnx.Rngs(0))
    for layer, name in zip([*model.layers, model.head], ["Dense_0", "Dense_1", "head"],
                           strict=True):
        layer.kernel.set_value(PARAMS[name]["kernel"])
        layer.bias.set_value(PARAMS[name]["bias"])
    state = jax.tree.map(np.copy, nnx.state(model))
    nconv = METHODS[method](model, X, rule, key=3, progress=False)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert type(model.layers[0]) is nnx.Linear
    # The NNX model converts as its Linen twin does.
    np.testing.assert_allclose(nconv.params["layers"][1]["kernel"].get_value(),
                               first.params["Dense_1"]["kernel"], atol=1e-5)
    np.testing.assert_array_equal(nconv.masks["layers"][1]["kernel"].perm,
                                  first.masks["Dense_1"]["kernel"].perm)


def test_sequential_takes_each_layers_inputs_from_the_pruned_model():
    rule = MaskRule("2:4", exclude="head")
    seq = sparsegpt((MLP(), PARAMS), X, rule, progress=False)
    par = sparsegpt((MLP(), PARAMS), X, rule, sequential=False, progress=False)
    np.testing.assert_array_equal(seq.params["Dense_0"]["kernel"],
                                  par.params["Dense_0"]["kernel"])
    assert not np.array_equal(seq.params["Dense_1"]["kernel"], par.params["Dense_1"]["kernel"])
    # Dense_1 alone, on the inputs the pruned Dense_0 gives it, is the sequential result.
    h = nn.relu(X @ seq.params["Dense_0"]["kernel"] + PARAMS["Dense_0"]["bias"])
    geom = _convert_solve.Geometry("dense", (32, 16))
    alone, _ = _oneshot.sparsegpt(geom, (h,), PARAMS["Dense_1"]["kernel"], jnp.float32(0.01),
                                  pattern=NM(2, 4), block=32, progress=False)
    np.testing.assert_allclose(seq.params["Dense_1"]["kernel"], alone, atol=1e-5)


# -------------------------------------------------------------------------- bad input


def test_bad_input_fails_with_a_clear_message():
    model = (MLP(), PARAMS)
    rule = MaskRule("2:4", exclude="head")
    with pytest.raises(ValueError, match="block=6 must be a multiple of m=4"):
        sparsegpt(model, X, rule, block=6, progress=False)
    with pytest.raises(ValueError, match="damping must be > 0"):
        sparsegpt(model, X, rule, damping=0.0, progress=False)
    with pytest.raises(ValueError, match="method='lp' solves on the host"):
        sparsegpt(model, X, MaskRule(Transposable(2, 4, method="lp"), exclude="head"),
                  progress=False)
    custom = MaskRule(Custom(lambda w, axis: w != 0), exclude="head")
    for name, fn in (("SparseGPT", sparsegpt), ("Wanda", wanda)):
        with pytest.raises(ValueError, match=f"{name} takes N:M, transposable N:M and Bi-Mask "
                                             "patterns.*Custom"):
            fn(model, X, custom, progress=False)
        with pytest.raises(ValueError, match=r"calibration_batch of shape \(96, 15\) failed"):
            fn(model, X[:, :15], rule, progress=False)
        with pytest.raises(TypeError, match="sequential must be a bool"):
            fn(model, X, rule, sequential=1, progress=False)
    # The contraction axis comes from the op: a rule's axis that contradicts it is refused.
    with pytest.raises(ValueError, match=r"says axis=1 for 'Dense_1/kernel', but the op that "
                                         r"uses it contracts axes \(0,\)"):
        wanda(model, X, MaskRule("2:4", include="Dense_1/kernel", axis=1), progress=False)


def test_report_names_the_method(capsys):
    conv = wanda((MLP(), PARAMS), X, MaskRule("2:4", exclude="head"), held_out=X_HELD)
    assert "Dense_1/kernel" in capsys.readouterr().err          # the progress bars
    text = str(conv.report())
    assert "err Wanda" in text and "held-out" in text


# ---------------------------------------------------------------------- the benchmark


def test_benchmark_fast_mode_compares_every_method(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "oneshot.md"
    proc = subprocess.run([sys.executable, "benchmarks/oneshot.py", "--fast", "--out", str(out)],
                          cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "fast mode" in text
    row = next(line for line in text.splitlines() if line.startswith("| 2:4 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    losses = [float(c.split(" / ")[0]) for c in cells[1:]]       # magnitude .. AdaPrune
    assert len(losses) == 4 and all(0 < v < 8 for v in losses)
    for heading in ("fine-tuning steps", "Conversion time", "Calibration-set size", "targets"):
        assert heading in text
