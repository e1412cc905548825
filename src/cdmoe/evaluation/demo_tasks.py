"""Local lm-evaluation-harness tasks built from a held-out text file (no hub needed).

- ``cdmoe_demo_cloze``: multiple choice. Each item is the start of a paragraph (its
  first ``context_words`` words) and four continuations of ``continuation_words`` words:
  the true one and three taken from the same position of other paragraphs, in a seeded
  random order. Metrics ``acc`` (sum of log-likelihoods) and ``acc_norm`` (per byte).
  Chance is 25%.
- ``cdmoe_demo_ppl``: rolling log-likelihood of whole paragraphs; metrics
  ``word_perplexity``, ``byte_perplexity``, ``bits_per_byte``.

The tasks are YAML files plus JSON-lines data written to a directory, used through
lm-eval's ``TaskManager(include_path=...)``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..search.calibration import read_documents

__all__ = ["CLOZE_TASK", "PPL_TASK", "build_demo_tasks", "cloze_items"]

CLOZE_TASK = "cdmoe_demo_cloze"
PPL_TASK = "cdmoe_demo_ppl"

_CLOZE_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_PPL_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def cloze_items(docs: list[str], n_items: int = 400, context_words: int = 30, continuation_words: int = 10,
                seed: int = 0) -> list[dict]:
    """Multiple-choice cloze items: true continuation vs three from other paragraphs."""
    rng = random.Random(seed)
    usable = [d.split() for d in docs if len(d.split()) >= context_words + continuation_words]
    rng.shuffle(usable)
    items = []
    for i, words in enumerate(usable[:n_items]):
        others = [w for j, w in enumerate(usable) if j != i]
        cont = " ".join(words[context_words : context_words + continuation_words])
        distractors = [" ".join(o[context_words : context_words + continuation_words]) for o in rng.sample(others, 3)]
        choices = [cont] + distractors
        order = list(range(4))
        rng.shuffle(order)
        items.append({"context": " ".join(words[:context_words]), "choices": [choices[j] for j in order],
                      "label": order.index(0)})
    return items


def build_demo_tasks(text: str | Path, dest: str | Path, n_items: int = 400, n_docs: int = 200, seed: int = 0) -> Path:
    """Write the two tasks' YAML and data files for ``text`` into ``dest``; return ``dest``."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    docs = read_documents(text, "--task-text")
    cloze = dest / f"{CLOZE_TASK}.jsonl"
    cloze.write_text("".join(json.dumps(item) + "\n" for item in cloze_items(docs, n_items, seed=seed)))
    ppl = dest / f"{PPL_TASK}.jsonl"
    ppl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:n_docs]))
    (dest / f"{CLOZE_TASK}.yaml").write_text(_CLOZE_YAML.format(task=CLOZE_TASK, data=json.dumps(str(cloze.resolve()))))
    (dest / f"{PPL_TASK}.yaml").write_text(_PPL_YAML.format(task=PPL_TASK, data=json.dumps(str(ppl.resolve()))))
    return dest
