"""What the sparse GEMM kernels share: the tuning config, the input block specs, the
epilogue, the launch and the persistent grid's tile orders."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from nmjax.kernels._pack import K_PER_TILE
from nmjax.kernels._wgmma_sp import META_TILE_WORDS, TRANSFORMS

Branch = Literal["ptx", "emulate"]
GRID_ORDERS = ("snake", "grouped")
SMEM_BYTES = 232448  # opt-in shared memory per block on sm_90 (227 KiB)


@dataclasses.dataclass(frozen=True)
class SparseMatmulConfig:
    """Tiling and structure of :func:`nmjax.kernels.sparse_matmul_24`.

    The default is ``v1``: one warpgroup per CTA, one CTA per ``128 x 128`` output tile.

    Attributes:
      tile_m: rows of A / C per compute warpgroup (multiple of 64: one m64 instruction each).
      tile_n: columns of C per CTA (multiple of 8, at most 256: the instruction's N).
      tile_k: logical K per pipeline step; must be 128 (A's compressed rows are 128 bytes,
        and a thread reads a k-tile's metadata in one 16-byte load).
      max_concurrent_steps: pipeline stages in shared memory.
      mma_in_flight: wgmma groups left running across pipeline steps (0 or 1).
      meta_before_fence: load the k-tile's metadata (one 16-byte load per m64 block) before
        one ``wgmma.fence``, so the tile's wgmmas are chained behind one arrive; ``False``
        loads one word before each wgmma (v1 as measured: ptxas fences each).
      transpose_in_kernel: with ``transpose_out``, store ``Cᵀ`` through a transposed smem view
        (else XLA transposes afterwards).
      epilogue_n: output columns stored per epilogue step.
      epilogue_slots: smem buffers per warpgroup in the epilogue (stores overlap with 2).
      warp_specialized: one TMA producer warpgroup and ``compute_wgs`` consumer warpgroups
        splitting M (each ``tile_m`` rows of a ``compute_wgs * tile_m`` CTA tile; B shared).
      compute_wgs: consumer warpgroups (warp-specialised only).
      memory_registers: the producer warpgroup's register budget (``setmaxnreg``).
      persistent: one CTA (or cluster) per SM looping over the output tiles
        (warp-specialised only; v1 runs one CTA per tile).
      grid_order: ``"snake"`` (:func:`plgpu.planar_snake`) or ``"grouped"`` (branchless
        bands of ``grid_tile_width`` M-tiles).
      grid_minor_dim: planar snake: 0 = M, 1 = N runs fastest within a band.
      grid_tile_width: band width in tiles.
      max_ctas: persistent grid size cap (0: the default device's SM count).
      cluster_n: CTAs per cluster along N (1 or 2); with 2 the pair shares its A tile and
        metadata through TMA multicast (each loads half and writes both CTAs' smem).
      pipeline_across_tiles: persistent warp-specialised kernels only: the producer runs on
        into the next tile's loads while the consumers finish the current tile and its
        epilogue, instead of draining the pipeline at every tile. Without a cluster, one
        pipeline spans all of a CTA's (tile, k-tile) steps (slot and barrier phase carried
        across tiles, as CUTLASS's ``PipelineState``), at any K. With ``cluster_n=2`` it uses
        Pallas' pipeline states START / STEADY / STOP: the k-steps per tile must be a
        multiple of ``max_concurrent_steps``, and the grid is capped so that every CTA runs
        at least 2 tiles.
    """

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 128
    max_concurrent_steps: int = 3
    mma_in_flight: int = 1
    meta_before_fence: bool = False
    transpose_in_kernel: bool = True
    epilogue_n: int = 64
    epilogue_slots: int = 1
    warp_specialized: bool = False
    compute_wgs: int = 2
    memory_registers: int = 40
    persistent: bool = True
    grid_order: str = "snake"
    grid_minor_dim: int = 1
    grid_tile_width: int = 8
    max_ctas: int = 0
    cluster_n: int = 1
    pipeline_across_tiles: bool = False

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            want = bool if f.type in ("bool", bool) else int if f.type in ("int", int) else str
            if want is int and (isinstance(v, bool) or not isinstance(v, int)):
                raise TypeError(f"SparseMatmulConfig.{f.name} must be an int, got {v!r}")
            if want is not int and not isinstance(v, want):
                raise TypeError(f"SparseMatmulConfig.{f.name} must be a {want.__name__}, "
                                f"got {v!r}")
        reason = self._config_error()
        if reason:
            raise ValueError(f"invalid SparseMatmulConfig: {reason} ({self})")

    def _config_error(self) -> str | None:
        if self.tile_m < 64 or self.tile_m % 64:
            return f"tile_m={self.tile_m} must be a positive multiple of 64"
        if not 8 <= self.tile_n <= 256 or self.tile_n % 8:
            return f"tile_n={self.tile_n} must be a multiple of 8 in [8, 256]"
        if self.tile_k != K_PER_TILE:
            return f"tile_k must be {K_PER_TILE}, got {self.tile_k}"
        if self.max_concurrent_steps < 2:
            return f"max_concurrent_steps={self.max_concurrent_steps} must be >= 2"
        if self.mma_in_flight not in (0, 1):
            return f"mma_in_flight must be 0 or 1, got {self.mma_in_flight}"
        if self.epilogue_n < 8 or self.epilogue_n % 8 or self.tile_n % min(self.epilogue_n,
                                                                          self.tile_n):
            return (f"epilogue_n={self.epilogue_n} must be a multiple of 8 dividing "
                    f"tile_n={self.tile_n}")
        if self.epilogue_slots not in (1, 2):
            return f"epilogue_slots must be 1 or 2, got {self.epilogue_slots}"
        if self.grid_order not in GRID_ORDERS:
            return f"grid_order must be one of {GRID_ORDERS}, got {self.grid_order!r}"
        if self.grid_minor_dim not in (0, 1) or self.grid_tile_width < 1 or self.max_ctas < 0:
            return "grid_minor_dim must be 0 or 1, grid_tile_width >= 1, max_ctas >= 0"
        if self.cluster_n not in (1, 2):
            return f"cluster_n must be 1 or 2, got {self.cluster_n}"
        if not self.warp_specialized:
            if self.cluster_n != 1 or self.epilogue_slots != 1 or self.pipeline_across_tiles:
                return ("cluster_n > 1, epilogue_slots > 1 and pipeline_across_tiles need "
                        "warp_specialized=True")
            return self._smem_error()
        if self.compute_wgs not in (1, 2):
            return f"compute_wgs must be 1 or 2, got {self.compute_wgs}"
        if not 24 <= self.memory_registers <= 256 or self.memory_registers % 8:
            return f"memory_registers={self.memory_registers} must be a multiple of 8 in [24, 256]"
        if self.persistent and self.mma_in_flight:
            # The pipeline never releases the last step's slot with delay_release=1; a
            # persistent CTA's next tile would overwrite it under a running wgmma.
            return "warp_specialized with persistent=True needs mma_in_flight=0"
        if self.pipeline_across_tiles and not self.persistent:
            return "pipeline_across_tiles needs persistent=True"
        return self._smem_error()

    def _smem_error(self) -> str | None:
        if self.smem_bytes > SMEM_BYTES:
            return f"needs {self.smem_bytes} B of shared memory, more than {SMEM_BYTES}"
        return None

    @property
    def cta_m(self) -> int:
        """Rows of A / C per CTA."""
        return self.tile_m * (self.compute_wgs if self.warp_specialized else 1)

    @property
    def smem_bytes(self) -> int:
        """Shared memory of the pipeline stages and the epilogue buffers (barriers aside)."""
        stage = 2 * self.cta_m * self.tile_k // 2 + 2 * self.tile_n * self.tile_k \
            + 4 * (self.cta_m // 64) * META_TILE_WORDS
        wgs = self.compute_wgs if self.warp_specialized else 1
        epi = 2 * wgs * self.epilogue_slots * self.tile_m * min(self.epilogue_n, self.tile_n)
        return self.max_concurrent_steps * stage + epi

    def shape_error(self, m: int, n: int, k: int) -> str | None:
        """Why ``C (m, n) = A (m, k) @ B`` cannot run with this config (``None``: it can)."""
        cm, cn = self.cta_m, self.tile_n * self.cluster_n
        if m % cm or n % cn or k % self.tile_k:
            return (f"(M, N, K)=({m}, {n}, {k}) must be multiples of ({cm}, {cn}, "
                    f"{self.tile_k}) for this config")
        staged = self.pipeline_across_tiles and self.cluster_n > 1  # Pallas' pipeline states
        if staged and (k // self.tile_k) % self.max_concurrent_steps:
            return (f"pipeline_across_tiles needs K / {self.tile_k} = {k // self.tile_k} "
                    f"k-steps to be a multiple of max_concurrent_steps="
                    f"{self.max_concurrent_steps}")
        if staged and (m // cm) * (n // cn) < 2:
            # Pallas' pipeline states need a START and a STOP tile in every CTA.
            return f"pipeline_across_tiles needs at least 2 output tiles, got (M, N)=({m}, {n})"
        return None

    def check(self, m: int, n: int, k: int) -> None:
        """Raises ValueError when :meth:`shape_error` gives a reason."""
        reason = self.shape_error(m, n, k)
        if reason:
            raise ValueError(reason)


def in_specs(config: SparseMatmulConfig, rows: int, branch: Branch, cluster: bool = False):
    """Block specs of the three inputs per k-tile: compressed A ``(rows, 64)``, its metadata
    ``(rows/64, 256)`` and B ``(tile_n, 128)``. All three land on the same barrier of a
    stage; A and metadata are multicast across the cluster with ``cluster``."""
    release = config.mma_in_flight if branch == "ptx" else 0
    shared = dict(collective_axes=("cluster",)) if cluster else {}
    tk = config.tile_k
    return [
        plgpu.BlockSpec((rows, tk // 2), lambda ki: (0, ki), transforms=TRANSFORMS,
                        delay_release=release, **shared),
        plgpu.BlockSpec((rows // 64, META_TILE_WORDS), lambda ki: (0, ki),
                        delay_release=release, **shared),
        plgpu.BlockSpec((config.tile_n, tk), lambda ki: (0, ki), transforms=TRANSFORMS,
                        delay_release=release),
    ]


def store_tile(acc, bufs, out_gmem, *, row0, col0, transpose: bool, epilogue_n: int,
               slots: int, out_dtype=jnp.bfloat16):
    """Stores one warpgroup's ``(rows, tile_n)`` f32 accumulator to ``out_gmem`` at
    ``(row0, col0)`` (or its transpose at ``(col0, row0)``), ``epilogue_n`` columns at a
    time through the smem buffers ``bufs(j)`` (``slots`` of them in rotation)."""
    rows, tn = acc.shape
    for j in range(tn // epilogue_n):
        buf = bufs(j % slots)
        cols = slice(j * epilogue_n, (j + 1) * epilogue_n)
        n0 = col0 + j * epilogue_n
        plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)  # this slot is free again
        part = acc[:, cols].astype(out_dtype)
        if transpose:  # buf: (epilogue_n, rows); write Cᵀ through a transposed view
            buf.transpose((1, 0))[...] = part
            dst = out_gmem.at[pl.ds(n0, epilogue_n), pl.ds(row0, rows)]
        else:
            buf[...] = part
            dst = out_gmem.at[pl.ds(row0, rows), pl.ds(n0, epilogue_n)]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(buf, dst)


def epilogue_shape(config: SparseMatmulConfig, transpose: bool) -> tuple[int, int]:
    e = min(config.epilogue_n, config.tile_n)
    return (e, config.tile_m) if transpose else (config.tile_m, e)


def launch(kernel, *, out_shape, grid, grid_names, scratch=(), num_threads=None,
           cluster: int = 1, interpret=False, out_init=None):
    """``plgpu.kernel`` in Lane semantics (the inline sparse wgmma and its 32-bit accumulator
    layout are written for it; jax >= 0.12 defaults to Warpgroup semantics).

    With ``out_init`` (bf16 ``out_shape``) the kernel writes into a mutable copy of it, which
    the returned function gives back: entries the kernel never writes keep their value."""
    extra = {}
    if num_threads is not None:
        extra.update(num_threads=num_threads, thread_name="wg")
    if cluster > 1:
        extra.update(cluster=(cluster,), cluster_names=("cluster",))
    out_type = jax.ShapeDtypeStruct(out_shape, jnp.bfloat16)
    f = plgpu.kernel(
        kernel,
        out_type=out_type if out_init is None else (),
        scratch_types=list(scratch),
        grid=grid,
        grid_names=grid_names,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=interpret or None,
        **extra,
    )
    if out_init is None:
        return f
    if (tuple(out_init.shape), out_init.dtype) != (tuple(out_shape), out_type.dtype):
        raise ValueError(f"out_init must be bf16 of shape {tuple(out_shape)}, got "
                         f"{out_init.dtype} {tuple(out_init.shape)}")

    def run(*args):
        out = jax.new_ref(out_init)  # the output operand, aliased: written in place
        f(*args, out)
        return out[...]

    return run


def num_sms() -> int:
    """SMs of the default device (:func:`nmjax.backends.default_device`, which respects
    ``jax.default_device``); 132 (an H100/H200 SXM) when that device is not a GPU, e.g.
    when lowering for CUDA on a CPU machine."""
    from nmjax.backends import default_device

    dev = default_device()
    return int(getattr(dev, "core_count", 0) or 132) if dev.platform == "gpu" else 132


def grouped_order(lin, m_iters: int, n_iters: int, width: int):
    """Branchless band order: bands of ``width`` M-tiles, M fastest inside a band.
    Returns ``(mi, ni)`` for linear tile index ``lin``; a permutation of the tiles."""
    band_size = width * n_iters
    band = lax.div(lin, jnp.int32(band_size))
    first_m = band * width
    rows = jnp.minimum(jnp.int32(m_iters) - first_m, jnp.int32(width))
    within = lax.rem(lin, jnp.int32(band_size))
    return first_m + lax.rem(within, rows), lax.div(within, rows)


def tile_order(config: SparseMatmulConfig, lin, m_iters: int, n_iters: int):
    """``(mi, ni)`` of the persistent loop's ``lin``-th tile in the config's order."""
    if config.grid_order == "snake":
        return plgpu.planar_snake(lin, (m_iters, n_iters), config.grid_minor_dim,
                                  config.grid_tile_width)
    return grouped_order(lin, m_iters, n_iters, config.grid_tile_width)
