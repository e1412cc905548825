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
PLUGIN_SRC = ROOT / "plugins" / "vllm" / "src"
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

def _planned(model, out: Path) -> Path:
    """A budget planner's kind of checkpoint (``cdmoe.json`` plan replayed by ``apply_plan``): MoE layers
    pruned to different expert counts (router rows and experts kept), one condensed with K = 2, one with
    its shared experts only (K = 0), one dropped, the rest kept."""
    from cdmoe.models.adapter import moe_blocks
    from cdmoe.models.mixed import LayerAction, apply_plan

    blocks = moe_blocks(model)
    layers, e, groups = [b.layer_idx for b in blocks], blocks[0].num_experts, blocks[0].routing_groups
    per_group = e // groups
    pick = lambda n: tuple(g * per_group + i for g in range(groups) for i in range(per_group)  # noqa: E731
                           if (3 * i + g) % per_group < n // groups)  # n kept, as many per group
    plan = {layers[0]: LayerAction("prune", pick(3 * e // 4)), layers[1]: LayerAction("condense", (5, 1), (0.3, 0.2)),
            layers[2]: LayerAction("prune", pick(e // 2)), layers[3]: LayerAction("drop"),
            layers[-1]: LayerAction("condense", (), ())}
    apply_plan(model, plan)
    model.save_pretrained(out)
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
    # transformers' defaults n_group = topk_group = null (greedy routing): vLLM's grouped top-k asserted on them
    v2 = _tiny("deepseek_v2", n_group=None, topk_group=None, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32)
    m["deepseek_v2-ngroup-null"] = (_condensed(v2, [2], [0, 3], tmp / "deepseek_v2-ngroup-null"), tiny_prompts)
    # the budget planner's mixes: per-layer expert counts, condensed and dropped layers in one directory
    # (demo: two shared experts; qwen2_moe: a gated shared expert; glm4_moe: correction bias, 2 groups)
    m["demo-planner"] = (_planned(_demo(), tmp / "demo-planner"), demo_prompts)
    m["qwen2_moe-planner"] = (_planned(_tiny("qwen2_moe", num_hidden_layers=5), tmp / "qwen2_moe-planner"),
                              tiny_prompts)
    glm = _tiny("glm4_moe", num_hidden_layers=6, n_group=2, topk_group=1)
    m["glm4_moe-planner"] = (_planned(glm, tmp / "glm4_moe-planner"), tiny_prompts)
    return m


def _edited(good: Path, out: Path, config=None, remove=(), truncate=False) -> Path:
    """A copy of ``good`` with ``config(dict)`` applied to its config.json, the tensors ``remove``
    taken out of its weights, or its weight file cut in half."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(good, out)
    if config:
        data = json.loads((out / "config.json").read_text())
        config(data)
        (out / "config.json").write_text(json.dumps(data))
    weights = out / "model.safetensors"
    if remove:
        tensors = load_file(weights)
        for name in remove:
            del tensors[name]
        save_file(tensors, weights, metadata={"format": "pt"})
    if truncate:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return out


# tensors taken out of the qwen2_moe (layers 1, 2 condensed) and mixtral (1, 3) directories: one layer's
# (refused while the config is read: its sibling layers have it), or every layer's and the final norm
# (after loading: one half of the merged shared expert, a fused expert weight under Mixtral's block name)
MISSING = {"missing-in-one-layer": ["model.layers.0.self_attn.o_proj.weight"],
           "missing-everywhere": ["model.layers.0.mlp.shared_expert.up_proj.weight",
                                  "model.layers.3.mlp.shared_expert.up_proj.weight", "model.norm.weight"],
           "missing-experts": ["model.layers.0.mlp.experts.down_proj", "model.layers.2.mlp.experts.down_proj"]}


def _bad_inputs(tmp: Path, good: Path, mixtral: Path) -> dict:
    """Name -> directory vLLM must refuse with one line."""
    granite = _condensed(_tiny("granitemoe"), [1], [0, 3], tmp / "granitemoe")  # no native vLLM class here
    assert json.loads((granite / "config.json").read_text())["model_type"] == "cdmoe"
    quant = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    return {"granitemoe": granite,
            "quantised": _edited(good, tmp / "quantised", config=lambda c: c.update(quantization_config=quant)),
            "cdmoe-string": _edited(good, tmp / "cdmoe-string", config=lambda c: c.update(cdmoe="qwen2_moe")),
            "truncated": _edited(good, tmp / "truncated", truncate=True),
            **{k: _edited(mixtral if k == "missing-experts" else good, tmp / k, remove=v) for k, v in MISSING.items()}}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Build every model, serve all of them in one vLLM subprocess; name -> (dir, prompts, result)."""
    tmp = tmp_path_factory.mktemp("vllm")
    models = _build(tmp)
    bad = _bad_inputs(tmp, models["qwen2_moe"][0], models["mixtral"][0])
    if ONLY:  # CDMOE_VLLM_MODELS: serve only these (quicker runs, e.g. against a mutant)
        models = {k: v for k, v in models.items() if k in ONLY}
        bad = {k: v for k, v in bad.items() if k in ONLY}
    # one run as a user's LLM(model=dir): vLLM's default multi-process set-up (the plugin must load in its
    # engine and worker) and no engine settings from cdmoe (the plugin's own CPU rotary fix must do)
    runs = [{"name": k, "model": str(d), "prompts": p, "max_tokens": NEW_TOKENS, "multiprocess": k == "demo-n4-k4",
             "plain": k == "demo-n4-k4", "mla": k.endswith("-mla")} for k, (d, p) in models.items()]
    # with vLLM's default multi-process engine: refused before an engine process starts
    front = ("truncated", "missing-in-one-layer")
    runs += [{"name": k, "model": str(d), "prompts": [[1, 2]], "max_tokens": 1, "multiprocess": k in front}
             for k, d in bad.items()]
    if not ONLY or "sequence-parallel" in ONLY:  # no engine: the condensed MLP alone (vllm_checks.py)
        runs.append({"name": "sequence-parallel", "check": "sequence_parallel_mlp"})
    (tmp / "job.json").write_text(json.dumps({"runs": runs}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = str(PLUGIN_SRC)  # the repository's plugin, not a copy installed in the vLLM venv
    proc = subprocess.run([str(VLLM_PYTHON), str(Path(__file__).with_name("vllm_generate.py")), str(tmp / "job.json"),
                           str(tmp / "out.json")], env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    saved = json.loads((tmp / "out.json").read_text())
    assert Path(saved["plugin"]).is_relative_to(PLUGIN_SRC), saved["plugin"]
    results = saved["runs"]
    everything = {**{k: v for k, v in models.items()}, **{k: (d, None) for k, d in bad.items()}}
    return {run["name"]: (*everything.get(run["name"], (None, None)), r) for run, r in zip(runs, results)}


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
                                  "qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v3-mla", "glm4_moe",
                                  "deepseek_v2-ngroup-null", "demo-planner", "qwen2_moe-planner",
                                  "glm4_moe-planner"])
def test_vllm_matches_transformers(served, name):
    model_dir, prompts, result = _get(served, name)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    assert (config["model_type"] == "cdmoe") == (name != "demo-original")
    assert result.get("use_mla") == name.endswith("-mla")  # the attention vLLM really ran
    if name == "qwen2_moe":  # the shared-expert gate is really exercised
        assert all(layer["gated_width"] > 0 for layer in config["cdmoe"]["condensed_layers"].values())
    if name == "deepseek_v2-ngroup-null":  # transformers' defaults, left as they are in the directory
        assert config["n_group"] is None and config["topk_group"] is None and config["topk_method"] == "greedy"
    if name.endswith("-planner"):  # each layer its own expert count, condensed and dropped layers, one directory
        spec = config["cdmoe"]
        assert len({v["num_experts"] for v in spec["pruned_experts"].values()}) == 2
        assert len(spec["condensed_layers"]) == 2 and len(spec["dropped_layers"]) == 1
    worst = _compare(model_dir, prompts, result)
    print(f"{name}: {len(prompts)} greedy sequences identical, max |top-5 logprob diff| {worst:.1e}")  # pytest -s


def _one_line(result: dict) -> str:
    """The refusal the user sees: a CdmoeVllmError whose whole message is one line (not wrapped in
    vLLM's pydantic ValidationError, not "Engine core initialization failed")."""
    assert "error" in result, "served without an error"
    assert result["type"] == "CdmoeVllmError" and "\n" not in result["message"], result["message"]
    assert result["message"].startswith("cdmoe-vllm: "), result["message"]
    return result["message"]


@pytest.mark.parametrize("name,what", [("granitemoe", "condensed 'granitemoe' models are not supported"),
                                       ("quantised", "quantised (bitsandbytes) condensed checkpoints are not supported")])
def test_refusal_is_one_line(served, name, what):
    line = _one_line(_get(served, name)[2])
    assert what in line and SUPPORTED in line


@pytest.mark.parametrize("name,what", [
    ("cdmoe-string", "the 'cdmoe' entry is a string, not an object; write the directory again with cdmoe"),
    ("truncated", "model.safetensors is not a complete safetensors file"),
    ("missing-in-one-layer", f"tensor {MISSING['missing-in-one-layer'][0]} is missing from the checkpoint (the "
                             "other layers of its kind have theirs)"),
    ("missing-everywhere", "tensor {} is missing from the checkpoint (and 2 more: {}, {})".format(
        *MISSING["missing-everywhere"])),
    ("missing-experts", "tensor {} is missing from the checkpoint (and 1 more: {})".format(
        *MISSING["missing-experts"]))])
def test_a_malformed_or_incomplete_directory_is_refused_in_one_line(served, name, what):
    """A malformed entry, a truncated file and a tensor one layer lacks are refused while vLLM reads the
    config (the last two under vLLM's default multi-process engine: no engine process starts); tensors
    missing from every layer, after loading, by their checkpoint names."""
    model_dir, _, result = _get(served, name)
    line = _one_line(result)
    assert what in line and str(model_dir) in line


def test_condensed_mlp_takes_a_sequence_parallel_chunk(served):
    """DeepseekV2/V3 under expert + data parallel with TP > 1: the condensed MLP is replicated (not
    sharded) and gives a rank's chunk of tokens their full output (see vllm_checks.py)."""
    result = _get(served, "sequence-parallel")[2]
    assert "error" not in result, result.get("message")
    width, hidden = 96, 64
    assert result["shapes"] == {"False": [width, hidden], "True": [2 * width, hidden]}  # TP 2 shard vs whole
    assert result["chunk_error"] <= 1e-5 * result["scale"] and result["whole_error"] <= 1e-5 * result["scale"]
    assert result["sharded_refuses"]
