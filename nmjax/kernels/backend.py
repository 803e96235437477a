"""The ``"pallas"`` backend of :mod:`nmjax.ops`: pack + sparse-wgmma GEMM on sm_90.

Registered with :func:`nmjax.ops.register_backend` when :mod:`nmjax.kernels` is
imported on an sm_90 GPU. Both sparse products of a linear layer ``w: (in, out)``
run the same kernel:

* forward ``Y = X·(W⊙fwd)`` as ``Yᵀ = (W⊙fwd)ᵀ·Xᵀ`` (A packed along ``in``);
* input gradient ``dX = dY·(W⊙bwd)ᵀ`` as ``dXᵀ = (W⊙bwd)·dYᵀ`` (A packed along ``out``,
  in ``perm`` order for Bi-Mask).

``W`` is packed on every call (a fused jnp program, cheap next to the GEMM). Requires
bf16 operands, 2:4 masks (at most two kept per group; more is not representable and
:func:`sparse_dense_24` raises on a concrete mask) and dims that are multiples of the
kernel tiles. ``"auto"`` claims a product only where :data:`SPEEDUP_TABLE` (measured on
an H100, ``benchmarks/results/kernels.md``) says the kernel beats dense XLA.
"""

from __future__ import annotations

import functools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np

from nmjax.kernels import pack as _pack

_TILE = 128

# (M, N, K) of the sparse GEMM -> measured sparse/dense time ratio (>1: kernel faster).
# M = out (forward) or in (input grad), N = rows of x, K = the contracted dim.
# Measured on an H100, 2026-11-22 (benchmarks/results/kernels.md), transposed-out kernel (the
# layout this backend runs) vs dense XLA in the same run. The kernel in use is still v1 (the
# warp-specialised v2 did not run correctly yet), slower than dense everywhere, so "auto"
# never picks it.
SPEEDUP_TABLE: dict[tuple[int, int, int], float] = {
    (2048, 2048, 2048): 0.85, (4096, 4096, 4096): 0.87, (8192, 8192, 8192): 0.82,
    (3072, 8192, 768): 0.74, (768, 8192, 3072): 0.83, (4096, 8192, 4096): 0.79,
    (16384, 8192, 4096): 0.81, (4096, 8192, 16384): 0.80,
}


def _kernel():
    return sys.modules["nmjax.kernels.sparse_matmul"]


# Kernel configuration the backend runs (``None``: ``SparseMatmulConfig()``'s defaults).
# Shapes the configuration's CTA tile does not divide run the 1-warpgroup fallback.
DEFAULT_CONFIG = None


def _config_for(m: int, n: int, k: int):
    s = _kernel()
    cfg = DEFAULT_CONFIG or s.SparseMatmulConfig()
    try:
        cfg.check(m, n, k)
        return cfg
    except ValueError:
        return s.FALLBACK_CONFIG


def _matmul(a, b_t):
    m, k = a.values.shape[0], 2 * a.values.shape[1]
    cfg = _config_for(m, b_t.shape[0], k)
    return _kernel().sparse_matmul_24(a, b_t, config=cfg, transpose_out=True)


def sm90_unavailable() -> str | None:
    """``None`` on an sm_90 (H100/H200) GPU, else why the kernel cannot run here."""
    try:
        dev = jax.devices()[0]
    except RuntimeError as e:  # pragma: no cover
        return str(e)
    cc = getattr(dev, "compute_capability", None)
    if dev.platform != "gpu" or cc not in ("9.0", "9.0a"):
        return (f"the sparse-wgmma kernel needs an sm_90 GPU (H100/H200); this device is "
                f"{dev.platform} ({getattr(dev, 'device_kind', '?')}, compute capability {cc})")
    return None


def _check_24(mask: jax.Array, axis: int) -> None:
    if isinstance(mask, jax.core.Tracer):
        return
    groups = np.moveaxis(np.asarray(mask), axis, -1).reshape(-1, 4)
    if (groups.sum(-1) > 2).any():
        raise ValueError(f"the pallas backend needs a 2:4 mask along axis {axis}; "
                         "some group of 4 keeps more than 2")


def _check_shapes(x2d: jax.Array, w: jax.Array) -> None:
    if x2d.dtype != jnp.bfloat16 or w.dtype != jnp.bfloat16:
        raise ValueError(f"the pallas backend takes bf16 operands, got {x2d.dtype}, {w.dtype}; "
                         "cast to bf16 or use backend='reference'")
    dims = (x2d.shape[0], *w.shape)
    if any(d % _TILE for d in dims):
        raise ValueError(f"the pallas backend needs rows, in and out to be multiples of "
                         f"{_TILE}, got (rows, in, out)={dims}")


