"""Meta-State language model (RWKV-7 + Self-State Encoder + parameter tokens), registered with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_metastate import MetaStateConfig
from .modeling_metastate import MetaStateBlock, MetaStateForCausalLM, MetaStateModel, MetaStatePreTrainedModel

AutoConfig.register(MetaStateConfig.model_type, MetaStateConfig, exist_ok=True)
AutoModel.register(MetaStateConfig, MetaStateModel, exist_ok=True)
AutoModelForCausalLM.register(MetaStateConfig, MetaStateForCausalLM, exist_ok=True)

__all__ = ["MetaStateConfig", "MetaStateBlock", "MetaStatePreTrainedModel", "MetaStateModel", "MetaStateForCausalLM"]
