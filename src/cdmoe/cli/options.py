"""What the command groups share: consoles, option types, the one-line error wrapper, small parsers."""

from __future__ import annotations

import functools
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.text import Text

from ..errors import CdmoeError

# markup off: messages, paths and hints hold brackets (pip install 'cdmoe[quant]') that rich would eat as tags
console = Console(stderr=True, markup=False)
out_console = Console(markup=False)

# options shared by several commands
Experts = Annotated[Optional[int], typer.Option(help="K routed experts kept per layer (default: top-k)")]
SharedOnly = Annotated[bool, typer.Option("--shared-only", help="keep shared experts only (CD-MoE-S, K=0)")]
Calib = Annotated[str, typer.Option(help="c4 | local .txt/.jsonl/.parquet | HF dataset name[:config[:split]]")]
Samples = Annotated[int, typer.Option(help="calibration samples")]
SeqLen = Annotated[int, typer.Option(help="tokens per calibration sample")]
Seed = Annotated[int, typer.Option(help="calibration sampling seed")]
Metric = Annotated[str, typer.Option(help="search metric: js | kl | ppl")]
Final = Annotated[str, typer.Option(help="final-output distribution for layer search: hidden | logits")]
EvalText = Annotated[Optional[str], typer.Option(help="held-out text for perplexity before/after")]
EvalTokens = Annotated[int, typer.Option(help="max tokens of --eval-text (0: the whole text)")]
Dtype = Annotated[str, typer.Option(help="compute dtype: auto (the checkpoint's on a GPU, fp32 on CPU) | bf16 | fp16 | "
                                          "fp32 | tf32 (fp32 with TF32 matmuls on a GPU)")]
Device = Annotated[str, typer.Option(help="auto (GPU if present, else CPU; several GPUs: the model spread over all) | "
                                           "cpu | cuda | cuda:N")]
Force = Annotated[bool, typer.Option(help="replace the output if it exists")]
ExpertSelector = Annotated[str, typer.Option(help="greedy (Alg. 1) | random | l1 | frequency | pl-alpha-hill")]
LayerSelector = Annotated[str, typer.Option(help="greedy (Alg. 2) | layer-rank | global-layer-rank")]
TrustCode = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code", help="run Python code shipped inside the checkpoint (auto_map); off by default"
    ),
]
Mode = Annotated[
    str,
    typer.Option(help="whole | sequential (one decoder layer in memory at a time) | auto (whole when its estimated "
                 "peak fits the device, else sequential; see cdmoe plan)"),
]
Activations = Annotated[
    str,
    typer.Option(help="auto | memory | disk: where calibration hidden states wait between layers (disk: less RAM, "
                 "slower; auto: memory when it fits)"),
]
Quantize = Annotated[
    Optional[str], typer.Option(help="then quantise: w8a8 | w4a16 | fp8 (compressed-tensors, vLLM's format) | int8 | int4 (bitsandbytes)")
]


def _experts(experts: int | None, shared_only: bool) -> int | None:
    from ..search.run import experts_option  # imported here: `cdmoe --help` stays light

    return experts_option(experts, shared_only)


def _friendly(fn):
    """Turn a CdmoeError into a one-line message and exit code 2; apply ``--trust-remote-code`` to every load
    and ``--dtype tf32`` (TF32 matmuls on a GPU) to the whole command."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ..io.remote_code import trust_remote_code
        from ..models.placement import matmul_precision

        try:
            with trust_remote_code(kwargs.get("trust_remote_code", False)), matmul_precision(kwargs.get("dtype")):
                return fn(*args, **kwargs)
        except CdmoeError as err:
            console.print(Text("error:", style="bold red"), str(err), highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _int_list(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CdmoeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str, option: str = "--budget") -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CdmoeError(f"{option} expects comma-separated ratios such as 0.8,0.6, got {text!r}") from None
