"""Tiny block-FP8 checkpoints as DeepSeek-V3 and Qwen3-*-FP8 are published, their exact bf16 casts, and a
literal (loop over blocks) quantiser and dequantiser written independently of cdmoe.models.fp8_blocks."""

import json
import shutil
from pathlib import Path

import torch
from conftest import make_tiny, tiny_tokenizer
from safetensors import safe_open
from safetensors.torch import save_file


def literal_quantize(w, block, headroom=1.0):
    """Per block (partial at the edges): s = amax / 448, q = e4m3(w / s) (DeepSeek's weight_quant); a
    ``headroom`` > 1 scales s up (the largest |q| is 448 / headroom, as a quantiser with a margin leaves it),
    so that quantising the dequantised weights again by the amax rule gives other bytes."""

    w = w.float()
    rows, cols = w.shape
    bm, bn = block
    n_r, n_c = -(-rows // bm), -(-cols // bn)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    s = torch.empty(n_r, n_c)
    for i in range(n_r):
        for j in range(n_c):
            part = w[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
            s[i, j] = max(part.abs().max().item(), 1e-4) / 448.0 * headroom
            q[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = (part / s[i, j]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, s


def literal_dequantize(q, s, block):
    """DeepSeek's fp8_cast_bf16.py, one block at a time: fp32(q) * s, stored as bf16."""
    rows, cols = q.shape
    bm, bn = block
    out = torch.empty(rows, cols, dtype=torch.bfloat16)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            part = q[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn].float() * s[i, j].item()
            out[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = part.to(torch.bfloat16)
    return out


def _quantised(key: str, tensor) -> bool:
    """What the releases quantise: every 2-D Linear weight of the decoder layers except the routers."""
    return tensor.dim() == 2 and key.startswith("model.layers.") and not key.endswith("mlp.gate.weight")


def _save_sharded(tensors: dict, directory: Path, per_shard: int) -> None:
    """Several shards and an index; a weight and its scale often land in different shards."""
    keys = sorted(tensors)
    chunks = [keys[i:i + per_shard] for i in range(0, len(keys), per_shard)]
    weight_map = {}
    for n, chunk in enumerate(chunks):
        name = f"model-{n + 1:05d}-of-{len(chunks):05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in chunk}, directory / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in chunk})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def tensors_of(directory: Path) -> dict:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def fp8_checkpoints(root: Path, family: str, block, seed: int = 5, **overrides) -> tuple[Path, Path]:
    """(fp8 checkpoint, its exact bf16 cast) of a tiny ``family`` model with a real BPE tokenizer.

    The fp8 one stores every decoder-layer Linear weight but the routers as float8_e4m3fn with a float32
    ``_scale_inv`` per ``block`` (literal_quantize, headroom 1.3), one tensor per expert, in shards; its config.json has
    the release's ``quantization_config``. The cast is literal_dequantize of it (as fp8_cast_bf16.py), same
    names and shards, scales dropped, config without the entry."""
    tok = tiny_tokenizer()
    model = make_tiny(family, seed=seed, num_hidden_layers=4, vocab_size=len(tok), bos_token_id=0, eos_token_id=0,
                      pad_token_id=0, **overrides)
    model.to(torch.bfloat16)
    staging = root / f"{family}-staging"
    model.save_pretrained(staging)  # the family's own (per-expert) layout
    tok.save_pretrained(staging)
    source = tensors_of(staging)
    fp8, cast = {}, {}
    for key, tensor in source.items():
        if _quantised(key, tensor):
            q, s = literal_quantize(tensor, block, headroom=1.3)
            fp8[key], fp8[key + "_scale_inv"] = q, s
            cast[key] = literal_dequantize(q, s, block)
        else:
            fp8[key] = cast[key] = tensor
    config = json.loads((staging / "config.json").read_text())
    paths = []
    for name, tensors, entry in (("fp8", fp8, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                                "weight_block_size": list(block)}), ("cast", cast, None)):
        path = root / f"{family}-{name}"
        shutil.copytree(staging, path, ignore=shutil.ignore_patterns("*.safetensors*", "config.json"))
        _save_sharded(tensors, path, per_shard=23)
        (path / "config.json").write_text(json.dumps({**config, **({"quantization_config": entry} if entry else {})},
                                                     indent=2))
        paths.append(path)
    shutil.rmtree(staging)
    return paths[0], paths[1]
