"""Serving an *original* tied DeepseekV2/V3 checkpoint in vLLM 0.32 (the control of the tests, the
baseline of the throughput benchmark): vLLM's DeepseekV2 ignores ``tie_word_embeddings``.

The plugin ties condensed checkpoints itself (:mod:`cdmoe_vllm.models`); an original checkpoint is
not the plugin's to load, so it is served from a copy with ``lm_head.weight`` written out.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

__all__ = ["servable_copy"]


def servable_copy(model_dir: Path, scratch: Path) -> Path:
    """``model_dir``, or a copy at ``scratch`` that vLLM 0.32 can serve: its DeepseekV2/V3 ignores
    ``tie_word_embeddings`` (all-zero logits, no error), so a tied original checkpoint (the demo model)
    is copied with its ``lm_head.weight`` written out (the same tensor as ``model.embed_tokens.weight``,
    every tensor in its stored dtype) and the config untied."""
    config = json.loads((model_dir / "config.json").read_text())
    shards = sorted(model_dir.glob("*.safetensors"))
    if not (config.get("tie_word_embeddings") and config.get("model_type") in ("deepseek_v2", "deepseek_v3")
            and len(shards) == 1):
        return model_dir
    tensors = load_file(shards[0])
    if "lm_head.weight" in tensors:
        return model_dir
    scratch.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, scratch / f.name)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, scratch / shards[0].name, metadata={"format": "pt"})
    (scratch / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}, indent=2))
    return scratch
