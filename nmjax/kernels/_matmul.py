"""2:4-sparse x dense GEMM for Hopper (sm_90a) in Pallas Mosaic GPU, and its jnp reference.

``C = A @ B`` where ``A: (M, K)`` is 2:4 sparse along ``K`` and given packed
(:class:`~nmjax.kernels.Packed24`), and ``B`` is given K-major as ``b_t: (N, K)``: how
activations ``X: (batch, in)`` and output gradients ``dY: (batch, out)`` are stored, so
neither product of a linear layer transposes its dense operand:

* forward ``Yᵀ = Wᵀ·Xᵀ``: ``A = Wᵀ`` packed along ``in``, ``b_t = X``;
* input gradient ``dXᵀ = W·dYᵀ``: ``A = W`` packed along ``out``, ``b_t = dY``.

``transpose_out=True`` returns ``Cᵀ: (N, M)`` (``Y`` / ``dX`` directly).

Each kernel has two branches sharing the grid, the TMA pipeline, the indexing and the
epilogue: ``"ptx"`` (the sparse tensor cores, through inline PTX) and ``"emulate"``
(decompress the A tile with jnp, then a dense product), which runs under Pallas Mosaic GPU
interpret mode on a CPU so everything but the sparse instruction is tested without a GPU.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nmjax.kernels import _v1, _ws
from nmjax.kernels._common import Branch, SparseMatmulConfig
from nmjax.kernels._pack import SLICES_PER_TILE, THREAD_WORDS, Packed24, unpack_24

_WS = SparseMatmulConfig(warp_specialized=True, mma_in_flight=0, meta_before_fence=True,
                         epilogue_n=32, max_concurrent_steps=3)
_WS64 = dataclasses.replace(_WS, tile_m=64, max_concurrent_steps=4)

#: The kernel variants kept (name -> config); ``benchmarks/gpu_check.sh`` checks and times
#: each, and the measured table names them.
VARIANTS: dict[str, SparseMatmulConfig] = {
    # one warpgroup per 128x128 tile, a metadata load ahead of each m64 block's wgmmas
    # (with this layout LLVM merges a block's 4 word loads into one 16-byte load)
    "v1": SparseMatmulConfig(),
    # v1 with all of the k-tile's metadata loaded before one fence: 8 chained HGMMA.SP
    "v1_mf": SparseMatmulConfig(meta_before_fence=True),
    # CUTLASS's structure: 2 consumer warpgroups x 64x128 (CTA 128x128), 4 stages,
    # persistent; per k-tile one 16-byte metadata load, one arrive, 4 chained HGMMA.SP
    "ws64": _WS64,
    # + a 1x2 cluster sharing A and metadata by TMA multicast
    "ws64_mc": dataclasses.replace(_WS64, cluster_n=2),
    # + one pipeline across the CTA's tiles (slot and phase carried; any K): the producer
    # loads the next tile during the epilogue
    "ws64_pt": dataclasses.replace(_WS64, pipeline_across_tiles=True),
    # ws64_mc + the producer streaming into the next tile (K a multiple of 512)
    "ws64_mc_pt": dataclasses.replace(_WS64, cluster_n=2, pipeline_across_tiles=True),
    # 2 consumer warpgroups x 128x128 (CTA 256x128, B shared), 3 stages, persistent;
    # 2 16-byte metadata loads, one arrive, 8 chained HGMMA.SP per k-tile
    "ws": _WS,
    # + a 1x2 cluster sharing A and metadata (per CTA 50 KiB per k-tile instead of 68)
    "ws_mc": dataclasses.replace(_WS, cluster_n=2),
    # + one pipeline across the CTA's tiles (slot and phase carried; any K)
    "ws_pt": dataclasses.replace(_WS, pipeline_across_tiles=True),
    # 2 consumer warpgroups x 64x256 (CTA 128x256, m64n256 instructions), 2 stages
    "ws64_n256": dataclasses.replace(_WS64, tile_n=256, max_concurrent_steps=2),
}


def sparse_matmul_24_reference(a: Packed24, b_t: jax.Array, *, transpose_out: bool = False,
                               out_dtype=jnp.bfloat16) -> jax.Array:
    """Plain-jnp ``C = unpack(a) @ b_t.T`` with f32 accumulation: ``(M, N)``, or ``Cᵀ``.

    >>> import jax.numpy as jnp
    >>> from nmjax.kernels import pack_24
    >>> a = jnp.tile(jnp.array([1.0, 0.0, 2.0, 0.0]), (64, 32))      # 2:4 along K
    >>> c = sparse_matmul_24_reference(pack_24(a, a != 0), jnp.ones((8, 128)))
    >>> c.shape, float(c[0, 0])
    ((64, 8), 96.0)
    """
    dense = unpack_24(a)
    c = jnp.dot(dense, b_t.T, preferred_element_type=jnp.float32).astype(out_dtype)
    return c.T if transpose_out else c


def sparse_matmul_24(
    a: Packed24,
    b_t: jax.Array,
    *,
    config: SparseMatmulConfig | None = None,
    transpose_out: bool = False,
    branch: Branch = "ptx",
    interpret: bool | object = False,
    out_init: jax.Array | None = None,
) -> jax.Array:
    """``C = A @ b_t.T`` with A 2:4 sparse along K (packed), on Hopper's sparse tensor cores.

    Example (sm_90 GPU; on a CPU, ``branch="emulate"`` with
    ``interpret=plgpu.InterpretGPUParams()`` runs the same kernel with a dense product)::

      packed = nmjax.kernels.pack_24(a, mask)              # a, mask: (M, K)
      c = nmjax.kernels.sparse_matmul_24(packed, b_t)      # b_t: (N, K) -> c: (M, N)

    Args:
      a: :class:`Packed24`: ``values: bf16 (M, K/2)``, ``meta: uint32 (M/64, K/128, 64, 4)``.
      b_t: bf16 ``(N, K)``: B stored K-major.
      config: the kernel (:data:`VARIANTS` names the kept ones); ``None``:
        ``SparseMatmulConfig()`` (v1). M, N, K must be multiples of its CTA tile.
      transpose_out: return ``Cᵀ: (N, M)`` instead of ``C: (M, N)``.
      branch: ``"ptx"`` (sparse tensor cores, sm_90a) or ``"emulate"`` (decompress + dense
        product; for interpret-mode tests).
      interpret: passed to :func:`plgpu.kernel` (e.g. ``plgpu.InterpretGPUParams()``).
      out_init: bf16 of the result's shape for the kernel to write into; entries it does
        not write keep these values (a diagnostic: poison it to find unwritten tiles).
        ``None``: a fresh output.

    Returns:
      bf16 ``(M, N)`` (or ``(N, M)``), f32 accumulation.

    Raises:
      TypeError: ``a`` not a :class:`Packed24`, or ``config`` not a SparseMatmulConfig.
      ValueError: dtypes other than bf16 / uint32, mismatched shapes, shapes the
        config's tiles do not divide, or ``out_init`` not bf16 of the result's shape.
    """
    config = SparseMatmulConfig() if config is None else config
    if not isinstance(config, SparseMatmulConfig):
        raise TypeError(f"config must be a SparseMatmulConfig, got {type(config).__name__}")
    if not isinstance(a, Packed24):
        raise TypeError(f"a must be a Packed24 (values, meta), got {type(a).__name__}")
    if branch not in ("ptx", "emulate"):
        raise ValueError(f"branch must be 'ptx' or 'emulate', got {branch!r}")
    values, meta = a
    if values.ndim != 2 or b_t.ndim != 2:
        raise ValueError(f"a.values and b_t must be 2-D, got shapes {values.shape}, "
                         f"{b_t.shape}")
    m, half = values.shape
    k = 2 * half
    n, k2 = b_t.shape
    if k != k2:
        raise ValueError(f"K mismatch: a.values {values.shape} is (M, K/2) with K={k}, but "
                         f"b_t {b_t.shape} is (N, K) with K={k2}")
    if values.dtype != jnp.bfloat16 or b_t.dtype != jnp.bfloat16:
        raise ValueError(f"a.values and b_t must be bf16, got {values.dtype}, {b_t.dtype}")
    want = (m // 64, k // 128, THREAD_WORDS, SLICES_PER_TILE)
    if meta.shape != want or meta.dtype != jnp.uint32:
        raise ValueError(f"a.meta must be uint32 of shape (M/64, K/128, 64, 4) = {want}, got "
                         f"{meta.dtype} {meta.shape}")
    config.check(m, n, k)
    meta2d = meta.reshape(m // 64, 2 * k)
    t_kernel = transpose_out and config.transpose_in_kernel
    if out_init is not None:
        want = (n, m) if transpose_out else (m, n)
        if tuple(out_init.shape) != want or out_init.dtype != jnp.bfloat16:
            raise ValueError(f"out_init must be bf16 of the result's shape {want}, got "
                             f"{out_init.dtype} {tuple(out_init.shape)}")
        if transpose_out and not t_kernel:  # the kernel writes C, XLA transposes
            out_init = out_init.T
    run = _ws.sparse_matmul_ws if config.warp_specialized else _v1.sparse_matmul_v1
    c = run(values, meta2d, b_t, config=config, transpose=t_kernel, branch=branch,
            interpret=interpret, out_init=out_init)
    return c.T if transpose_out and not t_kernel else c

