"""WuNeng token mixers (SPEC section 3): the teacher's attention, the hybrid mixer, the ARWKV replacement.

Three mixers take the place of a Llama/Qwen2 decoder layer's ``self_attn``; all share one call signature::

    out, v_first = mixer(u, position_embeddings, attention_mask=None, cache=None, v_first=None)

with ``u`` [B, T, C] the RMSNorm output (the teacher's ``self_attn`` input), ``position_embeddings`` the
(cos, sin) pair of the rotary embedding [B, T, d_h], ``attention_mask`` a 2-D padding mask [B, S]
(1 = token, 0 = padding) over the cached plus the current tokens (S = past + T) or None,
``cache`` a :class:`wuneng.cache.RecurrentStateCache` (or None) and ``v_first`` the value-residual
source of the first layer of the same kind (None in that layer).

- :class:`Attention`: the teacher's attention (GQA, RoPE, optional q/k/v and output biases), softmax via
  ``torch.nn.functional.scaled_dot_product_attention``. Parameter names are the teacher's
  (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``), so conversion is a plain weight copy.
- :class:`HybridMixer`: the attention plus RWKV-7 state-driven heads aligned one per query head, the
  multi-token state processing (state-query modulation, lambda), cross-head fusion
  (gate | add | concat | hymba | none) and middle heads. Every new parameter has a zero factor at
  initialisation (except for ``hymba``), so the mixer computes the teacher's attention exactly.
- :class:`ARWKVMixer`: ARWKV's pure RWKV-7 time-mix replacing attention (own r/k/v/o, no RoPE).

Padding: padded positions never write into the recurrent state (the state heads get ``log_w = 0`` and
``k = v = b = 0`` there, the token shift sees zeros), and no real token attends to a padded key.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.wkv7.one_token import (
    HybridStateWeights,
    hybrid_state_one_token,
    one_token_kernel_fits,
    one_token_kernel_preferred,
)
from .low_rank import LowRankMap, derived_weight, low_rank_bank
from .rwkv7 import RWKV7StateHeads, TimeMix, orthogonal_, token_shift

__all__ = [
    "FUSIONS",
    "MIXER_KINDS",
    "RMSNorm",
    "Attention",
    "HybridMixer",
    "ARWKVMixer",
    "apply_rotary",
    "repeat_kv_heads",
    "attention_padding_mask",
    "middle_head_indices",
    "check_state_head_size",
]

#: cross-head fusion modes (SPEC section 3)
FUSIONS = ("gate", "add", "concat", "hymba", "none")
#: what a decoder layer's mixer can be
MIXER_KINDS = ("hybrid", "arwkv", "attention")
#: smallest / granularity of a state head size: the WKV kernels of RWKV-LM and flash-linear-attention tile
#: heads in blocks of 16, and a GroupNorm / L2 norm over fewer channels is degenerate.
STATE_HEAD_MULTIPLE = 16


def check_state_head_size(head_size: int, what: str = "state heads") -> None:
    """Raise ValueError unless ``head_size`` is a positive multiple of 16 (the RWKV heads' constraint)."""
    if not isinstance(head_size, int) or head_size <= 0 or head_size % STATE_HEAD_MULTIPLE != 0:
        raise ValueError(
            f"{what}: head size {head_size!r} cannot be used by RWKV-7 heads; it must be a positive multiple of "
            f"{STATE_HEAD_MULTIPLE} (e.g. 16, 32, 64, 128)"
        )


class RMSNorm(nn.Module):
    """Llama/Qwen2 RMSNorm: ``weight * x / sqrt(mean(x^2) + eps)``, normalised in float32 (float64 inputs stay
    float64). [..., C] -> [..., C]."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states if dtype == torch.float64 else hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the Llama/Qwen2 (rotate-half) convention. x: [B, H, T, d]; cos, sin: [B, T, d]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def repeat_kv_heads(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """GQA head sharing on the [B, T, H_kv, d] layout: kv head j serves query heads j*n_rep ... (j+1)*n_rep - 1
    (the order of transformers' ``repeat_kv``). Returns [B, T, H_kv * n_rep, d]."""
    if n_rep == 1:
        return x
    if not torch.is_grad_enabled():  # one op (inference); the expand below has the cheaper backward
        return x.repeat_interleave(n_rep, dim=2)
    B, T, H, d = x.shape
    return x[:, :, :, None, :].expand(B, T, H, n_rep, d).reshape(B, T, H * n_rep, d)


def attention_padding_mask(
    attention_mask: Optional[torch.Tensor], query_length: int, key_length: int, device: torch.device
) -> Optional[torch.Tensor]:
    """The boolean SDPA mask [B or 1, 1, T, S] (True = may attend), or None when plain causal attention
    with no offset (``is_causal``) does it.

    Query i (absolute position ``S - T + i``) sees key j iff j <= S - T + i and key j is not padding. Each query
    also always sees itself: a padded query would otherwise see no key at all (softmax of nothing is NaN),
    and a NaN at a padded position would leak through ``0 * NaN`` into later layers. Real queries never see
    padded keys, so their outputs do not depend on the padding.
    """
    past = key_length - query_length
    if attention_mask is None:
        if past == 0 or query_length == 1:
            return None
    elif attention_mask.dim() != 2 or attention_mask.shape[1] != key_length:
        raise ValueError(
            f"attention_mask must be a 2-D padding mask [B, past + T] = [B, {key_length}] (1 = token, 0 = padding), "
            f"got shape {tuple(attention_mask.shape)}"
        )
    q_pos = torch.arange(query_length, device=device)[:, None] + past
    k_pos = torch.arange(key_length, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]  # [1, 1, T, S]
    if attention_mask is not None:
        keep = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        allowed = (allowed & keep) | (k_pos == q_pos)[None, None]
    return allowed


def middle_head_indices(num_heads: int, num_middle: int) -> list:
    """pi(j): the query head the j-th middle head bridges, evenly spaced over the heads:
    ``pi(j) = floor((j + 1/2) * H_q / H_m)`` (H_q 28, H_m 4 -> heads 3, 10, 17, 24)."""
    return [int((j + 0.5) * num_heads / num_middle) for j in range(num_middle)]


class Attention(nn.Module):
    """The teacher's (Llama/Qwen2) multi-head attention with grouped-query heads and RoPE.

    ``q = u W^Q (+b_q)``, ``k = u W^K (+b_k)``, ``v = u W^V (+b_v)`` (H_q, H_kv heads of size d_h),
    ``A = softmax(RoPE(q) RoPE(k)^T / sqrt(d_h) + causal/padding mask) v``, ``out = A W^O (+b_o)``.
    Cache: the rotated keys and the values of past tokens in ``cache.layers[layer_idx]`` (a transformers
    ``DynamicLayer``).
    """

    kind = "attention"

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        layer_idx: int = 0,
        *,
        qkv_bias: bool = False,
        out_bias: bool = False,
    ):
        super().__init__()
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                f"Attention: num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})"
            )
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.num_kv_groups = num_heads // num_kv_heads
        self.layer_idx = layer_idx
        self.scaling = head_dim**-0.5
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=out_bias)

    # -- pieces ---------------------------------------------------------------------------------------
    def project(self, u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B,T,H_q,d], k [B,T,H_kv,d], v [B,T,H_kv,d] (before RoPE)."""
        B, T, _ = u.shape
        q = self.q_proj(u).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(u).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(u).view(B, T, self.num_kv_heads, self.head_dim)
        return q, k, v

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        position_embeddings: Tuple[torch.Tensor, torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
        cache=None,
    ) -> torch.Tensor:
        """Causal softmax attention of q [B,T,H_q,d] on the cached plus current k, v [B,T,H_kv,d].
        Returns A [B, T, H_q, d]."""
        B, T = q.shape[:2]
        cos, sin = position_embeddings
        q = apply_rotary(q.transpose(1, 2), cos, sin)
        k = apply_rotary(k.transpose(1, 2), cos, sin)
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        S = k.shape[2]
        mask = attention_padding_mask(attention_mask, T, S, q.device)
        is_causal = mask is None and T > 1 and S == T
        # GQA inside SDPA: no copy of the cached keys/values per query-head group
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scaling, enable_gqa=self.num_kv_groups > 1
        )
        return a.transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Tuple[torch.Tensor, torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
        cache=None,
        v_first: Optional[torch.Tensor] = None,
    ):
        """hidden_states [B,T,C] -> (out [B,T,C], v_first unchanged)."""
        B, T, _ = hidden_states.shape
        q, k, v = self.project(hidden_states)
        a = self.attend(q, k, v, position_embeddings, attention_mask, cache)
        return self.o_proj(a.reshape(B, T, -1)), v_first


def _token_mask(attention_mask: Optional[torch.Tensor], T: int) -> Optional[torch.Tensor]:
    """The [B, T] padding mask of the current tokens (the last T columns of the 2-D mask), or None."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[1] < T:
        raise ValueError(
            f"attention_mask must be a 2-D padding mask [B, past + T] with T = {T} current tokens, got shape "
            f"{tuple(attention_mask.shape)}"
        )
    return attention_mask[:, -T:]


