"""What the Linen and NNX layers share: the sparsity config, mask computation, the products."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding

from nmjax import _checks, backends, ops
from nmjax.backends import Backend
from nmjax.masks import BiMask, Masks, Pattern, as_pattern

MODES = ("dynamic", "static")
# The Linen variable collection holding static masks, laid out like ``params``.
MASKS = "nm_masks"
# The Linen collection a layer sows the masks it used into (only when made mutable).
USED_MASKS = "nm_used_masks"


def _decay_key(decay: Any) -> Any:
    return float(decay) if isinstance(decay, float) else ("array", id(decay))


@dataclasses.dataclass(frozen=True, eq=False)
class Sparsity:
    """How a layer is made N:M sparse: the pattern, when masks are computed, which backend
    runs the products, and SR-STE's decay.

    >>> from nmjax.masks import Transposable
    >>> Sparsity("2:4").pattern                          # 2:4 along in, recomputed every call
    NM(n=2, m=4)
    >>> Sparsity(Transposable(2, 4), decay=2e-4).pattern.bwd_nm     # both products sparse
    (2, 4)
    >>> Sparsity("2:4 bimask", mode="static").mode       # masks supplied from outside
    'static'

    Attributes:
      pattern: a pattern spec (:class:`nmjax.masks.NM`, ``Transposable``, ``BiMask``,
        ``Custom``) or its shorthand (``"2:4"``, ``"2:4 transposable"``).
      mode: ``"dynamic"``: masks recomputed from the current weights at every call (no
        gradient flows through them): SR-STE training from scratch. ``"static"``: masks read
        from outside (Linen: the ``"nm_masks"`` collection; NNX: :class:`NMMask` variables),
        computed at init and refreshed when you choose (e.g. by :mod:`nmjax.optim`).
      backend: runs the products (:func:`nmjax.ops.nm_dense`): ``"auto"``, ``"reference"``,
        ``"pallas"``, ``"cusparselt"`` or an :class:`nmjax.backends.Backend`.
      decay: SR-STE ``λ`` ≥ 0 (finite): adds ``λ · (1 − fwd) ⊙ W`` to the kernel's
        gradient. A float, or a JAX scalar (e.g. traced from a schedule inside a jitted
        step); ``0`` leaves the term out. Dynamic mode only: the decay has one owner per
        mode, and in static mode that is whoever owns the masks,
        :func:`nmjax.optim.sparse` (its ``decay=``), so a static layer's own decay is
        refused rather than applied twice (2λ). With dynamic layers, leave
        :func:`nmjax.optim.sparse`'s ``decay`` 0 if you use it.
    """

    pattern: Pattern | str = "2:4"
    mode: str = "dynamic"
    backend: str | Backend = "auto"
    decay: float | jax.Array = 0.0

    def __post_init__(self):
        object.__setattr__(self, "pattern", as_pattern(self.pattern))
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        object.__setattr__(self, "backend", backends.check_backend(self.backend))
        object.__setattr__(self, "decay", _checks.check_decay(self.decay))
        if self.mode == "static" and not (isinstance(self.decay, float) and self.decay == 0):
            raise ValueError(
                f"decay={self.decay!r} with mode='static': static masks come from the "
                "optimizer, which owns SR-STE's decay: pass it there "
                "(nmjax.optim.sparse(..., decay=λ)) and leave the layers' decay 0; the "
                "layers' decay is for mode='dynamic'")

    def _key(self):
        return (self.pattern, self.mode, self.backend, _decay_key(self.decay))

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Sparsity) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    @property
    def label(self) -> str:
        return f"{self.pattern.label} ({self.mode})"


def check_sparsity(sparsity: Any) -> Sparsity:
    if not isinstance(sparsity, Sparsity):
        raise TypeError(f"sparsity must be an nmjax.nn.Sparsity, got {sparsity!r}")
    return sparsity


def compute_masks(kernel: jax.Array, axis: int, sp: Sparsity, path: str = "kernel",
                  perm: jax.Array | None = None) -> Masks:
    """The pattern's :class:`~nmjax.masks.Masks` for ``kernel`` grouped along ``axis``.

    ``perm``: for a Bi-Mask pattern, the output-channel permutation to build the backward
    mask in (searched earlier, e.g. every I steps); ``None`` is the identity.

    Raises:
      ValueError: the pattern cannot take the kernel (the message names ``path``), or a
        ``perm`` is given to a pattern other than Bi-Mask.
    """
    kernel = jax.lax.stop_gradient(kernel)
    shape = tuple(kernel.shape)
    reason = sp.pattern.check_leaf(shape, axis)
    if reason is not None:
        raise ValueError(f"layer kernel {path!r} of shape {shape} cannot take pattern "
                         f"{sp.pattern.label!r}: {reason}. Leave the layer dense (exclude it "
                         "from the rule) or resize it")
    if perm is not None:
        if not isinstance(sp.pattern, BiMask):
            raise ValueError(f"a stored permutation applies to a Bi-Mask pattern only, "
                             f"got {sp.pattern.label!r} for {path!r}")
        return sp.pattern(kernel, axis, perm=perm)
    return sp.pattern(kernel, axis)


def search_perm(kernel: jax.Array, sp: Sparsity, key: jax.Array, init: Any = None) -> jax.Array:
    """A Bi-Mask permutation of ``kernel: (in, out)``'s output channels for ``sp``."""
    if not isinstance(sp.pattern, BiMask):
        raise ValueError(f"permutation search needs a Bi-Mask pattern, got {sp.pattern.label!r}")
    return sp.pattern.search_permutation(jax.lax.stop_gradient(kernel), key, init=init)


