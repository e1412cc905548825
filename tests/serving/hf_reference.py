"""The independent side of the vLLM comparisons: greedy decoding with transformers (fp32).

``greedy(model_dir, prompts, max_tokens, k)`` -> ``(tokens (P, n), logprobs (P, n, V))``:
greedy continuations of each prompt (token-id lists) and the log-softmax of the raw
logits at every generated position, computed one prompt at a time with no padding.
Condensed directories load through cdmoe's registered classes (no remote code).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy(model_dir, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    import cdmoe  # noqa: F401  (registers the condensed classes with the Auto API)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens, logprobs = [], []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                             eos_token_id=None)
        tokens.append(out.sequences[0, len(prompt):].tolist())
        logprobs.append(torch.log_softmax(torch.stack(out.logits)[:, 0].float(), dim=-1))  # (n, V)
    return tokens, logprobs
