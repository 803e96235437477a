"""Masks as the optimizer state holds them: 1 bit per weight per stored mask.

A kernel's boolean masks are packed 8 to a ``uint8`` along one of its own axes (the
innermost contraction axis when its length is a multiple of 8), so the packed array keeps the
kernel's other axes and shards like it: a shard of the kernel whose run along that axis is a
multiple of 8 packs and unpacks with no communication. ``bwd`` is not stored when the
patterns make it ``fwd`` (plain N:M, transposable); the Bi-Mask permutation stays ``int32``.

>>> import jax.numpy as jnp
>>> from nmjax.masks import NM
>>> from nmjax.plan import from_axis
>>> w = jnp.arange(64.0).reshape(16, 4)                     # (in, out)
>>> packed = pack(NM(2, 4)(w), from_axis(w.shape, 0), same_masks=True)
>>> packed.fwd.shape, packed.fwd.dtype, packed.bwd
((2, 4), dtype('uint8'), None)
>>> bool((packed.expand().fwd == NM(2, 4)(w).fwd).all())
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from nmjax._graph import Layout
from nmjax.masks import Masks

BITS = 8  # masks per stored uint8


class PackedMasks(NamedTuple):
    """One kernel's :class:`~nmjax.masks.Masks`, bit-packed (:func:`pack`).

    Only arrays, so that containers which rebuild the state as mappings (flax NNX) or
    restore it (orbax) keep all of it; the packed axis is held in ``where``'s length.

    Attributes:
      fwd: ``uint8``: the forward mask, 8 entries per byte along :attr:`axis` (the kernel's
        shape with that axis of length ``shape[axis] // 8``; bit ``j`` of byte ``i`` is entry
        ``8 i + j``), or ``bool`` of the kernel's shape where no axis has a length divisible
        by 8 (stored unpacked, 1 byte per weight).
      bwd: the backward mask, packed the same way, or ``None``: it is ``fwd``.
      perm: the Bi-Mask permutation (``int32``, the layout's ``perm_shape``) or ``None``.
      where: ``uint8`` zeros of shape ``(axis + 1,)``: the packed axis (a few bytes).
    """

    fwd: jax.Array
    bwd: jax.Array | None
    perm: jax.Array | None
    where: jax.Array

    @property
    def axis(self) -> int | None:
        """The kernel axis the masks are packed along (``None``: stored unpacked)."""
        return None if self.fwd.dtype == jnp.bool_ else self.where.shape[0] - 1

    @property
    def shape(self) -> tuple[int, ...]:
        """The kernel's shape."""
        shape = tuple(self.fwd.shape)
        if self.axis is None:
            return shape
        return (*shape[:self.axis], shape[self.axis] * BITS, *shape[self.axis + 1:])

    def expand(self) -> Masks:
        """The ordinary :class:`~nmjax.masks.Masks` (``bwd`` is ``fwd`` when not stored)."""
        fwd = unpack_bits(self.fwd, self.shape, self.axis)
        bwd = fwd if self.bwd is None else unpack_bits(self.bwd, self.shape, self.axis)
        return Masks(fwd, bwd, self.perm)

    @property
    def nbytes(self) -> int:
        """Bytes the packed masks and permutation hold (``where`` not counted)."""
        return sum(int(x.size) * x.dtype.itemsize for x in (self.fwd, self.bwd, self.perm)
                   if x is not None)


def pack_axis(layout: Layout) -> int | None:
    """The kernel axis masks are packed along: the innermost contraction axis whose length
    is a multiple of 8 (then the output axes, then the stacked ones); ``None`` if none is."""
    for axis in (*reversed(layout.contract), *reversed(layout.out), *reversed(layout.stack)):
        if layout.shape[axis] % BITS == 0:
            return axis
    return None


def pack_bits(mask: jax.Array, axis: int | None) -> jax.Array:
    """``mask`` (bool) with 8 entries of ``axis`` per ``uint8`` (``axis=None``: as is)."""
    if axis is None:
        return mask.astype(bool)
    shape = mask.shape
    grouped = mask.reshape(*shape[:axis], shape[axis] // BITS, BITS, *shape[axis + 1:])
    weights = (jnp.uint8(1) << jnp.arange(BITS, dtype=jnp.uint8)).reshape(
        (BITS,) + (1,) * (len(shape) - axis - 1))
    return jnp.sum(grouped.astype(jnp.uint8) * weights, axis=axis + 1, dtype=jnp.uint8)


def unpack_bits(bits: jax.Array, shape: tuple[int, ...], axis: int | None) -> jax.Array:
    """The inverse of :func:`pack_bits`: ``bool`` of ``shape``."""
    if axis is None:
        return bits
    shifts = jnp.arange(BITS, dtype=jnp.uint8).reshape((BITS,) + (1,) * (len(shape) - axis - 1))
    return ((jnp.expand_dims(bits, axis + 1) >> shifts) & 1).astype(bool).reshape(shape)


def pack(masks: Masks, layout: Layout, same_masks: bool) -> PackedMasks:
    """``masks`` of a kernel laid out as ``layout``, packed; ``same_masks``: the patterns
    make ``bwd`` equal ``fwd``, so it is not stored."""
    axis = pack_axis(layout)
    bwd = None if same_masks else pack_bits(masks.bwd, axis)
    where = jnp.zeros((0 if axis is None else axis + 1,), jnp.uint8)
    return PackedMasks(pack_bits(masks.fwd, axis), bwd, masks.perm, where)


def _is_node(x: Any) -> bool:
    if x is None or isinstance(x, PackedMasks | Masks):
        return True
    if not isinstance(x, Mapping):
        return False
    keys = set(x.keys())  # a container may drop the None fields
    if "where" in keys:
        return {"fwd", "where"} <= keys <= {"fwd", "bwd", "perm", "where"}
    return keys in ({"fwd", "bwd"}, {"fwd", "bwd", "perm"})


def _typed(x: Any) -> Any:
    if isinstance(x, Mapping):
        if "where" in x:
            return PackedMasks(x["fwd"], x.get("bwd"), x.get("perm"), x["where"])
        return Masks(x["fwd"], x["bwd"], x.get("perm"))
    return x


def normalize(tree: Any) -> Any:
    """Mask nodes back as :class:`PackedMasks` / :class:`~nmjax.masks.Masks` where a
    container rebuilt them as mappings of their fields (flax NNX stores optimizer states as
    ``State``s of dicts)."""
    return jax.tree_util.tree_map(_typed, tree, is_leaf=_is_node)


def expand(tree: Any) -> Any:
    """A tree of :class:`PackedMasks` (or ordinary ``Masks``, or either as a mapping of its
    fields) and ``None`` with each as :class:`~nmjax.masks.Masks`."""
    def one(x):
        x = _typed(x)
        return x.expand() if isinstance(x, PackedMasks) else x

    return jax.tree_util.tree_map(one, tree, is_leaf=_is_node)


def bits_per_weight(packed: PackedMasks) -> float:
    """Bits of mask state per weight of the kernel (the permutation included)."""
    return 8 * packed.nbytes / math.prod(packed.shape)
