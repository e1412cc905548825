"""``cdmoe finetune``: train only the condensed layers of a condensed checkpoint (the paper's recovery step).

Everything is frozen except the condensed MLPs listed in ``cdmoe.json`` (full mode: their own
weights; ``lora``: peft LoRA adapters on their Linear layers, merged into them before saving).
Training is :class:`transformers.Trainer` (AdamW, lr 1e-4, 10% linear warm-up, cosine decay by
default; gradient accumulation; bf16 only on CUDA), so checkpoints and resume are Trainer's:
they go to ``checkpoint_dir`` (default ``OUT.checkpoints``) and ``resume=True`` continues from
the latest one there. The output is written like any condensed directory (atomically, in the
checkpoint's dtype), with the original record plus a ``finetune`` entry.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.record import RECORD_NAME, read_record
from ..checkpoint.writer import check_output_dir, save_condensed
from ..errors import CdmoeError
from ..evaluation.perplexity import perplexity, token_limit, token_stream
from ..io.optional_deps import require
from ..io.output_dir import partial_dir
from ..io.write_rule import check_write_path, claim_work_dir, remove_work_dir
from ..models.adapter import attr_path, family_spec
from ..models.input_checks import check_inputs
from ..models.loading import load_model, load_tokenizer, round_to_checkpoint_dtype
from ..models.placement import trainer_device
from .condense import EvalOptions
from .finetune_data import build_dataset, collate

__all__ = ["FinetuneOptions", "condensed_mlps", "finetune", "finetune_model"]

ARGS_NAME = "cdmoe-finetune-args.json"  # the run's options, kept beside Trainer's checkpoints


@dataclass(frozen=True)
class FinetuneOptions:
    """What to train on and how. ``steps`` (optimizer steps) wins over ``epochs`` when given."""

    data: str
    format: str = "auto"  # auto | text | commonsense | mmlu
    steps: int | None = None
    epochs: float = 1.0
    lr: float = 1e-4
    warmup_ratio: float = 0.1
    schedule: str = "cosine"  # any transformers lr_scheduler_type
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 256  # text: packed block length; pairs: max length
    seed: int = 0
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    save_steps: int = 100
    logging_steps: int = 10
    dtype: str = "auto"

    def check(self) -> None:
        """One-line errors for values Trainer would misread (``--steps -3`` meant a full epoch)."""
        from ..models.loading import resolve_dtype

        positive = {"--steps": self.steps, "--batch-size": self.batch_size, "--grad-accum": self.grad_accum,
                    "--save-steps": self.save_steps, "--logging-steps": self.logging_steps, "--lora-r": self.lora_r}
        for option, value in positive.items():
            if value is not None and value < 1:
                raise CdmoeError(f"{option} must be at least 1, got {value}")
        if self.steps is None and not self.epochs > 0:
            raise CdmoeError(f"--epochs must be positive, got {self.epochs}")
        if not self.lr > 0:
            raise CdmoeError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise CdmoeError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.seq_len < 2:
            raise CdmoeError(f"--seq-len must be at least 2, got {self.seq_len}")
        resolve_dtype(self.dtype)
        if self.lora:
            require("peft", "--lora")


def condensed_record(directory: str | Path) -> dict:
    if not (Path(directory) / RECORD_NAME).exists():
        raise CdmoeError(f"{directory} is not a condensed directory (no {RECORD_NAME}); run `cdmoe condense` first "
                         "and fine-tune its output")
    return read_record(directory, condensed=True)


def condensed_mlps(model: nn.Module, record: dict) -> dict[str, nn.Module]:
    """Full module name -> condensed MLP module, for the layers listed in ``record``."""
    cd = getattr(model.config, "cdmoe", None)
    if cd:
        layers_path, block_attr = cd["layers_path"], cd["block_attr"]
    else:  # native format (e.g. qwen3_moe mlp_only_layers): the family's own dense MLP
        spec = family_spec(model)
        layers_path, block_attr = spec.layers_path, spec.block_attr
    layers = attr_path(model, layers_path)
    return {f"{layers_path}.{c['layer']}.{block_attr}": getattr(layers[int(c["layer"])], block_attr)
            for c in record["condensed"]}


def _lora_targets(mlps: dict[str, nn.Module]) -> list[str]:
    return [f"{prefix}.{name}" for prefix, mlp in mlps.items()
            for name, sub in mlp.named_modules() if isinstance(sub, nn.Linear)]


def prepare_trainable(model: nn.Module, record: dict, options: FinetuneOptions) -> tuple[nn.Module, int]:
    """Freeze all but the condensed MLPs (full) or wrap them with LoRA; return (model to train, trainable count)."""
    mlps = condensed_mlps(model, record)
    for p in model.parameters():
        p.requires_grad_(False)
    if options.lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                            target_modules=_lora_targets(mlps), bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    else:
        master_fp32 = _autocast(model)  # half-precision weights train as fp32 master copies under bf16 autocast
        for mlp in mlps.values():
            if master_fp32:
                mlp.float()
            for p in mlp.parameters():
                p.requires_grad_(True)
    return model, sum(p.numel() for p in model.parameters() if p.requires_grad)


def _autocast(model: nn.Module) -> bool:
    """Whether Trainer runs ``model`` under bf16 autocast: a half-precision model on a GPU."""
    first = next(model.parameters())
    return first.device.type == "cuda" and first.dtype in (torch.bfloat16, torch.float16)


def _progress_callback():
    """Trainer's tqdm bar, with the latest loss and learning rate as its postfix (not printed dicts)."""
    from transformers.trainer_callback import ProgressCallback

    class LossBar(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}")

    return LossBar()


def _checkpoints(directory: Path) -> list[Path]:
    if not directory.exists():
        return []
    return sorted(directory.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))


def _prepare_checkpoint_dir(directory: Path, options: FinetuneOptions, resume: bool, force: bool) -> None:
    """Refuse to mix runs: resuming needs this run's checkpoints, a fresh run an unused directory. The
    directory is one cdmoe created (checked up front by :func:`~cdmoe.io.write_rule.check_write_path`)."""
    saved = directory / ARGS_NAME
    mine = {k: v for k, v in asdict(options).items() if k not in ("save_steps", "logging_steps")}
    if resume:
        if not _checkpoints(directory):
            raise CdmoeError(f"nothing to resume: {directory} holds no Trainer checkpoint (checkpoint-N)")
        try:
            theirs = json.loads(saved.read_text()) if saved.exists() else mine
        except (UnicodeDecodeError, json.JSONDecodeError):
            theirs = None
        if not isinstance(theirs, dict):
            raise CdmoeError(f"{saved} is corrupt, so the checkpointed run's options are unknown; pass --force to "
                             "start over (its checkpoints are discarded)")
        diff = sorted(k for k in mine if mine[k] != theirs.get(k))
        if diff:
            raise CdmoeError(f"--resume with other options than the checkpointed run ({', '.join(diff)}); "
                             "pass the same options")
        return
    if _checkpoints(directory):
        if not force:
            raise CdmoeError(f"{directory} holds checkpoints of an earlier run; pass --resume to continue it or "
                             "--force to start over")
        remove_work_dir(directory)
    claim_work_dir(directory, "fine-tuning checkpoints", "--checkpoint-dir")
    saved.write_text(json.dumps(mine, indent=2) + "\n")


def finetune_model(model: nn.Module, dataset, pad_id: int, options: FinetuneOptions, checkpoint_dir: Path,
                   resume: bool = False, show_progress: bool = True, callbacks=()):
    """Run Trainer on ``model`` (prepared by :func:`prepare_trainable`, on the CPU or the first GPU) and return
    Trainer's TrainOutput and state. On a GPU, a half-precision model trains under bf16 autocast with its
    trainable weights in fp32 (:func:`prepare_trainable`); an fp32 one in fp32."""
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    cuda = next(model.parameters()).device.type == "cuda"
    args = TrainingArguments(
        output_dir=str(checkpoint_dir),
        max_steps=options.steps if options.steps else -1,
        num_train_epochs=options.epochs,
        per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum,
        learning_rate=options.lr,
        lr_scheduler_type=options.schedule,
        warmup_steps=options.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=0.0,
        bf16=_autocast(model),
        use_cpu=not cuda,
        seed=options.seed,
        save_strategy="steps",
        save_steps=options.save_steps,
        save_total_limit=2,
        logging_steps=options.logging_steps,
        report_to="none",
        disable_tqdm=not show_progress,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    if cuda:
        args._n_gpu = 1  # one GPU, as Trainer itself sets for model-parallel models: never nn.DataParallel copies
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=partial(collate, pad_id=pad_id),
                      callbacks=list(callbacks))
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    if show_progress:
        trainer.add_callback(_progress_callback())
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    return result, trainer.state


def _evaluate(model, tokenizer, evaluation: EvalOptions, seq_len: int) -> tuple[torch.Tensor, float]:
    stream = token_stream(tokenizer, evaluation.text, evaluation.max_tokens)
    return stream, perplexity(model, stream, seq_len)


