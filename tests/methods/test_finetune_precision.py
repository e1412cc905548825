"""Fine-tuning a half-precision model the way a GPU run does: fp32 master weights under bf16 autocast.

On a GPU, ``cdmoe finetune`` loads the checkpoint in its own dtype (bf16), straight onto the device, and
trains the condensed MLPs as fp32 copies under bf16 autocast. This machine has no GPU, but Trainer runs
bf16 autocast on the CPU too, so the same path is exercised here with the autocast switch forced on.
"""

import torch
from conftest import DEMO_TEXT, make_tiny, tiny_tokenizer
from fidelity_checks import digest, tensors
from transformers import TrainerCallback

import cdmoe
from cdmoe.methods import finetune as finetune_module
from cdmoe.methods.finetune import FinetuneOptions, finetune
from cdmoe.models.loading import load_model

LAYERS = (1, 2)


def _condensed_v3(path):
    """Tiny deepseek_v3 stored in bf16 with fp32 routers holding values bf16 cannot (as DeepSeek-V3's own),
    layers 1 and 2 condensed with explicit experts and gates."""
    tok = tiny_tokenizer()
    model = make_tiny("deepseek_v3", seed=5, num_hidden_layers=4, vocab_size=len(tok), bos_token_id=0,
                      eos_token_id=0, pad_token_id=0).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    for name, module in model.named_modules():
        if name.endswith("mlp.gate"):
            module.weight.data = module.weight.data.float() + 1e-3 * torch.randn(module.weight.shape, generator=gen)
    source = path / "source"
    model.save_pretrained(source)
    tok.save_pretrained(source)
    loaded = load_model(source, dtype="bf16")
    choices = [cdmoe.LayerChoice(layer=layer, experts=(0, 3), gates=(0.4, 0.3)) for layer in LAYERS]
    record = cdmoe.condense_layers(loaded, choices, base_model=str(source))
    cdmoe.save(loaded, path / "condensed", record, source=source)
    return path / "condensed"


class _Dtypes(TrainerCallback):
    """The dtypes of the trainable parameters while Trainer steps."""

    def __init__(self):
        self.seen = set()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen |= {p.dtype for p in model.parameters() if p.requires_grad}


def test_half_precision_training_keeps_fp32_masters_and_every_untouched_byte(tmp_path, monkeypatch):
    condensed = _condensed_v3(tmp_path)
    data = tmp_path / "train.txt"
    from cdmoe.search.calibration import read_documents

    data.write_text("\n\n".join(read_documents(DEMO_TEXT)[:60]))
    monkeypatch.setattr(finetune_module, "_autocast", lambda model: True)  # what a GPU run of a bf16 model does
    dtypes = _Dtypes()
    options = FinetuneOptions(data=str(data), steps=3, batch_size=2, seq_len=32, lr=1e-2, save_steps=10,
                              logging_steps=1, dtype="bf16")
    out = tmp_path / "ft"
    finetune(condensed, out, options, show_progress=False, log=lambda *_: None, callbacks=[dtypes], device="cpu")
    assert dtypes.seen == {torch.float32}  # the condensed MLPs trained as fp32 master weights

    before, after = tensors(condensed), tensors(out)
    assert before.keys() == after.keys()
    routers = [k for k in before if k.endswith("mlp.gate.weight")]
    assert routers and all(before[k].dtype == torch.float32 for k in routers)
    for name in before:
        trained = any(name.startswith(f"model.layers.{layer}.mlp.") for layer in LAYERS)
        if trained:
            assert after[name].dtype == before[name].dtype == torch.bfloat16, name
            assert not torch.equal(after[name], before[name]), f"{name} did not train"
        else:  # untouched: the same dtype and bytes, the fp32 routers included
            assert digest(after[name]) == digest(before[name]), name
