"""2:4-sparse x dense GEMM for Hopper (sm_90a) in Pallas Mosaic GPU.

``C = A @ B`` where ``A: (M, K)`` is 2:4 sparse along ``K`` and given packed
(:class:`nmjax.kernels.pack.Packed24`: ``values (M, K/2)`` bf16 +
``meta uint32 (M/64, K/32, 64)``), and ``B`` is given K-major as
``b_t: (N, K)`` -- exactly how activations ``X: (batch, in)`` and output
gradients ``dY: (batch, out)`` are stored, so neither product of a linear layer
needs a transpose of its dense operand:

* forward ``Yᵀ = Wᵀ·Xᵀ``: ``A = Wᵀ`` packed along ``in``, ``b_t = X``;
* input gradient ``dXᵀ = W·dYᵀ``: ``A = W`` packed along ``out``, ``b_t = dY``.

``transpose_out=True`` returns ``Cᵀ: (N, M)`` (``Y`` / ``dX`` directly).

Two branches share the grid, the TMA pipeline, the block indexing and the
epilogue:

* ``"ptx"`` (GPU): ``wgmma.mma_async.sp.sync.aligned.m64nNk32.f32.bf16.bf16``
  emitted through :func:`plgpu.inline_mgpu` (the way
  ``jax.experimental.mosaic.gpu.wgmma`` emits the dense instruction); the
  accumulator is carried through the pipeline as a WGMMA-layout array.
* ``"emulate"`` (tests): the A tile is decompressed from values + metadata with
  jnp ops inside the kernel and fed to the dense :func:`plgpu.wgmma`. It runs
  under Pallas Mosaic GPU interpret mode on a CPU, so everything but the
  sparse instruction itself is tested without a GPU.

:func:`sparse_matmul_24_reference` is the plain-jnp reference of the same function.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from nmjax.kernels import pack as _pack

Branch = Literal["ptx", "emulate"]

_SWIZZLE = 128
_SWIZZLE_ELEMS = _SWIZZLE // 2  # bf16 elements per 128-byte swizzle row
_TRANSFORMS = (plgpu.TilingTransform((8, _SWIZZLE_ELEMS)), plgpu.SwizzleTransform(_SWIZZLE))


@dataclasses.dataclass(frozen=True)
class SparseMatmulConfig:
    """Tiling of :func:`sparse_matmul`.

    tile_m: rows of A / C per block (multiple of 64; one warpgroup covers it).
    tile_n: columns of C per block (multiple of 8, at most 256).
    tile_k: logical K per pipeline step; 128 keeps A's compressed rows at 128 B.
    max_concurrent_steps: TMA pipeline depth.
    """

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 128
    max_concurrent_steps: int = 3
    mma_in_flight: int = 1  # wgmma groups left running across pipeline steps (0 or 1)
    transpose_in_kernel: bool = True  # transpose_out in the epilogue (else an XLA transpose)
    epilogue_n: int = 64  # output columns stored per epilogue step
    # Warp specialisation (v2): one TMA producer warpgroup + ``compute_wgs`` consumer
    # warpgroups, each owning ``tile_m`` rows of a ``compute_wgs * tile_m`` CTA tile
    # (B's tile is shared); persistent grid over the SMs in planar-snake order.
    warp_specialized: bool = False
    compute_wgs: int = 2
    memory_registers: int = 40
    persistent: bool = True  # one CTA per SM looping over tiles (else one CTA per tile)
    grid_minor_dim: int = 1  # planar_snake: 0 = M, 1 = N runs fastest within a band
    grid_tile_width: int = 8  # planar_snake band width (tiles)
    max_ctas: int = 0  # persistent grid size cap (0: the number of SMs)
    grid_order: str = "snake"  # "snake" (plgpu.planar_snake) or "grouped" (branchless)
    # Load the k-step's metadata words before one explicit wgmma.fence (see
    # KERNEL_NOTES: checked with ptxas/nvdisasm, not yet timed on a GPU).
    meta_before_fence: bool = False
    epilogue_slots: int = 1  # warp-specialised epilogue: smem buffers per warpgroup

    @property
    def cta_m(self) -> int:
        """Rows of A / C per CTA."""
        return self.tile_m * (self.compute_wgs if self.warp_specialized else 1)

    def check(self, m: int, n: int, k: int) -> None:
        if self.warp_specialized and self.persistent and self.mma_in_flight:
            # The pipeline never releases the last step's slot with delay_release=1; a
            # persistent CTA's next tile would overwrite it under a running wgmma.
            raise ValueError("warp_specialized + persistent needs mma_in_flight=0")
        if self.tile_m % 64 or self.tile_n % 8 or self.tile_n > 256:
            raise ValueError(f"bad tiles {self}")
        if self.tile_k != 2 * _SWIZZLE_ELEMS:
            raise ValueError(f"tile_k must be {2 * _SWIZZLE_ELEMS} (got {self.tile_k})")
        if self.tile_n % min(self.epilogue_n, self.tile_n):
            raise ValueError(f"tile_n must be a multiple of epilogue_n ({self})")
        if m % self.cta_m or n % self.tile_n or k % self.tile_k:
            raise ValueError(
                f"(M, N, K)=({m}, {n}, {k}) must be multiples of "
                f"({self.cta_m}, {self.tile_n}, {self.tile_k})"
            )


# v1 (one warpgroup per CTA, not persistent): runs any multiple of 128 rows.
FALLBACK_CONFIG = SparseMatmulConfig()


def sparse_matmul_24_reference(
    a: _pack.Packed24, b_t: jax.Array, *, transpose_out: bool = False,
    out_dtype=jnp.bfloat16,
) -> jax.Array:
    """Plain-jnp ``C = unpack(a) @ b_t.T`` (f32 accumulation), ``(M, N)`` or ``Cᵀ``."""
    dense = _pack.unpack_24(a)
    c = jnp.dot(dense, b_t.T, preferred_element_type=jnp.float32).astype(out_dtype)
    return c.T if transpose_out else c


# --------------------------------------------------------------------------- ptx
def _sparse_wgmma_ptx(n: int) -> tuple[str, str, int]:
    """PTX text + constraints of one m64nNk32 sparse bf16 wgmma (f32 acc in place)."""
    num_acc = n // 2
    constraints = ",".join(
        ["=f"] * num_acc + [str(i) for i in range(num_acc)] + ["l", "l", "r"]
    )
    regs = itertools.count()
    acc = "{" + ",".join(f"${next(regs)}" for _ in range(num_acc)) + "}"
    for _ in range(num_acc):  # inputs aliased to the outputs
        next(regs)
    a_desc, b_desc, meta = (f"${next(regs)}" for _ in range(3))
    # sp-sel 0: lanes 0,1 of each quad supply metadata. scale-d 1 (accumulate),
    # scale-a/b 1, trans-a/b 0 (both operands K-major).
    instr = (
        f"wgmma.mma_async.sp.sync.aligned.m64n{n}k32.f32.bf16.bf16 "
        f"{acc}, {a_desc}, {b_desc}, {meta}, 0, 1, 1, 1, 0, 0;"
    )
    return instr, constraints, num_acc


def _ptx_mma_step(config: SparseMatmulConfig):
    """Returns ``acc -> acc + A_tile @ B_tile`` on smem tiles via the sparse PTX."""
    import jax.experimental.mosaic.gpu as mgpu
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import mma_utils
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, llvm, memref, nvvm

    # The package re-exports a function named ``wgmma`` over the module's name.
    mgpu_wgmma = importlib.import_module("jax.experimental.mosaic.gpu.wgmma")
    tile_m, tile_n, tile_k = config.tile_m, config.tile_n, config.tile_k
    # The carry keeps the accumulator in 32-bit registers: no relayout between steps,
    # so ptxas sees plain chained wgmmas and needs no waits between them.
    acc_layout = plgpu.Layout._WGMMA_ACC_32BIT
    in_flight = config.mma_in_flight
    ws = config.warp_specialized

    @plgpu.inline_mgpu(
        arg_types=(acc_layout, plgpu.RefType(_TRANSFORMS), plgpu.RefType(),
                   plgpu.RefType(_TRANSFORMS)),
        return_type=plgpu.ShapeDtypeStruct((tile_m, tile_n), jnp.float32, acc_layout),
    )
    def step(ctx, acc, a_ref, meta_ref, b_ref):
        del ctx
        i32 = ir.IntegerType.get_signless(32)
        i64 = ir.IntegerType.get_signless(64)
        f32 = ir.F32Type.get()
        idx = ir.IndexType.get()

        def c32(x):
            return arith.constant(i32, x)

        def add64(x, off):
            return llvm.add(x, arith.constant(i64, mma_utils.encode_addr(off)),
                            overflow_flags=llvm.IntegerOverflowFlags.none)

        # Tiled smem refs: a (tile_m/8, 1, 8, 64), b (tile_n/8, tile_k/64, 8, 64).
        a_strides, _ = ir.MemRefType(a_ref.type).get_strides_and_offset()
        b_strides, _ = ir.MemRefType(b_ref.type).get_strides_and_offset()
        a_m64_bytes = 2 * a_strides[0] * 8  # 64 rows = 8 row-atoms
        m64_blocks = tile_m // 64
        a_ptr = mgpu.utils.memref_ptr(a_ref)
        if ws:
            # The refs hold the whole CTA tile; compute warpgroup ``wg`` owns rows
            # [wg*tile_m, (wg+1)*tile_m). The offset goes into the smem address before
            # it is encoded (ptxas 13.0 crashes, or miscompiles, on a descriptor with a
            # dynamic term added after encoding); ``wg`` is warp-broadcast (uniform).
            wg = mgpu.utils.warpgroup_idx(sync=True)
            a_ptr = mgpu.utils.getelementptr(
                a_ptr, [arith.muli(wg, c32(m64_blocks * a_m64_bytes))],
                ir.IntegerType.get_signless(8))
            meta_row0 = arith.index_cast(idx, arith.muli(wg, c32(m64_blocks)))
        else:
            meta_row0 = arith.constant(idx, 0)
        a_desc0 = mma_utils.encode_descriptor(
            a_ptr, leading_byte_offset=0, stride_byte_offset=2 * a_strides[0],
            swizzle=_SWIZZLE)
        b_desc0 = mma_utils.encode_descriptor(
            b_ref, leading_byte_offset=0, stride_byte_offset=2 * b_strides[0],
            swizzle=_SWIZZLE)
        b_kgroup_bytes = 2 * b_strides[1]  # next 64 logical K

        tid = mgpu.thread_idx()
        lane = arith.andi(tid, c32(31))
        warp = arith.andi(arith.shrui(tid, c32(5)), c32(3))
        word = arith.addi(
            arith.muli(warp, c32(16)),
            arith.addi(arith.muli(arith.shrui(lane, c32(2)), c32(2)),
                       arith.andi(lane, c32(1))),
        )

        def load_meta(mi, s):
            col = arith.index_cast(idx, arith.addi(word, c32(64 * s)))
            meta_row = arith.addi(meta_row0, arith.constant(idx, mi))
            return memref.load(meta_ref, [meta_row, col])

        metas = {}
        if config.meta_before_fence:
            # All metadata words of the k-step into registers first, then one fence:
            # a register written between two wgmmas makes ptxas inject a
            # warpgroup.arrive before every wgmma (info C7519) and break the chain.
            metas = {(mi, s): load_meta(mi, s)
                     for mi in range(m64_blocks) for s in range(tile_k // 32)}
            llvm.inline_asm(ir.Type.parse("!llvm.void"), [], "wgmma.fence.sync.aligned;",
                            "~{memory}", asm_dialect=0, has_side_effects=True)
        if not in_flight:
            acc = mgpu_wgmma.wgmma_fence(acc)
        regs = acc.registers.copy()
        instr, constraints, num_acc = _sparse_wgmma_ptx(tile_n)
        out_struct = llvm.StructType.get_literal([ir.VectorType.get((1,), f32)] * num_acc)
        for mi in range(tile_m // 64):
            block = regs[mi:mi + 1]
            acc_regs = list(block.flat)
            assert len(acc_regs) == num_acc
            for s in range(tile_k // 32):
                meta = metas[mi, s] if metas else load_meta(mi, s)
                a_desc = add64(a_desc0, mi * a_m64_bytes + 32 * s)
                b_desc = add64(b_desc0, (s // 2) * b_kgroup_bytes + 64 * (s % 2))
                res = llvm.inline_asm(
                    out_struct, [*acc_regs, a_desc, b_desc, meta], instr, constraints,
                    asm_dialect=0, has_side_effects=True)
                acc_regs = [llvm.extractvalue(out_struct.body[0], res, [i])
                            for i in range(num_acc)]
            regs[mi:mi + 1] = jnp_reshape_like(acc_regs, block)
        nvvm.wgmma_commit_group_sync_aligned()
        nvvm.wgmma_wait_group_sync_aligned(in_flight)
        out = fa.FragmentedArray(
            _registers=regs, _layout=fa.WGMMA_LAYOUT_ACC_32BIT, _is_signed=None)
        return out if in_flight else fa.optimization_barrier(out)

    @plgpu.inline_mgpu(
        return_type=plgpu.ShapeDtypeStruct((tile_m, tile_n), jnp.float32, acc_layout))
    def init(ctx):
        del ctx
        zero = arith.constant(ir.F32Type.get(), 0.0)
        acc = fa.FragmentedArray.splat(zero, (tile_m, tile_n), fa.WGMMA_LAYOUT_ACC_32BIT)
        return mgpu_wgmma.wgmma_fence(acc)  # registers written before any wgmma reads them

    @plgpu.inline_mgpu(
        arg_types=(acc_layout,),
        return_type=plgpu.ShapeDtypeStruct((tile_m, tile_n), jnp.float32, plgpu.Layout.WGMMA))
    def finish(ctx, acc):
        del ctx
        nvvm.wgmma_wait_group_sync_aligned(0)
        return fa.optimization_barrier(acc).to_layout(fa.WGMMA_LAYOUT)

    return init, step, finish


def jnp_reshape_like(values, like):
    """Object-array reshape of a list of MLIR values to ``like``'s shape."""
    import numpy as np

    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr.reshape(like.shape)


