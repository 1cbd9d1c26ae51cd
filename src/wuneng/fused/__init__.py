"""Fused decoding kernels of whole layers: one C call per token for an RWKV-7 time-mix and for the state side of a
WuNeng hybrid mixer, with their tensor-op references beside them.

This floor sits between the operators (:mod:`wuneng.ops`, which it calls: the WKV-7 step, the read-out) and the
layers (:mod:`wuneng.layers`, which call it in decoding). It knows the layers' weights only as the NamedTuples
:class:`~.one_token.TimeMixWeights` and :class:`~.one_token.HybridStateWeights`; it imports nothing above ops.
"""

from .one_token import (
    HybridStateWeights,
    TimeMixWeights,
    hybrid_state_one_token,
    hybrid_state_one_token_reference,
    one_token_kernel_fits,
    one_token_kernel_preferred,
    time_mix_one_token,
    time_mix_one_token_reference,
)

__all__ = [
    "TimeMixWeights",
    "HybridStateWeights",
    "time_mix_one_token",
    "time_mix_one_token_reference",
    "hybrid_state_one_token",
    "hybrid_state_one_token_reference",
    "one_token_kernel_fits",
    "one_token_kernel_preferred",
]