def check_mask_shapes(masks: Masks, kernel_shape: Sequence[int], path: str) -> None:
    for name in ("fwd", "bwd"):
        mask = getattr(masks, name)
        if tuple(mask.shape) != tuple(kernel_shape):
            raise ValueError(f"static {name} mask for {path!r} has shape {tuple(mask.shape)}, "
                             f"but the kernel has shape {tuple(kernel_shape)}")


def product_kwargs(sp: Sparsity, precision: Any, decay: Any = None) -> dict[str, Any]:
    return dict(decay=sp.decay if decay is None else decay, backend=sp.backend,
                precision=precision, fwd_nm=sp.pattern.fwd_nm, bwd_nm=sp.pattern.bwd_nm)


def _op_masks(masks: Masks, sp: Sparsity) -> tuple[Any, Any, Any]:
    """``(fwd, bwd, perm)`` for the ops; ``bwd=None`` where the pattern says it is ``fwd``
    (static masks hold two equal arrays; one mask lets the products share a masked kernel)."""
    bwd = None if sp.pattern.same_masks else masks.bwd
    return masks.fwd, bwd, masks.perm


def dense_product(inputs, kernel, bias, masks: Masks, sp: Sparsity, precision, decay=None):
    """``inputs @ (kernel ⊙ fwd) + bias`` through :func:`nmjax.ops.nm_dense`."""
    fwd, bwd, perm = _op_masks(masks, sp)
    y = ops.nm_dense(inputs, kernel, fwd, bwd, perm=perm,
                     **product_kwargs(sp, precision, decay))
    if bias is not None:
        y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


def conv_product(inputs, kernel, bias, masks: Masks, sp: Sparsity, *, kernel_size,
                 strides, padding, input_dilation, kernel_dilation, feature_group_count,
                 precision, decay=None):
    """Flax ``Conv`` semantics (batch dims, padding modes) with :func:`nmjax.ops.nm_conv`.

    ``inputs: (*batch, *spatial, C)``, ``kernel: (*kernel_size, C // groups, O)``.
    """
    kernel_size = tuple(kernel_size)
    nd = len(kernel_size)

    def bcast(x):
        x = 1 if x is None else x
        return (x,) * nd if isinstance(x, int) else tuple(x)

    n_batch = inputs.ndim - (nd + 1)
    batch_shape = inputs.shape[:n_batch]
    if n_batch != 1:
        inputs = jnp.reshape(inputs, (-1, *inputs.shape[n_batch:]))
    strides, input_dilation = bcast(strides), bcast(input_dilation)
    kernel_dilation = bcast(kernel_dilation)
    pad = canonicalize_padding(padding, nd)
    if pad in ("CIRCULAR", "REFLECT"):
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation, strict=True)]
        pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
        inputs = jnp.pad(inputs, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[pad])
        pad = "VALID"
    elif pad == "CAUSAL":
        if nd != 1:
            raise ValueError("Causal padding is only implemented for 1D convolutions.")
        inputs = jnp.pad(inputs, [(0, 0), (kernel_dilation[0] * (kernel_size[0] - 1), 0), (0, 0)])
        pad = "VALID"
    fwd, bwd, perm = _op_masks(masks, sp)
    y = ops.nm_conv(inputs, kernel, fwd, bwd, perm=perm, strides=strides, padding=pad,
                    lhs_dilation=input_dilation, rhs_dilation=kernel_dilation,
                    feature_group_count=feature_group_count,
                    **product_kwargs(sp, precision, decay))
    if bias is not None:
        y = y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
    if n_batch != 1:
        y = jnp.reshape(y, batch_shape + y.shape[1:])
    return y
