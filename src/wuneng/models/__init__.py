"""Language models (transformers ``PreTrainedModel`` classes). Importing this package registers every model
with ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM``."""

from .metastate import MetaStateConfig, MetaStateForCausalLM, MetaStateModel
from .rwkv7 import RWKV7Config, RWKV7ForCausalLM, RWKV7Model
from .wuneng import WuNengConfig, WuNengForCausalLM, WuNengModel

__all__ = [
    "RWKV7Config",
    "RWKV7Model",
    "RWKV7ForCausalLM",
    "MetaStateConfig",
    "MetaStateModel",
    "MetaStateForCausalLM",
    "WuNengConfig",
    "WuNengModel",
    "WuNengForCausalLM",
]
