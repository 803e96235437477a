"""Product backends: what a backend is, the masked reference, and the ``"auto"`` policy.

The two sparse products of a linear layer with kernel ``w: (in, out)`` run through a
:class:`Backend`, a plain value:

* ``forward``: ``Y = X · (W ⊙ fwd)`` on 2-D operands, ``(rows, in) -> (rows, out)``;
* ``input_grad``: ``dX = dY · (W ⊙ bwd)ᵀ``, ``(rows, out) -> (rows, in)``, in the order of a
  Bi-Mask permutation ``perm`` of ``out`` when one is given.

:data:`REFERENCE` (masked dense ``jnp``, any platform, fp32 accumulation) runs everywhere.
Kernel backends come from factories (``nmjax.kernels.pallas_backend(config)``,
``nmjax.kernels.cusparselt.cusparselt_backend()``); importing a module never registers anything.
``backend=`` arguments take a :class:`Backend`, ``"reference"``, ``"auto"`` or the name of a
known factory (``"pallas"``, ``"cusparselt"``), resolved per product by :func:`resolve`.
``"auto"`` runs a kernel only where its own measured table says it beats dense XLA on this
device for this shape (:attr:`Backend.speedup` > 1), and the reference otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

DIRECTIONS = ("forward", "input_grad")

# Backends built by a factory on first use: name -> "module:function". The factory takes
# no argument and returns a Backend (it may be unable to run here: see Backend.supports).
FACTORIES: dict[str, str] = {
    "pallas": "nmjax.kernels:pallas_backend",
    "cusparselt": "nmjax.kernels.cusparselt:cusparselt_backend",
}


class Problem(NamedTuple):
    """One 2-D product as a backend sees it; every field is static.

    Attributes:
      direction: ``"forward"`` (``x2d @ (w ⊙ fwd)``) or ``"input_grad"``
        (``dy2d @ (w ⊙ bwd)ᵀ``).
      rows: rows of the dense operand (the flattened batch).
      n_in, n_out: the kernel's shape ``(in, out)``.
      dtype: the compute dtype (inputs and weights share it).
      platform: the default device's platform (``"cpu"``, ``"gpu"``, ...).
      device_kind: the default device's kind (e.g. ``"NVIDIA H100 80GB HBM3"``).
      compute_capability: ``"9.0"`` etc. on NVIDIA GPUs, else ``None``.
      nm: the ``(n, m)`` pattern the caller guarantees the product's mask satisfies along
        the contraction axis (``fwd`` along ``in``; ``bwd`` along ``out``, in ``perm``
        order), or ``None`` when unknown.
      permuted: a Bi-Mask ``perm`` is given (input_grad only).
      precision: the ``lax.Precision`` (or pair, or ``None``) the caller asked for; the
        backend's functions receive it, and ``supports`` refuses one it cannot honour.
    """

    direction: str
    rows: int
    n_in: int
    n_out: int
    dtype: Any
    platform: str
    device_kind: str
    compute_capability: str | None
    nm: tuple[int, int] | None
    permuted: bool
    precision: Any = None

    @property
    def gemm(self) -> tuple[int, int, int]:
        """``(M, N, K)`` of the sparse GEMM ``C = A·B`` with A the sparse weight operand:
        forward ``(out, rows, in)`` (``Yᵀ = Wᵀ·Xᵀ``), input_grad ``(in, rows, out)``."""
        if self.direction == "forward":
            return self.n_out, self.rows, self.n_in
        return self.n_in, self.rows, self.n_out


@dataclasses.dataclass(frozen=True)
class Backend:
    """The two sparse products of a linear layer on 2-D operands.

    A backend is a value: pass it as ``backend=`` to :func:`nmjax.ops.nm_dense`, a layer or
    ``sparsify``. It is hashed (it is a static argument of the products), so build it once:
    factories cache their results per configuration.

    Attributes:
      name: a short name for messages and tables (``"pallas"``).
      forward: ``(x2d: (rows, in), w: (in, out), fwd_mask: (in, out) bool, *, precision)
        -> (rows, out)``.
      input_grad: ``(dy2d: (rows, out), w: (in, out), bwd_mask: (in, out) bool,
        perm: (out,) int | None, *, precision) -> (rows, in)``.
      supports: ``(Problem) -> str | None``: ``None`` when the backend can run the product
        (device, dtype, shape, declared N:M, precision), else the reason it cannot. Cheap
        and static. A backend honours :attr:`Problem.precision` or refuses it here.
      speedup: ``(Problem) -> float``: measured time of dense XLA over this backend's time
        for the product on this device (> 1: faster); ``"auto"`` picks the largest above 1.
        ``0.0`` when nothing was measured.
      forward_packed: ``(x2d: (rows, in), packed: nmjax.format.PackedNM, *, precision) ->
        (rows, out)``: the forward product from the masked kernel held packed (2-D, 2:4,
        ``(in, out)`` grouped along ``in``, axis 0), without a dense weight (packed
        inference); ``None`` when the backend has no such entry (a packed layer then unpacks
        the kernel and calls ``forward``).
    """

    name: str
    forward: Callable[[Array, Array, Array], Array]
    input_grad: Callable[[Array, Array, Array, Array | None], Array]
    supports: Callable[[Problem], str | None]
    speedup: Callable[[Problem], float] = lambda problem: 0.0
    forward_packed: Callable[..., Array] | None = None

    def run(self, problem: Problem, *args: Any) -> Array:
        """Runs ``problem``'s product (``forward`` or ``input_grad``) on ``args`` at
        ``problem.precision``."""
        fn = self.forward if problem.direction == "forward" else self.input_grad
        return fn(*args, precision=problem.precision)


def masked(w: Array, mask: Array) -> Array:
    """``w ⊙ mask`` in ``w``'s dtype (the operand of both reference products)."""
    return jnp.where(mask, w, jnp.zeros((), w.dtype))


