"""N:M-sparse dense and conv products, sparse in both directions of backprop (``custom_vjp``).

For ``w: (in, out)`` (a Flax Dense kernel) and boolean masks of ``w``'s shape:

* forward: ``Y = X · (W ⊙ fwd_mask)`` (``fwd_mask`` N:M along axis 0, ``in``);
* input gradient: ``dX = dY · (W ⊙ bwd_mask)ᵀ`` (``bwd_mask`` N:M along axis 1, ``out``; it
  defaults to ``fwd_mask``, which must then be transposable for a kernel to speed it up);
  with a Bi-Mask permutation ``perm`` of ``out`` the product runs in permuted order,
  ``dY[:, perm] · ((W ⊙ bwd_mask)[:, perm])ᵀ`` -- the same value up to summation order;
* weight gradient: dense, straight-through, ``dW = Xᵀ · dY``, plus the SR-STE term
  ``decay · (1 − fwd_mask) ⊙ W``.

Products run through a backend (:mod:`nmjax.backends`): a :class:`~nmjax.backends.Backend`
value, ``"reference"`` (masked dense ``jnp``, any platform, fp32 accumulation), a kernel
factory's name (``"pallas"``, ``"cusparselt"``), or ``"auto"``, which runs a kernel only where
its measured table says it beats dense XLA for the product and the reference elsewhere. An
explicitly requested backend that cannot run a product raises; nothing falls back silently.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nmjax import _checks, backends
from nmjax.backends import REFERENCE, Backend, Problem
from nmjax.masks import Masks

Array = jax.Array


def _check_nm_hint(pattern: Any, name: str) -> tuple[int, int] | None:
    if pattern is None:
        return None
    if not isinstance(pattern, tuple | list) or len(pattern) != 2:
        raise ValueError(f"{name} must be None or an (n, m) pair, got {pattern!r}")
    return _checks.check_nm(*pattern)


def _check_float(x: Any, name: str) -> Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array (bf16/fp16/fp32), got dtype {x.dtype}")
    return x


def _check_masks(w: Array, fwd_mask: Any, bwd_mask: Any) -> tuple[Array, Array]:
    fwd_mask = _checks.check_mask(fwd_mask, "fwd_mask")
    bwd_mask = fwd_mask if bwd_mask is None else _checks.check_mask(bwd_mask, "bwd_mask")
    for name, mask in (("fwd_mask", fwd_mask), ("bwd_mask", bwd_mask)):
        if tuple(mask.shape) != tuple(w.shape):
            raise ValueError(f"{name} has shape {tuple(mask.shape)}, but the kernel w has shape "
                             f"{tuple(w.shape)}; a mask must have the kernel's shape")
    return fwd_mask, bwd_mask


def _check_perm(perm: Any, length: int) -> Array | None:
    if perm is None:
        return None
    return _checks.check_perm(perm, length)


def _check_decay(decay: Any) -> Array | None:
    """``None`` for a concrete zero (the decay term is left out of the program), else a
    float32 scalar, which may be traced (a schedule may change it without recompiling)."""
    decay = _checks.check_decay(decay)
    if _checks.is_concrete(decay) and float(decay) == 0:
        return None
    return jnp.asarray(decay, jnp.float32)


def sr_ste_term(w: Array, fwd_mask: Array, decay: Array | None) -> Array | None:
    """SR-STE's ``decay · (1 − fwd_mask) ⊙ w`` in float32, or ``None`` for no decay.

    Exactly zero where ``fwd_mask`` keeps a weight and wherever ``decay == 0`` (also when
    ``decay`` is traced), so a non-finite pruned weight never turns a gradient into NaN.
    """
    if decay is None:
        return None
    pruned = ~fwd_mask & (decay != 0)
    return jnp.where(pruned, decay * w.astype(jnp.float32), 0.0)


def _decay_cotangent(decay):
    return None if decay is None else jnp.zeros_like(decay)


# -------------------------------------------------------------------------------- nm_dense


class _DenseConfig(NamedTuple):
    """The static half of a dense product (hashed as ``custom_vjp``'s one non-differentiable
    argument): the backend and problem of each product, and whether both are the reference,
    so that the forward masks the kernel for both products in one pass and the input
    gradient reads the kernel masked for it (the forward's own when the masks are one)."""

    fwd: tuple[Backend, Problem]
    bwd: tuple[Backend, Problem]
    shared: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _dense2d(x2d, w, fwd_mask, bwd_mask, perm, decay, cfg: _DenseConfig):
    backend, problem = cfg.fwd
    return backend.run(problem, x2d, w, fwd_mask)


def _dense2d_fwd(x2d, w, fwd_mask, bwd_mask, perm, decay, cfg: _DenseConfig):
    if cfg.shared:
        # One pass over W fewer per step: both masked kernels come from one read of W (XLA
        # fuses the two selects), and the input gradient keeps its masked kernel, not W and
        # its mask (one residual of W's size instead of W's and the masks').
        w_masked = backends.masked(w, fwd_mask)
        w_bwd = w_masked if bwd_mask is None else backends.masked(w, bwd_mask)
        y = backends.masked_forward(x2d, w_masked, precision=cfg.fwd[1].precision)
        w_res = w if decay is not None else None  # the decay term needs the dense W
        return y, (x2d, w_bwd, w_res, fwd_mask if decay is not None else None, None, perm,
                   decay)
    backend, problem = cfg.fwd
    y = backend.run(problem, x2d, w, fwd_mask)
    return y, (x2d, None, w, fwd_mask, fwd_mask if bwd_mask is None else bwd_mask, perm,
               decay)


def _dense2d_bwd(cfg: _DenseConfig, res, dy2d):
    x2d, w_masked, w, fwd_mask, bwd_mask, perm, decay = res
    backend, problem = cfg.bwd
    if cfg.shared:
        dx = backends.masked_input_grad(dy2d, w_masked, precision=problem.precision)
        dw_dtype = w_masked.dtype
    else:
        dx = backend.run(problem, dy2d, w, bwd_mask, perm)
        dw_dtype = w.dtype
    dw = jnp.matmul(x2d.T, dy2d, precision=problem.precision,
                    preferred_element_type=jnp.float32)
    term = sr_ste_term(w, fwd_mask, decay) if decay is not None else None
    dw = (dw if term is None else dw + term).astype(dw_dtype)
    return dx.astype(x2d.dtype), dw, None, None, None, _decay_cotangent(decay)


_dense2d.defvjp(_dense2d_fwd, _dense2d_bwd)


def nm_dense(
    x: Any,
    w: Any,
    fwd_mask: Any,
    bwd_mask: Any = None,
    *,
    perm: Any = None,
    decay: float | Array = 0.0,
    backend: str | Backend = "auto",
    precision: Any = None,
    fwd_nm: tuple[int, int] | None = None,
    bwd_nm: tuple[int, int] | None = None,
) -> Array:
    """``x @ (w ⊙ fwd_mask)`` whose input gradient uses ``bwd_mask`` and whose weight gradient
    is straight-through (SR-STE).

    >>> import jax, jax.numpy as jnp
    >>> from nmjax.masks import BiMask, transposable_mask
    >>> w = jax.random.normal(jax.random.key(0), (16, 8))       # (in, out)
    >>> x = jax.random.normal(jax.random.key(1), (4, 16))       # (..., in)
    >>> mask = transposable_mask(jnp.abs(w), 2, 4)              # 2:4 along in and out
    >>> nm_dense(x, w, mask).shape                              # (..., out)
    (4, 8)
    >>> dx, dw = jax.grad(lambda x, w: nm_dense(x, w, mask).sum(), (0, 1))(x, w)
    >>> bool(jnp.allclose(dw, x.T @ jnp.ones((4, 8))))          # straight-through
    True
    >>> nm_dense(x, w, BiMask(2, 4)(w)).shape                   # a Masks(fwd, bwd, perm)
    (4, 8)

    Args:
      x: ``(..., in)`` floating inputs; leading axes are batch.
      w: ``(in, out)`` floating kernel (the dense weights; masking happens here).
      fwd_mask: ``(in, out)`` bool; the forward product uses ``w ⊙ fwd_mask``. Or a
        :class:`nmjax.masks.Masks` ``(fwd, bwd, perm)``, which then gives all three (pass no
        ``bwd_mask`` or ``perm`` beside it).
      bwd_mask: ``(in, out)`` bool or ``None`` (= ``fwd_mask``); the input gradient uses
        ``w ⊙ bwd_mask``.
      perm: optional ``(out,)`` int permutation of ``out`` (Bi-Mask): the input-gradient
        product runs over ``w[:, perm]``, where ``bwd_mask`` is N:M in consecutive groups.
        A concrete ``perm`` is checked; a traced one cannot be, and an invalid one gives a
        wrong ``dx`` silently: validate permutations where they are made
        (:func:`nmjax.masks.is_permutation`, :meth:`nmjax.masks.Pattern.valid`;
        :func:`nmjax.optim.sparse` checks them at every refresh).
      decay: SR-STE ``λ`` ≥ 0: adds ``λ · (1 − fwd_mask) ⊙ w`` to the weight gradient. May
        be traced (a schedule); a concrete 0 leaves the term out, and a traced 0 gives
        exactly ``xᵀ·dy`` too (non-finite pruned weights do not leak into ``dw``).
      backend: ``"auto"`` (default), ``"reference"``, a kernel factory's name
        (``"pallas"``, ``"cusparselt"``) or an :class:`nmjax.backends.Backend`. A backend
        that cannot run a product raises ValueError (no silent fallback); ``"auto"`` picks
        per product (:func:`nmjax.backends.resolve`).
      precision: ``lax.Precision`` (its name, or a pair) for the products, as in
        ``nn.Dense``. Part of each product's :class:`~nmjax.backends.Problem`: the reference
        honours it, and a backend that cannot honour it refuses the product.
      fwd_nm, bwd_nm: the ``(n, m)`` pattern the caller guarantees ``fwd_mask`` (along
        ``in``) and ``bwd_mask`` (along ``out``, in ``perm`` order) satisfy. Only ``"auto"``
        reads them, to decide whether a sparse kernel may run a product; ``None`` (unknown)
        keeps that product on the reference.

    Returns:
      ``(..., out)`` in the promoted dtype of ``x`` and ``w``; products accumulate in fp32.
      Gradients: ``dx`` in ``x.dtype``, ``dw`` in ``w.dtype``; the masks, ``perm`` and
      ``decay`` get none. Works under ``jit``, ``vmap``, ``jax.checkpoint`` and nested
      ``grad`` (reverse mode only: ``custom_vjp``).

    Raises:
      TypeError: non-floating ``x``/``w``, non-boolean masks, non-integer ``perm``.
      ValueError: ``w`` not 2-D, ``x.shape[-1] != w.shape[0]``, a mask's shape differs from
        ``w``'s, ``perm`` is not a permutation of ``out``, ``decay < 0``, unknown or
        unavailable backend.
    """
    x = _check_float(x, "x")
    w = _check_float(w, "w")
    if w.ndim != 2:
        raise ValueError(f"w must be a 2-D kernel (in, out), got shape {tuple(w.shape)}")
    if x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last axis must equal the kernel's "
                         f"in = w.shape[0] = {w.shape[0]} (w has shape {tuple(w.shape)})")
    fwd_mask, bwd_mask, perm = _unpack_masks(fwd_mask, bwd_mask, perm)
    fwd_mask, bwd_mask = _check_masks(w, fwd_mask, bwd_mask)
    perm = _check_perm(perm, w.shape[1])
    decay = _check_decay(decay)
    backend = backends.check_backend(backend)
    fwd_nm = _check_nm_hint(fwd_nm, "fwd_nm")
    bwd_nm = _check_nm_hint(bwd_nm, "bwd_nm")
    dtype = jnp.promote_types(x.dtype, w.dtype)
    x, w = x.astype(dtype), w.astype(dtype)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, w.shape[0])
    fwd, bwd = _plan(backend, x2d.shape[0], w.shape, dtype, fwd_nm, bwd_nm, perm is not None,
                     _check_precision(precision))
    shared = fwd[0] is REFERENCE and bwd[0] is REFERENCE
    y = _dense2d(x2d, w, fwd_mask, None if bwd_mask is fwd_mask else bwd_mask, perm, decay,
                 _DenseConfig(fwd, bwd, shared))
    return y.reshape(*lead, w.shape[1])


