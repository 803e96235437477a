"""2:4 packing into the operand order of Hopper's sparse ``wgmma``, on top of :mod:`nmjax.format`.

The sparse instruction computes ``D = A @ B`` with ``A: (rows, K)`` 2:4 sparse along ``K``;
it reads ``values: (rows, K/2)`` (the canonical packed values of :func:`nmjax.format.pack`)
and one 32-bit metadata register per thread. The canonical metadata (one nibble per group
of 4, eight groups per ``uint32`` word, lower index in the low bits) already holds those
bits; this module only moves them to where the kernel's threads read them:

* ``meta: uint32 (rows/64, K/128, 64, 4)``: for each 64-row block ``b`` (one ``m64``
  instruction) and k-tile ``kt`` (128 logical K, one pipeline step), thread word ``t`` holds
  the four ``sp-meta`` registers of its k32 slices ``s = 0..3`` contiguously, so a thread
  reads a whole k-tile's metadata with one 16-byte shared-memory load (as CUTLASS's sm90
  sparse GEMM does).
* Word ``t = 16*w + 2*g + q`` is the register of lanes ``4g + q`` (and ``4g + 2 + q``,
  ignored with sp-sel 0) of warp ``w``: its low half is bits ``[16q, 16q+16)`` of the
  canonical word of row ``64b + 16w + g``, slice ``4kt + s``; its high half the same bits of
  row ``64b + 16w + g + 8`` (the instruction's metadata layout, checked on the GPU by
  ``tests/test_kernels.py``).

Two ways in:

* :func:`pack_24` (any time the mask changes): values + metadata from a dense matrix and a
  2:4 mask, through :func:`nmjax.format.pack`.
* :func:`plan_24` once per mask, then :func:`values_24` per step: with a static mask
  (refreshed every few steps) only the values are gathered per step, from one byte of
  slot code per group.

:func:`pack_weight_24` / :func:`plan_weight_24` + :func:`pack_weight_values_24` do both
products of a linear layer (``Wᵀ`` packed along ``in`` for the forward, ``W`` along ``out``
in Bi-Mask ``perm`` order for the input gradient) from one transposable or Bi-Mask mask
pair in one jitted program.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from nmjax import _checks
from nmjax import format as _format

ROWS_PER_BLOCK = 64  # rows of A one m64 wgmma instruction covers
K_PER_INSTR = 32  # logical K one sparse bf16 wgmma instruction covers
K_PER_TILE = 128  # logical K per pipeline step: 64 stored bf16 = 128-byte rows of A
SLICES_PER_TILE = K_PER_TILE // K_PER_INSTR
THREAD_WORDS = 64  # distinct metadata words per m64 block and k32 slice (sp-sel 0)

_U32 = jnp.uint32


class Packed24(NamedTuple):
    """A 2:4-sparse ``A: (rows, K)`` in the sparse-wgmma operand order.

    values: ``(rows, K/2)`` kept entries, two per group of 4 in ascending position (explicit
      zeros where a group keeps fewer), exactly :func:`nmjax.format.pack`'s values.
    meta: ``uint32 (rows/64, K/128, 64, 4)``: ``[block, k-tile, thread word, k32 slice]``
      (see the module docstring).
    """

    values: jax.Array
    meta: jax.Array


def _check_operand(a: Any, mask: Any, name: str = "a") -> tuple[jax.Array, jax.Array]:
    a = jnp.asarray(a)
    mask = _checks.check_mask(mask, "mask")
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, K), got shape {tuple(a.shape)}")
    if tuple(mask.shape) != tuple(a.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal {name} shape "
                         f"{tuple(a.shape)}")
    check_kernel_shape(a.shape, name)
    return a, mask


def check_kernel_shape(shape: tuple[int, ...], name: str = "a") -> None:
    """Raises ValueError unless ``shape = (rows, K)`` has ``rows % 64 == 0`` (one m64
    instruction) and ``K % 128 == 0`` (one k-tile of 128-byte compressed rows)."""
    rows, k = shape
    if rows % ROWS_PER_BLOCK or k % K_PER_TILE:
        raise ValueError(
            f"{name} has shape (rows, K)={tuple(shape)}; the sparse-wgmma operand needs rows "
            f"a multiple of {ROWS_PER_BLOCK} and K a multiple of {K_PER_TILE}")


# ------------------------------------------------------------------- metadata layout
def canonical_to_wgmma_meta(canon: jax.Array) -> jax.Array:
    """Canonical 2:4 metadata ``uint32 (rows, K/32)`` (:class:`nmjax.format.PackedNM` of a
    ``(rows, K)`` matrix grouped along axis 1) -> ``uint32 (rows/64, K/128, 64, 4)``.

    A pure permutation of 16-bit halves (module docstring); jit-able, no gathers.
    """
    rows, words = canon.shape
    check_kernel_shape((rows, 32 * words), "the metadata's matrix")
    c = canon.astype(_U32).reshape(rows // 64, 4, 2, 8, words // 4, 4)  # b w h g kt s
    halves = jnp.stack([c & 0xFFFF, c >> 16], axis=-1)  # ... q: which 16 bits of the row
    word = halves[:, :, 0] | (halves[:, :, 1] << 16)  # b w g kt s q: rows g and g+8
    return word.transpose(0, 3, 1, 2, 5, 4).reshape(rows // 64, words // 4, 64, 4)


def wgmma_to_canonical_meta(meta: jax.Array) -> jax.Array:
    """Inverse of :func:`canonical_to_wgmma_meta`: ``(rows/64, K/128, 64, 4)`` ->
    ``uint32 (rows, K/32)``."""
    blocks, tiles, t, s = meta.shape
    if (t, s) != (THREAD_WORDS, SLICES_PER_TILE):
        raise ValueError(f"meta must have shape (rows/64, K/128, 64, 4), got {meta.shape}")
    m = meta.astype(_U32).reshape(blocks, tiles, 4, 8, 2, 4)  # b kt w g q s
    halves = jnp.stack([m & 0xFFFF, m >> 16], axis=-1)  # ... h: row g or g+8
    canon = halves[:, :, :, :, 0] | (halves[:, :, :, :, 1] << 16)  # b kt w g s h
    return canon.transpose(0, 2, 5, 3, 1, 4).reshape(64 * blocks, 4 * tiles)


class _IntOps:
    """Plain Python ints for :func:`meta_read_index` (the kernel passes MLIR ``arith`` ops)."""

    @staticmethod
    def add(x, y):
        return x + y

    @staticmethod
    def mul(x, y):
        return x * y

    @staticmethod
    def shr(x, y):
        return x >> y

    @staticmethod
    def band(x, y):
        return x & y


def meta_read_index(wg, mi, warp, lane, *, m64_blocks: int, ops=_IntOps):
    """Where a thread of the sparse-wgmma kernel reads its metadata: ``(row, col)`` into one
    k-tile's metadata ``uint32 (rows/64, 256)`` (``[block, 4 * thread word + slice]``); the
    thread's word of slice ``s`` is at ``(row, col + s)``, so the four words of a k-tile are
    one 16-byte load.

    The one definition of the PTX branch's metadata indexing: the kernel calls it with MLIR
    ``arith`` operations as ``ops`` (values in registers), the tests with Python ints, so a
    change to the kernel's indexing is a change here and is tested without a GPU.

    >>> meta_read_index(1, 0, 3, 6, m64_blocks=2)     # warpgroup 1, warp 3, lane 6 (g=1, q=0)
    (2, 200)

    Args:
      wg: the thread's consumer warpgroup (0 when one warpgroup holds the whole tile).
      mi: the m64 block within the warpgroup's ``tile_m`` rows.
      warp: the warp within the warpgroup (0..3): rows ``16 * warp ..`` of the block.
      lane: the lane (0..31): ``g = lane >> 2``, ``q = lane & 1``; lanes ``4g + 2 + q`` read
        the same word as ``4g + q`` (ignored by the instruction with sp-sel 0).
      m64_blocks: m64 blocks per warpgroup (``tile_m / 64``).
      ops: ``add``, ``mul``, ``shr``, ``band`` on the argument type (ints by default).

    Returns:
      ``(row, col)``: metadata block ``wg * m64_blocks + mi``, column ``4 * (16 * warp +
      2 * g + q)``.
    """
    word = ops.add(ops.add(ops.mul(warp, 16), ops.mul(ops.shr(lane, 2), 2)), ops.band(lane, 1))
    row = ops.add(ops.mul(wg, m64_blocks), mi)
    return row, ops.mul(word, SLICES_PER_TILE)


def _canonical(values: jax.Array, meta: jax.Array) -> _format.PackedNM:
    rows, half = values.shape
    return _format.PackedNM(values, wgmma_to_canonical_meta(meta), 2, 4, 1, (rows, 2 * half))


# ---------------------------------------------------------------------------- packing
def pack_24(a: Any, mask: Any) -> Packed24:
    """Packs ``a: (rows, K)``, 2:4 along axis 1, into the sparse-wgmma A operand.

    >>> import jax.numpy as jnp
    >>> from nmjax.masks import nm_mask
    >>> a = jnp.arange(64 * 128, dtype=jnp.float32).reshape(64, 128) % 7 - 3
    >>> packed = pack_24(a, nm_mask(jnp.abs(a), 2, 4, axis=1))
    >>> packed.values.shape, packed.meta.shape
    ((64, 64), (1, 1, 64, 4))

    Args:
      a: ``(rows, K)``, ``rows % 64 == 0``, ``K % 128 == 0``, any dtype (the kernel takes bf16).
      mask: bool ``(rows, K)``, at most two kept per group of 4 along axis 1 (checked when
        concrete, see :func:`nmjax.format.pack`).

    Returns:
      :class:`Packed24`. Jit-able.
    """
    a, mask = _check_operand(a, mask)
    canon = _format.pack(a, mask, 2, 4, axis=1)
    return Packed24(canon.values, canonical_to_wgmma_meta(canon.meta))


def unpack_24(packed: Packed24) -> jax.Array:
    """Dense ``(rows, K)`` of a :class:`Packed24`: ``a ⊙ mask`` of the packing."""
    return _format.unpack(_canonical(*packed))


def from_format(packed: _format.PackedNM) -> Packed24:
    """A canonical 2:4 :class:`nmjax.format.PackedNM` of a 2-D ``(rows, K)`` array grouped
    along axis 1 -> :class:`Packed24` (the values are shared, the metadata permuted)."""
    if (packed.n, packed.m, packed.axis, len(packed.shape)) != (2, 4, 1, 2):
        raise ValueError(f"from_format takes a 2-D 2:4 PackedNM grouped along axis 1, got "
                         f"n={packed.n}, m={packed.m}, axis={packed.axis}, "
                         f"shape={packed.shape}")
    check_kernel_shape(packed.shape, "the packed matrix")
    return Packed24(packed.values, canonical_to_wgmma_meta(packed.meta))


def forward_operand(packed: _format.PackedNM) -> Packed24:
    """The sparse-wgmma A operand of the product that contracts a 2-D 2:4 weight's grouped
    axis, straight from its canonical packed form: no dense weight, no gather.

    * grouped along axis 1 (``(out, in)``, e.g. GPT-2's ``FlaxConv1D`` kernel): A is the
      matrix itself (:func:`from_format`);
    * grouped along axis 0 (a Flax ``Dense`` kernel ``(in, out)``): A is ``Wᵀ (out, in)``,
      the forward's ``Yᵀ = Wᵀ·Xᵀ``. The canonical format packs the same slots along the
      grouped axis whichever axis it is, so ``values.T`` and ``meta.T`` are ``Wᵀ``'s
      canonical values and metadata.

    Either way a transpose and the metadata's permutation of 16-bit halves
    (:func:`canonical_to_wgmma_meta`): equal, bit for bit, to :func:`pack_24` of the dense
    masked ``Wᵀ`` (tested).

    >>> import jax, jax.numpy as jnp
    >>> from nmjax import format as nmf
    >>> from nmjax.masks import nm_mask
    >>> w = jax.random.normal(jax.random.key(0), (128, 64))      # (in, out), 2:4 along in
    >>> mask = nm_mask(jnp.abs(w), 2, 4, axis=0)
    >>> a = forward_operand(nmf.pack(w, mask, 2, 4, axis=0))
    >>> ref = pack_24(w.T, mask.T)
    >>> bool((a.values == ref.values).all() and (a.meta == ref.meta).all())
    True

    Raises:
      ValueError: not a 2-D 2:4 :class:`~nmjax.format.PackedNM`, or a shape the kernel's
        operand cannot take (``(out, in)`` must be multiples of ``(64, 128)``).
    """
    if not isinstance(packed, _format.PackedNM):
        raise TypeError(f"packed must be an nmjax.format.PackedNM, got {type(packed).__name__}")
    if (packed.n, packed.m, len(packed.shape)) != (2, 4, 2) or packed.axis not in (0, 1):
        raise ValueError(f"forward_operand takes a 2-D 2:4 PackedNM, got n={packed.n}, "
                         f"m={packed.m}, axis={packed.axis}, shape={packed.shape}")
    if packed.axis == 0:
        rows, k = packed.shape[1], packed.shape[0]
        packed = _format.PackedNM(packed.values.T, packed.meta.T, 2, 4, 1, (rows, k))
    return from_format(packed)


# ------------------------------------------------------------- static masks: plan once
class Plan24(NamedTuple):
    """What a static 2:4 mask of ``(rows, K)`` fixes: everything but the values.

    meta: ``uint32 (rows/64, K/128, 64, 4)``, as in :class:`Packed24`.
    slots: ``uint8 (rows, K/4)``, one code per group: bits 0-1 the first slot's position,
      bits 2-3 the second's (ascending), bit 4 / bit 5 set when that slot holds a kept entry
      (else it stores an explicit zero).
    """

    meta: jax.Array
    slots: jax.Array


def plan_24(mask: Any) -> Plan24:
    """The :class:`Plan24` of a 2:4 mask ``(rows, K)`` grouped along axis 1.

    Built by packing the mask itself with :func:`nmjax.format.pack`: the packed "values"
    are the kept flags of the slots. Run at every mask refresh.
    """
    mask = _checks.check_mask(mask, "mask")
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (rows, K), got shape {tuple(mask.shape)}")
    check_kernel_shape(mask.shape, "mask")
    canon = _format.pack(mask, mask, 2, 4, axis=1)
    pos = _format.slot_indices(canon).astype(jnp.uint8)  # (rows, K/2)
    kept = canon.values.astype(jnp.uint8)
    slots = (pos[:, 0::2] | (pos[:, 1::2] << 2) | (kept[:, 0::2] << 4)
             | (kept[:, 1::2] << 5))
    return Plan24(canonical_to_wgmma_meta(canon.meta), slots.astype(jnp.uint8))


def values_24(a: jax.Array, slots: jax.Array) -> jax.Array:
    """The packed values of ``a: (rows, K)`` under a plan's ``slots: uint8 (rows, K/4)``:
    ``(rows, K/2)``, equal to :func:`pack_24`'s. Elementwise selects only (no sort, no
    gather op), so XLA fuses it into one pass over ``a``."""
    rows, k = a.shape
    if tuple(slots.shape) != (rows, k // 4) or k % 4:
        raise ValueError(f"slots shape {tuple(slots.shape)} must be (rows, K/4) = "
                         f"{(rows, k // 4)} for a of shape {tuple(a.shape)}")
    groups = a.reshape(rows, k // 4, 4)
    zero = jnp.zeros((), a.dtype)

    def pick(pos, kept):
        v = jnp.where(pos == 0, groups[..., 0],
                      jnp.where(pos == 1, groups[..., 1],
                                jnp.where(pos == 2, groups[..., 2], groups[..., 3])))
        return jnp.where(kept != 0, v, zero)

    s = slots.astype(jnp.int32)
    lo = pick(s & 3, s & 16)
    hi = pick((s >> 2) & 3, s & 32)
    return jnp.stack([lo, hi], axis=-1).reshape(rows, k // 2)


# ------------------------------------------------------------------- a linear layer
class PackedWeight24(NamedTuple):
    """Both sparse A operands of a linear layer with kernel ``w: (in, out)``.

    fwd: ``Wᵀ (out, in)`` compressed along ``in`` -- A of ``Yᵀ = Wᵀ·Xᵀ``.
    bwd: ``W[:, perm] (in, out)`` compressed along ``out`` -- A of ``dXᵀ = W·dYᵀ`` (columns
      in Bi-Mask ``perm`` order when one is given).
    """

    fwd: Packed24
    bwd: Packed24


class WeightPlan24(NamedTuple):
    """The static part of :class:`PackedWeight24` for fixed masks (see :func:`plan_weight_24`).

    fwd, bwd: :class:`Plan24` of ``fwd_maskᵀ (out, in)`` and ``bwd_mask[:, perm] (in, out)``.
    perm: ``(out,)`` int32 Bi-Mask permutation, or ``None``.
    """

    fwd: Plan24
    bwd: Plan24
    perm: jax.Array | None


def _layer_masks(w_shape, fwd_mask, bwd_mask, perm):
    fwd_mask = _checks.check_mask(fwd_mask, "fwd_mask")
    bwd_mask = fwd_mask if bwd_mask is None else _checks.check_mask(bwd_mask, "bwd_mask")
    for name, m in (("fwd_mask", fwd_mask), ("bwd_mask", bwd_mask)):
        if tuple(m.shape) != tuple(w_shape):
            raise ValueError(f"{name} has shape {tuple(m.shape)}, but w has shape "
                             f"{tuple(w_shape)}")
    if len(w_shape) != 2:
        raise ValueError(f"w must be 2-D (in, out), got shape {tuple(w_shape)}")
    n_in, n_out = w_shape
    check_kernel_shape((n_out, n_in), "w.T (out, in)")
    check_kernel_shape((n_in, n_out), "w (in, out)")
    if perm is not None:
        perm = _checks.check_perm(perm, n_out)
        bwd_mask = bwd_mask[:, perm]
    return fwd_mask, bwd_mask, perm


def pack_weight_24(w: Any, fwd_mask: Any, bwd_mask: Any = None,
                   perm: Any = None) -> PackedWeight24:
    """Packs a Flax kernel ``w: (in, out)`` for the forward and input-gradient GEMMs.

    >>> import jax, jax.numpy as jnp
    >>> from nmjax.masks import transposable_mask
    >>> w = jax.random.normal(jax.random.key(0), (128, 256))
    >>> packed = pack_weight_24(w, transposable_mask(jnp.abs(w), 2, 4))
    >>> packed.fwd.values.shape, packed.bwd.values.shape
    ((256, 64), (128, 128))

    Args:
      w: ``(in, out)``; ``in`` and ``out`` multiples of 128.
      fwd_mask: bool ``(in, out)``, 2:4 along axis 0 (``in``).
      bwd_mask: bool ``(in, out)``, 2:4 along axis 1 (``out``, in ``perm`` order when given);
        ``None``: ``fwd_mask`` (a transposable mask, 2:4 along both axes).
      perm: optional ``(out,)`` Bi-Mask permutation of ``out``.

    Returns:
      A :class:`PackedWeight24`. Jit-able; with masks that change every step, run it every
      step (else :func:`plan_weight_24` once and :func:`pack_weight_values_24` per step).
    """
    w = jnp.asarray(w)
    fwd_mask, bwd_mask, perm = _layer_masks(w.shape, fwd_mask, bwd_mask, perm)
    wb = w if perm is None else w[:, perm]
    return PackedWeight24(pack_24(w.T, fwd_mask.T), pack_24(wb, bwd_mask))


def plan_weight_24(fwd_mask: Any, bwd_mask: Any = None, perm: Any = None) -> WeightPlan24:
    """The :class:`WeightPlan24` of a layer's masks (arguments as in :func:`pack_weight_24`);
    run at every mask refresh."""
    fwd_mask = _checks.check_mask(fwd_mask, "fwd_mask")
    fwd_mask, bwd_mask, perm = _layer_masks(fwd_mask.shape, fwd_mask, bwd_mask, perm)
    return WeightPlan24(plan_24(fwd_mask.T), plan_24(bwd_mask), perm)


def pack_weight_values_24(w: jax.Array, plan: WeightPlan24) -> PackedWeight24:
    """:func:`pack_weight_24` for static masks: only the values are gathered (one fused
    elementwise pass per operand); the metadata comes from ``plan``.

    >>> import jax, jax.numpy as jnp
    >>> from nmjax.masks import transposable_mask
    >>> w = jax.random.normal(jax.random.key(0), (128, 256))
    >>> mask = transposable_mask(jnp.abs(w), 2, 4)
    >>> plan = plan_weight_24(mask)                     # at each mask refresh
    >>> fast = pack_weight_values_24(w, plan)           # every step
    >>> bool((fast.fwd.values == pack_weight_24(w, mask).fwd.values).all())
    True
    """
    n_in, n_out = w.shape
    if tuple(plan.fwd.slots.shape) != (n_out, n_in // 4):
        raise ValueError(f"the plan is for a kernel of shape (in, out)="
                         f"{(4 * plan.fwd.slots.shape[1], plan.fwd.slots.shape[0])}, "
                         f"w has shape {tuple(w.shape)}")
    wb = w if plan.perm is None else w[:, plan.perm]
    return PackedWeight24(Packed24(values_24(w.T, plan.fwd.slots), plan.fwd.meta),
                          Packed24(values_24(wb, plan.bwd.slots), plan.bwd.meta))


# ------------------------------------------------------------- inside the emulation kernel
def decompress_tile(values: jax.Array, meta_tile: jax.Array) -> jax.Array:
    """Dense A tile ``(tm, 128)`` from ``values (tm, 64)`` and one k-tile of metadata
    ``(tm/64, 256)`` (``[block, 4 * thread word + slice]``) -- the emulation branch's
    decompression (plain jnp, runs in Pallas interpret mode)."""
    tm = values.shape[0]
    meta = meta_tile.reshape(tm // 64, 1, THREAD_WORDS, SLICES_PER_TILE)
    return unpack_24(Packed24(values, meta))
