"""One k-tile of Hopper's sparse ``wgmma`` as inline PTX inside a Pallas Mosaic GPU kernel.

Pallas Mosaic GPU has no sparse wgmma on Hopper, so :func:`mma_functions` emits
``wgmma.mma_async.sp.sync.aligned.m64nNk32.f32.bf16.bf16`` through :func:`plgpu.inline_mgpu`
(the way ``jax.experimental.mosaic.gpu.wgmma`` emits the dense instruction) and carries the
``f32`` accumulator through the pipeline as a 32-bit WGMMA-layout array.

Per k-tile (128 logical K, 4 k32 slices) and m64 block a thread needs four metadata words.
With ``meta_before_fence`` it reads them with one 16-byte load (``LDS.128``) per m64 block,
all before one ``wgmma.fence``, so the tile's wgmmas are chained behind a single
``WARPGROUP.ARRIVE``; without it a scalar load precedes each wgmma, which makes ptxas insert
an arrive before every instruction (ptxas warning C7519).
"""

from __future__ import annotations

import importlib
import itertools

import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import mosaic_gpu as plgpu

from nmjax.kernels._pack import (
    K_PER_INSTR,
    K_PER_TILE,
    SLICES_PER_TILE,
    THREAD_WORDS,
    meta_read_index,
)

SWIZZLE = 128
SWIZZLE_ELEMS = SWIZZLE // 2  # bf16 per 128-byte swizzle row
TRANSFORMS = (plgpu.TilingTransform((8, SWIZZLE_ELEMS)), plgpu.SwizzleTransform(SWIZZLE))
META_TILE_WORDS = THREAD_WORDS * SLICES_PER_TILE  # uint32 per m64 block and k-tile


def sparse_wgmma_ptx(n: int) -> tuple[str, str, int]:
    """PTX text, operand constraints and accumulator count of one m64nNk32 sparse bf16
    wgmma accumulating in place into ``N/2`` f32 registers per thread."""
    num_acc = n // 2
    constraints = ",".join(
        ["=f"] * num_acc + [str(i) for i in range(num_acc)] + ["l", "l", "r"])
    regs = itertools.count()
    acc = "{" + ",".join(f"${next(regs)}" for _ in range(num_acc)) + "}"
    for _ in range(num_acc):  # inputs aliased to the outputs
        next(regs)
    a_desc, b_desc, meta = (f"${next(regs)}" for _ in range(3))
    # sp-sel 0: lanes 0,1 of each quad supply metadata. scale-d 1 (accumulate),
    # scale-a/b 1, trans-a/b 0 (both operands K-major).
    instr = (f"wgmma.mma_async.sp.sync.aligned.m64n{n}k32.f32.bf16.bf16 "
             f"{acc}, {a_desc}, {b_desc}, {meta}, 0, 1, 1, 1, 0, 0;")
    return instr, constraints, num_acc


class _ArithOps:
    """:func:`meta_read_index`'s operations on ``i32`` MLIR values (ints folded in Python)."""

    def __init__(self, c32):
        from jaxlib.mlir.dialects import arith

        self._arith, self._c32 = arith, c32

    def as_value(self, x):
        return self._c32(x) if isinstance(x, int) else x

    def _op(self, py, name, x, y):
        if isinstance(x, int) and isinstance(y, int):
            return py(x, y)
        return getattr(self._arith, name)(self.as_value(x), self.as_value(y))

    def add(self, x, y):
        return x if isinstance(y, int) and y == 0 else self._op(int.__add__, "addi", x, y)

    def mul(self, x, y):
        return self._op(int.__mul__, "muli", x, y)

    def shr(self, x, y):
        return self._op(int.__rshift__, "shrui", x, y)

    def band(self, x, y):
        return self._op(int.__and__, "andi", x, y)


def _object_array(values, shape):
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr.reshape(shape)


