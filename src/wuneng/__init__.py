"""wuneng: hybrid state + attention language models (RWKV-7, WuNeng, Meta-State)."""

__version__ = "0.1.0"
