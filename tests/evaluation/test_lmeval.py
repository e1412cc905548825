"""lm-eval on the local demo tasks: its accuracy equals an independent computation."""

import json

import pytest
import torch
from conftest import make_tiny
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from cdmoe.evaluation.demo_tasks import CLOZE_TASK, build_demo_tasks, cloze_items
from cdmoe.evaluation.lmeval import evaluate, summarize
from cdmoe.search.calibration import read_documents

TEXT = "demo/data/test.txt.gz"


@pytest.fixture(scope="module")
def tiny_lm():
    docs = read_documents(TEXT)[:300]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(docs, vocab_size=320, min_frequency=2, special_tokens=["<eos>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>", pad_token="<eos>")
    model = make_tiny("deepseek_v2", seed=7, vocab_size=len(tok), bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return model, tok


@torch.no_grad()
def independent_accuracy(model, tok, items):
    correct = 0
    for item in items:
        ctx = tok(item["context"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in item["choices"]:
            cont = tok(item["context"] + " " + choice, add_special_tokens=False)["input_ids"][len(ctx):]
            ids = torch.tensor([ctx + cont])
            logp = model(input_ids=ids[:, :-1]).logits.float().log_softmax(-1)[0]
            scores.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == item["label"])
    return correct / len(items)


def test_lm_eval_cloze_accuracy_equals_independent_computation(tiny_lm, tmp_path):
    model, tok = tiny_lm
    include = build_demo_tasks(TEXT, tmp_path / "tasks", n_items=24)
    result = evaluate(model, tok, [CLOZE_TASK], str(include), limit=24, batch_size=4)
    items = [json.loads(line) for line in (include / f"{CLOZE_TASK}.jsonl").read_text().splitlines()]
    expected = independent_accuracy(model, tok, items[:24])
    assert summarize(result)[CLOZE_TASK] == pytest.approx(100 * expected)


def test_cloze_items_are_well_formed():
    items = cloze_items(read_documents(TEXT), n_items=50, seed=1)
    assert len(items) == 50
    labels = {item["label"] for item in items}
    assert labels == {0, 1, 2, 3}  # the true continuation is not always in one place
    for item in items:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        assert len(item["context"].split()) == 30
    assert cloze_items(read_documents(TEXT), n_items=50, seed=1) == items  # seeded


def test_eval_cli_perplexity_only(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from cdmoe.cli import app
    from cdmoe.evaluation.perplexity import token_stream
    from cdmoe.models.loading import load_model, load_tokenizer

    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, ["eval", str(tiny_model_dir), "--tasks", "none", "--ppl-text", TEXT,
                                      "--ppl-seq-len", "64", "--ppl-stride", "32", "--ppl-tokens", "600",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())["perplexity"]
    # independent: every token after the first scored once, with up to 64 tokens of context, stride 32
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    stream = token_stream(tok, TEXT, 600)
    owner = {t: 32 * ((t - 32) // 32) if t >= 64 else 0 for t in range(1, len(stream))}  # the window that first scores t
    nll = 0.0
    with torch.no_grad():
        for start in sorted(set(owner.values())):  # causal: one pass per window gives each token's own-context logits
            tokens = [t for t, s in owner.items() if s == start]
            logp = model(input_ids=stream[None, start : max(tokens)]).logits[0].float().log_softmax(-1)
            nll -= sum(float(logp[t - 1 - start, stream[t]]) for t in tokens)
    assert saved["tokens"] == 600 and saved["stride"] == 32
    assert saved["perplexity"] == pytest.approx(float(torch.exp(torch.tensor(nll / (len(stream) - 1)))), rel=1e-4)
