"""cdmoe: condense Mixture-of-Experts language models (CD-MoE, arXiv 2412.00069).

Importing cdmoe registers condensed checkpoints with the transformers Auto API, so
``AutoModelForCausalLM.from_pretrained(out_dir)`` loads them with cdmoe's own classes (a condensed
remote-code family still needs ``trust_remote_code=True`` for the family code it ships).
"""

from ._version import __version__  # noqa: E402,F401
from .checkpoint.record import condense_layers  # noqa: E402
from .checkpoint.writer import save  # noqa: E402
from .errors import CdmoeError  # noqa: E402
from .io.remote_code import trust_remote_code  # noqa: E402
from .methods.apply import apply_record  # noqa: E402
from .methods.baselines import BaselineOptions  # noqa: E402
from .methods.condense import EvalOptions  # noqa: E402
from .methods.finetune import FinetuneOptions, finetune  # noqa: E402
from .models import register  # noqa: E402,F401
from .models.adapter import MoEBlock, Routing, family_spec, moe_blocks  # noqa: E402
from .models.condensed import LayerChoice, condense_model  # noqa: E402
from .models.loading import load_model, load_tokenizer  # noqa: E402
from .models.plan import plan  # noqa: E402
from .oneshot import baseline, compare, condense, evaluate, sweep  # noqa: E402
from .search.calibration import CalibSpec  # noqa: E402
from .search.run import SearchOptions  # noqa: E402
from .io.arguments import checked as _checked  # noqa: E402

# every exported function checks its arguments where they enter (oneshot's functions are checked where defined)
(finetune, plan, apply_record, condense_layers, condense_model, save, load_model, load_tokenizer, family_spec,
 moe_blocks) = map(_checked, (finetune, plan, apply_record, condense_layers, condense_model, save, load_model,
                              load_tokenizer, family_spec, moe_blocks))

__all__ = [
    # one call per job (mirroring the CLI)
    "condense", "evaluate", "compare", "sweep", "baseline", "finetune", "plan", "apply_record",
    # their option types
    "BaselineOptions", "CalibSpec", "EvalOptions", "FinetuneOptions", "SearchOptions",
    # step by step
    "CdmoeError", "LayerChoice", "MoEBlock", "Routing", "condense_layers", "condense_model", "family_spec",
    "load_model", "load_tokenizer", "moe_blocks", "save", "trust_remote_code",
]
