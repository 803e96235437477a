"""Argument checks shared by every layer of nmjax: one clear error per broken rule."""

from __future__ import annotations

import math
import operator
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def check_nm(n: Any, m: Any, *, max_m: int | None = None) -> tuple[int, int]:
    """Validates an N:M pair and returns it as Python ints.

    Raises:
      TypeError: ``n`` or ``m`` is not an integer.
      ValueError: ``m < 1``, ``n < 1``, ``n > m``, or ``m > max_m``.
    """
    for name, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise TypeError(f"{name} must be a Python int, got {value!r} ({type(value).__name__})")
    n, m = int(n), int(m)
    if m < 1:
        raise ValueError(f"m must be >= 1, got m={m}")
    if n < 1:
        raise ValueError(f"n must be >= 1 (at least one kept entry per group), got n={n}")
    if n > m:
        raise ValueError(f"n must be <= m (keep at most m of every m), got n={n}, m={m}")
    if max_m is not None and m > max_m:
        raise ValueError(f"m must be <= {max_m} for this function, got m={m}")
    return n, m


def _as_array(x: Any, name: str) -> Any:
    """Arrays (and tracers) pass through; lists and scalars become numpy arrays."""
    if hasattr(x, "dtype") and hasattr(x, "shape"):
        return x
    arr = np.asarray(x)
    if arr.dtype == object:
        raise TypeError(f"{name} must be a numeric array, got {type(x).__name__} {x!r:.60}")
    return arr


def check_scores(scores: Any, name: str = "scores") -> jax.Array:
    """Returns ``scores`` as a real (integer or floating) JAX array.

    Raises:
      TypeError: boolean, complex or non-numeric dtype.
    """
    scores = _as_array(scores, name)
    dtype = scores.dtype
    if dtype == jnp.bool_:
        raise TypeError(
            f"{name} must be real numbers (|w| or another score), got a boolean array; "
            "pass a mask to the validators (is_nm, is_transposable) instead"
        )
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(f"{name} must be real, got complex dtype {dtype}; pass jnp.abs(w)")
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"{name} must have a real numeric dtype, got {dtype}")
    if not isinstance(scores, jax.Array):
        _check_narrowing(np.asarray(scores), name)
    return jnp.asarray(scores)


def _check_narrowing(arr: np.ndarray, name: str) -> None:
    """Host scores of a 64-bit dtype become 32-bit JAX arrays when x64 is off: integers
    outside int32 would wrap (an error) and float64 values distinct only in float64 would
    tie (a warning)."""
    if jax.config.jax_enable_x64 or arr.dtype.itemsize < 8 or arr.size == 0:
        return
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(np.int32)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < info.min or hi > info.max:
            raise ValueError(
                f"{name} of dtype {arr.dtype} hold values in [{lo}, {hi}], outside int32; JAX "
                "(x64 off) would wrap them. Pass float scores, rescale, or enable "
                "jax.config.update('jax_enable_x64', True)")
    elif np.issubdtype(arr.dtype, np.floating):
        finite = arr[np.isfinite(arr)]
        merged = np.unique(finite).size - np.unique(finite.astype(np.float32)).size
        if merged:
            warnings.warn(
                f"{name} of dtype float64 become float32 in JAX (x64 off), and {merged} "
                "distinct value(s) become equal to another; ties then go to the lower index. "
                "Rescale the scores or enable jax_enable_x64 to keep them apart",
                UserWarning, stacklevel=3)


def check_mask(mask: Any, name: str = "mask") -> jax.Array:
    """Returns ``mask`` as a JAX boolean array.

    Raises:
      TypeError: ``mask`` is not boolean (0/1 integers are rejected: they hide dtype bugs).
    """
    mask = _as_array(mask, name)
    dtype = mask.dtype
    if dtype != jnp.bool_:
        raise TypeError(f"{name} must be a boolean array, got dtype {dtype}; use mask.astype(bool)")
    return jnp.asarray(mask)


def check_axis(axis: Any, ndim: int, name: str = "axis") -> int:
    """Normalises ``axis`` for an array of rank ``ndim``.

    Raises:
      TypeError: ``axis`` is not an integer.
      ValueError: ``axis`` out of range.
    """
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {axis!r}") from None
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an array of rank {ndim}")
    return axis % ndim


def check_divisible(shape: tuple[int, ...], axis: int, m: int, name: str = "scores") -> None:
    """Raises ValueError unless ``shape[axis]`` is a multiple of ``m``."""
    if shape[axis] % m:
        raise ValueError(
            f"{name} has shape {tuple(shape)}; its axis {axis} (length {shape[axis]}) "
            f"must be divisible by m={m} to form groups of m consecutive entries"
        )


def check_nan_policy(nan: str) -> str:
    if nan not in ("smallest", "raise"):
        raise ValueError(f"nan must be 'smallest' or 'raise', got {nan!r}")
    return nan


