"""nm_dense / nm_conv: values and gradients against hand-written masked references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax
from jax.test_util import check_grads

from nmjax import backends, ops
from nmjax.masks import nm_mask

# A small fixed set of shapes, so JAX compiles each once.
DENSE_SHAPES = [((6,), 8, 12), ((2, 3), 16, 8), ((5,), 4, 4)]  # (lead, in, out)


def _problem(seed, lead, din, dout, dtype=jnp.float32):
    rng = np.random.default_rng(seed)  # numpy: jax.random compiles slowly per shape on CPU
    x = jnp.asarray(rng.standard_normal((*lead, din)), dtype)
    w = jnp.asarray(rng.standard_normal((din, dout)), dtype)
    # Forward mask: 2:4 along in; backward mask: an unrelated 2:4 along out.
    fwd = nm_mask(jnp.abs(w).astype(jnp.float32), 2, 4, axis=0)
    bwd = nm_mask(jnp.asarray(rng.uniform(size=(din, dout))), 2, 4, axis=1)
    dy = jnp.asarray(rng.standard_normal((*lead, dout)), dtype)
    return x, w, fwd, bwd, dy


def _ref_grads(x, w, fwd, bwd, dy, decay):
    """Hand-written: dX = dY (W⊙bwd)ᵀ, dW = Xᵀ dY + decay (1−fwd)⊙W."""
    x64, w64, dy64 = (np.asarray(a, np.float64) for a in (x, w, dy))
    x2, dy2 = x64.reshape(-1, w64.shape[0]), dy64.reshape(-1, w64.shape[1])
    dx = (dy2 @ np.where(bwd, w64, 0).T).reshape(x.shape)
    dw = x2.T @ dy2 + decay * np.where(fwd, 0, w64)
    return dx, dw


@settings(max_examples=12, deadline=None)
@given(st.sampled_from(DENSE_SHAPES), st.integers(0, 10_000), st.sampled_from([0.0, 0.25]))
def test_dense_values_and_grads_match_masked_reference(shape, seed, decay):
    lead, din, dout = shape
    x, w, fwd, bwd, dy = _problem(seed, lead, din, dout)
    y, vjp = jax.vjp(lambda x, w: ops.nm_dense(x, w, fwd, bwd, decay=decay), x, w)
    ref_y = np.asarray(x, np.float64) @ np.where(fwd, np.asarray(w, np.float64), 0)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    dx, dw = vjp(dy)
    ref_dx, ref_dw = _ref_grads(x, w, fwd, bwd, dy, decay)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-5)


def test_input_grad_uses_bwd_mask_not_fwd_mask():
    x, w, fwd, bwd, dy = _problem(1, (6,), 8, 12)
    assert not bool(jnp.all(fwd == bwd))
    _, vjp = jax.vjp(lambda x: ops.nm_dense(x, w, fwd, bwd), x)
    (dx,) = vjp(dy)
    with_fwd = dy @ jnp.where(fwd, w, 0).T
    with_bwd = dy @ jnp.where(bwd, w, 0).T
    np.testing.assert_allclose(dx, with_bwd, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(dx - with_fwd).max()) > 1e-2
    # bwd_mask=None means bwd = fwd.
    _, vjp = jax.vjp(lambda x: ops.nm_dense(x, w, fwd), x)
    np.testing.assert_allclose(vjp(dy)[0], with_fwd, rtol=1e-5, atol=1e-5)


def test_perm_gives_the_same_input_grad_in_permuted_order():
    x, w, fwd, bwd, dy = _problem(2, (6,), 8, 12)
    perm = jnp.asarray(np.random.default_rng(3).permutation(12))
    g = lambda p: jax.vjp(lambda x: ops.nm_dense(x, w, fwd, bwd, perm=p), x)[1](dy)[0]
    np.testing.assert_allclose(g(perm), g(None), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g(perm), dy @ jnp.where(bwd, w, 0).T, rtol=1e-5, atol=1e-5)


def test_check_grads_wrt_x_when_bwd_equals_fwd():
    x, w, fwd, _, _ = _problem(4, (6,), 8, 12)
    check_grads(lambda x: jnp.tanh(ops.nm_dense(x, w, fwd)), (x,), order=2, modes=("rev",))


def test_weight_grad_is_straight_through_not_masked_derivative():
    x, w, fwd, _, dy = _problem(5, (6,), 8, 12)
    _, vjp = jax.vjp(lambda w: ops.nm_dense(x, w, fwd), w)
    (dw,) = vjp(dy)
    # The derivative of the masked product would be zero outside the mask; STE is not.
    assert float(jnp.abs(jnp.where(fwd, 0, dw)).max()) > 1e-2
    np.testing.assert_allclose(dw, x.T @ dy, rtol=1e-5, atol=1e-5)


def test_jit_vmap_remat_and_grad_of_grad():
    x, w, fwd, bwd, dy = _problem(6, (6,), 8, 12)
    f = lambda x, w: jnp.sum(jnp.tanh(ops.nm_dense(x, w, fwd, bwd)) * dy)
    ref_dx = jax.grad(lambda x: jnp.sum(jnp.tanh(x @ jnp.where(fwd, w, 0)) * dy))  # bwd≠fwd
    # jit and remat agree with eager.
    g_eager = jax.grad(f, (0, 1))(x, w)
    g_jit = jax.jit(jax.grad(f, (0, 1)))(x, w)
    g_remat = jax.grad(jax.checkpoint(f), (0, 1))(x, w)
    for a, b, c in zip(g_eager, g_jit, g_remat, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(g_eager[0] - ref_dx(x)).max()) > 1e-3  # it did use bwd
    # vmap over a batch of inputs, and over a batch of (x, w, masks).
    xs = jnp.stack([x, 2 * x, -x])
    per = jax.vmap(lambda x: ops.nm_dense(x, w, fwd, bwd))(xs)
    np.testing.assert_allclose(per, jnp.stack([ops.nm_dense(v, w, fwd, bwd) for v in xs]),
                               rtol=1e-5, atol=1e-5)
    ws = jnp.stack([w, -w])
    gs = jax.vmap(jax.grad(f, 1), (None, 0))(x, ws)
    np.testing.assert_allclose(gs[1], jax.grad(f, 1)(x, -w), rtol=1e-5, atol=1e-5)
    # grad of grad (Hessian-vector product in x) equals the masked dense one when bwd = fwd.
    h = lambda fn: jax.grad(lambda x: jnp.vdot(jax.grad(fn)(x), dy[:, :8]))(x)
    ours = h(lambda x: jnp.sum(jnp.tanh(ops.nm_dense(x, w, fwd)) ** 2))
    ref = h(lambda x: jnp.sum(jnp.tanh(x @ jnp.where(fwd, w, 0)) ** 2))
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    x, w, fwd, bwd, dy = _problem(7, (6,), 16, 8, dtype)
    y, vjp = jax.vjp(lambda x, w: ops.nm_dense(x, w, fwd, bwd), x, w)
    assert y.dtype == dtype
    ref = np.asarray(x, np.float32) @ np.where(fwd, np.asarray(w, np.float32), 0)
    # Only the final rounding to the input dtype separates them.
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=1e-2, atol=1e-2)
    dx, dw = vjp(dy)
    assert dx.dtype == dtype and dw.dtype == dtype
    ref_dx, ref_dw = _ref_grads(x, w, fwd, bwd, dy, 0.0)
    np.testing.assert_allclose(np.asarray(dx, np.float32), ref_dx, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(dw, np.float32), ref_dw, rtol=2e-2, atol=2e-2)


def test_mixed_dtypes_promote_and_gradients_keep_each_dtype():
    x, w, fwd, _, _ = _problem(8, (6,), 8, 12)
    xb = x.astype(jnp.bfloat16)
    y = ops.nm_dense(xb, w, fwd)
    assert y.dtype == jnp.float32
    dx, dw = jax.grad(lambda x, w: ops.nm_dense(x, w, fwd).sum(), (0, 1))(xb, w)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32


def test_bad_inputs_raise_clear_errors():
    x, w, fwd, bwd, _ = _problem(9, (6,), 8, 12)
    with pytest.raises(ValueError, match=r"fwd_mask has shape \(12, 8\).*kernel w has shape"):
        ops.nm_dense(x, w, fwd.T)
    with pytest.raises(ValueError, match=r"bwd_mask has shape \(8, 8\)"):
        ops.nm_dense(x, w, fwd, bwd[:, :8])
    with pytest.raises(TypeError, match="fwd_mask must be a boolean array, got dtype int32"):
        ops.nm_dense(x, w, fwd.astype(jnp.int32))
    with pytest.raises(ValueError, match=r"last axis must equal .* = w.shape\[0\] = 8"):
        ops.nm_dense(x[:, :4], w, fwd)
    with pytest.raises(ValueError, match="w must be a 2-D kernel"):
        ops.nm_dense(x, w[None], fwd[None])
    with pytest.raises(TypeError, match="x must be a floating array"):
        ops.nm_dense(x.astype(jnp.int32), w, fwd)
    with pytest.raises(ValueError, match=r"perm must have shape \(12,\).*got shape \(8,\)"):
        ops.nm_dense(x, w, fwd, perm=jnp.arange(8))
    with pytest.raises(ValueError, match=r"perm of shape \(12,\) is not a permutation of 0..11"):
        ops.nm_dense(x, w, fwd, perm=jnp.zeros(12, jnp.int32))
    with pytest.raises(TypeError, match="perm must be an integer index array"):
        ops.nm_dense(x, w, fwd, perm=jnp.arange(12.0))
    with pytest.raises(ValueError, match="decay must be >= 0"):
        ops.nm_dense(x, w, fwd, decay=-1.0)
    with pytest.raises(ValueError, match=r"fwd_nm must be None or an \(n, m\) pair"):
        ops.nm_dense(x, w, fwd, fwd_nm=2)


def test_unavailable_pallas_backend_names_device_and_requirement():
    # On the CPU device (present on every machine, a GPU one included) the Pallas kernels
    # cannot run: the error names the device and what the kernels need.
    x, w, fwd, _, _ = _problem(9, (6,), 8, 12)
    with jax.default_device(jax.devices("cpu")[0]):
        with pytest.raises(ValueError, match=r"'pallas' cannot run the forward product .* "
                                             r"\(cpu.*sm_90 GPU"):
            ops.nm_dense(x, w, fwd, backend="pallas")


def _fake_backend(calls, claim_nm, speed=2.0):
    def forward(x2d, w, mask, *, precision):
        calls.append("forward")
        return backends.reference_forward(x2d, w, mask, precision=precision)

    def input_grad(dy2d, w, mask, perm, *, precision):
        calls.append("input_grad")
        return backends.reference_input_grad(dy2d, w, mask, perm, precision=precision)

    def supports(problem):
        return None if problem.nm == claim_nm else f"it needs {claim_nm}, got {problem.nm}"

    return backends.Backend("fake", forward, input_grad, supports, lambda p: speed)


def test_auto_dispatch_uses_a_backend_only_where_it_supports_and_beats_dense(monkeypatch):
    calls: list[str] = []
    fake = _fake_backend(calls, (2, 4))
    monkeypatch.setattr(backends, "_auto_candidates", lambda problem: (fake,))
    x, w, fwd, bwd, dy = _problem(10, (6,), 8, 12)
    f = lambda x, **kw: jax.vjp(lambda x: ops.nm_dense(x, w, fwd, bwd, **kw), x)[1](dy)[0]
    ref = f(x, backend="reference")
    # Only the forward product declares 2:4: the backward stays on the reference.
    np.testing.assert_allclose(f(x, fwd_nm=(2, 4)), ref, rtol=1e-6)
    assert calls == ["forward"]
    calls.clear()
    f(x)  # nothing declared: no product is supported
    assert calls == []
    # A backend measured slower than dense is never picked by "auto".
    slow = _fake_backend(calls, (2, 4), speed=0.9)
    monkeypatch.setattr(backends, "_auto_candidates", lambda problem: (slow,))
    f(x, fwd_nm=(2, 4), bwd_nm=(2, 4))
    assert calls == []


def test_a_backend_value_runs_both_products_or_refuses_with_its_reason():
    calls: list[str] = []
    x, w, fwd, bwd, dy = _problem(10, (6,), 8, 12)
    fake = _fake_backend(calls, (2, 4))
    g = jax.vjp(lambda x: ops.nm_dense(x, w, fwd, bwd, backend=fake, fwd_nm=(2, 4),
                                       bwd_nm=(2, 4)), x)[1](dy)[0]
    assert sorted(calls) == ["forward", "input_grad"]
    np.testing.assert_allclose(g, dy @ jnp.where(bwd, w, 0).T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"'fake' cannot run the input_grad product .*it needs "
                                         r"\(2, 4\), got None"):
        jax.vjp(lambda x: ops.nm_dense(x, w, fwd, backend=fake, fwd_nm=(2, 4)), x)
    with pytest.raises(ValueError, match="backend must be 'auto', 'reference', an "):
        ops.nm_dense(x, w, fwd, backend="cuda")
    with pytest.raises(TypeError, match="backend must be a string or an nmjax.backends.Backend"):
        ops.nm_dense(x, w, fwd, backend=3)


def test_importing_kernels_registers_nothing_and_auto_is_reference_off_gpu(monkeypatch):
    import nmjax.kernels  # noqa: F401

    x, w, fwd, _, _ = _problem(10, (6,), 8, 12)
    fwd_plan, bwd_plan = ops._plan("auto", 6, w.shape, jnp.float32, (2, 4), (2, 4), False)
    if jax.devices()[0].platform != "gpu":
        assert fwd_plan[0] is backends.REFERENCE and bwd_plan[0] is backends.REFERENCE
    # The default device decides (jax.default_device is respected).
    with jax.default_device(jax.devices("cpu")[0]):
        assert backends.device_facts()[0] == "cpu"
        assert backends.resolve("auto", fwd_plan[1]._replace(platform="cpu")) is \
            backends.REFERENCE


def test_zero_decay_gives_exactly_the_straight_through_gradient():
    x, w, fwd, _, dy = _problem(11, (6,), 8, 12)
    w = jnp.where(fwd, w, jnp.inf)  # non-finite pruned weights (e.g. after an overflow)
    want = np.asarray(x).reshape(-1, 8).T @ np.asarray(dy).reshape(-1, 12)
    for decay in (0.0, jnp.float32(0.0)):
        dw = jax.vjp(lambda w, d=decay: ops.nm_dense(x, w, fwd, decay=d), w)[1](dy)[0]
        np.testing.assert_allclose(dw, want, rtol=1e-5, atol=1e-5)
    traced = jax.jit(lambda d: jax.vjp(lambda w: ops.nm_dense(x, w, fwd, decay=d), w)[1](dy)[0])
    np.testing.assert_allclose(traced(jnp.float32(0.0)), want, rtol=1e-5, atol=1e-5)
    assert not np.isfinite(np.asarray(traced(jnp.float32(1e-3)))).all()  # the term is real


def test_masks_value_passes_all_three():
    from nmjax.masks import BiMask

    x, w, _, _, dy = _problem(12, (6,), 8, 12)
    masks = BiMask(2, 4)(w, perm=jnp.asarray(np.random.default_rng(1).permutation(12)))
    got = jax.vjp(lambda x: ops.nm_dense(x, w, masks), x)[1](dy)[0]
    want = jax.vjp(lambda x: ops.nm_dense(x, w, masks.fwd, masks.bwd, perm=masks.perm), x)[1](dy)
    np.testing.assert_allclose(got, want[0], rtol=1e-6)
    with pytest.raises(ValueError, match="pass no bwd_mask or perm beside it"):
        ops.nm_dense(x, w, masks, masks.bwd)


# ---------------------------------------------------------------------------------- conv

CONV_CASES = [  # (kernel shape, strides, padding, groups)
    ((3, 3, 8, 12), 1, "SAME", 1),
    ((3, 3, 8, 12), 2, "VALID", 1),
    ((2, 2, 4, 8), 1, ((1, 0), (0, 1)), 2),
]


def _lax_conv(x, w, strides, padding, groups):
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    return lax.conv_general_dilated(x, w, (strides, strides), padding, dimension_numbers=dn,
                                    feature_group_count=groups,
                                    precision=lax.Precision.HIGHEST)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_values_and_grads_match_masked_reference(case):
    shape, strides, padding, groups = case
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.standard_normal((2, 6, 6, shape[2] * groups)), jnp.float32)
    w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    fwd = nm_mask(jnp.abs(w), 2, 4, axis=2)
    bwd = nm_mask(jnp.asarray(rng.uniform(size=shape)), 2, 4, axis=3)
    kw = dict(strides=strides, padding=padding, feature_group_count=groups, decay=0.5)
    y, vjp = jax.vjp(lambda x, w: ops.nm_conv(x, w, fwd, bwd, **kw), x, w)
    np.testing.assert_allclose(y, _lax_conv(x, jnp.where(fwd, w, 0), strides, padding, groups),
                               rtol=1e-4, atol=1e-4)
    dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    dx, dw = vjp(dy)
    _, vjp_x = jax.vjp(lambda x: _lax_conv(x, jnp.where(bwd, w, 0), strides, padding, groups), x)
    _, vjp_w = jax.vjp(lambda w: _lax_conv(x, w, strides, padding, groups), w)
    np.testing.assert_allclose(dx, vjp_x(dy)[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw, vjp_w(dy)[0] + 0.5 * jnp.where(fwd, 0, w),
                               rtol=1e-4, atol=1e-4)
    check_grads(lambda x: ops.nm_conv(x, w, fwd, **kw), (x,), order=1, modes=("rev",),
                atol=2e-2, rtol=2e-2)  # fp32 finite differences over a 3x3 window


def test_pointwise_conv_routes_to_nm_dense():
    calls: list[str] = []
    fake = _fake_backend(calls, (2, 4))
    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.standard_normal((2, 5, 5, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((1, 1, 8, 12)), jnp.float32)
    fwd = nm_mask(jnp.abs(w), 2, 4, axis=2)
    y = ops.nm_conv(x, w, fwd, backend=fake, fwd_nm=(2, 4), bwd_nm=(2, 4))
    assert calls == ["forward"]
    np.testing.assert_allclose(y, _lax_conv(x, jnp.where(fwd, w, 0), 1, "SAME", 1),
                               rtol=1e-5, atol=1e-5)
    w3 = jnp.asarray(rng.standard_normal((3, 3, 8, 12)), jnp.float32)
    with pytest.raises(ValueError, match=r"'fake' has no convolution kernel.*\(3, 3, 8, 12\)"):
        ops.nm_conv(x, w3, nm_mask(jnp.abs(w3), 2, 4, axis=2), backend=fake)


def test_conv_bad_inputs_raise_clear_errors():
    x = jnp.ones((2, 6, 6, 8))
    w = jnp.ones((3, 3, 8, 12))
    mask = jnp.ones(w.shape, bool)
    with pytest.raises(ValueError, match=r"x has 6 channels .* needs I \* groups = 8"):
        ops.nm_conv(x[..., :6], w, mask)
    with pytest.raises(ValueError, match=r"fwd_mask has shape \(3, 3, 12, 8\)"):
        ops.nm_conv(x, w, jnp.ones((3, 3, 12, 8), bool))
    with pytest.raises(ValueError, match="needs inputs .* of rank 4"):
        ops.nm_conv(x[0], w, mask)
    with pytest.raises(ValueError, match="padding must be 'SAME'"):
        ops.nm_conv(x, w, mask, padding="CIRCULAR")
    with pytest.raises(ValueError, match="strides must be a positive int or 2 positive ints"):
        ops.nm_conv(x, w, mask, strides=(1, 1, 1))
    with pytest.raises(TypeError, match="strides must be .* got '2'"):
        ops.nm_conv(x, w, mask, strides="2")
    with pytest.raises(ValueError, match=r"padding entries must be .* got \(1, 1, 1\)"):
        ops.nm_conv(x, w, mask, padding=[(1, 1, 1), (1, 1)])
