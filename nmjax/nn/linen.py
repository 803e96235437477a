"""Flax Linen: ``SparseDense``, ``SparseConv`` and ``sparsify`` for an existing Linen model.

Parameters are named and shaped exactly as in ``nn.Dense`` / ``nn.Conv`` (``kernel``,
``bias``), so a dense checkpoint loads unchanged. Static masks live in the ``"nm_masks"``
collection, laid out like ``params`` (``nm_masks/<layer path>/kernel``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen.dtypes import promote_dtype

from nmjax.masks import BiMask, Masks
from nmjax.nn import _core
from nmjax.nn._core import MASKS, USED_MASKS, Sparsity
from nmjax.nn._packed import PackedKernel, packed_product
from nmjax.tree import build_masks, path_str


def _path(mdl: nn.Module) -> str:
    return "/".join([*(str(p) for p in mdl.scope.path), "kernel"])


def _layer_masks(mdl: nn.Module, kernel: jax.Array, axis: int, sp: Sparsity) -> Masks:
    path = _path(mdl)
    if sp.mode == "dynamic":
        # Bi-Mask: a permutation searched every I steps may sit in nm_masks/<layer>/perm.
        perm = mdl.get_variable(MASKS, "perm") if mdl.has_variable(MASKS, "perm") else None
        masks = _core.compute_masks(kernel, axis, sp, path, perm)
    else:
        if not (mdl.has_variable(MASKS, "kernel") or mdl.is_mutable_collection(MASKS)):
            raise ValueError(
                f"static masks: the {MASKS!r} collection has no mask for {path!r}. Pass the "
                f"{MASKS!r} collection that init returned, or "
                f"nmjax.nn.refresh(params, plan) as variables[{MASKS!r}]")
        masks = mdl.variable(MASKS, "kernel", _core.compute_masks, kernel, axis, sp, path).value
        if not isinstance(masks, Masks):
            raise TypeError(f"static masks for {path!r} must be an nmjax.masks.Masks "
                            f"(fwd, bwd, perm), got {type(masks).__name__}; build them with "
                            "nmjax.nn.refresh(params, plan)")
        _core.check_mask_shapes(masks, kernel.shape, path)
    if not mdl.is_initializing():  # keep init's variables those of the dense model
        mdl.sow(USED_MASKS, "kernel", masks, init_fn=lambda: None, reduce_fn=lambda _, new: new)
    return masks


def dense_call(mdl: nn.Dense, inputs: jax.Array, sp: Sparsity) -> jax.Array:
    """The body of :class:`SparseDense`, on any bound ``nn.Dense``-like module ``mdl``."""
    if mdl.dot_general is not None or mdl.dot_general_cls is not None:
        raise ValueError(f"layer {_path(mdl)!r} sets a custom dot_general; nmjax replaces the "
                         "product and cannot combine it with yours")
    y = _packed_call(mdl, inputs, sp)
    if y is not None:
        return y
    kernel = mdl.param("kernel", mdl.kernel_init, (jnp.shape(inputs)[-1], mdl.features),
                       mdl.param_dtype)
    bias = mdl.param("bias", mdl.bias_init, (mdl.features,), mdl.param_dtype) \
        if mdl.use_bias else None
    masks = _layer_masks(mdl, kernel, 0, sp)
    inputs, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=mdl.dtype)
    return _core.dense_product(inputs, kernel, bias, masks, sp, mdl.precision)


def _packed_call(mdl: nn.Dense, inputs: jax.Array, sp: Sparsity) -> jax.Array | None:
    """Packed inference (:func:`nmjax.nn.packed_variables`): the forward from the packed
    kernel where the backend resolved for it is a kernel (:func:`packed_product`); ``None``
    otherwise (the kernel is then read unpacked)."""
    if not mdl.has_variable("params", "kernel"):
        return None
    boxed = mdl.get_variable("params", "kernel")
    if not isinstance(boxed, PackedKernel):
        return None
    y = packed_product(inputs, boxed.packed, backend=sp.backend, dtype=mdl.dtype,
                       precision=mdl.precision)
    if y is None or not mdl.use_bias:
        return y
    bias = mdl.param("bias", mdl.bias_init, (mdl.features,), mdl.param_dtype)
    return y + jnp.reshape(bias.astype(y.dtype), (1,) * (y.ndim - 1) + (-1,))


def _conv_kernel_shape(mdl: nn.Conv, inputs: jax.Array) -> tuple[int, ...]:
    kernel_size = (mdl.kernel_size,) if isinstance(mdl.kernel_size, int) else \
        tuple(mdl.kernel_size)
    in_features = jnp.shape(inputs)[-1]
    if in_features % mdl.feature_group_count:
        raise ValueError(f"layer {_path(mdl)!r}: {in_features} input channels are not "
                         f"divisible by feature_group_count={mdl.feature_group_count}")
    return (*kernel_size, in_features // mdl.feature_group_count, mdl.features)


def conv_call(mdl: nn.Conv, inputs: jax.Array, sp: Sparsity) -> jax.Array:
    """The body of :class:`SparseConv`, on any bound ``nn.Conv`` module ``mdl``."""
    if mdl.conv_general_dilated is not None or mdl.conv_general_dilated_cls is not None:
        raise ValueError(f"layer {_path(mdl)!r} sets a custom conv_general_dilated; nmjax "
                         "replaces the product and cannot combine it with yours")
    shape = _conv_kernel_shape(mdl, inputs)
    if mdl.mask is not None and tuple(mdl.mask.shape) != shape:
        raise ValueError(f"Mask needs to have the same shape as weights. "
                         f"Shapes are: {mdl.mask.shape}, {shape}")
    kernel = mdl.param("kernel", mdl.kernel_init, shape, mdl.param_dtype)
    if mdl.mask is not None:
        kernel = kernel * mdl.mask
    bias = mdl.param("bias", mdl.bias_init, (mdl.features,), mdl.param_dtype) \
        if mdl.use_bias else None
    masks = _layer_masks(mdl, kernel, len(shape) - 2, sp)
    inputs, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=mdl.dtype)
    return _core.conv_product(
        inputs, kernel, bias, masks, sp, kernel_size=shape[:-2], strides=mdl.strides,
        padding=mdl.padding, input_dilation=mdl.input_dilation,
        kernel_dilation=mdl.kernel_dilation, feature_group_count=mdl.feature_group_count,
        precision=mdl.precision)


class SparseDense(nn.Dense):
    """``nn.Dense`` whose kernel is N:M sparse in the forward and input-gradient products.

    Same fields, parameter names and shapes as ``nn.Dense`` (``kernel: (in, features)``,
    ``bias: (features,)``), plus ``sparsity``. Forward groups run along ``in`` (axis 0).

    Example:

    >>> import jax, jax.numpy as jnp
    >>> layer = SparseDense(8, sparsity=Sparsity("2:4 transposable"))
    >>> x = jnp.ones((2, 16))                             # (..., in) -> (..., 8)
    >>> variables = layer.init(jax.random.key(0), x)
    >>> layer.apply(variables, x).shape, variables["params"]["kernel"].shape
    ((2, 8), (16, 8))

    With ``Sparsity(mode="static")``, ``init`` also returns ``variables["nm_masks"]``
    (``{"kernel": Masks(fwd, bwd, perm)}``), which ``apply`` reads.
    """

    sparsity: Sparsity = Sparsity()

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        return dense_call(self, inputs, self.sparsity)


class SparseConv(nn.Conv):
    """``nn.Conv`` whose ``HWIO`` kernel is N:M sparse (forward groups along ``I``).

    Same fields, parameter names and shapes as ``nn.Conv``, plus ``sparsity``. Bi-Mask is
    Dense-only; locally connected convs and ``CAUSAL`` padding beyond 1-D are not supported.
    1×1 convolutions run through :func:`nmjax.ops.nm_dense`.
    """

    sparsity: Sparsity = Sparsity()

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        return conv_call(self, inputs, self.sparsity)


def perms_collection(params: Any, rule: Any, key: jax.Array, *, previous: Any = None
                     ) -> dict[str, Any]:
    """Bi-Mask permutations laid out like ``params``: :func:`nmjax.nn.search` for Linen."""
    from nmjax.optim import select
    from nmjax.plan import layout_search

    chosen = [(path, w, leaf) for path, w, leaf in select(params, rule)
              if isinstance(leaf.pattern, BiMask)]
    if not chosen:
        raise ValueError("search needs a plan with Bi-Mask patterns; this one has none")
    keys = jax.random.split(key, len(chosen))
    flat_prev = {}
    if previous is not None:
        flat_prev = {path_str(p): v for p, v in
                     jax.tree_util.tree_flatten_with_path(previous)[0]}
    out: dict[str, Any] = {}
    for (path, w, leaf), k in zip(chosen, keys, strict=True):
        *layer, name = path.split("/")
        node = out
        for part in layer:
            node = node.setdefault(part, {})
        node[name] = layout_search(leaf.pattern, w, leaf.layout, k, init=flat_prev.get(path))
    return out


def to_collection(masks: Any) -> dict[str, Any]:
    """A mask tree (:func:`nmjax.tree.build_masks`) as the ``"nm_masks"`` collection: a dict
    laid out like ``params`` without the leaves left dense."""

    def prune(tree):
        if isinstance(tree, Masks) or tree is None:
            return tree
        if hasattr(tree, "items"):  # dict / FrozenDict
            out = {k: prune(v) for k, v in tree.items()}
            return {k: v for k, v in out.items()
                    if v is not None and not (isinstance(v, dict) and not v)}
        return tree

    return prune(masks)


def masks_collection(params: Any, rule: Any) -> dict[str, Any]:
    """The ``"nm_masks"`` collection for ``params``: :func:`nmjax.nn.refresh` for Linen."""
    return to_collection(build_masks(params, rule))


__all__ = [
    "SparseConv",
    "SparseDense",
    "conv_call",
    "dense_call",
    "masks_collection",
    "perms_collection",
    "to_collection",
]
