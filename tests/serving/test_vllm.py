"""vLLM serving of condensed checkpoints (plugin ``plugins/vllm``) against transformers.

Every model is built here with cdmoe (this venv: transformers >= 5.23), served by vLLM in
the vLLM venv (``scripts/setup_vllm.sh``; a separate venv because vLLM pins an older
transformers), and compared with transformers' greedy decoding of the same directory in
fp32: identical greedy tokens, and vLLM's top-5 logprobs within ``ATOL`` of transformers'
log-softmax for the same token ids. All vLLM runs share one subprocess (one engine start
per model). Skipped when the vLLM venv is absent.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("CDMOE_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
DEMO = ROOT / "demo" / "model"
ONLY = set(filter(None, os.environ.get("CDMOE_VLLM_MODELS", "").split(",")))  # e.g. "qwen2_moe,quantised"
ATOL = 1e-4  # fp32 logprobs, vLLM vs transformers (measured ~1e-5)
NEW_TOKENS = 32
SUPPORTED = "deepseek_v2, deepseek_v3, qwen2_moe, qwen3_moe, mixtral, olmoe, glm4_moe"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=f"no vLLM venv at {VLLM_PYTHON} (scripts/setup_vllm.sh)"),
]


def _choices(layers, experts, seed=0):
    from cdmoe.models.condensed import LayerChoice

    gen = torch.Generator().manual_seed(seed)
    return [LayerChoice(layer=i, experts=tuple(experts), gates=tuple((0.1 + 0.3 * torch.rand(len(experts), generator=gen)).tolist()))
            for i in layers]


def _condensed(model, layers, experts, out):
    from cdmoe.checkpoint.record import condense_layers

    condense_layers(model, _choices(layers, experts))
    model.save_pretrained(out)
    return out


def _demo_prompts(n=8, length=12):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    lines = [line for line in gzip.open(ROOT / "demo" / "data" / "valid.txt.gz", "rt") if len(line) > 200]
    return [tok.encode(line).ids[:length] for line in lines[:n]]


def _tiny(name, **overrides):
    from conftest import FAMILY_SOURCES  # tests/conftest.py: the real family configs

    from cdmoe.models.testing import tiny_model

    # head_dim 32: vLLM-CPU's attention supports head sizes 32, 64, 80, ... (not the default 16)
    return tiny_model(FAMILY_SOURCES[name], seed=3, **{"num_attention_heads": 2, "num_key_value_heads": 1,
                                                      "head_dim": 32, **overrides})


def _demo(dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(DEMO, dtype=dtype).eval()


def _untied_demo(out: Path) -> Path:
    """The original demo with its tied lm_head written out: vLLM 0.32's DeepseekV2 ignores
    ``tie_word_embeddings`` (all-zero logits, no error), so the control needs the tensor."""
    sys.path.insert(0, str(ROOT / "plugins" / "vllm" / "src"))
    from cdmoe_vllm.tied import servable_copy  # the copy the throughput benchmark serves too

    assert servable_copy(DEMO, out) == out
    return out

def _build(tmp: Path) -> dict:
    """Model name -> (directory, prompts); all fp32."""
    from cdmoe.methods.layer_drop import drop_blocks, drop_layers

    demo_prompts = _demo_prompts()
    tiny_prompts = [[(7 * p + 3 * i) % 120 + 2 for i in range(10)] for p in range(4)]
    m = {
        "demo-original": (_untied_demo(tmp / "demo-original"), demo_prompts),
        "demo-n4-k4": (_condensed(_demo(), [1, 3, 4, 7], [1, 0, 3, 6], tmp / "demo-n4-k4"), demo_prompts),
    }
    model = drop_layers(_demo(), [4, 7])
    model.save_pretrained(tmp / "demo-layer-drop")
    m["demo-layer-drop"] = (tmp / "demo-layer-drop", demo_prompts)
    model = drop_blocks(_demo(), [0, 5])  # block 0 is the dense layer: the dense rule moves
    model.save_pretrained(tmp / "demo-block-drop")
    m["demo-block-drop"] = (tmp / "demo-block-drop", demo_prompts)
    for family, layers, experts in [("qwen2_moe", [1, 2], [5, 2]), ("qwen3_moe", [0, 2], [1, 6]),
                                    ("mixtral", [1, 3], [4, 0]), ("olmoe", [0, 3], [2, 7])]:
        m[family] = (_condensed(_tiny(family), layers, experts, tmp / family), tiny_prompts)
    # MLA for real: vLLM-CPU's MLA kernel takes only DeepSeek's latent size (kv_lora_rank 512 + rope 64)
    v3 = _tiny("deepseek_v3", num_key_value_heads=2, kv_lora_rank=512, qk_rope_head_dim=64, head_dim=64, qk_nope_head_dim=32,
               v_head_dim=32, num_hidden_layers=3)  # layer 0 dense, 1 MoE (grouped routing), 2 condensed
    m["deepseek_v3-mla"] = (_condensed(v3, [2], [3, 0, 5], tmp / "deepseek_v3-mla"), tiny_prompts)
    # partial rotary (factor 0.5), first layer dense; K = 3: with K = 2 the width equals the dense one
    m["glm4_moe"] = (_condensed(_tiny("glm4_moe"), [2], [0, 5, 7], tmp / "glm4_moe"), tiny_prompts)
    return m


def _bad_inputs(tmp: Path, good: Path) -> dict:
    """Name -> directory vLLM must refuse with one line naming the supported families."""
    granite = _condensed(_tiny("granitemoe"), [1], [0, 3], tmp / "granitemoe")  # no native vLLM class here
    assert json.loads((granite / "config.json").read_text())["model_type"] == "cdmoe"
    quant = tmp / "quantised"
    shutil.copytree(good, quant)
    config = json.loads((quant / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (quant / "config.json").write_text(json.dumps(config))
    return {"granitemoe": granite, "quantised": quant}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Build every model, serve all of them in one vLLM subprocess; name -> (dir, prompts, result)."""
    tmp = tmp_path_factory.mktemp("vllm")
    models = _build(tmp)
    bad = _bad_inputs(tmp, models["qwen2_moe"][0])
    if ONLY:  # CDMOE_VLLM_MODELS: serve only these (quicker runs, e.g. against a mutant)
        models = {k: v for k, v in models.items() if k in ONLY}
        bad = {k: v for k, v in bad.items() if k in ONLY}
    # one run as a user's LLM(model=dir): vLLM's default multi-process set-up (the plugin must load in its
    # engine and worker) and no engine settings from cdmoe (the plugin's own CPU rotary fix must do)
    runs = [{"name": k, "model": str(d), "prompts": p, "max_tokens": NEW_TOKENS, "multiprocess": k == "demo-n4-k4",
             "plain": k == "demo-n4-k4", "mla": k.endswith("-mla")} for k, (d, p) in models.items()]
    runs += [{"name": k, "model": str(d), "prompts": [[1, 2]], "max_tokens": 1} for k, d in bad.items()]
    (tmp / "job.json").write_text(json.dumps({"runs": runs}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(VLLM_PYTHON), str(Path(__file__).with_name("vllm_generate.py")), str(tmp / "job.json"),
                           str(tmp / "out.json")], env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp / "out.json").read_text())["runs"]
    everything = {**{k: v for k, v in models.items()}, **{k: (d, None) for k, d in bad.items()}}
    return {run["name"]: (*everything[run["name"]], r) for run, r in zip(runs, results)}