def mma_functions(*, tile_m: int, tile_n: int, in_flight: int, meta_before_fence: bool,
                  rows_by_warpgroup: bool):
    """``(init, step, finish)`` for a ``tile_m x tile_n`` f32 accumulator of one warpgroup.

    ``step(acc, a_smem, meta_smem, b_smem)`` adds one k-tile's ``A @ B``: ``a_smem`` the
    compressed A tile (``(rows, 64)`` bf16, 128-byte swizzle), ``meta_smem`` its metadata
    (``(rows/64, 256)`` uint32 in :mod:`nmjax.kernels._pack`'s order), ``b_smem`` B K-major
    (``(tile_n, 128)`` bf16, 128-byte swizzle). With ``rows_by_warpgroup`` the A and metadata
    refs hold a whole CTA tile and compute warpgroup ``wg`` uses its rows
    ``[wg * tile_m, (wg + 1) * tile_m)``. ``in_flight``: wgmma groups left running when the
    step returns (0 or 1).
    """
    import jax.experimental.mosaic.gpu as mgpu
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import mma_utils
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, llvm, memref, nvvm

    # The package re-exports a function named ``wgmma`` over the module's name.
    mgpu_wgmma = importlib.import_module("jax.experimental.mosaic.gpu.wgmma")
    m64_blocks = tile_m // 64
    acc_layout = plgpu.Layout._WGMMA_ACC_32BIT
    acc_type = plgpu.ShapeDtypeStruct((tile_m, tile_n), jnp.float32, acc_layout)

    @plgpu.inline_mgpu(
        arg_types=(acc_layout, plgpu.RefType(TRANSFORMS), plgpu.RefType(),
                   plgpu.RefType(TRANSFORMS)),
        return_type=acc_type,
    )
    def step(ctx, acc, a_ref, meta_ref, b_ref):
        del ctx
        i32 = ir.IntegerType.get_signless(32)
        i64 = ir.IntegerType.get_signless(64)
        i8 = ir.IntegerType.get_signless(8)
        f32 = ir.F32Type.get()
        idx = ir.IndexType.get()

        def c32(x):
            return arith.constant(i32, x)

        def add64(x, off):
            return llvm.add(x, arith.constant(i64, mma_utils.encode_addr(off)),
                            overflow_flags=llvm.IntegerOverflowFlags.none)

        # Tiled smem refs: a (rows/8, 1, 8, 64), b (tile_n/8, tile_k/64, 8, 64).
        a_strides, _ = ir.MemRefType(a_ref.type).get_strides_and_offset()
        b_strides, _ = ir.MemRefType(b_ref.type).get_strides_and_offset()
        a_m64_bytes = 2 * a_strides[0] * 8  # 64 rows = 8 row-atoms
        a_ptr = mgpu.utils.memref_ptr(a_ref)
        meta_ptr = mgpu.utils.memref_ptr(meta_ref)
        if rows_by_warpgroup:
            # The offset goes into the smem address before it is encoded: ptxas 13.0
            # crashes (or miscompiles) on a descriptor with a dynamic term added after
            # encoding. ``wg`` is warp-broadcast (uniform).
            wg = mgpu.utils.warpgroup_idx(sync=True)
            a_ptr = mgpu.utils.getelementptr(
                a_ptr, [arith.muli(wg, c32(m64_blocks * a_m64_bytes))], i8)
        else:
            wg = 0
        a_desc0 = mma_utils.encode_descriptor(
            a_ptr, leading_byte_offset=0, stride_byte_offset=2 * a_strides[0],
            swizzle=SWIZZLE)
        b_desc0 = mma_utils.encode_descriptor(
            b_ref, leading_byte_offset=0, stride_byte_offset=2 * b_strides[0],
            swizzle=SWIZZLE)
        b_kgroup_bytes = 2 * b_strides[1]  # next 64 logical K

        tid = mgpu.thread_idx()
        lane = arith.andi(tid, c32(31))
        warp = arith.andi(arith.shrui(tid, c32(5)), c32(3))
        ops = _ArithOps(c32)

        def meta_index(mi):  # [block, 4 * word]: the thread's k-tile words (shared with tests)
            return meta_read_index(wg, mi, warp, lane, m64_blocks=m64_blocks, ops=ops)

        def load_meta_scalar(mi, s):
            row, col = meta_index(mi)
            return memref.load(meta_ref, [arith.index_cast(idx, ops.as_value(row)),
                                          arith.index_cast(idx, ops.add(col, s))])

        def load_meta_vector(mi):
            # One 16-byte load: the 4 slices' words are contiguous and 16-byte aligned.
            row, col = meta_index(mi)
            offset = ops.add(ops.mul(row, META_TILE_WORDS), col)  # in uint32 elements
            ptr = mgpu.utils.getelementptr(meta_ptr, [ops.as_value(offset)], i32)
            vec = llvm.load(ir.VectorType.get((SLICES_PER_TILE,), i32), ptr, alignment=16)
            return [llvm.extractelement(vec, c32(s)) for s in range(SLICES_PER_TILE)]

        metas = {}
        if meta_before_fence:
            # Every metadata register of the tile before one fence: a register written
            # between two wgmmas makes ptxas put a warpgroup.arrive before each (C7519).
            for mi in range(m64_blocks):
                for s, v in enumerate(load_meta_vector(mi)):
                    metas[mi, s] = v
            if not in_flight:  # accumulator registers settled before the fence
                acc = fa.optimization_barrier(acc)
            # The memory clobber keeps the loads above the fence (one arrive in SASS).
            llvm.inline_asm(ir.Type.parse("!llvm.void"), [], "wgmma.fence.sync.aligned;",
                            "~{memory}", asm_dialect=0, has_side_effects=True)
        elif not in_flight:
            acc = mgpu_wgmma.wgmma_fence(acc)
        regs = acc.registers.copy()
        instr, constraints, num_acc = sparse_wgmma_ptx(tile_n)
        out_struct = llvm.StructType.get_literal([ir.VectorType.get((1,), f32)] * num_acc)
        for mi in range(m64_blocks):
            block = regs[mi:mi + 1]
            acc_regs = list(block.flat)
            assert len(acc_regs) == num_acc
            for s in range(K_PER_TILE // K_PER_INSTR):
                meta = metas[mi, s] if metas else load_meta_scalar(mi, s)
                a_desc = add64(a_desc0, mi * a_m64_bytes + 32 * s)  # 16 stored bf16
                b_desc = add64(b_desc0, (s // 2) * b_kgroup_bytes + 64 * (s % 2))
                res = llvm.inline_asm(
                    out_struct, [*acc_regs, a_desc, b_desc, meta], instr, constraints,
                    asm_dialect=0, has_side_effects=True)
                acc_regs = [llvm.extractvalue(out_struct.body[0], res, [i])
                            for i in range(num_acc)]
            regs[mi:mi + 1] = _object_array(acc_regs, block.shape)
        nvvm.wgmma_commit_group_sync_aligned()
        nvvm.wgmma_wait_group_sync_aligned(in_flight)
        out = fa.FragmentedArray(
            _registers=regs, _layout=fa.WGMMA_LAYOUT_ACC_32BIT, _is_signed=None)
        return out if in_flight else fa.optimization_barrier(out)

    @plgpu.inline_mgpu(return_type=acc_type)
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
