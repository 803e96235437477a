"""Loading the handler library, registering its XLA FFI target, and the one custom call."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading

import jax
import numpy as np

from nmjax.kernels.cusparselt import _build

TARGET = "nmjax_cusparselt_spmm"
FORWARD, INPUT_GRAD = 0, 1

_load_lock = threading.Lock()
_lowering = threading.local()


@contextlib.contextmanager
def lowering_without_gpu():
    """Lets :func:`spmm` trace in a process without a GPU, for lowering to CUDA only (the
    CPU-side check); running the result still needs a GPU."""
    _lowering.allowed = True
    try:
        yield
    finally:
        _lowering.allowed = False


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


@functools.cache
def load() -> ctypes.CDLL:
    """Builds (first use only) and loads the handler library, and registers :data:`TARGET`
    for the CUDA platform. Returns the library (its host helpers are plain C functions).

    Raises:
      BuildError: no prebuilt library and no toolchain to build one, a failed compile, or a
        library that cannot be loaded (the message says which).
    """
    with _load_lock:
        path = _build.prebuilt() or _build.build()
        # The handler library links libcusparseLt.so.0 and libcudart by soname; loading the
        # ones found here first (RTLD_GLOBAL) satisfies those names wherever it was built.
        for dep in _build.runtime_libraries():
            try:
                ctypes.CDLL(str(dep), mode=ctypes.RTLD_GLOBAL)
            except OSError as e:
                raise _build.BuildError(f"cannot load {dep}: {e}") from e
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise _build.BuildError(f"cannot load the cuSPARSELt FFI library {path}: {e}") from e
        for name in ("nmjax_cusparselt_header_version", "nmjax_cusparselt_runtime_version",
                     "nmjax_cusparselt_plan_count"):
            getattr(lib, name).restype = ctypes.c_int
        lib.nmjax_cusparselt_describe_plans.restype = ctypes.c_int
        lib.nmjax_cusparselt_describe_plans.argtypes = [ctypes.c_char_p, ctypes.c_int]
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.NmjaxCusparseltSpmm),
                                    platform="CUDA")
        return lib


def versions() -> tuple[int, int]:
    """``(header, runtime)`` cuSPARSELt versions of the loaded library
    (``major·10⁴ + minor·100 + patch``; the runtime one is ``-1`` if the query failed)."""
    lib = load()
    return lib.nmjax_cusparselt_header_version(), lib.nmjax_cusparselt_runtime_version()


def plans() -> list[dict]:
    """The plans cached in this process, one per (device, direction, dtype, shape, search):
    ``direction`` (0 forward, 1 input grad), ``dtype``, ``gemm`` ``(M, N, K)``, ``search``,
    ``alg_id`` (cuSPARSELt's algorithm config id), ``workspace`` and ``compressed`` bytes."""
    lib = load()
    size = lib.nmjax_cusparselt_describe_plans(None, 0) + 1
    buf = ctypes.create_string_buffer(size)
    lib.nmjax_cusparselt_describe_plans(buf, size)
    out = []
    for line in buf.value.decode().splitlines():
        d, dtype, m, n, k, search, alg, ws, comp = line.split()
        out.append(dict(direction=int(d), dtype=dtype, gemm=(int(m), int(n), int(k)),
                        search=bool(int(search)), alg_id=int(alg), workspace=int(ws),
                        compressed=int(comp)))
    return out


def spmm(w_masked: jax.Array, dense: jax.Array, *, direction: int, search: bool) -> jax.Array:
    """The custom call: ``dense @ w_masked`` (forward) or ``dense @ w_maskedᵀ`` (input grad).

    Args:
      w_masked: ``(in, out)``, zeros outside the mask; at most 2 nonzeros in every aligned
        group of 4 along ``in`` (forward) or ``out`` (input grad).
      dense: ``(rows, in)`` (forward) or ``(rows, out)`` (input grad), ``w_masked``'s dtype.
      direction: :data:`FORWARD` or :data:`INPUT_GRAD`.
      search: run cuSPARSELt's algorithm search on the first call of each shape.

    Returns:
      ``(rows, out)`` (forward) or ``(rows, in)`` (input grad), ``dense``'s dtype.

    Raises:
      ValueError: this process has no GPU (checked before anything is built or loaded).
    """
    if not getattr(_lowering, "allowed", False) and not _has_gpu():
        raise ValueError(
            "the cusparselt backend runs on NVIDIA GPUs (compute capability >= 8.0); this "
            f"process has none ({jax.devices()[0].platform} only); use backend='reference' or "
            "'auto'")
    load()
    cols = w_masked.shape[1] if direction == FORWARD else w_masked.shape[0]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((dense.shape[0], cols), dense.dtype),
                            vmap_method="sequential")
    # the handler declares direction as int32: an untyped Python int would lower as i64
    return call(w_masked, dense, direction=np.int32(direction), search=bool(search))
