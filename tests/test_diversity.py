"""Mask diversity: exact tile counts and log10 counts, against brute force."""

import itertools
import math

import jax
import numpy as np
import pytest

from nmjax.masks import is_nm, is_transposable, log10_mask_diversity, transposable_count


def brute_force_count(n: int, m: int) -> int:
    """Counts m x m 0/1 matrices with n ones per row and column, row by row."""
    rows = list(itertools.combinations(range(m), n))
    count = 0
    for choice in itertools.product(rows, repeat=m):
        cols = [0] * m
        for r in choice:
            for c in r:
                cols[c] += 1
        count += all(c == n for c in cols)
    return count


def test_k42_is_90():
    assert transposable_count(2, 4) == 90


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
def test_matches_brute_force(m):
    for n in range(1, m + 1):
        assert transposable_count(n, m) == brute_force_count(n, m), (n, m)


@pytest.mark.parametrize("m", [6, 7, 8])
def test_identities(m):
    assert transposable_count(1, m) == math.factorial(m)  # permutation matrices
    assert transposable_count(m, m) == 1
    for n in range(1, m):
        assert transposable_count(n, m) == transposable_count(m - n, m)  # complement


def test_known_larger_values():
    # 4:8 from docs/design.md, *Algorithms* ("about 1.17e11"); 2:6, 2:7 and 3:6 from OEIS
    # A001499 / A001501.
    assert f"{transposable_count(4, 8):.3g}" == "1.17e+11"
    assert transposable_count(2, 6) == 67950
    assert transposable_count(2, 7) == 3110940
    assert transposable_count(3, 6) == 297200


def test_log10_against_enumeration():
    """All 2**16 masks of a 4x4 weight, counted by the validators themselves."""
    masks = ((np.arange(2**16)[:, None] >> np.arange(16)) & 1).astype(bool).reshape(-1, 4, 4)
    half = masks[masks.sum((1, 2)) == 8]
    nm = int(jax.vmap(lambda mk: is_nm(mk, 2, 4, axis=0, exact=True))(half).sum())
    tr = int(jax.vmap(lambda mk: is_transposable(mk, 2, 4, exact=True))(half).sum())
    half = len(half)
    assert log10_mask_diversity("nm", (4, 4), 2, 4) == pytest.approx(math.log10(nm))
    assert log10_mask_diversity("transposable", (4, 4), 2, 4) == pytest.approx(math.log10(tr))
    assert log10_mask_diversity("unstructured", (4, 4), 2, 4) == pytest.approx(math.log10(half))


def test_log10_formulas_and_order():
    shape = (768, 3072)
    t = 768 * 3072
    u = log10_mask_diversity("unstructured", shape, 2, 4)
    nm = log10_mask_diversity("nm", shape, 2, 4)
    tr = log10_mask_diversity("transposable", shape, 2, 4)
    assert nm == pytest.approx(t / 4 * math.log10(6))
    assert tr == pytest.approx(t / 16 * math.log10(90))
    assert u > nm > tr > 0
    # lgamma path (large T) agrees with exact integer arithmetic.
    big = 200_000
    exact = math.log10(math.comb(big, big // 2))
    assert log10_mask_diversity("unstructured", (big,), 2, 4) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize(
    "args, match",
    [
        (("sparse", (8, 8), 2, 4), "kind must be one of"),
        (("nm", (6,), 2, 4), "divisible by m=4"),
        (("nm", (6, 8), 2, 4), r"axis 0 \(length 6\)"),
        (("transposable", (8, 8), 2, 4, (0, 0)), "two different axes"),
        (("transposable", (8, 6), 2, 4), "length 6"),
        (("transposable", (16,), 2, 4), "rank >= 2"),
        (("nm", (8, 8), 5, 4), "n must be <= m"),
        (("nm", (0, 8), 2, 4), "positive sizes"),
    ],
)
def test_bad_input(args, match):
    kwargs = {"axes": args[4]} if len(args) > 4 else {}
    with pytest.raises(ValueError, match=match):
        log10_mask_diversity(*args[:4], **kwargs)
    if args[0] == "nm" and args[2] > args[3]:
        with pytest.raises(ValueError, match=match):
            transposable_count(args[2], args[3])


def test_shapes_are_ints_and_counts_are_capped():
    with pytest.raises(TypeError, match=r"shape entries must be ints, got 8.7"):
        log10_mask_diversity("nm", (8.7, 4), 2, 4)
    assert log10_mask_diversity("nm", 8, 2, 4) == pytest.approx(2 * math.log10(6))
    assert log10_mask_diversity("nm", (4, 6), 2, 4, axis=0) == pytest.approx(6 * math.log10(6))
    with pytest.raises(ValueError, match=r"axis 1 \(length 6\) must be divisible by m=4"):
        log10_mask_diversity("nm", (4, 6), 2, 4, axis=1)
    with pytest.raises(ValueError, match="m must be <= 16"):
        transposable_count(10, 20)
