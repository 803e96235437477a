"""The cuSPARSELt backend on the CPU: what it supports and why not, its speedup table and
the "auto" rules, argument checks, the layout contract of its products (with the custom call
replaced by its fp32 meaning), the toolchain search, and — where the toolchain is installed —
the real build, registration and CUDA lowering. What the call computes on a GPU is checked by
benchmarks/gpu_cusparselt.py."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nmjax import backends
from nmjax.backends import REFERENCE, Problem
from nmjax.kernels import cusparselt as cslt
from nmjax.kernels.cusparselt import _backend, _build, _check, _ffi
from nmjax.masks import nm_mask, transposable_mask

REPO = Path(__file__).resolve().parent.parent
H100 = "NVIDIA H100 80GB HBM3"


def problem(**kw) -> Problem:
    base = dict(direction="forward", rows=64, n_in=128, n_out=256, dtype=jnp.bfloat16,
                platform="gpu", device_kind=H100, compute_capability="9.0", nm=(2, 4),
                permuted=False)
    base.update(kw)
    return Problem(**base)


def entry(speedup, gemm=(256, 64, 128), **kw):
    e = dict(device_kind=H100, direction="forward", dtype="bfloat16", permuted=False,
             gemm=list(gemm), speedup=speedup)
    e.update(kw)
    return e


def available():
    return None


# ------------------------------------------------------------------------------- supports


@pytest.mark.parametrize("fields, needle", [
    (dict(platform="cpu", compute_capability=None, device_kind="cpu"), "this device is cpu"),
    (dict(compute_capability="7.5", device_kind="Tesla T4"), "Tesla T4 has 7.5"),
    (dict(compute_capability=None), "compute capability >= 8.0"),
    (dict(dtype=jnp.float32), "dtype float32"),
    (dict(nm=None), "not declared"),
    (dict(nm=(4, 8)), "(4, 8) can keep more than 2"),
    (dict(nm=(2, 3)), "(2, 3) can keep more than 2"),
    (dict(direction="input_grad", nm=(4, 8)), "along out"),
    (dict(rows=12), "rows=12 (multiple of 8)"),
    (dict(n_in=40), "in=40 (multiple of 16)"),
    (dict(n_out=0), "out=0"),
])
def test_supports_names_the_reason(fields, needle):
    reason = _backend.supports(problem(**fields), availability=available)
    assert reason is not None and needle in reason, reason


@pytest.mark.parametrize("fields", [
    dict(),
    dict(dtype=jnp.float16),
    dict(compute_capability="8.0", device_kind="NVIDIA A100-SXM4-80GB"),
    dict(compute_capability="8.9", device_kind="NVIDIA L4"),
    dict(nm=(1, 4)), dict(nm=(2, 8)), dict(nm=(1, 2)),
    dict(direction="input_grad", permuted=True),
    dict(rows=8, n_in=16, n_out=16),
])
def test_supports_accepts(fields):
    assert _backend.supports(problem(**fields), availability=available) is None


def test_supports_reports_a_missing_toolchain_and_checks_it_only_on_a_gpu():
    calls = []

    def missing():
        calls.append(1)
        return "no cuSPARSELt (cusparseLt.h and libcusparseLt.so.0): pip install ..."

    assert "no cuSPARSELt" in _backend.supports(problem(), availability=missing)
    assert len(calls) == 1
    # static reasons come first: a CPU machine never looks for compilers or libraries
    _backend.supports(problem(platform="cpu"), availability=missing)
    _backend.supports(problem(dtype=jnp.float32), availability=missing)
    assert len(calls) == 1


@pytest.mark.parametrize("nm, ok", [
    ((2, 4), True), ((1, 4), True), ((1, 2), True), ((2, 8), True), ((1, 8), True),
    ((2, 16), True), ((3, 8), False), ((4, 8), False), ((2, 2), False), ((1, 1), False),
    ((2, 3), False), ((1, 3), True), ((2, 6), False), ((2, 5), False), (None, False),
])
def test_fits_24(nm, ok):
    assert cslt.fits_24(nm) is ok


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 8])
def test_fits_24_agrees_with_every_mask(m):
    """Brute force: all masks with n kept per group of m over one period lcm(4, m)."""
    period = int(np.lcm(4, m))
    for n in range(1, m + 1):
        groups = list(itertools.combinations(range(m), n))
        most = 0
        for choice in itertools.product(groups, repeat=period // m):
            mask = np.zeros(period, int)
            for g, kept in enumerate(choice):
                mask[[g * m + k for k in kept]] = 1
            most = max(most, mask.reshape(-1, 4).sum(1).max())
        assert cslt.fits_24((n, m)) == (most <= 2), (n, m, most)


# --------------------------------------------------------------------------- speedup table


def test_speedup_takes_the_nearest_measured_shape_of_this_device_kind():
    table = [entry(1.4, (256, 64, 128)), entry(0.7, (4096, 4096, 4096))]
    assert _backend.speedup(problem(), table) == 1.4
    assert _backend.speedup(problem(rows=128), table) == 1.4  # one factor of 2 away
    assert _backend.speedup(problem(rows=256), table) == 0.0  # two: unknown
    assert _backend.speedup(problem(rows=4096, n_in=4096, n_out=4096), table) == 0.7
    assert _backend.speedup(problem(device_kind="NVIDIA A100-SXM4-80GB"), table) == 0.0
    assert _backend.speedup(problem(dtype=jnp.float16), table) == 0.0
    assert _backend.speedup(problem(direction="input_grad"), table) == 0.0
    # input_grad's GEMM is (in, rows, out)
    grad = [entry(1.2, (128, 64, 256), direction="input_grad", permuted=True)]
    assert _backend.speedup(problem(direction="input_grad", permuted=True), grad) == 1.2
    assert _backend.speedup(problem(direction="input_grad"), grad) == 0.0
    assert _backend.speedup(problem(), ()) == 0.0


def test_packaged_table_is_valid(tmp_path):
    entries = cslt.load_table()
    assert isinstance(entries, tuple)
    assert cslt.cusparselt_backend().speedup(problem(platform="cpu")) == 0.0
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({"entries": [{"device_kind": H100}]}))
    with pytest.raises(ValueError, match="lacks one of"):
        cslt.load_table(bad)
    bad.write_text("[]")
    with pytest.raises(ValueError, match="no 'entries' list"):
        cslt.load_table(bad)


# ------------------------------------------------------------------------------ backend


def test_backend_is_one_cached_value_and_the_named_factory():
    b = cslt.cusparselt_backend()
    assert b is cslt.cusparselt_backend() and hash(b) == hash(cslt.cusparselt_backend())
    assert b.name == "cusparselt"
    assert backends.FACTORIES["cusparselt"] == "nmjax.kernels.cusparselt:cusparselt_backend"
    assert backends.named("cusparselt") is b
    assert backends.check_backend("cusparselt") is b
    assert cslt.cusparselt_backend(search=False) is not b


@pytest.fixture
def candidates(monkeypatch):
    """Makes ``"auto"`` see the given cusparselt backend (and no other kernel backend)."""
    chosen = {}

    def named(name):
        if name == "cusparselt" and "backend" in chosen:
            return chosen["backend"]
        raise ImportError(f"{name} not here")

    monkeypatch.setattr(backends, "named", named)
    return chosen


@pytest.mark.parametrize("fields, table_speedup, picked", [
    (dict(), 1.3, "cusparselt"),
    (dict(), 0.9, "reference"),        # measured, slower than dense
    (dict(), None, "reference"),       # never measured
    (dict(dtype=jnp.float32), 1.3, "reference"),
    (dict(nm=None), 1.3, "reference"),
    (dict(nm=(4, 8)), 1.3, "reference"),
    (dict(rows=12), 1.3, "reference"),
    (dict(compute_capability="7.5"), 1.3, "reference"),
    (dict(platform="cpu"), 1.3, "reference"),
])
def test_auto_picks_cusparselt_only_where_supported_and_measured_faster(
        candidates, fields, table_speedup, picked):
    p = problem(**fields)
    table = [] if table_speedup is None else [
        entry(table_speedup, dtype=jnp.dtype(p.dtype).name)]
    candidates["backend"] = _backend.make_backend(table, availability=available)
    assert backends.resolve("auto", p).name == picked


def test_auto_keeps_the_reference_when_the_library_cannot_be_built(candidates):
    candidates["backend"] = _backend.make_backend(
        [entry(1.5)], availability=lambda: "no C++ compiler (install g++ or set CXX)")
    assert backends.resolve("auto", problem()) is REFERENCE


def test_explicit_backend_that_cannot_run_raises_with_its_reason():
    b = _backend.make_backend([entry(1.5)], availability=available)
    assert backends.resolve(b, problem()) is b
    with pytest.raises(ValueError, match="dtype float32 is not supported"):
        backends.resolve(b, problem(dtype=jnp.float32))
    with pytest.raises(ValueError, match="this device is cpu"):
        backends.resolve(cslt.cusparselt_backend(), problem(platform="cpu"))


# --------------------------------------------------------------------- products on the CPU


@pytest.fixture
def fp32_call(monkeypatch):
    """Replaces the custom call by what it computes (in fp32), recording its arguments, so
    the Python half of the products (masking, permutation, layout, checks) runs here."""
    calls = []

    def spmm(w_masked, dense, *, direction, search):
        calls.append(dict(w=w_masked, dense=dense, direction=direction, search=search))
        w32, d32 = w_masked.astype(jnp.float32), dense.astype(jnp.float32)
        out = d32 @ w32 if direction == _ffi.FORWARD else d32 @ w32.T
        return out.astype(dense.dtype)

    monkeypatch.setattr(_ffi, "spmm", spmm)
    return calls


def layer(key, rows=32, n_in=64, n_out=128, dtype=jnp.bfloat16):
    k1, k2, k3 = jax.random.split(key, 3)
    w = jax.random.normal(k1, (n_in, n_out), jnp.float32)
    x = jax.random.normal(k2, (rows, n_in), jnp.float32).astype(dtype)
    dy = jax.random.normal(k3, (rows, n_out), jnp.float32).astype(dtype)
    return x, w.astype(dtype), dy, transposable_mask(jnp.abs(w), 2, 4)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_products_match_the_reference(fp32_call, dtype):
    x, w, dy, mask = layer(jax.random.key(0), dtype=dtype)
    perm = jax.random.permutation(jax.random.key(1), w.shape[1])
    bwd = nm_mask(jnp.abs(jnp.where(mask, w, 0)[:, perm].astype(jnp.float32)), 2, 4, axis=1)
    bwd = jnp.zeros_like(bwd).at[:, perm].set(bwd) & mask  # 2:4 along out in perm order
    got = [cslt.forward(x, w, mask), cslt.input_grad(dy, w, mask, None),
           cslt.input_grad(dy, w, bwd, perm)]
    want = [REFERENCE.forward(x, w, mask), REFERENCE.input_grad(dy, w, mask, None),
            REFERENCE.input_grad(dy, w, bwd, perm)]
    for g, r in zip(got, want, strict=True):
        assert g.dtype == dtype and g.shape == r.shape
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                                   rtol=2e-2, atol=2e-2)
    fwd_call, grad_call, perm_call = fp32_call
    assert [c["direction"] for c in fp32_call] == [0, 1, 1]
    assert all(c["search"] for c in fp32_call)
    # the custom call sees the masked kernel (in, out), dense operands row-major as given
    np.testing.assert_array_equal(fwd_call["w"], jnp.where(mask, w, 0))
    assert fwd_call["dense"] is x and grad_call["dense"] is dy
    # Bi-Mask: columns of w and dy gathered into perm order, so groups are consecutive
    np.testing.assert_array_equal(perm_call["w"], jnp.where(bwd, w, 0)[:, perm])
    np.testing.assert_array_equal(perm_call["dense"], dy[:, perm])


def test_products_under_jit_with_traced_masks(fp32_call):
    x, w, dy, mask = layer(jax.random.key(2))
    perm = jnp.arange(w.shape[1])[::-1]
    y = jax.jit(cslt.forward)(x, w, mask)
    dx = jax.jit(cslt.input_grad)(dy, w, mask, perm)
    np.testing.assert_allclose(np.asarray(y, np.float32),
                               np.asarray(REFERENCE.forward(x, w, mask), np.float32), rtol=2e-2,
                               atol=2e-2)
    np.testing.assert_allclose(np.asarray(dx, np.float32),
                               np.asarray(REFERENCE.input_grad(dy, w, mask, perm), np.float32),
                               rtol=2e-2, atol=2e-2)


def test_backend_search_flag_reaches_the_call(fp32_call):
    x, w, _, mask = layer(jax.random.key(3))
    cslt.cusparselt_backend(search=False).forward(x, w, mask)
    assert fp32_call[-1]["search"] is False


@pytest.fixture
def no_call(monkeypatch):
    def spmm(*args, **kwargs):
        raise AssertionError("bad arguments must be refused before the custom call")

    monkeypatch.setattr(_ffi, "spmm", spmm)


def test_argument_checks(no_call):
    x, w, dy, mask = layer(jax.random.key(4))
    with pytest.raises(TypeError, match="x2d has dtype float32"):
        cslt.forward(x.astype(jnp.float32), w, mask)
    with pytest.raises(TypeError, match="must share a dtype"):
        cslt.forward(x, w.astype(jnp.float16), mask)
    with pytest.raises(TypeError, match="boolean"):
        cslt.forward(x, w, mask.astype(jnp.int32))
    with pytest.raises(ValueError, match=r"x2d has shape \(32, 128\).*in=64"):
        cslt.forward(dy, w, mask)
    with pytest.raises(ValueError, match=r"mask has shape \(64, 64\)"):
        cslt.forward(x, w, mask[:, :64])
    with pytest.raises(ValueError, match=r"2-D"):
        cslt.forward(x[None], w, mask)
    with pytest.raises(ValueError, match=r"\(rows, in, out\)=\(12, 64, 128\)"):
        cslt.forward(x[:12], w, mask)
    with pytest.raises(ValueError, match=r"\(rows, in, out\)=\(32, 72, 128\)"):
        cslt.forward(jnp.ones((32, 72), x.dtype), jnp.ones((72, 128), w.dtype),
                     jnp.ones((72, 128), bool))
    with pytest.raises(ValueError, match=r"dy2d has shape \(32, 64\).*out=128"):
        cslt.input_grad(x, w, mask, None)
    with pytest.raises(TypeError, match="perm must be an integer array"):
        cslt.input_grad(dy, w, mask, jnp.zeros(128, jnp.float32))
    with pytest.raises(ValueError, match=r"perm has shape \(64,\)"):
        cslt.input_grad(dy, w, mask, jnp.arange(64))


def test_concrete_masks_must_keep_at_most_two_of_four(no_call):
    x, w, dy, mask = layer(jax.random.key(5))
    dense3 = mask.at[0:3, 5].set(True).at[3, 5].set(False)  # 3 of the group rows 0..3
    with pytest.raises(ValueError, match=r"fwd_mask keeps 3 of 4 in aligned group 0 along axis 0"):
        cslt.forward(x, w, dense3)
    along_out = mask.at[7, 0:3].set(True).at[7, 3].set(False)
    with pytest.raises(ValueError, match=r"bwd_mask keeps 3 of 4 .* along axis 1"):
        cslt.input_grad(dy, w, along_out, None)
    # 2:4 in the original order but not in perm order: the check runs on bwd_mask[:, perm]
    row = np.zeros(128, bool)
    row[[0, 1, 4, 5]] = True
    bwd = jnp.asarray(np.tile(row, (64, 1)))
    perm = jnp.asarray(np.r_[[0, 1, 4, 5], np.setdiff1d(np.arange(128), [0, 1, 4, 5])])
    with pytest.raises(ValueError, match=r"bwd_mask\[:, perm\] keeps 4 of 4"):
        cslt.input_grad(dy, w, bwd, perm)


# ---------------------------------------------------------------------- toolchain search


def touch(path: Path, executable: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 1\n" if executable else "// test\n")
    if executable:
        path.chmod(0o755)
    return path


@pytest.fixture
def no_system_cuda(monkeypatch):
    """Only CUDA_HOME/CUDA_PATH count as CUDA roots (not this machine's /usr/local/cuda)."""
    monkeypatch.setattr(_build, "_cuda_roots", lambda env: [
        Path(env[k]) for k in ("CUDA_HOME", "CUDA_PATH") if env.get(k)])


def test_missing_toolchain_names_every_piece(no_system_cuda, tmp_path):
    with pytest.raises(cslt.BuildError) as e:
        cslt.find_toolchain({"CXX": str(tmp_path / "no-g++"), "PATH": ""}, nvidia_dirs=[])
    msg = str(e.value)
    assert "no C++ compiler" in msg and "no-g++" in msg
    assert "no CUDA runtime headers" in msg and "CUDA_HOME" in msg
    assert "no cuSPARSELt" in msg and "nmjax[cusparselt]" in msg
    assert "NMJAX_CUSPARSELT_ROOT" in msg


def test_toolchain_from_wheels_and_from_env(no_system_cuda, tmp_path):
    cxx = touch(tmp_path / "bin" / "g++", executable=True)
    nvidia = tmp_path / "site-packages" / "nvidia"
    touch(nvidia / "cu13" / "include" / "cuda_runtime_api.h")
    touch(nvidia / "cu13" / "lib" / "libcudart.so.13")
    touch(nvidia / "cusparselt" / "include" / "cusparseLt.h")  # 0.8 wheel layout
    touch(nvidia / "cusparselt" / "lib" / "libcusparseLt.so.0")
    env = {"PATH": str(cxx.parent)}
    tc = cslt.find_toolchain(env, nvidia_dirs=[nvidia])
    assert tc.cxx == str(cxx)
    assert tc.cuda_include == str(nvidia / "cu13" / "include")
    assert tc.cudart == str(nvidia / "cu13" / "lib" / "libcudart.so.13")
    assert tc.cusparselt == str(nvidia / "cusparselt" / "lib" / "libcusparseLt.so.0")
    # NMJAX_CUSPARSELT_ROOT and CUDA_HOME win over the wheels
    root = tmp_path / "cslt"
    touch(root / "include" / "cusparseLt.h")
    touch(root / "lib64" / "libcusparseLt.so.0")
    cuda = tmp_path / "cuda"
    touch(cuda / "include" / "cuda_runtime_api.h")
    touch(cuda / "lib64" / "libcudart.so")
    env.update(NMJAX_CUSPARSELT_ROOT=str(root), CUDA_HOME=str(cuda))
    tc = cslt.find_toolchain(env, nvidia_dirs=[nvidia])
    assert tc.cusparselt == str(root / "lib64" / "libcusparseLt.so.0")
    assert tc.cudart == str(cuda / "lib64" / "libcudart.so")
    assert [p.name for p in _build.runtime_libraries(env, [nvidia])] == [
        "libcudart.so", "libcusparseLt.so.0"]


def fake_toolchain(tmp_path, cxx) -> cslt.Toolchain:
    header = touch(tmp_path / "cslt" / "include" / "cusparseLt.h")
    return cslt.Toolchain(cxx=cxx, jax_include=str(tmp_path), cuda_include=str(tmp_path),
                          cudart=str(tmp_path / "libcudart.so"),
                          cusparselt_include=str(header.parent),
                          cusparselt=str(tmp_path / "libcusparseLt.so.0"))


def test_cache_location(tmp_path):
    assert _build.cache_dir({"NMJAX_CUSPARSELT_CACHE": "/x/y"}) == Path("/x/y")
    assert _build.cache_dir({"XDG_CACHE_HOME": "/c"}) == Path("/c/nmjax")
    tc = fake_toolchain(tmp_path, None)
    path = _build.library_path(tc, {"NMJAX_CUSPARSELT_CACHE": str(tmp_path)})
    assert path.parent == tmp_path and path.name.startswith("libnmjax_cusparselt-")
    # another cuSPARSELt header (an upgrade) is another library
    Path(tc.cusparselt_include, "cusparseLt.h").write_text("// 0.11\n")
    assert _build.library_path(tc, {"NMJAX_CUSPARSELT_CACHE": str(tmp_path)}) != path


def test_build_reuses_the_cache_and_needs_a_compiler_only_to_compile(tmp_path):
    env = {"NMJAX_CUSPARSELT_CACHE": str(tmp_path / "cache")}
    tc = fake_toolchain(tmp_path, None)
    with pytest.raises(cslt.BuildError, match="no C\\+\\+ compiler"):
        cslt.build(tc, env=env | {"CXX": str(tmp_path / "none"), "PATH": ""})
    cached = touch(_build.library_path(tc, env))
    assert cslt.build(tc, env=env) == cached


def test_compiler_failure_is_reported_with_its_output(tmp_path):
    failing = touch(tmp_path / "bin" / "g++", executable=True)
    failing.write_text("#!/bin/sh\necho 'fatal error: cusparseLt.h: No such file' >&2\nexit 3\n")
    env = {"NMJAX_CUSPARSELT_CACHE": str(tmp_path / "cache")}
    with pytest.raises(cslt.BuildError, match=r"(?s)failed \(exit 3\).*No such file"):
        cslt.build(fake_toolchain(tmp_path, str(failing)), env=env)
    assert not list((tmp_path / "cache").glob("*.so"))  # no half-written library left


def test_prebuilt_library_must_exist(tmp_path):
    assert _build.prebuilt({}) is None
    lib = touch(tmp_path / "lib.so")
    assert _build.prebuilt({"NMJAX_CUSPARSELT_LIBRARY": str(lib)}) == lib
    with pytest.raises(cslt.BuildError, match="names no file"):
        _build.prebuilt({"NMJAX_CUSPARSELT_LIBRARY": str(tmp_path / "missing.so")})


def test_import_builds_and_loads_nothing(tmp_path):
    cache = tmp_path / "cache"
    code = (
        "import nmjax.kernels.cusparselt as c, jax.numpy as jnp\n"
        "from nmjax.backends import Problem\n"
        "b = c.cusparselt_backend()\n"
        "p = Problem('forward', 64, 128, 256, jnp.bfloat16, 'cpu', 'cpu', None, (2, 4), False)\n"
        "assert 'this device is cpu' in b.supports(p)\n"
        "maps = open('/proc/self/maps').read()\n"
        "assert 'cusparseLt' not in maps and 'nmjax_cusparselt' not in maps, 'loaded'\n"
        "print('clean')\n")
    env = dict(os.environ, NMJAX_CUSPARSELT_CACHE=str(cache), PYTHONPATH=str(REPO),
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr[-2000:]
    assert not cache.exists()


# ----------------------------------------------- the real build (where the toolchain is)


@pytest.mark.skipif(_build.unavailable() is not None,
                    reason=f"cuSPARSELt FFI library cannot be built here: {_build.unavailable()}")
def test_build_register_and_lower_for_cuda(tmp_path, monkeypatch):
    monkeypatch.setenv("NMJAX_CUSPARSELT_CACHE", str(tmp_path))
    monkeypatch.delenv("NMJAX_CUSPARSELT_LIBRARY", raising=False)
    _ffi.load.cache_clear()  # build into the empty cache, load and register again
    try:
        report = _check.check()
    finally:
        _ffi.load.cache_clear()
    assert Path(report["library"]).parent == tmp_path and Path(report["library"]).is_file()
    assert report["header_version"] == report["runtime_version"] > 0
    text = _check.lower_for_cuda(rows=24, n_in=32, n_out=48, dtype=jnp.float16)
    calls = _check.custom_calls(text)
    assert len(calls) == 3
    assert "tensor<32x48xf16>, tensor<24x32xf16>) -> tensor<24x48xf16>" in calls[0]
    assert "direction = 1 : i32" in calls[1] and "-> tensor<24x32xf16>" in calls[1]


def test_products_refuse_a_process_without_gpu_before_building(monkeypatch):
    def load():
        raise AssertionError("nothing may be built or loaded without a GPU")

    monkeypatch.setattr(_ffi, "load", load)
    x, w, dy, mask = layer(jax.random.key(6))
    with pytest.raises(ValueError, match="runs on NVIDIA GPUs.*cpu only"):
        cslt.forward(x, w, mask)
    with pytest.raises(ValueError, match="runs on NVIDIA GPUs"):
        jax.jit(cslt.input_grad)(dy, w, mask, None)


def test_runtime_libraries_need_no_headers(no_system_cuda, tmp_path):
    """A prebuilt library runs where only the wheels' shared libraries are installed."""
    nvidia = tmp_path / "nvidia"
    touch(nvidia / "cu13" / "lib" / "libcudart.so.13")
    touch(nvidia / "cu13" / "include" / "cusparseLt.h")
    touch(nvidia / "cu13" / "lib" / "libcusparseLt.so.0")
    libs = _build.runtime_libraries({"PATH": ""}, [nvidia])
    assert libs == [nvidia / "cu13" / "lib" / "libcudart.so.13",
                    nvidia / "cu13" / "lib" / "libcusparseLt.so.0"]
    with pytest.raises(cslt.BuildError, match="no CUDA runtime headers"):
        cslt.find_toolchain({"PATH": ""}, nvidia_dirs=[nvidia], need_compiler=False)
