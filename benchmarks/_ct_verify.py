"""The library side of ``benchmarks/compressed_tensors_check.py``: run by a Python that has
torch, transformers and compressed-tensors==0.14.0.1 (not this project's environment).

  python _ct_verify.py FOLDER [--fixture PATH]
"""

import argparse
import json
import sys
from pathlib import Path

import compressed_tensors
import numpy as np
import torch
from compressed_tensors.compressors import ModelCompressor, Sparse24BitMaskCompressor
from compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask import (
    get_24_bytemasks,
)
from compressed_tensors.config import Sparse24BitMaskConfig
from safetensors.torch import load_file, save_file

BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(BITS[t.dtype]) if t.dtype in BITS else t


def check_folder(folder: Path, expected_file: Path) -> dict:
    compressor = ModelCompressor.from_pretrained(str(folder))
    assert compressor is not None, f"{folder}: no compression config found"
    assert compressor.sparsity_config.format == "sparse-24-bitmask"
    assert isinstance(compressor.sparsity_compressor, Sparse24BitMaskCompressor)
    got = dict(compressor.sparsity_compressor.decompress(str(folder)))
    want = load_file(str(expected_file))
    assert sorted(got) == sorted(want), (sorted(set(got) ^ set(want)))
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        assert torch.equal(bits(got[name]), bits(value)), f"{name} differs"
    print(f"{folder.name}: {len(got)} tensors decompressed bit-exactly by compressed-tensors "
          f"{compressed_tensors.__version__}")
    return got


def check_logits(folder: Path, architecture: str, state: dict, tokens: np.ndarray,
                 flax_logits: np.ndarray):
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(folder))
    model = getattr(transformers, architecture)(config).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    assert set(missing) == tied, missing
    model.tie_weights()
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens).long()).logits.numpy()
    err = float(np.abs(logits - flax_logits).max())
    assert err < 1e-4, f"PyTorch logits differ from Flax by {err}"
    print(f"PyTorch {architecture} on the decompressed weights: logits within {err:.1e} of "
          "the Flax model on masked weights")


def write_fixture(path: Path, folders: dict) -> None:
    """A small nn.Linear-layout state dict, 2:4 along the last axis, compressed by the
    library itself; the dense input, the library's config and the names and shapes of
    transformers' PyTorch GPT2LMHeadModel and LlamaForCausalLM (the check's tiny configs)
    are stored beside it."""
    import transformers

    shapes = {}
    for name, (folder, architecture) in folders.items():
        config = transformers.AutoConfig.from_pretrained(str(folder))
        model = getattr(transformers, architecture)(config)
        shapes[f"{name}_state_dict"] = json.dumps(
            {k: list(v.shape) for k, v in model.state_dict().items()})
    gen = torch.Generator().manual_seed(0)
    dense = {
        "model.layers.0.mlp.up_proj.weight": torch.randn(16, 32, generator=gen),
        "model.layers.0.self_attn.q_proj.weight":
            torch.randn(8, 16, generator=gen).to(torch.bfloat16),
        "model.norm.weight": torch.randn(32, generator=gen),
    }
    for name in list(dense)[:2]:
        dense[name] = torch.where(get_24_bytemasks(dense[name]), dense[name], 0)
    targets = ["model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj"]
    config = Sparse24BitMaskConfig(targets=targets, ignore=[], global_sparsity=0.0)
    compressed = Sparse24BitMaskCompressor(config=config).compress(
        dense, compression_targets=set(targets))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in compressed.items()}, str(path),
              metadata={"compressed_tensors": compressed_tensors.__version__,
                        "torch": torch.__version__,
                        "config": json.dumps(config.model_dump()),
                        **shapes,
                        "gpt2_config": (folders["gpt2"][0] / "config.json").read_text()})
    save_file(dense, str(path.with_name(path.stem + "_input.safetensors")))
    print(f"wrote {path} ({len(compressed)} tensors) with compressed-tensors "
          f"{compressed_tensors.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--fixture", type=Path)
    args = parser.parse_args()
    info = json.loads((args.folder / "info.json").read_text())
    tokens = np.load(args.folder / "tokens.npy")
    for name, entry in info.items():
        state = check_folder(Path(entry["folder"]), args.folder / f"{name}_expected.safetensors")
        if "logits" in entry:
            check_logits(Path(entry["folder"]), entry["architecture"], state, tokens,
                         np.load(entry["logits"]))
    if args.fixture is not None:
        write_fixture(args.fixture, {
            model: (Path(info[f"{model}_f32"]["folder"]), info[f"{model}_f32"]["architecture"])
            for model in ("gpt2", "llama")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
