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

from nmjax.nn import _core
from nmjax.nn._core import MASKS, USED_MASKS, LayerMasks, Sparsity
from nmjax.tree import MaskRule, build_masks, path_str


def _path(mdl: nn.Module) -> str:
    return "/".join([*(str(p) for p in mdl.scope.path), "kernel"])


def _layer_masks(mdl: nn.Module, kernel: jax.Array, axis: int, sp: Sparsity) -> LayerMasks:
    path = _path(mdl)
    if sp.mode == "dynamic":
        # Bi-Mask: a permutation searched every I steps may sit in nm_masks/<layer>/perm.
        perm = mdl.get_variable(MASKS, "perm") if mdl.has_variable(MASKS, "perm") else None
        masks = _core.split_masks(_core.compute_masks(kernel, axis, sp, path, perm))
    else:
        if not (mdl.has_variable(MASKS, "kernel") or mdl.is_mutable_collection(MASKS)):
            raise ValueError(
                f"static masks: the {MASKS!r} collection has no mask for {path!r}. Pass the "
                f"{MASKS!r} collection that init returned, or "
                f"nmjax.nn.linen_masks(params, rule) as variables[{MASKS!r}]")
        raw = mdl.variable(MASKS, "kernel", _core.compute_masks, kernel, axis, sp, path).value
        masks = _core.split_masks(raw)
        _core.check_mask_shapes(masks, kernel.shape, path)
    if not mdl.is_initializing():  # keep init's variables those of the dense model
        mdl.sow(USED_MASKS, "kernel", masks, init_fn=lambda: None, reduce_fn=lambda _, new: new)
    return masks


def dense_call(mdl: nn.Dense, inputs: jax.Array, sp: Sparsity) -> jax.Array:
    """The body of :class:`SparseDense`, on any bound ``nn.Dense``-like module ``mdl``."""
    if mdl.dot_general is not None or mdl.dot_general_cls is not None:
        raise ValueError(f"layer {_path(mdl)!r} sets a custom dot_general; nmjax replaces the "
                         "product and cannot combine it with yours")
    kernel = mdl.param("kernel", mdl.kernel_init, (jnp.shape(inputs)[-1], mdl.features),
                       mdl.param_dtype)
    bias = mdl.param("bias", mdl.bias_init, (mdl.features,), mdl.param_dtype) \
        if mdl.use_bias else None
    masks = _layer_masks(mdl, kernel, 0, sp)
    inputs, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=mdl.dtype)
    return _core.dense_product(inputs, kernel, bias, masks, sp, mdl.precision)


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

    Example::

      layer = SparseDense(128, sparsity=Sparsity(2, 4, "transposable"))
      variables = layer.init(key, x)             # x: (..., in) -> (..., 128)
      y = layer.apply(variables, x)

    With ``Sparsity(mode="static")``, ``init`` also returns ``variables["nm_masks"]``
    (``{"kernel": mask}``), which ``apply`` reads.
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


def _unsupported(mdl: nn.Module, rule: MaskRule) -> None:
    if not mdl.has_variable("params", "kernel"):
        return
    kernel = mdl.get_variable("params", "kernel")
    path = _path(mdl)
    if rule.select(path, kernel) is not None:
        raise ValueError(
            f"rule {rule.label!r} selects {path!r} of a {type(mdl).__name__} layer (kernel "
            f"{tuple(kernel.shape)}), but sparsify supports nn.Dense and nn.Conv only; "
            "exclude it from the rule (MaskRule(exclude=...))")


def _interceptor(rule: MaskRule, mode: str, decay: float, backend: str):
    # A plain closure: a Module method would itself be intercepted, recursively.
    sp = Sparsity.from_rule(rule, mode=mode, decay=decay, backend=backend)

    def intercept(next_fun, args, kwargs, context):
        mdl = context.module
        if context.method_name != "__call__" or isinstance(mdl, SparseDense | SparseConv):
            return next_fun(*args, **kwargs)
        inputs = args[0] if args else kwargs["inputs"]
        if type(mdl) is nn.Dense:
            leaf = jax.ShapeDtypeStruct((jnp.shape(inputs)[-1], mdl.features), mdl.param_dtype)
            if rule.select(_path(mdl), leaf, kind="dense") is not None:
                return dense_call(mdl, inputs, sp)
            return next_fun(*args, **kwargs)
        if type(mdl) is nn.Conv:
            leaf = jax.ShapeDtypeStruct(_conv_kernel_shape(mdl, inputs), mdl.param_dtype)
            if rule.select(_path(mdl), leaf, kind="conv") is not None:
                return conv_call(mdl, inputs, sp)
            return next_fun(*args, **kwargs)
        out = next_fun(*args, **kwargs)
        _unsupported(mdl, rule)
        return out

    return intercept


