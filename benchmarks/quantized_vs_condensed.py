"""Issue #27's measure: condense, and condense + a compressed-tensors scheme, of the same model and search:
bytes on disk and held-out perplexity (plain transformers, from disk) of the quantised output against the
unquantised one. Both are written by ``cdmoe condense`` with the same options (the search is deterministic,
so both condense the same layers and experts; checked here).

    .venv/bin/python benchmarks/quantized_vs_condensed.py demo/model --calib demo/data/valid.txt.gz \
        --eval-text demo/data/test.txt.gz --vllm-python .venv-vllm/bin/python   # --layers 3 --experts 4, w8a8
    .venv/bin/python benchmarks/quantized_vs_condensed.py /path/to/model --calib c4 --eval-text wikitext

Prints the two byte counts and perplexities and the ratios (quantised / unquantised). With
``--vllm-python .venv-vllm/bin/python`` (``scripts/setup_vllm.sh``; w8a8 on a CPU) it then serves the
quantised directory with vLLM and this checkout's plugin (``tests/serving/vllm_generate.py``: 8 prompts,
12-token windows of the ``--eval-text`` 48 tokens apart, 24 greedy tokens each) and counts the sequences
equal to plain transformers' greedy decoding of the same directory (``tests/serving/hf_reference.py``,
fp32). The outputs stay under ``--work`` (default ``runs/quantized-vs-condensed``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
SERVING = ROOT / "tests" / "serving"


def served_vs_transformers(model_dir: Path, text: str, vllm_python: str, prompts: int = 8, length: int = 12,
                           tokens: int = 24) -> int:
    """How many of ``prompts`` greedy ``tokens``-token continuations vLLM (with the plugin) and transformers
    agree on exactly, for ``model_dir``; the prompts: ``length``-token windows of ``text``, 4 x ``length`` apart."""
    from cdmoe.evaluation.perplexity import token_stream
    from cdmoe.models.loading import load_tokenizer

    ids = token_stream(load_tokenizer(model_dir), text, prompts * length * 4).tolist()
    batch = [ids[i * 4 * length:i * 4 * length + length] for i in range(prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job.write_text(json.dumps({"runs": [{"name": "quantised", "model": str(model_dir), "prompts": batch,
                                             "max_tokens": tokens}]}))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
               "PYTHONPATH": str(ROOT / "plugins" / "vllm" / "src")}
        proc = subprocess.run([vllm_python, str(SERVING / "vllm_generate.py"), str(job), str(out)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"vLLM failed: {proc.stderr[-2000:]}")
        result = json.loads(out.read_text())["runs"][0]
    if "error" in result:
        raise SystemExit(f"vLLM refused {model_dir}: {result.get('message')}")
    sys.path.insert(0, str(SERVING))
    from hf_reference import greedy

    reference, _ = greedy(model_dir, batch, tokens)
    return sum(list(a) == list(b) for a, b in zip(result["tokens"], reference))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--quantize", default="w8a8", choices=("w8a8", "w4a16", "fp8"))
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-text", required=True)
    ap.add_argument("--eval-tokens", type=int, default=10_000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", type=Path, default=Path("runs/quantized-vs-condensed"))
    ap.add_argument("--vllm-python", help="then serve the quantised output with this vLLM venv's Python and count "
                                          "greedy sequences equal to transformers'")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()
    import cdmoe
    from cdmoe.evaluation.measure import disk_bytes

    common = dict(layers=args.layers, experts=args.experts, calib=args.calib, samples=args.samples,
                  seq_len=args.seq_len, device=args.device, mode="whole", force=True)
    plain_dir, quant_dir = args.work / "condensed", args.work / f"condensed-{args.quantize}"
    plain = cdmoe.condense(args.model, plain_dir, **common)
    quant = cdmoe.condense(args.model, quant_dir, quantize=args.quantize, **common)
    same = [(c["layer"], c["experts"]) for c in plain["condensed"]] == [(c["layer"], c["experts"])
                                                                          for c in quant["condensed"]]
    if not same:
        raise SystemExit("the two searches chose different layers or experts; the comparison does not hold")
    # perplexity of each output as a user loads it from disk (plain transformers), same windows for both
    from cdmoe.evaluation.perplexity import perplexity, token_stream
    from cdmoe.models.loading import load_model, load_tokenizer

    stream = token_stream(load_tokenizer(plain_dir), args.eval_text, args.eval_tokens)
    ppl = {name: perplexity(load_model(d, device=args.device), stream, args.seq_len)
           for name, d in (("condensed", plain_dir), (args.quantize, quant_dir))}
    size = {"condensed": disk_bytes(plain_dir), args.quantize: disk_bytes(quant_dir)}
    print(f"{args.model}: --layers {args.layers} --experts {args.experts}, layers {[c['layer'] for c in plain['condensed']]}")
    for name in size:
        print(f"{name:>10}: {size[name]:>14,} bytes  perplexity {ppl[name]:.3f}")
    bytes_ratio, ppl_ratio = size[args.quantize] / size["condensed"], ppl[args.quantize] / ppl["condensed"]
    print(f"{args.quantize} / condensed: {bytes_ratio:.3f}x bytes, perplexity {ppl_ratio:.4f}x "
          f"({100 * (ppl_ratio - 1):+.2f}%)")
    same = None
    if args.vllm_python:
        same = served_vs_transformers(quant_dir, args.eval_text, args.vllm_python)
        print(f"vLLM (plugin) vs transformers on {quant_dir}: {same}/8 greedy 24-token sequences identical")
    if args.json:
        args.json.write_text(json.dumps({"bytes": size, "perplexity": ppl, "bytes_ratio": bytes_ratio,
                                         "perplexity_ratio": ppl_ratio, "vllm_same_of_8": same,
                                         "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))


if __name__ == "__main__":
    main()
