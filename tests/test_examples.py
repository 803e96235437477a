"""The examples run end to end (fast settings): training, evaluation, checkpoint, resume."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_train_example_fast_with_checkpoint_and_resume(tmp_path):
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "m.json"
    out = _run("examples/train.py", "--fast", "--pattern", "2:4 bimask", "--ckpt-dir", str(ckpt),
               "--json", str(metrics))
    result = json.loads(metrics.read_text())
    assert result["masks_valid"] is True and result["steps"] == 30
    assert result["searches"] == 0 and result["refreshes"] == 30
    assert 0.0 <= result["test_acc"] <= 1.0 and result["final_loss"] > 0
    assert "Dense_0/kernel" in out and "2:4 bimask" in out
    out = _run("examples/train.py", "--fast", "--pattern", "2:4 bimask", "--ckpt-dir", str(ckpt),
               "--resume", "--steps", "40", "--json", str(metrics))
    assert "resumed from" in out and "at step 30" in out
    assert json.loads(metrics.read_text())["steps"] == 40


def test_demo_fast_compares_four_models_and_saves_the_plot(tmp_path):
    png = tmp_path / "demo.png"
    out = _run("examples/demo.py", "--fast", "--out", str(png))
    for label in ("dense", "2:4 N:M (SR-STE)", "2:4 transposable", "2:4 Bi-Mask"):
        assert label in out
    assert "masks valid" in out  # and the exit code says every sparse model's masks were valid
    assert png.stat().st_size > 10_000


def test_lm_example_fast_trains_a_sparse_transformer(tmp_path):
    metrics = tmp_path / "lm.json"
    out = _run("examples/lm.py", "--fast", "--pattern", "4:8 transposable", "--json",
               str(metrics))
    result = json.loads(metrics.read_text())
    assert result["masks_valid"] is True and result["steps"] == 20
    assert 0 < result["val_loss"] < 8
    assert abs(result["val_bpb"] * math.log(2) - result["val_loss"]) < 1e-6
    assert "block_0/mlp_in/kernel" in out and "4:8 transposable" in out


def test_train_example_unstructured_pattern_keeps_the_density():
    sys.path.insert(0, str(ROOT / "examples"))
    import jax
    import jax.numpy as jnp
    from train import rule_for

    import nmjax.plan

    rule = rule_for("2:8 unstructured")
    w = jax.random.normal(jax.random.key(0), (64, 32))
    masks = rule.pattern(w)
    assert int(masks.fwd.sum()) == 64 * 32 // 4
    kept = jnp.abs(w)[masks.fwd]
    assert float(kept.min()) >= float(jnp.abs(w)[~masks.fwd].max())
    plan = nmjax.plan.plan_for_params({"Conv_0": {"kernel": jnp.zeros((3, 3, 1, 8))},
                                       "Conv_1": {"kernel": jnp.zeros((3, 3, 8, 16))}}, rule)
    assert plan.paths == ("Conv_1/kernel",)                              # I = 1: dense
    assert plan.by_path["Conv_1/kernel"].layout.contract == (0, 1, 2)
