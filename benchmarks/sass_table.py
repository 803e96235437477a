"""SASS summary of every kept kernel variant and of jax's dense ``hopper_matmul_mgpu``, with no
GPU: compiles each through the mosaic-sass tool (``ptxas -arch=sm_90a``) and prints one
markdown table (the one in ``benchmarks/KERNEL_NOTES.md``).

  PYTHONPATH=. python benchmarks/sass_table.py [--tool ../shared/tools/mosaic-sass] [VARIANT...]

What the columns say: registers and spills from ``ptxas -v``; smem as Mosaic allocates it;
``HGMMA per arrive``: the run lengths of (sparse) ``HGMMA`` between ``WARPGROUP.ARRIVE``s in
the main loop (8 = one arrive for 8 chained instructions); ``C7519``: arrives ptxas had to
inject; ``LDS``: shared-memory loads in the kernel (the metadata loads: ``LDS.128`` for the
16-byte per-k-tile loads, plain ``LDS`` for one word per wgmma); ``setmaxnreg``: the
producer / consumer register budgets. Nothing runs and nothing is timed.
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import re
import subprocess
import sys
import tempfile

DENSE = "dense"  # jax's hopper_matmul_mgpu, the tool's example


def _summary(d: pathlib.Path) -> dict:
    ptxas = next(d.rglob("*.ptxas")).read_text()
    sass = next(d.rglob("*.sass_ctrl")).read_text()
    smem = (next(d.rglob("smem.txt")).read_text().split() or ["?"])[-1]
    ins = [m.group(1).strip() for line in sass.splitlines()
           if (m := re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;?\s*$", line))]
    runs, run = [], 0
    for t in ins:
        if "HGMMA" in t:
            run += 1
        elif "WARPGROUP.ARRIVE" in t:
            if run:
                runs.append(run)
            run = 0
    if run:
        runs.append(run)
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in ins if t)
    hgmma = sorted({o for o in ops if o.startswith("HGMMA")})
    lds = {o: c for o, c in ops.items() if o.startswith("LDS")}
    dealloc = re.findall(r"USETMAXREG\.DEALLOC\.CTAPOOL\s+(0x[0-9a-f]+)", sass)
    alloc = re.findall(r"USETMAXREG\.TRY_ALLOC\.CTAPOOL\s+\w+,\s+(0x[0-9a-f]+)", sass)
    tma = {o: c for o, c in ops.items() if o.startswith("UTMALDG")}
    return dict(
        regs=",".join(re.findall(r"Used (\d+) registers", ptxas)),
        spills=",".join(f"{a}/{b}" for a, b in
                        re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)),
        smem=smem, hgmma="/".join(h.replace(".F32.BF16", "") for h in hgmma),
        runs=dict(sorted(collections.Counter(runs).items())),
        c7519=ptxas.count("C7519"), lds=lds,
        setmaxnreg="/".join(str(int(x, 16)) for x in dealloc + alloc) if dealloc else "-",
        tma=tma, arrives=ops.get("WARPGROUP.ARRIVE", 0),
        stsm=sum(c for o, c in ops.items() if o.startswith("STSM")),
    )


def compile_variant(tool: pathlib.Path, name: str, out: pathlib.Path) -> dict:
    spec = (f"{tool}/example_dense.py:build" if name == DENSE
            else "benchmarks/dump_ptx.py:build")
    env = dict(os.environ, VARIANT=name)
    r = subprocess.run([str(tool / "run"), spec, "--out", str(out)], env=env,
                       capture_output=True, text=True, timeout=600)
    if not list(out.rglob("*.sass_ctrl")):
        raise RuntimeError(f"{name}: no SASS\n{(r.stdout + r.stderr)[-2000:]}")
    return _summary(out)


def table(rows: dict[str, dict]) -> str:
    lines = ["| variant | HGMMA | registers | spills (B st/ld) | smem B | HGMMA per arrive "
             "(run: count) | C7519 | LDS | TMA loads | STSM | setmaxnreg (producer/consumer) |",
             "|---|---|---:|---|---:|---|---:|---|---|---:|---|"]
    for name, s in rows.items():
        runs = ", ".join(f"{k}: {v}" for k, v in s["runs"].items())
        lds = ", ".join(f"{k} x{v}" for k, v in sorted(s["lds"].items())) or "-"
        tma = ", ".join(f"{k[8:]} x{v}" for k, v in sorted(s["tma"].items())) or "-"
        lines.append(f"| {name} | {s['hgmma']} | {s['regs']} | {s['spills']} | {s['smem']} "
                     f"| {runs} | {s['c7519']} | {lds} | {tma} | {s['stsm']} "
                     f"| {s['setmaxnreg']} |")
    return "\n".join(lines)


def main() -> None:
    sys.path.insert(0, ".")
    from nmjax.kernels import VARIANTS

    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="*", default=[DENSE, *VARIANTS])
    ap.add_argument("--tool", default="../shared/tools/mosaic-sass")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    tool = pathlib.Path(a.tool).resolve()
    base = pathlib.Path(a.out or tempfile.mkdtemp(prefix="sass_"))
    rows = {}
    for name in a.variants:
        try:
            rows[name] = compile_variant(tool, name, base / name)
        except Exception as e:  # noqa: BLE001  (one failed variant does not hide the rest)
            print(f"{name}: {e}", file=sys.stderr)
        print(name, rows.get(name), file=sys.stderr, flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
