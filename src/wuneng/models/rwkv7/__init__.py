"""RWKV-7 (BlinkDL RWKV-LM x070) language model, registered with the transformers Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from ...tokenization import ByteLevelTokenizer
from .configuration_rwkv7 import RWKV7Config
from .modeling_rwkv7 import RWKV7Block, RWKV7ForCausalLM, RWKV7Model, RWKV7PreTrainedModel

# model_type "wuneng_rwkv7": fla registers "rwkv7" for its own classes, so we do not take that name.
AutoConfig.register(RWKV7Config.model_type, RWKV7Config, exist_ok=True)
AutoModel.register(RWKV7Config, RWKV7Model, exist_ok=True)
AutoModelForCausalLM.register(RWKV7Config, RWKV7ForCausalLM, exist_ok=True)
# the byte tokenizer is the default of the models trained here; registered, AutoTokenizer finds it by the
# tokenizer_class name of any folder (no trust_remote_code needed once wuneng.models is imported)
AutoTokenizer.register(RWKV7Config, slow_tokenizer_class=ByteLevelTokenizer, exist_ok=True)

__all__ = ["RWKV7Config", "RWKV7Block", "RWKV7PreTrainedModel", "RWKV7Model", "RWKV7ForCausalLM"]
