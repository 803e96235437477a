"""Writer (and a numpy reader) of compressed-tensors' ``sparse-24-bitmask`` checkpoints.

A 2:4 weight ``name.weight`` of PyTorch shape ``(rows, cols)`` is stored as three tensors:

* ``name.compressed``: ``(rows, cols // 2)``, the weight's entries at the set bits of the
  bitmask in row-major order (a flat reshape: a row of it is a row of the weight only when
  the 2:4 groups run along the last axis);
* ``name.bitmask``: ``uint8 (rows, ceil(cols / 8))``, one bit per entry,
  ``numpy.packbits(..., axis=-1, bitorder="little")``; exactly 2 bits set in every group of
  4 (a group that keeps fewer marks explicit zeros, as :mod:`nmjax.format` does);
* ``name.shape``: ``int64 (2, 1)``, the dense shape.

Everything else is stored dense. Parameter names and layouts are PyTorch's, mapped from the
Flax parameter tree with the rules of transformers' own Flax-to-PyTorch loader
(``load_flax_weights_in_pytorch_model``): a rank-4 ``kernel`` becomes ``weight`` transposed
``(3, 2, 0, 1)``, any other ``kernel`` becomes ``weight`` transposed (``.T``), ``scale`` and
``embedding`` become ``weight``, path parts are joined with dots.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nmjax import format as nmf
from nmjax.tree import path_str

FORMAT = "sparse-24-bitmask"
# The compressed-tensors release whose format this writer follows and was checked against
# (later releases dropped the sparse-24 compressors).
FORMAT_VERSION = "0.14.0.1"
SUFFIXES = ("compressed", "bitmask", "shape")


def torch_name_and_axes(path: tuple[str, ...], ndim: int) -> tuple[str, tuple[int, ...]]:
    """The PyTorch name of a Flax parameter and the transpose that gives its PyTorch layout.

    >>> torch_name_and_axes(("transformer", "h", "0", "attn", "c_attn", "kernel"), 2)
    ('transformer.h.0.attn.c_attn.weight', (1, 0))
    >>> torch_name_and_axes(("transformer", "ln_f", "scale"), 1)
    ('transformer.ln_f.weight', (0,))
    """
    *head, last = path
    axes = tuple(range(ndim))
    if last == "kernel" and ndim == 4:
        last, axes = "weight", (3, 2, 0, 1)
    elif last == "kernel":
        last, axes = "weight", axes[::-1]
    elif last in ("scale", "embedding"):
        last = "weight"
    return ".".join([*head, last]), axes


def _key_parts(key_path: Any) -> tuple[str, ...]:
    """A key path's parts (:func:`nmjax.tree.path_str`, split)."""
    return tuple(path_str(key_path).split("/"))


def _compress(name: str, leaf: Any, axes: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The three tensors of one packed 2:4 leaf, in PyTorch layout."""
    weight = leaf.weight
    dense = np.transpose(np.asarray(nmf.unpack(weight)), axes)
    slots = jnp.ones(weight.values.shape, bool)  # kept entries and fillers
    bits = np.transpose(np.asarray(nmf.unpack(dataclasses.replace(weight, values=slots))), axes)
    rows, cols = dense.shape
    prefix = name.removesuffix(".weight")
    return {
        f"{prefix}.compressed": dense[bits].reshape(rows, cols // 2),
        f"{prefix}.bitmask": np.packbits(bits, axis=-1, bitorder="little"),
        f"{prefix}.shape": np.asarray(dense.shape, np.int64).reshape(-1, 1),
    }


def state_dict(packed: Any) -> tuple[dict[str, np.ndarray], list[str], float]:
    """``(tensors, compressed module names, global sparsity)`` of a packed Flax tree whose
    packed leaves are all 2:4 and rank 2."""
    from nmjax.export import is_packed

    tensors: dict[str, np.ndarray] = {}
    targets, pruned, total = [], 0, 0
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(packed, is_leaf=is_packed)[0]:
        ndim = len(leaf.shape)
        name, axes = torch_name_and_axes(_key_parts(key_path), ndim)
        size = int(np.prod(leaf.shape))
        total += size
        if not is_packed(leaf):
            tensors[name] = np.transpose(np.asarray(leaf), axes)
            continue
        w = leaf.weight
        if (w.n, w.m) != (2, 4) or ndim != 2 or name.rsplit(".", 1)[-1] != "weight":
            raise ValueError(
                f"{FORMAT} holds rank-2 2:4 weights; {name!r} is a rank-{ndim} {w.n}:{w.m} "
                f"{name.rsplit('.', 1)[-1]!r} (pack it with nm=(2, 4), or leave it dense)")
        tensors.update(_compress(name, leaf, axes))
        targets.append(name.removesuffix(".weight"))
        pruned += size - int(np.count_nonzero(nmf.unpack(w)))
    return tensors, targets, pruned / max(total, 1)


def write(directory: str | os.PathLike, packed: Any, config: Mapping[str, Any]) -> list[str]:
    """Writes ``model.safetensors`` and ``config.json`` (``config`` plus the
    ``quantization_config`` compressed-tensors reads) to a new ``directory``; returns the
    compressed module names."""
    from safetensors.numpy import save_file

    tensors, targets, sparsity = state_dict(packed)
    os.makedirs(directory, exist_ok=False)
    # safetensors writes an array's buffer as it lies: transposed views must be copied.
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    config = dict(config)
    config["quantization_config"] = {
        "version": FORMAT_VERSION,
        "quant_method": "compressed-tensors",
        "sparsity_config": {
            "format": FORMAT, "registry_requires_subclass": False, "targets": targets,
            "ignore": [], "global_sparsity": sparsity, "sparsity_structure": "2:4",
        },
        "transform_config": {},
    }
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return targets


def decompress(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The dense state dict of a ``sparse-24-bitmask`` state dict (what compressed-tensors'
    ``Sparse24BitMaskCompressor.decompress`` computes), in numpy."""
    out = {}
    for name, value in tensors.items():
        prefix, _, suffix = name.rpartition(".")
        if suffix not in SUFFIXES:
            out[name] = np.asarray(value)
            continue
        if suffix != "shape":
            continue
        shape = tuple(int(s) for s in np.asarray(value).ravel())
        bits = np.unpackbits(np.asarray(tensors[f"{prefix}.bitmask"]), axis=-1,
                             count=shape[-1], bitorder="little").reshape(shape).astype(bool)
        values = np.asarray(tensors[f"{prefix}.compressed"])
        dense = np.zeros(shape, values.dtype)
        dense[bits] = values.ravel()
        out[f"{prefix}.weight"] = dense
    return out
