"""Flax NNX: ``SparseLinear``, ``SparseConv`` and ``sparsify`` for an existing NNX model.

The layers subclass ``nnx.Linear`` / ``nnx.Conv``: same constructor, same ``kernel`` /
``bias`` parameters. Static masks are :class:`NMMask` variables (not ``nnx.Param``, so
``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and ``nnx.state(model, nnx.Param)`` skip them).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from nmjax.masks import BiMask, Masks
from nmjax.nn import _core
from nmjax.nn._core import Sparsity, check_sparsity

DEFAULT = Sparsity()  # 2:4 along in, dynamic


class NMMask(nnx.Variable):
    """A static N:M mask (or Bi-Mask permutation) held by a sparse NNX layer."""


class NMDecay(nnx.Variable):
    """SR-STE's λ of a sparse NNX layer, when given as a JAX scalar: state, so a jitted step
    may change it (``layer.decay.set_value(x)``) without recompiling."""


def _decay_state(sp: Sparsity) -> Any:
    """A layer's ``decay`` field: an :class:`NMDecay` for a JAX-scalar λ, else ``None``."""
    return NMDecay(sp.decay) if isinstance(sp.decay, jax.Array) else nnx.data(None)


def _refuse_preferred_element_type(value: Any, cls: str) -> None:
    if value is not None:
        raise ValueError(f"{cls} does not take preferred_element_type={value!r}: its products "
                         "accumulate in float32 and return the inputs' promoted dtype (cast the "
                         "output, or leave the layer dense)")


def _kernel_axis(layer: Any) -> tuple[jax.Array, int]:
    if isinstance(layer, SparseConv):
        kernel = layer._kernel()
        return kernel, kernel.ndim - 2
    return layer.kernel.get_value(), 0


def set_masks(layer: Any, masks: Masks) -> None:
    """Stores ``masks`` as a static sparse layer's :class:`NMMask` variables (in place)."""
    if not isinstance(masks, Masks):
        raise TypeError(f"masks must be an nmjax.masks.Masks, got {type(masks).__name__}")
    _core.check_mask_shapes(masks, layer.kernel.get_value().shape, "kernel")
    layer.fwd_mask = NMMask(masks.fwd)
    layer.bwd_mask = NMMask(masks.bwd)
    layer.perm = NMMask(masks.perm) if masks.perm is not None else nnx.data(None)


def refresh_layer(layer: Any) -> None:
    """Recomputes a sparse layer's :class:`NMMask` variables from its current kernel (a
    Bi-Mask layer keeps its stored permutation)."""
    kernel, axis = _kernel_axis(layer)
    perm = None if layer.perm is None else layer.perm.get_value()
    set_masks(layer, _core.compute_masks(kernel, axis, layer.sparsity, perm=perm))


def _decay(layer: Any) -> Any:
    return layer.decay.get_value() if layer.decay is not None else layer.sparsity.decay


def _masks(layer: Any, kernel: jax.Array, axis: int) -> Masks:
    perm = None if layer.perm is None else layer.perm.get_value()
    if layer.sparsity.mode == "dynamic":
        return _core.compute_masks(kernel, axis, layer.sparsity, perm=perm)
    if layer.fwd_mask is None:
        raise ValueError("static masks are missing; call nmjax.nn.refresh(model)")
    masks = Masks(layer.fwd_mask.get_value(), layer.bwd_mask.get_value(), perm)
    _core.check_mask_shapes(masks, kernel.shape, "kernel")
    return masks


def _constrain(y: jax.Array, out_sharding: Any) -> jax.Array:
    """``nnx.Linear``'s ``out_sharding``: the output's sharding (a ``NamedSharding``, or a
    ``PartitionSpec`` under a mesh)."""
    return y if out_sharding is None else jax.lax.with_sharding_constraint(y, out_sharding)


class SparseLinear(nnx.Linear):
    """``nnx.Linear`` whose kernel ``(in, out)`` is N:M sparse in both backprop products.

    Takes ``nnx.Linear``'s arguments plus ``sparsity`` (:class:`nmjax.nn.Sparsity`).

    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> layer = SparseLinear(16, 8, sparsity=Sparsity("2:4 transposable"), rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 16))).shape                    # (..., in) -> (..., out)
    (2, 8)
    """

    def __init__(self, in_features: int, out_features: int, *,
                 sparsity: Sparsity = DEFAULT, **kwargs: Any):
        _refuse_preferred_element_type(kwargs.get("preferred_element_type"), "SparseLinear")
        super().__init__(in_features, out_features, **kwargs)
        self.sparsity: Sparsity = check_sparsity(sparsity)
        # Static masks (NMMask variables, set by refresh_layer / set_masks) or None.
        self.fwd_mask: NMMask | None = nnx.data(None)
        self.bwd_mask: NMMask | None = nnx.data(None)
        self.perm: NMMask | None = nnx.data(None)
        self.decay: NMDecay | None = _decay_state(self.sparsity)
        if self.sparsity.mode == "static":
            refresh_layer(self)

    def masks(self) -> Masks:
        """The masks the next call uses: ``Masks(fwd, bwd, perm)`` of the kernel's shape."""
        return _masks(self, self.kernel.get_value(), 0)

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        if self.dot_general is not jax.lax.dot_general:
            raise ValueError("SparseLinear replaces the product; a custom dot_general is not "
                             "supported")
        kernel = self.kernel.get_value()
        masks = _masks(self, kernel, 0)
        bias = self.bias.get_value() if self.bias is not None else None
        inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        y = _core.dense_product(inputs, kernel, bias, masks, self.sparsity, self.precision,
                                _decay(self))
        return _constrain(y, out_sharding)


