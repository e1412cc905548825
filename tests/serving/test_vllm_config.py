"""The plugin's config resolution, in the main environment (no vLLM needed): what vLLM would be told
to build from a condensed ``config.json``, and the one-line refusals of what it cannot serve exactly."""

import sys

import pytest
import torch
from conftest import ROOT, make_tiny

sys.path.insert(0, str(ROOT / "plugins" / "vllm" / "src"))
from cdmoe_vllm.config import SUPPORTED_FAMILIES, CdmoeVllmError, family_config  # noqa: E402

import cdmoe  # noqa: E402
from cdmoe.methods.calib_stats import calibration_stats  # noqa: E402
from cdmoe.methods.expert_reduce import merge_experts  # noqa: E402
from cdmoe.methods.layer_drop import drop_blocks  # noqa: E402
from cdmoe.methods.msmoe import msmoe_plans  # noqa: E402


def _config(model) -> dict:
    return model.config.to_dict()


def test_a_condensed_config_resolves_to_the_family_with_the_plugin_class():
    model = make_tiny("qwen2_moe")
    cdmoe.condense_layers(model, [cdmoe.LayerChoice(layer=1, experts=(0, 2), gates=(0.3, 0.2))])
    resolved = family_config(_config(model))
    assert resolved.model_type == "qwen2_moe" and resolved.architectures == ["CdmoeQwen2MoeForCausalLM"]
    assert resolved.cdmoe["condensed_layers"] == model.config.cdmoe["condensed_layers"]


def test_block_drop_renumbers_the_kept_layers():
    model = make_tiny("deepseek_v2")
    n = model.config.num_hidden_layers
    drop_blocks(model, [1])
    resolved = family_config(_config(model))
    assert resolved.num_hidden_layers == n - 1 and resolved.cdmoe["kept_layers"] == [i for i in range(n) if i != 1]


def test_msmoe_outputs_are_refused_in_one_line():
    """The id map behind the full router has no vLLM counterpart in the plugin: refused, not served wrong."""
    model = make_tiny("mixtral")
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    stats = calibration_stats(model, ids)
    merge_experts(model, msmoe_plans(model, stats, model.config.num_local_experts - 2))
    with pytest.raises(CdmoeVllmError, match="M-SMoE outputs") as refused:
        family_config(_config(model))
    assert "\n" not in str(refused.value) and all(f in str(refused.value) for f in SUPPORTED_FAMILIES)


# --- a malformed 'cdmoe' entry or incomplete checkpoint files: one line, before vLLM starts a worker ---

