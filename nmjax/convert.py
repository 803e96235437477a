"""Converting trained models to N:M: AdaPrune, SparseGPT, Wanda, N per layer from density.

:func:`adaprune` (Hubara et al., 2021) takes a trained Linen or NNX model, a calibration
batch and a :class:`~nmjax.tree.MaskRule`, and converts each selected Dense/Conv layer, in
forward order, to the rule's pattern (N:M, transposable N:M, Bi-Mask's forward mask): the
magnitude mask, then the kept weights (optionally the bias) optimised so the layer's output
on its calibration inputs matches the dense layer's, ``min ‖X·W − X·Ŵ‖²``. The result holds
the converted parameters and their masks in the form the static-mode sparse layers and
:func:`nmjax.optim.sparse` read, so fine-tuning goes straight on.

:func:`sparsegpt` (Frantar & Alistarh, 2023) and :func:`wanda` (Sun et al., 2024) prune a
dense model in one shot, layer by layer on the same captured inputs: SparseGPT chooses each
group's mask by OBS saliency and updates the remaining weights to compensate, Wanda scores
``|w| · ‖x‖`` and keeps the weights; both take N:M, transposable N:M and Bi-Mask patterns and
return the same :class:`Conversion`.

:func:`choose_n` is the paper's rule for the N of a layer that is already unstructured
sparse; :func:`rules_for_density` applies it to every layer of a model, and
:func:`global_magnitude_prune` makes such a model from a dense one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nmjax import _checks, _oneshot
from nmjax import _convert_solve as solve
from nmjax._convert_capture import Model, Site, stacked
from nmjax._progress import Bars
from nmjax._text import table
from nmjax.masks import NM, BiMask, Masks, Pattern, Transposable, as_pattern
from nmjax.plan import LeafPlan, Plan, as_rules, layout_reason, plan_for_params
from nmjax.tree import MaskRule, apply_masks, path_str

SOLVERS = ("auto", "lstsq", "adam")


# ------------------------------------------------------------------------------- results


class LayerReport(NamedTuple):
    """One converted layer.

    Attributes:
      path: the kernel's path (``"Dense_0/kernel"``).
      shape: the kernel's shape.
      pattern: the pattern's label (``"2:4 transposable"``).
      solver: AdaPrune's ``"lstsq"`` or ``"adam"`` (what ``solver="auto"`` picked), or
        ``"sparsegpt"``, ``"wanda"`` (:func:`sparsegpt`, :func:`wanda`).
      density: the kernel's nonzero fraction before conversion (1.0 for a dense model).
      kept: the mask's kept fraction.
      error_magnitude, error_adaprune: relative output error ``‖Y − Ŷ‖_F / ‖Y‖_F`` of the
        layer (bias included) against the dense layer, after magnitude N:M and after the
        conversion (AdaPrune, or the ``solver`` named), on the held-out batch (on the
        calibration batch when none was given).
      fit_error_magnitude, fit_error_adaprune: the same on the calibration batch.
      seconds: wall time of the layer's conversion (capture, solve, errors; compilation
        included).
    """

    path: str
    shape: tuple[int, ...]
    pattern: str
    solver: str
    density: float
    kept: float
    error_magnitude: float
    error_adaprune: float
    fit_error_magnitude: float
    fit_error_adaprune: float
    seconds: float


_METHOD_NAMES = {"lstsq": "AdaPrune", "adam": "AdaPrune", "sparsegpt": "SparseGPT",
                 "wanda": "Wanda"}


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """Per layer: density, output error after magnitude N:M and after AdaPrune, time; for
    the model: whatever metrics you measured per stage. ``str()`` is a table;
    :meth:`as_dict` the same as plain data.

    Attributes:
      layers: one :class:`LayerReport` per converted layer, in forward order.
      model: ``{stage: {metric: value}}``, e.g. ``{"dense": {"loss": .., "accuracy": ..},
        "magnitude": .., "adaprune": .., "finetuned": ..}`` (stages and metrics as given).
      held_out: whether the layer errors are on a held-out batch.
    """

    layers: tuple[LayerReport, ...]
    model: Mapping[str, Mapping[str, float]]
    held_out: bool

    def as_dict(self) -> dict[str, Any]:
        return {"layers": [dict(r._asdict(), shape=list(r.shape)) for r in self.layers],
                "model": {k: dict(v) for k, v in self.model.items()},
                "held_out": self.held_out}

    def __str__(self) -> str:
        where = "held-out" if self.held_out else "calibration"
        method = "/".join(dict.fromkeys(_METHOD_NAMES.get(r.solver, r.solver)
                                        for r in self.layers)) or "AdaPrune"
        head = ("layer", "shape", "pattern", "solver", "density", f"err mag ({where})",
                f"err {method}", "fit err mag", f"fit err {method}", "s")
        body = [(r.path, "x".join(map(str, r.shape)), r.pattern, r.solver, f"{r.density:.3f}",
                 f"{r.error_magnitude:.4f}", f"{r.error_adaprune:.4f}",
                 f"{r.fit_error_magnitude:.4f}", f"{r.fit_error_adaprune:.4f}",
                 f"{r.seconds:.2f}") for r in self.layers]
        lines = table(head, body, set(range(4, 10)))
        if self.model:
            metrics = list(dict.fromkeys(k for v in self.model.values() for k in v))
            rows = [(stage, *(f"{values[k]:.4f}" if k in values else "" for k in metrics))
                    for stage, values in self.model.items()]
            lines += ["", *table(("model", *metrics), rows, set(range(1, len(metrics) + 1)))]
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Conversion:
    """What :func:`adaprune`, :func:`sparsegpt` and :func:`wanda` return.

    Attributes:
      params: the converted parameters, in the input's form (a Linen ``params`` dict, or the
        NNX model's ``nnx.State`` of ``nnx.Param``); each converted kernel is 0 outside its
        mask.
      masks: the parameters' tree with a :class:`~nmjax.masks.Masks` at each converted
        kernel and ``None`` elsewhere (what :func:`nmjax.tree.apply_masks` and
        :func:`nmjax.optim.sparse`'s state hold).
      magnitude_params: the plain magnitude N:M parameters (the dense ones under the
        pattern's magnitude masks), the baseline.
      layers: one :class:`LayerReport` per converted layer, in forward order.
      rules: the rules the layers were converted with.
      model: NNX: a copy of the model with the converted parameters whose selected layers
        are static-mode sparse layers holding the masks. Linen: the module sparsified in
        static mode (``variables["nm_masks"] = nmjax.nn.collection(conversion)``), or ``None``
        when the ``apply_fn`` given is neither a module nor a module's ``apply``.
      held_out: whether the layer errors are on a held-out batch.
      plan: the :class:`~nmjax.plan.Plan` of the converted layers: pass it to
        :func:`nmjax.optim.sparse` to fine-tune (``init_masks=masks`` starts from exactly
        these masks).
    """

    params: Any
    masks: Any
    magnitude_params: Any
    layers: tuple[LayerReport, ...]
    rules: tuple[MaskRule, ...]
    model: Any
    held_out: bool
    plan: Plan | None = None

    def report(self, metrics: Mapping[str, Mapping[str, float]] | None = None
               ) -> ConversionReport:
        """The layer table, with ``metrics`` (``{stage: {metric: value}}``) for the model."""
        metrics = {} if metrics is None else metrics
        if not isinstance(metrics, Mapping) or not all(isinstance(v, Mapping)
                                                       for v in metrics.values()):
            raise TypeError("metrics must be a mapping {stage: {metric: value}}, got "
                            f"{metrics!r:.80}")
        clean = {str(k): {str(m): float(x) for m, x in v.items()} for k, v in metrics.items()}
        return ConversionReport(self.layers, clean, self.held_out)


# --------------------------------------------------------------------------------- checks


def _check_finite_inputs(inputs: Any, path: str) -> None:
    """The captured inputs of a layer are finite (an earlier layer may overflow)."""
    bad = sum(int(jnp.size(x) - jnp.isfinite(x).sum()) for x in jax.tree.leaves(inputs)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact))
    if bad:
        raise ValueError(f"layer {path!r}: its inputs, captured from calibration_batch, hold "
                         f"{bad} non-finite value(s) (NaN or inf); the batch is finite, so "
                         "an earlier layer overflowed: check the model on this batch")


def _as_args(batch: Any, name: str) -> tuple[jax.Array, ...]:
    args = batch if isinstance(batch, tuple) else (batch,)
    if not args:
        raise ValueError(f"{name} is an empty tuple; pass an array (samples first) or a tuple "
                         "of arrays, one per positional input of the model")
    out = []
    for i, a in enumerate(args):
        what = name if len(args) == 1 else f"{name}[{i}]"
        if not (hasattr(a, "shape") and hasattr(a, "dtype")):
            a = np.asarray(a)
        if a.dtype == object or not (jnp.issubdtype(a.dtype, jnp.number)
                                     or a.dtype == jnp.bool_):
            raise TypeError(f"{what} must be a numeric array, got dtype {a.dtype}")
        if a.ndim == 0:
            raise ValueError(f"{what} must have the samples along axis 0, got a scalar")
        a = jnp.asarray(a)
        if jnp.issubdtype(a.dtype, jnp.inexact):
            bad = int(jnp.size(a) - jnp.isfinite(a).sum())
            if bad:
                raise ValueError(f"{what} of shape {tuple(a.shape)} holds {bad} non-finite "
                                 "value(s) (NaN or inf); the fit would be non-finite: clean "
                                 "the batch")
        out.append(a)
    lead = {a.shape[0] for a in out}
    if len(lead) != 1:
        raise ValueError(f"the arrays of {name} must share their leading (sample) axis, got "
                         f"shapes {[tuple(a.shape) for a in out]}")
    if out[0].shape[0] == 0:
        raise ValueError(f"{name} of shape {tuple(out[0].shape)} holds no samples")
    return tuple(out)


def _shapes(args: tuple[jax.Array, ...]) -> str:
    return ", ".join(str(tuple(a.shape)) for a in args)


def _check_positive(value: Any, name: str, *, zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not (value >= 0 if zero else value > 0) or not math.isfinite(value):
        raise ValueError(f"{name} must be {'>= 0' if zero else '> 0'} and finite, got {value}")
    return value


def _check_key(key: Any) -> jax.Array:
    if isinstance(key, int | np.integer) and not isinstance(key, bool):
        return jax.random.key(int(key))
    return _checks.check_key(key, "adam")


# ------------------------------------------------------------------------------ setup


class _Setup(NamedTuple):
    """What every conversion starts from: the checked batches, the model with its plan, and
    the planned kernels in forward order."""

    args: tuple[jax.Array, ...]
    held: tuple[jax.Array, ...] | None
    samples: int
    model: Model
    sites: list[Site]


def _check_bools(**values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")


def _setup(model: Any, calibration_batch: Any, rule: Any, held_out: Any, collections: Any,
           call_kwargs: Any, method: str) -> _Setup:
    if not isinstance(rule, Plan):
        as_rules(rule)  # a wrong rule fails before the model runs
    args = _as_args(calibration_batch, "calibration_batch")
    held = None
    if held_out is not None:
        held = _as_args(held_out, "held_out")
        if len(held) != len(args) or any(h.shape[1:] != a.shape[1:] or h.dtype != a.dtype
                                         for h, a in zip(held, args, strict=False)):
            raise ValueError(f"held_out of shape {_shapes(held)} must match calibration_batch "
                             f"of shape {_shapes(args)} except along axis 0 (and in dtype)")
    call_kwargs = {} if call_kwargs is None else dict(call_kwargs)
    captured = Model(model, rule, args, collections, call_kwargs)
    sites = captured.sites(args, method)
    if held is not None:
        captured.sites(held, method)
    return _Setup(args, held, args[0].shape[0], captured, sites)


# ------------------------------------------------------------------------ the layer loop


class _Unit(NamedTuple):
    """One ``(K, N)`` matrix to convert: a planned kernel, or one layer of a stacked one."""

    site: Site
    index: int

    @property
    def name(self) -> str:
        return self.site.path if self.site.stacked == 1 else f"{self.site.path}[{self.index}]"

    def matrix(self, kernel: Any) -> jax.Array:
        """This unit's ``(K, N)`` matrix of a kernel-shaped array."""
        return self.site.leaf.layout.to_canonical(jnp.asarray(kernel))[self.index]


class _Solved(NamedTuple):
    """A solver's answer for one unit: augmented weights ``(K + 1, N)`` (the bias last),
    the masks of the ``(K, N)`` matrix, the solver's name, whether the bias was fitted."""

    new: np.ndarray
    masks: Masks
    solver: str
    fit_bias: bool = False


class _Bars(Bars):
    """:class:`nmjax._progress.Bars` whose items also feed the solvers' in-loop progress
    callbacks (``solve.PROGRESS``)."""

    @contextlib.contextmanager
    def layer(self, label: str, total: int):
        """Yields whether the solver should report progress (a bar is shown)."""
        with self.item(label, total) as update:
            if update is None:
                yield False
                return
            solve.PROGRESS.set(update)
            try:
                yield True
            finally:
                solve.PROGRESS.set(None)


def _bias_of(flat: Mapping[str, Any], unit: _Unit) -> Any:
    """The bias beside a unit's kernel (the leaf ``bias`` next to it, ``(N,)``, or
    ``(S, N)`` for a stacked kernel), or ``None``."""
    site = unit.site
    path = site.path
    if not path.endswith("kernel"):
        return None
    bias = flat.get(path[: -len("kernel")] + "bias")
    width = site.geometry.out
    if bias is None or math.prod(np.shape(bias)) != site.stacked * width:
        return None
    return jnp.reshape(bias, (site.stacked, width))[unit.index]


class _Inputs:
    """The units' inputs on a batch, captured once per kernel from ``params`` (all its
    stacked layers at once) until :meth:`invalidate` says ``params`` changed."""

    def __init__(self, setup: _Setup, batch: tuple[jax.Array, ...]):
        self.setup, self.batch = setup, batch
        self.cache: dict[str, tuple[jax.Array, ...]] = {}

    def invalidate(self) -> None:
        self.cache.clear()

    def __call__(self, params: Any, unit: _Unit) -> tuple[jax.Array, ...]:
        """One array per call of the unit's products, ``(samples, ...)``."""
        path, count = unit.site.path, unit.site.stacked
        if path not in self.cache:
            records = self.setup.model.capture(params, self.batch, frozenset({path}))[path]
            self.cache[path] = tuple(stacked(x, key, count) for key, x in records)
        return tuple(x[unit.index] for x in self.cache[path])


def _write(params: Any, unit: _Unit, kernel2: np.ndarray, bias: np.ndarray | None) -> Any:
    """``params`` with the unit's ``(K, N)`` matrix (and bias) replaced."""
    layout = unit.site.leaf.layout
    flat = _leaves_by_path(params)
    old = flat[unit.site.path]
    canonical = layout.to_canonical(jnp.asarray(old)).at[unit.index].set(kernel2)
    new = {unit.site.path: layout.from_canonical(canonical).astype(old.dtype)}
    if bias is not None:
        bias_path = unit.site.path[: -len("kernel")] + "bias"
        old_bias = flat[bias_path]
        rows = jnp.reshape(jnp.asarray(old_bias), (unit.site.stacked, -1))
        rows = rows.at[unit.index].set(bias)
        new[bias_path] = rows.reshape(np.shape(old_bias)).astype(old_bias.dtype)
    return _replace(params, new)


def _replace(tree: Any, new: Mapping[str, Any]) -> Any:
    return jax.tree_util.tree_map_with_path(lambda kp, x: new.get(path_str(kp), x), tree)


def _leaves_by_path(tree: Any) -> dict[str, Any]:
    return {path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _errors(geom: solve.Geometry, inputs: Any, w: jax.Array, candidates: tuple) -> np.ndarray:
    ref, errs = solve.output_errors(geom, inputs, w, candidates)
    return np.sqrt(solve.as_numpy(errs) / max(float(ref), 1e-30))


SolveUnit = Callable[[int, _Unit, tuple, jax.Array, Masks, bool, "_Bars"], _Solved]


def _convert(setup: _Setup, solve_unit: SolveUnit, *, sequential: bool, progress: bool
             ) -> Conversion:
    """The layer loop of every conversion: for each unit in forward order, its inputs (from
    the model converted so far with ``sequential``), the pattern's magnitude masks,
    ``solve_unit(index, unit, inputs, w (K + 1, N), magnitude masks (K, N), has_bias,
    bars)``, the errors against magnitude, the report."""
    dense = setup.model.params
    dense_flat = _leaves_by_path(dense)
    current = dense
    found: dict[str, list[Masks]] = {}
    magnitude: dict[str, Masks] = {}
    reports = []
    units = [_Unit(site, s) for site in setup.sites for s in range(site.stacked)]
    # Without ``sequential`` every unit's inputs come from the dense model: captured once.
    fit_inputs = _Inputs(setup, setup.args)
    held_inputs = _Inputs(setup, setup.held) if setup.held is not None else None
    with _Bars(progress) as bars:
        for index, unit in enumerate(units):
            t0 = time.perf_counter()
            leaf = unit.site.leaf
            source = current if sequential else dense
            inputs = fit_inputs(source, unit)
            _check_finite_inputs(inputs, unit.name)
            held = held_inputs(source, unit) if held_inputs is not None else None
            kernel = dense_flat[leaf.path]
            if leaf.path not in magnitude:
                magnitude[leaf.path] = leaf.masks(jnp.asarray(kernel))
            mag = magnitude[leaf.path]
            fwd2 = unit.matrix(mag.fwd)
            bias = _bias_of(dense_flat, unit)
            w, mag_w, _ = solve.prepare(
                unit.matrix(kernel), fwd2,
                bias if bias is not None else jnp.zeros((unit.site.geometry.out,)), axis=0,
                m=0)
            perm = None if mag.perm is None else jnp.reshape(
                mag.perm, (unit.site.stacked, -1))[unit.index]
            solved = solve_unit(index, unit, inputs, w,
                                Masks(fwd2, unit.matrix(mag.bwd), perm), bias is not None, bars)
            if not np.isfinite(solved.new).all():
                raise ValueError(f"layer {unit.name!r}: the {solved.solver} solve gave "
                                 f"non-finite weights{_NON_FINITE_HINT.get(solved.solver, '')}")
            d = unit.site.geometry.d
            candidates = (mag_w, jnp.asarray(solved.new))
            fit_err = _errors(unit.site.geometry, inputs, w, candidates)
            held_err = (_errors(unit.site.geometry, held, w, candidates) if held is not None
                        else fit_err)
            current = _write(current, unit, solved.new[:d],
                             solved.new[d] if solved.fit_bias and bias is not None else None)
            if sequential:  # later units read the model converted so far
                fit_inputs.invalidate()
                if held_inputs is not None:
                    held_inputs.invalidate()
            found.setdefault(leaf.path, []).append(solved.masks)
            size = d * unit.site.geometry.out
            reports.append(LayerReport(
                unit.name, leaf.shape, leaf.pattern.label, solved.solver,
                float(np.count_nonzero(solve.as_numpy(unit.matrix(kernel)))) / size,
                float(np.count_nonzero(solve.as_numpy(solved.masks.fwd))) / size,
                float(held_err[0]), float(held_err[1]), float(fit_err[0]), float(fit_err[1]),
                time.perf_counter() - t0))
            bars.done(f"{unit.name} {leaf.pattern.label} [{solved.solver}] rel. error "
                      f"{held_err[0]:.3f} -> {held_err[1]:.3f}")
    masks = {path: _leaf_masks(setup, path, parts) for path, parts in found.items()}
    return _conversion(setup, current, masks, magnitude, reports)


_NON_FINITE_HINT = {"adam": "; lower lr", "sparsegpt": "; raise damping",
                    "lstsq": "; its least-squares system is singular or ill-conditioned: pass "
                             "damping > 0 (or raise it)"}


def _leaf_masks(setup: _Setup, path: str, parts: list[Masks]) -> Masks:
    """A kernel's :class:`Masks` from those of its ``(K, N)`` matrices."""
    layout = setup.model.plan.by_path[path].layout
    stack = lambda name: layout.from_canonical(  # noqa: E731
        jnp.stack([getattr(m, name) for m in parts]))
    perm = None
    if parts[0].perm is not None:
        perm = jnp.stack([m.perm for m in parts]).reshape(layout.perm_shape)
    return Masks(stack("fwd"), stack("bwd"), perm)


def _conversion(setup: _Setup, params: Any, masks: Mapping[str, Masks],
                magnitude: Mapping[str, Masks], reports: list[LayerReport]) -> Conversion:
    """The :class:`Conversion` of ``params`` with ``masks`` (by kernel path); the baseline is
    the dense model under the ``magnitude`` masks."""
    model = setup.model
    dense = model.params
    tree = lambda by_path: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda kp, _: by_path.get(path_str(kp)), dense)
    plan = model.plan
    used = tuple(dict.fromkeys(leaf.rule for leaf in plan.leaves))
    sparse_model = None
    if model.graphdef is not None:
        sparse_model = nnx.merge(model.graphdef, model.state, model.rest, copy=True)
        state = nnx.state(sparse_model, nnx.Param)
        nnx.replace_by_pure_dict(state, params)
        nnx.update(sparse_model, state)
        params = state
        sparse_model = _sparse_nnx(sparse_model, plan, masks)
    elif model.module is not None:
        from nmjax import nn as sparse_nn

        sparse_model = sparse_nn.sparsify(model.module, plan, mode="static")
    return Conversion(params, tree(masks), apply_masks(dense, tree(magnitude)), tuple(reports),
                      used, sparse_model, setup.held is not None, plan)


def _sparse_nnx(model: nnx.Module, plan: Plan, masks: Mapping[str, Masks]) -> nnx.Module:
    from nmjax import nn as sparse_nn
    from nmjax.nn import _sparsify

    sparse = sparse_nn.sparsify(model, plan, mode="static")
    _sparsify.set_nnx_masks(sparse, dict(masks))
    return sparse


# ------------------------------------------------------------------------------ adaprune


@dataclasses.dataclass(frozen=True)
class _AdaPrune:
    """AdaPrune's options, checked; :meth:`__call__` solves one unit."""

    solver: str
    iters: int
    lr: float
    bias_lr: float
    batch: int
    damping: float
    bias: bool
    absorb_mean: bool
    key: jax.Array

    def pick(self, unit: _Unit, inputs: tuple, kmax: int) -> str:
        """``solver``, or for ``"auto"`` the cheaper by the measured cost model."""
        if self.solver != "auto":
            return self.solver
        geom, samples = unit.site.geometry, inputs[0].shape[0]
        per_sample = solve.rows_per_sample(geom, inputs)
        cheap = (solve.lstsq_cost(geom, samples * per_sample, kmax)
                 <= solve.adam_cost(geom, per_sample, self.iters, self.batch))
        return "lstsq" if cheap or self.batch > samples else "adam"

    def __call__(self, index: int, unit: _Unit, inputs: tuple, w: jax.Array, masks: Masks,
                 has_bias: bool, bars: _Bars) -> _Solved:
        geom, pattern = unit.site.geometry, unit.site.leaf.pattern
        fwd2 = solve.as_numpy(masks.fwd)
        fit_bias = self.bias and has_bias
        start = jnp.where(jnp.concatenate([masks.fwd, jnp.ones((1, geom.out), bool)]), w, 0.0)
        if self.absorb_mean:
            start = start.at[:-1].set(solve.absorb_mean(w[:-1], masks.fwd, pattern.fwd_nm[1]))
        # Host-side counts: no device program to compile per layer shape.
        kmax = int(fwd2.sum(0).max()) + int(fit_bias)
        picked = self.pick(unit, inputs, kmax)
        block = solve.solve_block(kmax)
        total = self.iters if picked == "adam" else -(-geom.out // block)
        with bars.layer(f"{unit.name} {pattern.label} [{picked}]", total) as report:
            if picked == "lstsq":
                new = solve.lstsq(geom, inputs, w, fwd2, start, jnp.float32(self.damping),
                                  fit_bias=fit_bias, kmax=kmax, block=block, progress=report)
            else:
                new = solve.adam(geom, inputs, w, fwd2, start, jnp.float32(self.lr),
                                 jnp.float32(self.bias_lr), jax.random.fold_in(self.key, index),
                                 iters=self.iters, batch=self.batch, fit_bias=fit_bias,
                                 progress=report)
            new = solve.as_numpy(jax.block_until_ready(new))
        return _Solved(new, masks, picked, fit_bias)


def adaprune(
    model: Any,
    calibration_batch: Any,
    rule: MaskRule | Pattern | str | Sequence[MaskRule] | Plan,
    *,
    held_out: Any = None,
    solver: str = "auto",
    iters: int = 1000,
    lr: float = 1e-3,
    bias_lr: float = 1e-2,
    batch: int = 50,
    damping: float = 0.01,
    bias: bool = False,
    absorb_mean: bool = False,
    sequential: bool = True,
    collections: Mapping[str, Any] | None = None,
    call_kwargs: Mapping[str, Any] | None = None,
    key: Any = 0,
    progress: bool = True,
) -> Conversion:
    """Converts the Dense/Conv layers of a trained model that ``rule`` selects to N:M with
    AdaPrune (Hubara et al., 2021).

    For each selected layer, in forward order: the pattern's masks of the dense kernel
    (magnitude scores; a Bi-Mask's forward mask is the one applied, its permutation the
    identity), then the kept weights ``Ŵ`` (and with ``bias=True`` the bias) chosen to
    minimise ``‖X·W + b − X·Ŵ − b̂‖²`` over the layer's inputs ``X`` on
    ``calibration_batch`` (a Dense kernel ``(in, out)`` contracts ``X: (..., in)``; a conv
    kernel ``HWIO`` its image patches, ``kh·kw·I`` long). With ``sequential=True`` a later
    layer's inputs come from the model with the earlier layers already converted.

    Solvers (each one jitted loop per layer, with a progress bar):

    * ``"lstsq"``: the exact minimiser, per output column ``j`` with kept rows ``S``:
      ``(G_SS + λI) ŵ = (G w_j)_S + λ a_S``, ``G = XᵀX``, ``λ = damping · mean(diag G)``,
      ``a`` the magnitude-pruned (or ``absorb_mean``) weights. Never worse than magnitude
      N:M on the calibration batch. Costs ``2·R·d²`` flops (``R`` rows) and an LU solve of
      ``k`` unknowns per output column (``k`` kept).
    * ``"adam"``: the reference recipe: Adam (``lr``, ``bias_lr``) for ``iters`` steps on
      ``batch`` samples drawn afresh each step. Costs ``6·iters·batch·P·d·out`` flops
      (``P`` rows per sample).
    * ``"auto"`` (default): ``"lstsq"`` where its measured cost model
      (``nmjax._convert_solve.lstsq_cost``, ``adam_cost``) says it is the cheaper, or where
      Adam's ``batch`` exceeds the calibration samples; else ``"adam"``.

    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> class MLP(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return nn.Dense(10, name="head")(nn.relu(nn.Dense(32)(x)))
    >>> x = jax.random.normal(jax.random.key(0), (256, 16))
    >>> params = MLP().init(jax.random.key(1), x)["params"]
    >>> conv = adaprune((MLP(), params), x, MaskRule("2:4", exclude="head"), progress=False)
    >>> [r.path for r in conv.layers]
    ['Dense_0/kernel']
    >>> r = conv.layers[0]
    >>> bool(r.error_adaprune < r.error_magnitude)
    True
    >>> kernel = conv.params["Dense_0"]["kernel"]                    # 0 outside the mask
    >>> bool(jnp.all(jnp.where(conv.masks["Dense_0"]["kernel"].fwd, True, kernel == 0)))
    True
    >>> import nmjax.nn
    >>> masks = nmjax.nn.collection(conv)
    >>> logits = conv.model.apply({"params": conv.params, "nm_masks": masks}, x)

    Args:
      model: an NNX module, or a pair ``(apply_fn, params)`` for Linen, where ``apply_fn``
        is a Linen module (or its ``apply``, e.g. a ``TrainState``'s ``apply_fn``) called as
        ``apply_fn({"params": params, **collections}, *args, **call_kwargs)``.
      calibration_batch: the inputs, samples along axis 0: an array, or a tuple of arrays
        (the model's positional inputs). The whole batch runs through the model at once.
      rule: which layers and which pattern: a :class:`~nmjax.tree.MaskRule`, several (a
        layer selected by two must get the same pattern; :func:`rules_for_density` makes
        one per N), a pattern spec or a shorthand (``"2:4"``).
      held_out: optional inputs of the same form, not fitted: the reported layer errors
        are measured on them.
      solver: ``"auto"``, ``"lstsq"`` or ``"adam"``.
      iters, lr, bias_lr, batch: Adam's steps, learning rates (kernel, bias) and samples
        per step (``solver="adam"``: ``batch`` at most the calibration batch's size).
      damping: the least-squares damping ``>= 0`` (relative to ``mean(diag XᵀX)``).
      bias: also optimise each converted layer's bias (where it has one).
      absorb_mean: start from the reference's correction (each kept weight gains the
        group's pruned sum over its kept count) instead of the plain magnitude weights.
      sequential: a layer's inputs from the already-converted model (``False``: all from
        the dense model).
      collections: Linen only: other variable collections the model reads (``batch_stats``).
      call_kwargs: keyword arguments of every call (e.g. ``{"train": False}``); put NNX
        models in eval mode (``model.eval()``) yourself.
      key: PRNG key or int seed (Adam's sampling).
      progress: show a progress bar per layer (``rich``, on stderr).

    Returns:
      A :class:`Conversion`: the converted ``params``, their ``masks``, the magnitude N:M
      baseline, a :class:`LayerReport` per layer (:meth:`Conversion.report`), and a
      static-mode sparse ``model`` ready for fine-tuning with :func:`nmjax.optim.sparse`.
      Inputs are not modified.

    Raises:
      TypeError: a wrong type of model, rule, batch or option.
      ValueError: the model fails on ``calibration_batch`` (its shape is in the message),
        ``held_out`` differs from it in form, the rule selects no layer or a leaf its
        pattern cannot take (the leaf, shape and rule are named), a selected layer that
        is not a plain Dense/Conv or is never called, ``batch`` above the calibration
        size, a least-squares system that is singular (``damping=0``).
    """
    _checks.check_choice(solver, "solver", SOLVERS)
    _check_bools(bias=bias, absorb_mean=absorb_mean, sequential=sequential, progress=progress)
    options = _AdaPrune(
        solver, _checks.check_count(iters, "iters", 1), _check_positive(lr, "lr"),
        _check_positive(bias_lr, "bias_lr"), _checks.check_count(batch, "batch", 1),
        _check_positive(damping, "damping", zero=True), bias, absorb_mean, _check_key(key))
    setup = _setup(model, calibration_batch, rule, held_out, collections, call_kwargs,
                   "AdaPrune")
    if solver == "adam" and batch > setup.samples:
        raise ValueError(f"batch={batch} exceeds calibration_batch's {setup.samples} samples "
                         f"(shape {_shapes(setup.args)}); lower batch or pass more samples")
    if absorb_mean:
        for site in setup.sites:
            if site.leaf.pattern.fwd_nm is None:
                raise ValueError(f"absorb_mean needs an N:M pattern; {site.path!r} has "
                                 f"{site.leaf.pattern.label!r}, which declares no fwd_nm")
    return _convert(setup, options, sequential=sequential, progress=progress)


# ------------------------------------------------------------------------------ one-shot


def _check_one_shot(setup: _Setup, method: str) -> None:
    for site in setup.sites:
        pattern = site.leaf.pattern
        if not isinstance(pattern, NM | Transposable | BiMask):
            raise ValueError(f"{method} takes N:M, transposable N:M and Bi-Mask patterns; "
                             f"{site.path!r} has a {type(pattern).__name__} pattern "
                             f"({pattern.label!r})")


def _pruned(pattern: Pattern, new2: jax.Array, fwd: jax.Array, w: jax.Array, key: jax.Array,
            method: str) -> _Solved:
    """A one-shot method's answer for a ``(K, N)`` matrix pruned to ``new2`` under ``fwd``:
    the bias row of ``w`` unchanged; Bi-Mask's backward mask by the pattern's permutation
    search on the pruned weights, else ``fwd`` twice."""
    if isinstance(pattern, BiMask):
        masks = _oneshot.bimask_backward(pattern, new2, fwd, key)
    else:
        masks = Masks(fwd, fwd, None)
    return _Solved(solve.as_numpy(jnp.concatenate([new2, w[-1:]])), masks, method)


@dataclasses.dataclass(frozen=True)
class _SparseGPT:
    damping: float
    block: int
    key: jax.Array

    def blocks(self, unit: _Unit) -> tuple[int, int]:
        """``(rows per block, blocks)`` of the unit's sweep."""
        d = unit.site.geometry.d
        size = min(self.block, d)
        return size, -(-d // size)

    def __call__(self, index: int, unit: _Unit, inputs: tuple, w: jax.Array, masks: Masks,
                 has_bias: bool, bars: _Bars) -> _Solved:
        pattern = unit.site.leaf.pattern
        size, count = self.blocks(unit)
        with bars.layer(f"{unit.name} {pattern.label} [sparsegpt]", count) as report:
            new2, fwd2 = _oneshot.sparsegpt(unit.site.geometry, inputs, w[:-1],
                                            jnp.float32(self.damping), pattern=pattern,
                                            block=size, progress=report)
            new2 = jax.block_until_ready(new2)
        return _pruned(pattern, new2, fwd2, w, jax.random.fold_in(self.key, index), "sparsegpt")


def sparsegpt(
    model: Any,
    calibration_batch: Any,
    rule: MaskRule | Pattern | str | Sequence[MaskRule] | Plan,
    *,
    held_out: Any = None,
    damping: float = 0.01,
    block: int = 128,
    sequential: bool = True,
    collections: Mapping[str, Any] | None = None,
    call_kwargs: Mapping[str, Any] | None = None,
    key: Any = 0,
    progress: bool = True,
) -> Conversion:
    """Prunes the Dense/Conv layers of a trained model that ``rule`` selects to N:M in one
    shot with SparseGPT (Frantar & Alistarh, 2023): masks by OBS saliency, and the kept
    weights updated to compensate.

    For each selected layer, in forward order, with ``H = XᵀX`` over the layer's inputs on
    ``calibration_batch`` (rows as in :func:`adaprune`: a Dense kernel ``(in, out)``
    contracts ``X: (..., in)``, a conv kernel ``HWIO`` its ``kh·kw·I`` patches): inputs that
    are always 0 get their weights zeroed and ``H_jj = 1``; ``H += damping · mean(diag H)·I``;
    ``U`` is the upper Cholesky factor of ``H⁻¹``. The rows of the kernel (``d × out``, the
    contraction axis first) are swept in blocks of ``block``; at the first row of each group
    of ``m`` the group's mask is chosen from the saliency ``w² / U_jj²`` of the current
    weights, each row is then pruned and the rows not yet reached take the OBS update
    ``−(w_j − q_j)/U_jj · U_j,:``. The bias is not changed. One compiled program per layer
    shape and pattern; a progress bar per layer (one step per block).

    Patterns (the pattern's ``score_fn`` is not used: the saliency is the score):

    * ``NM``: the ``n`` best saliencies of each group of ``m`` along the contraction axis,
      as the reference's N:M mode.
    * ``Transposable``: each group of ``m`` rows is an ``m × out`` slab of ``m × m`` tiles;
      its mask is the pattern's transposable solver (exact by default) on the saliencies,
      chosen when the sweep reaches the slab, then the OBS update. (``method="lp"`` runs on
      the host and cannot sit in the sweep: it is refused.)
    * ``BiMask``: the forward mask as ``NM``; then the backward mask and its permutation by
      the pattern's permutation search (``key``) on the converted weights, as
      :func:`nmjax.masks.bimask` does for given weights.

    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> class MLP(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return nn.Dense(10, name="head")(nn.relu(nn.Dense(32)(x)))
    >>> x = jax.random.normal(jax.random.key(0), (256, 16))
    >>> params = MLP().init(jax.random.key(1), x)["params"]
    >>> conv = sparsegpt((MLP(), params), x, MaskRule("2:4", exclude="head"), progress=False)
    >>> r = conv.layers[0]
    >>> r.path, r.solver, bool(r.error_adaprune < r.error_magnitude)
    ('Dense_0/kernel', 'sparsegpt', True)

    Differences from the reference implementation (IST-DASLab/sparsegpt): the same damping
    (``0.01·mean(diag H)``), block size (128) and N:M rule, but ``H`` is ``XᵀX`` without the
    reference's ``2/nsamples`` (no mask or weight depends on the scale, since the damping is
    relative); a layer's inputs come from the model with every earlier selected layer
    already pruned (``sequential=True``), where the reference prunes the layers of one
    Transformer block from the dense block's inputs; ``d`` is padded to a multiple of
    ``block`` (zero weights, identity Hessian) instead of a shorter last block; conv kernels
    are grouped along ``I`` (the reference flattens PyTorch's ``OIHW``, grouping spatial
    positions); the transposable and Bi-Mask variants are nmjax's.

    Memory: one layer at a time: its captured calibration inputs (``rows × d`` float32), the
    ``d × out`` kernel and three ``d × d`` float32 temporaries (``H``, its Cholesky factor,
    the inverse's factor), as XLA's CPU buffer assignment counts them
    (``benchmarks/oneshot.py --memory``): a layer with ``in = 32768`` (``out = 8192``,
    16384 calibration rows) peaks at 16.3 GiB, so fits in 24 GiB; ``in = 40960`` needs
    26.6 GiB.

    Args:
      model: as :func:`adaprune`: an NNX module, or ``(apply_fn, params)`` for Linen.
      calibration_batch: the inputs, samples along axis 0 (array or tuple of arrays).
      rule: which layers and which pattern (as :func:`adaprune`).
      held_out: optional inputs of the same form for the reported layer errors.
      damping: ``> 0``, relative to ``mean(diag H)`` (the reference's ``percdamp``).
      block: rows per lazy block (the reference's ``blocksize``), a multiple of every
        selected pattern's ``m``; only the rounding depends on it.
      sequential: a layer's inputs from the already-pruned model (``False``: all from the
        dense model).
      collections, call_kwargs: as :func:`adaprune`.
      key: PRNG key or int seed (Bi-Mask's permutation search).
      progress: show a progress bar per layer (``rich``, on stderr).

    Returns:
      A :class:`Conversion`, as :func:`adaprune`'s (``magnitude_params`` under the
      pattern's magnitude masks; the layer errors after SparseGPT in ``error_adaprune``).
      Inputs are not modified.

    Raises:
      TypeError, ValueError: as :func:`adaprune`; also a pattern other than N:M,
        transposable or Bi-Mask, a transposable pattern with ``method="lp"``, a kernel
        grouped along another axis than the one next to its output, ``block`` not a
        multiple of a pattern's ``m``, non-finite weights (raise ``damping``).
    """
    options = _SparseGPT(_check_positive(damping, "damping"),
                         _checks.check_count(block, "block", 1), _check_key(key))
    _check_bools(sequential=sequential, progress=progress)
    setup = _setup(model, calibration_batch, rule, held_out, collections, call_kwargs,
                   "SparseGPT")
    _check_one_shot(setup, "SparseGPT")
    for site in setup.sites:
        pattern = site.leaf.pattern
        if block % pattern.fwd_nm[1]:
            raise ValueError(f"block={block} must be a multiple of m={pattern.fwd_nm[1]} "
                             f"({site.path!r}: {pattern.label!r}): a group of m rows must not "
                             "straddle blocks")
        if isinstance(pattern, Transposable) and pattern.method == "lp":
            raise ValueError(f"{site.path!r} ({pattern.label!r}): method='lp' solves on the "
                             "host and cannot run inside SparseGPT's compiled sweep; use "
                             "'auto' or 'exact'")
    return _convert(setup, options, sequential=sequential, progress=progress)


@dataclasses.dataclass(frozen=True)
class _Wanda:
    key: jax.Array

    def __call__(self, index: int, unit: _Unit, inputs: tuple, w: jax.Array, masks: Masks,
                 has_bias: bool, bars: _Bars) -> _Solved:
        pattern = unit.site.leaf.pattern
        with bars.layer(f"{unit.name} {pattern.label} [wanda]", 1) as report:
            norms = _oneshot.input_norms(unit.site.geometry, inputs)
            fwd = jnp.asarray(_oneshot.select(pattern, jnp.abs(w[:-1]) * norms[:, None], 0))
            new2 = jnp.where(fwd, w[:-1], 0.0)
            if report:
                solve.PROGRESS(1)
        return _pruned(pattern, new2, fwd, w, jax.random.fold_in(self.key, index), "wanda")


def wanda(
    model: Any,
    calibration_batch: Any,
    rule: MaskRule | Pattern | str | Sequence[MaskRule] | Plan,
    *,
    held_out: Any = None,
    sequential: bool = True,
    collections: Mapping[str, Any] | None = None,
    call_kwargs: Mapping[str, Any] | None = None,
    key: Any = 0,
    progress: bool = True,
) -> Conversion:
    """Prunes the Dense/Conv layers of a trained model that ``rule`` selects to N:M in one
    shot with Wanda (Sun et al., 2024): each weight scored by ``|w_ij| · ‖x_i‖₂``, the input
    feature's norm over the calibration rows; no weight update.

    For each selected layer, in forward order (rows as in :func:`adaprune`; a conv's input
    feature is one entry of its ``kh·kw·I`` patches), the pattern's forward mask on those
    scores: ``NM`` keeps the ``n`` best of each group of ``m`` along the contraction axis
    (the reference's N:M mode); ``Transposable`` runs the pattern's solver (any method) on
    the scores of the ``m × m`` tiles; ``BiMask`` takes the N:M forward mask, then the
    backward mask and permutation by the pattern's search (``key``) on the pruned weights.
    The kept weights keep their values.

    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> class MLP(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return nn.Dense(10, name="head")(nn.relu(nn.Dense(32)(x)))
    >>> x = jax.random.normal(jax.random.key(0), (256, 16)) * jnp.arange(1, 17)
    >>> params = MLP().init(jax.random.key(1), x)["params"]
    >>> conv = wanda((MLP(), params), x, MaskRule("2:4", exclude="head"), progress=False)
    >>> r = conv.layers[0]
    >>> r.solver, bool(r.error_adaprune < r.error_magnitude)
    ('wanda', True)

    Differences from the reference implementation (locuslab/wanda): the norm is over all
    calibration rows without the reference's ``1/nsamples`` (a constant no mask depends on);
    a layer's inputs come from the model with every earlier selected layer already pruned
    (``sequential=True``) where the reference takes the layers of one Transformer block from
    the dense block's inputs; the transposable and Bi-Mask variants are nmjax's.

    Memory: ``d`` norms and the kernel; the inputs become rows chunk by chunk.

    Args, Returns, Raises: as :func:`sparsegpt`, without ``damping`` and ``block``; the
    layer errors after Wanda are in ``error_adaprune``.
    """
    _check_bools(sequential=sequential, progress=progress)
    options = _Wanda(_check_key(key))
    setup = _setup(model, calibration_batch, rule, held_out, collections, call_kwargs, "Wanda")
    _check_one_shot(setup, "Wanda")
    return _convert(setup, options, sequential=sequential, progress=progress)


# ------------------------------------------------------------------- unstructured models


def choose_n(density: float, m: int, *, confidence: float = 0.95) -> int:
    """The N of an N:M pattern for a layer that is unstructured sparse with ``density``:
    the smallest ``n`` such that a group of ``m`` weights holds at most ``n`` nonzeros with
    probability above ``confidence``, nonzeros taken as independent (binomial tail):
    ``P(Binomial(m, density) <= n) > confidence`` (Hubara et al., 2021). At least 1.

    >>> choose_n(0.5, 8), choose_n(0.25, 8), choose_n(0.1, 4), choose_n(1.0, 4)
    (6, 4, 2, 4)

    Args:
      density: the layer's nonzero fraction, in ``[0, 1]``.
      m: the group size.
      confidence: in ``(0, 1)``.
    """
    if isinstance(density, bool) or not isinstance(density, int | float | np.number):
        raise TypeError(f"density must be a real number, got {density!r}")
    if not 0.0 <= float(density) <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    m = _checks.check_count(m, "m", 1)
    if isinstance(confidence, bool) or not isinstance(confidence, int | float | np.number) \
            or not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")
    p = float(density)
    cdf = 0.0
    for n in range(m + 1):
        cdf += math.comb(m, n) * p ** n * (1 - p) ** (m - n)
        if cdf > confidence:
            return max(n, 1)
    return m


def _kernels(params: Any, plan: Plan | None, include: Any, exclude: Any, predicate: Any
             ) -> list[tuple[str, Any, LeafPlan]]:
    """``(path, leaf, its LeafPlan)`` of the kernels ``plan`` names, or without a plan those
    ``include``/``exclude``/``predicate`` select among the kernels whose layout the tree shows
    (:func:`nmjax.plan.plan_for_params`; the 1:1 pattern keeps every weight, so only the
    selection counts)."""
    if plan is None:
        plan = plan_for_params(params, MaskRule(NM(1, 1), include=include, exclude=exclude,
                                                predicate=predicate))
    elif not isinstance(plan, Plan):
        raise TypeError(f"plan must be an nmjax.plan.Plan (nmjax.resolve), got "
                        f"{type(plan).__name__}")
    flat = plan.check_params(params)
    return [(leaf.path, flat[leaf.path], leaf) for leaf in plan.leaves]


def layer_densities(params: Any, plan: Plan | None = None, *, include: Any = None,
                    exclude: Any = (), predicate: Callable | None = None) -> dict[str, float]:
    """``{kernel path: nonzero fraction}`` of the kernels ``plan`` names (a model's plan,
    :func:`nmjax.resolve`), or without one of the Linen auto-named ``Dense_<i>``/``Conv_<i>``
    kernels that ``include``, ``exclude``, ``predicate`` select (as in
    :class:`~nmjax.tree.MaskRule`).

    >>> import jax.numpy as jnp
    >>> layer_densities({"Dense_0": {"kernel": jnp.array([[0., 1.], [2., 0.]])}})
    {'Dense_0/kernel': 0.5}
    """
    return {path: float(jnp.count_nonzero(leaf)) / max(math.prod(leaf.shape), 1)
            for path, leaf, _ in _kernels(params, plan, include, exclude, predicate)}


def rules_for_density(params: Any, m: int, plan: Plan | None = None, *, kind: str = "nm",
                      confidence: float = 0.95, include: Any = None, exclude: Any = (),
                      predicate: Callable | None = None) -> tuple[MaskRule, ...]:
    """One :class:`~nmjax.tree.MaskRule` per N: each selected kernel gets the N that
    :func:`choose_n` picks from its density, for :func:`adaprune`.

    >>> import jax, jax.numpy as jnp
    >>> w = jax.random.normal(jax.random.key(0), (64, 32))
    >>> sparse = {"Dense_0": {"kernel": w * (jnp.abs(w) > 1.0)}}     # about 32% dense
    >>> [r.label for r in rules_for_density(sparse, 8)]
    ['5:8 nm']

    Args:
      params: parameters of an unstructured-sparse model (e.g.
        :func:`global_magnitude_prune`).
      m: the group size of every pattern.
      plan: the kernels and their layouts (a model's plan, :func:`nmjax.resolve`); without
        one, the Linen auto-named kernels that ``include``/``exclude``/``predicate`` select.
      kind: ``"nm"``, ``"transposable"`` or ``"bimask"``.
      confidence: as :func:`choose_n`.

    Raises:
      ValueError: a kernel that the chosen pattern cannot take along its layout (the leaf
        is named).
    """
    groups: dict[str, list[LeafPlan]] = {}
    for _, leaf, leaf_plan in _kernels(params, plan, include, exclude, predicate):
        density = float(jnp.count_nonzero(leaf)) / max(math.prod(leaf.shape), 1)
        nm = f"{choose_n(density, m, confidence=confidence)}:{m}"
        groups.setdefault(nm, []).append(leaf_plan)
    rules = []
    for nm, leaves in groups.items():
        pattern = as_pattern(nm, kind)
        for leaf_plan in leaves:  # fail here, naming the leaf, not later in adaprune
            reason = layout_reason(pattern, leaf_plan.layout)
            if reason is not None:
                raise ValueError(f"{leaf_plan.path!r} of shape {leaf_plan.shape} cannot take "
                                 f"pattern {pattern.label!r}: {reason}; exclude it")
        rules.append(MaskRule(pattern, include=tuple(f"^{re.escape(p.path)}$"
                                                     for p in leaves)))
    return tuple(rules)


class Pruned(NamedTuple):
    """:func:`global_magnitude_prune`'s result: ``params`` zeroed outside ``masks`` (a tree
    of boolean arrays at the pruned leaves, ``None`` elsewhere)."""

    params: Any
    masks: Any


def global_magnitude_prune(params: Any, density: float, plan: Plan | None = None, *,
                           include: Any = None, exclude: Any = (),
                           predicate: Callable | None = None) -> Pruned:
    """Unstructured magnitude pruning over all selected kernels together: keeps the
    ``round(density · total)`` largest ``|w|`` of the Dense/Conv kernels (or those
    ``include``/``exclude``/``predicate`` select), ties to the earlier leaf and index.

    The model to start :func:`rules_for_density` and :func:`adaprune` from, as in the
    paper's unstructured-to-N:M experiments.

    >>> import jax.numpy as jnp
    >>> params = {"Dense_0": {"kernel": jnp.array([[1., -4.], [3., 2.]]), "bias": jnp.ones(2)},
    ...           "Dense_1": {"kernel": jnp.array([[-5.], [0.5]])}}
    >>> pruned = global_magnitude_prune(params, 0.5)
    >>> pruned.params["Dense_0"]["kernel"].tolist(), pruned.params["Dense_1"]["kernel"].tolist()
    ([[0.0, -4.0], [3.0, 0.0]], [[-5.0], [0.0]])
    >>> pruned.masks["Dense_0"]["bias"] is None
    True

    Args:
      params: a parameter pytree (Linen dict or NNX ``State``).
      density: kept fraction in ``(0, 1]``.
      plan: the kernels to prune (a model's plan, :func:`nmjax.resolve`); without one, the
        Linen auto-named kernels that ``include``/``exclude``/``predicate`` select.
    """
    if isinstance(density, bool) or not isinstance(density, int | float | np.number):
        raise TypeError(f"density must be a real number, got {density!r}")
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    leaves = _kernels(params, plan, include, exclude, predicate)
    scores = jnp.concatenate([jnp.abs(jnp.asarray(leaf, jnp.float32)).ravel()
                              for _, leaf, _ in leaves])
    keep = int(round(float(density) * scores.size))
    order = jnp.argsort(-scores, stable=True)
    flat = jnp.zeros(scores.size, bool).at[order[:keep]].set(True)
    masks, start = {}, 0
    for path, leaf, _ in leaves:
        size = math.prod(leaf.shape)
        masks[path] = flat[start:start + size].reshape(leaf.shape)
        start += size
    pruned = jax.tree_util.tree_map_with_path(
        lambda kp, x: jnp.where(masks[path_str(kp)], x, jnp.zeros((), x.dtype))
        if path_str(kp) in masks else x, params)
    mask_tree = jax.tree_util.tree_map_with_path(lambda kp, _: masks.get(path_str(kp)), params)
    return Pruned(pruned, mask_tree)


__all__ = [
    "SOLVERS",
    "Conversion",
    "ConversionReport",
    "LayerReport",
    "Pruned",
    "adaprune",
    "choose_n",
    "global_magnitude_prune",
    "layer_densities",
    "rules_for_density",
    "sparsegpt",
    "wanda",
]
