"""Shared fixtures: tiny random models of every supported family, built from real configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cdmoe.models.testing import EXTRA_FAMILY_CONFIGS, tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(2)

FIXTURES = Path(__file__).parent / "fixtures"
CONFIGS = FIXTURES / "configs"
ROOT = Path(__file__).resolve().parents[1]
DEMO_TEXT = ROOT / "demo" / "data" / "test.txt.gz"
DEMO_CALIB = ROOT / "demo" / "data" / "valid.txt.gz"

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


def tiny_tokenizer():
    """A real (small) byte-level BPE tokenizer trained on the demo text, 320 tokens, ``<eos>`` = 0."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from cdmoe.search.calibration import read_documents

    docs = read_documents(DEMO_TEXT)[:300]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(docs, vocab_size=320, min_frequency=2, special_tokens=["<eos>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny deepseek_v2 checkpoint with a real (small) BPE tokenizer, saved like a hub model."""
    tok = tiny_tokenizer()
    model = make_tiny("deepseek_v2", seed=7, num_hidden_layers=5, vocab_size=len(tok), bos_token_id=0,
                      eos_token_id=0, pad_token_id=0)
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def remote_code_checkpoint(path: Path) -> Path:
    """A random checkpoint at ``path`` that only its own code loads: the DeepSeekMoE-16B stand-in
    (``model_type: deepseek``, one module per expert) of ``fixtures/remote_deepseek``."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    from cdmoe.models.testing import randomize_

    shutil.copytree(FIXTURES / "remote_deepseek", path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    randomize_(AutoModelForCausalLM.from_config(config, trust_remote_code=True), seed=0).save_pretrained(path)
    return path


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and the machine is shared (``pytestmark = usefixtures(...)``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_loads_without_cdmoe(out: Path, ids: torch.Tensor, expected: torch.Tensor, tmp_path: Path) -> str:
    """Load ``out`` with plain transformers in a process where cdmoe cannot be imported (``trust_remote_code``:
    the directory's own modelling file) and check its logits on ``ids`` equal ``expected``; returns its stdout."""
    import subprocess
    import sys

    torch.save((ids, expected), tmp_path / "expected.pt")
    script = f"""
import sys
sys.modules["cdmoe"] = None  # any import of cdmoe fails, as where it is not installed
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, attn_implementation="eager").eval()
ids, expected = torch.load({str(tmp_path / 'expected.pt')!r})
with torch.no_grad():
    got = model(input_ids=ids).logits
torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
print("OK", type(model).__name__)
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout
