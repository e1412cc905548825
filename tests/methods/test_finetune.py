"""``cdmoe finetune``: only the condensed layers train, LoRA merges exactly, resume continues the run."""

import json

import pytest
import torch
from conftest import DEMO_TEXT
from transformers import AutoModelForCausalLM, TrainerCallback
from typer.testing import CliRunner

import cdmoe
from cdmoe.cli import app
from cdmoe.evaluation.perplexity import perplexity, token_stream
from cdmoe.methods.condense import EvalOptions
from cdmoe.methods.finetune import FinetuneOptions, condensed_mlps, finetune, prepare_trainable
from cdmoe.methods.finetune_data import build_dataset, render_pair
from cdmoe.models.loading import load_model, load_tokenizer

runner = CliRunner()
LAYERS = (1, 3)


@pytest.fixture(scope="module")
def condensed_dir(tiny_model_dir, tmp_path_factory):
    """The tiny deepseek_v2 checkpoint with layers 1 and 3 condensed (explicit experts and gates, no search)."""
    model = load_model(tiny_model_dir)
    choices = [cdmoe.LayerChoice(layer=layer, experts=(0, 2), gates=(0.3, 0.2)) for layer in LAYERS]
    record = cdmoe.condense_layers(model, choices, base_model=str(tiny_model_dir))
    out = tmp_path_factory.mktemp("ft") / "condensed"
    cdmoe.save(model, out, record, source=tiny_model_dir)
    return out


@pytest.fixture(scope="module")
def train_text(tmp_path_factory):
    """A small plain-text training file (paragraphs of the demo test split)."""
    from cdmoe.search.calibration import read_documents

    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("\n\n".join(read_documents(DEMO_TEXT)[300:420]))
    return path


def _options(data, **kw):
    base = dict(data=str(data), steps=4, batch_size=2, seq_len=32, lr=1e-2, save_steps=2, logging_steps=1)
    return FinetuneOptions(**{**base, **kw})


def _state(path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _in_condensed(name: str) -> bool:
    return any(name.startswith(f"model.layers.{layer}.mlp.") for layer in LAYERS)


def test_full_finetuning_changes_only_the_condensed_layers(condensed_dir, train_text, tmp_path):
    out = tmp_path / "ft"
    record = finetune(condensed_dir, out, _options(train_text), show_progress=False, log=lambda *_: None)
    before, after = _state(condensed_dir), _state(out)
    assert before.keys() == after.keys()
    inside = [k for k in before if _in_condensed(k)]
    assert len(inside) == 3 * len(LAYERS)  # gate/up/down of each fused MLP
    for name in before:
        if _in_condensed(name):
            assert not torch.equal(before[name], after[name]), f"{name} did not train"
        else:
            assert torch.equal(before[name], after[name]), f"{name} changed"
    assert record["finetune"]["steps"] == 4 and not (tmp_path / "ft.checkpoints").exists()


def test_output_loads_like_a_condensed_directory_and_records_the_run(condensed_dir, train_text, tmp_path):
    out = tmp_path / "ft"
    finetune(condensed_dir, out, _options(train_text, steps=2), EvalOptions(text=str(DEMO_TEXT), max_tokens=600),
             show_progress=False, log=lambda *_: None)
    model = cdmoe.load_model(out)
    record = json.loads((out / "cdmoe.json").read_text())
    ft = record["finetune"]
    # independent count: the gate/up/down weights of each condensed MLP, from the config's sizes
    spec = model.config.cdmoe["condensed_layers"]
    hidden = model.config.hidden_size
    expected = sum(3 * hidden * spec[str(layer)]["intermediate_size"] for layer in LAYERS)
    assert ft["trainable_params"] == expected
    assert ft["total_params"] == sum(p.numel() for p in model.parameters())
    assert ft["trainable_share"] == pytest.approx(expected / ft["total_params"])
    assert ft["mode"] == "full" and ft["steps"] == 2 and ft["format"] == "text" and ft["final_loss"] > 0
    ev = ft["evaluation"]
    assert ev["tokens"] == 600
    stream = token_stream(load_tokenizer(condensed_dir), str(DEMO_TEXT), 600)  # independently: both models from disk
    assert ev["ppl_before"] == pytest.approx(perplexity(load_model(condensed_dir), stream, ev["seq_len"]), rel=1e-5)
    assert ev["ppl_after"] == pytest.approx(perplexity(load_model(out), stream, ev["seq_len"]), rel=1e-5)
    assert [c["layer"] for c in record["condensed"]] == list(LAYERS)
    assert "## Fine-tuning" in (out / "README.md").read_text()
    plain = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    ids = torch.randint(0, 300, (1, 12))
    torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits)


def test_lora_merge_gives_the_unmerged_logits(condensed_dir, train_text, tmp_path):
    from peft import PeftModel

    record = json.loads((condensed_dir / "cdmoe.json").read_text())
    model = load_model(condensed_dir)
    wrapped, trainable = prepare_trainable(model, record, _options(train_text, lora=True, lora_r=4))
    assert isinstance(wrapped, PeftModel)
    lora_params = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
    assert lora_params and all("lora_" in n for n in lora_params) and trainable == sum(
        p.numel() for p in lora_params.values())
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in lora_params.items():
            if "lora_B" in name:  # B starts at zero; make the adapters do something
                p.normal_(0, 0.5)
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        unmerged = wrapped(input_ids=ids).logits
        plain = wrapped.get_base_model()
        with wrapped.disable_adapter():
            base = plain(input_ids=ids).logits
        merged_model = wrapped.merge_and_unload()
        merged = merged_model(input_ids=ids).logits
    assert not torch.allclose(unmerged, base, atol=1e-3)  # the adapters matter
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)
    assert not any("lora" in n for n, _ in merged_model.named_parameters())


class _Logits(TrainerCallback):
    """Logits of the trained (still unmerged) model on fixed ids, taken when training ends."""

    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            self.logits = model.eval()(input_ids=self.ids).logits


