"""The Pallas sparse-wgmma GEMM as an :class:`nmjax.backends.Backend`, and its measured table.

Both sparse products of a linear layer ``w: (in, out)`` run the same kernel:

* forward ``Y = X·(W⊙fwd)`` as ``Yᵀ = (W⊙fwd)ᵀ·Xᵀ`` (A = ``Wᵀ`` packed along ``in``);
* input gradient ``dX = dY·(W⊙bwd)ᵀ`` as ``dXᵀ = (W⊙bwd)·dYᵀ`` (A = ``W`` packed along
  ``out``, in ``perm`` order for Bi-Mask).

``W`` is packed on every call (one jitted jnp program, see :func:`nmjax.kernels.pack_24`);
packed inference skips that: ``forward_packed`` takes the kernel's canonical packed form
(:mod:`nmjax.format`) and reshuffles it into the operand (:func:`nmjax.kernels.forward_operand`).

The measured table (``measured.json`` beside this module) is written by
``benchmarks/gpu_check.sh`` on a GPU, never by hand: per device kind, per kernel variant and
GEMM shape ``(M, N, K)``, the time of dense XLA bf16 over the kernel's (transposed output,
the layout this backend runs) in the same process. :attr:`Backend.speedup` reads it, so
``backend="auto"`` runs the kernel only where the table says it beats dense XLA.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from importlib import resources
from typing import Any

import jax
import jax.numpy as jnp

from nmjax.format import PackedNM
from nmjax.kernels._common import SparseMatmulConfig
from nmjax.kernels._matmul import sparse_matmul_24
from nmjax.kernels._pack import forward_operand, pack_24

MEASURED_FILE = "measured.json"
_NEAR = 1.0  # a measured shape counts for a GEMM within this sum of |log2| ratios per dim


@functools.cache
def measured_table() -> dict[str, Any]:
    """The measured table: ``{device_kind: {"date", "command", "entries": [...]}}``; each
    entry ``{"variant", "config", "gemm": [M, N, K], "ratio", "rel_err"}``. Empty when no
    table ships (then no kernel claims any shape under ``"auto"``)."""
    try:
        text = resources.files("nmjax.kernels").joinpath(MEASURED_FILE).read_text()
    except FileNotFoundError:
        return {}
    return json.loads(text).get("devices", {})


def _entries(device_kind: str, config: SparseMatmulConfig | None, gemm):
    """``(ratio, config)`` of the measured entries nearest to ``gemm`` on this device (of
    ``config`` only, when given) whose config can run ``gemm``."""
    table = measured_table().get(device_kind, {})
    found = []
    for e in table.get("entries", []):
        try:
            cfg = SparseMatmulConfig(**e["config"])
        except (TypeError, ValueError):  # a table from another version of the config
            continue
        if (config is not None and cfg != config) or cfg.shape_error(*gemm):
            continue
        dist = sum(abs(math.log2(a / b)) for a, b in zip(e["gemm"], gemm, strict=True))
        if dist <= _NEAR:
            found.append((dist, -float(e["ratio"]), cfg))
    if not found:
        return []
    best = min(d for d, _, _ in found)
    return sorted((-r, c) for d, r, c in found if d == best)


def measured_config(gemm: tuple[int, int, int]) -> SparseMatmulConfig:
    """The kernel ``pallas_backend()`` runs for the GEMM ``(M, N, K)`` on the default device:
    the fastest variant the measured table has near that shape, else
    ``SparseMatmulConfig()`` (v1)."""
    from nmjax.backends import device_facts

    best = _entries(device_facts()[1], None, tuple(gemm))
    return best[-1][1] if best else SparseMatmulConfig()


def _problem_error(problem, config: SparseMatmulConfig | None) -> str | None:
    if problem.platform != "gpu" or problem.compute_capability not in ("9.0", "9.0a"):
        return (f"the sparse-wgmma kernel needs an sm_90 GPU (H100/H200); the default device "
                f"is {problem.platform} ({problem.device_kind}, compute capability "
                f"{problem.compute_capability})")
    if jnp.dtype(problem.dtype) != jnp.bfloat16:
        return f"it takes bf16 operands, got {jnp.dtype(problem.dtype).name}"
    if problem.nm not in (None, (2, 4)):
        return f"it runs 2:4 masks only, the product's mask is declared {problem.nm}"
    cfg = config or SparseMatmulConfig()
    reason = cfg.shape_error(*problem.gemm)
    if reason and config is None and _entries(problem.device_kind, None, problem.gemm):
        reason = None  # a measured variant runs it
    if reason:
        return f"the GEMM (M, N, K)={problem.gemm} does not fit the kernel: {reason}"
    return None


def _check_operands(lhs: jax.Array, w: jax.Array, lhs_name: str) -> None:
    if lhs.dtype != jnp.bfloat16 or w.dtype != jnp.bfloat16:
        raise ValueError(f"the pallas backend takes bf16 operands, got {lhs_name} "
                         f"{lhs.dtype} and w {w.dtype}; cast to bf16 or use "
                         "backend='reference'")


class _Pallas:
    """The backend's functions for one config (``None``: per shape, the measured best);
    ``branch`` and ``interpret`` as in :func:`sparse_matmul_24` (the tests run the emulated
    kernel in interpret mode on a CPU)."""

    def __init__(self, config: SparseMatmulConfig | None, branch: str = "ptx",
                 interpret: Any = False):
        self.config = config
        self.branch = branch
        self.interpret = interpret

    def _config(self, gemm) -> SparseMatmulConfig:
        return self.config if self.config is not None else measured_config(gemm)

    def _matmul(self, packed, b_t):
        m, k = packed.values.shape[0], 2 * packed.values.shape[1]
        cfg = self._config((m, b_t.shape[0], k))
        return sparse_matmul_24(packed, b_t, config=cfg, transpose_out=True,
                                branch=self.branch, interpret=self.interpret)

    def forward(self, x2d: jax.Array, w: jax.Array, fwd_mask: jax.Array, *,
                precision: Any = None) -> jax.Array:
        """``x2d @ (w ⊙ fwd_mask)``: ``(rows, in) x (in, out) -> (rows, out)``, bf16.

        ``fwd_mask`` is 2:4 along axis 0 (``in``); a concrete mask is checked. Every
        ``precision`` is honoured: bf16 products are exact in the fp32 accumulator, so
        ``DEFAULT`` and ``HIGHEST`` give this same result."""
        del precision  # honoured: see above
        _check_operands(x2d, w, "x2d")
        return self._matmul(pack_24(w.T, fwd_mask.T), x2d)  # A = Wᵀ (out, in) along in

    def forward_packed(self, x2d: jax.Array, packed: PackedNM, *,
                       precision: Any = None) -> jax.Array:
        """``x2d @ unpack(packed)``: ``(rows, in) -> (rows, out)``, bf16, from the kernel held
        packed (a 2:4 :class:`~nmjax.format.PackedNM` of ``w: (in, out)`` grouped along
        ``in``). The A operand ``Wᵀ`` is a reshuffle of the packed values and metadata
        (:func:`~nmjax.kernels.forward_operand`): no dense weight is built. ``precision``
        as in :meth:`forward`."""
        del precision
        if not isinstance(packed, PackedNM) or packed.axis != 0 or len(packed.shape) != 2:
            raise ValueError(f"forward_packed takes the PackedNM of a kernel (in, out) grouped "
                             f"along in (axis 0), got {type(packed).__name__} "
                             f"{getattr(packed, 'shape', '')}, axis "
                             f"{getattr(packed, 'axis', None)}")
        _check_operands(x2d, packed.values, "x2d")
        return self._matmul(forward_operand(packed), x2d)  # A = Wᵀ (out, in) along in

    def input_grad(self, dy2d: jax.Array, w: jax.Array, bwd_mask: jax.Array,
                   perm: jax.Array | None = None, *, precision: Any = None) -> jax.Array:
        """``dy2d @ (w ⊙ bwd_mask)ᵀ``: ``(rows, out) -> (rows, in)``, bf16.

        ``bwd_mask`` is 2:4 along axis 1 (``out``), in ``perm`` order when given; every
        ``precision`` is honoured, as in :meth:`forward`."""
        del precision
        _check_operands(dy2d, w, "dy2d")
        if perm is not None:
            dy2d, w, bwd_mask = dy2d[:, perm], w[:, perm], bwd_mask[:, perm]
        return self._matmul(pack_24(w, bwd_mask), dy2d)  # A = W (in, out) along out

    def supports(self, problem) -> str | None:
        return _problem_error(problem, self.config)

    def speedup(self, problem) -> float:
        if problem.nm != (2, 4) or _problem_error(problem, self.config):
            return 0.0
        found = _entries(problem.device_kind, self.config, problem.gemm)
        return found[-1][0] if found else 0.0


def pallas_backend(config: SparseMatmulConfig | None = None):
    """The Pallas sparse-wgmma GEMM as an :class:`nmjax.backends.Backend`.

    >>> from nmjax.kernels import VARIANTS
    >>> backend = pallas_backend(VARIANTS["ws"])
    >>> backend is pallas_backend(VARIANTS["ws"]), backend.name
    (True, 'pallas')

    Args:
      config: the kernel for every product; ``None``: per GEMM shape, the variant the
        measured table says is fastest on the default device, else ``SparseMatmulConfig()``.

    Returns:
      A :class:`nmjax.backends.Backend`, cached per ``config`` (it is hashed as a static
      argument). It runs on sm_90 GPUs only: elsewhere, and for shapes the config does not
      tile, its ``supports`` gives the reason, which ``backend=`` raises. Building it
      registers nothing.

    Raises:
      TypeError: ``config`` is not a :class:`SparseMatmulConfig` or ``None``.
    """
    if config is not None and not isinstance(config, SparseMatmulConfig):
        raise TypeError(f"config must be a SparseMatmulConfig or None, got "
                        f"{type(config).__name__} {config!r:.80}")
    return _cached_backend(config)


@functools.cache
def _cached_backend(config: SparseMatmulConfig | None):
    from nmjax.backends import Backend

    impl = _Pallas(config)
    return Backend(name="pallas", forward=impl.forward, input_grad=impl.input_grad,
                   supports=impl.supports, speedup=impl.speedup,
                   forward_packed=impl.forward_packed)


def table_entry(variant: str, config: SparseMatmulConfig, gemm, ratio: float,
                rel_err: float) -> dict[str, Any]:
    """One measured entry in the table's format (for ``benchmarks/kernels.py``)."""
    return dict(variant=variant, config=dataclasses.asdict(config), gemm=list(gemm),
                ratio=round(float(ratio), 4), rel_err=float(rel_err))
