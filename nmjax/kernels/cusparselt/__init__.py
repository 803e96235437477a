"""``backend="cusparselt"``: both sparse products of a linear layer through NVIDIA cuSPARSELt.

A ``jax.ffi`` custom call runs each 2:4 product (forward ``x @ (w ⊙ fwd)`` and input
gradient ``dy @ (w ⊙ bwd)ᵀ``, Bi-Mask permutation included) on the sparse tensor cores of
any sm_80+ GPU, in bfloat16 or float16 with fp32 accumulation, on XLA's stream and with
XLA's scratch memory. cuSPARSELt compresses ``w`` on the device at every call; plans and
the algorithm choice are cached per shape. There is deliberately no compress-at-mask-refresh
cache: in training ``w`` changes at every optimizer step even when the masks are static, so
a compressed copy is stale one step later, and compressing is one pass over ``w`` fused into
the same custom call (expected to be small next to the GEMM; the GPU benchmark's kernel
breakdown measures it). Only frozen weights (inference) could reuse it, and its size is
opaque to XLA until cuSPARSELt runs on a GPU.

Needs: an NVIDIA GPU of compute capability >= 8.0; ``pip install 'nmjax[cusparselt]'`` (the
nvidia-cusparselt-cu13 wheel); a C++17 compiler and the CUDA runtime headers for the
one-time build at first use (``python -m nmjax.kernels.cusparselt build`` does it ahead;
``$NMJAX_CUSPARSELT_LIBRARY`` names a prebuilt library instead). Sizes: rows a multiple of
8, ``in`` and ``out`` multiples of 16; masks with at most 2 kept in every aligned group of
4 along the contraction axis (2:4, 1:4, 2:8, ...). Elsewhere ``supports`` says why and
``backend="auto"`` keeps the reference; ``"auto"`` picks this backend only for shapes that
``benchmarks/gpu_cusparselt.py`` measured faster than dense XLA on the same device kind.

Importing this package builds and loads nothing.
"""

from nmjax.kernels.cusparselt._backend import (
    DTYPES,
    FEATURE_MULTIPLE,
    ROW_MULTIPLE,
    TABLE_PATH,
    cusparselt_backend,
    fits_24,
    forward,
    input_grad,
    load_table,
    make_backend,
    speedup,
    supports,
)
from nmjax.kernels.cusparselt._build import (
    BuildError,
    Toolchain,
    build,
    find_toolchain,
    unavailable,
)
from nmjax.kernels.cusparselt._ffi import load, plans, versions

__all__ = [
    "DTYPES",
    "FEATURE_MULTIPLE",
    "ROW_MULTIPLE",
    "TABLE_PATH",
    "BuildError",
    "Toolchain",
    "build",
    "cusparselt_backend",
    "find_toolchain",
    "fits_24",
    "forward",
    "input_grad",
    "load",
    "load_table",
    "make_backend",
    "plans",
    "speedup",
    "supports",
    "unavailable",
    "versions",
]
