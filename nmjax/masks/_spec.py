"""Pattern specs: frozen, hashable, validated values that turn a kernel into its :class:`Masks`.

Every spec is called as ``spec(w, axis) -> Masks`` on a kernel grouped along ``axis`` (its
contraction axis: 0 for a Dense kernel ``(in, out)``, ``ndim - 2`` for an ``HWIO`` conv) and
says which N:M it guarantees for each product (:attr:`Pattern.fwd_nm`, :attr:`Pattern.bwd_nm`),
which is what decides whether a sparse kernel may run that product.

* :class:`NM`: N:M along the contraction axis; the input gradient uses the same mask.
* :class:`Transposable`: N:M along the contraction and the output axes (both products sparse).
* :class:`BiMask`: a forward N:M mask, a backward one N:M along a permuted output axis, and the
  permutation (Dense kernels).
* :class:`Custom`: your own function.

:func:`as_pattern` reads the shorthand ``"2:4"``, ``"2:4 transposable"``, ``"bimask 4:8"``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from nmjax import _checks
from nmjax.masks._bimask import bimask
from nmjax.masks._nm import is_nm, is_permutation, nm_mask
from nmjax.masks._permutation import METHODS as SEARCH_METHODS
from nmjax.masks._permutation import SCORES, search_permutation
from nmjax.masks._transposable import GUARANTEES, transposable_mask
from nmjax.masks._transposable import METHODS as TRANSPOSABLE_METHODS
from nmjax.masks._types import Masks

ScoreFn = Callable[[jax.Array], jax.Array]


def magnitude(w: jax.Array) -> jax.Array:
    """``|w|``: the default score of the specs (magnitude pruning).

    A module-level function, so that specs pickle and deep-copy to equal values (``jnp.abs``
    itself does neither: its copy is another object, and pickle cannot find it by name).
    """
    return jnp.abs(w)


class Pattern:
    """Base of the pattern specs (frozen dataclasses; subclass it for a pattern of your own).

    A spec is called as ``spec(w, axis=0) -> Masks``. Subclasses set :attr:`kind` and define
    ``__call__``, :attr:`fwd_nm`, :attr:`bwd_nm` and :meth:`check_leaf`.
    """

    kind: ClassVar[str] = "pattern"

    @property
    def fwd_nm(self) -> tuple[int, int] | None:
        """The ``(n, m)`` the forward mask keeps at most along the contraction axis."""
        raise NotImplementedError

    @property
    def bwd_nm(self) -> tuple[int, int] | None:
        """The ``(n, m)`` the backward mask keeps at most along the output axis (in ``perm``
        order), or ``None`` when the input-gradient product is not N:M along it."""
        raise NotImplementedError

    #: ``True`` when the pattern's backward mask is its forward mask (plain N:M, transposable):
    #: the products may then share one masked kernel.
    same_masks: ClassVar[bool] = False

    @property
    def label(self) -> str:
        """``"2:4 transposable"``: for tables and messages."""
        nm = self.fwd_nm
        return f"{nm[0]}:{nm[1]} {self.kind}" if nm else self.kind

    def check_leaf(self, shape: tuple[int, ...], axis: int) -> str | None:
        """``None`` if a kernel of ``shape`` grouped along ``axis`` can take this pattern,
        else the reason (which axis is not divisible by what)."""
        raise NotImplementedError

    def _check_call(self, w: Any, axis: Any) -> tuple[jax.Array, int]:
        w = _checks.check_scores(w, "w")
        if w.ndim == 0:
            raise ValueError("w must have at least one axis, got a scalar")
        axis = _checks.check_axis(axis, w.ndim)
        reason = self.check_leaf(tuple(w.shape), axis)
        if reason is not None:
            raise ValueError(f"w of shape {tuple(w.shape)} cannot take pattern "
                             f"{self.label!r} grouped along axis {axis}: {reason}")
        return jax.lax.stop_gradient(w), axis

    def valid(self, masks: Masks, axis: int = 0) -> jax.Array:
        """Whether ``masks`` satisfy what this pattern guarantees (a JAX boolean; jit-able).

        Checks ``fwd`` (at most ``n`` of every ``m`` along ``axis``), ``bwd`` (along the
        last axis in ``perm`` order, where :attr:`bwd_nm` is set), ``bwd ⊆ fwd`` and that
        ``perm`` is a permutation. Use it at a mask refresh (e.g. under ``checkify``):
        the products trust traced masks and permutations.
        """
        if not isinstance(masks, Masks):
            raise TypeError(f"masks must be an nmjax.masks.Masks, got {type(masks).__name__}")
        ok = jnp.asarray(True)
        if self.fwd_nm is not None:
            ok &= is_nm(masks.fwd, *self.fwd_nm, axis=axis)
        bwd = masks.bwd
        if masks.perm is not None:
            ok &= is_permutation(masks.perm)
            bwd = jnp.take(bwd, jnp.clip(masks.perm, 0, bwd.shape[-1] - 1), axis=-1)
        if self.bwd_nm is not None:
            ok &= is_nm(bwd, *self.bwd_nm, axis=-1)
        return ok & ~jnp.any(masks.bwd & ~masks.fwd)


class _NMPattern(Pattern):
    """A pattern with an ``n`` and an ``m``: N:M forward, and N:M backward (along the output
    axis, in ``perm`` order) unless :attr:`backward_sparse` is off."""

    n: int
    m: int
    backward_sparse: ClassVar[bool] = True

    @property
    def fwd_nm(self) -> tuple[int, int]:
        return (self.n, self.m)

    @property
    def bwd_nm(self) -> tuple[int, int] | None:
        return (self.n, self.m) if self.backward_sparse else None


def _check_score_fn(score_fn: Any) -> None:
    if not callable(score_fn):
        raise TypeError(f"score_fn must be a function w -> scores, got {score_fn!r}")


def _divisible(shape: tuple[int, ...], axis: int, m: int, what: str) -> str | None:
    if shape[axis] % m:
        return f"its {what} axis {axis} has length {shape[axis]}, not divisible by m={m}"
    return None


@dataclasses.dataclass(frozen=True)
class NM(_NMPattern):
    """N:M along the contraction axis: the ``n`` best scores of every ``m`` consecutive.

    The input gradient uses the same mask (N:M along ``in``, not along ``out``), so only
    the forward product can run on sparse tensor cores.

    >>> import jax.numpy as jnp
    >>> from nmjax.masks import NM
    >>> w = jnp.array([[0.1, -2.0], [3.0, 0.5], [-0.2, 0.0], [1.0, 4.0]])   # (in, out)
    >>> masks = NM(2, 4)(w)                     # groups along axis 0 (in)
    >>> masks.fwd.sum(0), masks.bwd is masks.fwd, masks.perm
    (Array([2, 2], dtype=int32), True, None)

    Attributes:
      n, m: keep ``n`` of every ``m``, ``1 <= n <= m``.
      score_fn: scores from weights (default :func:`magnitude`, ``|w|``).
    """

    n: int = 2
    m: int = 4
    score_fn: ScoreFn = dataclasses.field(default=magnitude, repr=False)
    kind: ClassVar[str] = "nm"
    same_masks: ClassVar[bool] = True
    backward_sparse: ClassVar[bool] = False  # dX uses the same mask: N:M along in

    def __post_init__(self):
        _checks.check_nm(self.n, self.m)
        _check_score_fn(self.score_fn)

    def check_leaf(self, shape: tuple[int, ...], axis: int) -> str | None:
        return _divisible(shape, axis, self.m, "contraction")

    def __call__(self, w: Any, axis: int = 0) -> Masks:
        """``Masks(mask, mask, None)`` for ``w`` grouped along ``axis``."""
        w, axis = self._check_call(w, axis)
        mask = nm_mask(self.score_fn(w), self.n, self.m, axis)
        return Masks(mask, mask, None)


@dataclasses.dataclass(frozen=True)
class Transposable(_NMPattern):
    """Transposable N:M: ``n`` kept per row and column of every ``m × m`` tile over the
    contraction axis and the output (last) axis, so both products are N:M sparse.

    >>> import jax, jax.numpy as jnp
    >>> from nmjax.masks import Transposable, is_transposable
    >>> w = jax.random.normal(jax.random.key(0), (8, 8))
    >>> masks = Transposable(2, 4)(w)           # exact: the best of the 90 valid 4x4 tiles
    >>> bool(is_transposable(masks.fwd, 2, 4, exact=True))
    True

    Attributes:
      n, m: the pattern, ``1 <= n <= m``.
      method, repair, guarantee, eps_rel: the solver and its options
        (:func:`nmjax.masks.transposable_mask`; ``"auto"`` with ``guarantee="optimal"`` is
        exact, ``"exactly_n"`` the repaired greedy, ``"at_most_n"`` the greedy).
      score_fn: scores from weights (default :func:`magnitude`, ``|w|``).
    """

    n: int = 2
    m: int = 4
    method: str = "auto"
    repair: bool = False
    guarantee: str = "optimal"
    eps_rel: float | None = None
    score_fn: ScoreFn = dataclasses.field(default=magnitude, repr=False)
    kind: ClassVar[str] = "transposable"
    same_masks: ClassVar[bool] = True

    def __post_init__(self):
        _checks.check_nm(self.n, self.m)
        _check_score_fn(self.score_fn)
        if self.method not in TRANSPOSABLE_METHODS:
            raise ValueError(f"method must be one of {TRANSPOSABLE_METHODS}, got {self.method!r}")
        if not isinstance(self.repair, bool):
            raise TypeError(f"repair must be a bool, got {self.repair!r}")
        if self.repair and self.method != "greedy":
            raise ValueError(f"repair=True applies to method='greedy' only, got "
                             f"method={self.method!r}")
        _checks.check_choice(self.guarantee, "guarantee", GUARANTEES)
        if self.eps_rel is not None and not (isinstance(self.eps_rel, float)
                                             and 0 <= self.eps_rel < 1):
            raise ValueError(f"eps_rel must be a float in [0, 1) or None, got {self.eps_rel!r}")

    def check_leaf(self, shape: tuple[int, ...], axis: int) -> str | None:
        last = len(shape) - 1
        if len(shape) < 2:
            return "a transposable mask needs a kernel of rank >= 2"
        if axis == last:
            return ("its tiles pair the contraction axis with the last (output) axis, but the "
                    "contraction axis is the last axis itself")
        return (_divisible(shape, axis, self.m, "contraction")
                or _divisible(shape, last, self.m, "output"))

    def __call__(self, w: Any, axis: int = 0) -> Masks:
        """``Masks(mask, mask, None)``, tiles over ``(axis, last axis)``."""
        w, axis = self._check_call(w, axis)
        mask = transposable_mask(
            self.score_fn(w), self.n, self.m, method=self.method, axes=(axis, w.ndim - 1),
            repair=self.repair, guarantee=self.guarantee, eps_rel=self.eps_rel)
        mask = jnp.asarray(mask)
        return Masks(mask, mask, None)


@dataclasses.dataclass(frozen=True)
class BiMask(_NMPattern):
    """Bi-Mask (Zhang et al., 2023): forward N:M along the contraction axis, backward N:M
    along a permuted output axis, and the permutation; for Dense kernels ``(in, out)`` and
    conv kernels ``(..., I, O)`` (one permutation of ``O`` for every spatial position).

    ``spec(w)`` uses the identity permutation, ``spec(w, perm=p)`` a stored one and
    ``spec(w, key=k)`` searches one with :attr:`search`; :meth:`search_permutation` runs the
    search alone (the Bi-Mask recipe: every I steps, keeping the masks current in between).

    >>> import jax
    >>> from nmjax.masks import BiMask, is_nm
    >>> w = jax.random.normal(jax.random.key(0), (8, 16))
    >>> fwd, bwd, perm = BiMask(2, 4)(w, key=jax.random.key(1))      # swap search
    >>> bool(is_nm(fwd, 2, 4, axis=0)), bool(is_nm(bwd[:, perm], 2, 4, axis=1))
    (True, True)

    Attributes:
      n, m: the pattern, ``1 <= n <= m``.
      search: the permutation search, ``"swap"`` (default) or ``"random"`` (the official
        K-candidate search); see :func:`nmjax.masks.search_permutation`.
      rounds: ``"swap"`` rounds (``None``: the method's default).
      num_candidates: ``"random"`` candidates (``None``: 100).
      score: ``"count"`` or ``"magnitude"`` (``None``: the method's default).

    Bi-Mask scores by ``|w|`` (the paper's rule).
    """

    n: int = 2
    m: int = 4
    search: str = "swap"
    rounds: int | None = None
    num_candidates: int | None = None
    score: str | None = None
    kind: ClassVar[str] = "bimask"

    def __post_init__(self):
        _checks.check_nm(self.n, self.m)
        _checks.check_choice(self.search, "search", SEARCH_METHODS)
        if self.score is not None:
            _checks.check_choice(self.score, "score", SCORES)
        if self.rounds is not None:
            if self.search != "swap":
                raise ValueError("rounds is an option of search='swap'")
            _checks.check_count(self.rounds, "rounds", 0)
        if self.num_candidates is not None:
            if self.search != "random":
                raise ValueError("num_candidates is an option of search='random'")
            _checks.check_count(self.num_candidates, "num_candidates", 1)

    def check_leaf(self, shape: tuple[int, ...], axis: int) -> str | None:
        if len(shape) < 2 or axis != len(shape) - 2:
            return ("Bi-Mask takes kernels whose contraction axis is next to the output axis: "
                    "Dense (in, out) grouped along axis 0, conv (..., I, O) along I")
        return (_divisible(shape, axis, self.m, "contraction")
                or _divisible(shape, axis + 1, self.m, "output"))

    @staticmethod
    def _as_2d(w: jax.Array) -> jax.Array:
        # A conv kernel (..., I, O) as (H·W·I, O): I is innermost, so groups of m along I
        # never cross a spatial position; the output permutation is shared by all of them.
        return w.reshape(-1, w.shape[-1])

    def search_permutation(self, w: Any, key: Any, init: Any = None,
                           axis_name: str | tuple[str, ...] | None = None) -> jax.Array:
        """A permutation of the output channels of ``w`` (Dense ``(in, out)`` or conv
        ``(..., I, O)``) by :attr:`search` (``init``: a warm start for ``"swap"``;
        ``axis_name``: the mesh axes the rows are split across inside ``jax.shard_map``, see
        :func:`~nmjax.masks.search_permutation`). Returns ``(out,)`` int32."""
        w, _ = self._check_call(w, getattr(w, "ndim", 2) - 2)
        return search_permutation(
            self._as_2d(w), self.n, self.m, method=self.search, key=key, score=self.score,
            num_candidates=self.num_candidates, rounds=self.rounds, init=init,
            axis_name=axis_name)

    def __call__(self, w: Any, axis: int = 0, *, perm: Any = None, key: Any = None) -> Masks:
        """``Masks(fwd, bwd, perm)`` for ``perm`` (identity when ``None``), or for a
        permutation searched with ``key``. ``w``: Dense ``(in, out)`` with ``axis=0``, or a
        conv kernel ``(..., I, O)`` with ``axis=ndim - 2``."""
        w, axis = self._check_call(w, axis)
        if key is not None:
            if perm is not None:
                raise ValueError("pass either perm (a stored permutation) or key (to search "
                                 "one), not both")
            perm = self.search_permutation(w, key)
        fwd, bwd, perm = bimask(self._as_2d(w), self.n, self.m, perm)
        return Masks(fwd.reshape(w.shape), bwd.reshape(w.shape), perm)


@dataclasses.dataclass(frozen=True)
class Custom(Pattern):
    """A pattern from your own function ``fn(w, axis) -> bool mask | Masks``.

    A bare mask means ``Masks(mask, mask, None)``. Declare what ``fn`` guarantees, so that
    the sparse kernels may run the products (``None``: unknown, the reference runs them).

    >>> import jax.numpy as jnp
    >>> from nmjax.masks import Custom, nm_mask
    >>> spec = Custom(lambda w, axis: nm_mask(w ** 2, 1, 4, axis), fwd_nm=(1, 4))
    >>> spec.label, spec(jnp.arange(8.0).reshape(4, 2)).fwd.sum(0)
    ('1:4 custom', Array([1, 1], dtype=int32))

    Attributes:
      fn: ``fn(w, axis)`` returning a boolean mask of ``w.shape`` or a :class:`Masks`.
      fwd_nm: ``(n, m)`` the forward mask keeps at most along ``axis``, or ``None``.
      bwd_nm: ``(n, m)`` the backward mask keeps at most along the last axis (in ``perm``
        order), or ``None``.
    """

    fn: Callable[[jax.Array, int], Any]
    fwd_nm: tuple[int, int] | None = None
    bwd_nm: tuple[int, int] | None = None
    kind: ClassVar[str] = "custom"

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"fn must be a function fn(w, axis) -> mask, got {self.fn!r}")
        for name in ("fwd_nm", "bwd_nm"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, tuple | list) or len(value) != 2:
                    raise TypeError(f"{name} must be None or an (n, m) pair, got {value!r}")
                object.__setattr__(self, name, _checks.check_nm(*value))

    def check_leaf(self, shape: tuple[int, ...], axis: int) -> str | None:
        if self.fwd_nm is not None:
            reason = _divisible(shape, axis, self.fwd_nm[1], "contraction")
            if reason:
                return reason
        if self.bwd_nm is not None:
            return _divisible(shape, len(shape) - 1, self.bwd_nm[1], "output")
        return None

    def __call__(self, w: Any, axis: int = 0) -> Masks:
        w, axis = self._check_call(w, axis)
        out = self.fn(w, axis)
        if isinstance(out, Masks):
            masks = out
        elif isinstance(out, tuple):
            raise TypeError("a Custom pattern's function must return a mask or an "
                            "nmjax.masks.Masks, got a plain tuple")
        else:
            mask = _checks.check_mask(out, "the mask fn returned")
            masks = Masks(mask, mask, None)
        for name in ("fwd", "bwd"):
            got = getattr(masks, name)
            if tuple(got.shape) != tuple(w.shape):
                raise ValueError(f"the Custom pattern's {name} mask has shape "
                                 f"{tuple(got.shape)}, but w has shape {tuple(w.shape)}")
        self._check_declared(masks, axis)
        return masks

    def _check_declared(self, masks: Masks, axis: int) -> None:
        """The masks ``fn`` returned keep what :attr:`fwd_nm` / :attr:`bwd_nm` declare (the
        kernels trust the declaration). Concrete masks raise here; traced ones are checked
        under ``jax.experimental.checkify``."""
        checks = []
        if self.fwd_nm is not None:
            checks.append(("fwd", "the contraction axis", self.fwd_nm,
                           is_nm(masks.fwd, *self.fwd_nm, axis=axis)))
        if self.bwd_nm is not None:
            bwd = masks.bwd
            if masks.perm is not None:
                bwd = jnp.take(bwd, jnp.clip(masks.perm, 0, bwd.shape[-1] - 1), axis=-1)
            checks.append(("bwd", "the output axis (perm order)", self.bwd_nm,
                           is_nm(bwd, *self.bwd_nm, axis=-1)))
        for name, where, (n, m), ok in checks:
            msg = (f"the Custom pattern declares {name}_nm=({n}, {m}), but its function "
                   f"returned a {name} mask that keeps more than {n} of some {m} along {where}")
            if _checks.is_concrete(ok):
                if not bool(ok):
                    raise ValueError(msg + "; fix the function or the declaration")
            else:
                checkify.debug_check(ok, msg)


KINDS: dict[str, type[Pattern]] = {"nm": NM, "transposable": Transposable, "bimask": BiMask}
_NM_TOKEN = re.compile(r"^(\d+):(\d+)$")


def as_pattern(pattern: Any, kind: str | None = None) -> Pattern:
    """A pattern spec from a spec or a shorthand string.

    ``"2:4"`` is :class:`NM` ``(2, 4)``; a kind may be named in the string or by ``kind``:
    ``"2:4 transposable"``, ``"bimask 4:8"``, ``as_pattern("2:4", "transposable")``.
    Options (solver, search) need the spec itself: ``Transposable(4, 8, method="greedy")``.

    >>> as_pattern("2:4").label, as_pattern("bimask 4:8").label
    ('2:4 nm', '4:8 bimask')
    >>> as_pattern("2:4", "transposable") == Transposable(2, 4)
    True

    Raises:
      TypeError: neither a string nor a :class:`Pattern`.
      ValueError: a string that is not ``"N:M"`` with an optional kind, or an unknown kind.
    """
    if isinstance(pattern, Pattern):
        if kind is not None and kind != pattern.kind:
            raise ValueError(f"pattern {pattern.label!r} is already a spec; kind={kind!r} "
                             "does not apply to it")
        return pattern
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a pattern spec (nmjax.masks.NM, Transposable, "
                        f"BiMask, Custom) or a string like '2:4', got {pattern!r}")
    nm, kinds = None, []
    for token in re.split(r"[\s,]+", pattern.strip().lower()):
        match = _NM_TOKEN.match(token)
        if match and nm is None:
            nm = (int(match.group(1)), int(match.group(2)))
        elif token in KINDS:
            kinds.append(token)
        else:
            nm = None
            break
    if kind is not None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
        kinds.append(kind)
    if nm is None or len(set(kinds)) > 1:
        raise ValueError(f"pattern string must be 'N:M' with at most one kind of "
                         f"{sorted(KINDS)} (e.g. '2:4', '2:4 transposable'), got {pattern!r}"
                         + (f" with kind={kind!r}" if kind else ""))
    return KINDS[kinds[0] if kinds else "nm"](*nm)
