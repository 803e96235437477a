"""The machine-independent check: build, load, register, and lower both products for CUDA.

Runs without a GPU (``python -m nmjax.kernels.cusparselt check``, ``make cusparselt-check``):
what it cannot check is what the call computes, which ``benchmarks/gpu_cusparselt.py``
measures on a GPU.
"""

from __future__ import annotations

import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from nmjax.kernels.cusparselt import _backend, _build, _ffi


def lower_for_cuda(rows: int = 64, n_in: int = 128, n_out: int = 256,
                   dtype: Any = jnp.bfloat16) -> str:
    """StableHLO of ``forward`` and ``input_grad`` (with a Bi-Mask ``perm``) lowered for the
    CUDA platform, as text. Needs the library loaded (it registers the target)."""
    def products(x, w, fwd, bwd, dy, perm):
        return (_backend.forward(x, w, fwd), _backend.input_grad(dy, w, bwd, None),
                _backend.input_grad(dy, w, bwd, perm))

    s = jax.ShapeDtypeStruct
    args = (s((rows, n_in), dtype), s((n_in, n_out), dtype), s((n_in, n_out), jnp.bool_),
            s((n_in, n_out), jnp.bool_), s((rows, n_out), dtype), s((n_out,), jnp.int32))
    with _ffi.lowering_without_gpu():
        traced = jax.jit(products).trace(*args)
    return traced.lower(lowering_platforms=("cuda",)).as_text()


def custom_calls(text: str) -> list[str]:
    """The lines of ``text`` that call :data:`~nmjax.kernels.cusparselt._ffi.TARGET`."""
    return [line.strip() for line in text.splitlines()
            if f"stablehlo.custom_call @{_ffi.TARGET}" in line]


def check(force_build: bool = False) -> dict[str, Any]:
    """Finds the toolchain, builds (or reuses) the library, loads and registers it, and
    lowers both products for CUDA. Returns what it found and how long each step took.

    Raises:
      BuildError: a piece of the toolchain is missing or the build failed.
      AssertionError: the lowering lacks the expected custom calls.
    """
    report: dict[str, Any] = {}
    t = time.perf_counter()
    toolchain = _build.find_toolchain()
    report["toolchain"] = {k: str(v) for k, v in vars(toolchain).items()}
    t1 = time.perf_counter()
    report["library"] = str(_build.build(toolchain, force=force_build))
    t2 = time.perf_counter()
    header, runtime = _ffi.versions()
    t3 = time.perf_counter()
    text = lower_for_cuda()
    t4 = time.perf_counter()
    calls = custom_calls(text)
    directions = sorted(int(d) for c in calls for d in re.findall(r"direction = (\d+) : i32", c))
    assert directions == [0, 1, 1], f"expected forward + 2 input-grad custom calls, got {calls}"
    assert "gather" in text, "the Bi-Mask input gradient should gather dy and w by perm"
    report.update(header_version=header, runtime_version=runtime, custom_calls=len(calls),
                  seconds=dict(find=t1 - t, build=t2 - t1, load_and_register=t3 - t2,
                               lower=t4 - t3))
    return report
