"""Masks for whole parameter pytrees: which leaves, which pattern.

A :class:`MaskRule` says which parameters (regexes on their paths, a predicate) get which
pattern spec (:mod:`nmjax.masks`). Each parameter's axes come from the op that consumes it:
:func:`nmjax.resolve` turns a rule and a model into a :class:`nmjax.plan.Plan`, which
:func:`build_masks` (and the optimizer, and :func:`nmjax.nn.sparsify`) take. Without a model,
only layouts the tree itself shows are taken (Linen auto-named ``Dense_<i>`` ``(in, out)``
and ``Conv_<i>`` ``HWIO`` kernels, or ``MaskRule(axis=...)``). :func:`build_masks` returns
a pytree of the parameters' structure with a :class:`~nmjax.masks.Masks` at each sparse
leaf and ``None`` elsewhere. Works on Linen variable dicts and NNX ``State``s.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from nmjax import _checks
from nmjax._progress import Bars
from nmjax._text import table
from nmjax.masks import Masks, Pattern, Transposable, as_pattern, transposable_mask_lp

Path = str


def path_str(key_path: Sequence[Any]) -> Path:
    """A key path as a string: ``'params/Dense_0/kernel'``.

    NNX ``Variable`` wrappers (a trailing ``.value`` attribute) are dropped, so Linen and NNX
    paths read alike.
    """
    parts = []
    for k in key_path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        else:
            parts.append(str(k))
    if parts and parts[-1] == "value":
        parts.pop()
    return "/".join(parts)


def nest(flat: Mapping[Path, Any]) -> dict[str, Any]:
    """``{"a/b/kernel": x}`` as nested dicts ``{"a": {"b": {"kernel": x}}}`` (the inverse of
    :func:`path_str` over a dict tree)."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        *head, last = path.split("/")
        node = out
        for part in head:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def _as_tuple(x: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if x is None:
        return None
    return (x,) if isinstance(x, str) else tuple(x)


@dataclasses.dataclass(frozen=True)
class MaskRule:
    """Which leaves of a parameter pytree get which pattern.

    >>> from nmjax.masks import Transposable
    >>> MaskRule("2:4").pattern                                    # every Dense/Conv kernel
    NM(n=2, m=4)
    >>> MaskRule(Transposable(4, 8), exclude=r"head").label
    '4:8 transposable'
    >>> MaskRule("2:4", include=r"attn/(query|key)/kernel$", axis=0).include
    'attn/(query|key)/kernel$'

    Attributes:
      pattern: a pattern spec (:class:`nmjax.masks.NM`, ``Transposable``, ``BiMask``,
        ``Custom``) or its shorthand (``"2:4"``, ``"2:4 transposable"``).
      include: regex(es) searched in the leaf path (``"params/Dense_0/kernel"``). ``None``
        (default) selects every parameter that a product uses as its weight
        (:func:`nmjax.resolve` reads them from the model's ops; without a model,
        :func:`nmjax.plan.plan_for_params` takes the Linen auto-named ``Dense_<i>`` and
        ``Conv_<i>`` kernels).
      exclude: regex(es); a leaf whose path matches any is left dense.
      predicate: optional ``fn(path, leaf) -> bool``; a leaf must also satisfy it.
      axis: the contraction axis of a selected leaf whose layout the tree alone cannot show
        (:func:`nmjax.plan.plan_for_params`: rank 2 ``(in, out)`` 0 or ``(out, in)`` 1, a
        conv ``ndim - 2``); a resolved plan reads it from the op and refuses another.
      skip_indivisible: leave a selected leaf dense (instead of raising) when the pattern
        cannot take it: its contraction axis (or, for transposable and Bi-Mask, its output
        axis) is not divisible by ``m`` -- e.g. a 10-class head.
    """

    pattern: Pattern | str = "2:4"
    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] = ()
    predicate: Callable[[Path, Any], bool] | None = None
    axis: int | None = None
    skip_indivisible: bool = False

    def __post_init__(self):
        object.__setattr__(self, "pattern", as_pattern(self.pattern))
        if self.exclude is None:
            object.__setattr__(self, "exclude", ())
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
            elif not (value is None or isinstance(value, str | tuple)):
                raise TypeError(f"{name} must be a regex string or a sequence of them, got "
                                f"{type(value).__name__} {value!r:.60}")
            for pat in _as_tuple(getattr(self, name)) or ():
                if not isinstance(pat, str):
                    raise TypeError(f"{name} must be regex strings, got {pat!r}")
                try:
                    re.compile(pat)
                except re.error as e:
                    raise ValueError(f"{name} regex {pat!r} is invalid: {e}") from None
        if self.predicate is not None and not callable(self.predicate):
            raise TypeError(f"predicate must be a function (path, leaf) -> bool, "
                            f"got {self.predicate!r}")
        if self.axis is not None and (isinstance(self.axis, bool)
                                      or not isinstance(self.axis, int | np.integer)):
            raise TypeError(f"axis must be an int or None, got {self.axis!r}")
        if not isinstance(self.skip_indivisible, bool):
            raise TypeError(f"skip_indivisible must be a bool, got {self.skip_indivisible!r}")

    @property
    def label(self) -> str:
        return self.pattern.label



