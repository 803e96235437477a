"""AdaPrune's per-layer problem: a layer's inputs as rows, the solvers, the output errors.

A selected layer is reduced to a dense least-squares problem. Its inputs become rows ``X``
of length ``d`` (a Dense layer's ``(..., in)`` inputs as they are; a conv layer's image
patches, ordered ``(kh, kw, I)`` like the rows of its ``HWIO`` kernel reshaped to
``(kh·kw·I, O)``), so that the layer computes ``X @ W2 + b`` with ``W2 = kernel.reshape(d, O)``.
Weights travel *augmented*: ``w = [W2; b]`` of shape ``(d + 1, out)``.

Inputs stay as the layer received them (one array per call of the layer, the calibration
samples along axis 0) and become rows chunk by chunk, so a conv layer's patches are never
all in memory at once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Memory bounds (float32 entries) of one chunk of rows and one block of column solves: they
# keep a layer's working set near 64 MiB whatever its size.
_ROWS_CHUNK_ENTRIES = 1 << 24
_SOLVE_BLOCK_ENTRIES = 1 << 24
HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Geometry:
    """How a layer turns its input into rows (static, hashable: a jit argument).

    Attributes:
      kind: ``"dense"`` or ``"conv"``.
      kernel_shape: the kernel's shape (``(in, out)`` or ``HWIO``-like, rank 3 to 5).
      strides, padding, input_dilation, kernel_dilation: a conv's settings as its
        ``conv_general_dilated`` equation has them (tuples; ``padding`` a string or a tuple
        of pairs): the input is what the equation receives, after any padding the layer
        applied itself (Flax's ``CIRCULAR``, ``REFLECT``, ``CAUSAL``).
    """

    kind: str
    kernel_shape: tuple[int, ...]
    strides: tuple[int, ...] = ()
    padding: Any = "VALID"
    input_dilation: tuple[int, ...] = ()
    kernel_dilation: tuple[int, ...] = ()

    @property
    def d(self) -> int:
        """Row length: the product of the kernel's contraction dimensions."""
        return math.prod(self.kernel_shape[:-1])

    @property
    def out(self) -> int:
        return self.kernel_shape[-1]

    @property
    def spatial(self) -> int:
        return len(self.kernel_shape) - 2 if self.kind == "conv" else 0


def rows(geom: Geometry, x: jax.Array) -> jax.Array:
    """``x: (L, ...)``, one call's inputs for ``L`` samples -> rows ``(L, P, d)`` float32."""
    x = x.astype(jnp.float32)
    if geom.kind == "dense":
        return x.reshape(x.shape[0], -1, geom.d)
    nd = geom.spatial
    lead = x.shape[: x.ndim - nd - 1]
    x = x.reshape(-1, *x.shape[x.ndim - nd - 1:])
    spatial = "DHW"[3 - nd:]
    dims = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
    patches = jax.lax.conv_general_dilated_patches(
        x, geom.kernel_shape[:nd], geom.strides, geom.padding, lhs_dilation=geom.input_dilation,
        rhs_dilation=geom.kernel_dilation, dimension_numbers=dims, precision=HIGHEST)
    # The patches' features are ordered (C, *window); the kernel's rows are (*window, C).
    c = x.shape[-1]
    window = geom.kernel_shape[:nd]
    patches = patches.reshape(*patches.shape[:-1], c, math.prod(window))
    patches = jnp.swapaxes(patches, -1, -2).reshape(*patches.shape[:-2], geom.d)
    return patches.reshape(lead[0] if lead else 1, -1, geom.d)


def rows_of(geom: Geometry, inputs: tuple[jax.Array, ...]) -> jax.Array:
    """All calls' rows for the same samples, ``(L, P_total, d)``."""
    return jnp.concatenate([rows(geom, x) for x in inputs], axis=1)


def _chunks(geom: Geometry, inputs: tuple[jax.Array, ...]) -> tuple[int, int]:
    """``(chunk, count)``: samples per chunk so a chunk's rows stay bounded."""
    samples = inputs[0].shape[0]
    per_sample = rows_per_sample(geom, inputs) * geom.d
    chunk = max(1, min(samples, _ROWS_CHUNK_ENTRIES // max(per_sample, 1)))
    return chunk, -(-samples // chunk)


def _scan_chunks(geom: Geometry, inputs: tuple[jax.Array, ...], body: Callable, init: Any):
    """Folds ``body(carry, rows (R, d), weight (R,))`` over chunks of samples; rows of the
    zero padding that completes the last chunk have weight 0."""
    samples = inputs[0].shape[0]
    chunk, count = _chunks(geom, inputs)
    pad = chunk * count - samples
    padded = tuple(jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) for x in inputs)
    valid = jnp.arange(chunk * count) < samples

    def step(carry, i):
        xs = tuple(jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk) for x in padded)
        r = rows_of(geom, xs)
        weight = jnp.broadcast_to(jax.lax.dynamic_slice_in_dim(valid, i * chunk, chunk)[:, None],
                                  r.shape[:2])
        return body(carry, r.reshape(-1, geom.d), weight.reshape(-1).astype(jnp.float32)), None

    return jax.lax.scan(step, init, jnp.arange(count))[0]


# ------------------------------------------------------------------------------ progress


class _Sink:
    """Where the solvers' in-loop progress callbacks go.

    ``jax.debug.callback`` needs one fixed host function, or every layer's loop would
    compile anew for each bar; this object is that function's target, set around one solve.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._fn: Callable[[int], None] | None = None

    def set(self, fn: Callable[[int], None] | None) -> None:
        with self._lock:
            self._fn = fn

    def __call__(self, done: Any) -> None:
        with self._lock:
            fn = self._fn
        if fn is not None:
            fn(int(done))


PROGRESS = _Sink()


def _tick(i: jax.Array, total: int, every: int) -> None:
    """Reports ``i + 1`` steps done (every ``every`` steps and at the end)."""
    jax.lax.cond(((i + 1) % every == 0) | (i + 1 == total),
                 lambda: jax.debug.callback(PROGRESS, i + 1), lambda: None)


# ------------------------------------------------------------------------------ problems


@functools.partial(jax.jit, static_argnames=("geom",))
def gram(geom: Geometry, inputs: tuple[jax.Array, ...]) -> jax.Array:
    """``[X 1]ᵀ[X 1]``, ``(d + 1, d + 1)`` float32: all a layer's squared output error
    depends on (the last row and column are the bias's)."""

    def body(g, r, weight):
        ra = jnp.concatenate([r * weight[:, None], weight[:, None]], axis=1)
        return g + jnp.matmul(ra.T, ra, precision=HIGHEST)

    return _scan_chunks(geom, inputs, body, jnp.zeros((geom.d + 1, geom.d + 1), jnp.float32))


@functools.partial(jax.jit, static_argnames=("geom",))
def output_errors(geom: Geometry, inputs: tuple[jax.Array, ...], target: jax.Array,
                  candidates: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
    """``(‖X T₀ + t‖², [‖(X T₀ + t) − (X Cₖ + cₖ)‖² for each candidate])`` on the rows of
    ``inputs``, computed from the rows (not the Gram matrix, whose quadratic form loses
    the small errors to cancellation). ``target`` and each candidate: ``(d + 1, out)``,
    augmented weights."""
    candidates = jnp.stack(candidates)

    def body(carry, r, weight):
        ref, errs = carry
        y = jnp.matmul(r, target[:-1], precision=HIGHEST) + target[-1]
        yc = jnp.einsum("rd,kdo->kro", r, candidates[:, :-1], precision=HIGHEST)
        yc = yc + candidates[:, -1][:, None, :]
        w = weight[:, None]
        return (ref + jnp.sum(w * y * y), errs + jnp.sum(w * (y - yc) ** 2, axis=(1, 2)))

    init = (jnp.zeros((), jnp.float32), jnp.zeros((candidates.shape[0],), jnp.float32))
    return _scan_chunks(geom, inputs, body, init)


def absorb_mean(w: jax.Array, mask: jax.Array, m: int) -> jax.Array:
    """The reference's one-step correction: each kept weight of a group of ``m`` consecutive
    rows gains the sum of the group's pruned weights divided by its kept count (pruned
    weights become 0). ``w, mask: (d, out)``, ``d % m == 0``."""
    d, out = w.shape
    wg, mg = w.reshape(d // m, m, out), mask.reshape(d // m, m, out)
    kept = mg.sum(1, keepdims=True)
    shift = jnp.where(mg, 0.0, wg).sum(1, keepdims=True) / jnp.maximum(kept, 1)
    return jnp.where(mg, wg + shift, 0.0).reshape(d, out)


@functools.partial(jax.jit, static_argnames=("axis", "m"))
def prepare(kernel: jax.Array, fwd: jax.Array, bias: jax.Array, *, axis: int, m: int
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(w, magnitude, start)``, augmented ``(d + 1, out)`` float32: the dense weights, the
    magnitude N:M ones, and the solvers' start (``magnitude``, or with ``m > 0`` the
    :func:`absorb_mean` correction over groups of ``m`` along the kernel's ``axis``)."""
    out = kernel.shape[-1]
    d = kernel.size // out
    kernel = kernel.astype(jnp.float32)
    bias = bias.astype(jnp.float32)[None]
    w = jnp.concatenate([kernel.reshape(d, out), bias], axis=0)
    keep = jnp.concatenate([fwd.reshape(d, out), jnp.ones((1, out), bool)], axis=0)
    magnitude = jnp.where(keep, w, 0.0)
    if not m:
        return w, magnitude, magnitude
    moved, moved_fwd = jnp.moveaxis(kernel, axis, 0), jnp.moveaxis(fwd, axis, 0)
    shifted = absorb_mean(moved.reshape(moved.shape[0], -1),
                          moved_fwd.reshape(moved.shape[0], -1), m)
    shifted = jnp.moveaxis(shifted.reshape(moved.shape), 0, axis)
    return w, magnitude, jnp.concatenate([shifted.reshape(d, out), bias], axis=0)


# ------------------------------------------------------------------------------- solvers


def solve_block(kmax: int) -> int:
    """Columns solved together by :func:`lstsq` (their ``kmax × kmax`` systems stay within
    the memory bound)."""
    return max(1, _SOLVE_BLOCK_ENTRIES // max(kmax * kmax, 1))


@functools.partial(jax.jit, static_argnames=("geom", "fit_bias", "kmax", "block", "progress"))
def lstsq(geom: Geometry, inputs: tuple[jax.Array, ...], w: jax.Array, mask: jax.Array,
          anchor: jax.Array, damping: jax.Array, *, fit_bias: bool, kmax: int, block: int,
          progress: bool) -> jax.Array:
    """Closed-form AdaPrune: for every output column ``j`` with kept rows ``S_j``,
    ``min ‖X w_j − X ŵ_j‖² + λ‖ŵ_S − a_S‖²`` over ``ŵ`` supported on ``S_j``, i.e.
    ``(G_SS + λI) ŵ_S = (G w_j)_S + λ a_S``, ``λ = damping · mean(diag G)``.

    The damping pulls towards the anchor ``a`` (the magnitude-pruned weights), not towards
    zero, so inputs the calibration data never excites keep their weights.

    Args:
      geom, inputs: the layer and its calibration inputs (the Gram matrix :func:`gram` of
        their rows is formed here, in the same program).
      w: ``(d + 1, out)`` dense augmented weights (the target).
      mask: ``(d, out)`` bool, kept kernel entries.
      anchor: ``(d + 1, out)``, the start (pruned entries 0).
      damping: scalar ``>= 0``.
      fit_bias: solve for the bias row too (else it stays ``w``'s).
      kmax: the largest kept count of a column (plus one with ``fit_bias``).
      block: columns per batched solve; progress is reported per block.

    Returns:
      ``(d + 1, out)`` float32 weights, 0 outside ``mask``.
    """
    d, out = mask.shape
    g = gram(geom, inputs)
    if fit_bias:
        gs, ws, an = g, w, anchor
        mk = jnp.concatenate([mask, jnp.ones((1, out), bool)], axis=0)
    else:
        gs, ws, an, mk = g[:d, :d], w[:d], anchor[:d], mask
    lam = damping * jnp.mean(jnp.diag(gs))
    lam = jnp.where(lam > 0, lam, jnp.where(damping > 0, 1.0, 0.0))  # G = 0: keep the anchor
    gw = jnp.matmul(gs, ws, precision=HIGHEST)
    idx = jnp.argsort(~mk, axis=0, stable=True)[:kmax].T                  # (out, kmax)
    valid = jnp.arange(kmax)[None, :] < mk.sum(0)[:, None]
    rhs = (jnp.take_along_axis(gw.T, idx, 1) + lam * jnp.take_along_axis(an.T, idx, 1))

    def one(idx_j, valid_j, rhs_j):
        both = valid_j[:, None] & valid_j[None, :]
        a = jnp.where(both, gs[idx_j[:, None], idx_j[None, :]], 0.0)
        a = a + jnp.diag(jnp.where(valid_j, lam, 1.0))
        # LU, although the system is positive definite: on the CPU, XLA's batched LU solved
        # 256 systems of 256 unknowns in 0.6 s where Cholesky + cho_solve took 1.9 s.
        x = jnp.linalg.solve(a, jnp.where(valid_j, rhs_j, 0.0)[:, None])[:, 0]
        return jnp.where(valid_j, x, 0.0)

    if block >= out:  # one block: no loop (a smaller program to compile)
        x = jax.vmap(one)(idx, valid, rhs)
        if progress:
            _tick(jnp.int32(0), 1, 1)
        return _scatter(x, idx, w, mk, fit_bias)
    blocks = -(-out // block)
    pad = blocks * block - out
    args = [jnp.pad(a, ((0, pad), (0, 0))).reshape(blocks, block, kmax)
            for a in (idx, valid, rhs)]

    def step(_, i):
        x = jax.vmap(one)(args[0][i], args[1][i], args[2][i])
        if progress:
            _tick(i, blocks, 1)
        return None, x

    x = jax.lax.scan(step, None, jnp.arange(blocks))[1].reshape(blocks * block, kmax)[:out]
    return _scatter(x, idx, w, mk, fit_bias)


def _scatter(x: jax.Array, idx: jax.Array, w: jax.Array, mk: jax.Array, fit_bias: bool
             ) -> jax.Array:
    """The columns' solutions ``x: (out, kmax)`` at rows ``idx`` of a ``(d + 1, out)``
    array (the dense bias row where it was not solved for)."""
    out = x.shape[0]
    solved = jnp.zeros((out, mk.shape[0]), jnp.float32).at[
        jnp.arange(out)[:, None], idx].set(x).T
    if fit_bias:
        return solved
    return jnp.concatenate([solved, w[-1:]], axis=0)


@functools.partial(jax.jit, static_argnames=("geom", "iters", "batch", "fit_bias", "progress"))
def adam(geom: Geometry, inputs: tuple[jax.Array, ...], w: jax.Array, mask: jax.Array,
         start: jax.Array, lr: jax.Array, bias_lr: jax.Array, key: jax.Array, *, iters: int,
         batch: int, fit_bias: bool, progress: bool) -> jax.Array:
    """The reference AdaPrune: Adam on the kept weights (and the bias), minimising the mean
    squared output error against the dense layer on ``batch`` samples drawn afresh (without
    replacement) at each of ``iters`` steps; one ``lax.scan``.

    ``w``: ``(d + 1, out)`` dense augmented weights (the target); ``start``: where Adam
    starts (pruned entries 0); ``mask: (d, out)``. Returns ``(d + 1, out)`` float32.
    """
    samples = inputs[0].shape[0]
    tx_w, tx_b = optax.adam(lr), optax.adam(bias_lr)
    d = geom.d
    mask_f = mask.astype(jnp.float32)

    def loss(params, xs):
        r = rows_of(geom, xs).reshape(-1, d)
        target = jnp.matmul(r, w[:d], precision=HIGHEST) + w[d]
        bias = params[1] if fit_bias else w[d]
        pred = jnp.matmul(r, params[0] * mask_f, precision=HIGHEST) + bias
        return jnp.mean((pred - target) ** 2)

    def step(carry, i):
        params, state_w, state_b = carry
        pick = jax.random.choice(jax.random.fold_in(key, i), samples, (batch,), replace=False)
        grads = jax.grad(loss)(params, tuple(x[pick] for x in inputs))
        up_w, state_w = tx_w.update(grads[0], state_w)
        up_b, state_b = tx_b.update(grads[1], state_b)
        params = (params[0] + up_w, params[1] + up_b if fit_bias else params[1])
        if progress:
            _tick(i, iters, max(1, iters // 100))
        return (params, state_w, state_b), None

    params = (start[:d], start[d])
    init = (params, tx_w.init(params[0]), tx_b.init(params[1]))
    params = jax.lax.scan(step, init, jnp.arange(iters))[0][0]
    return jnp.concatenate([params[0] * mask_f, params[1][None]], axis=0)


# ---------------------------------------------------------------------------- cost model

# XLA's CPU batched LU runs the per-column solves at about 1/LU_SLOWDOWN of the throughput of
# the matrix products Adam and the Gram matrix are made of (measured: the crossover table of
# benchmarks/results/convert.md), so the cost model weighs its flops by that factor.
LU_SLOWDOWN = 8.0


def lstsq_cost(geom: Geometry, rows_total: int, kmax: int) -> float:
    """:func:`lstsq`'s cost in matrix-product flops: ``2·R·(d+1)²`` for the Gram matrix,
    and per column an LU solve of ``kmax`` unknowns (``2/3·kmax³ + 2·kmax²`` flops) weighed
    by :data:`LU_SLOWDOWN`."""
    d = geom.d + 1
    solves = geom.out * (2 * kmax ** 3 / 3 + 2 * kmax ** 2)
    return 2.0 * rows_total * d * d + LU_SLOWDOWN * solves


def adam_cost(geom: Geometry, rows_per_sample: int, iters: int, batch: int) -> float:
    """:func:`adam`'s cost in flops: per step three ``(batch·P) × d × out`` products
    (target, prediction, weight gradient)."""
    return 6.0 * iters * batch * rows_per_sample * geom.d * geom.out


def rows_per_sample(geom: Geometry, inputs: tuple[Any, ...]) -> int:
    return sum(jax.eval_shape(lambda x: rows(geom, x), jax.ShapeDtypeStruct(
        (1, *x.shape[1:]), x.dtype)).shape[1] for x in inputs)


def as_numpy(x: Any) -> np.ndarray:
    return np.asarray(jax.device_get(x))
