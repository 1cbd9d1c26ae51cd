"""nn.Module token mixers and feed-forward layers built on ``wuneng.ops``."""

from .hybrid import ARWKVMixer, HybridContext, HybridMixer, wrap_attention
from .metastate import MetaStateLayer, MetaStateTimeMix, SelfStateEncoder
from .rwkv7 import ChannelMix, RWKV7StateHeads, TimeMix, lora_ranks, token_shift

__all__ = [
    "HybridMixer",
    "ARWKVMixer",
    "HybridContext",
    "wrap_attention",
    "TimeMix",
    "ChannelMix",
    "RWKV7StateHeads",
    "lora_ranks",
    "token_shift",
    "MetaStateLayer",
    "MetaStateTimeMix",
    "SelfStateEncoder",
]
