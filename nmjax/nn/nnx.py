"""Flax NNX: ``SparseLinear``, ``SparseConv`` and ``sparsify`` for an existing NNX model.

The layers subclass ``nnx.Linear`` / ``nnx.Conv``: same constructor, same ``kernel`` /
``bias`` parameters. Static masks are :class:`NMMask` variables (not ``nnx.Param``, so
``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and ``nnx.state(model, nnx.Param)`` skip them).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from nmjax.masks import BiMask, Masks, Pattern
from nmjax.nn import _core
from nmjax.nn._core import Sparsity, check_sparsity
from nmjax.nn.linen import as_rule
from nmjax.tree import MaskRule

DEFAULT = Sparsity()  # 2:4 along in, dynamic


class NMMask(nnx.Variable):
    """A static N:M mask (or Bi-Mask permutation) held by a sparse NNX layer."""


class NMDecay(nnx.Variable):
    """SR-STE's λ of a sparse NNX layer, when given as a JAX scalar: state, so a jitted step
    may change it (``layer.decay.set_value(x)``) without recompiling."""


def _init_state(layer: Any) -> None:
    layer.fwd_mask = nnx.data(None)
    layer.bwd_mask = nnx.data(None)
    layer.perm = nnx.data(None)
    decay = layer.sparsity.decay
    layer.decay = NMDecay(decay) if isinstance(decay, jax.Array) else nnx.data(None)
    if layer.sparsity.mode == "static":
        refresh_layer(layer)


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
        raise ValueError("static masks are missing; call nmjax.nn.nnx.refresh_masks(model)")
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
        super().__init__(in_features, out_features, **kwargs)
        self.sparsity = check_sparsity(sparsity)
        _init_state(self)

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
        super().__init__(in_features, out_features, kernel_size, strides, **kwargs)
        self.sparsity = check_sparsity(sparsity)
        _init_state(self)

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
    dynamic = Sparsity(sp.pattern)  # nothing is computed while abstract
    if type(layer) is nnx.Linear:
        new = nnx.eval_shape(lambda: SparseLinear(layer.in_features, layer.out_features,
                                                  use_bias=layer.use_bias, sparsity=dynamic,
                                                  rngs=nnx.Rngs(0)))
        base = nnx.Linear
    else:
        new = nnx.eval_shape(lambda: SparseConv(
            layer.in_features, layer.out_features, layer.kernel_size, use_bias=layer.use_bias,
            feature_group_count=layer.feature_group_count, sparsity=dynamic,
            rngs=nnx.Rngs(0)))
        base = nnx.Conv
    for name in _COPIED[base]:
        setattr(new, name, getattr(layer, name))
    new.kernel = layer.kernel
    new.bias = layer.bias if layer.bias is not None else nnx.data(None)
    new.sparsity = sp
    _init_state(new)
    return new


def _children(node: Any):
    """``(key, child)`` of a graph node: a module's attributes, a list's or dict's items."""
    if isinstance(node, nnx.Module):
        return [(k, v) for k, v in vars(node).items() if not k.startswith("_pytree__")]
    if isinstance(node, dict | nnx.Dict):
        return list(node.items())
    if isinstance(node, list | nnx.List):
        return list(enumerate(node))
    return []


def _set_child(parent: Any, key: Any, child: Any) -> None:
    if isinstance(parent, nnx.Module) and isinstance(key, str):
        setattr(parent, key, child)
    else:
        parent[key] = child


