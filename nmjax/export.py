"""Packed N:M checkpoints: every masked leaf held in :mod:`nmjax.format`'s packed form.

:func:`pack_params` turns ``(params, masks)`` (masks as :func:`nmjax.tree.build_masks`
returns them) into a tree of the same structure with a :class:`PackedLeaf` at each masked
leaf; :func:`unpack_params` gives back the masked dense parameters bit-exactly and
:func:`unpack_masks` the masks. :func:`save` / :func:`restore` write and read the packed tree
with orbax. :func:`save_compressed_tensors` writes a Hugging Face checkpoint folder in
compressed-tensors' ``sparse-24-bitmask`` format (PyTorch names and layouts).

A leaf's grouping axis (the contraction axis of the op that consumes it) is read from its
forward mask: the one axis along which the mask is N:M at the least storage cost. A mask
that is N:M along several axes at the same cost (a transposable mask, a tiny matrix) names
none; pass ``axes=`` for it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nmjax import _checks
from nmjax import format as nmf
from nmjax._layout import to_groups
from nmjax.masks import Masks
from nmjax.tree import check_structure, is_masks_leaf, nest, path_str

__all__ = ["PackedLeaf", "is_packed", "leaf_masks", "nbytes", "pack_params", "restore", "save",
           "save_compressed_tensors", "unpack_leaf", "unpack_masks", "unpack_params"]

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedLeaf:
    """One masked parameter, packed.

    Attributes:
      weight: :class:`nmjax.format.PackedNM`: the kept values and their in-group indices
        along the grouped axis.
      kept: ``uint32`` flags (:func:`nmjax.format.pack_flags`, along the grouped axis), one
        per value slot: whether the slot holds a kept entry of the forward mask. ``None``
        when every group keeps exactly ``n`` (every slot is kept).
      bwd: ``uint32`` flags, one per value slot: whether the entry is in the backward mask
        (``bwd ⊆ fwd``). ``None`` when the backward mask is the forward one.
      perm: Bi-Mask's ``(out,)`` int32 permutation, or ``None``.
    """

    weight: nmf.PackedNM
    kept: jax.Array | None = None
    bwd: jax.Array | None = None
    perm: jax.Array | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.weight.shape

    @property
    def dtype(self) -> Any:
        return self.weight.values.dtype


def is_packed(x: Any) -> bool:
    """``is_leaf`` for packed trees: a :class:`PackedLeaf` is one leaf."""
    return isinstance(x, PackedLeaf)


def _cost(n: int, m: int, value_bits: int) -> float:
    """Stored bits per dense weight: values plus in-group indices."""
    return n / m * (value_bits + nmf.index_bits(m))


def _candidates(fwd: np.ndarray, axis: int, value_bits: int,
                nm: tuple[int, int] | None) -> list[tuple[float, int, int, int]]:
    """``[(cost, axis, n, m)]`` under which ``fwd`` packs along ``axis`` (fewer than m of
    every m kept)."""
    k = fwd.shape[axis]
    ms = [nm[1]] if nm is not None else range(2, min(k, nmf.MAX_M) + 1)
    out = []
    for m in ms:
        if k % m:
            continue
        n = max(int(to_groups(fwd, axis, m, xp=np).sum(-1).max()), 1)
        if nm is not None and n > nm[0]:
            continue
        n = nm[0] if nm is not None else n
        if n < m:
            out.append((_cost(n, m, value_bits), axis, n, m))
    return out


def _layout(path: str, fwd: np.ndarray, value_bits: int, axis: int | None,
            nm: tuple[int, int] | None) -> tuple[int, int, int]:
    """``(axis, n, m)`` for one leaf: the cheapest N:M its forward mask satisfies."""
    axes = range(fwd.ndim) if axis is None else [axis]
    found = [c for a in axes for c in _candidates(fwd, a, value_bits, nm)]
    want = f"{nm[0]}:{nm[1]}" if nm is not None else "N:M (m <= 16)"
    where = "any axis" if axis is None else f"axis {axis}"
    if not found:
        raise ValueError(f"the forward mask of {path!r} (shape {fwd.shape}) is not {want} "
                         f"along {where}; it cannot be packed")
    best = min(c[0] for c in found)
    ties = sorted({(a, n, m) for cost, a, n, m in found if cost == best}, key=lambda t: t[2])
    if len({a for a, _, _ in ties}) > 1:
        options = ", ".join(f"{n}:{m} along axis {a}" for a, n, m in ties)
        raise ValueError(
            f"the forward mask of {path!r} (shape {fwd.shape}) is as compact {options}: its "
            "grouping (contraction) axis cannot be told from the mask; pass "
            f"axes={{{path!r}: axis}} (or axes=axis for every leaf)")
    return ties[0]


def _pack_leaf(path: str, w: Any, masks: Masks, axis: int | None,
               nm: tuple[int, int] | None) -> PackedLeaf:
    w = jnp.asarray(w)
    fwd = np.asarray(_checks.check_mask(masks.fwd, f"forward mask of {path!r}"))
    if fwd.shape != w.shape:
        raise ValueError(f"the forward mask of {path!r} has shape {fwd.shape}, the leaf "
                         f"{tuple(w.shape)}")
    if axis is not None:
        axis = _checks.check_axis(axis, w.ndim, f"axes[{path!r}]")
    axis, n, m = _layout(path, fwd, 8 * w.dtype.itemsize, axis, nm)
    weight = nmf.pack(w, jnp.asarray(fwd), n, m, axis)
    slots_kept = nmf.gather_slots(weight, jnp.asarray(fwd))
    full = bool(to_groups(fwd, axis, m, xp=np).sum(-1).min() == n)
    kept = None if full else nmf.pack_flags(slots_kept, axis)
    bwd = None
    if masks.bwd is not masks.fwd:
        bwd_mask = np.asarray(_checks.check_mask(masks.bwd, f"backward mask of {path!r}"))
        if bwd_mask.shape != fwd.shape:
            raise ValueError(f"the backward mask of {path!r} has shape {bwd_mask.shape}, the "
                             f"leaf {fwd.shape}")
        if (bwd_mask & ~fwd).any():
            raise ValueError(f"the backward mask of {path!r} keeps entries its forward mask "
                             "drops (bwd must be a subset of fwd to be packed)")
        if not np.array_equal(bwd_mask, fwd):
            bwd = nmf.pack_flags(nmf.gather_slots(weight, jnp.asarray(bwd_mask)), axis)
    perm = None
    if masks.perm is not None:  # (out,), or (stack..., out) for stacked kernels: kept as is
        perm = jnp.asarray(masks.perm)
        if perm.dtype == jnp.bool_ or not jnp.issubdtype(perm.dtype, jnp.integer):
            raise TypeError(f"perm of {path!r} must be an integer array, got {perm.dtype}")
    return PackedLeaf(weight, kept, bwd, perm)


def _axis_for(axes: Any, path: str) -> int | None:
    if axes is None or isinstance(axes, int | np.integer) and not isinstance(axes, bool):
        return axes
    if isinstance(axes, Mapping):
        return axes.get(path)
    by_path = getattr(axes, "by_path", None)  # an nmjax.plan.Plan
    if isinstance(by_path, Mapping):
        leaf = by_path.get(path)
        # The forward groups run along the flattened contraction, innermost axis last.
        return None if leaf is None else leaf.layout.contract[-1]
    raise TypeError(f"axes must be None, an int, a mapping {{leaf path: axis}} or an "
                    f"nmjax.plan.Plan, got {axes!r}")


def _plan_nm(axes: Any, path: str) -> tuple[int, int] | None:
    """The N:M a plan's pattern gives the leaf's forward mask (``None``: read the mask)."""
    by_path = getattr(axes, "by_path", None)
    leaf = by_path.get(path) if isinstance(by_path, Mapping) else None
    return None if leaf is None else leaf.pattern.fwd_nm


def pack_params(params: Any, masks: Any, *, axes: Any = None,
                nm: tuple[int, int] | None = None) -> Any:
    """Packs every masked leaf of ``params``: a :class:`PackedLeaf` per :class:`Masks`.

    Values outside a leaf's forward mask are dropped: :func:`unpack_params` returns
    ``nmjax.tree.apply_masks(params, masks)`` bit-exactly (the weights the forward uses).
    Leaves whose mask is ``None`` stay as they are.

    >>> import jax, jax.numpy as jnp
    >>> from nmjax.tree import MaskRule, apply_masks, build_masks
    >>> params = {"Dense_0": {"kernel": jax.random.normal(jax.random.key(0), (16, 8)),
    ...                       "bias": jnp.zeros(8)}}
    >>> masks = build_masks(params, MaskRule("2:4"))
    >>> packed = pack_params(params, masks)
    >>> leaf = packed["Dense_0"]["kernel"]
    >>> (leaf.weight.n, leaf.weight.m, leaf.weight.axis), leaf.weight.values.shape
    ((2, 4, 0), (8, 8))
    >>> same = jax.tree.map(jnp.array_equal, unpack_params(packed), apply_masks(params, masks))
    >>> all(jax.tree.leaves(same))
    True

    Args:
      params: parameter pytree (concrete arrays; call outside ``jit``).
      masks: a mask tree of ``params``' structure: a :class:`~nmjax.masks.Masks` or
        ``None`` per leaf (:func:`nmjax.tree.build_masks`).
      axes: the grouping axis of the masked leaves: the :class:`nmjax.plan.Plan` the masks
        were built with (each leaf's innermost contraction axis), one int for all, or
        ``{leaf path: axis}`` (paths as :func:`nmjax.tree.path_str` writes them,
        ``"Dense_0/kernel"``); a leaf not named is read from its mask (see the module
        docstring).
      nm: ``(n, m)`` to pack every masked leaf with; ``None`` (default) takes the plan's
        pattern where ``axes`` is a plan, else, per leaf, the N:M (``m <= 16``, ``n`` the
        most kept in a group) that stores it in the fewest bits.

    Returns:
      A pytree of ``params``' structure.

    Raises:
      ValueError: the trees differ, a mask's shape differs from its leaf's, a mask is not
        N:M along the given axis (or along any), its axis is ambiguous and not given, or a
        backward mask keeps what the forward mask drops.
    """
    check_structure(params, masks)
    if nm is not None:
        nm = _checks.check_nm(*nm, max_m=nmf.MAX_M)
    flat_masks = jax.tree_util.tree_leaves(masks, is_leaf=is_masks_leaf)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for (key_path, leaf), leaf_masks in zip(leaves, flat_masks, strict=True):
        if leaf_masks is None:
            out.append(leaf)
            continue
        if not isinstance(leaf_masks, Masks):
            raise TypeError(f"masks for {path_str(key_path)!r} must be an nmjax.masks.Masks "
                            f"or None, got {type(leaf_masks).__name__}")
        path = path_str(key_path)
        out.append(_pack_leaf(path, leaf, leaf_masks, _axis_for(axes, path),
                              nm if nm is not None else _plan_nm(axes, path)))
    return jax.tree_util.tree_unflatten(treedef, out)


def _scatter(weight: nmf.PackedNM, slot_flags: jax.Array) -> jax.Array:
    return nmf.unpack(dataclasses.replace(weight, values=slot_flags))


def _slot_flags(weight: nmf.PackedNM, words: jax.Array | None) -> jax.Array:
    count = weight.values.shape[weight.axis]
    if words is None:
        return jnp.ones(weight.values.shape, bool)
    return nmf.unpack_flags(words, count, weight.axis)


def unpack_leaf(leaf: PackedLeaf) -> jax.Array:
    """The dense masked weight (``leaf.shape``, its dtype); jit-able.

    Under ``jit`` the result is materialised (an optimization barrier), so the product
    that consumes it compiles as it does on a dense weight and gives the same bits.
    """
    return jax.lax.optimization_barrier(nmf.unpack(leaf.weight))


def leaf_masks(leaf: PackedLeaf) -> Masks:
    """The leaf's :class:`~nmjax.masks.Masks` (``bwd is fwd`` where they are one mask)."""
    fwd = _scatter(leaf.weight, _slot_flags(leaf.weight, leaf.kept))
    bwd = fwd if leaf.bwd is None else _scatter(leaf.weight, _slot_flags(leaf.weight, leaf.bwd))
    return Masks(fwd, bwd, leaf.perm)


def unpack_params(packed: Any) -> Any:
    """Inverse of :func:`pack_params`: the dense masked parameters, bit-exactly; jit-able
    (unpack inside a jitted forward to keep only the packed arrays resident)."""
    return jax.tree_util.tree_map(lambda x: unpack_leaf(x) if is_packed(x) else x, packed,
                                  is_leaf=is_packed)


def unpack_masks(packed: Any) -> Any:
    """The mask tree :func:`pack_params` was given (``Masks`` or ``None`` per leaf)."""
    return jax.tree_util.tree_map(lambda x: leaf_masks(x) if is_packed(x) else None, packed,
                                  is_leaf=is_packed)


def nbytes(tree: Any) -> int:
    """Bytes of all arrays in ``tree`` (packed or dense)."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(tree))


_INDEX_FIELDS = ("meta", "kept", "bwd", "perm")


def _to_checkpoint(tree: Any, index: dict[str, list[np.ndarray]],
                   path: str = "") -> tuple[Any, dict[str, Any]]:
    """``(arrays, layout)``: the tree as nested dicts of arrays (a packed leaf becomes
    ``{"values": ...}``, a list a dict keyed by index) and, by path, every array's shape and
    dtype and every packed leaf's static layout (JSON).

    A packed leaf's small arrays (``meta``, ``kept``, ``bwd``, ``perm``) are appended,
    flattened, to ``index`` (one list per dtype) and the layout records where: orbax reads
    each array of a checkpoint with a fixed cost, so the packed tree restores as fast as the
    dense one only if it holds no more arrays."""
    if is_packed(tree):
        w = tree.weight
        arrays, layout = _to_checkpoint({"values": w.values}, index, path)
        where = {}
        for field in _INDEX_FIELDS:
            x = w.meta if field == "meta" else getattr(tree, field)
            if x is None:
                continue
            x = np.asarray(x)
            chunks = index.setdefault(x.dtype.name, [])
            where[field] = [x.dtype.name, sum(c.size for c in chunks), list(x.shape)]
            chunks.append(x.ravel())
        layout["packed"][path] = {"nm": [w.n, w.m, w.axis, list(w.shape)], "index": where}
        return arrays, layout
    items = (tree.items() if isinstance(tree, Mapping)
             else enumerate(tree) if isinstance(tree, list | tuple) else None)
    if items is None:
        if not hasattr(tree, "shape") or not hasattr(tree, "dtype"):
            raise TypeError(f"save stores dicts, lists and arrays; {path or 'the tree'!r} is a "
                            f"{type(tree).__name__}")
        return tree, {"arrays": {path: [list(tree.shape), np.dtype(tree.dtype).name]},
                      "packed": {}}
    arrays, layout = {}, {"arrays": {}, "packed": {}}
    for key, value in items:
        key = str(key)
        if "/" in key:
            raise ValueError(f"save cannot store the key {key!r} (it holds a '/')")
        arrays[key], sub = _to_checkpoint(value, index, f"{path}/{key}" if path else key)
        layout["arrays"].update(sub["arrays"])
        layout["packed"].update(sub["packed"])
    return arrays, layout


def _from_checkpoint(arrays: Any, packed: Mapping[str, Any], index: Mapping[str, Any],
                     path: str = "") -> Any:
    if path in packed:
        n, m, axis, shape = packed[path]["nm"]
        small = {field: index[dtype][offset:offset + int(np.prod(size))].reshape(size)
                 for field, (dtype, offset, size) in packed[path]["index"].items()}
        weight = nmf.PackedNM(arrays["values"], small["meta"], n, m, axis, tuple(shape))
        return PackedLeaf(weight, *(small.get(k) for k in _INDEX_FIELDS[1:]))
    if isinstance(arrays, Mapping):
        return {k: _from_checkpoint(v, packed, index, f"{path}/{k}" if path else k)
                for k, v in arrays.items()}
    return arrays


def save(directory: str | os.PathLike, packed: Any) -> None:
    """Writes a packed tree (or any tree of arrays) to a new ``directory`` with orbax: the
    arrays (a packed leaf's values as one array; the index metadata, kept and backward
    flags and permutations of all packed leaves as one flat array per dtype), and a JSON
    layout (shapes, dtypes, packed leaves' N:M, axis and index offsets) that lets
    :func:`restore` read them back without a target.

    Containers must be dicts (string keys), lists or tuples: a Linen ``variables`` dict, a
    Hugging Face ``model.params``; for NNX, ``nnx.state(model).to_pure_dict()``.
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory):
        raise ValueError(f"directory {directory!r} exists; save writes a new checkpoint")
    index: dict[str, list[np.ndarray]] = {}
    arrays, layout = _to_checkpoint(packed, index)
    layout["index"] = {dtype: sum(c.size for c in chunks) for dtype, chunks in index.items()}
    items = {"arrays": ocp.args.PyTreeSave(arrays), "layout": ocp.args.JsonSave(layout)}
    if index:
        items["index"] = ocp.args.PyTreeSave(
            {dtype: np.concatenate(chunks) for dtype, chunks in index.items()})
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(directory, ocp.args.Composite(**items))


def restore(directory: str | os.PathLike) -> Any:
    """Reads a tree written by :func:`save` onto the default device; packed leaves come
    back as :class:`PackedLeaf`, lists and tuples as dicts keyed by index."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        layout = ckptr.restore(directory, ocp.args.Composite(layout=ocp.args.JsonRestore()))
        layout = layout["layout"]
        target = nest({path: jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype),
                                                   sharding=sharding)
                        for path, (shape, dtype) in layout["arrays"].items()})
        items = {"arrays": ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))}
        if layout["index"]:  # read to the host, cut there, then one device_put
            items["index"] = ocp.args.PyTreeRestore(
                {dtype: np.zeros((0,), dtype) for dtype in layout["index"]},
                restore_args={dtype: ocp.RestoreArgs(restore_type=np.ndarray)
                              for dtype in layout["index"]})
        read = ckptr.restore(directory, ocp.args.Composite(**items))
    tree = _from_checkpoint(read["arrays"], layout["packed"], read.get("index", {}))
    return jax.device_put(tree, sharding)  # the index pieces; the rest is there already


def save_compressed_tensors(directory: str | os.PathLike, params: Any, masks: Any,
                            config: Any, *, architecture: str | None = None,
                            axes: Any = None) -> list[str]:
    """Writes a Hugging Face checkpoint folder (``model.safetensors`` + ``config.json``) in
    compressed-tensors' ``sparse-24-bitmask`` format, the 2:4 format vLLM loaded.

    Example (a Flax GPT-2; the plan finds that its ``FlaxConv1D`` kernels are ``(out, in)``
    and groups them along ``in``; a ``FlaxLlamaForCausalLM`` goes the same way with
    ``include=r"_proj/kernel$"`` and ``architecture="LlamaForCausalLM"``)::

      plan = nmjax.resolve(model.module, MaskRule("2:4", include=r"c_(attn|proj|fc)"),
                           params=model.params, input_ids=ids, attention_mask=mask,
                           position_ids=positions)
      masks = build_masks(model.params, plan)
      save_compressed_tensors("gpt2-24", model.params, masks, model.config, axes=plan,
                              architecture="GPT2LMHeadModel")

    Names and layouts are PyTorch's, mapped with the rules of transformers' own
    Flax-to-PyTorch loader (a ``kernel`` becomes ``weight`` transposed: GPT-2's ``Conv1D``
    weight is ``(in, out)`` in PyTorch too, ``nn.Linear``'s ``(out, in)``). Each masked
    leaf is stored as ``.compressed`` (the kept values, ``(rows, cols // 2)``),
    ``.bitmask`` (one bit per weight) and ``.shape``; decompressing gives
    ``apply_masks(params, masks)`` bit-exactly, whichever axis the 2:4 groups run along.
    Row-wise 2:4 kernels (vLLM's) need the groups along the PyTorch weight's last axis:
    true of ``nn.Linear`` layers pruned along ``in`` (Llama) and of transposable masks; a
    GPT-2 ``Conv1D`` pruned along ``in`` has them along its axis 0.

    Args:
      directory: a new folder.
      params: the Flax model's parameters (``model.params``: ``{"transformer": ...}``).
      masks: their mask tree (:func:`nmjax.tree.build_masks`); every mask must be at most
        2:4 along its axis, every masked leaf rank 2.
      config: the model's ``transformers`` config (``model.config``) or a dict.
      architecture: the PyTorch class for ``config.json``'s ``architectures``
        (``"GPT2LMHeadModel"``); ``None`` keeps the config's.
      axes: as in :func:`pack_params`.

    Returns:
      The names of the compressed modules (``"transformer.h.0.attn.c_attn"``).
    """
    from nmjax import _compressed_tensors

    packed = pack_params(params, masks, axes=axes, nm=(2, 4))
    if hasattr(config, "to_diff_dict"):  # what save_pretrained writes
        config = config.to_diff_dict()
    config = dict(config)
    if architecture is not None:
        config["architectures"] = [architecture]
    return _compressed_tensors.write(os.fspath(directory), packed, config)