# ----------------------------------------------------------------------- emulate
def decompress_tile(values: jax.Array, meta_words: jax.Array) -> jax.Array:
    """Dense A tile from ``values (tm, tk/2)`` and ``meta_words (tm/64, tk*2)`` (jnp)."""
    tm, half = values.shape
    positions = _pack.thread_order_to_positions(meta_words.reshape(tm // 64, half // 16, 64))
    return _pack.unpack_rows_24(values, positions)


# ------------------------------------------------------------------------ kernel
def sparse_matmul_24(
    a: _pack.Packed24,
    b_t: jax.Array,
    *,
    config: SparseMatmulConfig = SparseMatmulConfig(),
    transpose_out: bool = False,
    branch: Branch = "ptx",
    interpret: bool | object = False,
) -> jax.Array:
    """``C = A @ b_t.T`` with A 2:4 sparse along K (packed), on Hopper.

    Args:
      a: :class:`Packed24` with ``values: bf16 (M, K/2)``, ``meta: uint32 (M/64, K/32, 64)``.
      b_t: bf16 ``(N, K)`` -- B stored K-major.
      config: tiling; M, N, K must be multiples of its tiles.
      transpose_out: return ``Cᵀ: (N, M)`` instead of ``C: (M, N)``.
      branch: ``"ptx"`` (sparse tensor cores, sm_90a) or ``"emulate"``
        (decompress + dense wgmma; for interpret-mode tests).
      interpret: passed to :func:`plgpu.kernel` (e.g. ``plgpu.InterpretParams()``).

    Returns:
      bf16 ``(M, N)`` (or ``(N, M)``), f32 accumulation.
    """
    values, meta = a
    m, half = values.shape
    k = 2 * half
    n, k2 = b_t.shape
    if k != k2:
        raise ValueError(f"K mismatch: A has {k}, b_t has {k2}")
    if values.dtype != jnp.bfloat16 or b_t.dtype != jnp.bfloat16:
        raise ValueError("sparse_matmul takes bf16 values and b_t")
    if meta.shape != (m // 64, k // 32, 64):
        raise ValueError(f"meta shape {meta.shape} != {(m // 64, k // 32, 64)}")
    config.check(m, n, k)
    tm, tn, tk = config.tile_m, config.tile_n, config.tile_k
    meta2d = meta.reshape(m // 64, 2 * k).astype(jnp.uint32)
    k_iters = k // tk
    out_dtype = jnp.bfloat16

    if config.warp_specialized:
        return _sparse_matmul_24_ws(values, meta2d, b_t, config=config,
                                    transpose_out=transpose_out, branch=branch,
                                    interpret=interpret)

    if branch == "ptx":
        mma_init, mma_step, mma_finish = _ptx_mma_step(config)
    release = config.mma_in_flight if branch == "ptx" else 0

    def kernel(a_gmem, meta_gmem, b_gmem, out_gmem, out_smem):
        mi = lax.axis_index("m")
        ni = lax.axis_index("n")
        in_specs = [
            plgpu.BlockSpec((tm, tk // 2), lambda ki: (0, ki), transforms=_TRANSFORMS,
                            delay_release=release),
            plgpu.BlockSpec((tm // 64, 2 * tk), lambda ki: (0, ki), delay_release=release),
            plgpu.BlockSpec((tn, tk), lambda ki: (0, ki), transforms=_TRANSFORMS,
                            delay_release=release),
        ]
        gmem_args = (
            a_gmem.at[pl.ds(mi * tm, tm)],
            meta_gmem.at[pl.ds(mi * (tm // 64), tm // 64)],
            b_gmem.at[pl.ds(ni * tn, tn)],
        )

        def epilogue(acc):
            # epi_n columns at a time through a small smem buffer: more room for stages.
            for j in range(tn // epi_n):
                cols = slice(j * epi_n, (j + 1) * epi_n)
                n0 = ni * tn + j * epi_n
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # buffer free again
                part = acc[:, cols].astype(out_dtype)
                if t_kernel:  # out_smem: (epi_n, tm); write Cᵀ through a transposed view
                    out_smem.transpose((1, 0))[...] = part
                    dst = out_gmem.at[pl.ds(n0, epi_n), pl.ds(mi * tm, tm)]
                else:
                    out_smem[...] = part
                    dst = out_gmem.at[pl.ds(mi * tm, tm), pl.ds(n0, epi_n)]
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem, dst)
            plgpu.wait_smem_to_gmem(0)

        if branch == "ptx":
            def body(_, a_smem, meta_smem, b_smem, acc):
                return mma_step(acc, a_smem, meta_smem, b_smem)

            acc = plgpu.emit_pipeline(
                body, grid=(k_iters,), in_specs=in_specs,
                max_concurrent_steps=config.max_concurrent_steps, init_carry=mma_init(),
            )(*gmem_args)
            epilogue(mma_finish(acc))
            return

        def scope(acc_ref, dense_smem):
            def body(_, a_smem, meta_smem, b_smem):
                dense_smem[...] = decompress_tile(a_smem[...], meta_smem[...])
                plgpu.commit_smem()
                plgpu.wgmma(acc_ref, dense_smem, b_smem.T)
                plgpu.wgmma_wait(0)

            plgpu.emit_pipeline(
                body, grid=(k_iters,), in_specs=in_specs,
                max_concurrent_steps=config.max_concurrent_steps,
            )(*gmem_args)
            epilogue(acc_ref[...])

        # Register (ACC) and SMEM scopes may not be mixed in one run_scoped.
        pl.run_scoped(
            lambda dense_smem: pl.run_scoped(
                lambda acc_ref: scope(acc_ref, dense_smem), plgpu.ACC((tm, tn), jnp.float32)),
            plgpu.SMEM((tm, tk), jnp.bfloat16, transforms=_TRANSFORMS),
        )

    t_kernel = transpose_out and config.transpose_in_kernel
    epi_n = min(config.epilogue_n, tn)
    f = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((n, m) if t_kernel else (m, n), out_dtype),
        scratch_types=[plgpu.SMEM((epi_n, tm) if t_kernel else (tm, epi_n), out_dtype)],
        grid=(m // tm, n // tn),
        grid_names=("m", "n"),
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=interpret or None,
    )
    c = f(values, meta2d, b_t)
    return c.T if transpose_out and not t_kernel else c


# ------------------------------------------------------- warp-specialised kernel
def _num_sms() -> int:
    """SMs of the default device (132 on an H100 SXM when lowering elsewhere)."""
    try:
        dev = jax.devices()[0]
    except RuntimeError:  # pragma: no cover
        return 132
    return getattr(dev, "core_count", None) if dev.platform == "gpu" else 132


def _grouped_order(lin, m_iters: int, n_iters: int, width: int):
    """Branchless band order: bands of ``width`` M-tiles, M fastest inside a band."""
    band_size = width * n_iters
    band = lax.div(lin, jnp.int32(band_size))
    first_m = band * width
    rows = jnp.minimum(jnp.int32(m_iters) - first_m, jnp.int32(width))
    within = lax.rem(lin, jnp.int32(band_size))
    return first_m + lax.rem(within, rows), lax.div(within, rows)


def _sparse_matmul_24_ws(values, meta2d, b_t, *, config, transpose_out, branch,
                         interpret):
    """v2: a TMA producer warpgroup + ``compute_wgs`` consumer warpgroups.

    CTA tile ``(compute_wgs * tile_m, tile_n)``: the consumer warpgroups share the
    B tile and each own ``tile_m`` rows of A (and of the metadata), carrying their
    ``tile_m x tile_n`` accumulator through the pipeline (``compute_context``). With
    ``persistent`` the grid is one CTA per SM looping over the output tiles in
    planar-snake order (:func:`plgpu.nd_loop`).
    """
    m, half = values.shape
    k = 2 * half
    n = b_t.shape[0]
    tm, tn, tk = config.tile_m, config.tile_n, config.tile_k
    nwg = config.compute_wgs
    ctm = config.cta_m
    m_iters, n_iters, k_iters = m // ctm, n // tn, k // tk
    out_dtype = jnp.bfloat16
    t_kernel = transpose_out and config.transpose_in_kernel
    epi_n = min(config.epilogue_n, tn)
    release = config.mma_in_flight if branch == "ptx" else 0
    if branch == "ptx":
        mma_init, mma_step, mma_finish = _ptx_mma_step(config)

    def get_pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_iters,),
            memory_registers=config.memory_registers,
            in_specs=[
                plgpu.BlockSpec((ctm, tk // 2), lambda ki: (0, ki), transforms=_TRANSFORMS,
                                delay_release=release),
                plgpu.BlockSpec((ctm // 64, 2 * tk), lambda ki: (0, ki),
                                delay_release=release),
                plgpu.BlockSpec((tn, tk), lambda ki: (0, ki), transforms=_TRANSFORMS,
                                delay_release=release),
            ],
            wg_axis="wg",
            num_compute_wgs=nwg,
            max_concurrent_steps=config.max_concurrent_steps,
            compute_context=compute_context,
        )

    def kernel(a_gmem, meta_gmem, b_gmem, out_gmem):
        ignore = lambda *_, **__: None  # noqa: E731  (allocations do not depend on it)
        allocs = get_pipeline(ignore, ignore).get_allocations(a_gmem, meta_gmem, b_gmem)
        slots = config.epilogue_slots
        out_shape = (nwg, slots, epi_n, tm) if t_kernel else (nwg, slots, tm, epi_n)

        def scope(pipeline_allocs, out_smem):
            wg = lax.axis_index("wg")

            def tile(mi, ni):
                row0 = mi * ctm + wg * tm  # this warpgroup's first row of C

                def epilogue(acc):
                    for j in range(tn // epi_n):
                        buf = out_smem.at[wg, j % slots]
                        cols = slice(j * epi_n, (j + 1) * epi_n)
                        n0 = ni * tn + j * epi_n
                        # this slot's previous store has read its buffer
                        plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)
                        part = acc[:, cols].astype(out_dtype)
                        if t_kernel:
                            buf.transpose((1, 0))[...] = part
                            dst = out_gmem.at[pl.ds(n0, epi_n), pl.ds(row0, tm)]
                        else:
                            buf[...] = part
                            dst = out_gmem.at[pl.ds(row0, tm), pl.ds(n0, epi_n)]
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(buf, dst)

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
                        dense = decompress_tile(a, mt)
                        return acc + lax.dot_general(
                            dense, b_smem[...], (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)

                get_pipeline(body, compute_context)(
                    a_gmem.at[pl.ds(mi * ctm, ctm)],
                    meta_gmem.at[pl.ds(mi * (ctm // 64), ctm // 64)],
                    b_gmem.at[pl.ds(ni * tn, tn)],
                    allocations=pipeline_allocs,
                )

            if config.persistent:
                @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
                def _loop(info):
                    (lin,) = info.index
                    if config.grid_order == "snake":
                        mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters),
                                                    config.grid_minor_dim,
                                                    config.grid_tile_width)
                    else:
                        mi, ni = _grouped_order(lin, m_iters, n_iters,
                                                config.grid_tile_width)
                    tile(mi, ni)
            else:
                tile(lax.axis_index("m"), lax.axis_index("n"))
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            scope,
            pipeline_allocs=allocs,
            out_smem=plgpu.SMEM(out_shape, out_dtype),
            collective_axes="wg",
        )

    if config.persistent:
        ctas = config.max_ctas or _num_sms()
        grid, grid_names = (min(ctas, m_iters * n_iters),), ("sm",)
    else:
        grid, grid_names = (m_iters, n_iters), ("m", "n")
    f = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((n, m) if t_kernel else (m, n), out_dtype),
        grid=grid,
        grid_names=grid_names,
        num_threads=nwg + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=interpret or None,
    )
    c = f(values, meta2d, b_t)
    return c.T if transpose_out and not t_kernel else c


__all__ = [
    "SparseMatmulConfig",
    "decompress_tile",
    "sparse_matmul_24",
    "sparse_matmul_24_reference",
]
