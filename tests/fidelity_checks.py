"""Independent readers for the fidelity tests: the tensors of a directory, byte digests, and which source
tensors an output must hold unchanged (in transformers' fused expert layout)."""

import hashlib
import re

import torch
from safetensors import safe_open


def tensors(directory):
    """{name: tensor} of every safetensors file in ``directory``."""
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def digest(tensor):
    return str(tensor.dtype), hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def expected_untouched(source: dict, condensed_layers) -> dict:
    """The source's tensors outside the condensed layers' MoE blocks, in the output's layout:
    per-expert ``experts.E.{gate,up,down}_proj.weight`` become transformers' fused 3-D tensors."""
    block = re.compile(r"model\.layers\.(\d+)\.mlp\.")
    expert = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight")
    out, experts = {}, {}
    for name, tensor in source.items():
        found = block.match(name)
        if found and int(found.group(1)) in condensed_layers:
            continue
        e = expert.fullmatch(name)
        if e:
            experts.setdefault(e.group(1), {}).setdefault(int(e.group(2)), {})[e.group(3)] = tensor
        else:
            out[name] = tensor
    for prefix, per in experts.items():
        ids = sorted(per)
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([per[i]["gate"], per[i]["up"]]) for i in ids])
        out[f"{prefix}.down_proj"] = torch.stack([per[i]["down"] for i in ids])
    return out
