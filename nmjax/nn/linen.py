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

from nmjax.masks import BiMask, Masks, Pattern
from nmjax.nn import _core
from nmjax.nn._core import MASKS, USED_MASKS, Sparsity
from nmjax.tree import MaskRule, build_masks, path_str


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
                f"nmjax.nn.linen_masks(params, rule) as variables[{MASKS!r}]")
        masks = mdl.variable(MASKS, "kernel", _core.compute_masks, kernel, axis, sp, path).value
        if not isinstance(masks, Masks):
            raise TypeError(f"static masks for {path!r} must be an nmjax.masks.Masks "
                            f"(fwd, bwd, perm), got {type(masks).__name__}; build them with "
                            "nmjax.nn.linen_masks(params, rule)")
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


Rules = tuple[tuple[MaskRule, Sparsity], ...]


def _pick(rules: Rules, path: str, leaf: Any, kind: str | None) -> Sparsity | None:
    """The sparsity of the one rule that selects ``path`` (two that differ: an error)."""
    hits = [sp for rule, sp in rules if rule.select(path, leaf, kind) is not None]
    if len(set(hits)) > 1:
        raise ValueError(f"layer {path!r} is selected by {len(hits)} rules with different "
                         f"sparsity ({', '.join(sp.label for sp in hits)}); exclude it from "
                         "all but one")
    return hits[0] if hits else None


def _unsupported(mdl: nn.Module, rules: Rules) -> None:
    if not mdl.has_variable("params", "kernel"):
        return
    kernel = mdl.get_variable("params", "kernel")
    path = _path(mdl)
    for rule, _ in rules:
        try:
            selected = rule.select(path, kernel, None) is not None
        except ValueError:  # e.g. include= matched it but it has no known axis
            selected = True
        if selected:
            raise ValueError(
                f"rule {rule.label!r} selects {path!r} of a {type(mdl).__name__} layer "
                f"(kernel {tuple(kernel.shape)}), but sparsify supports nn.Dense and nn.Conv "
                "only; exclude it from the rule (MaskRule(exclude=...))")


def _interceptor(rules: Rules, kinds: dict[str, Any] | None = None):
    # A plain closure: a Module method would itself be intercepted, recursively.
    def intercept(next_fun, args, kwargs, context):
        mdl = context.module
        if context.method_name != "__call__" or isinstance(mdl, SparseDense | SparseConv):
            return next_fun(*args, **kwargs)
        inputs = args[0] if args else kwargs["inputs"]
        if type(mdl) is nn.Dense:
            leaf = jax.ShapeDtypeStruct((jnp.shape(inputs)[-1], mdl.features), mdl.param_dtype)
            sp = _pick(rules, _path(mdl), leaf, "dense")
            return next_fun(*args, **kwargs) if sp is None else dense_call(mdl, inputs, sp)
        if type(mdl) is nn.Conv:
            leaf = jax.ShapeDtypeStruct(_conv_kernel_shape(mdl, inputs), mdl.param_dtype)
            sp = _pick(rules, _path(mdl), leaf, "conv")
            return next_fun(*args, **kwargs) if sp is None else conv_call(mdl, inputs, sp)
        out = next_fun(*args, **kwargs)
        _unsupported(mdl, rules)
        return out

    return intercept


class Sparsified(nn.Module):
    """A Linen model whose ``nn.Dense``/``nn.Conv`` layers selected by its rules run sparse.

    Built by :func:`sparsify`. It shares the wrapped model's scope, so its ``params`` are
    exactly the dense model's. ``__call__`` runs the model's ``__call__``; :meth:`call`
    runs another of its methods.

    Attributes:
      model: the dense Linen model.
      rules: ``((MaskRule, Sparsity), ...)``: which layers, and how each is sparse.
    """

    model: nn.Module
    rules: Rules

    def setup(self):
        nn.share_scope(self, self.model)

    def __call__(self, *args, **kwargs):
        with nn.intercept_methods(_interceptor(self.rules)):
            return self.model(*args, **kwargs)

    def call(self, method: str, *args, **kwargs):
        """Runs ``self.model.<method>(*args, **kwargs)`` with the sparse layers."""
        with nn.intercept_methods(_interceptor(self.rules)):
            return getattr(self.model, method)(*args, **kwargs)