def sparse_dense_24(x2d: jax.Array, w: jax.Array, fwd_mask: jax.Array) -> jax.Array:
    """``x2d @ (w ⊙ fwd_mask)``: ``(rows, in) x (in, out) -> (rows, out)`` via the kernel.

    ``fwd_mask`` is 2:4 along axis 0 (``in``); bf16 in and out, fp32 accumulation.
    """
    _check_shapes(x2d, w)
    _check_24(fwd_mask, 0)
    a = _pack.pack_24(w.T, fwd_mask.T)  # Wᵀ (out, in) packed along in
    return _matmul(a, x2d)


def sparse_dense_24_input_grad(
    dy2d: jax.Array, w: jax.Array, bwd_mask: jax.Array, perm: jax.Array | None = None
) -> jax.Array:
    """``dy2d @ (w ⊙ bwd_mask)ᵀ``: ``(rows, out) -> (rows, in)`` via the kernel.

    ``bwd_mask`` is 2:4 along axis 1 (``out``), in ``perm`` order when ``perm`` is given.
    """
    _check_shapes(dy2d, w)
    if perm is not None:
        dy2d, w, bwd_mask = dy2d[:, perm], w[:, perm], bwd_mask[:, perm]
    _check_24(bwd_mask, 1)
    a = _pack.pack_24(w, bwd_mask)  # W (in, out) packed along out
    return _matmul(a, dy2d)


def claims(problem) -> bool:
    """``"auto"`` policy: bf16, declared 2:4, sm_90, tile multiples, and measured faster."""
    if problem.platform != "gpu" or problem.nm != (2, 4) or problem.dtype != jnp.bfloat16:
        return False
    if not any(k in str(problem.device_kind) for k in ("H100", "H200", "H800", "GH200")):
        return False
    rows = problem.lhs_shape[0]
    n_in, n_out = problem.w_shape
    if any(d % _TILE for d in (rows, n_in, n_out)):
        return False
    if problem.direction == "forward":
        gemm = (n_out, rows, n_in)
    else:
        gemm = (n_in, rows, n_out)
    return measured_speedup(gemm) > 1.0


def measured_speedup(gemm: tuple[int, int, int]) -> float:
    """Speedup of the nearest measured GEMM shape (log distance); 0 if none measured."""
    if not SPEEDUP_TABLE:
        return 0.0

    def dist(shape):
        return sum(abs(math.log2(a / b)) for a, b in zip(shape, gemm, strict=True))

    nearest = min(SPEEDUP_TABLE, key=dist)
    return SPEEDUP_TABLE[nearest] if dist(nearest) <= 1.0 else 0.0


def _supports(problem) -> str | None:
    """Why the kernel cannot run ``problem`` (``None``: it can)."""
    if problem.platform != "gpu" or problem.compute_capability not in ("9.0", "9.0a"):
        return (f"the sparse-wgmma kernel needs an sm_90 GPU (H100/H200); this device is "
                f"{problem.platform} ({problem.device_kind}, compute capability "
                f"{problem.compute_capability})")
    if problem.dtype != jnp.bfloat16:
        return f"it takes bf16 operands, got {jnp.dtype(problem.dtype).name}"
    if problem.nm != (2, 4):
        return f"it needs a mask declared 2:4 along the contraction axis, got {problem.nm}"
    dims = (problem.rows, problem.n_in, problem.n_out)
    if any(d % _TILE for d in dims):
        return f"rows, in and out must be multiples of {_TILE}, got {dims}"
    return None


def _speedup(problem) -> float:
    return measured_speedup(problem.gemm)


@functools.cache
def pallas_backend(config=None):
    """The Pallas sparse-wgmma GEMM as an :class:`nmjax.backends.Backend` (cached per
    ``config``; ``None``: the default tiling).

    Runs on sm_90 GPUs only; elsewhere its ``supports`` gives the reason, which
    ``backend="pallas"`` raises. Importing this module registers nothing.
    """
    from nmjax.backends import Backend

    if config is not None and not isinstance(config, _kernel().SparseMatmulConfig):
        raise TypeError(f"config must be a SparseMatmulConfig, got {type(config).__name__}")
    return Backend(name="pallas", forward=sparse_dense_24, input_grad=sparse_dense_24_input_grad,
                   supports=_supports, speedup=_speedup)
