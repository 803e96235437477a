"""One resolved selection for the model and the optimizer: which parameters are N:M sparse,
with which pattern, and along which axes -- read from the ops that consume them.

>>> import jax, jax.numpy as jnp
>>> from flax import linen as nn
>>> class Net(nn.Module):
...     @nn.compact
...     def __call__(self, x):
...         h = nn.relu(nn.Dense(32)(x))
...         w = self.param("proj", nn.initializers.lecun_normal(), (16, 32))  # (out, in)
...         return jnp.einsum("bi,oi->bo", h, w)
>>> plan = resolve(Net(), "2:4", jnp.ones((2, 8)))
>>> print(plan)                                             # doctest: +NORMALIZE_WHITESPACE
path            op           shape  contract  out   pattern  density
--------------  -----------  -----  --------  ----  -------  -------
Dense_0/kernel  dot_general  8x32   (0,)      (1,)  2:4 nm     0.500
proj            dot_general  16x32  (1,)      (0,)  2:4 nm     0.500
2 parameters sparse (384 of 768 weights: density 0.500 kept)

:func:`resolve` traces a model (Linen, NNX, or a plain function of its parameters) once,
abstractly, and follows each parameter to the ``dot_general``/``einsum``/``conv`` that uses
it (:mod:`nmjax._graph`), so GPT-2's ``(out, in)`` ``Conv1D`` kernels, ``DenseGeneral``
kernels with several contraction axes, stacked ``scan`` layers and ``(out, in)`` einsum
weights all get masks along their real contraction axes. Pass the :class:`Plan` to both
:func:`nmjax.nn.sparsify` and :func:`nmjax.optim.sparse`: they cannot disagree.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nmjax import _graph
from nmjax._graph import Layout
from nmjax._text import table
from nmjax.masks import BiMask, Masks, Pattern
from nmjax.tree import MaskRule, path_str

__all__ = ["Layout", "LeafPlan", "Plan", "as_rules", "from_axis", "layout_masks",
           "layout_reason", "layout_search", "layout_valid", "plan_for_params",
           "plan_from_jaxpr", "resolve"]

# A Linen auto-generated layer name ("Dense_0", "Conv_3") names the layer's class, so its
# kernel's layout is known without the model.
_LINEN_AUTO = re.compile(r"(^|/)(Dense|Conv)_\d+/kernel$")


# ------------------------------------------------------------------ masks on a layout


def from_axis(shape: Sequence[int], axis: int, path: str = "w") -> Layout:
    """The layout of a kernel whose contraction axis is given by hand: rank 2 ``(in, out)``
    (``axis=0``) or ``(out, in)`` (``axis=1``); rank 3-5 a conv ``(*window, I, O)``
    (``axis=ndim - 2``)."""
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise TypeError(f"axis for {path!r} must be an int, got {axis!r}")
    axis = int(axis) + (ndim if axis < 0 else 0)
    if ndim == 2 and axis in (0, 1):
        return Layout(shape, (), (axis,), (1 - axis,))
    if 3 <= ndim <= 5 and axis == ndim - 2:
        return Layout(shape, (), tuple(range(ndim - 1)), (ndim - 1,))
    raise ValueError(f"{path!r} of shape {shape}: axis={axis} gives no known layout (a rank-2 "
                     "kernel takes 0 or 1, a conv kernel (*window, I, O) takes ndim - 2); "
                     "resolve the model instead: nmjax.resolve(model, rule, *example_inputs)")


def layout_reason(pattern: Pattern, layout: Layout) -> str | None:
    """``None`` if ``pattern`` can take a kernel of this layout, else why not (in the
    kernel's own axes)."""
    _, depth, width = layout.sizes
    reason = pattern.check_leaf((depth, width), 0)
    if reason is None:
        return None
    return (f"{reason} (its contraction {layout.contract} holds {depth} weights, its output "
            f"{layout.out} {width})")


def _matrices(layout: Layout, fn: Callable, *arrays: Any) -> Any:
    """``fn`` over each ``(K, N)`` matrix of the canonical view (``lax.map`` when stacked)."""
    stacked, _, _ = layout.sizes
    if stacked == 1:
        return jax.tree.map(lambda a: a[None], fn(*(jax.tree.map(lambda a: a[0], x)
                                                     for x in arrays)))
    return jax.lax.map(lambda xs: fn(*xs), arrays)


def _perm_matrix(layout: Layout, perm: Any) -> Any:
    return None if perm is None else jnp.asarray(perm).reshape(layout.sizes[0], -1)


def layout_masks(pattern: Pattern, w: jax.Array, layout: Layout, perm: Any = None) -> Masks:
    """``pattern``'s :class:`~nmjax.masks.Masks` for kernel ``w`` laid out as ``layout``:
    ``fwd``/``bwd`` of ``w``'s shape, ``perm`` of ``layout.perm_shape`` (Bi-Mask) or
    ``None``. ``perm``: a stored Bi-Mask permutation (``None``: the identity)."""
    w = layout.to_canonical(jax.lax.stop_gradient(w))
    if isinstance(pattern, BiMask):
        found = _matrices(layout, lambda m, p: tuple(pattern(m, 0, perm=p)), w,
                          _perm_matrix(layout, perm)
                          if perm is not None else _identity(layout))
    else:
        if perm is not None:
            raise ValueError(f"a permutation applies to a Bi-Mask pattern only, got "
                             f"{pattern.label!r}")
        found = _matrices(layout, lambda m: tuple(pattern(m, 0)), w)
    fwd, bwd, out_perm = found
    return Masks(layout.from_canonical(fwd), layout.from_canonical(bwd),
                 None if out_perm is None else out_perm.reshape(layout.perm_shape))


def _identity(layout: Layout) -> jax.Array:
    stacked, _, width = layout.sizes
    return jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (stacked, width))


