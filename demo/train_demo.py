"""Train the shipped demo MoE: a tiny DeepSeek-V2-style model on the demo corpus.

Model: transformers' ``DeepseekV2ForCausalLM`` (so the library's own routing code runs),
8 decoder layers (layer 0 dense), 16 routed experts of intermediate size 64 plus 2 shared,
top-4 softmax routing, hidden size 224, a byte-level BPE tokenizer of 4096 tokens trained
on the training split. Trained from scratch in fp32 on CPU with a switch-style
load-balancing loss (coefficient ``--aux``) so experts specialise, then saved in bf16.

    python demo/build_corpus.py --out demo/data          # needs apt-get install python3.11-doc
    python demo/train_demo.py --data demo/data --out demo/model

Everything is seeded; on the same machine and torch version the run is repeatable.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import ByteLevelBPETokenizer
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, GenerationConfig, PreTrainedTokenizerFast

EOS = "<|endoftext|>"


def model_config(vocab_size: int) -> DeepseekV2Config:
    return DeepseekV2Config(
        vocab_size=vocab_size,
        hidden_size=224,
        intermediate_size=448,
        moe_intermediate_size=64,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=2,
        n_routed_experts=16,
        num_experts_per_tok=4,
        first_k_dense_replace=1,
        kv_lora_rank=64,
        q_lora_rank=None,
        qk_rope_head_dim=16,
        qk_nope_head_dim=32,
        v_head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        routed_scaling_factor=1.0,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def paragraphs(path: Path) -> list[str]:
    text = gzip.decompress(path.read_bytes()).decode("utf-8") if path.suffix == ".gz" else path.read_text("utf-8")
    return [p for p in text.split("\n\n") if p.strip()]


def train_tokenizer(train: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(train, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, pad_token=EOS, unk_token=EOS,
        model_max_length=512,
    )


def token_stream(tok: PreTrainedTokenizerFast, paras: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for enc in tok(paras, add_special_tokens=False)["input_ids"]:
        ids.extend(enc + [tok.eos_token_id])
    return torch.tensor(ids, dtype=torch.long)


def load_balance_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss, E * sum_e f_e * P_e, averaged over MoE layers."""
    total = 0.0
    for logits in router_logits:  # (tokens, E)
        probs = logits.softmax(-1)
        num_experts = probs.shape[-1]
        chosen = probs.topk(top_k, dim=-1).indices
        frac = F.one_hot(chosen, num_experts).sum(1).float().mean(0) / top_k  # (E,)
        total = total + num_experts * (frac * probs.mean(0)).sum()
    return total / len(router_logits)


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, seq_len: int, batch: int = 16) -> float:
    model.eval()
    n = (len(stream) - 1) // seq_len
    nll, count = 0.0, 0
    for i in range(0, n, batch):
        rows = [stream[j * seq_len : j * seq_len + seq_len + 1] for j in range(i, min(n, i + batch))]
        x = torch.stack(rows)
        logits = model(input_ids=x[:, :-1]).logits.float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
    model.train()
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).parent / "data")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "model")
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--aux", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=4096)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    train_paras = paragraphs(args.data / "train.txt")
    tok = train_tokenizer(train_paras, args.vocab)
    train = token_stream(tok, train_paras)
    valid = token_stream(tok, paragraphs(args.data / "valid.txt.gz"))
    print(f"train tokens {len(train):,}  valid tokens {len(valid):,}")

    config = model_config(len(tok))
    model = DeepseekV2ForCausalLM(config)
    print(f"parameters {sum(p.numel() for p in model.parameters()):,}")
    router_logits: list[torch.Tensor] = []
    for layer in model.model.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(lambda m, i, o: router_logits.append(o[0]))

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, len(train) - args.seq_len - 1, (args.batch,), generator=gen)
        x = torch.stack([train[s : s + args.seq_len + 1] for s in starts.tolist()])
        router_logits.clear()
        logits = model(input_ids=x[:, :-1]).logits
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        aux = load_balance_loss(router_logits, config.num_experts_per_tok)
        loss = lm + args.aux * aux
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            el = time.time() - start
            print(f"step {step:5d} lm {lm.item():.3f} aux {aux.item():.3f} lr {lr_at(step):.2e} "
                  f"{el/60:.1f} min ({(step+1)*x[:, :-1].numel()/el:.0f} tok/s)", flush=True)
        if step > 0 and step % 1000 == 0:
            print(f"valid ppl {perplexity(model, valid, args.seq_len):.2f}", flush=True)

    ppl32 = perplexity(model, valid, args.seq_len)
    model = model.to(torch.bfloat16)
    ppl16 = perplexity(model, valid, args.seq_len)
    print(f"valid ppl fp32 {ppl32:.2f}  bf16 {ppl16:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0, max_new_tokens=64)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    (args.out / "training.json").write_text(json.dumps(
        {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
         "valid_ppl_fp32": ppl32, "valid_ppl_bf16": ppl16, "train_tokens": len(train),
         "minutes": (time.time() - start) / 60, "torch": torch.__version__}, indent=2) + "\n")


if __name__ == "__main__":
    main()
