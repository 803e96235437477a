"""Finding the toolchain and building the cuSPARSELt FFI library once, into a user cache.

What the build needs (each found as described; the first hit wins):

* a C++17 compiler: ``$CXX``, else ``g++``, ``c++`` or ``clang++`` on ``PATH``;
* jax's FFI headers: ``jax.ffi.include_dir()`` (shipped with jaxlib);
* CUDA runtime headers and ``libcudart``: ``$CUDA_HOME`` / ``$CUDA_PATH``, the ``nvcc`` on
  ``PATH``, ``/usr/local/cuda``, then the ``nvidia`` wheels in ``site-packages``
  (``nvidia/cu13``, ``nvidia/cuda_runtime``);
* cuSPARSELt's header and ``libcusparseLt.so.0``: ``$NMJAX_CUSPARSELT_ROOT``, then the
  ``nvidia-cusparselt-cu13`` (or ``-cu12``) wheel in ``site-packages`` (``pip install
  'nmjax[cusparselt]'``), then ``$CUDA_HOME``.

The library goes to ``$NMJAX_CUSPARSELT_CACHE`` (default ``$XDG_CACHE_HOME/nmjax`` or
``~/.cache/nmjax``) under a name that hashes the handler source, the jaxlib version, the
cuSPARSELt header and the flags, so an upgrade of any of them builds a fresh one. A build
takes a few seconds; concurrent processes wait on a file lock and share the result.
``$NMJAX_CUSPARSELT_LIBRARY`` names a prebuilt library to use instead (no build).
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

SOURCE = Path(__file__).with_name("nmjax_cusparselt.cc")
# cusparse.h stand-in for cuSPARSELt headers before 0.9 where no cuSPARSE header exists.
COMPAT_INCLUDE = Path(__file__).with_name("compat")
LIBRARY_STEM = "libnmjax_cusparselt"
# -static-libstdc++: the library then loads beside any libstdc++ the process already has
# (a library built here also runs on a machine whose compiler is older or absent).
CXXFLAGS = ("-std=c++17", "-O2", "-shared", "-fPIC", "-static-libstdc++", "-static-libgcc")
ENV_LIBRARY = "NMJAX_CUSPARSELT_LIBRARY"
ENV_ROOT = "NMJAX_CUSPARSELT_ROOT"
ENV_CACHE = "NMJAX_CUSPARSELT_CACHE"
INSTALL_HINT = ("pip install 'nmjax[cusparselt]' (it brings the nvidia-cusparselt-cu13 wheel), "
                f"or set {ENV_ROOT} to a directory holding include/cusparseLt.h and "
                "lib/libcusparseLt.so.0")

_log = logging.getLogger(__name__)


class BuildError(RuntimeError):
    """The cuSPARSELt FFI library cannot be built or loaded here; the message says why."""


@dataclasses.dataclass(frozen=True)
class Toolchain:
    """Everything a build needs, as absolute paths.

    Attributes:
      cxx: the C++ compiler (``None`` when only loading an already built library).
      jax_include: jax's FFI headers (``xla/ffi/api/ffi.h``).
      cuda_include: CUDA runtime headers (``cuda_runtime_api.h``).
      cudart: the ``libcudart`` shared library to link and preload.
      cusparselt_include: directory of ``cusparseLt.h``.
      cusparselt: ``libcusparseLt.so.0``.
    """

    cxx: str | None
    jax_include: str
    cuda_include: str
    cudart: str
    cusparselt_include: str
    cusparselt: str


def _nvidia_dirs() -> list[Path]:
    """The directories of the ``nvidia`` namespace package (pip's CUDA wheels)."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(p) for p in spec.submodule_search_locations]


def _first_file(dirs: Sequence[Path], names: Sequence[str]) -> Path | None:
    for d in dirs:
        for name in names:
            if (d / name).is_file():
                return d / name
    return None


def _cuda_roots(env: Mapping[str, str]) -> list[Path]:
    roots = [Path(env[k]) for k in ("CUDA_HOME", "CUDA_PATH") if env.get(k)]
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    if nvcc:
        roots.append(Path(os.path.realpath(nvcc)).parent.parent)
    roots.append(Path("/usr/local/cuda"))
    return roots


_CUDART = ("libcudart.so", "libcudart.so.13", "libcudart.so.12")


def _cuda_candidates(env: Mapping[str, str], nvidia: Sequence[Path]) -> list[tuple[Path, list]]:
    """(include dir, library dirs) of each CUDA installation or wheel, in search order."""
    candidates = [(r / "include", [r / "lib64", r / "lib", r / "targets/x86_64-linux/lib"])
                  for r in _cuda_roots(env)]
    for d in nvidia:
        for sub in ("cu13", "cuda_runtime", "cu12"):
            candidates.append((d / sub / "include", [d / sub / "lib"]))
    return candidates


def _find_cuda(env: Mapping[str, str], nvidia: Sequence[Path]) -> tuple[Path, Path] | None:
    """(include dir, libcudart) from one CUDA installation or wheel."""
    for include, libs in _cuda_candidates(env, nvidia):
        if (include / "cuda_runtime_api.h").is_file():
            cudart = _first_file(libs, _CUDART)
            if cudart is not None:
                return include, cudart
    return None


def _find_cusparselt(env: Mapping[str, str], nvidia: Sequence[Path]) -> tuple[Path, Path] | None:
    """(include dir, libcusparseLt.so.0) of one installation."""
    roots = [Path(env[ENV_ROOT])] if env.get(ENV_ROOT) else []
    for d in nvidia:
        roots += [d / "cu13", d / "cusparselt", d / "cu12"]
    roots += [Path(env[k]) for k in ("CUDA_HOME", "CUDA_PATH") if env.get(k)]
    for root in roots:
        header = root / "include" / "cusparseLt.h"
        lib = _first_file([root / "lib", root / "lib64"], ("libcusparseLt.so.0",))
        if header.is_file() and lib is not None:
            return header.parent, lib
    return None


def _find_cxx(env: Mapping[str, str]) -> str | None:
    names = [env["CXX"]] if env.get("CXX") else ["g++", "c++", "clang++"]
    for name in names:
        found = shutil.which(name, path=env.get("PATH"))
        if found:
            return found
    return None


def find_toolchain(env: Mapping[str, str] | None = None,
                   nvidia_dirs: Sequence[Path] | None = None, *,
                   need_compiler: bool = True) -> Toolchain:
    """Locates the compiler, headers and libraries a build needs.

    Args:
      env: environment to read (``os.environ`` by default).
      nvidia_dirs: directories of the ``nvidia`` wheel namespace (found by import
        machinery by default).
      need_compiler: whether a missing compiler is an error (not when the library for
        these headers is already in the cache).

    Raises:
      BuildError: naming every missing piece and how to get it.
    """
    env = os.environ if env is None else env
    nvidia = _nvidia_dirs() if nvidia_dirs is None else list(nvidia_dirs)
    cxx = _find_cxx(env)
    cuda = _find_cuda(env, nvidia)
    cslt = _find_cusparselt(env, nvidia)
    missing = []
    if cxx is None and need_compiler:
        missing.append(f"no C++ compiler ({env.get('CXX') or 'g++, c++, clang++'} not found; "
                       "install g++ or set CXX)")
    if cuda is None:
        missing.append("no CUDA runtime headers with libcudart (cuda_runtime_api.h; install the "
                       "CUDA toolkit or set CUDA_HOME)")
    if cslt is None:
        missing.append(f"no cuSPARSELt (cusparseLt.h and libcusparseLt.so.0): {INSTALL_HINT}")
    if missing:
        raise BuildError("cannot build the cuSPARSELt FFI library: " + "; ".join(missing))
    import jax  # noqa: PLC0415  (cheap once jax is imported; kept out of module import)

    return Toolchain(cxx=cxx, jax_include=jax.ffi.include_dir(), cuda_include=str(cuda[0]),
                     cudart=str(cuda[1]), cusparselt_include=str(cslt[0]),
                     cusparselt=str(cslt[1]))


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where built libraries go: ``$NMJAX_CUSPARSELT_CACHE``, else ``$XDG_CACHE_HOME/nmjax``,
    else ``~/.cache/nmjax``."""
    env = os.environ if env is None else env
    if env.get(ENV_CACHE):
        return Path(env[ENV_CACHE])
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "nmjax"


def library_path(toolchain: Toolchain, env: Mapping[str, str] | None = None) -> Path:
    """The cached library for this source, jaxlib, cuSPARSELt header and flags."""
    import jaxlib  # noqa: PLC0415

    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
    digest.update((COMPAT_INCLUDE / "cusparse.h").read_bytes())
    digest.update(Path(toolchain.cusparselt_include, "cusparseLt.h").read_bytes())
    digest.update(jaxlib.__version__.encode())
    digest.update(" ".join(CXXFLAGS).encode())
    return cache_dir(env) / f"{LIBRARY_STEM}-{digest.hexdigest()[:16]}.so"


def compile_command(toolchain: Toolchain, output: Path) -> list[str]:
    """The compiler command line that builds ``output`` (a shared library)."""
    tc = toolchain
    cslt_dir, cudart_dir = str(Path(tc.cusparselt).parent), str(Path(tc.cudart).parent)
    return [
        tc.cxx, *CXXFLAGS, str(SOURCE), "-o", str(output),
        # jax's headers warn under -Wall-like defaults; they are not ours to fix
        "-isystem", tc.jax_include, "-isystem", tc.cuda_include,
        "-isystem", tc.cusparselt_include, "-isystem", str(COMPAT_INCLUDE),
        f"-L{cslt_dir}", f"-l:{Path(tc.cusparselt).name}",
        f"-L{cudart_dir}", f"-l:{Path(tc.cudart).name}",
        # found at load time through the preload in _ffi.load; the rpath covers other loaders
        f"-Wl,-rpath,{cslt_dir}", f"-Wl,-rpath,{cudart_dir}",
    ]


def build(toolchain: Toolchain | None = None, *, force: bool = False,
          env: Mapping[str, str] | None = None) -> Path:
    """Builds the library into the cache unless it is already there; returns its path.

    Args:
      toolchain: what to build with (:func:`find_toolchain` by default).
      force: rebuild even when the cache holds the library.
      env: environment to read (``os.environ`` by default).

    Safe to call from several processes at once (a file lock serialises the compile, and
    the result appears atomically).

    Raises:
      BuildError: a piece of the toolchain is missing, or the compiler failed (its output
        is in the message).
    """
    tc = find_toolchain(env, need_compiler=False) if toolchain is None else toolchain
    out = library_path(tc, env)
    if out.is_file() and not force:
        return out
    if tc.cxx is None:
        find_toolchain(env)  # raises, naming the missing compiler
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.is_file() and not force:  # another process built it while we waited
            return out
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.stem, suffix=".tmp.so")
        os.close(fd)
        cmd = compile_command(tc, Path(tmp))
        _log.warning("nmjax: building the cuSPARSELt FFI library (once) into %s", out)
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise BuildError(
                    f"compiling the cuSPARSELt FFI library failed (exit {proc.returncode}):\n"
                    f"{' '.join(cmd)}\n{(proc.stderr or proc.stdout)[-4000:]}")
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _log.info("nmjax: built %s in %.1f s", out, time.perf_counter() - start)
    return out


def prebuilt(env: Mapping[str, str] | None = None) -> Path | None:
    """``$NMJAX_CUSPARSELT_LIBRARY`` if set.

    Raises:
      BuildError: it is set but names no file.
    """
    env = os.environ if env is None else env
    path = env.get(ENV_LIBRARY)
    if not path:
        return None
    if not Path(path).is_file():
        raise BuildError(f"{ENV_LIBRARY}={path} names no file")
    return Path(path)


def runtime_libraries(env: Mapping[str, str] | None = None,
                      nvidia_dirs: Sequence[Path] | None = None) -> list[Path]:
    """``libcudart`` and ``libcusparseLt.so.0`` where found (to preload before the handler
    library, whose own rpath may point at another machine's paths)."""
    env = os.environ if env is None else env
    nvidia = _nvidia_dirs() if nvidia_dirs is None else list(nvidia_dirs)
    cuda = _find_cuda(env, nvidia)  # headers not needed to run: any libcudart will do
    cudart = cuda[1] if cuda else _first_file(
        [d for _, libs in _cuda_candidates(env, nvidia) for d in libs], _CUDART)
    cslt = _find_cusparselt(env, nvidia)
    return [p for p in (cudart, cslt[1] if cslt else None) if p is not None]


@functools.cache
def unavailable() -> str | None:
    """Why the library can neither be found nor built here, or ``None``. Cached: it runs
    once per process (``unavailable.cache_clear()`` after installing something)."""
    try:
        if prebuilt() is not None:
            return None
        tc = find_toolchain(need_compiler=False)
        if tc.cxx is None and not library_path(tc).is_file():
            find_toolchain()
    except BuildError as e:
        return str(e)
    return None
