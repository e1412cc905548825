"""The independent side of the vLLM comparisons: greedy decoding with transformers (fp32).

``greedy(model_dir, prompts, max_tokens, k)`` -> ``(tokens (P, n), logprobs (P, n, V))``:
greedy continuations of each prompt (token-id lists) and the log-softmax of the raw
logits at every generated position, computed for prompts of equal length as one unpadded batch.
Condensed directories load through cdmoe's registered classes (no remote code).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy(model_dir, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    import cdmoe  # noqa: F401  (registers the condensed classes with the Auto API)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens, logprobs = [None] * len(prompts), [None] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):  # prompts of one length decode as one batch, unpadded
        by_length.setdefault(len(prompt), []).append(i)
    for length, rows in by_length.items():
        ids = torch.tensor([prompts[i] for i in rows])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
        steps = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)  # (B, n, V)
        for b, i in enumerate(rows):
            tokens[i] = out.sequences[b, length:].tolist()
            logprobs[i] = steps[b]
    return tokens, logprobs
