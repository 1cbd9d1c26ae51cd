"""nn.Module token mixers and feed-forward layers built on ``wuneng.ops``."""

from .hybrid import ARWKVMixer, Attention, HybridMixer
from .metastate import MetaStateLayer, MetaStateTimeMix, SelfStateEncoder
from .rwkv7 import ChannelMix, RWKV7StateHeads, TimeMix, lora_ranks, token_shift

__all__ = [
    "HybridMixer",
    "ARWKVMixer",
    "Attention",
    "TimeMix",
    "ChannelMix",
    "RWKV7StateHeads",
    "lora_ranks",
    "token_shift",
    "MetaStateLayer",
    "MetaStateTimeMix",
    "SelfStateEncoder",
]
