"""The low-rank maps of a WuNeng hybrid mixer in training (autograd on): every first factor in one matmul.

A hybrid mixer has six low-rank maps. Three read the token-shift mixes of the state heads' input x (the masked
attention input u) and xx = shift(x) - x: decay ``sigmoid(w0 + tanh(x_w W1) W2)``, in-context rate
``sigmoid(a0 + (x_a A1) A2)`` and, with value residual, ``sigmoid(v0 + (x_v V1) V2)``, where
``x_i = x + xx * mu_i``. Three read u itself: the receptance correction ``u R1``, the fusion gate ``u G1`` and
the middle heads ``u P1`` (their second factors are applied where they are used).

By linearity ``(x + xx * mu_i) A_i = x A_i + xx (mu_i A_i)``: the first factors of all six maps are one matmul
of x against every A_i side by side, plus one matmul of xx against the mu_i-scaled A_i of the token-shift-fed
maps. The scaled weights are built inside the autograd graph at every call (a few [C, rank] products), so the
gradients reach every A_i and mu_i as through the per-map expressions; the [maps, B, T, C] block of token-shift
mixes (and its backward's reductions over it) is never formed. Measured at the 20 M benchmark: see
docs/training.md, "Speed of the WuNeng training step".

The no-grad paths (prefill, decoding) keep their own forms (:meth:`HybridMixer.low_rank_outputs`); the
per-map expressions stay the reference (:meth:`RWKV7StateHeads.wkv_inputs` without ``low``,
:meth:`HybridMixer.low_rank_inputs`), tested equal in float64.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

__all__ = ["training_low_rank"]


def training_low_rank(mixer, u: torch.Tensor, x: torch.Tensor, xx: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The low-rank maps of ``mixer`` (a :class:`~wuneng.layers.hybrid.HybridMixer`) with autograd.

    u: [B, T, C] the attention input; x, xx: [B, T, C] from :meth:`HybridMixer.shifted` (x is u itself when
    nothing is masked). Returns ``{"decay_logit", "alpha_logit"(, "value_gate_logit")}`` [B, T, A]: the
    state heads' maps before their sigmoids (``w0 + tanh(x_w W1) W2``, ...), as
    :meth:`RWKV7StateHeads.wkv_inputs` takes them in ``low`` (it runs the rest of the chain in one fused op,
    :func:`wuneng.ops.state_inputs.state_inputs`), and the first factors ``{"r": u R1(, "gate": u G1)(, "middle": u P1)}`` [B, T, rank] as
    :meth:`HybridMixer.low_rank_inputs` returns them.
    """
    st = mixer.state
    lead, C = u.shape[:-1], u.shape[-1]
    state_first = [st.w1, st.a1] + ([st.v1] if st.value_residual else [])
    mixes = st.mix_vectors()
    u_names = ["r"] + (["gate"] if mixer.fusion == "gate" else []) + (["middle"] if mixer.num_middle_heads > 0 else [])
    u_first = [mixer.receptance_lora_a]
    u_first += [mixer.gate_lora_a] if mixer.fusion == "gate" else []
    u_first += [mixer.middle_lora_a] if mixer.num_middle_heads > 0 else []
    state_widths = [w.shape[1] for w in state_first]
    u_widths = [w.shape[1] for w in u_first]
    shift_first = torch.cat([w * mu.unsqueeze(1) for w, mu in zip(state_first, mixes)], dim=1)  # mu_i A_i
    x2, xx2 = x.reshape(-1, C), xx.reshape(-1, C)
    if x is u:  # nothing masked: every map's x A_i in one matmul
        h = x2 @ torch.cat(state_first + u_first, dim=1)
        h_state, h_u = h.split([sum(state_widths), sum(u_widths)], dim=1)
    else:  # padding zeroed x: the u-fed maps read u itself
        h_state = x2 @ torch.cat(state_first, dim=1)
        h_u = u.reshape(-1, C) @ torch.cat(u_first, dim=1)
    h_state = torch.addmm(h_state, xx2, shift_first)  # + xx (mu_i A_i)
    parts = h_state.split(state_widths, dim=1)
    out = {  # the pre-activations; wkv_inputs applies the sigmoids in its fused op (wuneng.ops.state_inputs)
        "decay_logit": F.linear(torch.tanh(parts[0]), st.w2.t(), st.w0).view(*lead, -1),
        "alpha_logit": F.linear(parts[1], st.a2.t(), st.a0).view(*lead, -1),
    }
    if st.value_residual:
        out["value_gate_logit"] = F.linear(parts[2], st.v2.t(), st.v0).view(*lead, -1)
    for name, part in zip(u_names, h_u.split(u_widths, dim=1)):
        out[name] = part.view(*lead, -1)
    return out
