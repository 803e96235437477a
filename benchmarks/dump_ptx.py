"""PTX / SASS of one kernel variant: offline (no GPU) through the mosaic-sass tool, or on a
GPU with Mosaic GPU's dump variables.

Offline, from the repository root (the tool lives beside the project, see its README)::

  VARIANT=ws ../shared/tools/mosaic-sass/run benchmarks/dump_ptx.py:build --out /tmp/ws

On a GPU machine (compiles and runs the variant once at a small shape)::

  MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_SASS=1 \\
    MOSAIC_GPU_DUMP_TO=dir PYTHONPATH=. python benchmarks/dump_ptx.py ws
"""

import os
import sys

import jax
import jax.numpy as jnp


def build(m=8192, n=8192, k=1536):
    """mosaic-sass SPEC: ``(fn, args)`` of variant ``$VARIANT`` (default ``ws``), with the
    transposed output the backend runs."""
    from nmjax.kernels import VARIANTS, Packed24, sparse_matmul_24

    cfg = VARIANTS[os.environ.get("VARIANT", "ws")]
    args = [jax.ShapeDtypeStruct((m, k // 2), jnp.bfloat16),
            jax.ShapeDtypeStruct((m // 64, k // 128, 64, 4), jnp.uint32),
            jax.ShapeDtypeStruct((n, k), jnp.bfloat16)]

    def fn(v, meta, b):
        return sparse_matmul_24(Packed24(v, meta), b, config=cfg, transpose_out=True)

    return fn, args


def main(name: str) -> None:
    from nmjax.kernels import VARIANTS

    cfg = VARIANTS[name]
    m, n, k = 2 * cfg.cta_m, 2 * cfg.tile_n * cfg.cluster_n, 512
    fn, _ = build(m, n, k)
    v = jnp.ones((m, k // 2), jnp.bfloat16)
    meta = jnp.full((m // 64, k // 128, 64, 4), 0x44444444, jnp.uint32)  # positions (0, 1)
    b = jnp.ones((n, k), jnp.bfloat16)
    try:
        jax.block_until_ready(fn(v, meta, b))
        print("dump_ptx:", name, "compiled and ran")
    except Exception as e:  # noqa: BLE001  (report and go on: this is a diagnostic)
        print("dump_ptx:", name, "failed:", type(e).__name__, str(e)[:300])


if __name__ == "__main__":
    sys.path.insert(0, ".")
    main(sys.argv[1] if len(sys.argv) > 1 else "ws")
