"""Masks as pure functions: N:M, transposable N:M, Bi-Mask, their pattern specs, diversity.

Every function takes scores or weights and returns boolean masks; none mutates its input.
Axis convention (``docs/design.md``, *Axis contract*): a Dense kernel ``w: (in, out)`` is
grouped along axis 0.
Every pattern spec (:class:`NM`, :class:`Transposable`, :class:`BiMask`, :class:`Custom`)
returns one type, :class:`Masks` ``(fwd, bwd, perm)``. Importing this package imports no Flax.
"""

from nmjax.masks._bimask import bimask
from nmjax.masks._diversity import log10_mask_diversity, transposable_count
from nmjax.masks._lp import transposable_mask_lp
from nmjax.masks._nm import is_nm, is_permutation, is_transposable, nm_mask
from nmjax.masks._permutation import (
    invert_permutation,
    permute_out,
    random_candidates,
    score_permutations,
    search_permutation,
    unpermute_out,
)
from nmjax.masks._spec import NM, BiMask, Custom, Pattern, Transposable, as_pattern, magnitude
from nmjax.masks._transposable import transposable_mask
from nmjax.masks._types import Masks

__all__ = [
    "NM",
    "BiMask",
    "Custom",
    "Masks",
    "Pattern",
    "Transposable",
    "as_pattern",
    "bimask",
    "invert_permutation",
    "is_nm",
    "is_permutation",
    "is_transposable",
    "log10_mask_diversity",
    "magnitude",
    "nm_mask",
    "permute_out",
    "random_candidates",
    "score_permutations",
    "search_permutation",
    "transposable_count",
    "transposable_mask",
    "transposable_mask_lp",
    "unpermute_out",
]
