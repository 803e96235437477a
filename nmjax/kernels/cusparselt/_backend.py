"""The ``"cusparselt"`` :class:`nmjax.backends.Backend`: products, what it supports, its
measured speedups."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nmjax import _checks
from nmjax.backends import Backend, Problem
from nmjax.kernels.cusparselt import _build, _ffi

Array = jax.Array

NAME = "cusparselt"
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MIN_COMPUTE_CAPABILITY = (8, 0)
# cuSPARSELt's size rules for 16-bit types: the structured operand's rows and columns are
# multiples of 16 (here in and out), the dense operand's of 8 (here rows).
ROW_MULTIPLE = 8
FEATURE_MULTIPLE = 16
TABLE_PATH = Path(__file__).with_name("speedups.json")
# Nearest measured GEMM shape counts when the summed |log2| distance of (M, N, K) is at most
# this (one factor of 2 in one dimension): further away, nothing is known.
MAX_TABLE_DISTANCE = 1.0


def fits_24(nm: tuple[int, int] | None) -> bool:
    """Whether every mask with this N:M pattern (N kept per group of M consecutive entries)
    keeps at most 2 of every aligned group of 4, which is what the 2:4 sparse tensor cores
    (and cuSPARSELt's compress) accept: 2:4, 1:4, 1:2, 2:8, 1:3... but not 4:8 (up to 4 of
    an aligned 4) or 2:6 (a 4 straddling two groups can hold 2 of each)."""
    if nm is None:
        return False
    n, m = nm
    period = math.lcm(4, m)  # the pattern of overlaps repeats with this period
    for start in range(0, period, 4):
        # the most a window can hold: from each group it overlaps, min(n, overlap)
        most = sum(min(n, max(0, min(start + 4, g + m) - max(start, g)))
                   for g in range(0, period, m))
        if most > 2:
            return False
    return True


def _cc(compute_capability: str | None) -> tuple[int, int] | None:
    if not compute_capability:
        return None
    try:
        major, minor = str(compute_capability).split(".")[:2]
        return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)
    except ValueError:
        return None


def supports(problem: Problem, *, availability: Callable[[], str | None] = _build.unavailable
             ) -> str | None:
    """``None`` when cuSPARSELt can run ``problem`` here, else the reason it cannot.

    Static checks first (device, dtype, declared N:M, shape multiples), then whether the
    FFI library is or can be built (``availability``, cached per process), so on a CPU
    machine nothing is looked up.
    """
    if problem.platform != "gpu":
        return (f"cuSPARSELt runs on NVIDIA GPUs of compute capability >= 8.0 (Ampere or newer); "
                f"this device is {problem.platform}")
    cc = _cc(problem.compute_capability)
    if cc is None or cc < MIN_COMPUTE_CAPABILITY:
        return (f"cuSPARSELt's 2:4 kernels need compute capability >= 8.0 (Ampere or newer); "
                f"{problem.device_kind} has {problem.compute_capability}")
    dtype = jnp.dtype(problem.dtype)
    if dtype not in DTYPES:
        return (f"dtype {dtype.name} is not supported: the cuSPARSELt backend takes bfloat16 or "
                "float16 (fp32 accumulation); cast, or use backend='reference'")
    axis = "in" if problem.direction == "forward" else "out"
    if problem.nm is None:
        return (f"the {problem.direction} mask's N:M pattern is not declared; cuSPARSELt needs "
                f"at most 2 kept in every aligned group of 4 along {axis} (declare e.g. (2, 4))")
    if not fits_24(problem.nm):
        return (f"declared N:M {problem.nm} can keep more than 2 of an aligned group of 4 "
                f"along {axis}; cuSPARSELt runs 2:4 (and 1:4, 1:2, 2:8, ...)")
    dims = {"rows": (problem.rows, ROW_MULTIPLE), "in": (problem.n_in, FEATURE_MULTIPLE),
            "out": (problem.n_out, FEATURE_MULTIPLE)}
    bad = [f"{name}={size} (multiple of {mult})" for name, (size, mult) in dims.items()
           if size <= 0 or size % mult]
    if bad:
        return ("cuSPARSELt needs rows a positive multiple of 8 and in, out positive multiples "
                f"of 16; got {', '.join(bad)}")
    return availability()


# --------------------------------------------------------------------------- speedup table


def load_table(path: Path | str = TABLE_PATH) -> tuple[dict, ...]:
    """The measured entries of a speedup table (written by ``benchmarks/gpu_cusparselt.py``).

    Each entry: ``device_kind``, ``direction``, ``dtype`` (name), ``permuted`` (bool),
    ``gemm`` ``[M, N, K]`` and ``speedup`` (dense XLA time over this backend's time).

    Raises:
      ValueError: the file is not such a table.
    """
    data = json.loads(Path(path).read_text())
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path} is not a cuSPARSELt speedup table: no 'entries' list")
    keys = {"device_kind", "direction", "dtype", "permuted", "gemm", "speedup"}
    for e in entries:
        if not isinstance(e, dict) or not keys <= set(e) or len(e["gemm"]) != 3:
            raise ValueError(f"{path}: entry {e!r:.120} lacks one of {sorted(keys)}")
    return tuple(entries)


def speedup(problem: Problem, table: Sequence[Mapping[str, Any]]) -> float:
    """Measured speedup over dense XLA for ``problem`` on this device kind: the entry of the
    nearest measured GEMM shape (same device kind, direction, dtype and permutation) within
    :data:`MAX_TABLE_DISTANCE`; ``0.0`` when there is none, so ``"auto"`` never picks an
    unmeasured shape."""
    dtype = jnp.dtype(problem.dtype).name
    gemm = problem.gemm
    if min(gemm) <= 0:
        return 0.0
    best, best_dist = 0.0, math.inf
    for e in table:
        if (e["device_kind"] != problem.device_kind or e["direction"] != problem.direction
                or e["dtype"] != dtype or bool(e["permuted"]) != problem.permuted):
            continue
        dist = sum(abs(math.log2(a / b)) for a, b in zip(e["gemm"], gemm, strict=True))
        if dist < best_dist:
            best, best_dist = float(e["speedup"]), dist
    return best if best_dist <= MAX_TABLE_DISTANCE else 0.0


# -------------------------------------------------------------------------------- products


def _check_operands(name: str, dense: Any, w: Any, mask: Any, dense_axis: str) -> None:
    for arg, value in ((name, dense), ("w", w)):
        if not hasattr(value, "dtype") or jnp.dtype(value.dtype) not in DTYPES:
            got = getattr(value, "dtype", type(value).__name__)
            raise TypeError(f"the cusparselt backend takes bfloat16 or float16 operands; {arg} "
                            f"has dtype {got}")
    if dense.dtype != w.dtype:
        raise TypeError(f"{name} and w must share a dtype, got {dense.dtype} and {w.dtype}")
    _checks.check_mask(mask, "mask")
    if w.ndim != 2 or dense.ndim != 2:
        raise ValueError(f"the cusparselt backend takes 2-D operands: {name} {tuple(dense.shape)}"
                         f", w {tuple(w.shape)}")
    n_in, n_out = w.shape
    k = n_in if dense_axis == "in" else n_out
    if dense.shape[1] != k:
        raise ValueError(f"{name} has shape {tuple(dense.shape)}; its last axis must equal "
                         f"{dense_axis}={k} of w {tuple(w.shape)}")
    if tuple(mask.shape) != tuple(w.shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, w has {tuple(w.shape)}; they "
                         "must match")
    rows = dense.shape[0]
    if rows <= 0 or rows % ROW_MULTIPLE or any(d <= 0 or d % FEATURE_MULTIPLE for d in w.shape):
        raise ValueError(f"cuSPARSELt needs rows a positive multiple of {ROW_MULTIPLE} and in, "
                         f"out positive multiples of {FEATURE_MULTIPLE}; got (rows, in, out)="
                         f"({rows}, {n_in}, {n_out})")


def _check_24(mask: Array, axis: int, name: str) -> None:
    """A concrete mask must keep at most 2 of every aligned group of 4 along ``axis``:
    cuSPARSELt's compress would otherwise drop kept weights without a word."""
    if not _checks.is_concrete(mask):
        return
    groups = np.moveaxis(np.asarray(mask), axis, -1)
    counts = groups.reshape(*groups.shape[:-1], -1, 4).sum(-1)
    if (counts > 2).any():
        where = tuple(int(i) for i in np.argwhere(counts > 2)[0])
        raise ValueError(f"{name} keeps {int(counts[where])} of 4 in aligned group {where[-1]} "
                         f"along axis {axis} (at {where}); the cusparselt backend needs at most "
                         "2 of every aligned 4")


def forward(x2d: Array, w: Array, fwd_mask: Array, *, search: bool = True,
            precision: Any = None) -> Array:
    """``x2d @ (w ⊙ fwd_mask)`` on the 2:4 sparse tensor cores via cuSPARSELt.

    Args:
      x2d: ``(rows, in)`` bfloat16 or float16; rows a multiple of 8.
      w: ``(in, out)``, ``x2d``'s dtype; in and out multiples of 16.
      fwd_mask: ``(in, out)`` bool, at most 2 kept in every aligned group of 4 along axis 0
        (``in``); checked when concrete.
      search: run cuSPARSELt's algorithm search on the first call of each shape (cached).
      precision: any ``lax.Precision`` is honoured: 16-bit products are exact in the fp32
        accumulator, so every precision gives this result.

    Returns:
      ``(rows, out)`` in ``x2d``'s dtype, fp32 accumulation.

    Raises:
      TypeError: a non-16-bit float operand, mixed dtypes, a non-boolean mask.
      ValueError: shapes that do not fit, sizes off cuSPARSELt's multiples, a concrete mask
        with more than 2 of 4 kept, no GPU in this process.
      BuildError: the FFI library is neither prebuilt nor buildable here.
    """
    del precision  # honoured: see above
    _check_operands("x2d", x2d, w, fwd_mask, "in")
    _check_24(fwd_mask, 0, "fwd_mask")
    w_masked = jnp.where(fwd_mask, w, jnp.zeros((), w.dtype))
    return _ffi.spmm(w_masked, x2d, direction=_ffi.FORWARD, search=search)


def input_grad(dy2d: Array, w: Array, bwd_mask: Array, perm: Array | None, *,
               search: bool = True, precision: Any = None) -> Array:
    """``dy2d @ (w ⊙ bwd_mask)ᵀ`` on the 2:4 sparse tensor cores via cuSPARSELt.

    With a Bi-Mask permutation the product contracts ``out`` in ``perm`` order,
    ``dy2d[:, perm] @ ((w ⊙ bwd_mask)[:, perm])ᵀ`` (the same value): the gathers run in XLA
    before the call, so the 2:4 groups are consecutive for the hardware.

    Args:
      dy2d: ``(rows, out)`` bfloat16 or float16; rows a multiple of 8.
      w: ``(in, out)``, ``dy2d``'s dtype; in and out multiples of 16.
      bwd_mask: ``(in, out)`` bool, at most 2 kept in every aligned group of 4 along axis 1
        (``out``), in ``perm`` order; checked when concrete.
      perm: ``(out,)`` int permutation of ``out``, or ``None``.
      search, precision: as in :func:`forward`.

    Returns:
      ``(rows, in)`` in ``dy2d``'s dtype, fp32 accumulation.

    Raises:
      TypeError, ValueError, BuildError: as :func:`forward`; ValueError for a ``perm`` that
        is not ``(out,)`` integers.
    """
    del precision  # honoured, as in forward
    _check_operands("dy2d", dy2d, w, bwd_mask, "out")
    if perm is None:
        _check_24(bwd_mask, 1, "bwd_mask")
    else:
        if not hasattr(perm, "dtype") or not jnp.issubdtype(perm.dtype, jnp.integer):
            raise TypeError(f"perm must be an integer array, got {getattr(perm, 'dtype', perm)}")
        if tuple(perm.shape) != (w.shape[1],):
            raise ValueError(f"perm has shape {tuple(perm.shape)}; it must be ({w.shape[1]},), a "
                             "permutation of w's out axis")
        if _checks.is_concrete(perm) and _checks.is_concrete(bwd_mask):
            _check_24(np.asarray(bwd_mask)[:, np.asarray(perm)], 1, "bwd_mask[:, perm]")
    w_masked = jnp.where(bwd_mask, w, jnp.zeros((), w.dtype))
    if perm is not None:
        w_masked, dy2d = jnp.take(w_masked, perm, axis=1), jnp.take(dy2d, perm, axis=1)
    return _ffi.spmm(w_masked, dy2d, direction=_ffi.INPUT_GRAD, search=search)


# -------------------------------------------------------------------------------- backend


def make_backend(table: Sequence[Mapping[str, Any]] = (), *, search: bool = True,
                 availability: Callable[[], str | None] = _build.unavailable) -> Backend:
    """A cuSPARSELt :class:`~nmjax.backends.Backend` with the given speedup table.

    Use :func:`cusparselt_backend` (cached, the package's measured table); this builds a
    fresh value, e.g. for a table measured on your own machine (:func:`load_table`).
    """
    table = tuple(table)
    return Backend(
        name=NAME,
        forward=functools.partial(forward, search=search),
        input_grad=functools.partial(input_grad, search=search),
        supports=functools.partial(supports, availability=availability),
        speedup=functools.partial(speedup, table=table),
    )


@functools.cache
def cusparselt_backend(search: bool = True) -> Backend:
    """The ``"cusparselt"`` backend: both sparse products of a linear layer through NVIDIA
    cuSPARSELt on any sm_80+ GPU (A100, A10, L4, L40, RTX 30/40, H100/H200).

    The same object on every call (a backend is hashed as a static argument). Nothing is
    built or loaded until a product is first traced; then the FFI library is built once
    into the user cache (see :mod:`nmjax.kernels.cusparselt`).

    Example::

      backend = cusparselt_backend()
      y = nmjax.ops.nm_dense(x, w, mask, backend=backend, fwd_nm=(2, 4), bwd_nm=(2, 4))

    Args:
      search: run cuSPARSELt's algorithm search on the first call of each shape (then
        cached per process); ``False`` takes its default heuristic choice.
    """
    return make_backend(load_table(), search=search)
