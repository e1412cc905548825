"""Serve w8a8 MoE layers where vLLM has no int8 fused-MoE kernel: experts dequantised on load.

vLLM 0.32 runs compressed-tensors' W8A8 MoE method (int8 experts, dynamic per-token int8
activations) on GPUs and, on x86 CPUs, only with AMX tiles (``CPUExpertsInt8``; AMD CPUs through
zentorch); elsewhere building the layer raises ``NotImplementedError: No Int8 MoE backend supports
the deployment configuration``. There the plugin builds the layer with :class:`DequantisedInt8Experts`
instead: the same int8 weights and per-channel scales are loaded from the checkpoint (same names,
vLLM's own weight loader), then dequantised once, W = q * s, into vLLM's unquantised fused-MoE
kernel in the model's dtype. The experts' weights are exactly the checkpoint's; their activations are
not quantised (what transformers computes for experts it dequantises on load), and their memory is
that of unquantised experts. Linear layers (attention, condensed MLPs, shared experts) keep vLLM's
int8 kernels. vLLM logs which layers fell back.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe import FusedMoeWeightScaleSupported, RoutedExperts
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
from vllm.model_executor.utils import replace_parameter, set_weight_attrs

__all__ = ["DequantisedInt8Experts", "int8_moe_fallback"]

logger = init_logger(__name__)


class DequantisedInt8Experts(UnquantizedFusedMoEMethod):
    """vLLM's unquantised fused-MoE method, loading int8 experts with per-channel scales.

    Parameters as compressed-tensors' W8A8 MoE method creates them: ``w13_weight`` (E, 2I, H) and
    ``w2_weight`` (E, H, I) int8, ``w13_weight_scale`` (E, 2I, 1) and ``w2_weight_scale`` (E, H, 1)
    float32; after loading, ``w13_weight`` and ``w2_weight`` become q * s in the model's dtype."""

    def create_weights(self, layer: RoutedExperts, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype, **extra_weight_attrs):
        self.compute_dtype = params_dtype
        super().create_weights(layer, num_experts, hidden_size, intermediate_size_per_partition, torch.int8,
                               **extra_weight_attrs)
        shards = 2 if self.moe.is_act_and_mul else 1
        scales = {"w13_weight_scale": (num_experts, shards * intermediate_size_per_partition, 1),
                  "w2_weight_scale": (num_experts, hidden_size, 1)}
        attrs = {**extra_weight_attrs, "quant_method": FusedMoeWeightScaleSupported.CHANNEL.value}
        for name, shape in scales.items():
            scale = torch.nn.Parameter(torch.ones(shape, dtype=torch.float32), requires_grad=False)
            layer.register_parameter(name, scale)
            set_weight_attrs(scale, attrs)

    def process_weights_after_loading(self, layer: RoutedExperts) -> None:
        for name in ("w13", "w2"):
            q, s = getattr(layer, f"{name}_weight"), getattr(layer, f"{name}_weight_scale")
            replace_parameter(layer, f"{name}_weight", (q.to(torch.float32) * s).to(self.compute_dtype))
        super().process_weights_after_loading(layer)


@contextmanager
def int8_moe_fallback(quant_config, scheme: str | None):
    """While the model is built: an MoE layer of a w8a8 checkpoint for which vLLM has no int8
    kernel here gets :class:`DequantisedInt8Experts` (``quant_config``: vLLM's, patched on the
    instance for the duration of the block)."""
    if quant_config is None or scheme != "w8a8":
        yield
        return
    original = quant_config.get_quant_method

    def get_quant_method(layer, prefix):
        try:
            return original(layer, prefix)
        except NotImplementedError as exc:
            if not isinstance(layer, RoutedExperts) or "Int8 MoE backend" not in str(exc):
                raise
            logger.warning_once("cdmoe-vllm: no int8 fused-MoE kernel on this machine (x86 CPUs need AMX); the "
                                "w8a8 experts are dequantised on load and run unquantised")
            return DequantisedInt8Experts(layer.moe_config)

    quant_config.get_quant_method = get_quant_method
    try:
        yield
    finally:
        del quant_config.get_quant_method
