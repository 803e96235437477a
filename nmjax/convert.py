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
import functools
import math
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from nmjax import _checks, _oneshot
from nmjax import _convert_solve as solve
from nmjax._convert_capture import RUN, Layer, LinenModel, NNXModel
from nmjax.masks import NM, BiMask, Custom, Masks, Pattern, Transposable, as_pattern
from nmjax.plan import LeafPlan, Plan, from_axis
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


def _table(head: Sequence[str], body: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    fmt = "  ".join(f"{{:{'>' if i in right else '<'}{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*head), fmt.format(*("-" * w for w in widths)),
            *(fmt.format(*row) for row in body)]


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
        lines = _table(head, body, set(range(4, 10)))
        if self.model:
            metrics = list(dict.fromkeys(k for v in self.model.values() for k in v))
            rows = [(stage, *(f"{values[k]:.4f}" if k in values else "" for k in metrics))
                    for stage, values in self.model.items()]
            lines += ["", *_table(("model", *metrics), rows, set(range(1, len(metrics) + 1)))]
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
        static mode (read :attr:`collection` as ``variables["nm_masks"]``), or ``None``
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

    @property
    def collection(self) -> dict[str, Any]:
        """The masks as Linen's ``"nm_masks"`` collection for static sparse layers."""
        from nmjax.nn.linen import to_collection

        return to_collection(self.masks)

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


def _as_rules(rule: Any) -> tuple[MaskRule, ...]:
    if isinstance(rule, str | Pattern):
        return (MaskRule(rule),)
    if isinstance(rule, MaskRule):
        return (rule,)
    if isinstance(rule, Sequence) and rule and all(isinstance(r, MaskRule) for r in rule):
        return tuple(rule)
    raise TypeError(f"rule must be an nmjax.tree.MaskRule, a non-empty sequence of them, a "
                    f"pattern spec or a string like '2:4', got {rule!r:.80}")


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


# ----------------------------------------------------------------------------- selection


class _Chosen(NamedTuple):
    path: str
    leaf: Any
    axis: int
    rule: MaskRule
    layer: Layer


def _select(params: Any, rules: tuple[MaskRule, ...], kinds: Mapping[str, Any]
            ) -> list[tuple[str, Any, int, MaskRule]]:
    out = []
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = path_str(key_path)
        hits = []
        for rule in rules:
            axis = rule.select(path, leaf, kinds.get(path))
            if axis is not None:
                hits.append((axis, rule))
        if len({r.pattern for _, r in hits}) > 1:
            raise ValueError(f"leaf {path!r} is selected by {len(hits)} rules with different "
                             f"patterns ({', '.join(r.label for _, r in hits)}); exclude it "
                             "from all but one")
        if hits:
            out.append((path, leaf, hits[0][0], hits[0][1]))
    return out


def _discover(adapter: Any, args: tuple[jax.Array, ...], name: str
              ) -> tuple[dict[str, Layer], list[str]]:
    layers: dict[str, Layer] = {}
    order: list[str] = []

    def record(path, layer, inputs):
        if path not in order:
            order.append(path)
        layers[path].input_shapes.append(tuple(inputs.shape))

    try:
        jax.eval_shape(lambda p, a: adapter.run(p, a, record, layers), adapter.params, args)
    except Exception as e:  # any failure of the user's forward pass on this batch
        raise ValueError(f"running the model on {name} of shape {_shapes(args)} failed: "
                         f"{type(e).__name__}: {e}") from e
    return layers, order


def _check_chosen(chosen, layers, order, samples, rules, method) -> list[_Chosen]:
    if not chosen:
        kernels = [p for p, layer in layers.items() if layer.kind is not None]
        raise ValueError(f"rule {', '.join(repr(r.label) for r in rules)} selects no layer of "
                         f"this model (its Dense/Conv kernels: {kernels[:6]}"
                         f"{' ...' if len(kernels) > 6 else ''}); check include/exclude")
    out = []
    for path, leaf, axis, rule in chosen:
        layer = layers.get(path)
        if layer is None or path not in order:
            raise ValueError(f"rule {rule.label!r} selects {path!r}, but the model never calls "
                             "that layer on calibration_batch; exclude it from the rule")
        if layer.kind is None or layer.unsupported is not None:
            why = layer.unsupported or "not a Dense/Linear or Conv layer"
            raise ValueError(f"rule {rule.label!r} selects {path!r}, which is {why}; {method} "
                             "converts Dense/Linear and Conv layers: exclude it from the rule")
        geom = layer.geometry
        if tuple(geom.kernel_shape) != tuple(leaf.shape):
            raise ValueError(f"layer {path!r}: its kernel has shape {tuple(leaf.shape)} but "
                             f"its inputs imply {geom.kernel_shape}")
        for shape in layer.input_shapes:
            if len(shape) < 2 + geom.spatial or shape[0] != samples:
                raise ValueError(
                    f"layer {path!r} received inputs of shape {shape}, whose axis 0 is not "
                    f"calibration_batch's {samples} samples; {method} draws samples along "
                    "axis 0 of every selected layer's input")
        out.append(_Chosen(path, leaf, axis, rule, layer))
    return sorted(out, key=lambda c: order.index(c.path))


def _capture(kind: str, static: Any, paths: frozenset[str]) -> Callable:
    """A jitted ``(params, extra, args) -> {path: (inputs of each call, ...)}``."""
    run = RUN[kind]

    def capture(params, extra, args):
        got: dict[str, list[jax.Array]] = {}

        def record(path, _, inputs):
            if path in paths:
                got.setdefault(path, []).append(inputs)

        run(static, params, extra, args, record)
        return {p: tuple(v) for p, v in got.items()}

    return jax.jit(capture)


# Repeated conversions of one model (patterns, solvers) reuse its compiled forward pass.
_cached_capture = functools.lru_cache(maxsize=32)(_capture)


def _capture_program(kind: str, static: Any, paths: frozenset[str]) -> Callable:
    try:
        hash(static)
    except TypeError:  # unhashable call_kwargs or apply_fn: compile for this call only
        return _capture(kind, static, paths)
    return _cached_capture(kind, static, paths)


def _replace(tree: Any, new: Mapping[str, Any]) -> Any:
    return jax.tree_util.tree_map_with_path(lambda kp, x: new.get(path_str(kp), x), tree)


def _bias_path(path: str) -> str:
    return path[: -len("kernel")] + "bias"


def _leaves_by_path(tree: Any) -> dict[str, Any]:
    return {path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@contextlib.contextmanager
def _bars(enabled: bool):
    if not enabled:
        yield None
        return
    from rich import progress as rp
    from rich.console import Console

    with rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(),
                     rp.MofNCompleteColumn(), rp.TimeElapsedColumn(),
                     console=Console(file=sys.stderr)) as bars:
        yield bars


# ------------------------------------------------------------------------------ setup


class _Setup(NamedTuple):
    """What every conversion starts from: the checked batches, the model, its chosen layers
    in forward order and the jitted capture of their inputs."""

    rules: tuple[MaskRule, ...]
    args: tuple[jax.Array, ...]
    held: tuple[jax.Array, ...] | None
    samples: int
    adapter: Any
    chosen: list[_Chosen]
    capture: Callable


def _check_bools(**values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")


def _setup(model: Any, calibration_batch: Any, rule: Any, held_out: Any, collections: Any,
           call_kwargs: Any, method: str) -> _Setup:
    rules = _as_rules(rule)
    args = _as_args(calibration_batch, "calibration_batch")
    samples = args[0].shape[0]
    held = None
    if held_out is not None:
        held = _as_args(held_out, "held_out")
        if len(held) != len(args) or any(h.shape[1:] != a.shape[1:] or h.dtype != a.dtype
                                         for h, a in zip(held, args, strict=False)):
            raise ValueError(f"held_out of shape {_shapes(held)} must match calibration_batch "
                             f"of shape {_shapes(args)} except along axis 0 (and in dtype)")
    call_kwargs = {} if call_kwargs is None else dict(call_kwargs)
    if isinstance(model, nnx.Module):
        if collections:
            raise ValueError("collections applies to Linen models; an NNX model holds its "
                             "own state")
        adapter: Any = NNXModel(model, call_kwargs)
    elif isinstance(model, tuple) and len(model) == 2:
        adapter = LinenModel(model[0], model[1], collections or {}, call_kwargs)
    elif isinstance(model, nn.Module):
        raise TypeError("a Linen module needs its parameters: pass (module, params)")
    else:
        raise TypeError(f"model must be an NNX module or a pair (apply_fn, params), got "
                        f"{type(model).__name__}")

    layers, order = _discover(adapter, args, "calibration_batch")
    if held is not None:
        _discover(adapter, held, "held_out")
    kinds = {path: layer.kind for path, layer in layers.items()}
    chosen = _check_chosen(_select(adapter.params, rules, kinds), layers, order, samples, rules,
                           method)
    program = _capture_program(adapter.kind, adapter.static,
                               frozenset(c.path for c in chosen))
    capture = lambda params, batch_args: program(params, adapter.extra, batch_args)  # noqa: E731
    return _Setup(rules, args, held, samples, adapter, chosen, capture)


# ------------------------------------------------------------------------------ adaprune


def adaprune(
    model: Any,
    calibration_batch: Any,
    rule: MaskRule | Pattern | str | Sequence[MaskRule],
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
    >>> logits = conv.model.apply({"params": conv.params, "nm_masks": conv.collection}, x)

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
    iters = _checks.check_count(iters, "iters", 1)
    batch = _checks.check_count(batch, "batch", 1)
    lr, bias_lr = _check_positive(lr, "lr"), _check_positive(bias_lr, "bias_lr")
    damping = _check_positive(damping, "damping", zero=True)
    _check_bools(bias=bias, absorb_mean=absorb_mean, sequential=sequential, progress=progress)
    key = _check_key(key)
    setup = _setup(model, calibration_batch, rule, held_out, collections, call_kwargs,
                   "AdaPrune")
    adapter, args, held, samples, chosen = (setup.adapter, setup.args, setup.held,
                                            setup.samples, setup.chosen)
    if solver == "adam" and batch > samples:
        raise ValueError(f"batch={batch} exceeds calibration_batch's {samples} samples "
                         f"(shape {_shapes(args)}); lower batch or pass more samples")
    if absorb_mean:
        for c in chosen:
            if c.rule.pattern.fwd_nm is None:
                raise ValueError(f"absorb_mean needs an N:M pattern; rule {c.rule.label!r} "
                                 "declares no fwd_nm")

    capture = setup.capture
    dense = adapter.params
    dense_leaves = _leaves_by_path(dense)
    current = dense
    masks_by_path: dict[str, Masks] = {}
    reports = []
    fit_inputs = held_inputs = None
    with _bars(progress) as bars:
        for index, c in enumerate(chosen):
            t0 = time.perf_counter()
            if fit_inputs is None or sequential:
                fit_inputs = capture(current, args)
                held_inputs = capture(current, held) if held is not None else None
            geom = c.layer.geometry
            d, out = geom.d, geom.out
            kernel = jnp.asarray(c.leaf)
            masks = c.rule.masks(kernel, c.axis)
            masks_by_path[c.path] = masks
            fwd2 = solve.as_numpy(masks.fwd).reshape(d, out)
            bias_leaf = dense_leaves.get(_bias_path(c.path))
            has_bias = bias_leaf is not None and tuple(bias_leaf.shape) == (out,)
            b = bias_leaf if has_bias else np.zeros((out,), np.float32)
            m = c.rule.pattern.fwd_nm[1] if absorb_mean else 0
            w, magnitude, start = solve.prepare(kernel, masks.fwd, b, axis=c.axis, m=m)
            fit_bias = bias and has_bias
            inputs = fit_inputs[c.path]
            _check_finite_inputs(inputs, c.path)
            # Host-side counts: no device program to compile per layer shape.
            kept_per_column = fwd2.sum(0)
            kmax = int(kept_per_column.max()) + int(fit_bias)
            per_sample = solve.rows_per_sample(geom, inputs)
            picked = solver
            if solver == "auto":
                cheap = (solve.lstsq_cost(geom, samples * per_sample, kmax)
                         <= solve.adam_cost(geom, per_sample, iters, batch))
                picked = "lstsq" if cheap or batch > samples else "adam"
            block = solve.solve_block(kmax)
            total = iters if picked == "adam" else -(-out // block)
            task = None
            if bars is not None:
                task = bars.add_task(f"{c.path} {c.rule.label} [{picked}]", total=total)
                solve.PROGRESS.set(lambda done, task=task: bars.update(task, completed=done))
            try:
                if picked == "lstsq":
                    new = solve.lstsq(geom, inputs, w, fwd2, start, jnp.float32(damping),
                                      fit_bias=fit_bias, kmax=kmax, block=block,
                                      progress=task is not None)
                else:
                    new = solve.adam(geom, inputs, w, fwd2, start, jnp.float32(lr),
                                     jnp.float32(bias_lr), jax.random.fold_in(key, index),
                                     iters=iters, batch=batch, fit_bias=fit_bias,
                                     progress=task is not None)
                new = jax.block_until_ready(new)
            finally:
                solve.PROGRESS.set(None)
            new_host = solve.as_numpy(new)
            if not np.isfinite(new_host).all():
                raise ValueError(
                    f"layer {c.path!r}: the {picked} solve gave non-finite weights"
                    + ("; lower lr" if picked == "adam" else
                       "; its least-squares system is singular: pass damping > 0"
                       if damping == 0 else "; its least-squares system is ill-conditioned: "
                       "raise damping"))
            candidates = (magnitude, new)
            ref, errs = solve.output_errors(geom, inputs, w, candidates)
            fit_err = np.sqrt(solve.as_numpy(errs) / max(float(ref), 1e-30))
            held_err = fit_err
            if held_inputs is not None:
                ref_h, errs_h = solve.output_errors(geom, held_inputs[c.path], w, candidates)
                held_err = np.sqrt(solve.as_numpy(errs_h) / max(float(ref_h), 1e-30))
            updates = {c.path: jnp.asarray(new_host[:d].reshape(kernel.shape), kernel.dtype)}
            if fit_bias:
                updates[_bias_path(c.path)] = jnp.asarray(new_host[d], bias_leaf.dtype)
            current = _replace(current, updates)
            size = math.prod(kernel.shape)
            reports.append(LayerReport(
                c.path, tuple(kernel.shape), c.rule.label, picked,
                float(np.count_nonzero(solve.as_numpy(kernel))) / size,
                float(kept_per_column.sum()) / size,
                float(held_err[0]), float(held_err[1]), float(fit_err[0]), float(fit_err[1]),
                time.perf_counter() - t0))
            if bars is not None:
                bars.update(task, completed=total,
                            description=f"{c.path} {c.rule.label} [{picked}] rel. error "
                                        f"{held_err[0]:.3f} -> {held_err[1]:.3f}")

    return _conversion(setup, current, masks_by_path, masks_by_path, reports)


def _conversion(setup: _Setup, params: Any, masks: Mapping[str, Masks],
                magnitude: Mapping[str, Masks], reports: list[LayerReport]) -> Conversion:
    """The :class:`Conversion` of ``params`` with ``masks`` (by kernel path); the baseline is
    the dense model under the ``magnitude`` masks."""
    dense = setup.adapter.params
    tree = lambda by_path: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda kp, _: by_path.get(path_str(kp)), dense)
    used = tuple(dict.fromkeys(c.rule for c in setup.chosen))
    return Conversion(params, tree(masks), apply_masks(dense, tree(magnitude)), tuple(reports),
                      used, _sparse_model(setup.adapter, params, masks, setup.chosen),
                      setup.held is not None, _conversion_plan(setup.chosen))


# ------------------------------------------------------------------------------ one-shot


def _check_one_shot(chosen: list[_Chosen], method: str) -> None:
    for c in chosen:
        pattern = c.rule.pattern
        if not isinstance(pattern, NM | Transposable | BiMask):
            raise ValueError(f"{method} takes N:M, transposable N:M and Bi-Mask patterns; "
                             f"rule {c.rule.label!r} has a {type(pattern).__name__} pattern")
        ndim = len(c.leaf.shape)
        if c.axis != ndim - 2:
            raise ValueError(f"{method} groups a kernel along the axis next to its output axis "
                             f"(Dense (in, out): 0; conv (..., I, O): I); rule {c.rule.label!r} "
                             f"groups {c.path!r} of shape {tuple(c.leaf.shape)} along axis "
                             f"{c.axis}")


def _one_shot(setup: _Setup, method: str, layer_fn: Callable, *, sequential: bool,
              progress: bool, total: Callable[[_Chosen], int]) -> Conversion:
    """The layer loop of :func:`sparsegpt` and :func:`wanda`: for each chosen layer in forward
    order, its inputs (from the model converted so far with ``sequential``), then
    ``layer_fn(index, chosen, inputs, w (d, out)) -> (new (d, out), Masks)``, the errors, the
    report."""
    adapter = setup.adapter
    dense_leaves = _leaves_by_path(adapter.params)
    current = adapter.params
    masks_by_path: dict[str, Masks] = {}
    magnitude_by_path: dict[str, Masks] = {}
    reports = []
    with _bars(progress) as bars:
        for index, c in enumerate(setup.chosen):
            t0 = time.perf_counter()
            # Only this layer's inputs are captured (a program per layer): memory for one
            # layer's calibration rows, not every selected layer's.
            program = _capture_program(adapter.kind, adapter.static, frozenset({c.path}))
            source = current if sequential else adapter.params
            inputs = program(source, adapter.extra, setup.args)[c.path]
            held_inputs = (program(source, adapter.extra, setup.held)[c.path]
                           if setup.held is not None else None)
            geom = c.layer.geometry
            d, out = geom.d, geom.out
            kernel = jnp.asarray(c.leaf)
            magnitude_masks = c.rule.masks(kernel, c.axis)
            magnitude_by_path[c.path] = magnitude_masks
            bias_leaf = dense_leaves.get(_bias_path(c.path))
            has_bias = bias_leaf is not None and tuple(bias_leaf.shape) == (out,)
            b = bias_leaf if has_bias else np.zeros((out,), np.float32)
            w, magnitude, _ = solve.prepare(kernel, magnitude_masks.fwd, b, axis=c.axis, m=0)
            label = f"{c.path} {c.rule.label} [{method}]"
            task = None
            if bars is not None:
                task = bars.add_task(label, total=total(c))
                solve.PROGRESS.set(lambda done, task=task: bars.update(task, completed=done))
            try:
                new2, masks = layer_fn(index, c, inputs, w[:d], task is not None)
                new2 = jax.block_until_ready(new2)
            finally:
                solve.PROGRESS.set(None)
            new2_host = solve.as_numpy(new2)
            if not np.isfinite(new2_host).all():
                raise ValueError(f"layer {c.path!r}: {method} gave non-finite weights; raise "
                                 "damping")
            masks_by_path[c.path] = masks
            new = jnp.concatenate([jnp.asarray(new2_host), w[d:]], axis=0)
            candidates = (magnitude, new)
            ref, errs = solve.output_errors(geom, inputs, w, candidates)
            fit_err = np.sqrt(solve.as_numpy(errs) / max(float(ref), 1e-30))
            held_err = fit_err
            if held_inputs is not None:
                ref_h, errs_h = solve.output_errors(geom, held_inputs, w, candidates)
                held_err = np.sqrt(solve.as_numpy(errs_h) / max(float(ref_h), 1e-30))
            current = _replace(current, {c.path: jnp.asarray(
                new2_host.reshape(kernel.shape), kernel.dtype)})
            size = math.prod(kernel.shape)
            reports.append(LayerReport(
                c.path, tuple(kernel.shape), c.rule.label, method,
                float(np.count_nonzero(solve.as_numpy(kernel))) / size,
                float(np.count_nonzero(solve.as_numpy(masks.fwd))) / size,
                float(held_err[0]), float(held_err[1]), float(fit_err[0]), float(fit_err[1]),
                time.perf_counter() - t0))
            if bars is not None:
                bars.update(task, completed=total(c),
                            description=f"{label} rel. error {held_err[0]:.3f} -> "
                                        f"{held_err[1]:.3f}")
    return _conversion(setup, current, masks_by_path, magnitude_by_path, reports)


def _with_backward(pattern: Pattern, kernel_new: jax.Array, fwd: jax.Array, key: jax.Array
                   ) -> Masks:
    """The layer's :class:`Masks` for a forward mask (kernel-shaped): Bi-Mask's backward
    mask by the pattern's permutation search on the converted weights; else ``fwd`` twice."""
    if isinstance(pattern, BiMask):
        return _oneshot.bimask_backward(pattern, kernel_new, fwd, key)
    return Masks(fwd, fwd, None)


def sparsegpt(
    model: Any,
    calibration_batch: Any,
    rule: MaskRule | Pattern | str | Sequence[MaskRule],
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
    damping = _check_positive(damping, "damping")
    block = _checks.check_count(block, "block", 1)
    _check_bools(sequential=sequential, progress=progress)
    key = _check_key(key)
    setup = _setup(model, calibration_batch, rule, held_out, collections, call_kwargs,
                   "SparseGPT")
    _check_one_shot(setup.chosen, "SparseGPT")
    for c in setup.chosen:
        m = c.rule.pattern.fwd_nm[1]
        if block % m:
            raise ValueError(f"block={block} must be a multiple of m={m} (rule "
                             f"{c.rule.label!r}): a group of m rows must not straddle blocks")
        if isinstance(c.rule.pattern, Transposable) and c.rule.pattern.method == "lp":
            raise ValueError(f"rule {c.rule.label!r}: method='lp' solves on the host and "
                             "cannot run inside SparseGPT's compiled sweep; use 'auto' or "
                             "'exact'")

    def layer_block(c: _Chosen) -> int:
        return min(block, c.layer.geometry.d)

    def layer_fn(index, c, inputs, w, report):
        new2, fwd2 = _oneshot.sparsegpt(c.layer.geometry, inputs, w, jnp.float32(damping),
                                        pattern=c.rule.pattern, block=layer_block(c),
                                        progress=report)
        shape = c.leaf.shape
        masks = _with_backward(c.rule.pattern, new2.reshape(shape), fwd2.reshape(shape),
                               jax.random.fold_in(key, index))
        return new2, masks

    return _one_shot(setup, "sparsegpt", layer_fn, sequential=sequential, progress=progress,
                     total=lambda c: -(-c.layer.geometry.d // layer_block(c)))


def wanda(
    model: Any,
    calibration_batch: Any,
    rule: MaskRule | Pattern | str | Sequence[MaskRule],
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
    key = _check_key(key)
    setup = _setup(model, calibration_batch, rule, held_out, collections, call_kwargs, "Wanda")
    _check_one_shot(setup.chosen, "Wanda")

    def layer_fn(index, c, inputs, w, report):
        geom, shape = c.layer.geometry, c.leaf.shape
        scores = (jnp.abs(w) * _oneshot.input_norms(geom, inputs)[:, None]).reshape(shape)
        fwd = jnp.asarray(_oneshot.select(c.rule.pattern, scores, c.axis))
        new = jnp.where(fwd, w.reshape(shape), 0.0)
        masks = _with_backward(c.rule.pattern, new, fwd, jax.random.fold_in(key, index))
        if report:
            solve.PROGRESS(1)
        return new.reshape(w.shape), masks

    return _one_shot(setup, "wanda", layer_fn, sequential=sequential, progress=progress,
                     total=lambda c: 1)


def _sparse_model(adapter: Any, params: Any, masks: Mapping[str, Masks],
                  chosen: list[_Chosen]) -> Any:
    """The model with the converted layers in static sparse mode, through the same plan the
    optimizer takes (``Conversion.plan``)."""
    from nmjax import nn as sparse_nn
    from nmjax.nn import _sparsify

    plan = _conversion_plan(chosen)
    if isinstance(adapter, LinenModel):
        if adapter.module is None:
            return None
        return sparse_nn.sparsify(adapter.module, plan, mode="static")
    model = sparse_nn.sparsify(adapter.merge(params), plan, mode="static")
    _sparsify.set_nnx_masks(model, dict(masks))
    return model


def _conversion_plan(chosen: list[_Chosen]) -> Plan:
    op = lambda c: "dot_general" if c.layer.kind == "dense" else "conv_general_dilated"
    return Plan(tuple(LeafPlan(c.path, op(c), from_axis(tuple(c.leaf.shape), c.axis, c.path),
                               c.rule.pattern, c.rule) for c in chosen))


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


def _selector(include: Any, exclude: Any, predicate: Any) -> MaskRule:
    # The pattern is never applied: a Custom one declares no N:M, so no divisibility check.
    return MaskRule(Custom(lambda w, axis: w != 0), include=include, exclude=exclude,
                    predicate=predicate)


def _selected_leaves(params, include, exclude, predicate, kinds):
    rule = _selector(include, exclude, predicate)
    out = []
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = path_str(key_path)
        axis = rule.select(path, leaf, "infer" if kinds is None else kinds.get(path))
        if axis is not None:
            out.append((path, leaf, axis))
    if not out:
        some = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        raise ValueError(f"no leaf selected (include={include!r}, exclude={exclude!r}); the "
                         f"tree's leaves include {some[:5]}")
    return out


def layer_densities(params: Any, *, include: Any = None, exclude: Any = (),
                    predicate: Callable | None = None, kinds: Mapping[str, Any] | None = None
                    ) -> dict[str, float]:
    """``{kernel path: nonzero fraction}`` of the Dense/Conv kernels (or those ``include``,
    ``exclude``, ``predicate`` select, as in :class:`~nmjax.tree.MaskRule`).

    >>> import jax.numpy as jnp
    >>> layer_densities({"Dense_0": {"kernel": jnp.array([[0., 1.], [2., 0.]])}})
    {'Dense_0/kernel': 0.5}
    """
    return {path: float(jnp.count_nonzero(leaf)) / max(math.prod(leaf.shape), 1)
            for path, leaf, _ in _selected_leaves(params, include, exclude, predicate, kinds)}


def rules_for_density(params: Any, m: int, *, kind: str = "nm", confidence: float = 0.95,
                      include: Any = None, exclude: Any = (), predicate: Callable | None = None,
                      kinds: Mapping[str, Any] | None = None) -> tuple[MaskRule, ...]:
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
      kind: ``"nm"``, ``"transposable"`` or ``"bimask"``.
      confidence: as :func:`choose_n`.
      include, exclude, predicate, kinds: which kernels, as :class:`~nmjax.tree.MaskRule`
        and :func:`nmjax.tree.build_masks`.

    Raises:
      ValueError: a kernel that the chosen pattern cannot take (the leaf is named).
    """
    groups: dict[tuple[int, int], list[str]] = {}
    leaves = _selected_leaves(params, include, exclude, predicate, kinds)
    for path, leaf, axis in leaves:
        density = float(jnp.count_nonzero(leaf)) / max(math.prod(leaf.shape), 1)
        n = choose_n(density, m, confidence=confidence)
        groups.setdefault((n, axis), []).append(path)
    rules = tuple(MaskRule(as_pattern(f"{n}:{m}", kind),
                           include=tuple(f"^{re.escape(p)}$" for p in paths), axis=axis)
                  for (n, axis), paths in groups.items())
    for path, leaf, _ in leaves:  # fail here, naming the leaf, not later in adaprune
        for r in rules:
            r.select(path, leaf, None)
    return rules


class Pruned(NamedTuple):
    """:func:`global_magnitude_prune`'s result: ``params`` zeroed outside ``masks`` (a tree
    of boolean arrays at the pruned leaves, ``None`` elsewhere)."""

    params: Any
    masks: Any


def global_magnitude_prune(params: Any, density: float, *, include: Any = None,
                           exclude: Any = (), predicate: Callable | None = None,
                           kinds: Mapping[str, Any] | None = None) -> Pruned:
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
      include, exclude, predicate, kinds: which leaves, as :class:`~nmjax.tree.MaskRule`.
    """
    if isinstance(density, bool) or not isinstance(density, int | float | np.number):
        raise TypeError(f"density must be a real number, got {density!r}")
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    leaves = _selected_leaves(params, include, exclude, predicate, kinds)
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
