"""WuNeng token mixers (SPEC section 3): the hybrid wrapper around a teacher's attention, and ARWKV's replacement.

A WuNeng student is its teacher's transformers model with the chosen layers' ``self_attn`` changed in place:

- :func:`wrap_attention` turns the teacher's attention module (any class with ``q_proj``/``k_proj``/``v_proj``
  or a fused ``qkv_proj``, and ``o_proj``: Llama, Qwen2/3, Mistral, Gemma 3, Phi-3, Qwen3-MoE, ...) into a
  :class:`HybridMixer`: the same object, its class a subclass of both, so its parameters keep the teacher's names
  and the teacher's ``forward`` runs unchanged (its RoPE variant, q/k norms, biases, sliding window, softcapping,
  ``attn_implementation``). The state heads enter at the two places SPEC section 3 puts them: the state-query
  term is added to the query projection's output, and the fusion and middle heads act on the per-head attention
  output before the output projection. Both are done by giving the teacher's forward, for the duration of one
  call, stand-ins for its projection modules (:meth:`HybridMixer._teacher_attention`).
- :class:`ARWKVMixer`: ARWKV's pure RWKV-7 time-mix replacing attention, with the teacher attention's call
  signature (``hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs`` -> (out, None)).

Beside the teacher's own arguments every mixer receives ``wuneng_context``, a :class:`HybridContext` made by the
model's forward: the 2-D padding mask (the teacher's attention gets its own 4-D mask) and the value-residual
source ``v_first`` of the first layer of each kind. The recurrent states live in the transformers ``Cache``
passed as ``past_key_values`` (:class:`wuneng.cache.RecurrentStateCache`), beside the teacher's KV layers.

Padding: padded positions never write into the recurrent state (the state heads get ``log_w = 0`` and
``k = v = b = 0`` there, the token shift sees zeros).

Packed rows (docs/training.md, "Document-aware packing"): where the context's ``doc_start`` marks a document start
(from ``position_ids`` restarting at 0, under the rule by which transformers makes the teacher's attention
block-diagonal), the token shift and the WKV state restart from zero.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..fused.one_token import (
    HybridStateWeights,
    hybrid_state_one_token_planned,
    hybrid_state_plan,
    kernel_preferred_for,
)
from ..ops.state_inputs import gate_fusion
from .hybrid_training import training_low_rank
from .low_rank import LowRankMap, derived_weight, low_rank_bank
from .rwkv7 import RWKV7StateHeads, TimeMix, orthogonal_, token_shift, token_shift_documents

__all__ = [
    "FUSIONS",
    "MIXER_KINDS",
    "RMSNorm",
    "HybridContext",
    "HybridMixer",
    "ARWKVMixer",
    "wrap_attention",
    "hybrid_attention_class",
    "attention_shapes",
    "repeat_kv_heads",
    "middle_head_indices",
    "check_state_head_size",
]

#: cross-head fusion modes (SPEC section 3)
FUSIONS = ("gate", "add", "concat", "hymba", "none")
#: what a decoder layer's mixer can be
MIXER_KINDS = ("hybrid", "arwkv", "attention")
#: smallest / granularity of a state head size. The CPU forms (reference, chunked, C kernels) take any size
#: (tested at 8, 24, 40); 8 keeps the per-head GroupNorm / L2 norm over a meaningful number of channels and admits
#: every head size real teachers use (64, 80, 96, 128, 256, and toy ones such as 24). fla's CUDA kernels are
#: exercised at multiples of 16 only (the GPU check).
STATE_HEAD_MULTIPLE = 8


def check_state_head_size(head_size: int, what: str = "state heads") -> None:
    """Raise ValueError unless ``head_size`` is a positive multiple of 8 (:data:`STATE_HEAD_MULTIPLE`)."""
    if not isinstance(head_size, int) or head_size <= 0 or head_size % STATE_HEAD_MULTIPLE != 0:
        raise ValueError(
            f"{what}: head size {head_size!r} cannot be used by RWKV-7 heads; it must be a positive multiple of "
            f"{STATE_HEAD_MULTIPLE} (e.g. 16, 24, 64, 128)"
        )


class RMSNorm(nn.Module):
    """RMSNorm ``weight * x / sqrt(mean(x^2) + eps)``, normalised in float32 (float64 inputs stay float64);
    the norms of the ``hymba`` fusion. [..., C] -> [..., C]."""

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


def repeat_kv_heads(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """GQA head sharing on the [B, T, H_kv, d] layout: kv head j serves query heads j*n_rep ... (j+1)*n_rep - 1
    (the order of transformers' ``repeat_kv``). Returns [B, T, H_kv * n_rep, d]."""
    if n_rep == 1:
        return x
    if not torch.is_grad_enabled():  # one op (inference); the expand below has the cheaper backward
        return x.repeat_interleave(n_rep, dim=2)
    B, T, H, d = x.shape
    return x[:, :, :, None, :].expand(B, T, H, n_rep, d).reshape(B, T, H * n_rep, d)


def middle_head_indices(num_heads: int, num_middle: int) -> list:
    """pi(j): the query head the j-th middle head bridges, evenly spaced over the heads:
    ``pi(j) = floor((j + 1/2) * H_q / H_m)`` (H_q 28, H_m 4 -> heads 3, 10, 17, 24)."""
    return [int((j + 0.5) * num_heads / num_middle) for j in range(num_middle)]


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


#: from this many tokens (B x T) on, the no-grad low-rank maps of a hybrid mixer run as plain matmuls on the
#: flattened tokens (:meth:`HybridMixer._low_rank_outputs_wide`) instead of :func:`low_rank_bank`'s batched ones,
#: whose [maps, tokens, C] input block (an addcmul pass) and broadcast bias (a copy into the output) cost more
#: than the arithmetic at prefill sizes (profiled at Qwen2.5-0.5B shapes, T 1024, benchmarks/hybrid_real.py)
WIDE_LOW_RANK_MIN_TOKENS = 64
#: the prefill (:meth:`HybridMixer._low_rank_outputs_wide`) hands the state heads' maps and the fusion gate over
#: before their sigmoids, as ``{"decay_logit", "alpha_logit"(, "value_gate_logit"), "gate_logit"}``, so that the
#: state heads' input chain and the gate fusion each run as one C pass (:mod:`wuneng.ops.state_inputs`) instead
#: of ~15 elementwise PyTorch passes (and :meth:`HybridMixer.shifted` writes xx in one pass); False keeps the
#: post-sigmoid outputs and token_shift (the reference; tests compare the two)
PREFILL_FUSED_CHAIN = True
#: the map names whose pre-activation the fused prefill hands over, and the key it gets in ``low``
_PREFILL_LOGIT_NAMES = {
    "decay": "decay_logit",
    "alpha": "alpha_logit",
    "value_gate": "value_gate_logit",
    "gate_sigmoid": "gate_logit",
}
_MID_ACTIVATIONS = {"tanh": torch.Tensor.tanh_, "sigmoid": torch.Tensor.sigmoid_}


def _plain_linear(module: nn.Module) -> bool:
    """Whether calling ``module`` is exactly ``F.linear(x, weight)`` into a fresh tensor: an ``nn.Linear`` itself (not
    a subclass or a wrapper such as peft's), without a bias and without forward hooks of its own or global ones, so
    that its product may be computed by another op (or its output written in place) without anyone seeing the
    difference."""
    return (
        type(module) is nn.Linear
        and module.bias is None
        and not (module._forward_hooks or module._forward_pre_hooks)
        and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
    )


def _wide_low_rank_weights(maps: list, mixes: list):
    """The weights of :meth:`HybridMixer._low_rank_outputs_wide`: (first [C, width]: every map's A_i side by side,
    each followed by a zero column (to hold ones) when the map has a bias; first_shift [C, state_width]: mu_i A_i
    for the first ``len(mixes)`` maps (the token-shift-fed ones), zero at the ones columns; the indices of the
    ones columns (or None); per map (start, stop, second [stop - start, n_i]: B_i with the bias as its last row);
    state_width)."""
    blocks, shift_blocks, ones, spans, col = [], [], [], [], 0
    state_width = 0
    for i, m in enumerate(maps):
        C, r = m.first.shape
        width = r + (m.bias is not None)
        block = m.first.new_zeros(C, width)
        block[:, :r] = m.first
        blocks.append(block)
        second = m.second if m.bias is None else torch.cat([m.second, m.bias.view(1, -1)])
        spans.append((col, col + width, second.contiguous()))
        if m.bias is not None:
            ones.append(col + r)
        if i < len(mixes):
            shift_blocks.append(block * mixes[i].view(-1, 1))
            state_width = col + width
        col += width
    first = torch.cat(blocks, dim=1)
    first_shift = torch.cat(shift_blocks, dim=1) if shift_blocks else first.new_zeros(first.shape[0], 0)
    ones_index = torch.tensor(ones, device=first.device) if ones else None
    return first, first_shift, ones_index, spans, state_width


class HybridContext:
    """What one forward of a WuNeng model gives its mixers beside the teacher's arguments (``wuneng_context``).

    Args:
        attention_mask: the 2-D padding mask [B, past + T] (1 = token, 0 = padding), or None (no padding).
        v_first: kind ("hybrid" | "arwkv") -> v_first [B, T, A] of the first layer of that kind, filled during
            the forward. Stage-1 alignment, which calls the mixers one layer at a time, passes one dictionary
            for all layers of a batch.
        doc_start: bool [B, T] or None: where a document of a packed row starts
            (:func:`~wuneng.layers.rwkv7.document_starts`); the state side's token shift and WKV state restart
            there. Filled by the model's forward only where the teacher's attention is block-diagonal too (no
            attention mask, no cache).
    """

    def __init__(
        self,
        attention_mask: Optional[torch.Tensor] = None,
        v_first: Optional[Dict] = None,
        doc_start: Optional[torch.Tensor] = None,
    ):
        self.attention_mask = attention_mask
        self.v_first: Dict[str, torch.Tensor] = {} if v_first is None else v_first
        self.doc_start = doc_start

    def token_mask(self, T: int) -> Optional[torch.Tensor]:
        """The [B, T] padding mask of the T current tokens, or None."""
        return _token_mask(self.attention_mask, T)

    def read_v_first(self, mixer: nn.Module, needed: bool) -> Optional[torch.Tensor]:
        """v_first of ``mixer``'s kind when the mixer mixes its values towards it (``needed``), else None."""
        if not needed:
            return None
        v_first = self.v_first.get(mixer.kind)
        if v_first is None:
            raise ValueError(
                f"{type(mixer).__name__} (layer {mixer.layer_idx}): this layer mixes its values towards v_first of "
                f"the first {mixer.kind} layer, which has not run in this forward; run the layers in order"
            )
        return v_first

    def publish_v_first(self, mixer: nn.Module, v_first: torch.Tensor, produced_here: bool) -> None:
        if produced_here:
            self.v_first[mixer.kind] = v_first


def attention_shapes(attn: nn.Module) -> Tuple[int, int, int, bool]:
    """(H_q, H_kv, d_h, fused_qkv) of a transformers attention module, read from the module and its config;
    ValueError naming what is missing when the wrapper cannot serve it."""
    name = type(attn).__name__
    fused = isinstance(getattr(attn, "qkv_proj", None), nn.Module)
    needed = ("qkv_proj", "o_proj") if fused else ("q_proj", "k_proj", "v_proj", "o_proj")
    missing = [p for p in needed if not isinstance(getattr(attn, p, None), nn.Module)]
    config = getattr(attn, "config", None)
    if config is None:
        missing.append("config")
    if missing:
        raise ValueError(
            f"the teacher's attention {name} cannot be wrapped: it has no {', '.join(missing)} (WuNeng wraps "
            "attention modules with q_proj, k_proj, v_proj (or a fused qkv_proj) and o_proj, and a config)"
        )
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(attn, "head_dim", None) or getattr(config, "head_dim", None)
    if head_dim is None and heads:
        head_dim = config.hidden_size // heads
    if not heads or not head_dim or heads % kv_heads != 0:
        raise ValueError(
            f"the teacher's attention {name} cannot be wrapped: num_attention_heads={heads!r}, "
            f"num_key_value_heads={kv_heads!r}, head_dim={head_dim!r} (expected positive ints, heads a multiple of "
            "key/value heads)"
        )
    return int(heads), int(kv_heads), int(head_dim), fused


class _GivenOutput(nn.Module):
    """Stands in for a projection module during one teacher-attention call: returns a tensor computed before
    the call. The teacher's forward must call it on the attention input itself, else the stand-in would silently
    serve something else. One per projection and mixer, made once (:meth:`HybridMixer._stand_ins`); armed with
    (input, output) for one call and disarmed after it, so that it holds no tensor between calls."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what
        self.armed: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        armed = self.armed
        if armed is None or x is not armed[0]:
            raise RuntimeError(
                f"WuNeng hybrid layer: the teacher's attention called {self.what} on something other than its "
                "input; this attention class cannot be wrapped"
            )
        return armed[1]


class _FusedOutput(nn.Module):
    """Stands in for ``o_proj`` during one teacher-attention call: [B, T, H_q d_h] attention output -> the
    mixer's output (fusion with the state heads, the output projection, the middle heads); ``fn`` is set for one
    call."""

    def __init__(self):
        super().__init__()
        self.fn = None

    def forward(self, attn_output: torch.Tensor) -> torch.Tensor:
        return self.fn(attn_output)


class HybridMixer(nn.Module):
    """WuNeng hybrid attention (SPEC section 3): the teacher's attention plus H_q RWKV-7 state heads.

    Not built directly: :func:`wrap_attention` makes a teacher attention module an instance of
    ``hybrid_attention_class(type(attn))``, a subclass of this class and of the teacher's class.

    With u the attention input (the teacher's normed hidden states), H_q query heads of size d_h (A = H_q d_h)::

        q, k, v   = u W^Q, u W^K, u W^V                      teacher's projections (+ biases)
        r         = q + (u R1) R2                            W^K-hat: the query plus a rank-D_r correction, R2 = 0
        k_s, v_s  = repeat_kv(k), repeat_kv(v)               before RoPE (and before q/k norms)
        Y         = RWKV7StateHeads(u, r, k_s, v_s)          decay/alpha/value-residual LoRAs, WKV-7, GroupNorm, bonus
        q_h      += lambda_h (Y_h W^state)                   state_query, on the query projection's output;
                                                             lambda = 0, W^state = I
        A         = the teacher's attention of that q, k, v  (its RoPE, norms, mask, window, softcapping)
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

    Cache per layer: the teacher's key/value layer (``cache.layers[i]``) and the states ``time_shift`` [B, C]
    (the last u) and ``wkv`` [B, H_q, d_h, d_h] float32.
    """

    kind = "hybrid"

    def init_hybrid(
        self,
        hidden_size: int,
        layer_idx: int,
        num_layers: int,
        *,
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
    ) -> None:
        """Add the state side to a teacher attention module (called by :func:`wrap_attention`)."""
        num_heads, num_kv_heads, head_dim, fused = attention_shapes(self)
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
        self.hidden_size = C
        self.num_heads = H
        self.num_kv_heads = num_kv_heads
        self.head_dim = d
        self.num_kv_groups = H // num_kv_heads
        self.fused_qkv = fused
        self.layer_idx = layer_idx
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
        if not any(t.is_meta for t in self.new_tensors()):
            self.reset_new_parameters()

    def new_parameter_names(self) -> list:
        """Names (relative to this module) of the parameters the teacher's attention does not have."""
        teacher = set(self._teacher_parameter_names)
        return [n for n, _ in self.named_parameters() if n not in teacher]

    def new_tensors(self) -> list:
        """The parameters and buffers the wrapper added (the state side)."""
        names = set(self.new_parameter_names())
        out = [p for n, p in self.named_parameters() if n in names]
        if self.num_middle_heads > 0:
            out.append(self.middle_index)
        return out

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
        doc_start: Optional[torch.Tensor] = None,
    ):
        """Y [B,T,H_q,d] from u [B,T,C] and the teacher's q [B,T,H_q,d], k, v [B,T,H_kv,d] (before RoPE);
        r_low = u R1 when already computed (see :meth:`low_rank_inputs`); low: the LoRA outputs of
        :meth:`low_rank_outputs` (no autograd; then r_low is not used); shifted: (x, xx) of :meth:`shifted`
        when already computed; doc_start: bool [B,T] or None, document starts of packed rows (the token shift and
        the WKV state restart there).

        Returns (Y, new wkv state [B,H_q,d,d], v_first [B,T,A], last token of the masked u [B,C])."""
        B, T, C = u.shape
        x, xx = self.shifted(u, token_mask, shift, doc_start) if shifted is None else shifted
        if low is not None and "receptance" in low:
            r = q.reshape(B, T, -1) + low["receptance"]
        else:
            if r_low is None:
                r_low = u @ self.receptance_lora_a
            # r = q + r_low R2 in one addmm over the flattened tokens
            r = torch.addmm(q.reshape(B * T, -1), r_low.reshape(B * T, -1), self.receptance_lora_b).view(B, T, -1)
        if (
            low is not None
            and "decay_logit" in low
            and not torch.is_grad_enabled()
            and self.num_kv_groups > 1
            and (self.state.value_residual or token_mask is None)
        ):  # the fused prefill reads the grouped heads in place (no repeated [B,T,A] copies of k and v)
            k_s, v_s = k.reshape(B, T, -1), v.reshape(B, T, -1)
            low = {**low, "kv_heads": self.num_kv_heads}
        else:
            k_s = repeat_kv_heads(k, self.num_kv_groups).reshape(B, T, -1)
            v_s = repeat_kv_heads(v, self.num_kv_groups).reshape(B, T, -1)
        y, wkv_state, v_first = self.state(
            x, xx, r, k_s, v_s, v_first, wkv_state, token_mask, low=low, doc_start=doc_start
        )
        return y.view(B, T, self.num_heads, self.head_dim), wkv_state, v_first, x[:, -1]

    @staticmethod
    def shifted(
        u: torch.Tensor,
        token_mask: Optional[torch.Tensor],
        shift: Optional[torch.Tensor],
        doc_start: Optional[torch.Tensor] = None,
    ):
        """(x, xx): x = u with padding zeroed (padding never enters the token shift), xx = shift(x) - x. [B,T,C].
        doc_start: bool [B,T] or None; the shift brings zeros at a document start."""
        x = u if token_mask is None else u * token_mask.to(u.dtype).unsqueeze(-1)
        if doc_start is not None:
            return x, token_shift_documents(x, shift, doc_start=doc_start)
        if torch.is_grad_enabled() or x.shape[1] == 1 or not PREFILL_FUSED_CHAIN:
            return x, token_shift(x, shift)
        # prefill: xx written in one pass (token_shift's concatenation is a second pass over [B,T,C])
        xx = torch.empty_like(x)
        torch.sub(x[:, :-1], x[:, 1:], out=xx[:, 1:])
        if shift is None:
            torch.neg(x[:, 0], out=xx[:, 0])
        else:
            torch.sub(shift.to(x.dtype), x[:, 0], out=xx[:, 0])
        return x, xx

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
        if u.shape[:-1].numel() >= WIDE_LOW_RANK_MIN_TOKENS:
            return self._low_rank_outputs_wide(maps, mixes, u, x, xx)
        base = x if x is u else torch.cat([x.expand(n_state, *x.shape), u.expand(n_u, *u.shape)])
        inputs = torch.addcmul(base, xx, mu.view(len(maps), *([1] * (x.dim() - 1)), -1))
        return low_rank_bank(self, "low_rank_bank", maps, inputs)

    def _low_rank_outputs_wide(self, maps: list, mixes: list, u, x, xx) -> Dict[str, torch.Tensor]:
        """:meth:`low_rank_outputs` for many tokens (prefill): the same maps as plain matmuls on the flattened
        tokens, with no [maps, tokens, C] input block. Map i's input x + xx * mu_i enters by linearity,
        ``(x + xx mu_i) A_i = x A_i + xx (mu_i A_i)``, so the first factors of all maps are one matmul of x (u for
        the u-fed maps) plus one of xx for the token-shift-fed maps; each map's bias rides in its second matmul as
        a row of ``B_i`` against a column of ones in the hidden layer (no broadcast copy of the bias). Equal to
        :func:`low_rank_bank` up to float rounding (tests: float64). u, x, xx [B,T,C] -> {name: [B,T,n_i]}; with
        :data:`PREFILL_FUSED_CHAIN` the state heads' maps and the gate come before their sigmoids (``decay_logit``,
        ``alpha_logit``, ``value_gate_logit``, ``gate_logit``) and the receptance correction as its first factor
        ``r`` = u R1 (:meth:`state_heads` adds q in its addmm)."""
        lead, C = u.shape[:-1], u.shape[-1]
        layout = derived_weight(
            self,
            "wide_low_rank",
            [t for m in maps for t in (m.first, m.second, m.bias) if t is not None] + list(mixes),
            lambda: _wide_low_rank_weights(maps, mixes),
        )
        first, first_shift, ones_columns, spans, state_width = layout
        x2, xx2 = x.reshape(-1, C), xx.reshape(-1, C)
        h = x2 @ first  # [N, width]: every map's x A_i (the columns of ones still 0)
        h[:, :state_width].addmm_(xx2, first_shift)  # + xx (mu_i A_i) for the token-shift-fed maps
        if x is not u:  # padding (or document starts) made x differ from u: the u-fed maps read u itself
            h[:, state_width:] = u.reshape(-1, C) @ first[:, state_width:]
        if ones_columns is not None:
            h.index_fill_(1, ones_columns, 1.0)
        out = {}
        fused_chain = PREFILL_FUSED_CHAIN
        for m, (start, stop, second) in zip(maps, spans):
            hidden = h[:, start:stop]
            if m.mid is not None:
                _MID_ACTIVATIONS[m.mid](hidden[:, : m.first.shape[1]])
            if fused_chain and m.name == "receptance" and m.bias is None and m.mid is None:
                # u R1 only: state_heads adds q in its addmm (q + (u R1) R2 in one pass, no separate sum)
                out["r"] = hidden.view(*lead, -1)
                continue
            z = hidden @ second
            if fused_chain and m.name in _PREFILL_LOGIT_NAMES:  # the sigmoid runs in the fused pass that reads it
                out[_PREFILL_LOGIT_NAMES[m.name]] = z.view(*lead, -1)
                continue
            if m.out_sigmoid:
                z.sigmoid_()
            out[m.name] = z.view(*lead, -1)
        return out

    def fuse(
        self,
        u: torch.Tensor,
        a: torch.Tensor,
        y: torch.Tensor,
        low: Optional[Dict[str, torch.Tensor]] = None,
        o_proj: Optional[nn.Module] = None,
    ) -> torch.Tensor:
        """The output [B,T,C] from A, Y [B,T,H_q,d] (cross-head fusion and middle heads); ``low`` as returned by
        :meth:`low_rank_inputs` or :meth:`low_rank_outputs` (computed when None); ``o_proj`` the teacher's output
        projection (default ``self.o_proj``; given explicitly while the teacher's forward runs with a stand-in)."""
        B, T = u.shape[:2]
        o_proj = self.o_proj if o_proj is None else o_proj
        if low is None:
            low = self.low_rank_inputs(u)
        # one dtype for the fusion (torch.lerp does not promote): under autocast A is in the autocast dtype while Y
        # (GroupNorm and bonus with float32 parameters) is float32; o_proj casts to the autocast dtype anyway
        y = y.to(a.dtype)
        if self.fusion == "gate":
            if "gate_sigmoid" in low:
                gamma = low["gate_sigmoid"]
                z = torch.lerp(a, y, (gamma.view_as(a) * self.gate_scale).to(a.dtype))  # a + gamma (y - a)
            elif "gate_logit" in low:  # prefill (PREFILL_FUSED_CHAIN): the sigmoid, scale and lerp in one pass
                z = gate_fusion(a, y, low["gate_logit"].view_as(a), self.gate_scale)
            else:  # training: the sigmoid, scale and lerp in one fused op (ops/state_inputs); bias in the addmm
                zg = F.linear(low["gate"], self.gate_lora_b.t(), self.gate_bias.view(-1))
                z = gate_fusion(a, y, zg.view_as(a), self.gate_scale)
        elif self.fusion == "add":
            z = a + self.fusion_beta * y
        elif self.fusion == "hymba":
            z = (self.norm_attn(a.reshape(B, T, -1)) + self.norm_state(y.reshape(B, T, -1))) * 0.5
        else:  # none, concat
            z = a
        out = o_proj(z.reshape(B, T, -1))
        if self.fusion == "concat":
            out = out + self.o_state(y.reshape(B, T, -1))
        if self.num_middle_heads > 0:
            s = low["middle_sigmoid"] if "middle_sigmoid" in low else torch.sigmoid(low["middle"] @ self.middle_lora_b)
            s = s.view(B, T, self.num_middle_heads, self.head_dim)
            a_m, y_m = a.index_select(2, self.middle_index), y.index_select(2, self.middle_index)
            m = torch.lerp(y_m, a_m, s.to(a.dtype))  # s A + (1 - s) Y
            out = self._add_middle_output(out, m, owned=self.fusion == "concat" or _plain_linear(o_proj))
        return out

    def _add_middle_output(self, out: torch.Tensor, m: torch.Tensor, owned: bool) -> torch.Tensor:
        """out + o_middle(m): out [B,T,C], m [B,T,H_m,d]. Without autograd and with a plain ``o_middle``
        (:func:`_plain_linear`) the product and the sum are one addmm, written into ``out`` itself when it is
        ``owned`` (a tensor no hook or caller holds: the output of a plain o_proj, or of the concat sum). Measured at
        Qwen2.5-0.5B shapes, 1 thread, the fusion's time beyond o_proj per layer: 0.86x that of product-then-sum at
        a 1024-token prefill (13.1 -> 11.3 ms), unchanged at one token. Equal to the general form up to float
        rounding (tests: float64)."""
        o_middle = self.o_middle
        B, T, C = out.shape
        if (
            torch.is_grad_enabled()
            or not _plain_linear(o_middle)
            or not out.is_contiguous()
            or not (out.dtype == m.dtype == o_middle.weight.dtype)
        ):
            return out + o_middle(m.reshape(B, T, -1))
        rows, weight = m.reshape(B * T, -1), o_middle.weight.t()
        if owned:
            return out.view(B * T, C).addmm_(rows, weight).view(B, T, C)
        return torch.addmm(out.view(B * T, C), rows, weight).view(B, T, C)

    def one_token_weights(self) -> HybridStateWeights:
        """The state-side weights in the layout of :func:`~wuneng.fused.one_token.hybrid_state_one_token`."""
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

    def _one_token_sources(self) -> list:
        """The key of the per-session plan of :meth:`one_token_weights`: every parameter held directly by this
        mixer, its state heads and their GroupNorm (a superset of the weights the plan reads: a change to any of
        them rebuilds it), read from the modules' ``_parameters`` (one ``nn.Module.__getattr__`` per name cost
        ~20 attribute look-ups per layer and token)."""
        st = self._modules["state"]
        return [p for module in (self, st, st._modules["ln_x"]) for p in module._parameters.values() if p is not None]

    def _one_token_plan(self) -> tuple:
        """(the kernel plan of :meth:`one_token_weights` (:func:`~wuneng.fused.one_token.hybrid_state_plan`: shapes
        checked, pointers read), their dtype where the C kernel can serve them (else None), their number of
        parameters): what :meth:`_state_one_token` needs at every decoding step, computed once per session."""
        weights = self.one_token_weights()
        plan = hybrid_state_plan(weights)
        params = sum(t.numel() for t in weights[:-1] if t is not None)
        return plan, None if plan is None else weights.k_k.dtype, params

    def _state_one_token(self, u, q, k, v, v_first, token_mask, shift, wkv_state):
        """The state side for one token by one C call (:func:`~wuneng.fused.one_token.hybrid_state_one_token`),
        as (Y [B,1,H_q,d], wkv state, v_first [B,1,A], new shift [B,C], the fusion's low-rank outputs), or None
        where the kernel cannot serve (not CPU float32/64, no C kernel) or is not preferred (too much work for one
        core, :func:`~wuneng.fused.one_token.one_token_kernel_preferred`). Tests hold it equal to the tensor
        path."""
        if self.state.value_residual and v_first is None:
            return None  # the tensor path raises the precise error
        B = u.shape[0]
        # the weights gathered and checked once per decoding session (rebuilt when a weight changes): ~0.2 ms per
        # layer and token at Qwen2.5-0.5B shapes when done at every call
        plan, dtype, params = derived_weight(self, "one_token_plan", self._one_token_sources(), self._one_token_plan)
        if dtype is None or u.dtype != dtype or u.device.type != "cpu" or u.numel() == 0:
            return None
        if not kernel_preferred_for(params, B):
            return None
        # under autocast q, k, v come out of the projections in bf16/fp16 while u and the weights are float32: the
        # kernel computes in u's dtype, so the one-token q, k, v (and v_first) are brought to it
        q, k, v = (t.reshape(B, -1).to(u.dtype) for t in (q, k, v))
        vf = v_first.reshape(B, -1).to(u.dtype) if self.state.value_residual else None
        m = None if token_mask is None else token_mask.reshape(B)
        u = u.reshape(B, -1)
        shift = torch.zeros_like(u) if shift is None else shift
        y, last, wkv_state, vf, gamma, middle = hybrid_state_one_token_planned(
            u, shift, wkv_state, vf, q, k, v, plan, m
        )
        low = {}
        if gamma is not None:
            low["gate_sigmoid"] = gamma.unsqueeze(1)
        if middle is not None:
            low["middle_sigmoid"] = middle.unsqueeze(1)
        return y.view(B, 1, self.num_heads, self.head_dim), wkv_state, vf.unsqueeze(1), last, low

    # -- the teacher's attention, with the state heads at SPEC section 3's two places -----------------------
    def project(self, u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The teacher's projections: q [B,T,H_q,d], k [B,T,H_kv,d], v [B,T,H_kv,d] (before RoPE and q/k norms)."""
        B, T, _ = u.shape
        d = self.head_dim
        if self.fused_qkv:
            q, k, v = self.qkv_proj(u).split([self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], dim=-1)
        else:
            q, k, v = self.q_proj(u), self.k_proj(u), self.v_proj(u)
        return q.view(B, T, -1, d), k.view(B, T, -1, d), v.view(B, T, -1, d)

    def _stand_ins(self) -> Dict[str, nn.Module]:
        """The stand-ins of :meth:`_teacher_attention` by the projection they replace, made at the first call and
        kept in a plain attribute (not submodules: no parameters, not in ``named_modules``)."""
        stand_ins = self.__dict__.get("_wuneng_stand_ins")
        if stand_ins is None:
            names = ("qkv_proj",) if self.fused_qkv else ("q_proj", "k_proj", "v_proj")
            stand_ins = {name: _GivenOutput(name) for name in names}
            stand_ins["o_proj"] = _FusedOutput()
            self.__dict__["_wuneng_stand_ins"] = stand_ins
        return stand_ins

    def _teacher_attention(self, u, q, k, v, output_fn, args, kwargs):
        """Run the teacher's own forward on u with its projections replaced, for this call only, by the given
        q, k, v [B,T,H,d] and by ``output_fn`` ([B,T,A] attention output -> [B,T,C]) for ``o_proj``."""
        B, T, _ = u.shape
        flat = [t.reshape(B, T, -1) for t in (q, k, v)]
        stand_ins = self._stand_ins()
        if self.fused_qkv:
            stand_ins["qkv_proj"].armed = (u, torch.cat(flat, dim=-1))
        else:
            for name, t in zip(("q_proj", "k_proj", "v_proj"), flat):
                stand_ins[name].armed = (u, t)
        stand_ins["o_proj"].fn = output_fn
        modules = self._modules
        saved = {name: modules[name] for name in stand_ins}
        if any(m is stand_ins[name] for name, m in saved.items()):
            raise RuntimeError(
                f"WuNeng hybrid layer {self.layer_idx}: the teacher's attention called this layer again while it "
                "ran; a wrapped attention cannot run inside itself"
            )
        modules.update(stand_ins)
        try:
            out = super().forward(u, *args, **kwargs)
        finally:
            modules.update(saved)
            for stand_in in stand_ins.values():
                if isinstance(stand_in, _GivenOutput):
                    stand_in.armed = None
                else:
                    stand_in.fn = None
        return out

    def _run(self, u, context, cache, publish=False):
        """The state side of one call: (q for the attention [B,T,H_q,d], k, v, Y [B,T,H_q,d], v_first [B,T,A],
        the fusion's low-rank outputs)."""
        B, T, _ = u.shape
        token_mask = context.token_mask(T)
        needs_v_first = self.state.value_residual
        v_first = context.read_v_first(self, needs_v_first)
        shift = wkv_state = None
        if cache is not None:
            shift, wkv_state = cache.get_state(self.layer_idx, "time_shift"), cache.get_state(self.layer_idx, "wkv")
        q, k, v = self.project(u)
        doc_start = context.doc_start
        fused = None
        if T == 1 and doc_start is None and not torch.is_grad_enabled() and self.state.wkv_impl in ("auto", "cpu"):
            fused = self._state_one_token(u, q, k, v, v_first, token_mask, shift, wkv_state)
        if fused is not None:  # decoding on CPU: the state side in one C call
            y, wkv_state, v_first, last, low = fused
        elif torch.is_grad_enabled():  # training: every first low-rank factor in one matmul (hybrid_training.py)
            x, xx = self.shifted(u, token_mask, shift, doc_start)
            low = training_low_rank(self, u, x, xx)
            y, wkv_state, v_first, last = self.state_heads(
                u, q, k, v, v_first, token_mask, shift, wkv_state, low["r"], low, (x, xx), doc_start=doc_start
            )
        else:  # inference: every low-rank map in two batched matmuls
            x, xx = self.shifted(u, token_mask, shift, doc_start)
            low = self.low_rank_outputs(u, x, xx)
            y, wkv_state, v_first, last = self.state_heads(
                u, q, k, v, v_first, token_mask, shift, wkv_state, low.get("r"), low, (x, xx), doc_start=doc_start
            )
        if cache is not None:
            cache.set_state(self.layer_idx, "time_shift", last)
            cache.set_state(self.layer_idx, "wkv", wkv_state)
        context.publish_v_first(self, v_first, not needs_v_first)
        # the query the attention sees, in the projection's dtype (under autocast Y is float32)
        q_attn = self.modulate_query(q, y).to(q.dtype)
        return q_attn, k, v, y, v_first, low

    def forward(self, hidden_states: torch.Tensor, *args, wuneng_context: Optional[HybridContext] = None, **kwargs):
        """The teacher's attention call: hidden_states u [B,T,C] and the teacher's arguments (position embeddings,
        its attention mask, ``past_key_values``, ...) -> the teacher's (output [B,T,C], attention weights or None)."""
        context = HybridContext() if wuneng_context is None else wuneng_context
        u = hidden_states
        q, k, v, y, _, low = self._run(u, context, kwargs.get("past_key_values"))
        o_proj = self.o_proj
        return self._teacher_attention(u, q, k, v, lambda a: self.fuse(u, a.view_as(q), y, low, o_proj), args, kwargs)

    def align_forward(
        self, hidden_states: torch.Tensor, *args, wuneng_context: Optional[HybridContext] = None, **kwargs
    ) -> Dict[str, torch.Tensor]:
        """Stage-1 alignment view (no cache): ``output`` [B,T,C] the mixer's output, ``state`` [B,T,C] the state
        heads alone through the output projection (``o_proj(Y)``), ``v_first`` [B,T,A].

        hidden_states and ``*args, **kwargs``: what the teacher's attention module received (record them with a
        forward hook, ``with_kwargs=True``); ``wuneng_context``: a :class:`HybridContext` with the 2-D padding
        mask, one per batch shared by the layers called in order (the first hybrid layer publishes v_first there)."""
        context = HybridContext() if wuneng_context is None else wuneng_context
        kwargs = {**kwargs, "past_key_values": None}
        u = hidden_states
        B, T, _ = u.shape
        q, k, v, y, v_first, low = self._run(u, context, None)
        o_proj = self.o_proj
        out, _ = self._teacher_attention(u, q, k, v, lambda a: self.fuse(u, a.view_as(q), y, low, o_proj), args, kwargs)
        return {"output": out, "state": o_proj(y.reshape(B, T, -1)), "v_first": v_first}


_HYBRID_CLASSES: Dict[type, type] = {}


def hybrid_attention_class(attention_class: type) -> type:
    """The class of a wrapped ``attention_class`` module: ``Hybrid<Name>(HybridMixer, attention_class)``, made
    once per teacher class."""
    cls = _HYBRID_CLASSES.get(attention_class)
    if cls is None:
        cls = type(f"Hybrid{attention_class.__name__}", (HybridMixer, attention_class), {"__module__": __name__})
        _HYBRID_CLASSES[attention_class] = cls
    return cls


def wrap_attention(attn: nn.Module, hidden_size: int, layer_idx: int, num_layers: int, **options) -> HybridMixer:
    """Make the teacher attention module ``attn`` a WuNeng hybrid mixer in place (same object, same parameters
    under the same names, plus the state side; ``options`` as :meth:`HybridMixer.init_hybrid`). The new
    parameters are initialised (function-preserving) unless they were created on the meta device."""
    if isinstance(attn, HybridMixer):
        raise ValueError(f"layer {layer_idx}: the attention module is already a WuNeng hybrid mixer")
    attention_shapes(attn)  # the one-line error for an attention the wrapper cannot serve
    teacher_names = tuple(n for n, _ in attn.named_parameters())
    attn.__class__ = hybrid_attention_class(type(attn))
    # transformers marks modules it has initialised; the wrapped module has new parameters to initialise
    attn.__dict__.pop("_is_hf_initialized", None)
    attn._teacher_parameter_names = teacher_names
    attn.init_hybrid(hidden_size, layer_idx, num_layers, **options)
    return attn


class ARWKVMixer(TimeMix):
    """ARWKV's replacement of attention: a full RWKV-7 time-mix on the attention input (no RoPE, no KV cache),
    called as the teacher's attention is: ``(hidden_states, position_embeddings, attention_mask,
    past_key_values, **kwargs) -> (out, None)``; only ``past_key_values`` (its recurrent states) and
    ``wuneng_context`` (padding mask, v_first) are read.

    Own r/k/v/o (A x C, C x A; A = H N, by default N = 64 and A = C), gate, GroupNorm and bonus exactly as
    SPEC section 2. Cache per layer: ``time_shift`` [B, C] and ``wkv`` [B, H, N, N] float32.
    """

    kind = "arwkv"

    def _run(self, hidden_states, context, cache):
        T = hidden_states.shape[1]
        token_mask = context.token_mask(T)
        v_first = context.read_v_first(self, self.value_residual)
        state = None
        if cache is not None:
            shift, wkv_state = cache.get_state(self.layer_idx, "time_shift"), cache.get_state(self.layer_idx, "wkv")
            state = None if shift is None else (shift, wkv_state)
        out, v_first_new, (shift, wkv_state) = TimeMix.forward(
            self, hidden_states, v_first, state, token_mask, context.doc_start
        )
        if cache is not None:
            cache.set_state(self.layer_idx, "time_shift", shift)
            cache.set_state(self.layer_idx, "wkv", wkv_state)
        context.publish_v_first(self, v_first_new, not self.value_residual)
        return out, v_first_new

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings=None,
        attention_mask=None,
        past_key_values=None,
        wuneng_context: Optional[HybridContext] = None,
        **kwargs,
    ):
        """hidden_states [B,T,C] -> (out [B,T,C], None)."""
        context = HybridContext() if wuneng_context is None else wuneng_context
        out, _ = self._run(hidden_states, context, past_key_values)
        return out, None

    def align_forward(
        self, hidden_states: torch.Tensor, *args, wuneng_context: Optional[HybridContext] = None, **kwargs
    ) -> Dict[str, torch.Tensor]:
        """Stage-1 alignment view: ``output`` [B,T,C] and ``v_first`` [B,T,A] (no cache); arguments as
        :meth:`HybridMixer.align_forward`."""
        context = HybridContext() if wuneng_context is None else wuneng_context
        out, v_first = self._run(hidden_states, context, None)
        return {"output": out, "v_first": v_first}
