"""What the converters need from a model: its planned kernels in forward order, each as one or
more ``(K, N)`` matrices, and the inputs of each kernel's products.

The model is traced (:func:`nmjax.plan.trace_model`) and its jaxpr evaluated by a
:class:`nmjax._graph.Rewriter` whose products compute what the model computes and record the
other operand of every product of a planned kernel, in the kernel's canonical view
(:class:`nmjax.plan.Layout`): a ``dot_general``'s as rows ``(batch, rows, K)``, a
convolution's input as ``(N, *spatial, C)`` beside the convolution's own settings. So the
layer type, its class and its parameter names play no part: a Hugging Face ``FlaxConv1D``
storing ``(out, in)``, a ``DenseGeneral``, an ``einsum`` and layers stacked under ``nn.scan``
are read the same way (inside a ``scan`` the records come out stacked, one per layer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from nmjax import _graph
from nmjax._convert_solve import Geometry
from nmjax.plan import (
    LeafPlan,
    Plan,
    Traced,
    _split_args,
    as_rules,
    plan_from_jaxpr,
    trace_model,
)
from nmjax.tree import path_str

Key = tuple[str, Any, int]  # (path, Geometry or why the converters cannot take it, lead)


@dataclasses.dataclass(frozen=True)
class Site:
    """One planned kernel as the converters see it.

    Attributes:
      leaf: its plan (path, layout, pattern).
      geometry: how one ``(K, N)`` matrix of its canonical view turns its inputs into rows.
      lead: the size of the first row axis of its products' inputs (the samples).
    """

    leaf: LeafPlan
    geometry: Geometry
    lead: int

    @property
    def path(self) -> str:
        return self.leaf.path

    @property
    def stacked(self) -> int:
        return self.leaf.layout.sizes[0]


def _conv_geometry(eqn: Any, w: jax.Array) -> Geometry | str:
    params = eqn.params
    if params["feature_group_count"] != 1:
        return (f"a grouped convolution (feature_group_count={params['feature_group_count']}); "
                "the converters take feature_group_count=1")
    _, order = _graph.conv_view(eqn, w)
    padding = params["padding"]
    padding = padding if isinstance(padding, str) else tuple(tuple(int(v) for v in p)
                                                            for p in padding)
    return Geometry("conv", tuple(int(w.shape[a]) for a in order),
                    tuple(params["window_strides"]), padding, tuple(params["lhs_dilation"]),
                    tuple(params["rhs_dilation"]))


class _Recorder(_graph.Rewriter):
    """Runs the model unchanged and records the inputs of the products of ``paths``."""

    def __init__(self, plan: Plan, paths: frozenset[str]):
        super().__init__(self._product)
        self.plan = plan
        self.paths = paths

    def _product(self, eqn: Any, x: jax.Array, w: jax.Array, live: _graph.Live, side: int
                 ) -> jax.Array:
        y = _graph._bind(eqn, [w, x] if side == 0 else [x, w])[0]
        leaf = self.plan.leaves[live.leaf]
        if leaf.path not in self.paths:
            return y
        if eqn.primitive.name == "dot_general":
            view = _graph.dot_view(eqn, x.ndim, w.shape, live.dims, side, leaf.layout)
            lead = int(x.shape[view.xf[0]]) if view.xf else 1
            key = (leaf.path, Geometry("dense", (view.depth, view.width)), lead)
            self.records.append((key, view.activation(x)))
        else:
            geometry = _conv_geometry(eqn, w)
            x_nhwc, _ = _graph.conv_view(eqn, x)
            key = (leaf.path, geometry, int(x_nhwc.shape[0]))
            self.records.append((key, x_nhwc))
        return y


def stacked(record: jax.Array, key: Key, count: int) -> jax.Array:
    """A record (``scan`` axes first) as ``(S, samples, ...)``: a dense product's rows
    ``(S, samples, P, K)``, a convolution's input ``(S, N, *spatial, C)``."""
    _, geometry, lead = key
    if geometry.kind == "dense":
        return record.reshape(count, lead, -1, record.shape[-1])
    return record.reshape(count, *record.shape[-(geometry.spatial + 2):])


