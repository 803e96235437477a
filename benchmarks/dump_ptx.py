"""Compiles one kernel variant at a small shape with Mosaic GPU's PTX/ptxas dumps on.

  MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_TO=dir \\
    PYTHONPATH=. python benchmarks/dump_ptx.py ws
"""

import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, ".")
from benchmarks.kernels import P, S, get_config  # noqa: E402

name = sys.argv[1] if len(sys.argv) > 1 else "ws"
cfg = get_config(name)
m, n, k = 2 * cfg.cta_m, 2 * cfg.tile_n, 512
v = jnp.zeros((m, k // 2), jnp.bfloat16)
mt = jnp.zeros((m // 64, k // 32, 64), jnp.uint32)
b = jnp.zeros((n, k), jnp.bfloat16)
try:
    jax.block_until_ready(S.sparse_matmul_24(P.Packed24(v, mt), b, config=cfg,
                                             transpose_out=True))
    print("dump_ptx:", name, "compiled and ran")
except Exception as e:  # noqa: BLE001
    print("dump_ptx:", name, "failed:", type(e).__name__, str(e)[:300])
