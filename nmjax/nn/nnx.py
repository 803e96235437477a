"""Flax NNX: ``SparseLinear``, ``SparseConv`` and ``sparsify`` for an existing NNX model.

The layers subclass ``nnx.Linear`` / ``nnx.Conv``: same constructor, same ``kernel`` /
``bias`` parameters. Static masks are :class:`NMMask` variables (not ``nnx.Param``, so
``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and ``nnx.state(model, nnx.Param)`` skip them).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from nmjax.nn import _core
from nmjax.nn._core import LayerMasks, Sparsity
from nmjax.tree import MaskRule

DEFAULT = Sparsity()  # 2:4 along in, dynamic


class NMMask(nnx.Variable):
    """A static N:M mask (or Bi-Mask permutation) held by a sparse NNX layer."""


def _init_masks(layer: Any) -> None:
    layer.fwd_mask = nnx.data(None)
    layer.bwd_mask = nnx.data(None)
    layer.perm = nnx.data(None)
    if layer.sparsity.mode == "static":
        refresh_layer(layer)


def refresh_layer(layer: Any) -> None:
    """Recomputes a static sparse layer's :class:`NMMask` variables from its current kernel."""
    if isinstance(layer, SparseConv):
        kernel = layer._kernel()
        axis = kernel.ndim - 2
    else:
        kernel, axis = layer.kernel.get_value(), 0
    masks = _core.split_masks(_core.compute_masks(kernel, axis, layer.sparsity))
    layer.fwd_mask = NMMask(masks.fwd)
    layer.bwd_mask = NMMask(masks.bwd)
    layer.perm = NMMask(masks.perm) if masks.perm is not None else nnx.data(None)


def _masks(layer: Any, kernel: jax.Array, axis: int) -> LayerMasks:
    if layer.sparsity.mode == "dynamic":
        perm = None if layer.perm is None else layer.perm.get_value()
        return _core.split_masks(_core.compute_masks(kernel, axis, layer.sparsity, perm=perm))
    if layer.fwd_mask is None:
        raise ValueError("static masks are missing; call nmjax.nn.nnx.refresh_masks(model)")
    perm = None if layer.perm is None else layer.perm.get_value()
    masks = LayerMasks(layer.fwd_mask.get_value(), layer.bwd_mask.get_value(), perm)
    _core.check_mask_shapes(masks, kernel.shape, "kernel")
    return masks


class SparseLinear(nnx.Linear):
    """``nnx.Linear`` whose kernel ``(in, out)`` is N:M sparse in both backprop products.

    Takes ``nnx.Linear``'s arguments plus ``sparsity`` (:class:`nmjax.nn.Sparsity`).

    Example::

      layer = SparseLinear(256, 128, sparsity=Sparsity(2, 4, "transposable"),
                           rngs=nnx.Rngs(0))
      y = layer(x)                               # x: (..., 256) -> (..., 128)
    """

    def __init__(self, in_features: int, out_features: int, *,
                 sparsity: Sparsity = DEFAULT, **kwargs: Any):
        super().__init__(in_features, out_features, **kwargs)
        if not isinstance(sparsity, Sparsity):
            raise TypeError(f"sparsity must be an nmjax.nn.Sparsity, got {sparsity!r}")
        self.sparsity = sparsity
        _init_masks(self)

    def masks(self) -> LayerMasks:
        """The masks the next call uses: ``fwd``, ``bwd`` of the kernel's shape, ``perm``."""
        return _masks(self, self.kernel.get_value(), 0)

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        if self.dot_general is not jax.lax.dot_general:
            raise ValueError("SparseLinear replaces the product; a custom dot_general is not "
                             "supported")
        kernel = self.kernel.get_value()
        masks = _masks(self, kernel, 0)
        bias = self.bias.get_value() if self.bias is not None else None
        inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        return _core.dense_product(inputs, kernel, bias, masks, self.sparsity, self.precision)


