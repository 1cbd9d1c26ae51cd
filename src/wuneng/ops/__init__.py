"""Pure functional kernels. Nothing here knows about layers or models."""

from .wkv7 import wkv7, wkv7_chunked, wkv7_reference, wkv7_step

__all__ = ["wkv7", "wkv7_reference", "wkv7_chunked", "wkv7_step"]
