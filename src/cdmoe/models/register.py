"""Register condensed checkpoints with the transformers Auto API (done by ``import cdmoe``).

After this, ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads a cdmoe output
directory without ``trust_remote_code``, using the same classes the directory ships.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .modeling_cdmoe import CdmoeConfig, CdmoeForCausalLM

AutoConfig.register(CdmoeConfig.model_type, CdmoeConfig, exist_ok=True)
AutoModelForCausalLM.register(CdmoeConfig, CdmoeForCausalLM, exist_ok=True)