class SparseConv(nnx.Conv):
    """``nnx.Conv`` whose ``HWIO`` kernel is N:M sparse (forward groups along ``I``).

    Takes ``nnx.Conv``'s arguments plus ``sparsity``; Bi-Mask is Dense-only.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: Any,
                 strides: Any = 1, *, sparsity: Sparsity = DEFAULT, **kwargs: Any):
        _refuse_preferred_element_type(kwargs.get("preferred_element_type"), "SparseConv")
        super().__init__(in_features, out_features, kernel_size, strides, **kwargs)
        self.sparsity: Sparsity = check_sparsity(sparsity)
        # Static masks (NMMask variables, set by refresh_layer / set_masks) or None.
        self.fwd_mask: NMMask | None = nnx.data(None)
        self.bwd_mask: NMMask | None = nnx.data(None)
        self.perm: NMMask | None = nnx.data(None)
        self.decay: NMDecay | None = _decay_state(self.sparsity)
        if self.sparsity.mode == "static":
            refresh_layer(self)

    def _kernel(self) -> jax.Array:
        kernel = self.kernel.get_value()
        return kernel * self.mask if self.mask is not None else kernel

    def masks(self) -> Masks:
        """The masks the next call uses: ``Masks(fwd, bwd, perm)`` of the kernel's shape."""
        kernel = self._kernel()
        return _masks(self, kernel, kernel.ndim - 2)

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        if self.conv_general_dilated is not jax.lax.conv_general_dilated:
            raise ValueError("SparseConv replaces the product; a custom conv_general_dilated "
                             "is not supported")
        kernel = self._kernel()
        masks = _masks(self, kernel, kernel.ndim - 2)
        bias = self.bias.get_value() if self.bias is not None else None
        inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        y = _core.conv_product(
            inputs, kernel, bias, masks, self.sparsity, kernel_size=self.kernel_size,
            strides=self.strides, padding=self.padding, input_dilation=self.input_dilation,
            kernel_dilation=self.kernel_dilation, feature_group_count=self.feature_group_count,
            precision=self.precision, decay=_decay(self))
        return _constrain(y, out_sharding)


SPARSE_LAYERS = (SparseLinear, SparseConv)


def _children(node: Any):
    """``(key, child)`` of a graph node: a module's attributes, a list's or dict's items."""
    if isinstance(node, nnx.Module):
        return [(k, v) for k, v in vars(node).items() if not k.startswith("_pytree__")]
    if isinstance(node, dict | nnx.Dict):
        return list(node.items())
    if isinstance(node, list | nnx.List):
        return list(enumerate(node))
    return []


def sparse_layers(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """``[(kernel path, layer)]`` of the sparse layers of ``model``, in graph order (paths as
    in ``nnx.state(model, nnx.Param)``)."""
    return [("/".join(str(p) for p in (*path, "kernel")), node)
            for path, node in nnx.iter_graph(model) if isinstance(node, SPARSE_LAYERS)]


def search_model(model: nnx.Module, key: jax.Array) -> None:
    """Searches a new Bi-Mask permutation for every Bi-Mask layer of ``model`` (in place),
    warm-started from its current one, with its pattern's search settings.

    The Bi-Mask recipe: call it every I steps (the paper: 100). Dynamic layers recompute
    their forward and backward masks from the weights at every call, the backward one in
    the stored permutation's order; static layers also refresh their masks here.
    """
    from nmjax.nn import _sparsify

    if _sparsify.is_sparse_nnx(model):
        _sparsify.refresh_nnx(model, key)
        return
    layers = [node for _, node in sparse_layers(model)
              if isinstance(node.sparsity.pattern, BiMask)]
    for layer, k in zip(layers, jax.random.split(key, max(len(layers), 1)), strict=False):
        init = None if layer.perm is None else layer.perm.get_value()
        perm = _core.search_perm(_kernel_axis(layer)[0], layer.sparsity, k, init=init)
        layer.perm = NMMask(perm)
        if layer.sparsity.mode == "static":
            refresh_layer(layer)


def refresh_model(model: nnx.Module) -> None:
    """Recomputes the static masks of ``model`` from its current weights (in place, the NNX
    way): a model from :func:`nmjax.nn.sparsify` with a plan (``mode="static"``; a stored
    Bi-Mask permutation is kept), or every static sparse layer of a model built from
    :class:`SparseLinear`/:class:`SparseConv`. Dynamic models need no refresh."""
    from nmjax.nn import _sparsify

    if _sparsify.is_sparse_nnx(model):
        _sparsify.refresh_nnx(model)
        return
    for _, node in sparse_layers(model):
        if node.sparsity.mode == "static":
            refresh_layer(node)


__all__ = [
    "NMDecay",
    "NMMask",
    "SPARSE_LAYERS",
    "SparseConv",
    "SparseLinear",
    "refresh_layer",
    "refresh_model",
    "search_model",
    "set_masks",
    "sparse_layers",
]
