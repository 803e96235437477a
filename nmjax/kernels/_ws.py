"""Warp-specialised sparse GEMM: a TMA producer warpgroup and ``compute_wgs`` consumer
warpgroups, persistent grid, optional 1x2 cluster with A and metadata multicast.

The structure of CUTLASS's sm90 sparse GEMM (``62_hopper_sparse_gemm``): per pipeline stage
the producer TMA-loads the compressed A tile, its metadata (in the thread-vector layout of
:mod:`nmjax.kernels._pack`) and B onto one barrier; each consumer warpgroup owns
``tile_m`` rows of the CTA tile (B is shared), reads its k-tile of metadata with one 16-byte
load per m64 block, fences once and chains its sparse wgmmas, then waits for them before
releasing the stage (no wgmma group in flight across k-tiles with a persistent grid). The
producer runs at ``memory_registers`` registers (``setmaxnreg``), the consumers at
``(512 - memory_registers) / compute_wgs`` rounded down to 8 (232 for 2 and 40).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from nmjax.kernels import _common
from nmjax.kernels._pack import decompress_tile
from nmjax.kernels._wgmma_sp import META_TILE_WORDS, TRANSFORMS, mma_functions


def sparse_matmul_ws(values, meta2d, b_t, *, config: _common.SparseMatmulConfig,
                     transpose: bool, branch: _common.Branch, interpret, out_init=None):
    """``C = A @ b_t.T`` (or ``Cᵀ``); arguments as validated by
    :func:`nmjax.kernels.sparse_matmul_24` (``meta2d``: ``(M/64, 2K)`` uint32)."""
    if config.pipeline_across_tiles and config.cluster_n == 1:
        return sparse_matmul_ws_carried(values, meta2d, b_t, config=config,
                                        transpose=transpose, branch=branch,
                                        interpret=interpret, out_init=out_init)
    m, n, k = values.shape[0], b_t.shape[0], b_t.shape[1]
    tm, tn = config.tile_m, config.tile_n
    nwg, ctm, cn = config.compute_wgs, config.cta_m, config.cluster_n
    m_iters, n_iters, k_iters = m // ctm, n // tn, k // config.tile_k
    epi_n = min(config.epilogue_n, tn)
    slots = config.epilogue_slots
    if branch == "ptx":
        mma_init, mma_step, mma_finish = mma_functions(
            tile_m=tm, tile_n=tn, in_flight=config.mma_in_flight,
            meta_before_fence=config.meta_before_fence, rows_by_warpgroup=nwg > 1)

    def get_pipeline(body, compute_context, pipeline_state=None):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_iters,),
            memory_registers=config.memory_registers,
            in_specs=_common.in_specs(config, ctm, branch, cluster=cn > 1),
            wg_axis="wg",
            num_compute_wgs=nwg,
            max_concurrent_steps=config.max_concurrent_steps,
            compute_context=compute_context,
            pipeline_state=pipeline_state,
        )

    def kernel(a_gmem, meta_gmem, b_gmem, out_gmem):
        ignore = lambda *_, **__: None  # noqa: E731  (allocations do not depend on it)
        allocs = get_pipeline(ignore, ignore).get_allocations(a_gmem, meta_gmem, b_gmem)
        out_shape = (nwg, slots, *_common.epilogue_shape(config, transpose))

        def scope(pipeline_allocs, out_smem):
            wg = lax.axis_index("wg")

            def tile(mi, ni, pipeline_state=None):
                row0 = mi * ctm + wg * tm  # this warpgroup's first row of C

                def epilogue(acc):
                    _common.store_tile(acc, lambda s: out_smem.at[wg, s], out_gmem, row0=row0,
                                       col0=ni * tn, transpose=transpose, epilogue_n=epi_n,
                                       slots=slots)

                if branch == "ptx":
                    def compute_context(eval_pipeline):
                        epilogue(mma_finish(eval_pipeline(mma_init())))

                    def body(_, a_smem, meta_smem, b_smem, acc):
                        return mma_step(acc, a_smem, meta_smem, b_smem)
                else:  # interpret-mode emulation: jnp decompress + dot per warpgroup
                    def compute_context(eval_pipeline):
                        epilogue(eval_pipeline(jnp.zeros((tm, tn), jnp.float32)))

                    def body(_, a_smem, meta_smem, b_smem, acc):
                        a = a_smem[pl.ds(wg * tm, tm)]
                        mt = meta_smem[pl.ds(wg * (tm // 64), tm // 64)]
                        return acc + lax.dot_general(
                            decompress_tile(a, mt), b_smem[...], (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)

                get_pipeline(body, compute_context, pipeline_state)(
                    a_gmem.at[pl.ds(mi * ctm, ctm)],
                    meta_gmem.at[pl.ds(mi * (ctm // 64), ctm // 64)],
                    b_gmem.at[pl.ds(ni * tn, tn)],
                    allocations=pipeline_allocs,
                )

            # The CTAs of a cluster take neighbouring N tiles of the same M tile: they
            # share A and its metadata, which the pipeline multicasts.
            cta = lax.axis_index("cluster") if cn > 1 else 0
            if config.persistent:
                @plgpu.nd_loop((m_iters * (n_iters // cn),), collective_axes="sm")
                def _loop(info):
                    (lin,) = info.index
                    mi, nci = _common.tile_order(config, lin, m_iters, n_iters // cn)
                    state = None
                    if config.pipeline_across_tiles:
                        # A CTA's first tile fills the pipeline, its last one drains it.
                        last = info.num_local_steps - 1
                        state = jnp.where(
                            info.local_index == 0, int(plgpu.PipelinePipeline.START),
                            jnp.where(info.local_index == last,
                                      int(plgpu.PipelinePipeline.STOP),
                                      int(plgpu.PipelinePipeline.STEADY)))
                    tile(mi, nci * cn + cta, state)
            else:
                tile(lax.axis_index("m"), lax.axis_index("n") * cn + cta)
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            scope,
            pipeline_allocs=allocs,
            out_smem=plgpu.SMEM(out_shape, jnp.bfloat16),
            collective_axes="wg",
        )

    if config.persistent:
        clusters = (config.max_ctas or _common.num_sms()) // cn
        units = m_iters * n_iters // cn
        # Tiles go round-robin over the grid: at most units // 2 CTAs (clusters) give each
        # at least the 2 tiles (START, STOP) the cross-tile pipeline needs.
        cap = units // 2 if config.pipeline_across_tiles else units
        grid, grid_names = (max(1, min(clusters, cap)),), ("sm",)
    else:
        grid, grid_names = (m_iters, n_iters // cn), ("m", "n")
    f = _common.launch(kernel, out_shape=(n, m) if transpose else (m, n), grid=grid,
                       grid_names=grid_names, num_threads=nwg + 1, cluster=cn,
                       interpret=interpret, out_init=out_init)
    return f(values, meta2d, b_t)


def sparse_matmul_ws_carried(values, meta2d, b_t, *, config: _common.SparseMatmulConfig,
                             transpose: bool, branch: _common.Branch, interpret,
                             out_init=None):
    """The persistent warp-specialised kernel with one pipeline across all of a CTA's tiles
    (``pipeline_across_tiles``, no cluster), at any K.

    Like CUTLASS's ``PipelineState``, the stage of a k-step is counted over the CTA's whole
    sequence of (tile, k-tile) steps, ``g = local_tile * k_iters + ki``: slot ``g % stages``,
    and each thread's barrier phases carry on from tile to tile. The producer never drains:
    it waits only for the slot it refills, so it loads the next tile's first k-tiles while
    the consumers finish the current tile and run its epilogue.
    """
    m, n, k = values.shape[0], b_t.shape[0], b_t.shape[1]
    tm, tn, tk = config.tile_m, config.tile_n, config.tile_k
    nwg, ctm, stages = config.compute_wgs, config.cta_m, config.max_concurrent_steps
    m_iters, n_iters, k_iters = m // ctm, n // tn, k // tk
    tiles = m_iters * n_iters
    epi_n = min(config.epilogue_n, tn)
    slots = config.epilogue_slots
    if branch == "ptx":
        mma_init, mma_step, mma_finish = mma_functions(
            tile_m=tm, tile_n=tn, in_flight=0, meta_before_fence=config.meta_before_fence,
            rows_by_warpgroup=nwg > 1)
    consumer_registers = int(min(256, (512 - config.memory_registers) // nwg) // 8 * 8)

    def kernel(a_gmem, meta_gmem, b_gmem, out_gmem):
        def each_tile(body):  # body(local_tile, mi, ni) over this CTA's tiles, in order
            @plgpu.nd_loop((tiles,), collective_axes="sm")
            def _loop(info):
                (lin,) = info.index
                mi, ni = _common.tile_order(config, lin, m_iters, n_iters)
                body(info.local_index, mi, ni)

        def scope(a_smem, meta_smem, b_smem, out_smem, produced, consumed):
            wg = lax.axis_index("wg")

            def producer():
                plgpu.set_max_registers(config.memory_registers, action="decrease")

                def tile(t, mi, ni):
                    @pl.loop(0, k_iters)
                    def _k(ki):
                        g = t * k_iters + ki
                        slot = lax.rem(g, stages)

                        @pl.when(g >= stages)  # the slot's previous k-step is consumed
                        def _wait():
                            plgpu.barrier_wait(consumed.at[slot])

                        done = produced.at[slot]
                        plgpu.copy_gmem_to_smem(
                            a_gmem.at[pl.ds(mi * ctm, ctm), pl.ds(ki * (tk // 2), tk // 2)],
                            a_smem.at[slot], done)
                        plgpu.copy_gmem_to_smem(
                            meta_gmem.at[pl.ds(mi * (ctm // 64), ctm // 64),
                                         pl.ds(ki * META_TILE_WORDS, META_TILE_WORDS)],
                            meta_smem.at[slot], done)
                        plgpu.copy_gmem_to_smem(
                            b_gmem.at[pl.ds(ni * tn, tn), pl.ds(ki * tk, tk)],
                            b_smem.at[slot], done)

                each_tile(tile)
                # Observe the consumers' last releases (the barriers end in a clean state).
                grid_size = lax.axis_size("sm")
                steps = lax.div(tiles - lax.axis_index("sm") + grid_size - 1, grid_size) * k_iters

                @pl.loop(jnp.maximum(steps - stages, 0), steps)
                def _quiesce(g):
                    plgpu.barrier_wait(consumed.at[lax.rem(g, stages)])

            def consumer():
                plgpu.set_max_registers(consumer_registers, action="increase")

                def tile(t, mi, ni):
                    def k_step(ki, acc):
                        slot = lax.rem(t * k_iters + ki, stages)
                        plgpu.barrier_wait(produced.at[slot])
                        a, mt, b = a_smem.at[slot], meta_smem.at[slot], b_smem.at[slot]
                        if branch == "ptx":
                            acc = mma_step(acc, a, mt, b)
                        else:  # interpret-mode emulation: jnp decompress + dot
                            dense = decompress_tile(a[pl.ds(wg * tm, tm)],
                                                    mt[pl.ds(wg * (tm // 64), tm // 64)])
                            acc = acc + lax.dot_general(
                                dense, b[...], (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
                        plgpu.barrier_arrive(consumed.at[slot])
                        return acc

                    init = mma_init() if branch == "ptx" else jnp.zeros((tm, tn), jnp.float32)
                    acc = lax.fori_loop(0, k_iters, k_step, init)
                    if branch == "ptx":
                        acc = mma_finish(acc)
                    _common.store_tile(acc, lambda s: out_smem.at[wg, s], out_gmem,
                                       row0=mi * ctm + wg * tm, col0=ni * tn,
                                       transpose=transpose, epilogue_n=epi_n, slots=slots)

                each_tile(tile)
                plgpu.wait_smem_to_gmem(0)

            lax.cond(wg == nwg, producer, consumer)

        pl.run_scoped(
            scope,
            plgpu.SMEM((stages, ctm, tk // 2), jnp.bfloat16, transforms=TRANSFORMS),
            plgpu.SMEM((stages, ctm // 64, META_TILE_WORDS), jnp.uint32),
            plgpu.SMEM((stages, tn, tk), jnp.bfloat16, transforms=TRANSFORMS),
            plgpu.SMEM((nwg, slots, *_common.epilogue_shape(config, transpose)), jnp.bfloat16),
            plgpu.Barrier(num_arrivals=3, num_barriers=stages),
            plgpu.Barrier(num_arrivals=nwg, num_barriers=stages),
            collective_axes="wg",
        )

    grid = (max(1, min(config.max_ctas or _common.num_sms(), tiles)),)
    f = _common.launch(kernel, out_shape=(n, m) if transpose else (m, n), grid=grid,
                       grid_names=("sm",), num_threads=nwg + 1, interpret=interpret,
                       out_init=out_init)
    return f(values, meta2d, b_t)