class Sparsified(nn.Module):
    """A Linen model whose ``nn.Dense``/``nn.Conv`` layers selected by ``rule`` run sparse.

    Built by :func:`sparsify`. It shares the wrapped model's scope, so its ``params`` are
    exactly the dense model's. ``__call__`` runs the model's ``__call__``; :meth:`call`
    runs another of its methods.
    """

    model: nn.Module
    rule: MaskRule
    mode: str = "dynamic"
    decay: float = 0.0
    backend: str = "auto"

    def setup(self):
        nn.share_scope(self, self.model)

    def __call__(self, *args, **kwargs):
        with nn.intercept_methods(_interceptor(self.rule, self.mode, self.decay, self.backend)):
            return self.model(*args, **kwargs)

    def call(self, method: str, *args, **kwargs):
        """Runs ``self.model.<method>(*args, **kwargs)`` with the sparse layers."""
        with nn.intercept_methods(_interceptor(self.rule, self.mode, self.decay, self.backend)):
            return getattr(self.model, method)(*args, **kwargs)


def sparsify(model: nn.Module, rule: MaskRule, *, mode: str = "dynamic", decay: float = 0.0,
             backend: str = "auto") -> Sparsified:
    """The Linen ``model`` with every ``nn.Dense``/``nn.Conv`` that ``rule`` selects made sparse.

    Selection is :meth:`nmjax.tree.MaskRule.select` on the kernel's path inside ``params``
    (``"Dense_0/kernel"``, ``"block/Conv_1/kernel"``), the same paths
    :func:`nmjax.tree.build_masks` sees. Layers are intercepted at call time
    (``nn.intercept_methods``); parameters keep their names, shapes and tree, so the dense
    model's checkpoint restores unchanged.

    Example::

      sparse = sparsify(model, MaskRule(2, 4, pattern="transposable", exclude="head"))
      y = sparse.apply({"params": dense_params}, x)

      static = sparsify(model, rule, mode="static")
      masks = linen_masks(dense_params, rule)          # or static.init(...)["nm_masks"]
      y = static.apply({"params": dense_params, "nm_masks": masks}, x)

    Args:
      model: a Linen module (unbound).
      rule: which kernels, which pattern (``"nm"``, ``"transposable"``, ``"bimask"``).
      mode: ``"dynamic"`` (masks from the current weights at every call) or ``"static"``
        (masks from the ``"nm_masks"`` collection).
      decay: SR-STE ``λ`` for the selected kernels.
      backend: product backend (:mod:`nmjax.ops`).

    Returns:
      A :class:`Sparsified` module; ``init``/``apply`` it like ``model``.

    Raises:
      TypeError: ``model`` is not a Linen module, ``rule`` not a ``MaskRule``.
      ValueError (at init/apply): the rule selects a layer other than ``nn.Dense``/
        ``nn.Conv`` (``DenseGeneral``, ``ConvTranspose``, ...), a selected kernel's grouped
        axis is not divisible by ``m``, or a static mask is missing or misshapen.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a flax.linen Module, got {type(model).__name__}; "
                        "for NNX use nmjax.nn.nnx.sparsify")
    if not isinstance(rule, MaskRule):
        raise TypeError(f"rule must be an nmjax.tree.MaskRule, got {type(rule).__name__}")
    Sparsity.from_rule(rule, mode=mode, decay=decay, backend=backend)  # validates
    return Sparsified(model, rule, mode, decay, backend)


def linen_perms(params: Any, rule: MaskRule, key: jax.Array, **options: Any) -> dict[str, Any]:
    """Bi-Mask permutations for dynamic mode: ``{<layer path>: {"perm": (out,) int32}}``.

    The Bi-Mask recipe: every I steps (the paper: 100) search a permutation of each layer's
    output channels on the current weights, and pass the result as ``variables["nm_masks"]``;
    forward and backward masks are still recomputed from the weights at every call, the
    backward one in that permutation's order. Without it the identity permutation is used.

    Example::

      sparse = sparsify(model, MaskRule(2, 4, pattern="bimask"), decay=2e-4)
      perms = linen_perms(params, rule, jax.random.key(step), method="swap")
      logits = sparse.apply({"params": params, "nm_masks": perms}, x)

    Args:
      params: the ``params`` pytree.
      rule: a ``MaskRule`` with ``pattern="bimask"`` (the one given to :func:`sparsify`).
      key: PRNG key; split across layers.
      **options: :func:`nmjax.masks.search_permutation` options (``method``, ``rounds``,
        ``num_candidates``, ``score``).
    """
    sp = Sparsity.from_rule(rule)
    selected = []

    def visit(key_path, leaf):
        path = path_str(key_path)
        if rule.select(path, leaf) is not None:
            selected.append((path, leaf))

    jax.tree_util.tree_map_with_path(visit, params)
    keys = jax.random.split(key, max(len(selected), 1))
    out: dict[str, Any] = {}
    for (path, kernel), k in zip(selected, keys, strict=False):
        node = out
        for part in path.split("/")[:-1]:
            node = node.setdefault(part, {})
        node["perm"] = _core.search_perm(kernel, sp, k, **options)
    return out


def linen_masks(params: Any, rule: MaskRule) -> dict[str, Any]:
    """The ``"nm_masks"`` collection for ``params``: :func:`nmjax.tree.build_masks` without
    the leaves left dense (a dict laid out like ``params``).

    Call it on the current ``params`` to refresh static masks during training.
    """

    def prune(tree):
        if hasattr(tree, "items"):  # dict / FrozenDict (a BiMask is a NamedTuple: a leaf here)
            out = {k: prune(v) for k, v in tree.items()}
            return {k: v for k, v in out.items()
                    if v is not None and not (isinstance(v, dict) and not v)}
        return tree

    return prune(build_masks(params, rule))
