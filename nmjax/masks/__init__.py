"""Masks as pure functions: N:M, transposable N:M, Bi-Mask, and mask diversity.

Every function takes scores or weights and returns boolean masks; none mutates its input.
Axis convention (DESIGN §2): a Dense kernel ``w: (in, out)`` is grouped along axis 0.
"""

from nmjax.masks._lp import transposable_mask_lp
from nmjax.masks._transposable import transposable_mask
from nmjax.masks.bimask import (
    BiMask,
    bimask,
    invert_permutation,
    permute_out,
    random_candidates,
    score_permutations,
    search_permutation,
    unpermute_out,
)
from nmjax.masks.diversity import log10_mask_diversity, transposable_count
from nmjax.masks.nm import is_nm, is_transposable, nm_mask

__all__ = [
    "BiMask",
    "bimask",
    "invert_permutation",
    "permute_out",
    "random_candidates",
    "score_permutations",
    "search_permutation",
    "unpermute_out",
    "is_nm",
    "is_transposable",
    "log10_mask_diversity",
    "nm_mask",
    "transposable_count",
    "transposable_mask",
    "transposable_mask_lp",
]
