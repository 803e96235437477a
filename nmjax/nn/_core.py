"""What the Linen and NNX layers share: the sparsity config, masks and the conv wiring."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.linear import canonicalize_padding

from nmjax import _checks, ops
from nmjax.tree import PATTERNS, MaskRule

MODES = ("dynamic", "static")
# The Linen variable collection holding static masks, laid out like ``params``.
MASKS = "nm_masks"
# The Linen collection a layer sows the masks it used into (only when made mutable).
USED_MASKS = "nm_used_masks"


class LayerMasks(NamedTuple):
    """The masks one layer's product uses: ``fwd``/``bwd`` of the kernel's shape, ``perm``
    an ``(out,)`` Bi-Mask permutation or ``None``."""

    fwd: jax.Array
    bwd: jax.Array
    perm: jax.Array | None


@dataclasses.dataclass(frozen=True)
class Sparsity:
    """How a layer is made N:M sparse (hashable, so it can be a static module attribute).

    Example::

      Sparsity(2, 4)                                    # 2:4 along in, recomputed every call
      Sparsity(2, 4, "transposable", decay=2e-4)         # SR-STE, 2:4 in both directions
      Sparsity(2, 4, "bimask", mode="static")            # masks supplied from outside

    Attributes:
      n, m: the pattern, ``1 <= n <= m``.
      pattern: ``"nm"`` (forward N:M along ``in``; the input gradient uses the same mask),
        ``"transposable"`` (N:M along ``in`` and ``out``: both products sparse),
        ``"bimask"`` (Dense only: forward + backward mask and a permutation of ``out``),
        or ``fn(w, n, m, axis) -> mask | (fwd, bwd, perm)`` -- the patterns of
        :data:`nmjax.tree.PATTERNS`.
      mode: ``"dynamic"``: masks recomputed from the current weights at every call, under
        ``stop_gradient`` (SR-STE training from scratch). ``"static"``: masks read from
        outside (Linen: the ``"nm_masks"`` collection; NNX: :class:`NMMask` variables),
        computed once at init and refreshed when you choose.
      decay: SR-STE ``λ``: adds ``λ · (1 − fwd) ⊙ W`` to the kernel's gradient.
      backend: product backend of :func:`nmjax.ops.nm_dense` (``"auto"``, ``"reference"``,
        ``"pallas"``, ...).
      score_fn: scores from weights for the built-in ``"nm"`` and ``"transposable"``
        patterns (default ``jnp.abs``); ``"bimask"`` always scores by ``|w|``.
      pattern_kwargs: extra keyword arguments for the pattern (a mapping or item pairs).
    """

    n: int = 2
    m: int = 4
    pattern: str | Callable[..., Any] = "nm"
    mode: str = "dynamic"
    decay: float = 0.0
    backend: str = "auto"
    score_fn: Callable[[jax.Array], jax.Array] = jnp.abs
    pattern_kwargs: Any = ()

    def __post_init__(self):
        _checks.check_nm(self.n, self.m)
        if isinstance(self.pattern, str):
            if self.pattern not in PATTERNS:
                raise ValueError(f"pattern must be one of {sorted(PATTERNS)} or a function, "
                                 f"got {self.pattern!r}")
        elif not callable(self.pattern):
            raise TypeError(f"pattern must be a string or a function, got {self.pattern!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        real = isinstance(self.decay, int | float | np.integer | np.floating)
        if isinstance(self.decay, bool) or not real or not self.decay >= 0:
            raise ValueError(f"decay must be a float >= 0, got {self.decay!r}")
        object.__setattr__(self, "decay", float(self.decay))  # hashable, one type
        if not isinstance(self.backend, str):
            raise TypeError(f"backend must be a string, got {self.backend!r}")
        kwargs = self.pattern_kwargs
        items = tuple(sorted(kwargs.items())) if isinstance(kwargs, Mapping) else tuple(kwargs)
        object.__setattr__(self, "pattern_kwargs", items)

    @classmethod
    def from_rule(cls, rule: MaskRule, *, mode: str = "dynamic", decay: float = 0.0,
                  backend: str = "auto") -> Sparsity:
        """The layer config for leaves a :class:`nmjax.tree.MaskRule` selects."""
        return cls(rule.n, rule.m, rule.pattern, mode, decay, backend, rule.score_fn,
                   tuple(sorted(rule.pattern_kwargs.items())))

    def rule(self) -> MaskRule:
        """This config as a :class:`nmjax.tree.MaskRule` (for ``build_masks``)."""
        return MaskRule(self.n, self.m, self.pattern, score_fn=self.score_fn,
                        pattern_kwargs=dict(self.pattern_kwargs))

    @property
    def fwd_nm(self) -> tuple[int, int] | None:
        return (self.n, self.m) if isinstance(self.pattern, str) else None

    @property
    def bwd_nm(self) -> tuple[int, int] | None:
        """The backward mask is N:M along ``out`` only for transposable and Bi-Mask."""
        return (self.n, self.m) if self.pattern in ("transposable", "bimask") else None


def split_masks(masks: Any) -> LayerMasks:
    """A pattern's output (a mask, a ``BiMask`` or ``(fwd, bwd, perm)``) as :class:`LayerMasks`."""
    if hasattr(masks, "fwd"):
        return LayerMasks(masks.fwd, masks.bwd, getattr(masks, "perm", None))
    if isinstance(masks, tuple | list):
        fwd, bwd, perm = (*masks, None)[:3] if len(masks) == 2 else masks
        return LayerMasks(fwd, bwd, perm)
    return LayerMasks(masks, masks, None)