def as_rule(rule: Any, pattern: str | None = None) -> MaskRule:
    """A :class:`~nmjax.tree.MaskRule` from a rule, a pattern spec or a shorthand string
    (``"2:4"``, with ``pattern="transposable"`` or ``"bimask"`` for the other kinds)."""
    if isinstance(rule, MaskRule):
        if pattern is not None:
            raise ValueError(f"pattern={pattern!r} applies to a shorthand rule like '2:4'; "
                             "this MaskRule has its pattern already")
        return rule
    if isinstance(rule, str | Pattern):
        from nmjax.masks import as_pattern

        return MaskRule(as_pattern(rule, pattern))
    raise TypeError(f"rule must be an nmjax.tree.MaskRule, a pattern spec or a string like "
                    f"'2:4', got {type(rule).__name__}")


def sparsify(model: nn.Module, rule: MaskRule | Pattern | str, *, pattern: str | None = None,
             mode: str = "dynamic", decay: float | jax.Array = 0.0,
             backend: Any = "auto") -> Sparsified:
    """The Linen ``model`` with every ``nn.Dense``/``nn.Conv`` that ``rule`` selects made sparse.

    Selection is :meth:`nmjax.tree.MaskRule.select` on the kernel's path inside ``params``
    (``"Dense_0/kernel"``, ``"block/Conv_1/kernel"``) with the layer's real type, so other
    layer types (``Einsum``, ``DenseGeneral``) are never picked by a default rule.
    Layers are intercepted at call time (``nn.intercept_methods``); parameters keep their
    names, shapes and tree, so the dense model's checkpoint restores unchanged. Sparsifying
    a :class:`Sparsified` model again adds the new rule (a layer two rules select with
    different settings is an error at the first call).

    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> class MLP(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return nn.Dense(10, name="head")(nn.relu(nn.Dense(32)(x)))
    >>> x = jnp.ones((4, 16))
    >>> params = MLP().init(jax.random.key(0), x)["params"]      # or a dense checkpoint
    >>> sparsify(MLP(), "2:4").apply({"params": params}, x).shape   # every Dense, 2:4
    (4, 10)
    >>> rule = MaskRule("2:4 transposable", exclude="head")   # a 10-wide head: not 4-divisible
    >>> sparsify(MLP(), rule, decay=2e-4).apply({"params": params}, x).shape
    (4, 10)
    >>> static = sparsify(MLP(), rule, mode="static")            # masks from "nm_masks"
    >>> masks = linen_masks(params, rule)
    >>> static.apply({"params": params, "nm_masks": masks}, x).shape
    (4, 10)

    Args:
      model: a Linen module (unbound), or a :class:`Sparsified` one.
      rule: a :class:`~nmjax.tree.MaskRule`, a pattern spec, or a shorthand (``"2:4"``).
      pattern: with a shorthand string, the kind (``"transposable"``, ``"bimask"``).
      mode: ``"dynamic"`` (masks from the current weights at every call) or ``"static"``
        (masks from the ``"nm_masks"`` collection).
      decay: SR-STE ``λ`` for the selected kernels.
      backend: product backend (:mod:`nmjax.backends`).

    Returns:
      A :class:`Sparsified` module; ``init``/``apply`` it like ``model``.

    Raises:
      TypeError: ``model`` is not a Linen module, ``rule`` of the wrong type.
      ValueError: bad settings; at init/apply: the rule selects a layer other than
        ``nn.Dense``/``nn.Conv`` by ``include=``, a selected kernel cannot take the pattern,
        or a static mask is missing or misshapen.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a flax.linen Module, got {type(model).__name__}; "
                        "for NNX use nmjax.nn.nnx.sparsify")
    rule = as_rule(rule, pattern)
    sp = Sparsity(rule.pattern, mode=mode, backend=backend, decay=decay)
    if isinstance(model, Sparsified):
        return Sparsified(model.model, (*model.rules, (rule, sp)))
    return Sparsified(model, ((rule, sp),))


def layer_kinds(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, str | None]:
    """``{kernel path: "dense" | "conv" | None}`` for every layer with a ``kernel`` of a Linen
    ``model`` (paths as in its ``params``), from the layers' real types, traced abstractly
    with example inputs ``args`` (nothing is computed).

    Pass it to :func:`nmjax.tree.build_masks` / :func:`linen_masks` (``kinds=``) so they
    select exactly the layers :func:`sparsify` makes sparse.
    """
    kinds: dict[str, str | None] = {}
    target = model.model if isinstance(model, Sparsified) else model

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        mdl = context.module
        if context.method_name == "__call__" and mdl.has_variable("params", "kernel"):
            kind = {nn.Dense: "dense", nn.Conv: "conv"}.get(type(mdl))
            kinds[_path(mdl)] = kind
        return out

    def init(key):
        with nn.intercept_methods(record):
            return target.init(key, *args, **kwargs)

    jax.eval_shape(init, jax.random.key(0))
    return kinds


def linen_perms(params: Any, rule: MaskRule, key: jax.Array, *, previous: Any = None,
                kinds: dict[str, Any] | None = None) -> dict[str, Any]:
    """Bi-Mask permutations for dynamic mode: ``{<layer path>: {"perm": (out,) int32}}``.

    The Bi-Mask recipe: every I steps (the paper: 100) search a permutation of each layer's
    output channels on the current weights (the rule's :class:`~nmjax.masks.BiMask` search
    settings), and pass the result as ``variables["nm_masks"]``; forward and backward masks
    are still recomputed from the weights at every call, the backward one in that
    permutation's order. Without it the identity permutation is used.

    Example (every I steps of a training loop)::

      rule = MaskRule(BiMask(2, 4, search="swap"), exclude="head")
      sparse = sparsify(model, rule, decay=2e-4)
      perms = linen_perms(params, rule, jax.random.key(step), previous=perms)
      logits = sparse.apply({"params": params, "nm_masks": perms}, x)

    Args:
      params: the ``params`` pytree.
      rule: a ``MaskRule`` with a Bi-Mask pattern (the one given to :func:`sparsify`).
      key: PRNG key; split across layers.
      previous: the last result, to warm-start a ``"swap"`` search from.
      kinds: layer types (:func:`layer_kinds`), as in :func:`nmjax.tree.build_masks`.
    """
    if not isinstance(rule, MaskRule) or not isinstance(rule.pattern, BiMask):
        raise ValueError(f"linen_perms needs a MaskRule with a Bi-Mask pattern, got "
                         f"{getattr(rule, 'label', rule)!r}")
    selected = []

    def visit(key_path, leaf):
        path = path_str(key_path)
        kind = "infer" if kinds is None else kinds.get(path)
        if rule.select(path, leaf, kind) is not None:
            selected.append((path, leaf))

    jax.tree_util.tree_map_with_path(visit, params)
    keys = jax.random.split(key, max(len(selected), 1))
    out: dict[str, Any] = {}
    for (path, kernel), k in zip(selected, keys, strict=False):
        layer = path.split("/")[:-1]
        init = None
        if previous is not None:
            node = previous
            for part in layer:
                node = node.get(part, {}) if hasattr(node, "get") else {}
            init = node.get("perm") if hasattr(node, "get") else None
        node = out
        for part in layer:
            node = node.setdefault(part, {})
        node["perm"] = rule.pattern.search_permutation(jax.lax.stop_gradient(kernel), k,
                                                        init=init)
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


def linen_masks(params: Any, rule: MaskRule, *, kinds: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """The ``"nm_masks"`` collection for ``params``: :func:`nmjax.tree.build_masks` without
    the leaves left dense (a dict laid out like ``params``, a
    :class:`~nmjax.masks.Masks` at each sparse kernel).

    Call it on the current ``params`` to refresh static masks during training (or let
    :mod:`nmjax.optim` do it). ``kinds``: :func:`layer_kinds`, for models whose layer names
    do not tell their types.
    """
    return to_collection(build_masks(params, rule, kinds=kinds))
