"""``python -m nmjax.kernels.cusparselt {info,build,check}``.

* ``info``: what was found (compiler, CUDA, cuSPARSELt), the cache path, the default device.
* ``build [--force] [--out PATH]``: build the FFI library into the cache now (else it happens
  at first use); ``--out`` also copies it to PATH (a prebuilt library to carry to another
  machine, named there by ``$NMJAX_CUSPARSELT_LIBRARY``).
* ``check [--force]``: build, load, register and lower both products for CUDA (no GPU needed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nmjax.kernels.cusparselt")
    ap.add_argument("what", choices=["info", "build", "check"])
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument("--out", default=None, help="build: also copy the library here")
    args = ap.parse_args(argv)

    from nmjax.backends import device_facts
    from nmjax.kernels.cusparselt import _build, _check

    try:
        if args.what == "info":
            print("device:", device_facts())
            print("cache:", _build.cache_dir())
            print("prebuilt:", _build.prebuilt())
            tc = _build.find_toolchain(need_compiler=False)
            print(json.dumps({k: str(v) for k, v in vars(tc).items()}, indent=1))
            path = _build.library_path(tc)
            print("library:", path, "(built)" if path.is_file() else "(not built yet)")
            print("unavailable:", _build.unavailable())
        elif args.what == "build":
            start = time.perf_counter()
            path = _build.build(force=args.force)
            print(f"{path} ({time.perf_counter() - start:.1f} s)")
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, args.out)
                print(f"copied to {args.out}")
        else:
            print(json.dumps(_check.check(force_build=args.force), indent=1))
            print("cusparselt check: OK")
    except _build.BuildError as e:
        print(f"cusparselt {args.what}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