def compute_masks(kernel: jax.Array, axis: int, sp: Sparsity, path: str = "kernel",
                  perm: jax.Array | None = None) -> Any:
    """The pattern's raw output for ``kernel`` grouped along ``axis`` (no gradient).

    ``perm``: for ``"bimask"``, the output-channel permutation to build the backward mask
    in (a permutation searched earlier, e.g. every I steps); ``None`` lets the pattern choose.

    Raises:
      ValueError: the kernel's grouped axis is not divisible by ``m``, or the pattern does
        not support the kernel (e.g. Bi-Mask on a conv).
    """
    kernel = jax.lax.stop_gradient(kernel)
    rule = sp.rule()
    shape = tuple(kernel.shape)
    if shape[axis] % sp.m:
        raise ValueError(f"layer kernel {path!r} has shape {shape}; its axis {axis} (length "
                         f"{shape[axis]}) must be divisible by m={sp.m} for {sp.n}:{sp.m} "
                         "groups. Leave the layer dense (exclude it from the rule) or resize it")
    if perm is not None:
        if sp.pattern != "bimask":
            raise ValueError(f"a stored permutation applies to pattern 'bimask' only, "
                             f"got pattern {sp.pattern!r} for {path!r}")
        # The permutation is given: the pattern's search options have nothing to do.
        return PATTERNS["bimask"](kernel, sp.n, sp.m, axis, sp.score_fn, perm=perm)
    return rule.mask(kernel, axis)


def search_perm(kernel: jax.Array, sp: Sparsity, key: jax.Array, **options: Any) -> jax.Array:
    """A Bi-Mask permutation of ``kernel: (in, out)``'s output channels for ``sp``
    (:func:`nmjax.masks.search_permutation`; ``options`` e.g. ``method``, ``init``)."""
    from nmjax.masks import search_permutation

    if sp.pattern != "bimask":
        raise ValueError(f"permutation search needs pattern 'bimask', got {sp.pattern!r}")
    return search_permutation(jax.lax.stop_gradient(kernel), sp.n, sp.m, key=key, **options)


def product_kwargs(sp: Sparsity, masks: LayerMasks, precision: Any) -> dict[str, Any]:
    return dict(perm=masks.perm, decay=sp.decay, backend=sp.backend, precision=precision,
                fwd_nm=sp.fwd_nm, bwd_nm=sp.bwd_nm)


def check_mask_shapes(masks: LayerMasks, kernel_shape: Sequence[int], path: str) -> None:
    for name, mask in (("fwd", masks.fwd), ("bwd", masks.bwd)):
        if tuple(mask.shape) != tuple(kernel_shape):
            raise ValueError(f"static {name} mask for {path!r} has shape {tuple(mask.shape)}, "
                             f"but the kernel has shape {tuple(kernel_shape)}")


def dense_product(inputs, kernel, bias, masks: LayerMasks, sp: Sparsity, precision):
    """``inputs @ (kernel ⊙ fwd) + bias`` through :func:`nmjax.ops.nm_dense`."""
    y = ops.nm_dense(inputs, kernel, masks.fwd, masks.bwd, **product_kwargs(sp, masks, precision))
    if bias is not None:
        y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


def conv_product(inputs, kernel, bias, masks: LayerMasks, sp: Sparsity, *, kernel_size,
                 strides, padding, input_dilation, kernel_dilation, feature_group_count,
                 precision):
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
    y = ops.nm_conv(inputs, kernel, masks.fwd, masks.bwd, strides=strides, padding=pad,
                    lhs_dilation=input_dilation, rhs_dilation=kernel_dilation,
                    feature_group_count=feature_group_count,
                    **product_kwargs(sp, masks, precision))
    if bias is not None:
        y = y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
    if n_batch != 1:
        y = jnp.reshape(y, batch_shape + y.shape[1:])
    return y
