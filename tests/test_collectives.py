"""The compiled sharded training step on 8 host devices: a sparse step's collectives (count
and bytes, from the HLO) against dense Adam's in the same process, for FSDP, TP and both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def steps():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "collectives_worker.py")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    checks = [r for r in rows if "same_masks" in r]
    assert len(checks) == 9 and all(r["same_masks"] for r in checks), checks
    # an output-split Bi-Mask kernel: each shard's search permuted its own channels only
    local = [r for r in checks if "perm_within_shards" in r]
    assert len(local) == 4 and all(r["perm_within_shards"] and r["searched"] for r in local)
    refused = [r["crossing_perm_refused"] for r in rows if "crossing_perm_refused" in r]
    assert refused and "across the 8 output shards" in refused[0], refused
    raised = [r["crossing_perm_raised"] for r in rows if "crossing_perm_raised" in r]
    assert raised and "up/kernel" in raised[0] and "own channels" in raised[0], raised
    rows = [r for r in rows if "collectives" in r]
    return {(r["mode"], r["pattern"], r["shardings"]): {k: tuple(v) for k, v in
                                                        r["collectives"].items()}
            for r in rows}


# The fixture also checks that sharded refreshes (two steps, searches included) give the
# unsharded masks (transposable in every mode, 2:4 on both axes, Bi-Mask under FSDP; Bi-Mask
# with its output split: the unsharded masks for the permutation the shards found).


@pytest.mark.parametrize("mode", ["fsdp", "tp", "both"])
@pytest.mark.parametrize("pattern", ["2:4", "2:4 transposable"])
def test_nm_and_transposable_refresh_add_no_collective(steps, mode, pattern):
    dense = steps[(mode, None, False)]
    assert dense, "the dense step has collectives to compare with"
    assert steps[(mode, pattern, True)] == dense


@pytest.mark.parametrize("mode", ["fsdp", "both"])
def test_without_shardings_the_partitioner_gathers_transposable_kernels(steps, mode):
    dense = steps[(mode, None, False)]
    got = steps[(mode, "2:4 transposable", False)]
    assert got["all-gather"][1] > dense["all-gather"][1] + 256 * 1024 * 4 // 8


# up (256, 1024) and down (1024, 256): output channels per shard
LOCAL_OUT = {"fsdp": (1024, 256), "tp": (1024 // 8, 256 // 8), "both": (1024 // 4, 256 // 4)}


@pytest.mark.parametrize("mode", ["fsdp", "tp", "both"])
def test_bimask_adds_at_most_one_score_all_reduce_per_kernel(steps, mode):
    """Bi-Mask's masks and permutation search run on each shard. Where the contraction is
    split (fsdp, both) the search sums its swap gains over the contraction shards: one
    all-reduce per kernel of ``(out / 2m, m, m)`` float32, 2 floats per output channel of
    the shard, nothing of the kernel's size; with only the output split (tp), nothing."""
    dense, got = steps[(mode, None, False)], steps[(mode, "2:4 bimask", True)]
    extra = {k: (got[k][0] - dense.get(k, (0, 0))[0], got[k][1] - dense.get(k, (0, 0))[1])
             for k in got if got[k] != dense.get(k)}
    assert set(got) == set(dense)
    if mode == "tp":
        assert extra == {}
    else:
        m = 4
        gains = sum(out // (2 * m) * m * m * 4 for out in LOCAL_OUT[mode])
        assert extra == {"all-reduce": (2, gains)}
