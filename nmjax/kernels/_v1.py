"""v1: one warpgroup per CTA, one CTA per ``tile_m x tile_n`` output tile.

The warpgroup both waits on the TMA pipeline and issues the wgmmas; kept as the baseline
and for shapes the warp-specialised tiles do not divide (its measured speed is in
``benchmarks/``, beside the command that measured it).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from nmjax.kernels import _common
from nmjax.kernels._pack import decompress_tile
from nmjax.kernels._wgmma_sp import TRANSFORMS, mma_functions


def sparse_matmul_v1(values, meta2d, b_t, *, config: _common.SparseMatmulConfig,
                     transpose: bool, branch: _common.Branch, interpret, out_init=None):
    """``C = A @ b_t.T`` (or ``Cᵀ`` with ``transpose``); arguments as validated by
    :func:`nmjax.kernels.sparse_matmul_24` (``meta2d``: ``(M/64, 2K)`` uint32)."""
    m, n = values.shape[0], b_t.shape[0]
    k = b_t.shape[1]
    tm, tn = config.tile_m, config.tile_n
    epi_n = min(config.epilogue_n, tn)
    k_iters = k // config.tile_k
    if branch == "ptx":
        mma_init, mma_step, mma_finish = mma_functions(
            tile_m=tm, tile_n=tn, in_flight=config.mma_in_flight,
            meta_before_fence=config.meta_before_fence, rows_by_warpgroup=False)

    def kernel(a_gmem, meta_gmem, b_gmem, out_gmem, out_smem):
        mi = lax.axis_index("m")
        ni = lax.axis_index("n")
        specs = _common.in_specs(config, tm, branch)
        gmem_args = (a_gmem.at[pl.ds(mi * tm, tm)],
                     meta_gmem.at[pl.ds(mi * (tm // 64), tm // 64)],
                     b_gmem.at[pl.ds(ni * tn, tn)])

        def epilogue(acc):
            _common.store_tile(acc, lambda _: out_smem, out_gmem, row0=mi * tm, col0=ni * tn,
                               transpose=transpose, epilogue_n=epi_n, slots=1)
            plgpu.wait_smem_to_gmem(0)

        if branch == "ptx":
            def body(_, a_smem, meta_smem, b_smem, acc):
                return mma_step(acc, a_smem, meta_smem, b_smem)

            acc = plgpu.emit_pipeline(
                body, grid=(k_iters,), in_specs=specs,
                max_concurrent_steps=config.max_concurrent_steps, init_carry=mma_init(),
            )(*gmem_args)
            epilogue(mma_finish(acc))
            return

        # Interpret-mode emulation: decompress the tile with jnp, then the dense wgmma.
        def scope(acc_ref, dense_smem):
            def body(_, a_smem, meta_smem, b_smem):
                dense_smem[...] = decompress_tile(a_smem[...], meta_smem[...])
                plgpu.commit_smem()
                plgpu.wgmma(acc_ref, dense_smem, b_smem.T)
                plgpu.wgmma_wait(0)

            plgpu.emit_pipeline(
                body, grid=(k_iters,), in_specs=specs,
                max_concurrent_steps=config.max_concurrent_steps,
            )(*gmem_args)
            epilogue(acc_ref[...])

        # Register (ACC) and SMEM scopes may not be mixed in one run_scoped.
        pl.run_scoped(
            lambda dense_smem: pl.run_scoped(
                lambda acc_ref: scope(acc_ref, dense_smem), plgpu.ACC((tm, tn), jnp.float32)),
            plgpu.SMEM((tm, config.tile_k), jnp.bfloat16, transforms=TRANSFORMS),
        )

    f = _common.launch(
        kernel, out_shape=(n, m) if transpose else (m, n), grid=(m // tm, n // tn),
        grid_names=("m", "n"),
        scratch=[plgpu.SMEM(_common.epilogue_shape(config, transpose), jnp.bfloat16)],
        interpret=interpret, out_init=out_init)
    return f(values, meta2d, b_t)