class SparseConv(nnx.Conv):
    """``nnx.Conv`` whose ``HWIO`` kernel is N:M sparse (forward groups along ``I``).

    Takes ``nnx.Conv``'s arguments plus ``sparsity``; Bi-Mask is Dense-only.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: Any,
                 strides: Any = 1, *, sparsity: Sparsity = DEFAULT, **kwargs: Any):
        super().__init__(in_features, out_features, kernel_size, strides, **kwargs)
        if not isinstance(sparsity, Sparsity):
            raise TypeError(f"sparsity must be an nmjax.nn.Sparsity, got {sparsity!r}")
        self.sparsity = sparsity
        _init_masks(self)

    def _kernel(self) -> jax.Array:
        kernel = self.kernel.get_value()
        return kernel * self.mask if self.mask is not None else kernel

    def masks(self) -> LayerMasks:
        """The masks the next call uses: ``fwd``, ``bwd`` of the kernel's shape, ``perm``."""
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
        return _core.conv_product(
            inputs, kernel, bias, masks, self.sparsity, kernel_size=self.kernel_size,
            strides=self.strides, padding=self.padding, input_dilation=self.input_dilation,
            kernel_dilation=self.kernel_dilation, feature_group_count=self.feature_group_count,
            precision=self.precision)


_COPIED = {  # attributes a sparse layer takes over from the dense one
    nnx.Linear: ("in_features", "out_features", "use_bias", "dtype", "param_dtype", "precision",
                 "dot_general", "promote_dtype", "preferred_element_type"),
    nnx.Conv: ("in_features", "out_features", "kernel_size", "kernel_shape", "strides",
               "padding", "input_dilation", "kernel_dilation", "feature_group_count",
               "use_bias", "mask", "dtype", "param_dtype", "precision", "conv_general_dilated",
               "promote_dtype", "preferred_element_type"),
}


def _swap(layer: nnx.Module, sp: Sparsity) -> nnx.Module:
    """A sparse layer holding ``layer``'s own kernel/bias variables (no re-initialisation)."""
    dynamic = Sparsity.from_rule(sp.rule(), mode="dynamic")  # nothing computed while abstract
    if type(layer) is nnx.Linear:
        new = nnx.eval_shape(lambda: SparseLinear(layer.in_features, layer.out_features,
                                                  use_bias=layer.use_bias, sparsity=dynamic,
                                                  rngs=nnx.Rngs(0)))
        base = nnx.Linear
    else:
        new = nnx.eval_shape(lambda: SparseConv(
            layer.in_features, layer.out_features, layer.kernel_size, use_bias=layer.use_bias,
            feature_group_count=layer.feature_group_count, rngs=nnx.Rngs(0)))
        base = nnx.Conv
    for name in _COPIED[base]:
        setattr(new, name, getattr(layer, name))
    new.kernel = layer.kernel
    new.bias = layer.bias if layer.bias is not None else nnx.data(None)
    new.sparsity = sp
    _init_masks(new)
    return new


def _set_child(parent: Any, key: Any, child: Any) -> None:
    if isinstance(key, str):
        setattr(parent, key, child)
    else:
        parent[key] = child


