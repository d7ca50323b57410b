"""tnl_model: TNL hybrid lightning-attention MoE models for Hugging Face transformers.

Importing the package registers the classes with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM`` under the model type ``"tnl"``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_tnl import TNLConfig, minimax_layer_pattern
from .modeling_tnl import TNLCausalLMOutput, TNLForCausalLM, TNLModel, TNLPreTrainedModel

AutoConfig.register(TNLConfig.model_type, TNLConfig, exist_ok=True)
AutoModel.register(TNLConfig, TNLModel, exist_ok=True)
AutoModelForCausalLM.register(TNLConfig, TNLForCausalLM, exist_ok=True)

__version__ = "0.1.0"
__all__ = ["TNLConfig", "TNLModel", "TNLForCausalLM", "TNLPreTrainedModel", "TNLCausalLMOutput",
           "minimax_layer_pattern"]