def _get(served, name):
    if name not in served:
        pytest.skip(f"{name} not in CDMOE_VLLM_MODELS")
    return served[name]


def _compare(model_dir, prompts, result):
    from hf_reference import greedy

    assert "error" not in result, result.get("message")
    tokens, logprobs = greedy(model_dir, prompts, NEW_TOKENS)
    assert result["tokens"] == tokens
    worst = 0.0
    for p, steps in enumerate(result["logprobs"]):
        for s, top in enumerate(steps):
            assert len(top) >= 5
            for token, value in top.items():
                worst = max(worst, abs(logprobs[p][s, int(token)].item() - value))
    assert worst <= ATOL, f"max |logprob diff| {worst:.2e}"
    return worst


@pytest.mark.parametrize("name", ["demo-original", "demo-n4-k4", "demo-layer-drop", "demo-block-drop",
                                  "qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v3-mla", "glm4_moe"])
def test_vllm_matches_transformers(served, name):
    model_dir, prompts, result = _get(served, name)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    assert (config["model_type"] == "cdmoe") == (name != "demo-original")
    assert result.get("use_mla") == name.endswith("-mla")  # the attention vLLM really ran
    if name == "qwen2_moe":  # the shared-expert gate is really exercised
        assert all(layer["gated_width"] > 0 for layer in config["cdmoe"]["condensed_layers"].values())
    worst = _compare(model_dir, prompts, result)
    print(f"{name}: {len(prompts)} greedy sequences identical, max |top-5 logprob diff| {worst:.1e}")  # pytest -s


@pytest.mark.parametrize("name,what", [("granitemoe", "condensed 'granitemoe' models are not supported"),
                                       ("quantised", "quantised (bitsandbytes) condensed checkpoints are not supported")])
def test_refusal_is_one_line(served, name, what):
    result = _get(served, name)[2]
    assert "error" in result
    line = next(line for line in result["message"].splitlines() if "cdmoe-vllm:" in line)
    assert what in line and SUPPORTED in line
