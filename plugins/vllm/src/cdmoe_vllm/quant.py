"""Which quantised condensed checkpoints vLLM serves here, decided when vLLM reads the config.

cdmoe writes quantised outputs in compressed-tensors format (``quantization_config.quant_method:
compressed-tensors``, one config group targeting ``Linear``): vLLM's own format, so the condensed
MLPs (vLLM's dense MLP class, built with vLLM's ``quant_config`` and the layer's prefix) take vLLM's
compressed-tensors linear methods and the remaining MoE layers its fused-MoE methods, as for any
llm-compressor checkpoint. Which schemes run depends on the machine:

* ``w8a8`` (int8 per-channel weights, dynamic per-token int8 activations): GPUs and vLLM's CPU
  backend, MoE layers included;
* ``w4a16`` (packed int4, groups): GPUs (vLLM's CPU backend has no int4 fused-MoE kernel);
* ``fp8`` (float8 128 x 128 blocks, dynamic per-token-group activations): GPUs with FP8 (vLLM checks
  the compute capability itself).

bitsandbytes outputs (cdmoe's other quantised format) are refused: vLLM quantises an unquantised
output itself (``quantization=...``).
"""

from __future__ import annotations

from .errors import unsupported

__all__ = ["scheme_of", "check_quantisation"]

SERVED_ON_CPU = ("w8a8",)


def scheme_of(quantisation: dict) -> str | None:
    """cdmoe's name of a compressed-tensors ``quantization_config`` (w8a8, w4a16, fp8), None if another."""
    groups = list((quantisation.get("config_groups") or {}).values())
    if len(groups) != 1 or not isinstance(groups[0], dict):
        return None
    weights, inputs = groups[0].get("weights") or {}, groups[0].get("input_activations")
    kind = (weights.get("type"), weights.get("num_bits"), weights.get("strategy"))
    if kind == ("int", 8, "channel") and inputs and (inputs.get("type"), inputs.get("num_bits"),
                                                     inputs.get("strategy"), inputs.get("dynamic")) == ("int", 8, "token", True):
        return "w8a8"
    if kind == ("int", 4, "group") and not inputs and groups[0].get("format", quantisation.get("format")) == "pack-quantized":
        return "w4a16"
    if kind == ("float", 8, "block") and inputs and inputs.get("dynamic"):
        return "fp8"
    return None


def check_quantisation(quantisation, where: str | None, on_cpu: bool) -> str:
    """Refuse (one line) a ``quantization_config`` the plugin cannot serve on this machine; its scheme."""
    method = quantisation.get("quant_method", "?") if isinstance(quantisation, dict) else "?"
    if method != "compressed-tensors":
        raise unsupported(f"quantised ({method}) condensed checkpoints are not supported (compressed-tensors ones "
                          "are: write it with --quantize w8a8, w4a16 or fp8)", where)
    scheme = scheme_of(quantisation)
    if scheme is None:
        raise unsupported("this compressed-tensors scheme is not one cdmoe writes (w8a8, w4a16, fp8)", where)
    if on_cpu and scheme not in SERVED_ON_CPU:
        raise unsupported(f"{scheme} checkpoints need a GPU (vLLM's CPU backend runs {', '.join(SERVED_ON_CPU)} "
                          "only, MoE layers included)", where)
    return scheme