class _VFirstMixin:
    """Value-residual plumbing for ``align_forward``: the first layer of a kind publishes its v_first in a
    store shared by the model's layers (``self.v_first_store``, a dict set by the model), later layers read
    it when called one at a time (stage-1 alignment calls the mixers layer by layer, in order)."""

    v_first_store: Optional[Dict[str, torch.Tensor]] = None

    def _resolve_v_first(self, v_first: Optional[torch.Tensor], needs_v_first: bool) -> Optional[torch.Tensor]:
        if not needs_v_first or v_first is not None:
            return v_first
        stored = None if self.v_first_store is None else self.v_first_store.get(self.kind)
        if stored is None:
            raise ValueError(
                f"{type(self).__name__} (layer {self.layer_idx}): this layer mixes its values towards v_first of the "
                f"first {self.kind} layer; pass v_first, or run the first {self.kind} layer's align_forward first"
            )
        return stored

    def _publish_v_first(self, v_first: torch.Tensor, produced_here: bool) -> None:
        if produced_here and self.v_first_store is not None:
            self.v_first_store[self.kind] = v_first


class HybridMixer(_VFirstMixin, Attention):
    """WuNeng hybrid attention (SPEC section 3): the teacher's attention plus H_q RWKV-7 state heads.

    With u the RMSNorm output, H_q query heads of size d_h (A = H_q d_h)::

        q, k, v   = u W^Q, u W^K, u W^V                      teacher's projections (+ biases)
        r         = q + (u R1) R2                            W^K-hat: the query plus a rank-D_r correction, R2 = 0
        k_s, v_s  = repeat_kv(k), repeat_kv(v)               before RoPE
        Y         = RWKV7StateHeads(u, r, k_s, v_s)          decay/alpha/value-residual LoRAs, WKV-7, GroupNorm, bonus
        q_h      += lambda_h (Y_h W^state)                   state_query (before RoPE); lambda = 0, W^state = I
        A         = softmax attention(RoPE(q), RoPE(k), v)
        Z         = fusion(A, Y)                             gate | add | concat | hymba | none
        M_j       = s_j(u) A_pi(j) + (1 - s_j(u)) Y_pi(j)    middle heads, s_j = sigmoid(u P1 P2)_j
        out       = Z W^O  (+ Y W^O_s for concat)  (+ M W^O_m)

    Fusions (per channel of head h; gamma, beta, rho, c are [H_q, d_h]):
        ``gate``:  Z = A + gamma(u) (Y - A),  gamma(u) = sigmoid(u G1 G2 + c) rho,  rho = 0
        ``add``:   Z = A + beta Y,  beta = 0
        ``concat``: Z = A and out += Y W^O_s,  W^O_s = 0
        ``hymba``: Z = (RMSNorm_a(A) + RMSNorm_s(Y)) / 2 (norms over the A channels, weights 1), W^O_new = W^O
                   (initialised from the teacher's; not function-preserving)
        ``none``:  Z = A

    Cache per layer: the attention keys/values (``cache.layers[i]``) and the states ``time_shift`` [B, C]
    (the last u) and ``wkv`` [B, H_q, d_h, d_h] float32.
    """

    kind = "hybrid"

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        layer_idx: int = 0,
        num_layers: int = 1,
        *,
        qkv_bias: bool = False,
        out_bias: bool = False,
        fusion: str = "gate",
        middle_heads: int = 4,
        state_query: bool = True,
        state_query_init: float = 0.0,
        receptance_rank: int = 64,
        gate_rank: int = 64,
        middle_rank: int = 64,
        value_residual: bool = False,
        decay_rank: Optional[int] = None,
        a_rank: Optional[int] = None,
        v_rank: Optional[int] = None,
        hymba_eps: float = 1e-6,
        wkv_impl: str = "auto",
    ):
        super().__init__(
            hidden_size, num_heads, num_kv_heads, head_dim, layer_idx, qkv_bias=qkv_bias, out_bias=out_bias
        )
        if fusion not in FUSIONS:
            raise ValueError(f"HybridMixer: unknown fusion {fusion!r}; expected one of {FUSIONS}")
        check_state_head_size(head_dim, "HybridMixer state heads (one per query head, size = the teacher's head_dim)")
        if not isinstance(middle_heads, int) or not 0 <= middle_heads <= num_heads:
            raise ValueError(
                f"HybridMixer: middle_heads must be an int in [0, {num_heads}] (H_q), got {middle_heads!r}"
            )
        for name, rank in (
            ("receptance_rank", receptance_rank),
            ("gate_rank", gate_rank),
            ("middle_rank", middle_rank),
        ):
            if not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"HybridMixer: {name} must be a positive int, got {rank!r}")
        C, H, d = hidden_size, num_heads, head_dim
        A = H * d
        self.num_layers = num_layers
        self.fusion = fusion
        self.num_middle_heads = middle_heads
        self.state_query = bool(state_query)
        self.state_query_init = float(state_query_init)
        # RWKV-7 state heads: one per query head, head size d_h (SPEC section 2 pieces)
        self.state = RWKV7StateHeads(
            C,
            H,
            d,
            layer_idx,
            num_layers,
            decay_rank=decay_rank,
            a_rank=a_rank,
            v_rank=v_rank,
            value_residual=value_residual,
            wkv_impl=wkv_impl,
        )
        # W^K-hat = W^Q + R1 R2 (receptance correction)
        self.receptance_lora_a = nn.Parameter(torch.empty(C, receptance_rank))  # R1
        self.receptance_lora_b = nn.Parameter(torch.empty(receptance_rank, A))  # R2, init 0
        if self.state_query:
            self.state_query_proj = nn.Parameter(torch.empty(d, d))  # W^state, shared over heads
            self.state_query_scale = nn.Parameter(torch.empty(H))  # lambda, init 0
        if fusion == "gate":
            self.gate_lora_a = nn.Parameter(torch.empty(C, gate_rank))  # G1
            self.gate_lora_b = nn.Parameter(torch.empty(gate_rank, A))  # G2
            self.gate_bias = nn.Parameter(torch.empty(H, d))  # c
            self.gate_scale = nn.Parameter(torch.empty(H, d))  # rho, init 0
        elif fusion == "add":
            self.fusion_beta = nn.Parameter(torch.empty(H, d))  # beta, init 0
        elif fusion == "concat":
            self.o_state = nn.Linear(A, C, bias=False)  # W^O_s, init 0
        elif fusion == "hymba":
            self.norm_attn = RMSNorm(A, eps=hymba_eps)
            self.norm_state = RMSNorm(A, eps=hymba_eps)
        if middle_heads > 0:
            self.middle_lora_a = nn.Parameter(torch.empty(C, middle_rank))  # P1
            self.middle_lora_b = nn.Parameter(torch.empty(middle_rank, middle_heads * d))  # P2
            self.o_middle = nn.Linear(middle_heads * d, C, bias=False)  # W^O_m, init 0
            # pi(j) as a persistent buffer: saved with the weights, so a loaded checkpoint never re-derives it
            self.register_buffer("middle_index", torch.tensor(middle_head_indices(H, middle_heads)))
        self.reset_new_parameters()

    @torch.no_grad()
    def reset_new_parameters(self) -> None:
        """The function-preserving initialisation of every parameter the teacher does not have."""
        self.state.reset_state_parameters()
        orthogonal_(self.receptance_lora_a, 1.0)
        nn.init.zeros_(self.receptance_lora_b)
        if self.state_query:
            self.state_query_proj.copy_(torch.eye(self.head_dim))
            self.state_query_scale.fill_(self.state_query_init)
        if self.fusion == "gate":
            nn.init.zeros_(self.gate_lora_a)
            orthogonal_(self.gate_lora_b, 0.1)
            nn.init.zeros_(self.gate_bias)
            nn.init.zeros_(self.gate_scale)
        elif self.fusion == "add":
            nn.init.zeros_(self.fusion_beta)
        elif self.fusion == "concat":
            nn.init.zeros_(self.o_state.weight)
        elif self.fusion == "hymba":
            nn.init.ones_(self.norm_attn.weight)
            nn.init.ones_(self.norm_state.weight)
        if self.num_middle_heads > 0:
            nn.init.zeros_(self.middle_lora_a)
            orthogonal_(self.middle_lora_b, 0.1)
            nn.init.zeros_(self.o_middle.weight)
            self.middle_index.copy_(torch.tensor(middle_head_indices(self.num_heads, self.num_middle_heads)))

    # -- pieces ---------------------------------------------------------------------------------------
    def state_heads(
        self,
        u: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        v_first: Optional[torch.Tensor],
        token_mask: Optional[torch.Tensor],
        shift: Optional[torch.Tensor],
        wkv_state: Optional[torch.Tensor],
        r_low: Optional[torch.Tensor] = None,
        low: Optional[Dict[str, torch.Tensor]] = None,
        shifted: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ):
        """Y [B,T,H_q,d] from u [B,T,C] and the teacher's q [B,T,H_q,d], k, v [B,T,H_kv,d] (before RoPE);
        r_low = u R1 when already computed (see :meth:`low_rank_inputs`); low: the LoRA outputs of
        :meth:`low_rank_outputs` (no autograd; then r_low is not used); shifted: (x, xx) of :meth:`shifted`
        when already computed.

        Returns (Y, new wkv state [B,H_q,d,d], v_first [B,T,A], last token of the masked u [B,C])."""
        B, T, C = u.shape
        x, xx = self.shifted(u, token_mask, shift) if shifted is None else shifted
        if low is not None:
            r = q.reshape(B, T, -1) + low["receptance"]
        else:
            if r_low is None:
                r_low = u @ self.receptance_lora_a
            # r = q + r_low R2 in one addmm over the flattened tokens
            r = torch.addmm(q.reshape(B * T, -1), r_low.reshape(B * T, -1), self.receptance_lora_b).view(B, T, -1)
        k_s = repeat_kv_heads(k, self.num_kv_groups).reshape(B, T, -1)
        v_s = repeat_kv_heads(v, self.num_kv_groups).reshape(B, T, -1)
        y, wkv_state, v_first = self.state(x, xx, r, k_s, v_s, v_first, wkv_state, token_mask, low=low)
        return y.view(B, T, self.num_heads, self.head_dim), wkv_state, v_first, x[:, -1]

    @staticmethod
    def shifted(u: torch.Tensor, token_mask: Optional[torch.Tensor], shift: Optional[torch.Tensor]):
        """(x, xx): x = u with padding zeroed (padding never enters the token shift), xx = shift(x) - x. [B,T,C]."""
        x = u if token_mask is None else u * token_mask.to(u.dtype).unsqueeze(-1)
        return x, token_shift(x, shift)

    def modulate_query(self, q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """q_h + lambda_h (Y_h W^state); q, y [B,T,H_q,d]."""
        if not self.state_query:
            return q
        return torch.addcmul(q, self.state_query_scale[:, None], y @ self.state_query_proj)

    def low_rank_inputs(self, u: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The first low-rank factors applied to u, in one matmul: ``{"r": u R1, "gate": u G1, "middle": u P1}``
        (those that exist)."""
        names = ["r"] + (["gate"] if self.fusion == "gate" else []) + (["middle"] if self.num_middle_heads > 0 else [])
        weights = [self.receptance_lora_a] + ([self.gate_lora_a] if self.fusion == "gate" else [])
        weights += [self.middle_lora_a] if self.num_middle_heads > 0 else []
        if len(weights) == 1:
            return {"r": u @ weights[0]}
        joined = derived_weight(self, "joined_low_rank", weights, lambda: torch.cat(weights, dim=1))
        parts = (u @ joined).split([w.shape[1] for w in weights], dim=-1)
        return dict(zip(names, parts))

    def low_rank_outputs(self, u: torch.Tensor, x: torch.Tensor, xx: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Every low-rank map of the mixer, evaluated together without autograd (:func:`low_rank_bank`): the
        state heads' ``decay``, ``alpha`` (, ``value_gate``) on the token-shift mixes of x (the masked u), and
        ``gate_sigmoid`` = sigmoid(u G1 G2 + c), ``middle_sigmoid`` = sigmoid(u P1 P2), ``receptance`` = u R1 R2
        on u. u, x, xx [B,T,C] -> [B,T,A] each ([B,T,H_m d] for the middle heads)."""
        maps = self.state.low_rank_maps()
        if self.fusion == "gate":
            maps.append(
                LowRankMap("gate_sigmoid", self.gate_lora_a, self.gate_lora_b, self.gate_bias.view(-1), None, True)
            )
        if self.num_middle_heads > 0:
            maps.append(LowRankMap("middle_sigmoid", self.middle_lora_a, self.middle_lora_b, None, None, True))
        maps.append(LowRankMap("receptance", self.receptance_lora_a, self.receptance_lora_b))
        mixes = self.state.mix_vectors()
        n_state, n_u = len(mixes), len(maps) - len(mixes)
        # rows of u-fed maps get a zero mix: x + xx * 0 = x, which is u unless padding zeroed it
        mu = derived_weight(
            self,
            "low_rank_mixes",
            mixes,
            lambda: torch.cat([torch.stack(mixes), mixes[0].new_zeros(n_u, mixes[0].shape[0])]),
        )
        base = x if x is u else torch.cat([x.expand(n_state, *x.shape), u.expand(n_u, *u.shape)])
        inputs = torch.addcmul(base, xx, mu.view(len(maps), *([1] * (x.dim() - 1)), -1))
        return low_rank_bank(self, "low_rank_bank", maps, inputs)

    def fuse(
        self, u: torch.Tensor, a: torch.Tensor, y: torch.Tensor, low: Optional[Dict[str, torch.Tensor]] = None
    ) -> torch.Tensor:
        """The output [B,T,C] from A, Y [B,T,H_q,d] (cross-head fusion and middle heads); ``low`` as returned by
        :meth:`low_rank_inputs` or :meth:`low_rank_outputs` (computed when None)."""
        B, T = u.shape[:2]
        if low is None:
            low = self.low_rank_inputs(u)
        # one dtype for the fusion (torch.lerp does not promote): under autocast A is in the autocast dtype while Y
        # (GroupNorm and bonus with float32 parameters) is float32; o_proj casts to the autocast dtype anyway
        y = y.to(a.dtype)
        if self.fusion == "gate":
            if "gate_sigmoid" in low:
                gamma = low["gate_sigmoid"]
            else:
                gamma = torch.sigmoid(
                    F.linear(low["gate"], self.gate_lora_b.t(), self.gate_bias.view(-1))
                )  # bias in the addmm
            z = torch.lerp(a, y, (gamma.view_as(a) * self.gate_scale).to(a.dtype))  # a + gamma (y - a)
        elif self.fusion == "add":
            z = a + self.fusion_beta * y
        elif self.fusion == "hymba":
            z = (self.norm_attn(a.reshape(B, T, -1)) + self.norm_state(y.reshape(B, T, -1))) * 0.5
        else:  # none, concat
            z = a
        out = self.o_proj(z.reshape(B, T, -1))
        if self.fusion == "concat":
            out = out + self.o_state(y.reshape(B, T, -1))
        if self.num_middle_heads > 0:
            s = low["middle_sigmoid"] if "middle_sigmoid" in low else torch.sigmoid(low["middle"] @ self.middle_lora_b)
            s = s.view(B, T, self.num_middle_heads, self.head_dim)
            a_m, y_m = a.index_select(2, self.middle_index), y.index_select(2, self.middle_index)
            m = torch.lerp(y_m, a_m, s.to(a.dtype))  # s A + (1 - s) Y
            out = out + self.o_middle(m.reshape(B, T, -1))
        return out

    def one_token_weights(self) -> HybridStateWeights:
        """The state-side weights in the layout of :func:`~wuneng.ops.wkv7.one_token.hybrid_state_one_token`."""
        st, gate, middle = self.state, self.fusion == "gate", self.num_middle_heads > 0
        mixes = st.mix_vectors()
        vr = st.value_residual
        return HybridStateWeights(
            derived_weight(self, "one_token_mixes", mixes, lambda: torch.stack(mixes)),
            st.w0,
            st.w1,
            st.w2,
            st.a0,
            st.a1,
            st.a2,
            st.v0 if vr else None,
            st.v1 if vr else None,
            st.v2 if vr else None,
            self.receptance_lora_a,
            self.receptance_lora_b,
            self.gate_lora_a if gate else None,
            self.gate_lora_b if gate else None,
            self.gate_bias.view(-1) if gate else None,
            self.middle_lora_a if middle else None,
            self.middle_lora_b if middle else None,
            st.k_k,
            st.k_a,
            st.r_k,
            st.ln_x.weight,
            st.ln_x.bias,
            st.ln_x.eps,
        )

    def _state_one_token(self, u, q, k, v, v_first, token_mask, shift, wkv_state):
        """The state side for one token by one C call (:func:`~wuneng.ops.wkv7.one_token.hybrid_state_one_token`),
        as (Y [B,1,H_q,d], wkv state, v_first [B,1,A], new shift [B,C], the fusion's low-rank outputs), or None
        where the kernel cannot serve (not CPU float32/64, no C kernel) or is not preferred (too much work for one
        core, :func:`~wuneng.ops.wkv7.one_token.one_token_kernel_preferred`). Tests hold it equal to the tensor
        path."""
        if self.state.value_residual and v_first is None:
            return None  # the tensor path raises the precise error
        B = u.shape[0]
        weights = self.one_token_weights()
        if not (one_token_kernel_fits(u, weights) and one_token_kernel_preferred(weights, B)):
            return None
        # under autocast q, k, v come out of the projections in bf16/fp16 while u and the weights are float32: the
        # kernel computes in u's dtype, so the one-token q, k, v (and v_first) are brought to it
        q, k, v = (t.reshape(B, -1).to(u.dtype) for t in (q, k, v))
        vf = v_first.reshape(B, -1).to(u.dtype) if self.state.value_residual else None
        m = None if token_mask is None else token_mask.reshape(B)
        y, last, wkv_state, vf, gamma, middle = hybrid_state_one_token(
            u.reshape(B, -1),
            shift,
            wkv_state,
            vf,
            q,
            k,
            v,
            weights,
            m,
            impl="cpu",
        )
        low = {}
        if gamma is not None:
            low["gate_sigmoid"] = gamma.unsqueeze(1)
        if middle is not None:
            low["middle_sigmoid"] = middle.unsqueeze(1)
        return y.view(B, 1, self.num_heads, self.head_dim), wkv_state, vf.unsqueeze(1), last, low

    def _run(self, u, position_embeddings, attention_mask, cache, v_first, publish=False):
        B, T, _ = u.shape
        token_mask = _token_mask(attention_mask, T)
        needs_v_first = self.state.value_residual
        v_first = self._resolve_v_first(v_first, needs_v_first)
        shift = wkv_state = None
        if cache is not None:
            shift, wkv_state = cache.get_state(self.layer_idx, "time_shift"), cache.get_state(self.layer_idx, "wkv")
        q, k, v = self.project(u)
        fused = None
        if T == 1 and not torch.is_grad_enabled() and self.state.wkv_impl in ("auto", "cpu"):
            fused = self._state_one_token(u, q, k, v, v_first, token_mask, shift, wkv_state)
        if fused is not None:  # decoding on CPU: the state side in one C call
            y, wkv_state, v_first, last, low = fused
        elif torch.is_grad_enabled():
            low = self.low_rank_inputs(u)
            y, wkv_state, v_first, last = self.state_heads(u, q, k, v, v_first, token_mask, shift, wkv_state, low["r"])
        else:  # inference: every low-rank map in two batched matmuls
            x, xx = self.shifted(u, token_mask, shift)
            low = self.low_rank_outputs(u, x, xx)
            y, wkv_state, v_first, last = self.state_heads(
                u, q, k, v, v_first, token_mask, shift, wkv_state, low=low, shifted=(x, xx)
            )
        if cache is not None:
            cache.set_state(self.layer_idx, "time_shift", last)
            cache.set_state(self.layer_idx, "wkv", wkv_state)
        a = self.attend(self.modulate_query(q, y), k, v, position_embeddings, attention_mask, cache)
        if publish:
            self._publish_v_first(v_first, not needs_v_first)
        return a, y, v_first, low

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Tuple[torch.Tensor, torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
        cache=None,
        v_first: Optional[torch.Tensor] = None,
    ):
        """hidden_states u [B,T,C] -> (out [B,T,C], v_first [B,T,A])."""
        a, y, v_first, low = self._run(hidden_states, position_embeddings, attention_mask, cache, v_first)
        return self.fuse(hidden_states, a, y, low), v_first

    def align_forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Tuple[torch.Tensor, torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
        v_first: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Stage-1 alignment view (no cache): ``output`` [B,T,C] the mixer's output, ``state`` [B,T,C] the state
        heads alone through the output projection (``o_proj(Y)``), ``v_first`` [B,T,A].

        hidden_states: the normed layer input (what the teacher's ``self_attn`` receives); attention_mask: 2-D
        padding mask [B, T] or None. Layers after the first hybrid layer take v_first from the model's shared
        store (written by the first hybrid layer's align_forward) unless it is passed."""
        B, T, _ = hidden_states.shape
        a, y, v_first, low = self._run(hidden_states, position_embeddings, attention_mask, None, v_first, publish=True)
        return {
            "output": self.fuse(hidden_states, a, y, low),
            "state": self.o_proj(y.reshape(B, T, -1)),
            "v_first": v_first,
        }


class ARWKVMixer(_VFirstMixin, TimeMix):
    """ARWKV's replacement of attention: a full RWKV-7 time-mix on the RMSNorm output (no RoPE, no KV cache).

    Own r/k/v/o (A x C, C x A; A = H N, by default N = 64 and A = C), gate, GroupNorm and bonus exactly as
    SPEC section 2. ``position_embeddings`` is accepted and ignored. Cache per layer: ``time_shift`` [B, C]
    and ``wkv`` [B, H, N, N] float32.
    """

    kind = "arwkv"

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cache=None,
        v_first: Optional[torch.Tensor] = None,
        publish: bool = False,
    ):
        """hidden_states [B,T,C] -> (out [B,T,C], v_first [B,T,A])."""
        T = hidden_states.shape[1]
        token_mask = _token_mask(attention_mask, T)
        v_first = self._resolve_v_first(v_first, self.value_residual)
        state = None
        if cache is not None:
            shift, wkv_state = cache.get_state(self.layer_idx, "time_shift"), cache.get_state(self.layer_idx, "wkv")
            state = None if shift is None else (shift, wkv_state)
        out, v_first_new, (shift, wkv_state) = TimeMix.forward(self, hidden_states, v_first, state, token_mask)
        if cache is not None:
            cache.set_state(self.layer_idx, "time_shift", shift)
            cache.set_state(self.layer_idx, "wkv", wkv_state)
        if publish:
            self._publish_v_first(v_first_new, not self.value_residual)
        return out, v_first_new

    def align_forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        attention_mask: Optional[torch.Tensor] = None,
        v_first: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Stage-1 alignment view: ``output`` [B,T,C] and ``v_first`` [B,T,A] (no cache)."""
        out, v_first = self.forward(hidden_states, position_embeddings, attention_mask, None, v_first, publish=True)
        return {"output": out, "v_first": v_first}
