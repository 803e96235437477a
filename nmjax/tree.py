"""Masks for whole parameter pytrees: which leaves, which axis, which mask rule.

A :class:`MaskRule` selects leaves (Dense/Linear and Conv kernels by default; never biases,
norm scales or embeddings unless asked), names each selected leaf's contraction axis
(Dense ``(in, out)`` -> axis 0; Conv ``HWIO`` -> the ``I`` axis) and the pattern to apply.
:func:`build_masks` returns a pytree of the parameters' structure with a mask at each
selected leaf and ``None`` elsewhere. Works on Linen variable dicts and NNX ``State``s.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nmjax import _checks
from nmjax import masks as _masks

Path = str
PatternFn = Callable[..., Any]


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


def leaf_kind(path: Path, leaf: Any) -> tuple[str | None, int | None]:
    """Classifies a parameter leaf as ``("dense", 0)``, ``("conv", ndim - 2)`` or ``(None, None)``.

    * ``.../kernel`` of rank 2: a Dense/Linear kernel ``(in, out)``; contraction axis 0.
    * ``.../kernel`` of rank 3-5 whose layer's name contains "conv" (any case: Linen's
      ``Conv_0``, an NNX attribute ``conv1``): a convolution kernel ``(..., I, O)``; groups
      run along ``I`` (axis ``ndim - 2``).
    * anything else is not selected by default: biases, scales, embeddings, and kernels of
      rank > 2 outside a layer named as a conv (``DenseGeneral``, einsum), whose contraction
      axes cannot be told from the shape (DESIGN §2: no guessing). Select those with
      ``MaskRule(include=..., axis=...)``; :func:`nmjax.nn.sparsify`, which sees layer types,
      passes the kind itself.
    """
    parts = path.rsplit("/", 2)
    ndim = getattr(leaf, "ndim", 0)
    if parts[-1] != "kernel":
        return None, None
    if ndim == 2:
        return "dense", 0
    layer = parts[-2] if len(parts) > 1 else ""
    if ndim in (3, 4, 5) and "conv" in layer.lower():
        return "conv", ndim - 2
    return None, None


def _nm(w, n, m, axis, score_fn, **kw):
    return _masks.nm_mask(score_fn(w), n, m, axis, **kw)


def _transposable(w, n, m, axis, score_fn, **kw):
    # Tiles over (contraction axis, output axis); the output axis is last for Dense and HWIO.
    if axis == w.ndim - 1:
        raise ValueError(
            f"pattern 'transposable' tiles the grouped axis with the last (output) axis, but "
            f"the rule groups along the last axis itself (shape {tuple(w.shape)}, axis {axis})"
        )
    return _masks.transposable_mask(score_fn(w), n, m, axes=(axis, w.ndim - 1), **kw)


def _bimask(w, n, m, axis, score_fn, **kw):
    # Bi-Mask scores by |w| (the paper's rule); a custom score_fn does not apply here.
    if w.ndim != 2 or axis != 0:
        raise ValueError(
            f"pattern 'bimask' supports Dense kernels (in, out) grouped along axis 0, "
            f"got shape {tuple(w.shape)} with axis {axis}"
        )
    return _masks.bimask(w, n, m, **kw)


PATTERNS: dict[str, PatternFn] = {"nm": _nm, "transposable": _transposable, "bimask": _bimask}


def _as_tuple(x: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if x is None:
        return None
    return (x,) if isinstance(x, str) else tuple(x)


@dataclasses.dataclass(frozen=True)
class MaskRule:
    """Which leaves of a parameter pytree get which N:M mask.

    Example::

      rule = MaskRule(n=2, m=4)                                 # all Dense/Conv kernels, 2:4
      rule = MaskRule(2, 4, pattern="transposable", exclude=r"head")
      rule = MaskRule(2, 4, include=r"attn/(query|key)/kernel$", axis=0)

    Attributes:
      n, m: the pattern, ``1 <= n <= m``.
      pattern: ``"nm"`` (N:M along the contraction axis), ``"transposable"`` (N:M along the
        contraction and output axes), ``"bimask"`` (forward + backward masks, Dense only), or
        a function ``fn(w, n, m, axis) -> mask`` of your own.
      include: regex(es) searched in the leaf path (``"params/Dense_0/kernel"``). ``None``
        (default) selects every Dense/Linear and Conv kernel (:func:`leaf_kind`).
      exclude: regex(es); a leaf whose path matches any is left dense.
      predicate: optional ``fn(path, leaf) -> bool``; a leaf must also satisfy it.
      axis: contraction axis to use for every selected leaf; ``None`` uses the leaf kind's
        axis. Required for leaves selected by ``include`` whose kind is unknown.
      score_fn: scores from weights for the built-in ``"nm"`` and ``"transposable"``
        patterns (default ``jnp.abs``); ``"bimask"`` always scores by ``|w|``.
      pattern_kwargs: extra keyword arguments for the pattern function (e.g.
        ``{"method": "exact"}`` for ``"transposable"``).
      skip_indivisible: leave a selected leaf dense (instead of raising) when its grouped
        axis is not divisible by ``m``.
    """

    n: int = 2
    m: int = 4
    pattern: str | PatternFn = "nm"
    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] = ()
    predicate: Callable[[Path, Any], bool] | None = None
    axis: int | None = None
    score_fn: Callable[[jax.Array], jax.Array] = jnp.abs
    pattern_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    skip_indivisible: bool = False

    def __post_init__(self):
        _checks.check_nm(self.n, self.m)
        if not (isinstance(self.pattern, str) or callable(self.pattern)):
            raise TypeError(f"pattern must be a pattern name or a function "
                            f"fn(w, n, m, axis) -> mask, got {self.pattern!r}")
        if self.exclude is None:
            object.__setattr__(self, "exclude", ())
        if isinstance(self.pattern, str) and self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {sorted(PATTERNS)} or a function, "
                             f"got {self.pattern!r}")
        for name in ("include", "exclude"):
            for pat in _as_tuple(getattr(self, name)) or ():
                try:
                    re.compile(pat)
                except re.error as e:
                    raise ValueError(f"{name} regex {pat!r} is invalid: {e}") from None

    @property
    def label(self) -> str:
        name = self.pattern if isinstance(self.pattern, str) else self.pattern.__name__
        return f"{self.n}:{self.m} {name}"

    def select(self, path: Path, leaf: Any, kind: str | None = None) -> int | None:
        """The grouped axis of ``leaf`` if this rule masks it, else ``None``.

        ``kind`` (``"dense"`` or ``"conv"``) is for callers that know the layer type; by
        default the kind comes from :func:`leaf_kind` (path and rank).

        Raises:
          ValueError: a leaf matched by ``include`` has no known contraction axis and the
            rule names none, or its grouped axis is not divisible by ``m``.
        """
        if kind is None:
            kind, kind_axis = leaf_kind(path, leaf)
        elif kind in ("dense", "conv"):
            kind_axis = getattr(leaf, "ndim", 0) - 2  # Dense (in, out): 0; HWIO: I
        else:
            raise ValueError(f"kind must be 'dense', 'conv' or None, got {kind!r}")
        include = _as_tuple(self.include)
        if include is None:
            chosen = kind is not None
        else:
            chosen = any(re.search(p, path) for p in include)
        if not chosen or any(re.search(p, path) for p in _as_tuple(self.exclude)):
            return None
        if self.predicate is not None and not self.predicate(path, leaf):
            return None
        axis = self.axis if self.axis is not None else kind_axis
        shape = tuple(getattr(leaf, "shape", ()))
        if axis is None:
            raise ValueError(
                f"leaf {path!r} of shape {shape} matches include={self.include!r}, but its "
                "contraction axis is unknown (not a Dense or Conv kernel); pass MaskRule(axis=...)"
            )
        axis = _checks.check_axis(axis, len(shape), f"axis for leaf {path!r}")
        if shape[axis] % self.m:
            if self.skip_indivisible:
                return None
            raise ValueError(
                f"leaf {path!r} has shape {shape}; its axis {axis} (length {shape[axis]}) is "
                f"not divisible by m={self.m}. Exclude it, or pass skip_indivisible=True"
            )
        return axis

    def mask(self, w: jax.Array, axis: int) -> Any:
        """Applies the pattern to one leaf grouped along ``axis``."""
        if callable(self.pattern):
            return self.pattern(w, self.n, self.m, axis, **self.pattern_kwargs)
        fn = PATTERNS[self.pattern]
        return fn(w, self.n, self.m, axis, self.score_fn, **self.pattern_kwargs)


def build_masks(params: Any, rule: MaskRule) -> Any:
    """Masks for every leaf ``rule`` selects; ``None`` at leaves left dense.

    Args:
      params: a parameter pytree (Linen ``variables``/``params`` dict, NNX ``State``, ...).
      rule: the :class:`MaskRule`.

    Returns:
      A pytree of ``params``' structure: a boolean mask of the leaf's shape (or, for
      ``"bimask"``, the pattern's ``(fwd, bwd, perm)`` tuple) at each selected leaf, ``None``
      elsewhere. Pure and jit-able (``rule`` is static).
    """

    def one(key_path, leaf):
        path = path_str(key_path)
        axis = rule.select(path, leaf)
        return None if axis is None else rule.mask(leaf, axis)

    return jax.tree_util.tree_map_with_path(one, params)


def forward_mask(mask: Any) -> jax.Array | None:
    """The mask that applies to the weights: the mask itself, or a Bi-Mask's ``fwd``."""
    return getattr(mask, "fwd", mask)


def apply_masks(params: Any, masks: Any) -> Any:
    """``params`` with each masked leaf zeroed outside its (forward) mask; dtypes kept.

    Raises:
      ValueError: a mask's shape differs from its leaf's.
    """

    def one(key_path, leaf, mask):
        mask = forward_mask(mask)
        if mask is None:
            return leaf
        if tuple(mask.shape) != tuple(leaf.shape):
            raise ValueError(f"mask for {path_str(key_path)!r} has shape {tuple(mask.shape)}, "
                             f"but the leaf has shape {tuple(leaf.shape)}")
        return jnp.where(_checks.check_mask(mask, f"mask for {path_str(key_path)!r}"), leaf,
                         jnp.zeros((), leaf.dtype))

    return jax.tree_util.tree_map_with_path(one, params, masks)


class LeafSummary(NamedTuple):
    path: Path
    shape: tuple[int, ...]
    pattern: str
    density: float


class MaskSummary(NamedTuple):
    """Per-leaf rows and totals; ``str()`` renders an aligned table."""

    rows: tuple[LeafSummary, ...]
    kept: int
    total: int

    @property
    def density(self) -> float:
        return self.kept / max(self.total, 1)

    def __str__(self) -> str:
        head = ("path", "shape", "pattern", "density")
        body = [(r.path, "x".join(map(str, r.shape)), r.pattern, f"{r.density:.3f}")
                for r in self.rows]
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(4)]
        fmt = "  ".join(f"{{:{'>' if i == 3 else '<'}{w}}}" for i, w in enumerate(widths))
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*row) for row in body]
        lines.append(f"total: {self.kept:,} of {self.total:,} parameters kept "
                     f"(density {self.density:.3f})")
        return "\n".join(lines)


def summarize(params: Any, masks: Any, rule: MaskRule | None = None) -> MaskSummary:
    """One row per parameter leaf: path, shape, pattern (``rule.label`` or ``"dense"``), density.

    Densities count the forward mask of masked leaves and 1.0 for dense leaves. Needs
    concrete arrays (call it outside ``jit``).
    """
    rows, kept, total = [], 0, 0
    label = rule.label if rule is not None else "masked"

    def one(key_path, leaf, mask):
        nonlocal kept, total
        mask = forward_mask(mask)
        size = int(np.prod(leaf.shape))
        k = size if mask is None else int(jnp.sum(mask))
        rows.append(LeafSummary(path_str(key_path), tuple(leaf.shape),
                                "dense" if mask is None else label, k / max(size, 1)))
        kept, total = kept + k, total + size

    jax.tree_util.tree_map_with_path(one, params, masks)
    return MaskSummary(tuple(rows), kept, total)
