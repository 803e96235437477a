"""Pallas kernels for 2:4 sparse training on Hopper, each beside its jnp reference.

* packing into the sparse ``wgmma`` operand order, on top of :mod:`nmjax.format`
  (:func:`pack_24`, :func:`pack_weight_24`; with static masks :func:`plan_weight_24` once
  and :func:`pack_weight_values_24` per step);
* the sparse GEMM :func:`sparse_matmul_24` (:data:`VARIANTS` names the kernels kept) and
  its reference :func:`sparse_matmul_24_reference`;
* :func:`pallas_backend`, the :class:`nmjax.backends.Backend` running both sparse products
  of a linear layer through the kernel. Importing this package registers nothing.
"""

from nmjax.kernels._backend import measured_config, measured_table, pallas_backend
from nmjax.kernels._common import SparseMatmulConfig
from nmjax.kernels._matmul import VARIANTS, sparse_matmul_24, sparse_matmul_24_reference
from nmjax.kernels._pack import (
    Packed24,
    PackedWeight24,
    Plan24,
    WeightPlan24,
    canonical_to_wgmma_meta,
    forward_operand,
    from_format,
    pack_24,
    pack_weight_24,
    pack_weight_values_24,
    plan_24,
    plan_weight_24,
    unpack_24,
    values_24,
    wgmma_to_canonical_meta,
)

__all__ = [
    "VARIANTS",
    "Packed24",
    "PackedWeight24",
    "Plan24",
    "SparseMatmulConfig",
    "WeightPlan24",
    "canonical_to_wgmma_meta",
    "forward_operand",
    "from_format",
    "measured_config",
    "measured_table",
    "pack_24",
    "pack_weight_24",
    "pack_weight_values_24",
    "pallas_backend",
    "plan_24",
    "plan_weight_24",
    "sparse_matmul_24",
    "sparse_matmul_24_reference",
    "unpack_24",
    "values_24",
    "wgmma_to_canonical_meta",
]


def __getattr__(name: str):
    # nmjax.backends builds "cusparselt" from nmjax.kernels:cusparselt_backend; that
    # subpackage is optional, and a missing one surfaces as the ImportError backends expects.
    if name == "cusparselt_backend":
        from nmjax.kernels.cusparselt import cusparselt_backend

        return cusparselt_backend
    raise AttributeError(f"module 'nmjax.kernels' has no attribute {name!r}")