def sparsify(model: nnx.Module, rule: MaskRule | Pattern | str, *, pattern: str | None = None,
             mode: str = "dynamic", decay: float | jax.Array = 0.0,
             backend: Any = "auto") -> nnx.Module:
    """A copy of the NNX ``model`` with each ``nnx.Linear``/``nnx.Conv`` that ``rule`` selects
    swapped for :class:`SparseLinear`/:class:`SparseConv`.

    Selection is :meth:`nmjax.tree.MaskRule.select` on the kernel's path in
    ``nnx.state(model, nnx.Param)`` (``"layers/0/kernel"``) with the layer's real type, so
    other layer types (``LinearGeneral``, ``Einsum``) are never picked by a default rule.
    The sparse layers keep the (copied) ``kernel`` and ``bias`` variables, so
    ``nnx.state(sparse, nnx.Param)`` has the dense model's structure and a dense checkpoint
    restores into it with ``nnx.update``. ``model`` is not modified. A layer reachable from
    several places (tied layers) is swapped everywhere for one sparse layer. Layers that are
    sparse already are left as they are, unless the rule selects them with other settings,
    which is an error (sparsify the dense model instead).

    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> class MLP(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.body = nnx.Linear(16, 32, rngs=rngs)
    ...         self.head = nnx.Linear(32, 10, rngs=rngs)
    ...     def __call__(self, x):
    ...         return self.head(nnx.relu(self.body(x)))
    >>> sparse = sparsify(MLP(nnx.Rngs(0)), MaskRule("2:4 transposable", exclude="head"))
    >>> type(sparse.body).__name__, type(sparse.head).__name__
    ('SparseLinear', 'Linear')
    >>> optimizer = nnx.Optimizer(sparse, optax.adam(1e-3), wrt=nnx.Param)
    >>> sparse(jnp.ones((4, 16))).shape
    (4, 10)

    Args:
      model: an NNX module.
      rule: a :class:`~nmjax.tree.MaskRule`, a pattern spec, or a shorthand (``"2:4"``).
      pattern: with a shorthand string, the kind (``"transposable"``, ``"bimask"``).
      mode, decay, backend: as :class:`nmjax.nn.Sparsity`.

    Returns:
      The sparse copy.

    Raises:
      TypeError: ``model`` not an NNX module, ``rule`` of the wrong type.
      ValueError: the rule selects a kernel of a layer other than ``nnx.Linear``/``nnx.Conv``
        by ``include=``, a selected kernel cannot take the pattern, a sparse layer selected
        with other settings, or the model is itself a selected layer.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax.nnx Module, got {type(model).__name__}; "
                        "for Linen use nmjax.nn.linen.sparsify")
    rule = as_rule(rule, pattern)
    sp = Sparsity(rule.pattern, mode=mode, backend=backend, decay=decay)
    model = nnx.clone(model)
    new_by_id: dict[int, nnx.Module] = {}
    containers = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module | list | dict | nnx.List | nnx.Dict):
            containers.append(node)
        if not isinstance(node, nnx.Module):
            continue
        kernel = getattr(node, "kernel", None)
        if not isinstance(kernel, nnx.Param):
            continue
        kpath = "/".join(str(p) for p in (*path, "kernel"))
        kind = {nnx.Linear: "dense", nnx.Conv: "conv", SparseLinear: "dense",
                SparseConv: "conv"}.get(type(node))
        try:
            axis = rule.select(kpath, kernel.get_value(), kind)
        except ValueError:
            if kind is not None:
                raise
            axis = 0  # include= matched a layer type sparsify cannot take: reported below
        if axis is None:
            continue
        if isinstance(node, SPARSE_LAYERS):
            if node.sparsity != sp:
                raise ValueError(
                    f"layer {kpath!r} is sparse already ({node.sparsity.label}) and the rule "
                    f"selects it with other settings ({sp.label}); sparsify the dense model, "
                    "or exclude the layer from the rule")
            continue
        if kind is None:
            raise ValueError(
                f"rule {rule.label!r} selects {kpath!r} of a {type(node).__name__} layer "
                f"(kernel {tuple(kernel.get_value().shape)}), but sparsify supports "
                "nnx.Linear and nnx.Conv only; exclude it from the rule (MaskRule(exclude=...))")
        if not path:
            raise ValueError("model is itself a single layer; build SparseLinear/SparseConv "
                             "directly, or wrap it in a module")
        new_by_id[id(node)] = _swap(node, sp)
    for parent in containers:
        for key, child in _children(parent):
            new = new_by_id.get(id(child))
            if new is not None:
                _set_child(parent, key, new)
    return model


def sparse_layers(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """``[(kernel path, layer)]`` of the sparse layers of ``model``, in graph order (paths as
    in ``nnx.state(model, nnx.Param)``)."""
    return [("/".join(str(p) for p in (*path, "kernel")), node)
            for path, node in nnx.iter_graph(model) if isinstance(node, SPARSE_LAYERS)]


def layer_kinds(model: nnx.Module) -> dict[str, str | None]:
    """``{kernel path: "dense" | "conv" | None}`` for every layer with a ``kernel`` param of
    an NNX ``model``, from the layers' real types (for :func:`nmjax.tree.build_masks`)."""
    kinds = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and isinstance(getattr(node, "kernel", None),
                                                       nnx.Param):
            kinds["/".join(str(p) for p in (*path, "kernel"))] = {
                nnx.Linear: "dense", nnx.Conv: "conv", SparseLinear: "dense",
                SparseConv: "conv"}.get(type(node))
    return kinds


def search_perms(model: nnx.Module, key: jax.Array) -> None:
    """Searches a new Bi-Mask permutation for every Bi-Mask layer of ``model`` (in place),
    warm-started from its current one, with its pattern's search settings.

    The Bi-Mask recipe: call it every I steps (the paper: 100). Dynamic layers recompute
    their forward and backward masks from the weights at every call, the backward one in
    the stored permutation's order; static layers also refresh their masks here.
    """
    layers = [node for _, node in sparse_layers(model)
              if isinstance(node.sparsity.pattern, BiMask)]
    for layer, k in zip(layers, jax.random.split(key, max(len(layers), 1)), strict=False):
        init = None if layer.perm is None else layer.perm.get_value()
        perm = _core.search_perm(_kernel_axis(layer)[0], layer.sparsity, k, init=init)
        layer.perm = NMMask(perm)
        if layer.sparsity.mode == "static":
            refresh_layer(layer)


def refresh_masks(model: nnx.Module) -> None:
    """Recomputes the static masks of every sparse layer in ``model`` from its current kernel
    (in place, the NNX way). Dynamic layers need no refresh."""
    for _, node in sparse_layers(model):
        if node.sparsity.mode == "static":
            refresh_layer(node)
