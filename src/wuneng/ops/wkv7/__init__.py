"""The WKV-7 operator (SPEC section 1) in its forms: reference, chunked, one-step, and the dispatcher."""

from .chunk import wkv7_chunked
from .dispatch import wkv7
from .naive import wkv7_reference
from .step import wkv7_step

__all__ = ["wkv7", "wkv7_reference", "wkv7_chunked", "wkv7_step"]
