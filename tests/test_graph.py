"""The op-level rewrite (nmjax._graph) against plain jnp: random kernels used through
einsums of many forms (batch axes, several contraction axes, the kernel on either side, casts,
transposes and reshapes before use), values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nmjax
from nmjax.nn._core import Sparsity
from nmjax.nn._sparsify import run_sparse
from nmjax.plan import Traced
from nmjax.tree import apply_masks, build_masks

# (name, kernel shape, x shape, fn(x, w)): each one a product nmjax must find and rewrite.
CASES = [
    ("dense (in, out)", (16, 8), (3, 16), lambda x, w: x @ w),
    ("(out, in) via .T", (8, 16), (3, 16), lambda x, w: x @ w.T),
    ("kernel on the left", (8, 16), (3, 16), lambda x, w: jnp.einsum("oi,bi->ob", w, x)),
    ("two contraction axes", (4, 4, 8), (3, 4, 4), lambda x, w: jnp.einsum("bhd,hdo->bo", x, w)),
    ("two output axes", (16, 2, 4), (2, 3, 16), lambda x, w: jnp.einsum("bti,ihd->bthd", x, w)),
    ("batch axis (experts)", (2, 16, 8), (2, 5, 16), lambda x, w: jnp.einsum("etd,edf->etf",
                                                                             x, w)),
    ("cast + reshape", (16, 8), (3, 16),
     lambda x, w: x @ w.astype(jnp.bfloat16).astype(jnp.float32).reshape(4, 4, 8).reshape(16, 8)),
    ("split output by reshape", (16, 8), (3, 16),
     lambda x, w: jnp.einsum("bi,ihd->bhd", x, w.reshape(16, 2, 4))),
]


@settings(max_examples=16, deadline=None)
@given(case=st.sampled_from(CASES), pattern=st.sampled_from(["2:4", "2:4 transposable",
                                                              "2:4 bimask"]),
       seed=st.integers(0, 3))
def test_rewrite_matches_jnp_on_masked_weights(case, pattern, seed):
    _, w_shape, x_shape, fn = case
    kw, kx = jax.random.split(jax.random.key(seed))
    params = {"w": jax.random.normal(kw, w_shape)}
    x = jax.random.normal(kx, x_shape)
    model = lambda p, x: fn(x, p["w"])                                      # noqa: E731
    plan = nmjax.resolve(model, pattern, x, params=params)
    assert plan.paths == ("w",)
    masks = build_masks(params, plan)
    assert bool(plan.valid(masks))
    masked = apply_masks(params, masks)
    def sparse(p, x):
        traced = Traced(lambda p, a: model(p, a[0]), p, [x])
        return run_sparse(traced, plan, Sparsity(pattern), None, "fn")[0]

    np.testing.assert_allclose(jax.jit(sparse)(params, x), model(masked, x),
                               rtol=1e-4, atol=1e-4)
    # dW is straight-through: the dense model's gradient at the masked weights.
    g = jax.grad(lambda p: sparse(p, x).sum())(params)["w"]
    gd = jax.grad(lambda p: model(p, x).sum())(masked)["w"]
    np.testing.assert_allclose(g, gd, rtol=1e-4, atol=1e-4)
    if "bimask" not in pattern:           # dX uses the forward mask: the dense model's dX
        dx = jax.grad(lambda x: sparse(params, x).sum())(x)
        np.testing.assert_allclose(dx, jax.grad(lambda x: model(masked, x).sum())(x),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [16, 12])  # 16: masks enter the scan bit-packed; 12: as is
def test_scanned_layers_use_each_layers_static_masks_both_ways(size):
    """A scan over stacked kernels (Bi-Mask: distinct forward and backward masks) gives what
    an unrolled loop of nm_dense with each layer's own masks gives: values, dX, dW."""
    stacked = jax.random.normal(jax.random.key(0), (3, size, size))
    x = jax.random.normal(jax.random.key(1), (5, size))

    def model(p, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0].sum()

    params = {"w": stacked}
    plan = nmjax.resolve(model, "2:4 bimask", x, params=params)
    assert plan.by_path["w"].layout.stack == (0,)
    masks = build_masks(params, plan)
    assert not bool(jnp.array_equal(masks["w"].fwd, masks["w"].bwd))

    def sparse(p, x):
        traced = Traced(lambda p, a: model(p, a[0]), p, [x])
        return run_sparse(traced, plan, Sparsity("2:4 bimask", mode="static"),
                          {"w": masks["w"]}, "fn")[0]

    def unrolled(p, x):
        m = masks["w"]
        for i in range(3):
            x = jnp.tanh(nmjax.ops.nm_dense(x, p["w"][i], m.fwd[i], m.bwd[i],
                                            perm=m.perm[i], backend="reference"))
        return x.sum()

    got = jax.jit(jax.value_and_grad(sparse, argnums=(0, 1)))(params, x)
    want = jax.value_and_grad(unrolled, argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
