"""What a ``cdmoe condense`` run holds in memory and on disk, from the parameter counts alone.

The counts come from the config on the meta device (:func:`cdmoe.models.plan.params_from_config`),
so a weight costs its *compute* dtype's bytes ``c`` whatever the checkpoint stores (an FP8
checkpoint computed in bf16 costs 2 bytes per weight), and ``s`` bytes per element where the
checkpoint's own bytes matter (file pages mapped while a tensor is read, tensors cast back
for writing). The run is walked phase by phase and each phase's bytes on the compute device
and on the host are added up; the peak is the largest phase, plus the process itself
(Python, torch, transformers, cdmoe: ``IMPORTS_BYTES``; a CUDA context where the device is a GPU).

With T calibration tokens (samples x seq_len), one batch of B x S tokens, hidden size H, M MoE
layers, ``act`` = T x H x c (one set of hidden states for every calibration token):

- weights: whole mode all of them; sequential mode the non-layer weights (embeddings, final
  norm, lm_head) and one decoder layer, the largest.
- loading (:func:`load_peak`): one tensor at a time, largest first (memory.layer_store); while a
  tensor is built its sources and the built copy exist together (2 x its bytes) and, on the CPU,
  its bytes in the file are mapped. Whole mode (transformers' ``from_pretrained``) keeps every
  shard mapped until the end: the whole checkpoint's file pages, which the system can drop
  (in the peak RSS, not in ``host_need_bytes``, what must fit).
- calibration cache: the inputs of the M MoE layers (M x act) and the last layer's outputs (act);
  on the device in whole mode, in host memory in sequential mode, on disk with ``--activations disk``.
- Algorithm 1 on one layer: its input, block output and layer output (3 act, twice while they are
  gathered), the fp32 reference and running output (4 x T x H x 4 while built), the shared experts'
  intermediates, and the two budgets of :class:`SearchMemory` (scoring temporaries, expert-output cache).
- Algorithm 2: whole mode holds every fused candidate (M condensed MLPs); sequential mode one, plus
  one stream of hidden states per candidate (M x act, host or disk) in the shared pass; the final
  output is scored in 1024-token chunks ((chunk, V) logits, compute dtype and fp32 working copies;
  reference logits are recomputed per chunk, never stored), ``--metric ppl`` a whole batch's logits.
- one decoder layer's forward on a batch (``forward_bytes``).
- the writer: sequential mode one layer in the compute dtype and its cast to the stored dtype;
  whole mode the model and one fused MLP while it is built. With ``--quantize`` (compressed-tensors,
  ``quantize_bytes`` q per weight: 1 for int8 / float8, 0.5 for int4) sequential mode also holds a copy
  of the layer being quantised and its codes (layer x (c + q)), whole mode the codes of every weight
  (total x q) beside the model, an upper bound (each module's float weight is freed once its codes exist).

Disk: the output (at most the original's parameters in the stored dtype) and, with
``--activations disk``, the cache and the candidate streams. ``benchmarks/plan_vs_peak.py`` compares the prediction
with the measured peak RSS of a sequential CPU condense.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models.budget import ModelParams

__all__ = ["IMPORTS_BYTES", "OUTPUT_FILES_BYTES", "CUDA_CONTEXT_BYTES", "CUDA_HOST_BYTES", "SCORE_COPIES", "RunShape", "SearchMemory",
           "Estimate", "estimate", "forward_bytes", "load_peak", "scoring_bytes"]

GiB = 2**30
IMPORTS_BYTES = int(0.4 * GiB)  # python + torch (CPU build) + transformers + cdmoe after import: 0.36 GiB measured
CUDA_CONTEXT_BYTES = 1 * GiB  # CUDA context and cuBLAS workspace on the GPU (assumed, not measured here)
CUDA_HOST_BYTES = int(1.5 * GiB)  # CUDA libraries in host memory (assumed, not measured here)
OUTPUT_FILES_BYTES = 2**20  # config, code, tokenizer and record beside the weights
VOCAB_CHUNK = 1024  # tokens whose logits are scored at once (search.layer_search)
SCORE_COPIES = 4  # live fp32 (chunk, H) tensors per candidate while Algorithm 1 scores a group (divergence_per_token: 3)


@dataclass(frozen=True)
class SearchMemory:
    """What Algorithm 1 may hold on the compute device besides the layer and its activations:
    ``work_bytes`` for scoring temporaries, ``cache_bytes`` for expert outputs kept between steps."""

    work_bytes: int = 256 * 2**20
    cache_bytes: int = 2 * GiB


@dataclass(frozen=True)
class RunShape:
    """The run ``cdmoe condense`` would do (what the estimate depends on)."""

    mode: str  # whole | sequential
    device: str  # cpu | cuda: where the model computes
    compute_bytes: int  # c
    storage_bytes: float  # s: the checkpoint's bytes per element
    samples: int
    seq_len: int
    batch_size: int
    experts: int | None = None  # K; None: the family's top-k
    activations: str = "memory"  # memory | disk
    final: str = "hidden"
    metric: str = "js"
    search: SearchMemory = SearchMemory()
    dequant_bytes: int = 0  # a block-FP8 source: Eq. (1)'s fp32 and bf16 copies of its largest fp8 tensor
    quantize_bytes: float = 0.0  # --quantize: bytes per weight of its codes (0: not quantised)

    @property
    def tokens(self) -> int:
        return self.samples * self.seq_len


@dataclass(frozen=True)
class Estimate:
    """Peak bytes of a run: ``peak_device_bytes`` on the compute device (for a CPU run the host's
    memory: the same number as ``peak_host_bytes``), ``peak_host_bytes`` the process's resident
    memory at its peak (imports included); ``host_need_bytes`` the same without checkpoint file
    pages that the system can drop (what must fit in RAM); ``disk_bytes`` written; ``phases``:
    (device, host) bytes of each phase, the process's own overhead excluded."""

    peak_device_bytes: int
    peak_host_bytes: int
    host_need_bytes: int
    output_bytes: int
    activation_disk_bytes: int
    phases: dict[str, tuple[int, int]]

    @property
    def disk_bytes(self) -> int:
        return self.output_bytes + self.activation_disk_bytes

    def to_dict(self) -> dict:
        return {"peak_device_bytes": self.peak_device_bytes, "peak_host_bytes": self.peak_host_bytes,
                "host_need_bytes": self.host_need_bytes, "disk_bytes": self.disk_bytes,
                "output_bytes": self.output_bytes, "activation_disk_bytes": self.activation_disk_bytes,
                "phases": {name: {"device_bytes": d, "host_bytes": h} for name, (d, h) in self.phases.items()}}