def raise_on_nan(scores: jax.Array, name: str = "scores") -> None:
    """For ``nan='raise'``: raises ValueError if concrete ``scores`` hold NaN.

    Traced scores cannot be inspected; that is a ValueError too, so ``nan='raise'``
    never passes silently under ``jit``.
    """
    if isinstance(scores, jax.core.Tracer):
        raise ValueError(
            f"nan='raise' needs concrete {name}, but they are traced (inside jit/vmap/grad); "
            "use nan='smallest' there, or check the weights before the transformation"
        )
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        return
    count = int(jnp.isnan(scores).sum())
    if count:
        raise ValueError(
            f"{name} of shape {tuple(scores.shape)} contain {count} NaN value(s); "
            "fix the weights, or pass nan='smallest' to rank NaN below every number"
        )


def is_concrete(x: Any) -> bool:
    """True when ``x`` holds values (not a tracer), so value checks can run eagerly."""
    return not isinstance(x, jax.core.Tracer)


# Largest group size of the tile solvers (tiles are held as dense (m, m, T) arrays) and of
# the packed format (4-bit indices).
MAX_M = 16


def check_axes_pair(axes: Any, ndim: int, name: str = "axes") -> tuple[int, int]:
    """Normalises a pair of distinct axes of an array of rank ``ndim``.

    Raises:
      TypeError: ``axes`` is not a pair of ints.
      ValueError: an axis out of range, or both the same.
    """
    if isinstance(axes, str) or not isinstance(axes, tuple | list) or len(axes) != 2:
        raise TypeError(f"{name} must be a pair of ints, got {axes!r}")
    a0 = check_axis(axes[0], ndim, f"{name}[0]")
    a1 = check_axis(axes[1], ndim, f"{name}[1]")
    if a0 == a1:
        raise ValueError(f"{name} must name two different axes, got {tuple(axes)}")
    return a0, a1


def check_perm(perm: Any, size: int | None, name: str = "perm") -> jax.Array:
    """Validates a permutation of ``0..size-1`` and returns it as int32.

    A concrete ``perm`` is checked to be a permutation; a traced one cannot be (under
    ``jit`` it is trusted: validate it where it is made, e.g. with
    :func:`nmjax.masks.is_permutation` at mask refresh).

    Raises:
      TypeError: not an integer array.
      ValueError: wrong shape, or (concrete) repeated / out-of-range indices.
    """
    perm = _as_array(perm, name)
    dtype = perm.dtype
    if dtype == jnp.bool_ or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer index array, got dtype {dtype}")
    if perm.ndim != 1 or (size is not None and perm.shape[0] != size):
        want = f"({size},)" if size is not None else "(K,)"
        raise ValueError(f"{name} must have shape {want} (one index per output channel), "
                         f"got shape {tuple(perm.shape)}")
    if is_concrete(perm):
        values = np.asarray(perm)
        if not np.array_equal(np.sort(values), np.arange(values.shape[0])):
            raise ValueError(f"{name} of shape {tuple(perm.shape)} is not a permutation of "
                             f"0..{values.shape[0] - 1} (repeated or out-of-range indices)")
    return jnp.asarray(perm).astype(jnp.int32)


def check_key(key: Any, method: str) -> jax.Array:
    if key is None:
        raise ValueError(f"method={method!r} needs a PRNG key: pass key=jax.random.key(seed)")
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    if not (typed and key.shape == ()) and not (key.dtype == jnp.uint32 and key.shape == (2,)):
        raise TypeError(f"key must be a single PRNG key (jax.random.key(seed)), got dtype "
                        f"{key.dtype} and shape {tuple(key.shape)}")
    return key


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_count(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be a Python int, got {value!r} ({type(value).__name__})")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {name}={value}")
    return int(value)


# The step counter of nmjax.optim is int32: larger step numbers cannot be compared with it.
MAX_STEP = int(np.iinfo(np.int32).max)


def check_step(value: Any, name: str, low: int = 0) -> int:
    """A step number or count as a Python int in ``[low, 2**31 - 1]``.

    Raises:
      TypeError: not an integer.
      ValueError: below ``low``, or beyond int32 (the optimizer's step counter).
    """
    value = check_count(value, name, low)
    if value > MAX_STEP:
        raise ValueError(f"{name}={value} is beyond int32 (max {MAX_STEP}): the optimizer "
                         "counts steps in int32, so that step would never come")
    return value


def check_decay(decay: Any, name: str = "decay") -> float | jax.Array:
    """SR-STE's ``λ``: one check for every place that takes it (ops, layers, optimizer).

    A Python or NumPy real scalar comes back as a ``float``; a JAX scalar (concrete or
    traced, e.g. from a schedule inside a jitted step) as a float32 JAX scalar.

    Raises:
      TypeError: a bool, a non-scalar, or a non-real dtype.
      ValueError: a concrete value that is negative, NaN or infinite.
    """
    if isinstance(decay, bool) or isinstance(decay, np.bool_):
        raise TypeError(f"{name} must be a real scalar, got {decay!r}")
    host = not isinstance(decay, jax.Array)
    arr = np.asarray(decay) if host else decay
    if (getattr(arr, "ndim", None) != 0 or arr.dtype == np.bool_ or not (
            jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer))):
        raise TypeError(f"{name} must be a real scalar (a float, or a JAX scalar from a "
                        f"schedule), got {type(decay).__name__} {decay!r:.60}")
    if is_concrete(arr):
        value = float(arr)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be >= 0 and finite, got {value}")
    if host:
        return float(arr)
    return arr if arr.dtype == jnp.float32 else arr.astype(jnp.float32)
