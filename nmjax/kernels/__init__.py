"""Pallas kernels for 2:4 sparse training on Hopper, each beside its jnp reference."""

from nmjax.kernels.backend import (
    pallas_backend,
    sparse_dense_24,
    sparse_dense_24_input_grad,
)
from nmjax.kernels.pack import (
    Packed24,
    PackedWeight24,
    meta_to_thread_order,
    pack_24,
    pack_rows_24,
    pack_weight_24,
    thread_order_to_positions,
    unpack_24,
    unpack_rows_24,
)
from nmjax.kernels.sparse_matmul import (
    SparseMatmulConfig,
    sparse_matmul_24,
    sparse_matmul_24_reference,
)

__all__ = [
    "pallas_backend",
    "sparse_dense_24",
    "sparse_dense_24_input_grad",
    "Packed24",
    "PackedWeight24",
    "SparseMatmulConfig",
    "meta_to_thread_order",
    "pack_24",
    "pack_rows_24",
    "pack_weight_24",
    "sparse_matmul_24",
    "sparse_matmul_24_reference",
    "thread_order_to_positions",
    "unpack_24",
    "unpack_rows_24",
]
