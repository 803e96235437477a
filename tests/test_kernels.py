"""Tests of nmjax.kernels: packing, metadata layout, the sparse GEMM kernel.

CPU: the packing and layout functions, the kernel's emulation branch under Pallas
Mosaic GPU interpret mode (tiling, pipeline, indexing, packing), and the PTX branch's
lowering to Mosaic IR. GPU (``-m gpu``, sm_90 only): the sparse-wgmma branch itself.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nmjax.kernels.sparse_matmul  # noqa: F401
from nmjax import format as nmformat
from nmjax.kernels import pack as P

S = sys.modules["nmjax.kernels.sparse_matmul"]


def _random_mask(rng, rows, k, underfill=True):
    """A 2:4 mask along axis 1; with ``underfill`` some groups keep 0 or 1."""
    mask = np.zeros((rows, k // 4, 4), bool)
    for r in range(rows):
        for g in range(k // 4):
            kept = rng.integers(0, 3) if underfill else 2
            mask[r, g, rng.choice(4, kept, replace=False)] = True
    return jnp.asarray(mask.reshape(rows, k))


def _data(seed, rows, k, underfill=True):
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
    return a, _random_mask(rng, rows, k, underfill)


def _on_sm90():
    try:
        d = jax.devices()[0]
    except RuntimeError:
        return False
    return d.platform == "gpu" and getattr(d, "compute_capability", "") in ("9.0", "9.0a")


gpu = pytest.mark.gpu
needs_sm90 = pytest.mark.skipif(not _on_sm90(), reason="needs an sm_90 GPU")


# ----------------------------------------------------------------------- packing
def test_pair_table_is_valid():
    for code in range(16):
        lo, hi = P._PAIRS[code]
        assert 0 <= lo < hi <= 3
        kept = [p for p in range(4) if code >> p & 1]
        if len(kept) <= 2:
            assert set(kept) <= {lo, hi}


@pytest.mark.parametrize("rows,k", [(64, 32), (128, 64), (192, 128)])
def test_pack_roundtrip(rows, k):
    a, mask = _data(rows + k, rows, k)
    packed = P.pack_24(a, mask)
    assert packed.values.shape == (rows, k // 2)
    assert packed.meta.shape == (rows // 64, k // 32, 64) and packed.meta.dtype == jnp.uint32
    np.testing.assert_array_equal(P.unpack_24(packed), jnp.where(mask, a, 0))


def test_nibbles_are_valid_pairs():
    a, mask = _data(1, 64, 128)
    _, pos = P.pack_rows_24(a, mask)
    nib = np.asarray(P.nibbles(pos))
    assert not np.isin(nib, [0, 5, 10, 15]).any()
    assert ((nib & 3) < (nib >> 2)).all()


def test_meta_bit_layout_spot_check():
    """Word 16w+2g+q bits [4j,4j+4) = row 16w+g, group 8s+4q+j; +16 bits: row +8."""
    rng = np.random.default_rng(0)
    rows, k = 128, 64
    pos = np.sort(np.stack([rng.choice(4, 2, replace=False)
                            for _ in range(rows * k // 4)]), axis=1).reshape(rows, k // 2)
    meta = np.asarray(P.meta_to_thread_order(jnp.asarray(pos)))
    for (b, s, w, g, q, h, j) in [(0, 0, 0, 0, 0, 0, 0), (1, 1, 3, 7, 1, 1, 3),
                                  (0, 1, 2, 5, 0, 1, 2), (1, 0, 1, 3, 1, 0, 1)]:
        row = 64 * b + 16 * w + 8 * h + g
        group = 8 * s + 4 * q + j
        nib = pos[row, 2 * group] | (pos[row, 2 * group + 1] << 2)
        word = meta[b, s, 16 * w + 2 * g + q]
        assert (word >> (16 * h + 4 * j)) & 0xF == nib


def test_meta_roundtrip():
    a, mask = _data(2, 128, 96)
    _, pos = P.pack_rows_24(a, mask)
    np.testing.assert_array_equal(P.thread_order_to_positions(P.meta_to_thread_order(pos)), pos)


def test_matches_canonical_format():
    a, mask = _data(3, 128, 64)
    canon = nmformat.pack(a, mask, 2, 4, axis=1)
    values, pos = P.pack_rows_24(a, mask)
    np.testing.assert_array_equal(values, canon.values)
    np.testing.assert_array_equal(pos, nmformat.slot_indices(canon))
    # canonical word 0 holds groups 0..7 of each row, nibble per group, low first
    words = np.bitwise_or.reduce(np.asarray(P.nibbles(pos)[:, :8]) << (
        4 * np.arange(8, dtype=np.uint32)), axis=1)
    np.testing.assert_array_equal(words, np.asarray(canon.meta)[:, 0])
    converted = P.from_format(canon)
    np.testing.assert_array_equal(converted.meta, P.pack_24(a, mask).meta)


def test_pack_weight_24_both_directions():
    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.standard_normal((128, 192)), jnp.float32)
    fwd = _random_mask(rng, 192, 128, underfill=False).T  # 2:4 along in (axis 0)
    bwd = _random_mask(rng, 128, 192, underfill=False)  # 2:4 along out (axis 1)
    packed = jax.jit(P.pack_weight_24)(w, fwd, bwd)
    assert packed.fwd.values.shape == (192, 64) and packed.bwd.values.shape == (128, 96)
    np.testing.assert_array_equal(P.unpack_24(packed.fwd), jnp.where(fwd, w, 0).T)
    np.testing.assert_array_equal(P.unpack_24(packed.bwd), jnp.where(bwd, w, 0))
    assert P.pack_weight_24(w, fwd).bwd is None


def test_pack_rejects_bad_shapes():
    with pytest.raises(ValueError):
        P.pack_24(jnp.zeros((64, 30)), jnp.zeros((64, 30), bool))
    with pytest.raises(ValueError):
        P.pack_24(jnp.zeros((48, 32)), jnp.zeros((48, 32), bool))


# ------------------------------------------------------------ kernel (emulated)
def _interpret():
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.InterpretGPUParams()


@pytest.mark.parametrize(
    "m,n,k,tm,tn,stages,transpose_out",
    [
        (128, 64, 256, 64, 64, 2, False),  # 2x1 grid, 2 k-steps
        (64, 128, 512, 64, 64, 2, True),  # 1x2 grid, 4 k-steps > stages
        (128, 128, 384, 128, 64, 3, False),  # tile_m=128: two m64 blocks per tile
    ],
)
def test_emulated_kernel_interpret(m, n, k, tm, tn, stages, transpose_out):
    a, mask = _data(m + n + k, m, k)
    b_t = jnp.asarray(np.random.default_rng(9).standard_normal((n, k)), jnp.bfloat16)
    packed = P.pack_24(a, mask)
    cfg = S.SparseMatmulConfig(tile_m=tm, tile_n=tn, max_concurrent_steps=stages)
    out = S.sparse_matmul_24(packed, b_t, config=cfg, branch="emulate",
                             interpret=_interpret(), transpose_out=transpose_out)
    ref = S.sparse_matmul_24_reference(packed, b_t, transpose_out=transpose_out)
    assert out.shape == ref.shape
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(
    "m,n,k,tm,tn,stages,transpose_out,persistent,max_ctas,slots",
    [
        (128, 64, 256, 64, 64, 2, False, False, 0, 1),  # one CTA per tile, 2 k-steps
        # persistent: 2x2 CTA tiles over 3 CTAs (one loops twice), snake order, 3 k-steps
        (256, 128, 384, 64, 64, 2, True, True, 3, 1),
        (256, 128, 128, 64, 64, 2, False, True, 2, 2),  # double-buffered epilogue
        (384, 192, 128, 64, 64, 2, True, True, 4, 1),  # grouped order, partial last band
    ],
)
def test_warp_specialized_kernel_interpret(m, n, k, tm, tn, stages, transpose_out,
                                           persistent, max_ctas, slots):
    """v2 structure (producer + 2 consumer warpgroups, persistent snake grid, per-warpgroup
    rows of A / metadata / C) with the emulated MMA under interpret mode."""
    a, mask = _data(m + n + k + 1, m, k)
    b_t = jnp.asarray(np.random.default_rng(7).standard_normal((n, k)), jnp.bfloat16)
    packed = P.pack_24(a, mask)
    cfg = S.SparseMatmulConfig(tile_m=tm, tile_n=tn, max_concurrent_steps=stages,
                               warp_specialized=True, mma_in_flight=0,
                               epilogue_n=32 // slots, epilogue_slots=slots,
                               persistent=persistent, max_ctas=max_ctas,
                               grid_tile_width=1 if m < 384 else 2,
                               grid_order="snake" if m < 384 else "grouped")
    out = S.sparse_matmul_24(packed, b_t, config=cfg, branch="emulate",
                             interpret=_interpret(), transpose_out=transpose_out)
    ref = S.sparse_matmul_24_reference(packed, b_t, transpose_out=transpose_out)
    assert out.shape == ref.shape
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               rtol=1e-2, atol=1e-2)


def test_grouped_order_is_a_permutation():
    for m_iters, n_iters, width in [(5, 3, 2), (4, 4, 4), (7, 2, 3), (1, 6, 8)]:
        lin = jnp.arange(m_iters * n_iters, dtype=jnp.int32)
        mi, ni = S._grouped_order(lin, m_iters, n_iters, width)
        pairs = set(zip(np.asarray(mi).tolist(), np.asarray(ni).tolist(), strict=True))
        assert pairs == {(i, j) for i in range(m_iters) for j in range(n_iters)}


def test_warp_specialized_config_checks():
    with pytest.raises(ValueError, match="mma_in_flight=0"):
        S.SparseMatmulConfig(warp_specialized=True, mma_in_flight=1).check(256, 128, 128)
    cfg = S.SparseMatmulConfig(warp_specialized=True, mma_in_flight=0)
    assert cfg.cta_m == 256
    with pytest.raises(ValueError):
        cfg.check(128, 128, 128)  # rows not a multiple of the 256-row CTA tile


def test_kernel_rejects_bad_tiles():
    a, mask = _data(0, 128, 256)
    with pytest.raises(ValueError):
        S.sparse_matmul_24(P.pack_24(a, mask), jnp.zeros((100, 256), jnp.bfloat16))
    with pytest.raises(ValueError):
        S.sparse_matmul_24(P.pack_24(a, mask), jnp.zeros((128, 128), jnp.bfloat16))


@pytest.mark.parametrize("meta_first", [False, True])
def test_ptx_branch_lowers_to_mosaic_with_sparse_wgmma(meta_first):
    m, n, k = 128, 128, 256
    cfg = S.SparseMatmulConfig(meta_before_fence=meta_first)
    f = jax.jit(lambda v, mt, b: S.sparse_matmul_24(P.Packed24(v, mt), b, config=cfg))
    lowered = f.trace(
        jax.ShapeDtypeStruct((m, k // 2), jnp.bfloat16),
        jax.ShapeDtypeStruct((m // 64, k // 32, 64), jnp.uint32),
        jax.ShapeDtypeStruct((n, k), jnp.bfloat16),
    ).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert "wgmma.mma_async.sp.sync.aligned.m64n128k32.f32.bf16.bf16" in text


@pytest.mark.parametrize("tm,tn,persistent,meta_first", [
    (128, 128, True, False), (64, 256, True, False), (128, 128, False, False),
    (128, 128, True, True)])
def test_warp_specialized_ptx_lowers(tm, tn, persistent, meta_first):
    m, n, k = 512, 512, 512
    cfg = S.SparseMatmulConfig(tile_m=tm, tile_n=tn, warp_specialized=True,
                               persistent=persistent, mma_in_flight=int(not persistent),
                               epilogue_n=32, max_concurrent_steps=3 if tn == 128 else 2,
                               meta_before_fence=meta_first)
    f = jax.jit(lambda v, mt, b: S.sparse_matmul_24(P.Packed24(v, mt), b, config=cfg,
                                                    transpose_out=True))
    text = f.trace(
        jax.ShapeDtypeStruct((m, k // 2), jnp.bfloat16),
        jax.ShapeDtypeStruct((m // 64, k // 32, 64), jnp.uint32),
        jax.ShapeDtypeStruct((n, k), jnp.bfloat16),
    ).lower(lowering_platforms=("cuda",)).as_text()
    assert f"wgmma.mma_async.sp.sync.aligned.m64n{tn}k32.f32.bf16.bf16" in text


def _mosaic_ops_sequence(monkeypatch, cfg):
    """Order of metadata loads (L), wgmma fences (F), sparse wgmmas (M) in the Mosaic module."""
    import jax.experimental.mosaic.gpu.core as mgpu_core

    modules = []
    orig = mgpu_core._run_serde_pass

    def grab(module, *args, **kwargs):
        if kwargs.get("serialize"):
            modules.append(str(module))
        return orig(module, *args, **kwargs)

    monkeypatch.setattr(mgpu_core, "_run_serde_pass", grab)
    m, n, k = 128, 128, 256
    f = jax.jit(lambda v, mt, b: S.sparse_matmul_24(P.Packed24(v, mt), b, config=cfg))
    f.trace(
        jax.ShapeDtypeStruct((m, k // 2), jnp.bfloat16),
        jax.ShapeDtypeStruct((m // 64, k // 32, 64), jnp.uint32),
        jax.ShapeDtypeStruct((n, k), jnp.bfloat16),
    ).lower(lowering_platforms=("cuda",))
    seq = ""
    for line in modules[-1].split("\n"):
        if "memref.load" in line and "ui32" not in line and "i32" in line:
            seq += "L"
        elif "wgmma.fence" in line:
            seq += "F"
        elif "mma_async.sp" in line:
            seq += "M"
    return seq


def test_meta_before_fence_chains_the_wgmmas(monkeypatch):
    """meta_before_fence: the k-step's 8 metadata loads, one fence, then 8 wgmmas with no
    register write between them (else ptxas injects a warpgroup.arrive before each)."""
    seq = _mosaic_ops_sequence(monkeypatch, S.SparseMatmulConfig(meta_before_fence=True))
    assert "L" * 8 + "F" + "M" * 8 in seq
    seq = _mosaic_ops_sequence(monkeypatch, S.SparseMatmulConfig())
    assert "LM" * 8 in seq  # v1 as measured: a load before every wgmma


# --------------------------------------------------------------------------- GPU
V1_GPU = S.SparseMatmulConfig()
WS_GPU = S.SparseMatmulConfig(warp_specialized=True, mma_in_flight=0, epilogue_n=32,
                              max_ctas=3)  # few CTAs: each loops over several tiles


@gpu
@needs_sm90
@pytest.mark.parametrize("cfg,m,n,k", [
    (V1_GPU, 128, 128, 128), (V1_GPU, 256, 384, 512), (V1_GPU, 1024, 512, 768),
    (WS_GPU, 256, 128, 128), (WS_GPU, 512, 384, 768), (WS_GPU, 1024, 1024, 512),
], ids=["v1-128", "v1-256", "v1-1024", "ws-256", "ws-512", "ws-1024"])
@pytest.mark.parametrize("transpose_out", [False, True])
def test_sparse_wgmma_matches_reference_on_gpu(cfg, m, n, k, transpose_out):
    a, mask = _data(m + n + k, m, k, underfill=True)
    b_t = jax.random.normal(jax.random.key(k), (n, k), jnp.float32).astype(jnp.bfloat16)
    packed = P.pack_24(a, mask)
    out = S.sparse_matmul_24(packed, b_t, config=cfg, transpose_out=transpose_out)
    ref = jnp.dot(P.unpack_24(packed).astype(jnp.float32), b_t.astype(jnp.float32).T,
                  precision=jax.lax.Precision.HIGHEST)
    ref = ref.T if transpose_out else ref
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.isfinite(out).all()
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-2


@gpu
@needs_sm90
def test_metadata_layout_probe_on_gpu():
    sys.path.insert(0, ".")
    from benchmarks.kernels import probe

    assert probe()


# ----------------------------------------------------------------------- backend
def test_pallas_backend_registered_only_on_sm90():
    from nmjax import ops
    from nmjax.kernels import backend

    if backend.sm90_unavailable() is None:
        assert "pallas" in ops.backends()
        return
    assert "pallas" not in ops.backends()
    assert "sm_90" in backend.sm90_unavailable()
    w = jnp.ones((128, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="'pallas' is not available"):
        ops.nm_dense(jnp.ones((128, 128), jnp.bfloat16), w, jnp.ones((128, 128), bool),
                     backend="pallas")


def test_auto_policy_uses_measured_table(monkeypatch):
    from nmjax import ops
    from nmjax.kernels import backend

    def problem(**kw):
        base = dict(direction="forward", lhs_shape=(8192, 4096), w_shape=(4096, 4096),
                    dtype=jnp.bfloat16, platform="gpu", device_kind="NVIDIA H100 80GB HBM3",
                    nm=(2, 4), permuted=False)
        base.update(kw)
        return ops.Problem(**base)

    monkeypatch.setattr(backend, "SPEEDUP_TABLE", {(4096, 8192, 4096): 1.2})
    assert backend.claims(problem())
    assert backend.claims(problem(direction="input_grad", lhs_shape=(8192, 4096)))
    assert not backend.claims(problem(nm=None))
    assert not backend.claims(problem(dtype=jnp.float32))
    assert not backend.claims(problem(platform="cpu"))
    assert not backend.claims(problem(lhs_shape=(8000, 4096)))
    assert not backend.claims(problem(lhs_shape=(256, 4096)))  # far from any measured shape
    monkeypatch.setattr(backend, "SPEEDUP_TABLE", {(4096, 8192, 4096): 0.8})
    assert not backend.claims(problem())


@gpu
@needs_sm90
def test_nm_dense_pallas_matches_reference_on_gpu():
    from nmjax import ops

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((256, 384)), jnp.bfloat16)
    mask = _random_mask(rng, 384, 256, underfill=False).T  # 2:4 along in
    bwd = _random_mask(rng, 256, 384, underfill=False)  # 2:4 along out
    x = jnp.asarray(rng.standard_normal((128, 256)), jnp.bfloat16)

    def loss(x, w, backend):
        y = ops.nm_dense(x, w, mask, bwd, backend=backend)
        return jnp.sum(y.astype(jnp.float32) * jnp.cos(y.astype(jnp.float32)))

    got = jax.grad(loss, (0, 1))(x, w, "pallas")
    want = jax.grad(loss, (0, 1))(x, w, "reference")
    for g, r in zip(got, want, strict=True):
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        assert np.linalg.norm(g - r) / np.linalg.norm(r) < 2e-2
    y = ops.nm_dense(x, w, mask, bwd, backend="pallas")
    y_ref = ops.nm_dense(x, w, mask, bwd, backend="reference")
    y, y_ref = np.asarray(y, np.float64), np.asarray(y_ref, np.float64)
    assert np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref) < 1e-2
