"""Tiny random MoE models for tests and demos, built from real ``config.json`` files.

:func:`shrink_config` keeps a real config's structure (family, routing switches, shared
experts, dense-layer rule, group limits) and replaces its sizes by small ones, so a test
runs the family's real modelling code in milliseconds. :func:`randomize_` re-draws the
weights at a scale where routing decisions are well separated and outputs are O(1).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

__all__ = ["SHRINK", "shrink_config", "tiny_model", "randomize_", "EXTRA_FAMILY_CONFIGS"]

# small sizes, applied only to keys the real config already has
SHRINK = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 48,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "n_routed_experts": 8,
    "num_experts": 8,
    "num_local_experts": 8,
    "moe_num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_k": 2,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "max_window_layers": 4,
    "rope_scaling": None,
    "num_nextn_predict_layers": 0,
}

_SIZES = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
          "vocab_size": 128, "max_position_embeddings": 256}

# families without a real config in the fixtures: their library defaults, shrunk
EXTRA_FAMILY_CONFIGS = {
    "glm4_moe": {"model_type": "glm4_moe", "n_routed_experts": 8, "n_shared_experts": 1, "first_k_dense_replace": 1,
                 "n_group": 2, "topk_group": 1, "routed_scaling_factor": 1.5, "moe_intermediate_size": 32,
                 "intermediate_size": 96, "num_experts_per_tok": 2, "partial_rotary_factor": 0.5, "head_dim": 16},
    "dots1": {"model_type": "dots1", "n_routed_experts": 8, "n_shared_experts": 1, "first_k_dense_replace": 1,
              "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.0, "norm_topk_prob": True,
              "moe_intermediate_size": 32, "intermediate_size": 96, "num_experts_per_tok": 2, "head_dim": 16},
    "hunyuan_v1_moe": {"model_type": "hunyuan_v1_moe", "num_experts": 8, "moe_topk": [2, 3, 2, 2],
                       "intermediate_size": 32, "head_dim": 16},
    "ernie4_5_moe": {"model_type": "ernie4_5_moe", "moe_num_experts": 8, "moe_k": 2, "moe_num_shared_experts": 1,
                     "moe_intermediate_size": 32, "intermediate_size": 96, "moe_layer_start_index": 1,
                     "moe_layer_interval": 1, "moe_layer_end_index": -1, "head_dim": 16},
    "granitemoe": {"model_type": "granitemoe", "num_local_experts": 8, "num_experts_per_tok": 2,
                   "intermediate_size": 32, "residual_multiplier": 0.5},
}
EXTRA_FAMILY_CONFIGS = {name: {**_SIZES, **cfg} for name, cfg in EXTRA_FAMILY_CONFIGS.items()}


def shrink_config(config: dict | str | Path, **overrides) -> dict:
    """A real config dict (or its path) with small sizes and the same structure."""
    data = json.loads(Path(config).read_text()) if isinstance(config, (str, Path)) else dict(config)
    data = {k: v for k, v in data.items() if k not in ("auto_map", "architectures", "quantization_config")}
    mha = data.get("num_key_value_heads") == data.get("num_attention_heads")  # keep MHA/MLA models MHA
    for key, value in SHRINK.items():
        if key in data:
            data[key] = value
    for key in ("first_k_dense_replace",):
        if key in data:
            data[key] = min(data[key], 1)
    if mha and "num_key_value_heads" in data:
        data["num_key_value_heads"] = data["num_attention_heads"]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(data.get(key), int):
            data[key] = 1
    if data.get("q_lora_rank"):
        data["q_lora_rank"] = 24
    if data.get("n_group", 1) and data.get("n_group", 1) > 1:
        data["n_group"], data["topk_group"] = 4, 2
    data.update(overrides)
    return data


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.15) -> torch.nn.Module:
    """Re-draw every parameter and float buffer N(0, std) (norm weights ~ 1), seeded."""
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not tensor.is_floating_point() or "rotary" in name or "inv_freq" in name:
            continue
        noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32) * std
        if "norm" in name or "layernorm" in name:
            noise = 1.0 + noise
        tensor.copy_(noise.to(tensor.dtype))
    return model


def tiny_model(config: dict | str | Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny random CausalLM of the config's family (fp32 eager by default), in eval mode."""
    data = shrink_config(config, **overrides)
    model_type = data.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **data)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return randomize_(model, seed).eval()
