"""SparseGPT's and Wanda's per-layer problems: a layer's kernel as ``(d, out)`` and its inputs.

A selected layer is seen as in :mod:`nmjax._convert_solve`: its inputs become rows ``X`` of
length ``d`` (a conv's image patches ordered ``(kh, kw, I)``) and its kernel ``W2 =
kernel.reshape(d, out)``, so that groups of ``m`` consecutive rows of ``W2`` are the N:M
groups along the contraction axis (``in``, or ``I`` inside each spatial position).

* :func:`sparsegpt`: the OBS sweep over the rows of ``W2`` (the columns of PyTorch's
  ``(out, in)`` weight), block by block, with the mask of each group of ``m`` rows chosen
  from the saliency ``w² / [U]²_jj`` (``U`` the upper Cholesky factor of ``(XᵀX + λI)⁻¹``)
  when the sweep reaches it, and the rows not yet reached updated to compensate.
* :func:`input_norms`: ``‖x_j‖₂`` per row of ``W2``, Wanda's activation factor.
* :func:`bimask_backward`: Bi-Mask's backward mask and permutation for a given forward mask.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from nmjax import _convert_solve as solve
from nmjax.masks import BiMask, Masks, Pattern, Transposable, nm_mask, permute_out, unpermute_out

HIGHEST = jax.lax.Precision.HIGHEST


def _identity(scores: jax.Array) -> jax.Array:
    return scores


def select(pattern: Pattern, scores: jax.Array, axis: int) -> jax.Array:
    """The forward mask of ``pattern`` on ``scores`` (not weights): N:M (plain and Bi-Mask)
    keeps the ``n`` best of every ``m`` along ``axis``; transposable runs the pattern's own
    solver on the ``m × m`` tiles over ``(axis, last axis)``."""
    if isinstance(pattern, Transposable):
        return dataclasses.replace(pattern, score_fn=_identity)(scores, axis).fwd
    n, m = pattern.fwd_nm
    return nm_mask(scores, n, m, axis)


@functools.partial(jax.jit, static_argnames=("geom", "pattern", "block", "progress"))
def sparsegpt(geom: solve.Geometry, inputs: tuple[jax.Array, ...], w: jax.Array,
              damping: jax.Array, *, pattern: Pattern, block: int, progress: bool
              ) -> tuple[jax.Array, jax.Array]:
    """SparseGPT (Frantar & Alistarh, 2023) on one layer, one compiled program per shape.

    ``H = XᵀX`` over the layer's calibration rows (the Gram matrix, formed here); rows of
    ``w`` whose input is always 0 (``H_jj = 0``) are zeroed and get ``H_jj = 1``; then
    ``H += damping · mean(diag H) · I``. With ``U`` the upper Cholesky factor of ``H⁻¹``, the
    rows are swept in blocks of ``block``: at the first row of each group of ``m``, the
    group's mask comes from the saliency ``w_ij² / U_jj²`` of its current weights
    (:func:`select`); each row ``j`` then gets ``q = w_j ⊙ mask_j``, ``e = (w_j − q) / U_jj``
    and the later rows of the block ``w_k −= U_jk · e``; after the block, the rows below it
    take the block's errors at once, ``W_below −= U_{block, below}ᵀ · E``. The OBS update with
    ``H_F⁻¹`` of the rows not yet reached ``F``, in the lazy blocked form; the block size
    changes only the rounding.

    Args:
      geom, inputs: the layer and its calibration inputs (as :func:`solve.gram` takes them).
      w: ``(d, out)`` float32 dense weights, ``d % m == 0``.
      damping: scalar, relative to ``mean(diag H)`` (the reference's ``percdamp``).
      pattern: the forward pattern (hashable spec; its ``score_fn`` is not used).
      block: rows per lazy block, a multiple of ``m``; ``d`` is padded to a multiple of it
        (the padding: zero weights whose ``H`` is the identity, apart from the rest).
      progress: report each block to :data:`nmjax._convert_solve.PROGRESS`.

    Returns:
      ``(new (d, out) float32, mask (d, out) bool)``: ``new`` is 0 outside ``mask``.
    """
    d = w.shape[0]
    w, lower, blocks = _inverse_factor(geom, inputs, w, damping, block)
    sweep = functools.partial(_sweep_block, pattern, block, blocks, lower, progress)
    w, mask = jax.lax.fori_loop(0, blocks, sweep, (w, jnp.zeros(w.shape, bool)))
    return w[:d], mask[:d]


def _inverse_factor(geom: solve.Geometry, inputs: tuple[jax.Array, ...], w: jax.Array,
                    damping: jax.Array, block: int) -> tuple[jax.Array, jax.Array, int]:
    """``(w, lower, blocks)``: the weights (dead inputs' rows zeroed) and the lower Cholesky
    factor of the damped ``H⁻¹``, both padded to ``blocks · block`` rows (identity Hessian,
    zero weights)."""
    d = w.shape[0]
    h = solve.gram(geom, inputs)[:d, :d]
    dead = jnp.diag(h) == 0
    h = h + jnp.diag(dead.astype(h.dtype))
    w = jnp.where(dead[:, None], 0.0, w)
    h = h + damping * jnp.mean(jnp.diag(h)) * jnp.eye(d, dtype=h.dtype)
    blocks = -(-d // block)
    size = blocks * block
    if size > d:
        h = jnp.pad(h, ((0, size - d), (0, size - d))) + jnp.diag(jnp.arange(size) >= d)
        w = jnp.pad(w, ((0, size - d), (0, 0)))
    chol = jnp.linalg.cholesky(h)
    hinv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(size, dtype=h.dtype))
    # H⁻¹ = Uᵀ U with U upper = the transpose of the lower factor: row j of U is column j of
    # `lower`; rows above a block are 0 there, so the block's update never reaches them.
    return w, jnp.linalg.cholesky(hinv), blocks


def _sweep_block(pattern: Pattern, block: int, blocks: int, lower: jax.Array, progress: bool,
                 b: jax.Array, carry: tuple[jax.Array, jax.Array]
                 ) -> tuple[jax.Array, jax.Array]:
    """Block ``b`` of the sweep: its groups pruned one by one, then the rows below it take
    the block's errors at once."""
    w, mask = carry
    i1 = b * block
    u_rows = jax.lax.dynamic_slice_in_dim(lower, i1, block, axis=1).T     # (block, size)
    u1 = jax.lax.dynamic_slice_in_dim(u_rows, i1, block, axis=1)          # (block, block)
    w1 = jax.lax.dynamic_slice_in_dim(w, i1, block, axis=0)
    init = (w1, jnp.zeros_like(w1), jnp.zeros(w1.shape, bool))
    group = functools.partial(_prune_group, pattern, u1)
    w1, err1, mask1 = jax.lax.fori_loop(0, block // pattern.fwd_nm[1], group, init)
    w = w - jnp.matmul(u_rows.T, err1, precision=HIGHEST)
    w = jax.lax.dynamic_update_slice_in_dim(w, w1, i1, axis=0)
    mask = jax.lax.dynamic_update_slice_in_dim(mask, mask1, i1, axis=0)
    if progress:
        solve._tick(b, blocks, 1)
    return w, mask


def _prune_group(pattern: Pattern, u1: jax.Array, g: jax.Array,
                 carry: tuple[jax.Array, jax.Array, jax.Array]
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Group ``g`` (``m`` rows) of a block: its mask from the saliencies of its current
    weights, then each row pruned and the block's later rows updated (OBS)."""
    w1, err1, mask1 = carry
    m = pattern.fwd_nm[1]
    slab = jax.lax.dynamic_slice_in_dim(w1, g * m, m, axis=0)
    scale = jax.lax.dynamic_slice_in_dim(jnp.diag(u1), g * m, m)
    keep = select(pattern, slab ** 2 / (scale ** 2)[:, None], 0)
    mask1 = jax.lax.dynamic_update_slice_in_dim(mask1, keep, g * m, axis=0)

    def row(k, carry):
        w1, err1 = carry
        j = g * m + k
        wj = w1[j]
        q = jnp.where(keep[k], wj, 0.0)
        e = (wj - q) / u1[j, j]
        w1 = w1 - jnp.outer(u1[j], e)
        return w1.at[j].set(q), err1.at[j].set(e)

    w1, err1 = jax.lax.fori_loop(0, m, row, (w1, err1))
    return w1, err1, mask1


@functools.partial(jax.jit, static_argnames=("geom",))
def input_norms(geom: solve.Geometry, inputs: tuple[jax.Array, ...]) -> jax.Array:
    """``(d,)`` float32: ``‖x_j‖₂`` of each input feature over all calibration rows (Wanda's
    factor; the reference's ``sqrt(scaler_row)`` up to a constant, which no N:M mask sees)."""

    def body(acc, r, weight):
        return acc + jnp.sum((r * weight[:, None]) ** 2, axis=0)

    return jnp.sqrt(solve._scan_chunks(geom, inputs, body, jnp.zeros((geom.d,), jnp.float32)))


def bimask_backward(pattern: BiMask, w: jax.Array, fwd: jax.Array, key: jax.Array) -> Masks:
    """Bi-Mask's masks for a given forward mask: a permutation of the output channels by the
    pattern's search on the pruned weights ``w ⊙ fwd``, then per input row and group of
    ``m`` permuted channels the ``n`` largest forward-kept ``|w|`` (the exact optimum for that
    permutation). ``w, fwd``: the kernel's shape, ``(..., I, O)``."""
    pruned = jnp.where(fwd, w, 0.0)
    perm = pattern.search_permutation(pruned, key)
    n, m = pattern.fwd_nm
    w2, fwd2 = pruned.reshape(-1, w.shape[-1]), fwd.reshape(-1, w.shape[-1])
    score = jnp.where(fwd2, jnp.abs(w2), -1.0)
    kept = nm_mask(permute_out(score, perm), n, m, axis=1) & permute_out(fwd2, perm)
    bwd = unpermute_out(kept, perm).reshape(w.shape)
    return Masks(fwd, bwd, perm)