def build_masks(params: Any, rule: Any) -> Any:
    """:class:`~nmjax.masks.Masks` for every parameter a plan (or rule) makes sparse;
    ``None`` elsewhere.

    >>> import jax.numpy as jnp
    >>> params = {"Dense_0": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
    >>> masks = build_masks(params, "2:4")
    >>> masks["Dense_0"]["bias"] is None, masks["Dense_0"]["kernel"].fwd.shape
    (True, (8, 4))

    Args:
      params: a parameter pytree (Linen ``params`` dict, NNX ``State``, ...).
      rule: a :class:`nmjax.plan.Plan` (``nmjax.resolve(model, rule, x)``: the axes come
        from the ops that use each parameter), or a :class:`MaskRule` / pattern / shorthand
        for trees whose layouts are known without the model (Linen auto-named
        ``Dense_<i>``/``Conv_<i>`` layers, or ``MaskRule(axis=...)``;
        :func:`nmjax.plan.plan_for_params`).

    Returns:
      A pytree of ``params``' structure: a ``Masks(fwd, bwd, perm)`` at each sparse leaf,
      ``None`` elsewhere. Pure; call it outside ``jit`` for expensive patterns (each leaf
      shape compiles its solver once, where a ``jit`` around the whole tree inlines one
      copy per leaf).

    Raises:
      ValueError: a rule without a model selects a kernel whose layout cannot be known
        (the message says to resolve the model), or selects nothing.
    """
    from nmjax.optim import plan_of

    return plan_of(params, rule).masks(params)


def is_masks_leaf(x: Any) -> bool:
    """``is_leaf`` for mask trees: a :class:`~nmjax.masks.Masks` or ``None`` is one leaf."""
    return x is None or isinstance(x, Masks)


def forward_mask(masks: Any) -> jax.Array | None:
    """The mask that applies to the weights: a :class:`~nmjax.masks.Masks`' ``fwd`` (a
    bare boolean array is taken as it is)."""
    return masks.fwd if isinstance(masks, Masks) else masks


def _paths(tree: Any, is_leaf=None) -> list[Path]:
    return [path_str(p) for p, _ in
            jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]]