def _record(fn: Callable, plan: Plan, paths: frozenset[str], params: Any, arrays: list[Any]
            ) -> list[tuple[Key, jax.Array]]:
    """Runs ``fn(params, arrays)`` and returns the records of ``paths``' products."""
    closed = jax.make_jaxpr(fn)(params, arrays)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    index = {path_str(p): i for i, (p, _) in enumerate(flat)}
    lives = {closed.jaxpr.invars[index[leaf.path]]: _graph.Live(
        k, _graph.leaf_dims(leaf.shape), None, None, None, leaf.layout.stack)
        for k, leaf in enumerate(plan.leaves)}
    recorder = _Recorder(plan, paths)
    recorder.run(closed.jaxpr, closed.consts, jax.tree.leaves((params, arrays)), lives)
    return recorder.records


def _shapes(args: tuple[jax.Array, ...]) -> str:
    return ", ".join(str(tuple(a.shape)) for a in args)


class Model:
    """A model and a plan, ready to capture the inputs of the planned kernels.

    ``model``: an NNX module, or a pair ``(apply_fn or Linen module, params)`` called as
    ``apply_fn({"params": params, **collections}, *args, **call_kwargs)``. ``rule``: a
    :class:`~nmjax.plan.Plan`, or rules resolved on this model's trace.
    """

    def __init__(self, model: Any, rule: Any, args: tuple[jax.Array, ...],
                 collections: Mapping[str, Any] | None, call_kwargs: Mapping[str, Any]):
        self.module: nn.Module | None = None
        self.graphdef = self.state = self.rest = None
        self.kwargs = dict(call_kwargs)
        self.extra: list[Any] = []
        if isinstance(model, nnx.Module):
            if collections:
                raise ValueError("collections applies to Linen models; an NNX model holds its "
                                 "own state")
            self.graphdef, self.state, self.rest = nnx.split(model, nnx.Param, ...)
            self.traced = trace_model(model, args, self.kwargs)
            name = type(model).__name__
        elif isinstance(model, tuple) and len(model) == 2:
            self.traced = self._linen(*model, dict(collections or {}), args)
            name = type(self.module).__name__ if self.module is not None else "apply_fn"
        elif isinstance(model, nn.Module):
            raise TypeError("a Linen module needs its parameters: pass (module, params)")
        else:
            raise TypeError(f"model must be an NNX module or a pair (apply_fn, params), got "
                            f"{type(model).__name__}")
        self.params = self.traced.params
        try:
            closed = self.traced.jaxpr()
        except Exception as e:  # any failure of the user's forward pass on this batch
            raise ValueError(f"running the model on calibration_batch of shape "
                             f"{_shapes(args)} failed: {type(e).__name__}: {e}") from e
        if isinstance(rule, Plan):
            rule.check_params(self.params)
            self.plan = rule
        else:
            self.plan = plan_from_jaxpr(closed, self.params, as_rules(rule), name)
        self._compiled: dict[Any, tuple[list[tuple], Callable]] = {}

    def _linen(self, fn: Any, params: Any, collections: dict, args: tuple) -> Traced:
        if isinstance(fn, nn.Module):
            self.module, apply = fn, fn.apply
        elif callable(fn):
            # module.apply (a TrainState's apply_fn) still names its module
            owner = getattr(fn, "__self__", None)
            if isinstance(owner, nn.Module) and getattr(fn, "__name__", None) == "apply":
                self.module = owner
            apply = fn
        else:
            raise TypeError(f"model must be an NNX module or a pair (apply_fn or Linen module, "
                            f"params), got a pair whose first item is {type(fn).__name__}")
        if not isinstance(params, Mapping):
            raise TypeError(f"the params of a Linen model must be a mapping (the 'params' "
                            f"collection), got {type(params).__name__}")
        if "params" in collections:
            raise ValueError("collections must not hold 'params': pass them as the pair's "
                             "second item")
        _, rebuild = _split_args((args, self.kwargs))
        self.extra = [collections]

        def forward(p, a):
            (a_, k), extra = rebuild(a[:-1]), a[-1]
            return apply({"params": p, **extra}, *a_, **k)

        return Traced(forward, params, self.arrays(args))

    def arrays(self, args: tuple[jax.Array, ...]) -> list[Any]:
        """The traced function's array inputs for a batch ``args``."""
        return [*_split_args((args, self.kwargs))[0], *self.extra]

    def capture(self, params: Any, args: tuple[jax.Array, ...], paths: frozenset[str]
                ) -> dict[str, list[tuple[tuple, jax.Array]]]:
        """``{path: [(key, record), ...]}`` for the products of ``paths`` on ``args``, in
        forward order (``key = (path, geometry, lead)``; one compiled program per set of
        paths and input shapes)."""
        arrays = self.arrays(args)
        sig = (paths, tuple((tuple(jnp.shape(a)), jnp.result_type(a))
                            for a in jax.tree.leaves(arrays)))
        if sig not in self._compiled:
            keys: list[Key] = []
            fn, plan = self.traced.fn, self.plan

            def run(params, arrays):
                records = _record(fn, plan, paths, params, arrays)
                keys[:] = [k for k, _ in records]
                return [x for _, x in records]

            compiled = jax.jit(run).trace(params, arrays).lower().compile()
            self._compiled[sig] = (keys, compiled)
        keys, compiled = self._compiled[sig]
        out: dict[str, list[tuple[tuple, jax.Array]]] = {}
        for key, x in zip(keys, compiled(params, arrays), strict=True):
            out.setdefault(key[0], []).append((key, x))
        return out

    def sites(self, args: tuple[jax.Array, ...], method: str) -> list[Site]:
        """The planned kernels in forward order (first use), checked: each is used on
        ``args`` by products of one geometry that take the samples along their inputs'
        first row axis."""
        found: list[Key] = []

        def run(params, arrays):
            records = _record(self.traced.fn, self.plan, frozenset(self.plan.paths), params,
                              arrays)
            found[:] = [k for k, _ in records]
            return [x for _, x in records]

        jax.eval_shape(run, self.params, self.arrays(args))
        samples = args[0].shape[0]
        by_path: dict[str, list[Key]] = {}
        for key in found:
            by_path.setdefault(key[0], []).append(key)
        out = [self._site(leaf, by_path.get(leaf.path, []), samples, method)
               for leaf in self.plan.leaves]
        first = {key[0]: i for i, key in reversed(list(enumerate(found)))}
        return sorted(out, key=lambda s: first[s.path])

    @staticmethod
    def _site(leaf: LeafPlan, keys: list[Key], samples: int, method: str) -> Site:
        if not keys:
            raise ValueError(f"the plan's parameter {leaf.path!r} is never used by a product "
                             "on calibration_batch; exclude it from the rule")
        geoms = list(dict.fromkeys(k[1] for k in keys))
        why = next((g for g in geoms if isinstance(g, str)), None)
        if why is not None:
            raise ValueError(f"{leaf.path!r} is used by {why}: exclude it from the rule")
        if len(geoms) != 1:
            raise ValueError(f"{leaf.path!r} is used by {len(geoms)} products of different "
                             f"shapes or settings; {method} fits one problem per kernel: "
                             "exclude it from the rule")
        for _, _, lead in keys:
            if lead != samples:
                raise ValueError(
                    f"{leaf.path!r}: a product of it takes inputs whose first row axis has "
                    f"{lead} entries, not calibration_batch's {samples} samples; {method} "
                    "draws samples along axis 0 of every selected kernel's inputs")
        return Site(leaf, geoms[0], samples)