def _unpack_masks(fwd_mask, bwd_mask, perm):
    if isinstance(fwd_mask, Masks):
        if bwd_mask is not None or perm is not None:
            raise ValueError("fwd_mask is a Masks (fwd, bwd, perm), which gives all three "
                             "masks; pass no bwd_mask or perm beside it")
        return fwd_mask.fwd, fwd_mask.bwd, fwd_mask.perm
    return fwd_mask, bwd_mask, perm


def _check_precision(precision: Any) -> Any:
    """``precision`` as a hashable value: ``None``, a ``lax.Precision`` (a name such as
    ``"highest"`` is read as one) or a pair of them."""
    def one(p):
        if p is None or isinstance(p, lax.Precision):
            return p
        if isinstance(p, str):
            try:
                return lax.Precision(p)
            except ValueError as e:  # an unknown name
                raise TypeError(bad) from e
        raise TypeError(bad)

    bad = (f"precision must be None, a jax.lax.Precision, its name or a pair of them, got "
           f"{precision!r}")

    if isinstance(precision, tuple | list) and len(precision) == 2:
        return (one(precision[0]), one(precision[1]))
    return one(precision)


def _plan(backend, rows, w_shape, dtype, fwd_nm, bwd_nm, permuted, precision=None):
    """``((Backend, Problem), (Backend, Problem))`` for the forward and input-gradient
    products (static: they are hashed as ``custom_vjp`` non-differentiable arguments)."""
    platform, kind, cc = backends.device_facts()
    n_in, n_out = w_shape
    fwd = Problem("forward", rows, n_in, n_out, jnp.dtype(dtype), platform, kind, cc, fwd_nm,
                  False, precision)
    bwd = Problem("input_grad", rows, n_in, n_out, jnp.dtype(dtype), platform, kind, cc,
                  bwd_nm, permuted, precision)
    return (backends.resolve(backend, fwd), fwd), (backends.resolve(backend, bwd), bwd)