def finetune(
    directory: str | Path,
    out: str | Path,
    options: FinetuneOptions,
    evaluation: EvalOptions = EvalOptions(),
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    keep_checkpoints: bool = False,
    force: bool = False,
    show_progress: bool = True,
    callbacks=(),
    log=print,
    device: str = "auto",
) -> dict:
    """Fine-tune the condensed layers of the condensed checkpoint ``directory``; save to ``out``; return the record.

    ``callbacks`` are extra :class:`transformers.TrainerCallback` objects; ``log`` prints progress lines.
    """
    from transformers import set_seed

    options.check()
    train_on = trainer_device(device)
    token_limit(evaluation.max_tokens)
    check_inputs(directory, texts={"--data": options.data, "--eval-text": evaluation.text},
                 seq_lens={"--seq-len": options.seq_len, "EvalOptions.seq_len": evaluation.seq_len})
    record = condensed_record(directory)
    inputs = (directory, options.data, evaluation.text)
    check_output_dir(out, force, inputs)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else Path(f"{out}.checkpoints")
    check_write_path(checkpoint_dir, option="--checkpoint-dir", inputs=inputs, kind="work",
                     avoid=(out, partial_dir(out)))
    tokenizer = load_tokenizer(directory)
    data = build_dataset(tokenizer, options.data, options.format, options.seq_len)
    _prepare_checkpoint_dir(checkpoint_dir, options, resume, force)
    model = load_model(directory, dtype=options.dtype, device=train_on)  # straight to the device, compute dtype
    total = sum(p.numel() for p in model.parameters())

    ev_seq_len = evaluation.seq_len or options.seq_len
    original = record.get("evaluation") or {}
    if evaluation.text and original.get("text") == evaluation.text and not evaluation.seq_len:
        ev_seq_len = original.get("seq_len", ev_seq_len)  # score exactly as condense did, to compare
    ppl_before = None
    if evaluation.text:
        stream, ppl_before = _evaluate(model, tokenizer, evaluation, ev_seq_len)
        log(f"held-out perplexity before fine-tuning: {ppl_before:.2f} ({len(stream):,} tokens)")

    compute = next(model.parameters()).dtype
    set_seed(options.seed)  # LoRA's initial A matrices
    trained, trainable = prepare_trainable(model, record, options)
    log(f"data: {options.data} ({data.format}, {data.records:,} records -> {len(data.dataset):,} examples, "
        f"{data.target_tokens:,} target tokens); trainable {trainable:,} / {total:,} "
        f"({100 * trainable / total:.2f}%){' LoRA' if options.lora else ''}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    result, state = finetune_model(trained, data.dataset, pad_id, options, checkpoint_dir, resume, show_progress,
                                   callbacks)
    model = trained.merge_and_unload() if options.lora else trained
    for mlp in condensed_mlps(model, record).values():  # fp32 master weights (autocast) back to the compute dtype
        mlp.to(compute)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()

    storage = round_to_checkpoint_dtype(model, directory, options.dtype)  # evaluate what will be saved
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    entry = {
        "from": str(directory),
        "data": options.data,
        "format": data.format,
        "records": data.records,
        "examples": len(data.dataset),
        "target_tokens": data.target_tokens,
        "steps": state.global_step,
        "epochs": state.epoch,
        "batch_size": options.batch_size,
        "grad_accum": options.grad_accum,
        "seq_len": options.seq_len,
        "lr": options.lr,
        "schedule": options.schedule,
        "warmup_ratio": options.warmup_ratio,
        "seed": options.seed,
        "mode": "lora" if options.lora else "full",
        "lora": {"r": options.lora_r, "alpha": options.lora_alpha, "dropout": options.lora_dropout,
                 "merged": True} if options.lora else None,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": trainable / total,
        "final_loss": losses[-1] if losses else result.training_loss,
        "mean_loss": result.training_loss,
        "resumed": bool(resume),
        "train_seconds": result.metrics.get("train_runtime"),
    }
    if evaluation.text:
        stream, ppl_after = _evaluate(model, tokenizer, evaluation, ev_seq_len)
        entry["evaluation"] = {"text": evaluation.text, "tokens": len(stream), "seq_len": ev_seq_len,
                               "ppl_before": ppl_before, "ppl_after": ppl_after}
        log(f"held-out perplexity after fine-tuning: {ppl_after:.2f} (before {ppl_before:.2f})")
        same_text = (original.get("text") == evaluation.text and original.get("tokens") == len(stream)
                     and original.get("seq_len") == ev_seq_len and "original_ppl" in original)
        if same_text and not math.isclose(ppl_before, original["original_ppl"]):
            gap = (ppl_before - ppl_after) / (ppl_before - original["original_ppl"])
            entry["evaluation"].update(original_ppl=original["original_ppl"], gap_closed=gap)
            log(f"original model: {original['original_ppl']:.2f}; fine-tuning closes {100 * gap:.1f}% of the gap")

    new_record = {k: v for k, v in record.items() if k != "versions"}
    if "finetune" in record:  # fine-tuning a fine-tuned directory: keep the earlier run's entry
        entry["previous"] = record["finetune"]
    new_record["finetune"] = entry
    save_condensed(model, out, new_record, tokenizer=tokenizer, force=force, storage=storage, inputs=inputs)
    if not keep_checkpoints:
        remove_work_dir(checkpoint_dir)
    return new_record