def masked_forward(x2d: Array, w_masked: Array, *, precision=None) -> Array:
    """``x2d @ w_masked``, fp32 accumulation, in ``x2d``'s dtype: the reference forward on
    a kernel masked already (:func:`masked`)."""
    y = jnp.matmul(x2d, w_masked, precision=precision, preferred_element_type=jnp.float32)
    return y.astype(x2d.dtype)


def masked_input_grad(dy2d: Array, w_masked: Array, *, precision=None) -> Array:
    """``dy2d @ w_maskedᵀ``, fp32 accumulation, in ``dy2d``'s dtype."""
    dx = jax.lax.dot_general(dy2d, w_masked, (((1,), (1,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)
    return dx.astype(dy2d.dtype)


def reference_forward(x2d: Array, w: Array, fwd_mask: Array, *, precision=None) -> Array:
    """``x2d @ (w ⊙ fwd_mask)``: ``(rows, in) x (in, out) -> (rows, out)``, fp32 accumulation."""
    return masked_forward(x2d, masked(w, fwd_mask), precision=precision)


def reference_input_grad(
    dy2d: Array, w: Array, bwd_mask: Array, perm: Array | None, *, precision=None
) -> Array:
    """``dy2d @ (w ⊙ bwd_mask)ᵀ``: ``(rows, out) -> (rows, in)``, fp32 accumulation.

    ``perm`` (a Bi-Mask permutation of ``out``) orders the contraction for kernels that need
    contiguous groups; a dense product does not depend on that order, so the reference
    skips the two gathers it would cost (the result differs only by float summation order).
    """
    del perm
    return masked_input_grad(dy2d, masked(w, bwd_mask), precision=precision)


REFERENCE = Backend(
    name="reference",
    forward=reference_forward,
    input_grad=reference_input_grad,
    supports=lambda problem: None,
    speedup=lambda problem: 1.0,
)


def default_device() -> jax.Device:
    """The device un-committed computations run on: ``jax.default_device`` when set (a
    device or a platform name), else the first device of the default backend."""
    dev = jax.config.jax_default_device
    if dev is None:
        return jax.devices()[0]
    if isinstance(dev, str):
        return jax.devices(dev)[0]
    return dev


def device_facts() -> tuple[str, str, str | None]:
    """``(platform, device_kind, compute_capability)`` of :func:`default_device`."""
    dev = default_device()
    return (dev.platform, getattr(dev, "device_kind", dev.platform),
            getattr(dev, "compute_capability", None))


@functools.cache
def named(name: str) -> Backend:
    """The backend a known factory builds (``"pallas"``, ``"cusparselt"``), default config.

    Raises:
      ValueError: ``name`` is not a known factory.
      ImportError: the factory's module cannot be imported here (the message says why).
    """
    spec = FACTORIES.get(name)
    if spec is None:
        raise ValueError(f"backend must be 'auto', 'reference', an nmjax.backends.Backend or "
                         f"one of {sorted(FACTORIES)}, got {name!r}")
    module, _, fn = spec.partition(":")
    backend = getattr(importlib.import_module(module), fn)()
    if not isinstance(backend, Backend):  # pragma: no cover - factories are ours
        raise TypeError(f"factory {spec} returned {type(backend).__name__}, not a Backend")
    return backend


def check_backend(backend: Any) -> Backend | str:
    """Validates a ``backend=`` argument: a :class:`Backend`, ``"auto"``, ``"reference"`` or
    a factory name (returned as the built :class:`Backend`).

    Raises:
      TypeError: not a string or a Backend.
      ValueError: an unknown name.
    """
    if isinstance(backend, Backend):
        return backend
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string or an nmjax.backends.Backend, "
                        f"got {type(backend).__name__} {backend!r:.60}")
    if backend == "auto":
        return backend
    if backend == "reference":
        return REFERENCE
    try:
        return named(backend)
    except ImportError as e:
        raise ValueError(f"backend {backend!r} cannot be loaded here: {e}") from e


def _auto_candidates(problem: Problem) -> tuple[Backend, ...]:
    if problem.platform != "gpu":  # every kernel backend is a GPU backend: import nothing
        return ()
    found = []
    for name in FACTORIES:
        try:
            found.append(named(name))
        except ImportError:  # pragma: no cover - needs a GPU machine without the extra
            continue
    return tuple(found)


def resolve(backend: Backend | str, problem: Problem) -> Backend:
    """The backend that runs ``problem`` for a validated ``backend=`` argument.

    An explicit backend must support the problem (else ValueError with its reason: nothing
    falls back silently). ``"auto"`` takes, among the kernel backends that support it, the
    one with the largest measured speedup above 1, else :data:`REFERENCE`.
    """
    if backend == "auto":
        best, best_speed = REFERENCE, 1.0
        for cand in _auto_candidates(problem):
            if cand.supports(problem) is None:
                speed = float(cand.speedup(problem))
                if speed > best_speed:
                    best, best_speed = cand, speed
        return best
    assert isinstance(backend, Backend)
    reason = backend.supports(problem)
    if reason is not None:
        raise ValueError(
            f"backend {backend.name!r} cannot run the {problem.direction} product "
            f"(rows, in, out)=({problem.rows}, {problem.n_in}, {problem.n_out}), "
            f"{jnp.dtype(problem.dtype).name}, declared N:M {problem.nm} on this device "
            f"({problem.platform}: {problem.device_kind}): {reason}. "
            "Use backend='reference' or 'auto'")
    return backend


__all__ = [
    "DIRECTIONS",
    "FACTORIES",
    "REFERENCE",
    "Backend",
    "Problem",
    "check_backend",
    "default_device",
    "device_facts",
    "masked",
    "masked_forward",
    "masked_input_grad",
    "named",
    "reference_forward",
    "reference_input_grad",
    "resolve",
]