def _check_shape(shape: Any, name: str) -> tuple[int, ...]:
    if isinstance(shape, str) or not isinstance(shape, Sequence) or not all(
            isinstance(d, int | np.integer) and not isinstance(d, bool) and d >= 0
            for d in shape):
        raise TypeError(f"{name} must be a sequence of non-negative ints, got {shape!r}")
    return tuple(int(d) for d in shape)


def which_backends(
    x_shape: Sequence[int], w_shape: Sequence[int], *, dtype: Any = jnp.float32,
    fwd_nm: tuple[int, int] | None = None, bwd_nm: tuple[int, int] | None = None,
    permuted: bool = False, backend: str | Backend = "auto",
) -> tuple[str, str]:
    """Names of the backends :func:`nm_dense` runs the forward and input-gradient products
    of ``x: x_shape @ w: w_shape`` with on the default device (for reports and tests).

    >>> which_backends((256, 768), (768, 3072), fwd_nm=(2, 4), bwd_nm=(2, 4))  # on a CPU
    ('reference', 'reference')
    """
    x_shape, w_shape = _check_shape(x_shape, "x_shape"), _check_shape(w_shape, "w_shape")
    if len(w_shape) != 2:
        raise ValueError(f"w_shape must be a 2-D kernel shape (in, out), got {w_shape}: "
                         "which_backends describes nm_dense's products (a conv runs the "
                         "reference unless it is 1x1, whose kernel is (I, O))")
    if not x_shape or x_shape[-1] != w_shape[0]:
        raise ValueError(f"x_shape {x_shape} must end with the kernel's in = {w_shape[0]} "
                         f"(w_shape {w_shape})")
    rows = int(np.prod(x_shape[:-1]))
    fwd, bwd = _plan(backends.check_backend(backend), rows, tuple(w_shape), dtype,
                     _check_nm_hint(fwd_nm, "fwd_nm"), _check_nm_hint(bwd_nm, "bwd_nm"),
                     bool(permuted))
    return fwd[0].name, bwd[0].name


