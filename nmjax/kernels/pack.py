"""2:4 packing in the order Hopper's sparse ``wgmma`` reads it.

The sparse instruction computes ``D = A @ B`` with ``A: (rows, K)`` 2:4 sparse
along ``K``. It reads A as ``values: (rows, K/2)`` (the two kept entries of
each group of 4, in ascending position) and per-thread 32-bit metadata
registers. This module builds both from a dense matrix and a mask:

* :func:`pack_rows_24` -- values + 2-bit positions ``(rows, K/2)`` (plain jnp).
* :func:`meta_to_thread_order` -- positions -> ``uint32 (rows/64, K/32, 64)``,
  one word per (64-row block, k32 slice, metadata thread), the order the
  kernel loads its ``sp-meta`` operand in (layout verified on an H100, see
  ``benchmarks/KERNEL_NOTES.md``).
* :func:`pack_weight_24` -- a Flax kernel ``w: (in, out)`` and its forward /
  backward masks -> the A operands of both sparse products of a linear layer:
  ``fwd``: ``Wᵀ (out, in)`` compressed along ``in`` (for ``Yᵀ = Wᵀ·Xᵀ``) and
  ``bwd``: ``W (in, out)`` compressed along ``out`` (for ``dXᵀ = W·dYᵀ``).

Metadata (DESIGN §4): each group of 4 logical K entries gets a nibble holding
two distinct ascending 2-bit positions, lower position in the low bits. A
group with fewer than two kept entries stores explicit zeros at valid,
distinct filler positions (never ``0000/0101/1010/1111``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

M_GROUP = 4  # the hardware's 2:4 group along K
ROWS_PER_BLOCK = 64  # rows of A one m64 wgmma instruction covers
K_PER_INSTR = 32  # logical K one sparse bf16 wgmma instruction covers


def _pair_table() -> np.ndarray:
    """``(16, 2)`` positions chosen for each 4-bit group mask (bit p = kept p).

    Exactly two kept: those two. One kept at ``p``: ``p`` and the lowest other
    position. None: ``(0, 1)``. Three or four (not 2:4): the two lowest kept.
    Always distinct and ascending.
    """
    table = np.zeros((16, 2), np.int32)
    for code in range(16):
        kept = [p for p in range(4) if code >> p & 1]
        fill = [p for p in range(4) if not code >> p & 1]
        pair = (kept + fill)[:2] if len(kept) < 2 else kept[:2]
        table[code] = sorted(pair)
    return table


_PAIRS = _pair_table()


class Packed24(NamedTuple):
    """A 2:4-sparse ``A: (rows, K)`` in the sparse-wgmma operand order.

    values: ``(rows, K/2)`` kept entries (explicit zeros where a group had <2).
    meta: ``uint32 (rows/64, K/32, 64)`` per-thread metadata words.
    """

    values: jax.Array
    meta: jax.Array


def pack_rows_24(a: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Compresses ``a: (rows, K)`` along axis 1 (groups of 4) under a 2:4 mask.

    Args:
      a: ``(rows, K)``, ``K % 4 == 0``.
      mask: bool ``(rows, K)`` with at most two True per group of 4 along axis 1
        (more is not 2:4: only the two lowest kept positions survive).

    Returns:
      ``values: (rows, K/2)`` of ``a``'s dtype and ``positions: int32 (rows, K/2)``
      in ``0..3``, two per group, distinct and ascending.
    """
    rows, k = a.shape
    if k % M_GROUP:
        raise ValueError(f"K={k} must be divisible by {M_GROUP}")
    groups = mask.reshape(rows, k // 4, 4).astype(jnp.int32)
    code = jnp.sum(groups << jnp.arange(4, dtype=jnp.int32), axis=-1)
    pos = jnp.asarray(_PAIRS)[code]  # (rows, K/4, 2)
    masked = jnp.where(mask, a, jnp.zeros((), a.dtype)).reshape(rows, k // 4, 4)
    values = jnp.take_along_axis(masked, pos, axis=-1)
    return values.reshape(rows, k // 2), pos.reshape(rows, k // 2)


def unpack_rows_24(values: jax.Array, positions: jax.Array) -> jax.Array:
    """Inverse of :func:`pack_rows_24`: ``(rows, K/2)`` x2 -> dense ``(rows, K)``."""
    rows, half = values.shape
    vals = values.reshape(rows, half // 2, 2, 1)
    onehot = positions.reshape(rows, half // 2, 2, 1) == jnp.arange(4)
    dense = jnp.sum(jnp.where(onehot, vals, jnp.zeros((), values.dtype)), axis=2)
    return dense.reshape(rows, 2 * half).astype(values.dtype)


def nibbles(positions: jax.Array) -> jax.Array:
    """``(rows, K/2)`` positions -> ``uint32 (rows, K/4)`` nibbles (low index low)."""
    rows, half = positions.shape
    p = positions.reshape(rows, half // 2, 2).astype(jnp.uint32)
    return p[..., 0] | (p[..., 1] << 2)


def meta_to_thread_order(positions: jax.Array) -> jax.Array:
    """Positions ``(rows, K/2)`` -> sparse-wgmma metadata ``uint32 (rows/64, K/32, 64)``.

    For each 64-row block and k32 slice, word ``t = 16*w + 2*g + q`` is the
    ``sp-meta`` register of lane ``4*g + q`` (and ``4*g + 2 + q``) of warp ``w``
    of the warpgroup (sp-sel 0): bits ``[4j, 4j+4)`` hold the nibble of row
    ``16w + g``, group ``4q + j`` of the slice, and bits ``[16+4j, 16+4j+4)``
    the same group of row ``16w + g + 8``.
    """
    rows, half = positions.shape
    k = 2 * half
    if rows % ROWS_PER_BLOCK or k % K_PER_INSTR:
        raise ValueError(f"rows={rows} must divide by 64 and K={k} by 32")
    nib = nibbles(positions)  # (rows, K/4)
    # rows = 64b + 16w + 8h + g ; groups = 8s + 4q + j
    nib = nib.reshape(rows // 64, 4, 2, 8, k // 32, 2, 4)  # b w h g s q j
    u32 = jnp.uint32
    shift = 16 * jnp.arange(2, dtype=u32).reshape(2, 1, 1, 1, 1) + 4 * jnp.arange(4, dtype=u32)
    words = jnp.sum(nib << shift, axis=(2, 6), dtype=u32)  # disjoint bits: sum == or
    return words.transpose(0, 3, 1, 2, 4).reshape(rows // 64, k // 32, 64)


def thread_order_to_positions(meta: jax.Array) -> jax.Array:
    """Inverse of :func:`meta_to_thread_order`: ``(rows/64, K/32, 64)`` -> positions."""
    nb, ns, _ = meta.shape
    words = meta.reshape(nb, ns, 4, 8, 2).transpose(0, 2, 3, 1, 4)  # b w g s q
    u32 = jnp.uint32
    shift = 16 * jnp.arange(2, dtype=u32).reshape(2, 1, 1, 1, 1) + 4 * jnp.arange(4, dtype=u32)
    nib = (words[:, :, None, :, :, :, None] >> shift) & 0xF  # b w h g s q j
    nib = nib.reshape(nb * 64, ns * 8)
    lo = (nib & 3).astype(jnp.int32)
    hi = (nib >> 2).astype(jnp.int32)
    return jnp.stack([lo, hi], axis=-1).reshape(nb * 64, ns * 16)


def pack_24(a: jax.Array, mask: jax.Array) -> Packed24:
    """Packs ``a: (rows, K)`` (2:4 along axis 1) into the sparse-wgmma A operand."""
    values, positions = pack_rows_24(a, mask)
    return Packed24(values, meta_to_thread_order(positions))


def unpack_24(packed: Packed24) -> jax.Array:
    """Dense ``(rows, K)`` from a :class:`Packed24` (``a * mask`` of the packing)."""
    return unpack_rows_24(packed.values, thread_order_to_positions(packed.meta))


class PackedWeight24(NamedTuple):
    """Both sparse A operands of a linear layer with kernel ``w: (in, out)``.

    fwd: ``Wᵀ (out, in)`` compressed along ``in`` -- A of ``Yᵀ = Wᵀ·Xᵀ``.
    bwd: ``W (in, out)`` compressed along ``out`` -- A of ``dXᵀ = W·dYᵀ``;
      ``None`` when only the forward product is sparse.
    """

    fwd: Packed24
    bwd: Packed24 | None


def pack_weight_24(
    w: jax.Array, fwd_mask: jax.Array, bwd_mask: jax.Array | None = None
) -> PackedWeight24:
    """Packs a Flax kernel ``w: (in, out)`` for the forward and input-gradient GEMMs.

    Args:
      w: ``(in, out)``; ``in`` and ``out`` multiples of 64 (and of 32 for K).
      fwd_mask: bool ``(in, out)``, 2:4 along axis 0 (``in``).
      bwd_mask: bool ``(in, out)``, 2:4 along axis 1 (``out``); for a transposable
        mask pass the same mask. ``None`` skips the backward packing.

    Returns:
      A :class:`PackedWeight24`. Jit-able; run it at every mask refresh / step.
    """
    fwd = pack_24(w.T, fwd_mask.T)
    bwd = None if bwd_mask is None else pack_24(w, bwd_mask)
    return PackedWeight24(fwd, bwd)


def from_format(packed) -> Packed24:
    """Converts a canonical 2:4 :class:`nmjax.format.PackedNM` of a 2-D ``(rows, K)``
    array grouped along axis 1 into the sparse-wgmma operand order."""
    from nmjax import format as _format

    if (packed.n, packed.m, packed.axis, len(packed.shape)) != (2, 4, 1, 2):
        raise ValueError("from_format takes a 2-D 2:4 PackedNM grouped along axis 1")
    positions = _format.slot_indices(packed)
    return Packed24(packed.values, meta_to_thread_order(positions))
