"""Shared fixtures: tiny random models of every supported family, built from real configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cdmoe.testing import EXTRA_FAMILY_CONFIGS, tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(2)

FIXTURES = Path(__file__).parent / "fixtures"
CONFIGS = FIXTURES / "configs"

# every family we support that has a native transformers class: real configs first
FAMILY_SOURCES = {
    "deepseek_v2": CONFIGS / "deepseek-ai__DeepSeek-V2-Lite.json",
    "deepseek_v3": CONFIGS / "deepseek-ai__DeepSeek-V3.json",
    "qwen2_moe": CONFIGS / "Qwen__Qwen1.5-MoE-A2.7B.json",
    "qwen2_moe_57b": CONFIGS / "Qwen__Qwen2-57B-A14B.json",
    "qwen3_moe": CONFIGS / "Qwen__Qwen3-30B-A3B.json",
    "mixtral": CONFIGS / "mistralai__Mixtral-8x7B-v0.1.json",
    "olmoe": CONFIGS / "allenai__OLMoE-1B-7B-0924.json",
    **EXTRA_FAMILY_CONFIGS,
}
FAMILIES = sorted(FAMILY_SOURCES)


def make_tiny(name: str, seed: int = 0, **overrides):
    return tiny_model(FAMILY_SOURCES[name], seed=seed, **overrides)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param