def sparsify(model: nnx.Module, rule: MaskRule, *, mode: str = "dynamic", decay: float = 0.0,
             backend: str = "auto") -> nnx.Module:
    """A copy of the NNX ``model`` with each ``nnx.Linear``/``nnx.Conv`` that ``rule`` selects
    swapped for :class:`SparseLinear`/:class:`SparseConv`.

    Selection is :meth:`nmjax.tree.MaskRule.select` on the kernel's path in
    ``nnx.state(model, nnx.Param)`` (``"layers/0/kernel"``), the paths
    :func:`nmjax.tree.build_masks` sees. The sparse layers keep the (copied) ``kernel`` and
    ``bias`` variables, so ``nnx.state(sparse, nnx.Param)`` has the dense model's structure
    and a dense checkpoint restores into it with ``nnx.update``. ``model`` is not modified.
    A layer object referenced from two places in the graph (tied layers) is swapped only at
    the first path ``nnx.iter_graph`` reports; untie it, or build the sparse layers yourself.
    ``rule.pattern_kwargs`` must be hashable here (they become static module attributes).

    Example::

      sparse = sparsify(model, MaskRule(2, 4, pattern="transposable"))
      optimizer = nnx.Optimizer(sparse, optax.adam(1e-3), wrt=nnx.Param)

    Args:
      model: an NNX module.
      rule: which kernels, which pattern.
      mode, decay, backend: as :class:`nmjax.nn.Sparsity`.

    Returns:
      The sparse copy.

    Raises:
      TypeError: ``model`` not an NNX module, ``rule`` not a ``MaskRule``.
      ValueError: the rule selects a kernel of a layer other than ``nnx.Linear``/``nnx.Conv``
        (``LinearGeneral``, ``ConvTranspose``, ``Einsum``, ...), a selected kernel's grouped
        axis is not divisible by ``m``, or the model is itself a selected layer.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax.nnx Module, got {type(model).__name__}; "
                        "for Linen use nmjax.nn.linen.sparsify")
    if not isinstance(rule, MaskRule):
        raise TypeError(f"rule must be an nmjax.tree.MaskRule, got {type(rule).__name__}")
    sp = Sparsity.from_rule(rule, mode=mode, decay=decay, backend=backend)
    model = nnx.clone(model)
    swaps = []
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module) or isinstance(node, SparseLinear | SparseConv):
            continue
        kernel = getattr(node, "kernel", None)
        if not isinstance(kernel, nnx.Param):
            continue
        kpath = "/".join(str(p) for p in (*path, "kernel"))
        kind = {nnx.Linear: "dense", nnx.Conv: "conv"}.get(type(node))
        if rule.select(kpath, kernel.get_value(), kind=kind) is None:
            continue
        if type(node) not in (nnx.Linear, nnx.Conv):
            raise ValueError(
                f"rule {rule.label!r} selects {kpath!r} of a {type(node).__name__} layer "
                f"(kernel {tuple(kernel.get_value().shape)}), but sparsify supports "
                "nnx.Linear and nnx.Conv only; exclude it from the rule (MaskRule(exclude=...))")
        if not path:
            raise ValueError("model is itself a single layer; build SparseLinear/SparseConv "
                             "directly, or wrap it in a module")
        swaps.append((path, node))
    for path, node in swaps:
        parent = model
        for key in path[:-1]:
            parent = getattr(parent, key) if isinstance(key, str) else parent[key]
        _set_child(parent, path[-1], _swap(node, sp))
    return model


def search_perms(model: nnx.Module, key: jax.Array, **options: Any) -> None:
    """Searches a new Bi-Mask permutation for every dynamic ``"bimask"`` layer (in place).

    The Bi-Mask recipe: call it every I steps (the paper: 100); forward and backward masks
    are still recomputed from the weights at every call, the backward one in the stored
    permutation's order (an :class:`NMMask` ``perm`` variable). ``options`` go to
    :func:`nmjax.masks.search_permutation` (``method``, ``rounds``, ``num_candidates``).
    """
    layers = [node for _, node in nnx.iter_graph(model)
              if isinstance(node, SparseLinear) and node.sparsity.pattern == "bimask"
              and node.sparsity.mode == "dynamic"]
    for layer, k in zip(layers, jax.random.split(key, max(len(layers), 1)), strict=False):
        layer.perm = NMMask(_core.search_perm(layer.kernel.get_value(), layer.sparsity, k,
                                              **options))


def refresh_masks(model: nnx.Module) -> None:
    """Recomputes the static masks of every sparse layer in ``model`` from its current kernel
    (in place, the NNX way). Dynamic layers need no refresh."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, SparseLinear | SparseConv) and node.sparsity.mode == "static":
            refresh_layer(node)
