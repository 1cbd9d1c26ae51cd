"""nn.Module token mixers and feed-forward layers built on ``wuneng.ops``."""

from .metastate import MetaStateLayer, MetaStateTimeMix, SelfStateEncoder
from .rwkv7 import ChannelMix, RWKV7StateHeads, TimeMix, lora_ranks, token_shift

__all__ = ["TimeMix", "ChannelMix", "RWKV7StateHeads", "lora_ranks", "token_shift", "MetaStateLayer", "MetaStateTimeMix", "SelfStateEncoder"]