REWRITE = "write the directory again with cdmoe"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A condensed tiny qwen2_moe (layers 1 and 2 condensed, 2 of its 4 layers keep their MoE) saved twice:
    as one file and in several shards with an index."""
    import json

    root = tmp_path_factory.mktemp("saved")
    model = make_tiny("qwen2_moe")
    cdmoe.condense_layers(model, [cdmoe.LayerChoice(layer=i, experts=(0, 2), gates=(0.3, 0.2)) for i in (1, 2)])
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="100KB")
    assert len(json.loads((root / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    return root


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _read(model_dir):
    import json

    return json.loads((model_dir / "config.json").read_text())


def _refused(model_dir, data=None, *, what: str, fix: str = REWRITE):
    """``family_config`` as vLLM calls it (``AutoConfig.from_pretrained(dir)``) must refuse in one line
    naming the directory, the problem and the fix."""
    with pytest.raises(CdmoeVllmError) as refused:
        family_config(_read(model_dir) if data is None else data, name_or_path=str(model_dir))
    message = str(refused.value)
    assert "\n" not in message and message.startswith("cdmoe-vllm: ") and str(model_dir) in message, message
    assert what in message and fix in message, message
    assert not isinstance(refused.value, ValueError)  # vLLM's pydantic ModelConfig would wrap it in 3 lines


def _with_entry(data, **changes):
    spec = dict(data["cdmoe"])
    for key, value in changes.items():
        if value is ...:
            spec.pop(key)
        else:
            spec[key] = value
    return {**data, "cdmoe": spec}


@pytest.mark.parametrize("change,what", [
    (lambda d: {**d, "cdmoe": "hello"}, "the 'cdmoe' entry is a string, not an object"),
    (lambda d: {**d, "cdmoe": None}, "the 'cdmoe' entry is null, not an object"),
    (lambda d: {k: v for k, v in d.items() if k != "cdmoe"}, "model_type 'cdmoe' but no 'cdmoe' entry"),
    (lambda d: _with_entry(d, base_model_type=...), "no base_model_type (the family it was condensed from)"),
    (lambda d: _with_entry(d, base_model_type=7), "base_model_type is 7, not a family name"),
    (lambda d: _with_entry(d, format_version=...), "no format_version"),
    (lambda d: _with_entry(d, condensed_layers="x"), "condensed_layers is a string, not an object"),
    (lambda d: _with_entry(d, condensed_layers={"9": {"intermediate_size": 8}}), "condensed layer 9 is not a layer"),
    (lambda d: _with_entry(d, condensed_layers={"1": {"intermediate_size": -3}}),
     "condensed layer 1: intermediate_size is -3, not a positive integer"),
    (lambda d: _with_entry(d, condensed_layers={"one": {}}), "condensed layer 'one' is not a layer"),
    (lambda d: _with_entry(d, dropped_layers=[1]), "layer 1 is both condensed and dropped"),
    (lambda d: _with_entry(d, dropped_blocks="0"), "dropped_blocks is a string, not a list"),
    (lambda d: _with_entry(d, pruned_experts="x"), "pruned_experts is a string, not an object"),
    (lambda d: _with_entry(d, pruned_experts={"9": {"num_experts": 4}}), "pruned layer 9 is not a layer"),
    (lambda d: _with_entry(d, pruned_experts={"0": {"num_experts": 0}}),
     "pruned layer 0: num_experts is 0, not a positive integer"),
    (lambda d: _with_entry(d, pruned_experts={"0": 4}), "pruned layer 0: num_experts is None, not a positive integer"),
    (lambda d: _with_entry(d, pruned_experts={"1": {"num_experts": 4}}), "layer 1 is both pruned and condensed"),
])
def test_a_malformed_cdmoe_entry_is_refused_in_one_line(saved, change, what):
    _refused(saved / "single", change(_read(saved / "single")), what=what)


def test_an_unknown_format_version_names_the_version_and_the_fix(saved):
    data = _with_entry(_read(saved / "single"), format_version=2)
    _refused(saved / "single", data, what="format_version 2 is not 1", fix="plugin of the cdmoe version that wrote it")


def test_a_condensed_dense_layer_is_refused(tmp_path):
    """deepseek_v2's first layer is dense by its family rule: vLLM would build a dense MLP there, not the
    condensed one the entry describes."""
    model = make_tiny("deepseek_v2")
    cdmoe.condense_layers(model, [cdmoe.LayerChoice(layer=1, experts=(0, 2), gates=(0.3, 0.2))])
    model.save_pretrained(tmp_path / "v2")
    data = _read(tmp_path / "v2")
    data["cdmoe"]["condensed_layers"] = {"0": data["cdmoe"]["condensed_layers"]["1"]}
    _refused(tmp_path / "v2", data, what="layer 0 is a dense layer of deepseek_v2")


def test_a_missing_shard_is_refused(saved, tmp_path):
    model_dir = _copy(saved / "sharded", tmp_path / "m")
    shard = sorted(model_dir.glob("*.safetensors"))[1]
    shard.unlink()
    _refused(model_dir, what=f"{shard.name}, named in model.safetensors.index.json, is missing", fix="copy it again")


def test_a_truncated_file_is_refused(saved, tmp_path):
    model_dir = _copy(saved / "single", tmp_path / "m")
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _refused(model_dir, what="model.safetensors is not a complete safetensors file", fix="copy it again")


def test_an_index_entry_its_shard_lacks_is_refused(saved, tmp_path):
    import json

    model_dir = _copy(saved / "sharded", tmp_path / "m")
    index_file = model_dir / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name = "model.layers.0.self_attn.o_proj.weight"
    others = sorted(set(index["weight_map"].values()) - {index["weight_map"][name]})
    index["weight_map"][name] = others[0]
    index_file.write_text(json.dumps(index))
    _refused(model_dir, what=f"{name} is not in {others[0]}", fix="copy it again")


def test_no_weights_are_refused(saved, tmp_path):
    model_dir = _copy(saved / "single", tmp_path / "m")
    (model_dir / "model.safetensors").unlink()
    _refused(model_dir, what="no *.safetensors weights", fix="copy it again")


@pytest.mark.parametrize("shape_of", [None, "wrong"])
def test_a_missing_or_misshapen_condensed_tensor_is_refused(saved, tmp_path, shape_of):
    from safetensors.torch import load_file, save_file

    model_dir = _copy(saved / "single", tmp_path / "m")
    weights = model_dir / "model.safetensors"
    tensors = load_file(weights)
    name = "model.layers.2.mlp.down_proj.weight"
    if shape_of is None:
        del tensors[name]
        what = f"{name} (condensed layer 2) is missing"
    else:
        tensors[name] = tensors[name][:, :-1].contiguous()
        width = _read(model_dir)["cdmoe"]["condensed_layers"]["2"]["intermediate_size"]
        shape = tuple(tensors[name].shape)
        what = f"{name} has shape {shape}, condensed layer 2 needs ({shape[0]}, {width})"
    save_file(tensors, weights, metadata={"format": "pt"})
    _refused(model_dir, what=what)


def test_a_tensor_one_layer_lacks_is_refused(saved, tmp_path):
    """Every layer of cdmoe's output has the attention and norms of the others, and the block tensors
    of the others of its kind: one lacking a tensor its siblings have is refused while the config is read."""
    from safetensors.torch import load_file, save_file

    model_dir = _copy(saved / "single", tmp_path / "m")
    tensors = load_file(model_dir / "model.safetensors")
    for name in ("model.layers.3.mlp.shared_expert.up_proj.weight", "model.layers.1.self_attn.o_proj.weight"):
        del tensors[name]  # (3 is an MoE layer, its sibling 0 keeps it; layers 1 and 2 are condensed)
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    _refused(model_dir, what="tensor model.layers.1.self_attn.o_proj.weight is missing from the checkpoint (the other "
                             "layers of its kind have theirs)", fix="copy it again")


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_every_family_condensed_and_layer_dropped_resolves_from_its_directory(family, tmp_path):
    """No refusal of what cdmoe writes: one MoE layer condensed and one dropped (Layer Drop), saved, read."""
    from cdmoe.methods.layer_drop import drop_layers
    from cdmoe.models.adapter import moe_blocks

    model = make_tiny(family, num_hidden_layers=4)
    first, last = moe_blocks(model)[0].layer_idx, moe_blocks(model)[-1].layer_idx
    assert first < last
    # K = 4: at a K where the condensed width equals the dense one (96 here) cdmoe writes a plain family config
    cdmoe.condense_layers(model, [cdmoe.LayerChoice(layer=first, experts=(0, 2, 3, 5), gates=(0.3, 0.2, 0.1, 0.1))])
    drop_layers(model, [last])
    model.save_pretrained(tmp_path / family)
    resolved = family_config(_read(tmp_path / family), name_or_path=str(tmp_path / family))
    assert resolved.model_type == family and str(first) in resolved.cdmoe["condensed_layers"]


def test_intact_directories_resolve(saved):
    for name in ("single", "sharded"):
        resolved = family_config(_read(saved / name), name_or_path=str(saved / name))
        assert resolved.architectures == ["CdmoeQwen2MoeForCausalLM"]


# --- DeepseekV2 with n_group null (transformers' default): vLLM's grouped top-k needs the group keys ---


def test_greedy_deepseek_v2_routing_gets_one_group_and_transformers_computes_the_same(tmp_path):
    """vLLM 0.32 always routes DeepseekV2 with grouped top-k over ``n_group`` groups (None: its CPU
    router asserts); transformers' greedy router ignores the groups. The resolved config has one
    group with one kept, and transformers' logits are the same with those keys as with null."""
    from transformers import AutoModelForCausalLM

    from cdmoe_vllm.config import greedy_routing_overrides

    model = make_tiny("deepseek_v2", n_group=None, topk_group=None)
    assert model.config.topk_method == "greedy" and model.config.n_group is None
    cdmoe.condense_layers(model, [cdmoe.LayerChoice(layer=2, experts=(0, 3), gates=(0.3, 0.2))])
    model.save_pretrained(tmp_path / "v2")
    resolved = family_config(_read(tmp_path / "v2"), name_or_path=str(tmp_path / "v2"))
    assert (resolved.n_group, resolved.topk_group) == (1, 1)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = {}
    for groups in (None, 1):
        fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "v2", n_group=groups, topk_group=groups).eval()
        assert (fresh.config.n_group, fresh.config.topk_group) == (groups, groups)
        with torch.no_grad():
            logits[groups] = fresh(ids).logits
    torch.testing.assert_close(logits[1], logits[None], rtol=0, atol=0)
    # the same keys for an original vLLM serves itself (hf_overrides); nothing to add where vLLM is right
    assert greedy_routing_overrides("deepseek_v2", {"n_group": None}) == {"n_group": 1, "topk_group": 1}
    assert greedy_routing_overrides("deepseek_v2", {"n_group": 1, "topk_group": 1}) == {}
    grouped = {"topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3}
    assert greedy_routing_overrides("deepseek_v2", grouped) == {} == greedy_routing_overrides("deepseek_v3", {})


def test_the_eval_job_reports_a_pydantic_error_by_its_message():
    """vLLM's config classes are pydantic dataclasses: a refused --max-model-len reaches the eval job as a
    ValidationError whose last line is a link; cdmoe eval prints the message instead."""
    from pydantic.dataclasses import dataclass

    from cdmoe_vllm.lmeval_job import _one_line

    @dataclass
    class ModelConfig:
        max_model_len: int = 0

        def __post_init__(self):
            raise ValueError("User-specified max_model_len (100000) is greater than the derived max_model_len (512)")

    with pytest.raises(Exception) as raised:
        ModelConfig(max_model_len=100000)
    assert "errors.pydantic.dev" in str(raised.value).splitlines()[-1]  # what the job used to report
    assert _one_line(raised.value) == "User-specified max_model_len (100000) is greater than the derived max_model_len (512)"
    assert _one_line(RuntimeError("first\nlast")) == "last"


def test_a_budget_plan_resolves_with_its_per_layer_expert_counts(tmp_path):
    """The budget planner's directory (pruned layers with their own expert counts, a condensed and a dropped
    layer) resolves to the family with the counts kept; a count its weight files do not have is refused."""
    import json

    from cdmoe.models.mixed import LayerAction, apply_plan

    model = make_tiny("qwen2_moe")
    apply_plan(model, {0: LayerAction("prune", (0, 2, 3, 5, 6, 7)), 1: LayerAction("condense", (4,), (0.3,)),
                       2: LayerAction("prune", (1, 2, 5, 6)), 3: LayerAction("drop")})
    model.save_pretrained(tmp_path / "plan")
    resolved = family_config(_read(tmp_path / "plan"), name_or_path=str(tmp_path / "plan"))
    assert resolved.architectures == ["CdmoeQwen2MoeForCausalLM"] and resolved.num_experts == 8
    assert resolved.cdmoe["pruned_experts"] == {"0": {"num_experts": 6}, "2": {"num_experts": 4}}
    data = _read(tmp_path / "plan")
    data["cdmoe"]["pruned_experts"]["2"]["num_experts"] = 5
    (tmp_path / "plan" / "config.json").write_text(json.dumps(data))
    _refused(tmp_path / "plan", what="model.layers.2.mlp.gate.weight has shape (4, 64), pruned layer 2 keeps 5 experts")


# --- quantised outputs (compressed-tensors): what this machine's vLLM serves, the rest refused in one line ---

def _quantised_config(tmp_path, scheme: str) -> dict:
    """A condensed tiny deepseek_v2 (input widths multiples of 128: every scheme fits) quantised with ``scheme``."""
    from cdmoe.methods.compressed import quantize_compressed
    from cdmoe.models.storage_dtypes import StoragePlan

    model = make_tiny("deepseek_v2", hidden_size=128, moe_intermediate_size=128, intermediate_size=256,
                      kv_lora_rank=128, v_head_dim=32)
    cdmoe.condense_layers(model, [cdmoe.LayerChoice(layer=2, experts=(0, 2), gates=(0.3, 0.2))])
    model, _ = quantize_compressed(model, scheme, StoragePlan(default=torch.float32))
    model.save_pretrained(tmp_path / scheme)
    import json

    return json.loads((tmp_path / scheme / "config.json").read_text())


def test_a_w8a8_output_resolves_with_its_quantisation_and_unfused_experts(tmp_path):
    config = _quantised_config(tmp_path, "w8a8")
    resolved = family_config(config, name_or_path=str(tmp_path / "w8a8"))  # its files checked too
    assert resolved.architectures == ["CdmoeDeepseekV2ForCausalLM"]
    assert resolved.quantization_config["quant_method"] == "compressed-tensors"
    assert resolved.cdmoe["unfused_experts"] == [1, 3]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU these schemes are vLLM's to run")
@pytest.mark.parametrize("scheme", ["w4a16", "fp8"])
def test_schemes_the_cpu_cannot_run_are_refused_in_one_line(tmp_path, scheme):
    with pytest.raises(CdmoeVllmError, match=f"{scheme} checkpoints need a GPU") as refused:
        family_config(_quantised_config(tmp_path, scheme))
    assert "\n" not in str(refused.value)


def test_a_bitsandbytes_output_is_refused_naming_what_is_served():
    model = make_tiny("qwen2_moe")
    cdmoe.condense_layers(model, [cdmoe.LayerChoice(layer=1, experts=(0, 2), gates=(0.3, 0.2))])
    config = {**_config(model), "quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}
    with pytest.raises(CdmoeVllmError, match=r"quantised \(bitsandbytes\) .* --quantize w8a8, w4a16 or fp8"):
        family_config(config)


def test_a_packed_condensed_tensor_of_the_wrong_shape_is_refused(tmp_path):
    """w4a16 stores a condensed projection as weight_packed (rows, columns / 8): checked from the headers."""
    import json

    from cdmoe_vllm.files import check_files
    from safetensors.torch import load_file, save_file

    config = _quantised_config(tmp_path, "w4a16")
    out = tmp_path / "w4a16"
    spec = {**config["cdmoe"], "kept_layers": [0, 1, 2, 3]}
    kinds = ["dense", "moe", "condensed", "moe"]
    check_files(out, config, spec, spec["kept_layers"], kinds)  # intact: passes
    tensors = load_file(out / "model.safetensors")
    name = "model.layers.2.mlp.down_proj.weight_packed"
    assert tuple(tensors[name].shape) == (128, config["cdmoe"]["condensed_layers"]["2"]["intermediate_size"] // 8)
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CdmoeVllmError, match=f"{name} has shape"):
        check_files(out, json.loads((out / "config.json").read_text()), spec, spec["kept_layers"], kinds)
