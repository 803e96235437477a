"""``sparsify`` at the op level: any Linen or NNX model, any layer class.

The model is traced to a jaxpr with its parameters as inputs (:mod:`nmjax.plan`), and the
jaxpr is evaluated with each planned parameter's ``dot_general`` / ``conv_general_dilated``
replaced by :func:`nmjax.ops.nm_dense` / :func:`nmjax.ops.nm_conv` (:mod:`nmjax._graph`).
The parameters are untouched: names, shapes and tree stay the dense model's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import linen as nn
from flax import nnx

from nmjax import _graph, export, ops
from nmjax import format as nmf
from nmjax.masks import BiMask, Masks
from nmjax.nn._core import MASKS, USED_MASKS, Sparsity
from nmjax.nn._packed import packed_product
from nmjax.nn.nnx import NMMask
from nmjax.plan import Plan, Traced, _split_args, as_rules, layout_masks, plan_from_jaxpr
from nmjax.tree import is_masks_leaf, nest, path_str

__all__ = ["SparseModel", "masks_by_path", "run_sparse"]


def masks_by_path(masks: Any) -> dict[str, Any]:
    """``{parameter path: Masks}`` of a mask tree or an ``"nm_masks"`` collection (a bare
    array there is a Bi-Mask permutation for dynamic mode: :func:`nmjax.nn.search`)."""
    flat = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_masks_leaf)[0]
    return {path_str(p): m for p, m in flat if m is not None}


def run_sparse(traced: Traced, target: Plan | tuple, sp: Sparsity, masks: Any, name: str,
               packed: dict[str, Any] | None = None) -> tuple[Any, Plan, dict[str, Masks]]:
    """Runs ``traced`` with the planned products sparse: ``(outputs, plan, {path: the
    Masks the products used})``.

    ``target``: a :class:`~nmjax.plan.Plan`, or rules to resolve on this trace. ``masks``:
    ``{path: Masks}`` (static mode) or ``None`` (computed from the weights: dynamic mode;
    a Bi-Mask permutation may come from ``masks`` then). ``packed``: ``{path:
    nmjax.export.PackedLeaf}`` of parameters given packed (packed inference), whose forward
    products a kernel backend may run from the packed form (:func:`_packed_forward`).
    """
    closed, out_shape = jax.make_jaxpr(traced.fn, return_shape=True)(traced.params,
                                                                     traced.arrays)
    flat = jax.tree_util.tree_flatten_with_path(traced.params)[0]
    plan = target if isinstance(target, Plan) else plan_from_jaxpr(closed, traced.params,
                                                                    target, name)
    plan.check_params(traced.params)
    index = {path_str(p): i for i, (p, _) in enumerate(flat)}
    invars = closed.jaxpr.invars
    lives: dict[Any, _graph.Live] = {}
    used: dict[str, Masks] = {}
    for k, leaf in enumerate(plan.leaves):
        w = flat[index[leaf.path]][1]
        given = (masks or {}).get(leaf.path)
        if sp.mode == "static":
            if given is None:
                raise ValueError(
                    f"static masks: no mask for {leaf.path!r} in the {MASKS!r} collection "
                    f"(it holds {sorted(masks or {})[:4]}); pass the masks of the same plan: "
                    "nmjax.nn.collection(opt_state) or nmjax.tree.build_masks("
                    "params, plan)")
            _check_shapes(given, leaf)
            m = given
        else:
            perm = given.perm if isinstance(given, Masks) else given
            m = layout_masks(leaf.pattern, w, leaf.layout,
                             perm if isinstance(leaf.pattern, BiMask) else None)
        used[leaf.path] = m
        bwd = None if leaf.pattern.same_masks else m.bwd
        lives[invars[index[leaf.path]]] = _graph.Live(
            k, _graph.leaf_dims(leaf.shape), m.fwd, bwd, m.perm, leaf.layout.stack)
    product = _products(plan, sp, packed or {})
    outs = _graph.Rewriter(product).run(closed.jaxpr, closed.consts,
                                         jax.tree.leaves((traced.params, traced.arrays)),
                                         lives)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs), plan, used


def _check_shapes(masks: Masks, leaf: Any) -> None:
    if not isinstance(masks, Masks):
        raise TypeError(f"static masks for {leaf.path!r} must be an nmjax.masks.Masks, got "
                        f"{type(masks).__name__}")
    for name in ("fwd", "bwd"):
        got = tuple(getattr(masks, name).shape)
        if got != leaf.shape:
            raise ValueError(f"static {name} mask for {leaf.path!r} has shape {got}, but the "
                             f"parameter has shape {leaf.shape}")


def _products(plan: Plan, sp: Sparsity, packed: dict[str, Any]):
    def product(eqn, x, w, live, side):
        leaf = plan.leaves[live.leaf]
        kw = dict(decay=sp.decay, backend=sp.backend, fwd_nm=leaf.pattern.fwd_nm,
                  bwd_nm=leaf.pattern.bwd_nm)
        if eqn.primitive.name == "dot_general":
            precision = eqn.params.get("precision")
            given = packed.get(leaf.path)

            def dense(x2, w2, fwd, bwd, perm):
                if given is not None:
                    y = _packed_forward(x2, w2, given, leaf, sp, precision)
                    if y is not None:
                        return y
                return ops.nm_dense(x2, w2, fwd, bwd, perm=perm, precision=precision, **kw)

            return _graph.sparse_dot_general(eqn, x, w, live, side, leaf.layout, dense)

        def conv(x4, w4, fwd, bwd, perm, **options):
            return ops.nm_conv(x4, w4, fwd, bwd, perm=perm, **options, **kw)

        return _graph.sparse_conv(eqn, x, w, live, conv)

    return product


def _packed_forward(x2: jax.Array, w2: jax.Array, given: Any, leaf: Any, sp: Sparsity,
                    precision: Any) -> jax.Array | None:
    """The product ``x2 @ w2`` (``w2`` the kernel's ``(K, N)`` view) from the packed kernel
    where the backend resolved for it is a kernel (:func:`nmjax.nn._packed.packed_product`:
    a ``forward_packed`` backend reads the packed values and metadata); ``None`` for the
    reference, or where the view is not the 2-D kernel grouped along its contraction axis
    (then ``nm_dense`` runs on the unpacked kernel)."""
    w = given.weight
    if (len(w.shape) != 2 or tuple(leaf.layout.contract) != (w.axis,)
            or tuple(w2.shape) != (w.shape[w.axis], w.shape[1 - w.axis])):
        return None

    def as_view(x):  # the canonical packing runs along the grouped axis: a transpose
        return x if x is None or w.axis == 0 else x.T

    # the values in the view's dtype: the model's own cast of the kernel, on the packed values
    kernel = nmf.PackedNM(as_view(w.values.astype(w2.dtype)), as_view(w.meta), w.n, w.m, 0,
                          tuple(w2.shape))
    return packed_product(x2, export.PackedLeaf(kernel, as_view(given.kept)), backend=sp.backend,
                          dtype=x2.dtype, precision=precision)


# --------------------------------------------------------------------------------- Linen


@dataclasses.dataclass(frozen=True, eq=False)
class SparseModel:
    """A Linen model whose planned parameters' products run N:M sparse (both directions).

    Made by :func:`nmjax.nn.sparsify`. ``init`` and ``apply`` take what the dense model's
    take; its ``params`` are exactly the dense model's. In ``mode="static"`` ``apply``
    reads the masks from ``variables["nm_masks"]`` (a tree laid out like ``params``; see
    :func:`nmjax.nn.collection`) and ``init`` returns that collection too.

    Attributes:
      model: the dense Linen module.
      target: the :class:`~nmjax.plan.Plan`, or rules resolved at every trace.
      sparsity: mode, backend and SR-STE decay (:class:`nmjax.nn.Sparsity`; its pattern is
        unused: each parameter's pattern is the plan's).
    """

    model: nn.Module
    target: Plan | tuple
    sparsity: Sparsity

    @property
    def plan(self) -> Plan | None:
        """The plan (``None`` until an ``init``/``apply`` resolved rules)."""
        return self.target if isinstance(self.target, Plan) else None

    def _traced(self, variables: dict, args: tuple, kwargs: dict, method: Any,
                rngs: Any, mutable: Any) -> Traced:
        variables = dict(variables)
        variables.pop(MASKS, None)
        params = variables.pop("params")
        arrays, rebuild = _split_args((args, kwargs, rngs, variables))
        model = self.model

        def fn(p, a):
            a, k, r, rest = rebuild(a)
            return model.apply({"params": p, **rest}, *a, rngs=r, method=method,
                               mutable=mutable, **k)

        return Traced(fn, params, arrays)

    def apply(self, variables: Any, *args: Any, rngs: Any = None, method: Any = None,
              mutable: Any = False, **kwargs: Any) -> Any:
        """``model.apply`` with the planned products sparse."""
        if "params" not in variables:
            raise ValueError(f"variables must hold 'params' (got {sorted(variables)})")
        variables, packed = _unpacked(variables, self.sparsity.mode)
        masks = variables.get(MASKS)
        masks = masks_by_path(masks) if masks is not None else None
        report, mutable = _wants_used(mutable)
        traced = self._traced(variables, args, kwargs, method, rngs, mutable)
        out, _, used = run_sparse(traced, self.target, self.sparsity, masks,
                                  type(self.model).__name__, packed)
        if not report:
            return out
        y, updates = out if mutable else (out, {})
        return y, {**updates, USED_MASKS: nest(used)}

    def init(self, rngs: Any, *args: Any, method: Any = None, **kwargs: Any) -> dict:
        """The dense model's ``init``; in static mode plus the ``"nm_masks"`` collection.
        Rules are resolved here too, so a rule that selects nothing (or a parameter that
        cannot be sparse) is refused at init."""
        variables = dict(self.model.init(rngs, *args, method=method, **kwargs))
        plan = self.resolve(variables["params"], *args, method=method, **kwargs)
        if self.sparsity.mode == "static":
            from nmjax.nn.linen import to_collection

            variables[MASKS] = to_collection(plan.masks(variables["params"]))
        return variables

    def resolve(self, params: Any, *args: Any, method: Any = None, **kwargs: Any) -> Plan:
        """The plan for these parameters and example inputs."""
        if self.plan is not None:
            return self.plan
        from nmjax.plan import resolve

        return resolve(self.model, self.target, *args, params=params, method=method, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("a sparsified Linen model is used through apply(variables, ...), like "
                        "the dense one; it cannot be called inside another module")


def _unpacked(variables: Any, mode: str) -> tuple[Any, dict[str, Any]]:
    """Packed parameters (:func:`nmjax.export.pack_params`) unpacked inside the traced
    forward, so only the packed arrays stay resident; in static mode their masks become the
    ``"nm_masks"`` collection when none is given (packed inference: one tree serves).
    Returns the variables and ``{path: PackedLeaf}`` (for kernels that take the packed
    form; an unpacked kernel that nothing else reads is then dropped by XLA)."""
    params = variables["params"]
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=export.is_packed)[0]
    packed = {path_str(p): x for p, x in flat if export.is_packed(x)}
    if not packed:
        return variables, {}
    out = {**variables, "params": export.unpack_params(params)}
    if mode == "static" and MASKS not in variables:
        from nmjax.nn.linen import to_collection

        out[MASKS] = to_collection(export.unpack_masks(params))
    return out, packed


def _wants_used(mutable: Any) -> tuple[bool, Any]:
    """Whether ``mutable`` asks for the ``"nm_used_masks"`` report, and ``mutable`` without
    it (the dense model never has that collection)."""
    if isinstance(mutable, str):
        mutable = [mutable]
    if isinstance(mutable, list | tuple) and USED_MASKS in mutable:
        rest = [c for c in mutable if c != USED_MASKS]
        return True, rest if rest else False
    return False, mutable


# ----------------------------------------------------------------------------------- NNX


_SUBCLASSES: dict[type, type] = {}


def _sparse_class(cls: type) -> type:
    if getattr(cls, "_nm_base", None) is not None:
        return cls
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"Sparse{cls.__name__}", (cls,), {
            "__call__": _nnx_call, "_nm_base": cls, "__module__": cls.__module__,
            "__doc__": f"{cls.__name__} with its planned products N:M sparse (nmjax)."})
    return _SUBCLASSES[cls]


def _mask_key(path: str) -> str:
    return path.replace("/", ".")


def _nnx_masks(model: nnx.Module) -> dict[str, Masks] | None:
    store = getattr(model, "nm_masks", None)
    if store is None:
        return None
    out = {}
    for key, entry in store.items():
        perm = entry["perm"].get_value() if "perm" in entry else None
        out[key.replace(".", "/")] = Masks(entry["fwd"].get_value(), entry["bwd"].get_value(),
                                           perm)
    return out


def set_nnx_masks(model: nnx.Module, masks: dict[str, Masks]) -> None:
    """Stores ``{path: Masks}`` as the static masks of an op-level sparse NNX model (in
    place where the variables exist, so it works inside ``nnx.jit``)."""
    current = getattr(model, "nm_masks", None)
    keys = {_mask_key(p) for p in masks}
    if current is not None and set(current.keys()) == keys and all(
            ("perm" in current[_mask_key(p)]) == (m.perm is not None)
            for p, m in masks.items()):
        for path, m in masks.items():
            entry = current[_mask_key(path)]
            entry["fwd"].set_value(m.fwd)
            entry["bwd"].set_value(m.bwd)
            if m.perm is not None:
                entry["perm"].set_value(m.perm)
        return
    store = {}
    for path, m in masks.items():
        entry = {"fwd": NMMask(m.fwd), "bwd": NMMask(m.bwd)}
        if m.perm is not None:
            entry["perm"] = NMMask(m.perm)
        store[_mask_key(path)] = nnx.Dict(entry)
    model.nm_masks = nnx.Dict(store)


def _nnx_call(self, *args, **kwargs):
    base = type(self)._nm_base
    config = self._nm_config
    graphdef, params, rest = nnx.split(self, nnx.Param, ...)
    arrays, rebuild = _split_args((args, kwargs))

    def fn(p, a):
        (a, k), r = rebuild(a[:-1]), a[-1]
        m = nnx.merge(graphdef, p, r)
        out = base.__call__(m, *a, **k)
        return out, nnx.split(m, nnx.Param, ...)[2]

    traced = Traced(fn, params, [*arrays, rest])
    (out, new_rest), _, _ = run_sparse(traced, config.target, config.sparsity, _nnx_masks(self),
                                       base.__name__)
    nnx.update(self, new_rest)
    return out


@dataclasses.dataclass(frozen=True)
class _NNXConfig:
    target: Plan | tuple
    sparsity: Sparsity


def sparsify_nnx(model: nnx.Module, target: Plan | tuple, sp: Sparsity) -> nnx.Module:
    """A copy of ``model`` whose ``__call__`` runs the planned products sparse."""
    new = nnx.clone(model)
    new.__class__ = _sparse_class(type(model))
    new._nm_config = nnx.static(_NNXConfig(target, sp))
    if sp.mode == "static":
        if not isinstance(target, Plan):
            raise ValueError("static masks for an NNX model need a plan: "
                             "sparsify(model, nmjax.resolve(model, rule, *example_inputs), "
                             "mode='static')")
        params = nnx.to_pure_dict(nnx.state(new, nnx.Param))
        set_nnx_masks(new, masks_by_path(target.masks(params)))
    return new


def refresh_nnx(model: nnx.Module, key: jax.Array | None = None) -> None:
    """Static masks of an op-level sparse NNX model recomputed from its weights (with
    ``key``: Bi-Mask permutations searched first, warm-started from the stored ones)."""
    from nmjax.plan import layout_search

    plan = nnx_plan(model)
    if plan is None or model._nm_config.sparsity.mode != "static":
        raise ValueError("refreshing masks needs a model sparsified with a plan in static "
                         "mode: nmjax.nn.sparsify(model, plan, mode='static')")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    stored = _nnx_masks(model) or {}
    perms = {path: m.perm for path, m in stored.items() if m.perm is not None}
    if key is not None:
        flat = {path_str(p): w for p, w in jax.tree_util.tree_flatten_with_path(params)[0]}
        bimask = [leaf for leaf in plan.leaves if isinstance(leaf.pattern, BiMask)]
        for leaf, k in zip(bimask, jax.random.split(key, max(len(bimask), 1)), strict=False):
            perms[leaf.path] = layout_search(leaf.pattern, flat[leaf.path], leaf.layout, k,
                                             init=perms.get(leaf.path))
    set_nnx_masks(model, masks_by_path(plan.masks(params, perms=perms)))


def model_masks(model: nnx.Module) -> dict[str, Masks]:
    """``{parameter path: Masks}`` the next call of an op-level sparse NNX model uses: the
    stored ones (static), or the ones computed from the current weights (dynamic; needs a
    plan)."""
    plan = nnx_plan(model)
    if model._nm_config.sparsity.mode == "static":
        return _nnx_masks(model) or {}
    if plan is None:
        raise ValueError("a model sparsified with a rule resolves its plan at each call; "
                         "sparsify it with a plan (nmjax.resolve) to read its masks")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    stored = _nnx_masks(model) or {}
    perms = {path: m.perm for path, m in stored.items() if m.perm is not None}
    return masks_by_path(plan.masks(params, perms=perms))


def nnx_plan(model: nnx.Module) -> Plan | None:
    config = getattr(model, "_nm_config", None)
    return config.target if config is not None and isinstance(config.target, Plan) else None


def is_sparse_nnx(model: Any) -> bool:
    return getattr(type(model), "_nm_base", None) is not None


def as_target(rule: Any, pattern: str | None) -> Plan | tuple:
    return rule if isinstance(rule, Plan) else as_rules(rule, pattern)