def layout_search(pattern: BiMask, w: jax.Array, layout: Layout, key: jax.Array,
                  init: Any = None, axis_name: str | tuple[str, ...] | None = None
                  ) -> jax.Array:
    """A Bi-Mask permutation per matrix of ``w`` (``layout.perm_shape``), by the pattern's
    search, warm-started from ``init``. ``axis_name``: inside ``jax.shard_map``, the mesh
    axes ``w``'s contraction is split across (the search sums its scores over them)."""
    w = layout.to_canonical(jax.lax.stop_gradient(w))
    keys = jax.random.split(key, layout.sizes[0])
    search = functools.partial(pattern.search_permutation, axis_name=axis_name)
    if init is None:
        found = _matrices(layout, lambda m, k: search(m, k), w, keys)
    else:
        found = _matrices(layout, lambda m, k, i: search(m, k, init=i),
                          w, keys, _perm_matrix(layout, init))
    return found.reshape(layout.perm_shape)


def layout_valid(pattern: Pattern, masks: Masks, layout: Layout) -> jax.Array:
    """Whether ``masks`` (of the kernel's shape) are what ``pattern`` promises along
    ``layout``'s axes (a JAX bool)."""
    fwd, bwd = layout.to_canonical(masks.fwd), layout.to_canonical(masks.bwd)
    perm = _perm_matrix(layout, masks.perm)
    ok = [pattern.valid(Masks(fwd[i], bwd[i], None if perm is None else perm[i]), axis=0)
          for i in range(layout.sizes[0])]
    return jnp.all(jnp.stack(ok))


