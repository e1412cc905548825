"""The shipped demo model: small, bf16, loads from a local path, and its routing is the library's."""

import json

from conftest import ROOT
from safetensors import safe_open

from cdmoe.models.adapter import family_spec, moe_blocks
from cdmoe.models.loading import load_model, load_tokenizer

DEMO = ROOT / "demo" / "model"


def test_demo_weights_are_small_bf16_safetensors():
    files = list(DEMO.glob("*.safetensors"))
    assert files and sum(f.stat().st_size for f in files) <= 16_000_000
    with safe_open(str(files[0]), "pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"BF16"}


def test_demo_model_is_a_deepseek_v2_moe_with_shared_experts():
    model = load_model(DEMO)
    config = json.loads((DEMO / "config.json").read_text())
    assert config["model_type"] == "deepseek_v2" and family_spec(model).name == "deepseek_v2"
    blocks = moe_blocks(model)
    assert [b.layer_idx for b in blocks] == list(range(1, 8))
    assert blocks[0].num_experts == 16 and blocks[0].top_k == 4 and blocks[0].shared is not None
    tok = load_tokenizer(DEMO)
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    # trained: on held-out text far better than the unigram model (perplexity 867.58, README) or chance (4096)
    from cdmoe.evaluation.perplexity import perplexity, token_stream

    ppl = perplexity(model, token_stream(tok, ROOT / "demo" / "data" / "test.txt.gz", 2048), 256)
    assert 20 < ppl < 120
