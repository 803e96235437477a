"""The one type every mask pattern returns."""

from __future__ import annotations

from typing import NamedTuple

import jax


class Masks(NamedTuple):
    """The masks of one kernel, as every pattern returns them and every layer reads them.

    For a Dense kernel ``w: (in, out)`` (``docs/design.md``, *Axis contract*):

    Attributes:
      fwd: ``(in, out)`` bool: the forward product uses ``w ⊙ fwd`` (N:M along ``in``).
      bwd: ``(in, out)`` bool: the input-gradient product uses ``w ⊙ bwd``. Plain N:M gives
        ``bwd = fwd`` (the same array); a transposable mask is N:M along ``out`` too; a
        Bi-Mask ``bwd ⊆ fwd`` is N:M along the permuted ``out``.
      perm: ``(out,)`` int32 Bi-Mask permutation of the output channels (``w[:, perm]``
        has each backward group as ``m`` consecutive columns), or ``None`` (identity).

    For a conv kernel ``HWIO`` the same holds with ``in`` = ``I`` and ``out`` = ``O``.
    """

    fwd: jax.Array
    bwd: jax.Array
    perm: jax.Array | None = None
