"""The full compressed-tensors check: export a tiny Flax GPT-2 and a tiny Flax Llama with
nmjax and decompress them with the real ``compressed-tensors`` library.

compressed-tensors needs PyTorch, which this project does not depend on; run the library
side in another Python that has ``torch`` and ``compressed-tensors==0.14.0.1`` (the last
release with the sparse-24 compressors; it wants ``transformers<5``)::

  python3.11 -m venv /tmp/ctvenv
  /tmp/ctvenv/bin/pip install torch==2.13.0 compressed-tensors==0.14.0.1 transformers==4.57.6
  .venv/bin/python benchmarks/compressed_tensors_check.py --ct-python /tmp/ctvenv/bin/python

Steps (each asserted; a failure exits non-zero):

1. here: random-init ``FlaxGPT2LMHeadModel`` and ``FlaxLlamaForCausalLM`` from tiny configs
   (nothing downloads); GPT-2: 2:4 masks along ``in`` (axis 1 of the ``(out, in)``
   ``FlaxConv1D`` kernels); Llama: the ``q/k/v/o/gate/up/down_proj`` kernels 2:4 along
   ``in`` as :func:`nmjax.resolve` plans them (axis 0 of ``nn.Dense``'s ``(in, out)``);
   each exported with :func:`nmjax.export.save_compressed_tensors` in bfloat16 and in
   float32; the expected dense masked state dict (PyTorch names and layouts) and the Flax
   logits of the float32 model on masked weights are written beside them;
2. there (``benchmarks/_ct_verify.py``): ``ModelCompressor.from_pretrained(folder)`` and its
   sparsity compressor's ``decompress`` give every tensor bit-exactly; the decompressed
   float32 state dict loads (strictly, but for a tied head) into transformers' PyTorch
   ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` and its logits match the Flax ones;
3. with ``--write-fixture``: the library compresses a small ``nn.Linear``-layout state dict
   itself; the result is the fixture ``tests/data/ct_sparse24_fixture.safetensors`` that
   ``tests/test_export.py`` checks this writer against in CI (no torch there), with the
   PyTorch models' parameter names and shapes in its metadata.
"""

from __future__ import annotations

import argparse
import datetime
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

import nmjax  # noqa: E402
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
    return model, config, params, masks, None


def llama(dtype):
    """A tiny random-init ``FlaxLlamaForCausalLM`` (grouped-query attention: 4 heads, 2 KV
    heads), its ``*_proj`` kernels 2:4 along ``in`` as :func:`nmjax.resolve` plans them."""
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=32)
    model = FlaxLlamaForCausalLM(config, seed=0)
    params = jax.tree.map(lambda x: x.astype(dtype), model.params)
    ids = jnp.arange(16).reshape(2, 8) % 128
    plan = nmjax.resolve(model.module, MaskRule("2:4", include=r"_proj/kernel$"),
                         params=params, input_ids=ids,
                         attention_mask=jnp.ones((2, 8), jnp.int32),
                         position_ids=jnp.broadcast_to(jnp.arange(8), (2, 8)))
    return model, config, params, build_masks(params, plan), plan


MODELS = {"gpt2": (gpt2, "GPT2LMHeadModel"), "llama": (llama, "LlamaForCausalLM")}


def expected_state_dict(params) -> dict[str, np.ndarray]:
    out = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name, axes = ct.torch_name_and_axes(ct._key_parts(key_path), leaf.ndim)
        out[name] = np.ascontiguousarray(np.transpose(np.asarray(leaf), axes))
    return out


def export_models(folder: Path) -> dict:
    info = {}
    tokens = np.arange(16, dtype=np.int32).reshape(2, 8) % 128
    np.save(folder / "tokens.npy", tokens)
    for model_name, (build, architecture) in MODELS.items():
        for name, dtype in (("bf16", jnp.bfloat16), ("f32", jnp.float32)):
            model, config, params, masks, plan = build(dtype)
            key = f"{model_name}_{name}"
            out = folder / key
            targets = export.save_compressed_tensors(out, params, masks, config, axes=plan,
                                                     architecture=architecture)
            masked = apply_masks(params, masks)
            save_file(expected_state_dict(masked), str(folder / f"{key}_expected.safetensors"))
            info[key] = {"folder": str(out), "targets": targets, "architecture": architecture}
            if dtype == jnp.float32:
                logits = model(tokens, params=masked).logits
                np.save(folder / f"{key}_flax_logits.npy", np.asarray(logits))
                info[key]["logits"] = str(folder / f"{key}_flax_logits.npy")
            dense_bytes = sum(x.nbytes for x in expected_state_dict(params).values())
            size = (out / "model.safetensors").stat().st_size
            info[key]["summary"] = (f"{key}: {len(targets)} modules compressed; "
                                    f"model.safetensors {size:,} B (dense tensors "
                                    f"{dense_bytes:,} B)")
            print(info[key]["summary"])
    return info


SECTION = "## compressed-tensors check"
RESULTS = ROOT / "benchmarks" / "results" / "export.md"


def record(lines: list[str], seconds: float) -> None:
    """Writes (or replaces) this check's section at the end of ``results/export.md``."""
    text = RESULTS.read_text() if RESULTS.exists() else ""
    head = text.split(f"\n{SECTION}")[0].rstrip("\n")
    body = [SECTION, "", f"Command: `benchmarks/compressed_tensors_check.py --ct-python "
            f"CT_PYTHON --record` ({datetime.date.today()}; shared 2-core CPU, "
            f"{seconds:.0f} s); the library side: torch, transformers and compressed-tensors "
            "in a side Python. Its output:", "", "```", *lines, "```"]
    RESULTS.write_text(head + "\n\n" + "\n".join(body) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct-python", required=True,
                        help="a Python with torch and compressed-tensors==0.14.0.1")
    parser.add_argument("--write-fixture", action="store_true",
                        help=f"(re)write {FIXTURE.relative_to(ROOT)} with the library")
    parser.add_argument("--record", action="store_true",
                        help=f"write the output to {RESULTS.relative_to(ROOT)}")
    args = parser.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        info = export_models(folder)
        (folder / "info.json").write_text(json.dumps(info))
        cmd = [args.ct_python, str(ROOT / "benchmarks" / "_ct_verify.py"), str(folder)]
        if args.write_fixture:
            cmd += ["--fixture", str(FIXTURE)]
        result = subprocess.run(cmd, check=True, capture_output=True, text=True)
    checked = [line for line in result.stdout.splitlines() if line.strip()]
    print("\n".join(checked))
    lines = [*(entry["summary"] for entry in info.values()), *checked]
    seconds = time.perf_counter() - t0
    print(f"compressed-tensors check passed in {seconds:.1f} s")
    if args.record:
        record(lines, seconds)


if __name__ == "__main__":
    main()
