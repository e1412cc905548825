"""Checks of the plugin's vLLM modules that need no engine, run by ``vllm_generate.py`` (vLLM venv).

``sequence_parallel_mlp``: vLLM's DeepseekV2 decoder layer, under sequence-parallel MoE (expert +
data parallel, TP > 1), reduce-scatters the tokens over the TP ranks and calls the MoE block's
replacement with ``already_sequence_parallel=True``. The condensed MLP is built as rank 1 of TP 2
(vLLM's TP size and rank patched where its linear layers read them: one CPU process has no TP
group), once as usual and once for that layout; the latter must hold the whole weights and give
each rank's chunk of tokens its full output, against the SwiGLU computed here from the same tensors.
"""

from __future__ import annotations

from unittest import mock

import torch
import torch.nn.functional as F

HIDDEN, WIDTH, TOKENS = 64, 96, 7


def _one_process_group() -> None:
    """vLLM's parameters ask for the TP group when created: a group of this one process (gloo), unless
    an engine run earlier in this process left one."""
    import tempfile

    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    if not model_parallel_is_initialized():
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"file://{tempfile.mktemp(prefix='cdmoe-dist-')}")
        initialize_model_parallel(1, 1)


def sequence_parallel_mlp() -> dict:
    import vllm.model_executor.layers.linear as linear
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.models.deepseek_v2 import DeepseekV2MLP

    from cdmoe_vllm.layers import condensed_mlp

    gen = torch.Generator().manual_seed(0)
    gate, up = torch.randn(WIDTH, HIDDEN, generator=gen), torch.randn(WIDTH, HIDDEN, generator=gen)
    down, x = torch.randn(HIDDEN, WIDTH, generator=gen) / WIDTH, torch.randn(TOKENS, HIDDEN, generator=gen)
    reference = (F.silu(x @ gate.T) * (x @ up.T)) @ down.T  # Eq. 3, fused: one SwiGLU
    chunk = x[4:]  # this rank's tokens after the decoder layer's reduce-scatter
    with set_current_vllm_config(VllmConfig()):
        _one_process_group()
    with set_current_vllm_config(VllmConfig()), mock.patch.object(linear, "get_tensor_model_parallel_world_size",
                                                                  return_value=2), \
            mock.patch.object(linear, "get_tensor_model_parallel_rank", return_value=1):
        built = {sp: condensed_mlp(DeepseekV2MLP, HIDDEN, WIDTH, "silu", 0, None, "model.layers.1.mlp", sp)
                 for sp in (False, True)}
        shapes = {str(sp): list(m.gate_up_proj.weight.shape) for sp, m in built.items()}  # this rank's
        mlp = built[True]
        mlp.load_weights([("gate_proj.weight", gate), ("up_proj.weight", up), ("down_proj.weight", down)])
        for module in mlp.modules():  # as vLLM's loader does next (on CPU: builds the linear kernels)
            if hasattr(getattr(module, "quant_method", None), "process_weights_after_loading"):
                module.quant_method.process_weights_after_loading(module)
        with torch.no_grad():
            out = mlp(chunk, already_sequence_parallel=True)
            whole = mlp(x)  # (the same replicated layer outside the sequence-parallel layout)
        try:
            built[False](chunk, already_sequence_parallel=True)
            sharded_refuses = False
        except AssertionError:
            sharded_refuses = True
    return {"shapes": shapes,
            "chunk_error": (out - reference[4:]).abs().max().item(), "whole_error": (whole - reference).abs().max().item(),
            "scale": reference.abs().max().item(), "sharded_refuses": sharded_refuses}


CHECKS = {"sequence_parallel_mlp": sequence_parallel_mlp}