def ones_masks(layout: Layout, with_perm: bool) -> Masks:
    """Masks that keep everything (dense stages)."""
    ones = jnp.ones(layout.shape, bool)
    return Masks(ones, ones, _identity(layout).reshape(layout.perm_shape) if with_perm
                 else None)


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """One sparse parameter: its path, op, layout and pattern."""

    path: str
    op: str
    layout: Layout
    pattern: Pattern
    rule: MaskRule

    @property
    def shape(self) -> tuple[int, ...]:
        return self.layout.shape

    def masks(self, w: jax.Array, pattern: Pattern | None = None, perm: Any = None) -> Masks:
        return layout_masks(pattern or self.pattern, w, self.layout, perm)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The resolved selection: a :class:`LeafPlan` per sparse parameter (tree order), and
    the parameters that a product uses but the plan leaves dense, with the reason.

    ``str(plan)`` is the report: path, op, shape, contraction and output axes, pattern and
    the pattern's density. Hashable: pass it to jitted code as a static value.
    """

    leaves: tuple[LeafPlan, ...]
    dense: tuple[tuple[str, str], ...] = ()
    rules: tuple[MaskRule, ...] = ()

    def __post_init__(self):
        if not self.leaves:
            raise ValueError("a Plan needs at least one sparse parameter")

    @property
    def by_path(self) -> dict[str, LeafPlan]:
        return {leaf.path: leaf for leaf in self.leaves}

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(leaf.path for leaf in self.leaves)

    @property
    def patterns(self) -> tuple[Pattern, ...]:
        return tuple(dict.fromkeys(leaf.pattern for leaf in self.leaves))

    def check_params(self, params: Any, name: str = "params") -> dict[str, Any]:
        """``{path: leaf}`` of the planned leaves in ``params``; raises ValueError naming a
        planned path that is missing or has another shape (a plan for another model)."""
        flat = {path_str(p): leaf for p, leaf in
                jax.tree_util.tree_flatten_with_path(params)[0]}
        for leaf in self.leaves:
            got = flat.get(leaf.path)
            if got is None:
                raise ValueError(f"the plan's parameter {leaf.path!r} is not in {name} (its "
                                 f"leaves include {list(flat)[:4]}): a plan for another "
                                 "model, or params of another tree (pass the 'params' "
                                 "collection itself)")
            if tuple(np.shape(got)) != leaf.shape:
                raise ValueError(f"the plan's parameter {leaf.path!r} has shape {leaf.shape}, "
                                 f"but {name} holds {tuple(np.shape(got))} there")
        return flat

    def masks(self, params: Any, patterns: Mapping[str, Pattern | None] | None = None,
              perms: Mapping[str, Any] | None = None, with_perm: bool = False) -> Any:
        """``params``' tree with :class:`~nmjax.masks.Masks` at the planned leaves and
        ``None`` elsewhere. ``patterns`` overrides a leaf's pattern (``None``: keep all)."""
        self.check_params(params)
        chosen = self.by_path
        perms = perms or {}

        def one(key_path, w):
            leaf = chosen.get(path_str(key_path))
            if leaf is None:
                return None
            pattern = leaf.pattern if patterns is None else patterns.get(leaf.path)
            if pattern is None:
                return ones_masks(leaf.layout, with_perm)
            masks = layout_masks(pattern, w, leaf.layout, perms.get(leaf.path)
                                 if isinstance(pattern, BiMask) else None)
            if with_perm and masks.perm is None:
                masks = masks._replace(perm=_identity(leaf.layout).reshape(
                    leaf.layout.perm_shape))
            return masks

        return jax.tree_util.tree_map_with_path(one, params)

    def valid(self, masks: Any) -> jax.Array:
        """Whether a mask tree (``build_masks`` / the optimizer's) holds, at every planned
        parameter, masks that are what its pattern promises along its axes (a JAX bool)."""
        flat = {path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(
            masks, is_leaf=lambda x: x is None or isinstance(x, Masks))[0]}
        ok = [layout_valid(leaf.pattern, flat[leaf.path], leaf.layout)
              if isinstance(flat.get(leaf.path), Masks) else jnp.asarray(False)
              for leaf in self.leaves]
        return jnp.all(jnp.stack(ok))

    def __str__(self) -> str:
        head = ("path", "op", "shape", "contract", "out", "pattern", "density")
        body = []
        kept = total = 0
        for leaf in self.leaves:
            n, m = leaf.pattern.fwd_nm or (1, 1)
            size = math.prod(leaf.shape)
            kept, total = kept + size * n // m, total + size
            stack = f" stack {leaf.layout.stack}" if any(
                leaf.shape[a] != 1 for a in leaf.layout.stack) else ""
            body.append((leaf.path, leaf.op, "x".join(map(str, leaf.shape)),
                         str(leaf.layout.contract) + stack, str(leaf.layout.out),
                         leaf.pattern.label, f"{n / m:.3f}"))
        lines = table(head, body, {6})
        lines.append(f"{len(self.leaves)} parameters sparse ({kept:,} of {total:,} weights: "
                     f"density {kept / max(total, 1):.3f} kept)")
        for path, reason in self.dense:
            lines.append(f"dense: {path}: {reason}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------- rules


def as_rules(rule: Any, pattern: str | None = None) -> tuple[MaskRule, ...]:
    """One rule, a pattern spec or shorthand (``"2:4"``, with ``pattern="transposable"``),
    or a non-empty sequence of those, as a tuple of :class:`~nmjax.tree.MaskRule`."""
    from nmjax.masks import as_pattern

    if pattern is not None:
        if not isinstance(rule, str | Pattern):
            raise ValueError(f"pattern={pattern!r} applies to a shorthand rule like '2:4', "
                             f"got {type(rule).__name__}")
        return (MaskRule(as_pattern(rule, pattern)),)
    if isinstance(rule, MaskRule | Pattern | str):
        rule = (rule,)
    if not isinstance(rule, Sequence) or not rule:
        raise TypeError(f"rule must be an nmjax.tree.MaskRule, a pattern spec, a string like "
                        f"'2:4', or a non-empty sequence of those, got {type(rule).__name__}")
    out = []
    for r in rule:
        if isinstance(r, str | Pattern):
            r = MaskRule(r)
        if not isinstance(r, MaskRule):
            raise TypeError(f"rule must be an nmjax.tree.MaskRule, a pattern spec or a string "
                            f"like '2:4', got {type(r).__name__}")
        out.append(r)
    return tuple(out)


def _matches(rule: MaskRule, path: str, leaf: Any) -> bool:
    include = rule.include
    if include is not None:
        include = (include,) if isinstance(include, str) else tuple(include)
        if not any(re.search(p, path) for p in include):
            return False
    exclude = (rule.exclude,) if isinstance(rule.exclude, str) else tuple(rule.exclude)
    if any(re.search(p, path) for p in exclude):
        return False
    return rule.predicate is None or bool(rule.predicate(path, leaf))


def _exclude_hint(path: str) -> str:
    return f"MaskRule(..., exclude=r\"{re.escape(path)}$\")"


def _take(rules: Sequence[MaskRule], path: str, leaf: Any, found: Layout | str | None,
          op: str) -> LeafPlan | tuple[str, str] | None:
    """The leaf's plan, ``(path, why it stays dense)``, or ``None`` (not a product weight
    and not asked for)."""
    hits = [r for r in rules if _matches(r, path, leaf)]
    if not hits:
        return (path, "excluded by the rule") if isinstance(found, Layout) else None
    if found is None:
        return None  # used by no product and not a kernel: biases, norms, embeddings
    patterns = {r.pattern for r in hits}
    if len(patterns) > 1:
        raise ValueError(f"parameter {path!r} is selected by {len(hits)} rules with different "
                         f"patterns ({', '.join(sorted(p.label for p in patterns))}); exclude "
                         "it from all but one")
    rule = hits[0]
    if not isinstance(found, Layout):
        if rule.include is None:
            return (path, found)
        raise ValueError(f"rule {rule.label!r} selects {path!r} (shape {tuple(leaf.shape)}), "
                         f"which cannot be sparse: {found}. Exclude it: {_exclude_hint(path)}")
    if rule.axis is not None and (rule.axis % len(found.shape),) != found.contract[-1:]:
        raise ValueError(f"rule {rule.label!r} says axis={rule.axis} for {path!r}, but the op "
                         f"that uses it contracts axes {found.contract}: leave axis unset "
                         "when the plan comes from the model")
    reason = layout_reason(rule.pattern, found)
    if reason is not None:
        if rule.skip_indivisible:
            return (path, f"skipped: {reason}")
        raise ValueError(f"parameter {path!r} of shape {found.shape} cannot take pattern "
                         f"{rule.label!r}: {reason}. Leave it dense: {_exclude_hint(path)}")
    return LeafPlan(path, op, found, rule.pattern, rule)


def _build(rules: tuple[MaskRule, ...], entries: list[tuple[str, Any, Any, str]],
           where: str) -> Plan:
    leaves, dense = [], []
    for path, leaf, found, op in entries:
        got = _take(rules, path, leaf, found, op)
        if isinstance(got, LeafPlan):
            leaves.append(got)
        elif got is not None:
            dense.append(got)
    if not leaves:
        labels = ", ".join(repr(r.label) for r in rules)
        why = "; ".join(f"{p}: {r}" for p, r in dense[:4])
        raise ValueError(f"rule {labels} selects no parameter {where}"
                         + (f" (left dense: {why})" if why else "")
                         + "; check include/exclude")
    return Plan(tuple(leaves), tuple(dense), rules)


def _classify(uses: list[_graph.Use]) -> tuple[Layout | str | None, str]:
    """The one layout a parameter's uses agree on, a reason it has none, or ``None`` (no
    product uses it at all)."""
    products = [u for u in uses if u.layout is not None]
    others = [u for u in uses if u.layout is None]
    if not products:
        refused = [u for u in others if u.op in ("dot_general", "conv_general_dilated")]
        if refused:
            return refused[0].reason, refused[0].op
        return None, ""
    op = products[0].op
    if others:
        what = ", ".join(sorted({u.reason for u in others}))
        return (f"tied: a product uses it, and so does {what}; a mask there would change "
                "the other use too", op)
    layouts = {u.layout for u in products}
    if len(layouts) > 1:
        return ("shared by products that contract different axes ("
                + "; ".join(sorted(lay.describe() for lay in layouts)) + ")", op)
    return products[0].layout, op


# ------------------------------------------------------------------------------ tracing


def _split_args(args: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
    """Array leaves of ``args`` (traced) and a function rebuilding ``args`` from them (the
    other leaves -- flags, strings, ``None`` -- stay Python values)."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    is_array = [isinstance(x, jax.Array | np.ndarray | jax.ShapeDtypeStruct) for x in leaves]
    arrays = [x for x, a in zip(leaves, is_array, strict=True) if a]

    def rebuild(values: list[Any]) -> Any:
        it = iter(values)
        return jax.tree_util.tree_unflatten(
            treedef, [next(it) if a else x for x, a in zip(leaves, is_array, strict=True)])

    return arrays, rebuild


def _abstract(x: Any) -> Any:
    return jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)) if not isinstance(
        x, jax.ShapeDtypeStruct) else x


@dataclasses.dataclass
class Traced:
    """A model as a function of its parameters: ``fn(params, arrays)`` where ``arrays`` are
    the array leaves of the example inputs, ``params`` the tree the optimizer sees."""

    fn: Callable[[Any, list[Any]], Any]
    params: Any
    arrays: list[Any]

    def jaxpr(self) -> Any:
        return jax.make_jaxpr(self.fn)(jax.tree.map(_abstract, self.params),
                                       jax.tree.map(_abstract, self.arrays))


def trace_model(model: Any, args: tuple, kwargs: dict, params: Any = None,
                method: Any = None) -> Traced:
    """:class:`Traced` for a Linen module (``params``: its ``"params"`` collection, or
    ``None`` to take init's shapes), an NNX module, or a function ``fn(params, *args)``."""
    from flax import linen as nn
    from flax import nnx

    if isinstance(model, nn.Module):
        return _trace_linen(model, args, dict(kwargs), params, method)
    arrays, rebuild = _split_args((args, kwargs))
    if isinstance(model, nnx.Module):
        graphdef, p, rest = nnx.split(model, nnx.Param, ...)

        def fn(p, a):
            a, k = rebuild(a)
            m = nnx.merge(graphdef, p, rest)
            return m(*a, **k) if method is None else getattr(m, method)(*a, **k)

        return Traced(fn, nnx.to_pure_dict(p) if params is None else params, arrays)
    if callable(model):
        if params is None:
            raise TypeError("resolve(fn, rule, params, *args): a plain function needs its "
                            "parameters as the first input")
        return Traced(lambda p, a: model(p, *rebuild(a)[0], **rebuild(a)[1]), params, arrays)
    raise TypeError(f"model must be a flax.linen Module, a flax.nnx Module or a function "
                    f"fn(params, *args), got {type(model).__name__}")


def _trace_linen(model: Any, args: tuple, kwargs: dict, params: Any, method: Any) -> Traced:
    """A Linen module as a function of its ``"params"``: the other collections
    (``batch_stats``, ...) take init's shapes and travel as traced inputs, and ``rngs=``
    among the example inputs is apply's (init gets it too, beside its ``"params"`` key)."""
    apply_rngs = kwargs.pop("rngs", None)
    arrays, rebuild = _split_args((args, kwargs, apply_rngs))

    def init(key, a):
        a, k, r = rebuild(a)
        return model.init({"params": key, **(r or {})}, *a, method=method, **k)

    shapes = dict(jax.eval_shape(init, jax.random.key(0), arrays))
    init_params = shapes.pop("params", {})

    def fn(p, a):
        (a, k, r), rest = rebuild(a[:-1]), a[-1]
        # mutable: a training-mode call may update batch statistics; only the uses of the
        # parameters matter here
        return model.apply({"params": p, **rest}, *a, rngs=r, method=method, mutable=True,
                           **k)

    return Traced(fn, init_params if params is None else params, [*arrays, shapes])


def resolve(model: Any, rule: Any, *args: Any, params: Any = None, method: Any = None,
            pattern: str | None = None, **kwargs: Any) -> Plan:
    """Resolves ``rule`` against ``model``: which parameters become sparse, and along which
    axes, read from the ops that use them.

    ``model`` is traced once, abstractly (nothing is computed), with ``args``/``kwargs`` as
    its inputs (arrays or ``jax.ShapeDtypeStruct``s; flags such as ``deterministic=True``
    stay Python values). Every parameter used only by ``dot_general`` (``x @ W``,
    ``jnp.einsum``, ``nn.Dense``, ``DenseGeneral``) or as a convolution kernel is a
    candidate; biases, norm scales and embedding tables are not. By default a rule takes
    every candidate; ``MaskRule(include=..., exclude=..., predicate=...)`` narrows it by
    path (``"h/0/attn/c_attn/kernel"``).

    Args:
      model: a Linen module (with ``params=`` its ``"params"`` tree, e.g. a Hugging Face
        model's ``model.params``; without, init's shapes), an NNX module, or a function
        ``fn(params, *args)`` (then ``params`` is required).
      rule: a :class:`~nmjax.tree.MaskRule`, a pattern spec, a shorthand (``"2:4"``), or a
        sequence of rules.
      *args, **kwargs: example inputs of the model's ``__call__`` (or of ``method``).
      params: the parameters (their shapes are enough).
      method: a Linen method (or NNX method name) to trace instead of ``__call__``.
      pattern: with a shorthand rule, its kind (``"transposable"``, ``"bimask"``).

    Returns:
      A :class:`Plan`; ``print(plan)`` lists what became sparse.

    Raises:
      ValueError: the rule selects nothing; it names (by ``include=``) a parameter that
        cannot be sparse (tied to an embedding lookup, shared by products along different
        axes, passed into a custom-derivative function); a selected parameter cannot take
        the pattern (indivisible axes: the message gives the ``exclude=`` that leaves it
        dense).
    """
    traced = trace_model(model, args, kwargs, params, method)
    return plan_from_jaxpr(traced.jaxpr(), traced.params, as_rules(rule, pattern),
                           type(model).__name__)


def plan_from_jaxpr(closed: Any, params: Any, rules: tuple[MaskRule, ...], name: str) -> Plan:
    """``rules`` resolved on a traced program whose first inputs are ``params``' leaves."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    uses = _graph.analyse(closed, range(len(flat)))
    entries = []
    for i, (key_path, leaf) in enumerate(flat):
        found, op = _classify(uses[i])
        entries.append((path_str(key_path), _abstract(leaf), found, op))
    return _build(rules, entries, f"of {name}")


def plan_for_params(params: Any, rule: Any) -> Plan:
    """A :class:`Plan` from a parameter tree alone, where a kernel's layout is known
    without its model: under a Linen auto-named ``Dense_<i>`` (``(in, out)``) or
    ``Conv_<i>`` (``(*window, I, O)``) layer, or given by hand (``MaskRule(axis=...)``).

    Raises:
      ValueError: a selected ``kernel`` whose layout cannot be known this way (it names the
        leaf and says to resolve the model: :func:`resolve`), or a rule that selects nothing.
    """
    rules = as_rules(rule)
    entries = []
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path, shape = path_str(key_path), tuple(np.shape(leaf))
        hits = [r for r in rules if _matches(r, path, leaf)]
        found: Layout | str | None = None
        if hits and hits[0].axis is not None:
            found = from_axis(shape, hits[0].axis, path)
        elif _LINEN_AUTO.search(path):
            kind = _LINEN_AUTO.search(path).group(2)
            if kind == "Dense" and len(shape) == 2:
                found = from_axis(shape, 0, path)
            elif kind == "Conv" and 3 <= len(shape) <= 5:
                found = from_axis(shape, len(shape) - 2, path)
        elif hits and path.rsplit("/", 1)[-1] == "kernel" and len(shape) >= 2:
            raise ValueError(
                f"the layout of {path!r} (shape {shape}) cannot be known from the parameters "
                "alone: its contraction axis depends on the op that uses it (GPT-2's Conv1D "
                "stores (out, in), DenseGeneral contracts several axes, scan stacks layers). "
                "Resolve the model once and pass the plan: "
                "plan = nmjax.resolve(model, rule, *example_inputs), or exclude the leaf")
        entries.append((path, _abstract(leaf), found, "dot_general"
                        if found is not None and len(shape) == 2 else "conv_general_dilated"))
    return _build(rules, entries, "of this parameter tree")
