"""tnl_model: TNL hybrid lightning-attention MoE models for Hugging Face transformers.

Importing the package registers the classes with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM`` under the model type ``"tnl"``, and lists ``"tnl"`` among
transformers' base-model and causal-LM model names (what lm-evaluation-harness and ``Trainer`` consult).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_tnl import TNLConfig, minimax_layer_pattern
from .modeling_tnl import TNLCausalLMOutput, TNLForCausalLM, TNLModel, TNLPreTrainedModel

AutoConfig.register(TNLConfig.model_type, TNLConfig, exist_ok=True)
AutoModel.register(TNLConfig, TNLModel, exist_ok=True)
AutoModelForCausalLM.register(TNLConfig, TNLForCausalLM, exist_ok=True)


def _register_model_names() -> None:
    """List ``"tnl"`` among transformers' base-model and causal-LM model types.

    ``AutoModelForCausalLM.register`` only reaches the lazy class mapping; code that asks
    whether a model is a causal LM by name reads ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``
    instead: lm-evaluation-harness's HFLM picks its backend from the config's model type
    there (otherwise it warns that the model is "neither CausalLM nor Seq2SeqLM" and guesses),
    and ``Trainer``'s label smoothing shifts the labels only for class names listed there.
    The lazy mapping skips names whose config is not in ``CONFIG_MAPPING_NAMES`` (a registered
    config never is), so the entry changes nothing else. ``MODEL_MAPPING_NAMES`` is where
    transformers' own tooling (its common model tests among them) tells a headless base model.
    """
    from transformers.models.auto import modeling_auto

    modeling_auto.MODEL_MAPPING_NAMES.setdefault(TNLConfig.model_type, TNLModel.__name__)
    modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(TNLConfig.model_type, TNLForCausalLM.__name__)


_register_model_names()

__version__ = "0.1.0"
__all__ = ["TNLConfig", "TNLModel", "TNLForCausalLM", "TNLPreTrainedModel", "TNLCausalLMOutput",
           "minimax_layer_pattern"]
