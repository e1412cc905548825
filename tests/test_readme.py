"""The README's Python example runs as written, from a directory that holds the demo files."""

import json
import os
import re
import subprocess
import sys

from conftest import ROOT


def test_readme_python_example_runs_as_written(tmp_path):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "cdmoe.condense(" in code and "cdmoe.evaluate(" in code
    (tmp_path / "demo").symlink_to(ROOT / "demo")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((tmp_path / "runs" / "api-demo" / "cdmoe.json").read_text())
    assert len(record["condensed"]) == 2 and all(len(c["experts"]) == 4 for c in record["condensed"])
    lines = run.stdout.strip().splitlines()
    assert lines[1] == str([(c["layer"], c["experts"]) for c in record["condensed"]])
    evaluated = json.loads((tmp_path / "runs" / "api-demo-eval.json").read_text())
    assert float(lines[2]) == evaluated["summary"]["perplexity"]
    loaded = json.loads((tmp_path / "runs" / "api-demo-loaded" / "cdmoe.json").read_text())
    assert len(loaded["condensed"]) == 1 and loaded["search"]["mode"] == "in memory"