# --------------------------------------------------------------------------------- nm_conv


class _ConvSpec(NamedTuple):
    strides: tuple[int, ...]
    padding: str | tuple[tuple[int, int], ...]
    lhs_dilation: tuple[int, ...]
    rhs_dilation: tuple[int, ...]
    feature_group_count: int
    precision: Any


def _conv(x, w, spec: _ConvSpec, out_dtype=jnp.float32):
    nd = w.ndim - 2
    spatial = "DHW"[-nd:] if nd <= 3 else None
    if spatial is None:
        raise ValueError(f"nm_conv supports 1-3 spatial dims, got kernel shape {w.shape}")
    dn = lax.conv_dimension_numbers(x.shape, w.shape,
                                    (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
    return lax.conv_general_dilated(
        x, w, spec.strides, spec.padding, lhs_dilation=spec.lhs_dilation,
        rhs_dilation=spec.rhs_dilation, dimension_numbers=dn,
        feature_group_count=spec.feature_group_count, precision=spec.precision,
        preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _conv_vjp(x, w, fwd_mask, bwd_mask, perm, decay, spec):
    return _conv(x, backends.masked(w, fwd_mask), spec).astype(x.dtype)


def _conv_vjp_fwd(x, w, fwd_mask, bwd_mask, perm, decay, spec):
    return _conv_vjp(x, w, fwd_mask, bwd_mask, perm, decay, spec), (
        x, w, fwd_mask, bwd_mask, perm, decay)


def _conv_vjp_bwd(spec, res, dy):
    x, w, fwd_mask, bwd_mask, perm, decay = res
    dy32 = dy.astype(jnp.float32)
    # A Bi-Mask ``perm`` orders the contraction over O for kernels; this reference product
    # does not depend on that order, so it skips the gathers (as reference_input_grad does).
    del perm
    wb = backends.masked(w, bwd_mask)
    _, vjp_x = jax.vjp(lambda x_: _conv(x_, wb, spec), x)
    (dx,) = vjp_x(dy32)
    _, vjp_w = jax.vjp(lambda w_: _conv(x, w_, spec), w)
    (dw,) = vjp_w(dy32)
    dw = dw.astype(jnp.float32)
    term = sr_ste_term(w, fwd_mask, decay)
    dw = dw if term is None else dw + term
    return dx.astype(x.dtype), dw.astype(w.dtype), None, None, None, _decay_cotangent(decay)


_conv_vjp.defvjp(_conv_vjp_fwd, _conv_vjp_bwd)


def _int_tuple(value: Any, nd: int, name: str) -> tuple[int, ...]:
    given = value
    if value is None:
        value = 1
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        value = (int(value),) * nd
    if isinstance(value, str | bool) or not isinstance(value, Sequence) or not all(
            isinstance(v, int | np.integer) and not isinstance(v, bool) for v in value):
        raise TypeError(f"{name} must be a positive int or {nd} positive ints, got {given!r}")
    value = tuple(int(v) for v in value)
    if len(value) != nd or any(v < 1 for v in value):
        raise ValueError(f"{name} must be a positive int or {nd} positive ints, got {given!r}")
    return value


def _canon_padding(padding: Any, nd: int) -> str | tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID", "SAME_LOWER"):
            raise ValueError(f"padding must be 'SAME', 'VALID', 'SAME_LOWER', an int or "
                             f"(low, high) pairs, got {padding!r} (nmjax.nn layers handle "
                             "'CIRCULAR', 'REFLECT' and 'CAUSAL' by padding the input)")
        return padding.upper()
    if isinstance(padding, int | np.integer):
        return ((int(padding), int(padding)),) * nd
    pads = tuple(padding)
    if len(pads) != nd:
        raise ValueError(f"padding needs {nd} entries (one per spatial dim), got {padding!r}")
    out = []
    for p in pads:
        if isinstance(p, int | np.integer) and not isinstance(p, bool):
            out.append((int(p), int(p)))
        elif isinstance(p, Sequence) and len(p) == 2 and all(
                isinstance(q, int | np.integer) and not isinstance(q, bool) for q in p):
            out.append((int(p[0]), int(p[1])))
        else:
            raise ValueError(f"padding entries must be an int or a (low, high) pair of ints, "
                             f"got {p!r} in padding={padding!r}")
    return tuple(out)


def nm_conv(
    x: Any,
    w: Any,
    fwd_mask: Any,
    bwd_mask: Any = None,
    *,
    strides: int | Sequence[int] = 1,
    padding: str | int | Sequence[Any] = "SAME",
    lhs_dilation: int | Sequence[int] | None = None,
    rhs_dilation: int | Sequence[int] | None = None,
    feature_group_count: int = 1,
    perm: Any = None,
    decay: float | Array = 0.0,
    backend: str | Backend = "auto",
    precision: Any = None,
    fwd_nm: tuple[int, int] | None = None,
    bwd_nm: tuple[int, int] | None = None,
) -> Array:
    """A channels-last convolution with an ``HWIO`` kernel under the :func:`nm_dense` contract.

    The implicit GEMM contracts over ``H·W·I`` (forward: ``fwd_mask`` N:M along ``I``, axis
    ``-2``) and its input gradient over ``O`` (``bwd_mask`` N:M along ``O``, axis ``-1``).
    The weight gradient is straight-through plus ``decay · (1 − fwd_mask) ⊙ w``. A 1×1
    convolution with unit strides and dilations, no padding and one feature group is a dense
    product and runs through :func:`nm_dense` (and its backends); the others run the
    reference (``lax.conv_general_dilated`` on masked kernels, fp32 accumulation).

    >>> import jax, jax.numpy as jnp
    >>> from nmjax.masks import nm_mask
    >>> w = jax.random.normal(jax.random.key(0), (3, 3, 16, 32))   # HWIO
    >>> mask = nm_mask(jnp.abs(w), 2, 4, axis=2)                   # 2:4 along I
    >>> nm_conv(jnp.ones((2, 8, 8, 16)), w, mask).shape             # (N, H, W, O)
    (2, 8, 8, 32)

    Args:
      x: ``(N, *spatial, C)`` floating inputs, ``C = I · feature_group_count``.
      w: ``(*window, I, O)`` floating kernel, 1 to 3 spatial dims.
      fwd_mask, bwd_mask: bool, ``w.shape``; ``bwd_mask=None`` means ``fwd_mask``;
        ``fwd_mask`` may be a :class:`nmjax.masks.Masks` as in :func:`nm_dense`.
      strides, padding, lhs_dilation, rhs_dilation, feature_group_count: as in
        ``lax.conv_general_dilated`` (``padding``: ``"SAME"``, ``"VALID"``, an int or one
        ``(low, high)`` pair per spatial dim).
      perm: optional ``(O,)`` int permutation of the output channels (Bi-Mask order).
      decay, backend, precision, fwd_nm, bwd_nm: as in :func:`nm_dense`.

    Returns:
      ``(N, *out_spatial, O)`` in the promoted dtype of ``x`` and ``w``.

    Raises:
      TypeError, ValueError: as :func:`nm_dense`, plus rank/channel mismatches, bad
        strides/padding, and a non-reference backend requested for a convolution that is
        not 1×1.
    """
    x = _check_float(x, "x")
    w = _check_float(w, "w")
    if not 3 <= w.ndim <= 5:
        raise ValueError(f"w must be an HWIO-style kernel (*window, I, O) with 1-3 spatial "
                         f"dims, got shape {tuple(w.shape)}")
    nd = w.ndim - 2
    if x.ndim != nd + 2:
        raise ValueError(f"x has shape {tuple(x.shape)}; a kernel of shape {tuple(w.shape)} "
                         f"needs inputs (N, {nd} spatial dims, C) of rank {nd + 2}")
    if not isinstance(feature_group_count, int | np.integer) or feature_group_count < 1:
        raise ValueError(f"feature_group_count must be a positive int, got "
                         f"{feature_group_count!r}")
    if x.shape[-1] != w.shape[-2] * feature_group_count:
        raise ValueError(f"x has {x.shape[-1]} channels (shape {tuple(x.shape)}); the kernel "
                         f"{tuple(w.shape)} with feature_group_count={feature_group_count} "
                         f"needs I * groups = {w.shape[-2] * feature_group_count}")
    fwd_mask, bwd_mask, perm = _unpack_masks(fwd_mask, bwd_mask, perm)
    fwd_mask, bwd_mask = _check_masks(w, fwd_mask, bwd_mask)
    perm = _check_perm(perm, w.shape[-1])
    decay_arg = decay
    decay = _check_decay(decay)
    backend = backends.check_backend(backend)
    spec = _ConvSpec(_int_tuple(strides, nd, "strides"), _canon_padding(padding, nd),
                     _int_tuple(lhs_dilation, nd, "lhs_dilation"),
                     _int_tuple(rhs_dilation, nd, "rhs_dilation"), int(feature_group_count),
                     _check_precision(precision))
    pointwise = (all(k == 1 for k in w.shape[:-2]) and set(spec.strides) == {1}
                 and set(spec.lhs_dilation) == {1} and set(spec.rhs_dilation) == {1}
                 and spec.feature_group_count == 1
                 and (isinstance(spec.padding, str) or all(p == (0, 0) for p in spec.padding)))
    if pointwise:
        shape2d = w.shape[-2:]
        return nm_dense(x, w.reshape(shape2d), fwd_mask.reshape(shape2d),
                        bwd_mask.reshape(shape2d), perm=perm, decay=decay_arg, backend=backend,
                        precision=precision, fwd_nm=fwd_nm, bwd_nm=bwd_nm)
    if backend not in ("auto", REFERENCE):
        raise ValueError(f"backend {backend.name!r} has no convolution kernel: only 1x1 "
                         f"convolutions (unit strides/dilations, one group) route to nm_dense; "
                         f"kernel shape {tuple(w.shape)} needs backend='reference' or 'auto'")
    dtype = jnp.promote_types(x.dtype, w.dtype)
    return _conv_vjp(x.astype(dtype), w.astype(dtype), fwd_mask, bwd_mask, perm, decay, spec)


__all__ = [
    "nm_conv",
    "nm_dense",
    "sr_ste_term",
    "which_backends",
]