def check_structure(params: Any, masks: Any, name: str = "masks") -> None:
    """Raises ValueError naming the paths where ``masks`` (a mask tree: a
    :class:`~nmjax.masks.Masks` or ``None`` per leaf) and ``params`` differ."""
    p_struct = jax.tree_util.tree_structure(params)
    m_struct = jax.tree_util.tree_structure(masks, is_leaf=is_masks_leaf)
    if p_struct == m_struct:
        return
    have, want = set(_paths(masks, is_masks_leaf)), set(_paths(params))
    missing, extra = sorted(want - have), sorted(have - want)
    detail = []
    if missing:
        detail.append(f"params paths missing from {name}: {missing[:5]}"
                      + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if extra:
        detail.append(f"{name} paths not in params: {extra[:5]}"
                      + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
    if not detail:
        detail.append("the paths agree but the container types differ "
                      f"({p_struct} vs {m_struct})")
    raise ValueError(f"{name} do not match the parameter tree (built for another model?): "
                     + "; ".join(detail))


def apply_masks(params: Any, masks: Any) -> Any:
    """``params`` with each masked leaf zeroed outside its forward mask; dtypes kept.

    Raises:
      ValueError: ``masks`` has another tree structure (the message names the paths that
        differ), or a mask's shape differs from its leaf's.
    """
    check_structure(params, masks)

    def one(key_path, leaf, masks):
        mask = forward_mask(masks)
        if mask is None:
            return leaf
        if tuple(mask.shape) != tuple(leaf.shape):
            raise ValueError(f"mask for {path_str(key_path)!r} has shape {tuple(mask.shape)}, "
                             f"but the leaf has shape {tuple(leaf.shape)}")
        return jnp.where(_checks.check_mask(mask, f"mask for {path_str(key_path)!r}"), leaf,
                         jnp.zeros((), leaf.dtype))

    flat_masks = jax.tree_util.tree_leaves(masks, is_leaf=is_masks_leaf)
    leaves = jax.tree_util.tree_flatten_with_path(params)
    out = [one(kp, leaf, m) for (kp, leaf), m in zip(leaves[0], flat_masks, strict=True)]
    return jax.tree_util.tree_unflatten(leaves[1], out)


class LeafSummary(NamedTuple):
    path: Path
    shape: tuple[int, ...]
    pattern: str
    density: float
    axes: str = ""


class MaskSummary(NamedTuple):
    """Per-leaf rows and totals; ``str()`` renders an aligned table."""

    rows: tuple[LeafSummary, ...]
    kept: int
    total: int

    @property
    def density(self) -> float:
        return self.kept / max(self.total, 1)

    def __str__(self) -> str:
        head = ("path", "shape", "axes (contract -> out)", "pattern", "density")
        body = [(r.path, "x".join(map(str, r.shape)), r.axes, r.pattern, f"{r.density:.3f}")
                for r in self.rows]
        lines = table(head, body, {4})
        lines.append(f"total: {self.kept:,} of {self.total:,} parameters kept "
                     f"(density {self.density:.3f})")
        return "\n".join(lines)


def summarize(params: Any, masks: Any, rule: Any = None) -> MaskSummary:
    """One row per parameter leaf: path, shape, axes (contraction -> output, from the plan),
    pattern and density.

    ``rule``: the :class:`nmjax.plan.Plan` (or rule) the masks were built with, for the
    axes and pattern names; ``None`` labels masked leaves ``"masked"``. Densities count the
    forward mask of masked leaves and 1.0 for dense leaves. Needs concrete arrays (call it
    outside ``jit``).
    """
    check_structure(params, masks)
    planned = {}
    if rule is not None:
        from nmjax.optim import plan_of

        planned = plan_of(params, rule).by_path
    rows, kept, total = [], 0, 0
    flat_masks = jax.tree_util.tree_leaves(masks, is_leaf=is_masks_leaf)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for (key_path, leaf), masks_leaf in zip(leaves, flat_masks, strict=True):
        mask = forward_mask(masks_leaf)
        path = path_str(key_path)
        size = int(np.prod(leaf.shape))
        k = size if mask is None else int(jnp.sum(mask))
        plan_leaf = planned.get(path)
        label = "dense" if mask is None else (plan_leaf.pattern.label if plan_leaf else "masked")
        axes = "" if plan_leaf is None or mask is None else \
            f"{plan_leaf.layout.contract} -> {plan_leaf.layout.out}"
        rows.append(LeafSummary(path, tuple(leaf.shape), label, k / max(size, 1), axes))
        kept, total = kept + k, total + size
    return MaskSummary(tuple(rows), kept, total)


def build_masks_lp(
    params: Any, rule: Any, *, batch_tiles: int = 4096, progress: bool = True,
    file: TextIO | None = None,
) -> Any:
    """:func:`build_masks` for a :class:`~nmjax.masks.Transposable` pattern, solved offline
    by the LP (exact; :func:`nmjax.masks.transposable_mask_lp`, scipy's HiGHS).

    Walks the sparse leaves one by one (tiles over each leaf's contraction and output axes,
    as the plan lays them out) and prints a progress bar over the leaves and the tiles of
    the current leaf to ``file`` (default ``sys.stderr``). The pattern's JAX solver options
    (``method``, ``repair``, ...) do not apply; its ``score_fn`` does.

    Example (a rule selecting the kernels of ``params``)::

      masks = build_masks_lp(params, MaskRule(Transposable(4, 8), exclude=r"head"))

    Args:
      params: parameter pytree (concrete arrays).
      rule: a :class:`nmjax.plan.Plan` or rule (as :func:`build_masks`) whose pattern is
        ``Transposable``.
      batch_tiles: tiles per LP (memory grows linearly with it).
      progress: show a progress bar per leaf (rich).
      file: stream for the bars (default stderr).

    Returns:
      A pytree of ``params``' structure with ``Masks(mask, mask, None)`` (numpy masks) at
      each selected leaf and ``None`` elsewhere.
    """
    from nmjax.optim import plan_of

    plan = plan_of(params, rule)
    bad = [leaf.pattern.label for leaf in plan.leaves
           if not isinstance(leaf.pattern, Transposable)]
    if bad:
        raise ValueError(f"build_masks_lp needs a Transposable pattern, got {bad[0]!r}")
    flat = {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    t0 = time.perf_counter()
    solved: dict[Path, Masks] = {}
    total = len(plan.leaves)
    with Bars(progress, file=file) as bars:
        for done, leaf in enumerate(plan.leaves):
            spec, layout = leaf.pattern, leaf.layout
            scores = np.asarray(layout.to_canonical(jnp.asarray(spec.score_fn(
                np.asarray(flat[leaf.path])))))
            with bars.item(f"leaf {done + 1}/{total} {leaf.path} tiles", 0) as update:
                report = None if update is None else (lambda a, b, u=update: u(a, total=b))
                mask = np.stack([transposable_mask_lp(matrix, spec.n, spec.m, axes=(0, 1),
                                                      batch_tiles=batch_tiles, progress=report)
                                 for matrix in scores])
            bars.done(f"leaf {done + 1}/{total} {leaf.path}")
            mask = np.asarray(layout.from_canonical(jnp.asarray(mask)))
            solved[leaf.path] = Masks(mask, mask, None)
        if total:
            bars.print(f"{total} leaves solved in {time.perf_counter() - t0:.1f}s")
    return jax.tree_util.tree_map_with_path(lambda kp, _: solved.get(path_str(kp)), params)


__all__ = [
    "LeafSummary",
    "MaskRule",
    "MaskSummary",
    "apply_masks",
    "build_masks",
    "build_masks_lp",
    "check_structure",
    "forward_mask",
    "is_masks_leaf",
    "path_str",
    "summarize",
]
