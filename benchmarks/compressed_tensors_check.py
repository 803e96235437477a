"""The full compressed-tensors check: export a tiny Flax GPT-2 (and a Llama-layout layer set)
with nmjax and decompress it with the real ``compressed-tensors`` library.

compressed-tensors needs PyTorch, which this project does not depend on; run the library
side in another Python that has ``torch`` and ``compressed-tensors==0.14.0.1`` (the last
release with the sparse-24 compressors; it wants ``transformers<5``)::

  python3.11 -m venv /tmp/ctvenv
  /tmp/ctvenv/bin/pip install torch==2.13.0 compressed-tensors==0.14.0.1 transformers==4.57.6
  .venv/bin/python benchmarks/compressed_tensors_check.py --ct-python /tmp/ctvenv/bin/python

Steps (each asserted; a failure exits non-zero):

1. here: a random-init ``FlaxGPT2LMHeadModel`` from a tiny ``GPT2Config`` (nothing
   downloads), 2:4 masks along ``in`` (axis 1 of the ``(out, in)`` ``FlaxConv1D`` kernels),
   exported with :func:`nmjax.export.save_compressed_tensors` in bfloat16 and in float32;
   the expected dense masked state dict (PyTorch names and layouts) and the Flax logits of
   the float32 model on masked weights are written beside them;
2. there (``benchmarks/_ct_verify.py``): ``ModelCompressor.from_pretrained(folder)`` and its
   sparsity compressor's ``decompress`` give every tensor bit-exactly; the decompressed
   float32 state dict loads into transformers' PyTorch ``GPT2LMHeadModel`` and its logits
   match the Flax ones;
3. with ``--write-fixture``: the library compresses a small ``nn.Linear``-layout state dict
   itself; the result is the fixture ``tests/data/ct_sparse24_fixture.safetensors`` that
   ``tests/test_export.py`` checks this writer against in CI (no torch there).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from nmjax import _compressed_tensors as ct  # noqa: E402
from nmjax import export  # noqa: E402
from nmjax.tree import MaskRule, apply_masks, build_masks  # noqa: E402

FIXTURE = ROOT / "tests" / "data" / "ct_sparse24_fixture.safetensors"


def gpt2(dtype):
    from transformers import FlaxGPT2LMHeadModel, GPT2Config

    config = GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=2)
    model = FlaxGPT2LMHeadModel(config, seed=0)
    params = jax.tree.map(lambda x: x.astype(dtype), model.params)
    masks = build_masks(params, MaskRule("2:4", include=r"c_(attn|proj|fc)/kernel$", axis=1))
    return model, config, params, masks


def expected_state_dict(params) -> dict[str, np.ndarray]:
    out = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name, axes = ct.torch_name_and_axes(ct._key_parts(key_path), leaf.ndim)
        out[name] = np.ascontiguousarray(np.transpose(np.asarray(leaf), axes))
    return out


def export_gpt2(folder: Path) -> dict:
    info = {}
    tokens = np.arange(16, dtype=np.int32).reshape(2, 8) % 128
    for name, dtype in (("bf16", jnp.bfloat16), ("f32", jnp.float32)):
        model, config, params, masks = gpt2(dtype)
        out = folder / name
        targets = export.save_compressed_tensors(out, params, masks, config,
                                                 architecture="GPT2LMHeadModel")
        masked = apply_masks(params, masks)
        save_file(expected_state_dict(masked), str(folder / f"{name}_expected.safetensors"))
        info[name] = {"folder": str(out), "targets": targets}
        if dtype == jnp.float32:
            logits = model(tokens, params=masked).logits
            np.save(folder / "tokens.npy", tokens)
            np.save(folder / "flax_logits.npy", np.asarray(logits))
        dense_bytes = sum(x.nbytes for x in expected_state_dict(params).values())
        size = (out / "model.safetensors").stat().st_size
        print(f"{name}: {len(targets)} modules compressed; model.safetensors {size:,} B "
              f"(dense tensors {dense_bytes:,} B)")
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct-python", required=True,
                        help="a Python with torch and compressed-tensors==0.14.0.1")
    parser.add_argument("--write-fixture", action="store_true",
                        help=f"(re)write {FIXTURE.relative_to(ROOT)} with the library")
    args = parser.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        info = export_gpt2(folder)
        (folder / "info.json").write_text(json.dumps(info))
        cmd = [args.ct_python, str(ROOT / "benchmarks" / "_ct_verify.py"), str(folder)]
        if args.write_fixture:
            cmd += ["--fixture", str(FIXTURE)]
        subprocess.run(cmd, check=True)
    print(f"compressed-tensors check passed in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
