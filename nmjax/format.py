"""The canonical packed N:M format: kept values plus bit-packed in-group indices.

Layout, for a weight grouped along ``axis`` with groups of ``m`` (``G = K / m`` groups):

* ``values``: the weight's shape with ``axis`` of length ``G * n``. Group ``g`` owns slots
  ``g*n .. g*n+n-1``, holding its kept entries in ascending in-group index. A group with
  fewer than ``n`` kept entries fills the spare slots with explicit zeros at the smallest
  unused indices, so every group always names ``n`` distinct ascending indices (what the
  sparse tensor cores require: a repeated index is undefined behaviour there).
* ``meta``: ``uint32``, the in-group index of each slot as a ``b``-bit field,
  ``b = 1, 2 or 4`` (the smallest power of two with ``2**b >= m``), packed along ``axis``
  little-endian: slot ``t`` (counting along the axis) sits in word ``t // (32 // b)`` at
  bit ``b * (t % (32 // b))``. For 2:4 this is one nibble per group, lower index in the low
  bits: the order of the hardware's metadata before any kernel-specific tiling.

Kernels reorder ``meta`` for their own instruction layouts (``nmjax.kernels``); this format
is the reference they are tested against.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from nmjax import _checks
from nmjax._layout import from_groups, to_groups
from nmjax.masks import is_nm

MAX_M = _checks.MAX_M  # 4-bit indices


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedNM:
    """A weight in the canonical packed N:M format (see the module docstring).

    Attributes:
      values: kept values, ``shape`` with ``axis`` of length ``shape[axis] * n // m``.
      meta: ``uint32`` bit-packed in-group indices along ``axis``.
      n, m, axis, shape: the pattern, the grouped axis and the dense shape (static).
    """

    values: jax.Array
    meta: jax.Array
    n: int = dataclasses.field(metadata=dict(static=True))
    m: int = dataclasses.field(metadata=dict(static=True))
    axis: int = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))


def index_bits(m: int) -> int:
    """Bits per stored index: the smallest of 1, 2, 4 with ``2**bits >= m``."""
    return next(b for b in (1, 2, 4) if 2**b >= m)


# Up to this group size the slot indices come from a table indexed by the group's bit code
# (2**m rows): an elementwise lookup instead of two sorts per group.
_TABLE_MAX_M = 8


@functools.cache
def _slot_table(n: int, m: int) -> np.ndarray:
    """``(2**m, n)`` int32: the slots of every group code (bit ``i`` = entry ``i`` kept)."""
    table = np.zeros((2**m, n), np.int32)
    for code in range(2**m):
        kept = [i for i in range(m) if code >> i & 1]
        unused = [i for i in range(m) if not code >> i & 1]
        table[code] = sorted((kept + unused)[:n])
    return table


def _slot_indices(mask_groups: jax.Array, n: int) -> jax.Array:
    """(..., m) bool -> (..., n) ascending in-group indices: the kept ones (the lowest n if
    more are kept), then the smallest unused indices as fillers."""
    m = mask_groups.shape[-1]
    if m <= _TABLE_MAX_M:
        code = jnp.sum(mask_groups.astype(jnp.int32) << jnp.arange(m, dtype=jnp.int32), -1)
        return jnp.asarray(_slot_table(n, m))[code]
    key = jnp.where(mask_groups, 0, m) + jnp.arange(m)  # kept first, then by index
    chosen = jnp.sort(key, axis=-1)[..., :n] % m
    return jnp.sort(chosen, axis=-1)


def _pack_bits(idx: jax.Array, bits: int) -> jax.Array:
    """(..., T) small ints -> (..., ceil(T / (32 // bits))) uint32, little-endian fields."""
    per_word = 32 // bits
    t = idx.shape[-1]
    pad = -t % per_word
    idx = jnp.pad(idx.astype(jnp.uint32), [(0, 0)] * (idx.ndim - 1) + [(0, pad)])
    fields = idx.reshape(*idx.shape[:-1], -1, per_word)
    shifts = (jnp.arange(per_word, dtype=jnp.uint32) * bits)
    return jnp.bitwise_or.reduce(fields << shifts, axis=-1)


def _unpack_bits(words: jax.Array, bits: int, count: int) -> jax.Array:
    """Inverse of :func:`_pack_bits`: (..., W) uint32 -> (..., count) int32."""
    per_word = 32 // bits
    shifts = jnp.arange(per_word, dtype=jnp.uint32) * bits
    fields = (words[..., :, None] >> shifts) & jnp.uint32(2**bits - 1)
    return fields.reshape(*words.shape[:-1], -1)[..., :count].astype(jnp.int32)


def pack(w: Any, mask: Any, n: int, m: int, axis: int = 0) -> PackedNM:
    """Packs ``w`` under an N:M ``mask`` into values + bit-packed index metadata.

    >>> import jax, jax.numpy as jnp
    >>> from nmjax.masks import nm_mask
    >>> w = jax.random.normal(jax.random.key(0), (8, 3))     # (in, out)
    >>> mask = nm_mask(jnp.abs(w), 2, 4)
    >>> packed = pack(w, mask, 2, 4)
    >>> packed.values.shape, packed.meta.dtype                # values: (in // 2, out)
    ((4, 3), dtype('uint32'))
    >>> bool((unpack(packed) == jnp.where(mask, w, 0)).all())
    True

    Args:
      w: array of any rank and dtype.
      mask: boolean, ``w.shape``, at most ``n`` kept per group of ``m`` along ``axis``.
      n, m: the pattern, ``1 <= n <= m <= 16``.
      axis: the grouped axis (default 0, the contraction axis of a Dense kernel).

    A concrete mask is checked here. A traced one (under ``jit``) cannot raise, and a mask
    that keeps more than ``n`` of some group would lose values silently; run such calls
    under ``checkify`` to check them (the check is a ``checkify.debug_check``, free
    without it):

    >>> from jax.experimental import checkify
    >>> checked = checkify.checkify(jax.jit(pack, static_argnums=(2, 3, 4)))
    >>> err, packed = checked(w, jnp.ones((8, 3), bool), 2, 4)   # keeps 4 of every 4
    >>> err.get() is not None                                    # err.throw() raises
    True

    Returns:
      :class:`PackedNM`. Jit-able.

    Raises:
      TypeError: ``mask`` not boolean.
      ValueError: shapes differ, ``m > 16``, axis length not divisible by ``m``, or a
        concrete mask keeps more than ``n`` in some group.
    """
    n, m = _checks.check_nm(n, m, max_m=MAX_M)
    w = jnp.asarray(w)
    mask = _checks.check_mask(mask)
    if mask.shape != w.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal w shape {tuple(w.shape)}")
    if w.ndim == 0:
        raise ValueError("w must have at least one axis, got a scalar")
    axis = _checks.check_axis(axis, w.ndim)
    _checks.check_divisible(w.shape, axis, m, "w")
    message = (f"mask of shape {tuple(mask.shape)} keeps more than n={n} of some group of "
               f"m={m} along axis {axis}; it is not {n}:{m}")
    valid = is_nm(mask, n, m, axis)
    if _checks.is_concrete(valid):
        if not bool(valid):
            raise ValueError(message)
    else:
        checkify.debug_check(valid, message)
    return _pack(w, mask, n, m, axis)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _pack(w: jax.Array, mask: jax.Array, n: int, m: int, axis: int) -> PackedNM:
    groups = to_groups(w, axis, m)
    mgroups = to_groups(mask, axis, m)
    idx = _slot_indices(mgroups, n)
    vals = jnp.take_along_axis(groups, idx, axis=-1)
    vals = jnp.where(jnp.take_along_axis(mgroups, idx, axis=-1), vals, jnp.zeros((), w.dtype))
    flat_idx = idx.reshape(*idx.shape[:-2], -1)
    meta = jnp.moveaxis(_pack_bits(flat_idx, index_bits(m)), -1, axis)
    return PackedNM(from_groups(vals, axis), meta, n, m, axis, tuple(w.shape))


@jax.jit
def slot_indices(packed: PackedNM) -> jax.Array:
    """The in-group index of every value slot: ``packed.values.shape``, int32 in ``[0, m)``."""
    count = packed.values.shape[packed.axis]
    meta = jnp.moveaxis(packed.meta, packed.axis, -1)
    idx = _unpack_bits(meta, index_bits(packed.m), count)
    return jnp.moveaxis(idx, -1, packed.axis)


@jax.jit
def unpack(packed: PackedNM) -> jax.Array:
    """Dense array of ``packed.shape``: the kept values in place, zeros elsewhere.

    Bit-exact: every stored value is copied, not summed (a kept ``-0.0`` stays ``-0.0``).
    ``values`` may have any dtype, ``bool`` included (see :func:`gather_slots`).
    """
    n, m, axis = packed.n, packed.m, packed.axis
    vals = to_groups(packed.values, axis, n)  # (..., G, n)
    idx = to_groups(slot_indices(packed), axis, n)
    pos = jnp.arange(m, dtype=idx.dtype)
    dense = jnp.zeros((*vals.shape[:-1], m), vals.dtype)
    for slot in range(n):  # a group's indices are distinct: each entry is written once
        dense = jnp.where(idx[..., slot, None] == pos, vals[..., slot, None], dense)
    return from_groups(dense, axis)


@jax.jit
def gather_slots(packed: PackedNM, x: jax.Array) -> jax.Array:
    """``x`` (``packed.shape``, any dtype) read at every value slot: ``packed.values.shape``.

    With a boolean mask, says which slots hold kept entries (the rest are fillers);
    ``unpack(dataclasses.replace(packed, values=gather_slots(packed, mask)))`` scatters it
    back (``mask`` restricted to the slots).
    """
    idx = to_groups(slot_indices(packed), packed.axis, packed.n)
    picked = jnp.take_along_axis(to_groups(x, packed.axis, packed.m), idx, axis=-1)
    return from_groups(picked, packed.axis)


def pack_flags(flags: Any, axis: int = 0) -> jax.Array:
    """Bit-packs a boolean array along ``axis``: ``uint32`` words, one bit per entry, entry
    ``t`` in word ``t // 32`` at bit ``t % 32`` (the layout of ``meta`` with 1-bit fields).

    >>> import jax.numpy as jnp
    >>> flags = jnp.array([True, False, True] + [False] * 30 + [True])   # 34 entries
    >>> words = pack_flags(flags)
    >>> words.shape, int(words[0]), int(words[1])
    ((2,), 5, 2)
    >>> bool((unpack_flags(words, 34) == flags).all())
    True
    """
    flags = _checks.check_mask(flags, "flags")
    axis = _checks.check_axis(axis, flags.ndim)
    return jnp.moveaxis(_pack_bits(jnp.moveaxis(flags, axis, -1), 1), -1, axis)


def unpack_flags(words: Any, count: int, axis: int = 0) -> jax.Array:
    """Inverse of :func:`pack_flags`: ``count`` booleans along ``axis``."""
    words = jnp.asarray(words)
    if words.dtype != jnp.uint32:
        raise TypeError(f"words must be uint32, got {words.dtype}")
    axis = _checks.check_axis(axis, words.ndim)
    if not 0 <= count <= 32 * words.shape[axis]:
        raise ValueError(f"count={count} does not fit {words.shape[axis]} words along axis "
                         f"{axis} (32 flags each)")
    bits = _unpack_bits(jnp.moveaxis(words, axis, -1), 1, count)
    return jnp.moveaxis(bits.astype(bool), -1, axis)


def unpack_mask(packed: PackedNM) -> jax.Array:
    """The mask of nonzero stored values (filler slots hold zeros), ``packed.shape`` bool."""
    return unpack(packed) != 0


__all__ = [
    "MAX_M",
    "PackedNM",
    "index_bits",
    "pack",
    "slot_indices",
    "unpack",
    "unpack_mask",
]
