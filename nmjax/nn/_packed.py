"""Packed inference: layers hold their N:M kernels packed (:mod:`nmjax.export`) and unpack
them inside the forward, so only the packed arrays are resident between calls.

* Linen: :func:`packed_variables` wraps each packed kernel of a packed ``params`` tree in a
  :class:`PackedKernel` box; any Linen layer that reads its kernel with ``self.param``
  (``nn.Dense``, :class:`~nmjax.nn.linen.SparseDense`, Hugging Face's ``FlaxConv1D``)
  receives the dense masked kernel, unpacked where it is read (inside ``jit`` when the
  apply is jitted). Static masks (the ``"nm_masks"`` collection) are boxed the same way.
* NNX: :func:`pack_model` returns a copy of a model whose :class:`~nmjax.nn.SparseLinear`
  layers are :class:`PackedLinear` layers holding a :class:`PackedParam`.

:class:`PackedLinear` and Linen's :class:`~nmjax.nn.SparseDense` run their product
through a backend (:func:`packed_product`): a kernel that takes the packed operand (the
Pallas sparse-wgmma GEMM, on an sm_90 GPU) reads the packed values and metadata directly;
elsewhere the unpacked kernel feeds the same dense product as the dense layer, so the
outputs equal the dense model's on masked weights. Other Linen layers read their kernel
through ``self.param`` and always get it unpacked.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx, struct
from flax.core import meta
from flax.nnx.nn import dtypes

from nmjax import backends, export
from nmjax.backends import Backend, Problem
from nmjax.export import PackedLeaf, is_packed
from nmjax.nn.nnx import SparseLinear

_NOT_LIFTED = ("a packed kernel cannot be lifted over nn.scan/nn.vmap (its packed values and "
               "metadata have no per-layer axis): serve such a model from its dense masked "
               "parameters (nmjax.export.unpack_params)")


class PackedKernel(struct.PyTreeNode, meta.AxisMetadata):
    """A Linen parameter box holding a :class:`~nmjax.export.PackedLeaf`; ``self.param``
    unboxes it into the dense masked kernel."""

    packed: PackedLeaf

    def unbox(self) -> jax.Array:
        return export.unpack_leaf(self.packed)

    def replace_boxed(self, val: Any) -> Any:
        raise TypeError("a packed kernel is read-only (packed inference); train the dense "
                        "parameters and pack them again")

    # A packed leaf's values and metadata have no per-layer axis to split off: a model whose
    # layers are lifted by nn.scan / nn.vmap is served from its dense masked parameters.
    def add_axis(self, index: int, params: dict[Any, Any]) -> Any:
        raise TypeError(_NOT_LIFTED)

    def remove_axis(self, index: int, params: dict[Any, Any]) -> Any:
        raise TypeError(_NOT_LIFTED)


class PackedMasks(PackedKernel):
    """A ``"nm_masks"`` box: unboxes into the :class:`~nmjax.masks.Masks` of a packed leaf."""

    def unbox(self) -> Any:
        return export.leaf_masks(self.packed)


def _nested(paths: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in paths.items():
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def packed_variables(packed_params: Any) -> dict[str, Any]:
    """Linen ``variables`` for packed inference.

    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> from nmjax.export import pack_params
    >>> from nmjax.tree import MaskRule, apply_masks, build_masks
    >>> model = nn.Dense(4)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 16)))["params"]
    >>> masks = build_masks(params, MaskRule("2:4", include="kernel", axis=0))
    >>> packed = pack_params(params, masks)
    >>> x = jnp.ones((2, 16))
    >>> y = jax.jit(model.apply)(packed_variables(packed), x)
    >>> bool((y == model.apply({"params": apply_masks(params, masks)}, x)).all())
    True

    Args:
      packed_params: :func:`nmjax.export.pack_params` of a Linen ``params`` tree (the
        ``"params"`` collection's content).

    Returns:
      ``{"params": ..., "nm_masks": ...}``: the packed leaves boxed as
      :class:`PackedKernel`, and their masks as :class:`PackedMasks` laid out like
      ``params`` (read only by static-mode sparse layers; the boxes share the arrays).
    """
    params = jax.tree_util.tree_map(lambda x: PackedKernel(x) if is_packed(x) else x,
                                    packed_params, is_leaf=is_packed)
    flat = jax.tree_util.tree_flatten_with_path(packed_params, is_leaf=is_packed)[0]
    masks = {tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp): PackedMasks(x)
             for kp, x in flat if is_packed(x)}
    return {"params": params, "nm_masks": _nested(masks)}


class PackedParam(nnx.Param):
    """An ``nnx.Param`` whose value is a :class:`~nmjax.export.PackedLeaf`."""


class PackedLinear(nnx.Module):
    """``nnx.Linear`` for inference with a packed kernel ``(in, out)``.

    The forward product runs through a backend (:mod:`nmjax.backends`), resolved per call
    shape like :func:`nmjax.ops.nm_dense`'s: a kernel backend with a ``forward_packed``
    entry (the Pallas sparse-wgmma GEMM on an sm_90 GPU) takes the packed values and index
    metadata directly, reshuffled into its operand (:func:`nmjax.kernels.forward_operand`),
    and no dense kernel is built; a kernel backend without one gets the unpacked kernel and
    its mask; the reference (every CPU, and ``"auto"`` where no kernel is measured faster)
    unpacks the kernel and runs the same product as ``nnx.Linear``, so the outputs equal
    the dense layer's on the masked kernel bit for bit.

    Attributes:
      kernel: :class:`PackedParam` of the packed ``(in, out)`` kernel.
      bias: ``nnx.Param`` ``(out,)`` or ``None``.
      backend: ``"auto"`` (default), ``"reference"``, a kernel factory's name or a
        :class:`~nmjax.backends.Backend`.
    """

    def __init__(self, kernel: PackedLeaf, bias: jax.Array | None = None, *,
                 dtype: Any = None, precision: Any = None, backend: Any = "auto"):
        if not is_packed(kernel) or len(kernel.shape) != 2:
            raise TypeError(f"kernel must be a rank-2 nmjax.export.PackedLeaf, got "
                            f"{type(kernel).__name__} {getattr(kernel, 'shape', '')}")
        self.in_features, self.out_features = kernel.shape
        self.kernel = PackedParam(kernel)
        self.bias = nnx.Param(bias) if bias is not None else nnx.data(None)
        self.dtype = dtype
        self.precision = precision
        self.backend = backends.check_backend(backend)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        # Unpack only once the inputs exist, so that XLA does not unpack every layer's kernel
        # up front (6 layers 512x512 f32: 2 MiB of temporaries instead of 9).
        packed, inputs = jax.lax.optimization_barrier((self.kernel.get_value(), inputs))
        bias = self.bias.get_value() if self.bias is not None else None
        y = packed_product(inputs, packed, backend=self.backend, dtype=self.dtype,
                           precision=self.precision)
        if y is None:  # the reference: unpack, and the product of nnx.Linear
            kernel = export.unpack_leaf(packed)
            inputs, kernel, bias = dtypes.promote_dtype((inputs, kernel, bias),
                                                        dtype=self.dtype)
            y = jax.lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                                    precision=self.precision)
        elif bias is not None:
            bias = bias.astype(y.dtype)
        return y if bias is None else y + bias.reshape((1,) * (y.ndim - 1) + (-1,))


def packed_product(inputs: jax.Array, packed: PackedLeaf, *, backend: Backend | str,
                   dtype: Any = None, precision: Any = None) -> jax.Array | None:
    """``inputs @ W`` through a kernel backend, ``W`` the ``(in, out)`` kernel held packed:
    ``(..., in) -> (..., out)`` in the compute dtype; ``None`` where the backend resolved for
    this product (:func:`nmjax.backends.resolve`) is the reference, for the caller to unpack
    and run its own dense product (bit for bit the dense layer's).

    A backend with ``forward_packed`` (the Pallas sparse-wgmma GEMM) takes the packed
    values and metadata directly; another kernel backend gets the unpacked kernel and its
    mask. Forward only (inference): the kernel path defines no gradient for ``W``.

    Args:
      inputs: ``(..., in)``.
      packed: the kernel ``(in, out)`` (2:4 along ``in``, axis 0, for the Pallas kernel).
      backend: a validated ``backend=`` value (:func:`nmjax.backends.check_backend`).
      dtype: the compute dtype (``None``: promoted from ``inputs`` and the kernel, as
        ``nnx.Linear`` does); precision: as ``nnx.Linear``'s.
    """
    n_in, n_out = packed.shape
    dtype = dtypes.canonicalize_dtype(inputs, packed.weight.values, dtype=dtype)
    w = packed.weight
    nm = (w.n, w.m) if w.axis == 0 else None  # groups along in: the forward's N:M
    problem = Problem("forward", math.prod(inputs.shape[:-1]), n_in, n_out, dtype,
                      *backends.device_facts(), nm, False, precision)
    chosen = backends.resolve(backend, problem)
    if chosen is backends.REFERENCE:
        return None
    x2d = inputs.reshape(-1, n_in).astype(dtype)
    if chosen.forward_packed is not None:
        y = chosen.forward_packed(x2d, w, precision=precision)
    else:
        y = chosen.run(problem, x2d, export.unpack_leaf(packed), export.leaf_masks(packed).fwd)
    return y.reshape(*inputs.shape[:-1], n_out)


def _packed_linear(layer: SparseLinear) -> PackedLinear:
    kernel = layer.kernel.get_value()
    packed = export.pack_params({"kernel": kernel}, {"kernel": layer.masks()}, axes=0)
    bias = layer.bias.get_value() if layer.bias is not None else None
    return PackedLinear(packed["kernel"], bias, dtype=layer.dtype, precision=layer.precision,
                        backend=layer.sparsity.backend)


def pack_model(model: nnx.Module) -> nnx.Module:
    """A copy of the NNX ``model`` with every :class:`~nmjax.nn.SparseLinear` replaced by a
    :class:`PackedLinear` holding its kernel packed under the layer's current masks.

    Outputs equal the dense model's on masked weights; ``nnx.state(packed, nnx.Param)``
    holds the packed arrays. ``model`` is not modified; tied layers stay tied.

    Raises:
      TypeError: ``model`` is not an NNX module, or is itself a ``SparseLinear``.
      ValueError: ``model`` has no ``SparseLinear`` layer.
    """
    if not isinstance(model, nnx.Module) or isinstance(model, SparseLinear):
        raise TypeError(f"model must be an NNX module containing SparseLinear layers, got "
                        f"{type(model).__name__}")
    model = nnx.clone(model)
    swapped: dict[int, PackedLinear] = {}
    for _, node in list(nnx.iter_graph(model)):
        children = (vars(node).items() if isinstance(node, nnx.Module)
                    else node.items() if isinstance(node, dict | nnx.Dict)
                    else enumerate(node) if isinstance(node, list | nnx.List) else ())
        for key, child in list(children):
            if not isinstance(child, SparseLinear):
                continue
            if id(child) not in swapped:
                swapped[id(child)] = _packed_linear(child)
            if isinstance(node, nnx.Module):
                setattr(node, key, swapped[id(child)])
            else:
                node[key] = swapped[id(child)]
    if not swapped:
        raise ValueError("model has no SparseLinear layer to pack (nmjax.nn.sparsify it first)")
    return model
