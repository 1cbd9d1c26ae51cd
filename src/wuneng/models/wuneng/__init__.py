"""WuNeng hybrid language model (SPEC section 3), registered with the transformers Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_wuneng import WuNengConfig, resolve_layer_kinds
from .modeling_wuneng import WuNengForCausalLM, WuNengModel, WuNengPreTrainedModel

AutoConfig.register(WuNengConfig.model_type, WuNengConfig, exist_ok=True)
AutoModel.register(WuNengConfig, WuNengModel, exist_ok=True)
AutoModelForCausalLM.register(WuNengConfig, WuNengForCausalLM, exist_ok=True)

__all__ = [
    "WuNengConfig",
    "WuNengPreTrainedModel",
    "WuNengModel",
    "WuNengForCausalLM",
    "resolve_layer_kinds",
]