def test_lora_finetune_saves_merged_weights_that_reload(condensed_dir, train_text, tmp_path):
    out = tmp_path / "lora"
    seen = _Logits()
    record = finetune(condensed_dir, out, _options(train_text, lora=True, lora_r=4, steps=3), show_progress=False,
                      log=lambda *_: None, callbacks=[seen])
    ft = record["finetune"]
    assert ft["mode"] == "lora" and ft["lora"]["r"] == 4
    hidden = json.loads((condensed_dir / "config.json").read_text())["hidden_size"]
    widths = json.loads((condensed_dir / "config.json").read_text())["cdmoe"]["condensed_layers"]
    # per Linear (in -> out): r * (in + out); gate/up: hidden -> I, down: I -> hidden
    expected = sum(3 * 4 * (hidden + widths[str(layer)]["intermediate_size"]) for layer in LAYERS)
    assert ft["trainable_params"] == expected
    before, after = _state(condensed_dir), _state(out)
    assert before.keys() == after.keys()  # merged: no adapter tensors on disk
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(_in_condensed(k) for k in changed)
    # the merged, saved and reloaded model computes what the trained adapters computed
    with torch.no_grad():
        reloaded = cdmoe.load_model(out)(input_ids=seen.ids).logits
        original = cdmoe.load_model(condensed_dir)(input_ids=seen.ids).logits
    torch.testing.assert_close(reloaded, seen.logits, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(original, seen.logits, atol=1e-3)


class _Crash(TrainerCallback):
    """Simulates a killed run: dies right after the checkpoint at ``step`` is written."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


class _Steps(TrainerCallback):
    def __init__(self):
        self.done = []

    def on_step_end(self, args, state, control, **kwargs):
        self.done.append(state.global_step)


@pytest.mark.parametrize("lora", [False, True])
def test_resume_continues_the_same_run(condensed_dir, train_text, tmp_path, lora):
    options = _options(train_text, lora=lora, lora_r=4)
    quiet = dict(show_progress=False, log=lambda *_: None)
    finetune(condensed_dir, tmp_path / "straight", options, **quiet)
    with pytest.raises(KeyboardInterrupt):
        finetune(condensed_dir, tmp_path / "resumed", options, callbacks=[_Crash(2)], **quiet)
    assert not (tmp_path / "resumed").exists()
    assert (tmp_path / "resumed.checkpoints" / "checkpoint-2").is_dir()
    steps = _Steps()
    record = finetune(condensed_dir, tmp_path / "resumed", options, resume=True, callbacks=[steps], **quiet)
    assert record["finetune"]["steps"] == 4 and record["finetune"]["resumed"]
    assert steps.done == [3, 4]  # continued from checkpoint-2, did not start over
    straight, resumed = _state(tmp_path / "straight"), _state(tmp_path / "resumed")
    condensed = [k for k in straight if _in_condensed(k)]
    assert not torch.equal(straight[condensed[0]], _state(condensed_dir)[condensed[0]])
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_resume_refuses_other_options(condensed_dir, train_text, tmp_path):
    quiet = dict(show_progress=False, log=lambda *_: None)
    with pytest.raises(KeyboardInterrupt):
        finetune(condensed_dir, tmp_path / "o", _options(train_text), callbacks=[_Crash(2)], **quiet)
    with pytest.raises(cdmoe.CdmoeError, match="lr"):
        finetune(condensed_dir, tmp_path / "o", _options(train_text, lr=1e-3), resume=True, **quiet)
    with pytest.raises(cdmoe.CdmoeError, match="--resume"):  # a fresh run will not mix with old checkpoints
        finetune(condensed_dir, tmp_path / "o", _options(train_text), **quiet)


def test_instruction_formats_take_loss_on_the_answer_only(tiny_model_dir, tmp_path):
    tok = load_tokenizer(tiny_model_dir)
    rows = [{"instruction": "Is the sky blue? Answer format: true/false", "input": "", "output":
             "the correct answer is true", "answer": "true"}]
    path = tmp_path / "cs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = build_dataset(tok, str(path), seq_len=512)
    assert data.format == "commonsense"
    ex = data.dataset[0]
    prompt, answer = render_pair(rows[0], "commonsense")
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    answer_ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert (ex["labels"][:n_prompt] == -100).all()
    assert ex["labels"][n_prompt:].tolist() == answer_ids == ex["input_ids"][n_prompt:].tolist()

    mmlu = tmp_path / "mmlu.json"
    mmlu.write_text(json.dumps([{"question": "2 + 2 = ?", "choices": ["3", "4", "5", "6"], "answer": 1},
                                {"train": {"question": "Capital of France?", "choices": ["Paris", "Rome"],
                                           "answer": "A"}}]))  # cais/mmlu auxiliary_train nesting
    data = build_dataset(tok, str(mmlu), seq_len=512)
    assert data.format == "mmlu"
    assert render_pair({"question": "2 + 2 = ?", "choices": ["3", "4", "5", "6"], "answer": 1}, "mmlu") == (
        "2 + 2 = ?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:", " B")
    for ex, letter in zip(data.dataset, ("B", "A")):
        target = ex["labels"][ex["labels"] != -100].tolist()
        assert target == tok(f" {letter}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_text_is_packed_into_full_blocks(tiny_model_dir, train_text):
    tok = load_tokenizer(tiny_model_dir)
    data = build_dataset(tok, str(train_text), seq_len=32)
    from cdmoe.search.calibration import read_documents

    stream = []
    for doc in read_documents(train_text):
        stream += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(data.dataset) == len(stream) // 32
    assert data.dataset[1]["input_ids"].tolist() == stream[32:64] == data.dataset[1]["labels"].tolist()


def test_condensed_mlps_are_the_recorded_layers(condensed_dir):
    model = load_model(condensed_dir)
    record = json.loads((condensed_dir / "cdmoe.json").read_text())
    mlps = condensed_mlps(model, record)
    assert sorted(mlps) == [f"model.layers.{layer}.mlp" for layer in LAYERS]
    assert all(type(m).__name__ == "CondensedMLP" for m in mlps.values())


@pytest.mark.parametrize(
    "args,message",
    [
        ("original", "run `cdmoe condense` first"),
        ("--format poetry", "supported: auto, text, commonsense, mmlu"),
        ("--data missing.txt", "does not exist"),
        ("unknown-fields", "cannot tell the data format"),
        ("--data nobody/no-such-dataset", "cannot load training data"),
    ],
)
def test_finetune_cli_bad_input(tiny_model_dir, condensed_dir, train_text, tmp_path, args, message):
    out = tmp_path / "o"
    directory, data, extra = condensed_dir, str(train_text), []
    if args == "original":
        directory = tiny_model_dir
    elif args == "unknown-fields":
        data = tmp_path / "odd.jsonl"
        data.write_text(json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    elif args == "--data missing.txt":
        data = str(tmp_path / "missing.txt")
    elif args.startswith("--data"):
        data = args.split()[1]
    else:
        extra = args.split()
    result = runner.invoke(app, ["finetune", str(directory), "--data", str(data), "--out", str(out), "--steps", "1",
                                 "--quiet", *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists() and not (tmp_path / "o.checkpoints").exists()


def test_finetune_cli_refuses_an_existing_output(condensed_dir, train_text, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    result = runner.invoke(app, ["finetune", str(condensed_dir), "--data", str(train_text), "--out", str(out),
                                 "--steps", "1", "--quiet"])
    assert result.exit_code == 2 and "already exists" in result.output


def test_finetune_cli_runs_and_prints_loss(condensed_dir, train_text, tmp_path):
    out = tmp_path / "cli"
    result = runner.invoke(app, ["finetune", str(condensed_dir), "--data", str(train_text), "--out", str(out),
                                 "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "full fine-tuning: 2 steps, final loss" in result.stdout and "trainable" in result.stdout
    assert json.loads((out / "cdmoe.json").read_text())["finetune"]["steps"] == 2