def load_peak(tensors: tuple[int, ...], c: int, s: float, cpu: bool, dequant: int = 0) -> tuple[int, int]:
    """(device bytes, host bytes) at the peak of loading ``tensors`` (elements, largest first) one at a
    time: on the device the ones already loaded and 2 x the one being built (its sources and the built
    copy); on the host its bytes in the file (mapped) and, for a GPU, one source read out before it
    moves; ``dequant``: bytes of an FP8 source's dequantisation, on the host (where Eq. (1) runs)."""
    done, device, host = 0, 0, 0
    for t in tensors:
        device = max(device, c * (done + 2 * t) + (dequant if cpu else 0))
        host = max(host, int((1 if cpu else 2) * s * t) + (0 if cpu else dequant))
        done += t
    return device, host


def scoring_bytes(tokens: int, candidates: int, hidden: int, inter: int) -> int:
    """Algorithm 1's scoring temporaries for ``candidates`` at once on ``tokens`` tokens: ``SCORE_COPIES``
    fp32 (tokens, H) per candidate, the reference's log-probabilities and probabilities (2 more), and
    one expert call's (tokens, I) intermediates (search.expert_search sizes its chunks by this)."""
    return tokens * (4 * hidden * (SCORE_COPIES * candidates + 2) + 4 * 3 * inter)


def forward_bytes(params: ModelParams, run: RunShape) -> int:
    """One decoder layer's forward temporaries on a batch: a few hidden-sized and the routed experts'
    intermediate activations per token, and the attention scores (fp32)."""
    tokens = run.batch_size * run.seq_len
    moe = params.layers[0]
    per_token = 8 * params.hidden_size + 3 * moe.top_k * moe.expert_intermediate
    return tokens * per_token * run.compute_bytes + run.batch_size * params.attention_heads * run.seq_len ** 2 * 4


def _scoring_bytes(params: ModelParams, run: RunShape) -> int:
    """Algorithm 2's final-output scoring: hidden-state chunks are small; logits are (chunk, V) in the
    compute dtype for the reference and the candidate, and ~6 fp32 working copies; ``ppl`` a batch's logits."""
    if run.metric == "ppl":
        return run.batch_size * run.seq_len * params.vocab_size * (run.compute_bytes + 3 * 4)
    if run.final == "logits":
        return min(VOCAB_CHUNK, run.tokens) * params.vocab_size * (2 * run.compute_bytes + 6 * 4)
    return 0


def estimate(params: ModelParams, run: RunShape) -> Estimate:
    """The peak memory and disk of ``run`` on the model ``params`` counts (see the module docstring)."""
    c, s = run.compute_bytes, run.storage_bytes
    on_cpu = run.device == "cpu"
    m = len(params.layers)
    act = run.tokens * params.hidden_size * c
    nl, layer, whole = params.non_layer * c, params.largest_layer * c, params.total * c
    k = max((lp.top_k if run.experts is None else run.experts) for lp in params.layers)
    fused = max(lp.condensed(k) for lp in params.layers) * c
    moe = max(params.layers, key=lambda lp: lp.total)
    fwd = forward_bytes(params, run)
    batch = 2 * run.batch_size * run.seq_len * params.hidden_size * c  # one batch's hidden states in and out
    cached = (m + 1) * act if run.activations == "memory" else batch  # MoE-layer inputs + last-layer outputs
    streams = m * act if run.activations == "memory" else 0
    shared_inter = moe.shared // (3 * params.hidden_size)
    alg1 = 3 * act + max(3 * act, 4 * run.tokens * params.hidden_size * 4
                         + 3 * run.tokens * (shared_inter * c + moe.num_experts * 4))
    work = min(run.search.work_bytes, scoring_bytes(run.tokens, moe.num_experts, params.hidden_size,
                                                    moe.expert_intermediate))
    alg1 += work + min(run.search.cache_bytes, moe.num_experts * act)
    scoring = _scoring_bytes(params, run) + (act if run.final == "hidden" and run.metric != "ppl" else 0)
    dq = run.dequant_bytes
    layer_load = max(load_peak(kind, c, s, on_cpu, dq) for kind in params.layer_tensors)
    phases: dict[str, tuple[int, int]] = {}
    if run.mode == "sequential":
        phases["load the non-layer weights"] = load_peak(params.non_layer_tensors, c, s, on_cpu)
        phases["calibration pass"] = (nl + layer + fwd + batch, cached)
        phases["algorithm 1"] = (nl + layer + alg1, cached)
        phases["algorithm 2: a layer loads"] = (nl + layer_load[0], layer_load[1] + cached + streams)
        phases["algorithm 2: forward"] = (nl + layer + fused + fwd + batch + scoring, cached + streams)
        cast = int(layer * s / c)  # the layer in the stored dtype, to be written
        phases["write: a layer loads"] = (nl + layer_load[0], layer_load[1])
        quantised = int(params.largest_layer * (c + run.quantize_bytes)) if run.quantize_bytes else 0  # its copy
        phases["write"] = (nl + layer + quantised + (cast if on_cpu else 2 * cast), 0 if on_cpu else cast)
        mapped = 0  # one tensor's pages at a time, counted in the loads
    else:
        on_device = cached if run.activations == "memory" else batch
        mapped = int(params.total * s)
        biggest = max(max(kind) for kind in params.layer_tensors)
        phases["load the model"] = (whole + c * biggest + (dq if on_cpu else 0),
                                    mapped + (0 if on_cpu else int(2 * s * biggest) + dq))
        phases["calibration pass"] = (whole + on_device + fwd, 0)
        phases["algorithm 1"] = (whole + on_device + alg1, 0)
        phases["algorithm 2"] = (whole + m * fused + on_device + act + fwd + scoring, 0)
        phases["write"] = (whole + fused + int(params.total * run.quantize_bytes), 0)
    droppable = {name: (mapped if name == "load the model" else 0) for name in phases}
    if on_cpu:
        device = host = IMPORTS_BYTES + max(d + h for d, h in phases.values())
        need = IMPORTS_BYTES + max(d + h - droppable[name] for name, (d, h) in phases.items())
    else:
        device = CUDA_CONTEXT_BYTES + max(d for d, _ in phases.values())
        host = IMPORTS_BYTES + CUDA_HOST_BYTES + max(h for _, h in phases.values())
        need = IMPORTS_BYTES + CUDA_HOST_BYTES + max(h - droppable[name] for name, (_, h) in phases.items())
    return Estimate(peak_device_bytes=int(device), peak_host_bytes=int(host), host_need_bytes=int(need),
                    output_bytes=int(params.total * s) + OUTPUT_FILES_BYTES,  # an upper bound (N = 0)
                    activation_disk_bytes=(2 * m + 1) * act if run.activations == "disk" else 0,  # cache + streams
                    phases={k: (int(d), int(h)) for k, (d, h) in phases.items()})
