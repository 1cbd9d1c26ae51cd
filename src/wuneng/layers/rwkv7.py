"""RWKV-7 layers (SPEC section 2): the state heads, the time-mix and the channel-mix.

Parameter names follow RWKV-LM x070 (``x_r``, ``w0/w1/w2``, ``k_k``, ``ln_x``, ...), with the [1, 1, C]
vectors stored flat as [C]. LoRA matrices keep RWKV-LM's layout (``w1`` [C, D], used as ``x @ w1``).

Widths: ``hidden_size`` C is the residual width; the state width A = H * N (heads x head size) equals C in a
plain RWKV-7 model but may exceed it after Meta-State growth, or follow the teacher's query heads in a WuNeng
hybrid. Projections are then A x C and C x A.

The decay is handled as its logarithm: ``log_w = -0.606531 * sigmoid(z)`` (so w lies in (0.5452, 1)).
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..fused import channel_mix as fused_rows
from ..fused.one_token import TimeMixWeights, time_mix_kernel_preferred, time_mix_one_token_planned, time_mix_plan
from ..ops import wkv7, wkv7_step
from ..ops.state_inputs import state_inputs, state_inputs_grouped
from ..ops.wkv7.readout import group_norm_bonus
from .low_rank import LowRankMap, derived_weight, low_rank_bank

# exp(-0.5): the decay is w = exp(-e^{-1/2} * sigmoid(z)), bounded below by exp(-e^{-1/2}) ~ 0.5452.
DECAY_SCALE = math.exp(-0.5)


def lora_ranks(hidden_size: int, head_size: int = 64) -> dict:
    """The current RWKV-LM LoRA ranks (SPEC section 2): {'w', 'a', 'v', 'g'} -> rank."""
    c = hidden_size
    rw = max(32, int(round(2.5 * math.sqrt(c) * (head_size / 64) / 32)) * 32)
    rv = max(32, int(round(1.7 * math.sqrt(c) / 32)) * 32)
    rg = max(32, int(round(5.0 * math.sqrt(c) / 32)) * 32)
    return {"w": rw, "a": rw, "v": rv, "g": rg}


def token_shift(x: torch.Tensor, prev: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``shift(x) - x``: the previous token minus this one.

    x: [B, T, C]; prev: [B, C], the token before x[:, 0] (zeros when None). Returns [B, T, C].
    """
    first = torch.zeros_like(x[:, :1]) if prev is None else prev.unsqueeze(1).to(x.dtype)
    if x.shape[1] == 1:  # decoding: the previous token is the whole shift (no concatenation)
        return first - x
    shifted = torch.cat([first, x[:, :-1]], dim=1)
    return shifted - x


def token_shift_documents(
    x: torch.Tensor,
    prev: Optional[torch.Tensor] = None,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    doc_start: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`token_shift` of a packed row whose documents restart: the token shifted into a document's first
    position is not the previous document's last token but ``prev`` (zeros when None).

    Give exactly one of:
        cu_seqlens: int32/int64 [n_docs + 1] document offsets (fla's convention, the WKV-7 ``cu_seqlens``), with
            x [1, T, C]; ``prev`` is then [n_docs, C], the token before each document (zeros when None).
        doc_start: [B, T] bool, True at the first token of each document; x [B, T, C]. The shifted-in value is
            zero at every start; ``prev`` [B, C] is the token before x[:, 0] and is used only where
            ``doc_start[:, 0]`` is False (the row continues a document).

    Returns [B, T, C].
    """
    if (cu_seqlens is None) == (doc_start is None):
        raise ValueError("token_shift_documents: give exactly one of cu_seqlens and doc_start")
    B, T, C = x.shape
    if doc_start is not None:
        if not isinstance(doc_start, torch.Tensor) or doc_start.dtype != torch.bool or doc_start.shape != (B, T):
            got = tuple(doc_start.shape) if isinstance(doc_start, torch.Tensor) else type(doc_start).__name__
            raise ValueError(f"token_shift_documents: doc_start must be a bool [B, T] = {(B, T)} tensor, got {got}")
        shifted = token_shift(x, prev) + x  # the previous token (prev at t = 0)
        return torch.where(doc_start.to(x.device).unsqueeze(-1), torch.zeros_like(x), shifted) - x
    from ..ops.wkv7._checks import document_offsets

    offsets = document_offsets(cu_seqlens, B, T)
    n_docs = len(offsets) - 1
    if prev is not None and tuple(prev.shape) != (n_docs, C):
        raise ValueError(
            f"token_shift_documents: with cu_seqlens, prev must be [n_docs, C] = {(n_docs, C)}, got {tuple(prev.shape)}"
        )
    starts = [(i, lo) for i, (lo, hi) in enumerate(zip(offsets, offsets[1:])) if hi > lo]  # non-empty documents
    mask = torch.zeros(1, T, 1, dtype=torch.bool, device=x.device)
    fill = torch.zeros_like(x)
    if starts:
        doc_ids = torch.tensor([i for i, _ in starts], device=x.device)
        positions = torch.tensor([t for _, t in starts], device=x.device)
        mask[0, positions] = True
        if prev is not None:
            fill = fill.index_put((torch.zeros_like(positions), positions), prev[doc_ids].to(x.dtype))
    shifted = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
    return torch.where(mask, fill, shifted) - x


def document_starts(position_ids: Optional[torch.Tensor], batch_size: int, seq_len: int) -> Optional[torch.Tensor]:
    """Where the documents of packed rows begin, read from ``position_ids`` (docs/training.md, "Document-aware
    packing"): a document starts at token t > 0 wherever ``position_ids[b, t] != position_ids[b, t - 1] + 1`` (the
    rule of transformers' ``find_packed_sequence_indices``; rows whose positions restart at 0 per document).

    position_ids: [B, T] or [1, T] (broadcast over the batch) integers, or None.
    Returns bool [B, T] (column 0 always False: the row's first token continues whatever state the row starts
    with), or None when no row has a boundary (then nothing changes).
    """
    if position_ids is None:
        return None
    if (
        not isinstance(position_ids, torch.Tensor)
        or position_ids.dim() != 2
        or position_ids.shape[1] != seq_len
        or position_ids.shape[0] not in (1, batch_size)
        or position_ids.dtype.is_floating_point
    ):
        got = tuple(position_ids.shape) if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__
        raise ValueError(
            f"position_ids must be an integer tensor [B, T] = [{batch_size}, {seq_len}] (or [1, T]), got {got}"
        )
    starts = torch.zeros(position_ids.shape, dtype=torch.bool, device=position_ids.device)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if not bool(starts.any()):
        return None
    return starts.expand(batch_size, seq_len)


def wkv7_documents(
    seq: Tuple[torch.Tensor, ...],
    initial_state: Optional[torch.Tensor],
    doc_start: torch.Tensor,
    extra_query: Optional[torch.Tensor] = None,
    impl: str = "auto",
):
    """WKV-7 over rows [B, T] holding several documents: the state restarts from zero at every ``doc_start``.

    The rows are flattened into one packed row [1, B T] whose document offsets (``cu_seqlens``) are every start
    and every row start, and run through :func:`~wuneng.ops.wkv7` with ``cu_seqlens`` (every form accepts it).

    seq: (r, log_w, k, v, a, b) [B, T, H, N]; initial_state: [B, H, N, N] or None (zeros), the state before each
    row's first token (not used by a row whose ``doc_start[b, 0]`` is True); doc_start: bool [B, T];
    extra_query: optional [B, T, H, N].
    Returns ``(y [B, T, H, N], final_state [B, H, N, N])`` (+ ``y_extra`` with ``extra_query``): each row's
    state after its last token (that of its last document).
    """
    B, T, H, N = seq[0].shape
    starts = doc_start.to(seq[0].device).clone()
    starts[:, 0] = True  # a row's first token begins a packed segment (its state: the row's own)
    flat = starts.reshape(-1)
    offsets = torch.cat([flat.nonzero().view(-1), flat.new_tensor([B * T], dtype=torch.long)])
    n_docs = offsets.numel() - 1
    first_doc = flat.long().cumsum(0).view(B, T)[:, 0] - 1  # [B]: the segment each row begins with
    init = None
    if initial_state is not None:
        keep = ~doc_start[:, 0].to(initial_state.device)  # rows continuing their given state
        init = initial_state.new_zeros(n_docs, H, N, N)
        init = init.index_copy(0, first_doc[keep].to(init.device), initial_state[keep])
    packed = [t.reshape(1, B * T, H, N) for t in seq]
    q = None if extra_query is None else extra_query.reshape(1, B * T, H, N)
    out = wkv7(*packed, init, extra_query=q, impl=impl, cu_seqlens=offsets)
    last_doc = torch.cat([first_doc[1:], first_doc.new_tensor([n_docs])]) - 1
    y = out[0].view(B, T, H, N)
    final = out[1].index_select(0, last_doc.to(out[1].device))
    return (y, final) if extra_query is None else (y, final, out[2].view(B, T, H, N))


def wkv_dtypes(compute_dtype: torch.dtype, log_w: torch.Tensor, *tensors: Optional[torch.Tensor]):
    """The dtypes of the layer -> WKV-7 boundary (SPEC section 1): every tensor of ``tensors`` (r, k, v, a, b, ...;
    None passes) cast to ``compute_dtype``, and the log decay to the state dtype, float32 (float64 when
    ``compute_dtype`` is float64): the decay and the state are never rounded to bf16/fp16. Casts are no-ops
    when the dtypes already agree. Returns (log_w, tuple of the cast tensors)."""
    log_w = log_w.to(torch.float64 if compute_dtype == torch.float64 else torch.float32)
    return log_w, tuple(None if t is None else t.to(compute_dtype) for t in tensors)


def outside_autocast(device_type: str):
    """A context that turns ``torch.autocast`` off on ``device_type`` while it is on there (else a no-op).

    The WKV-7 operator takes its inputs in one dtype and computes in its own (the state and the decay in float32,
    SPEC section 1); under autocast its matmuls (the chunked form's, the decoding step's read-out) would be recast
    to bf16/fp16 one by one, and the chunked form's triangular solve has no bf16 kernel on the CPU."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def token_mixes(x: torch.Tensor, xx: torch.Tensor, mixes: torch.Tensor, unbind: bool = True):
    """``x + xx * mu`` for every row ``mu`` of ``mixes`` [M, C], in one op; x, xx [..., C] -> M tensors [..., C]
    (or, with ``unbind=False``, the [M, ..., C] block).

    The token-shift interpolations of a time-mix (RWKV-LM's ``x_r, x_w, x_k, x_v, x_a, x_g``): one fused
    multiply-add over a [M, ..., C] block (each slice contiguous) instead of 2M small ops, which is most of
    their cost at one token per step.
    """
    shape = (mixes.shape[0],) + (1,) * (x.dim() - 1) + (mixes.shape[-1],)
    block = torch.addcmul(x.unsqueeze(0), xx.unsqueeze(0), mixes.view(shape))
    return block.unbind(0) if unbind else block


def linear_one_row(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` for x [..., I], as a matrix-vector product (``torch.mv``) when x holds one row, the module is a
    plain bias-free ``nn.Linear`` on the CPU, and neither autograd nor autocast is on (decoding at batch 1).

    Why: at one row the BLAS's matrix-vector product streams the weight at the memory's rate, while ``F.linear``
    (a matrix product with M = 1) reads it up to 2x slower on 2 threads and in bf16 (benchmarks/decode_step.py).
    Same arithmetic otherwise: tests hold the two equal. Anything else (hooks, a replaced module, several rows)
    calls the module."""
    if (
        type(linear) is nn.Linear
        and linear.bias is None
        and x.numel() == x.shape[-1]
        and x.device.type == "cpu"
        and x.dtype == linear.weight.dtype
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and not linear._forward_hooks
        and not linear._forward_pre_hooks
    ):
        return torch.mv(linear.weight, x.reshape(-1)).view(*x.shape[:-1], linear.out_features)
    return linear(x)


def _plain_linear(linear: nn.Module) -> bool:
    """A plain bias-free ``nn.Linear`` without hooks (a fused kernel may then read its weight instead of calling it)."""
    return (
        type(linear) is nn.Linear
        and linear.bias is None
        and not linear._forward_hooks
        and not linear._forward_pre_hooks
    )


def head_logits(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The language-model head's logits ``head(hidden)`` in float32, hidden [B, T, C] -> [B, T, V].

    Decoding (B T <= :data:`~wuneng.fused.channel_mix.HEAD_MAX_ROWS` rows, bfloat16 weights also
    <= :data:`~wuneng.fused.channel_mix.BF16_MAX_ROWS`, no autograd or autocast, a plain
    bias-free ``nn.Linear`` on the CPU, float32/64 or bfloat16 weights, the C kernel built): one multi-threaded C
    call that streams the weight once (:func:`~wuneng.fused.channel_mix.linear_one_token_planned`; with bfloat16
    weights the logits are computed in float32, not rounded to bfloat16 first). Otherwise
    :func:`linear_one_row` (a matrix-vector product at one row, else the module)."""
    rows = hidden.numel() // max(1, hidden.shape[-1])
    if (
        fused_rows.row_kernel_fits(rows, fused_rows.HEAD_MAX_ROWS, hidden.dtype)  # the weights' dtype (below)
        and hidden.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and _plain_linear(head)
        and hidden.dtype == head.weight.dtype
    ):
        plan = derived_weight(head, "one_token_plan", [head.weight], lambda: fused_rows.linear_plan(head.weight))
        if plan is not None:
            y = fused_rows.linear_one_token_planned(hidden.reshape(rows, -1), plan)
            return y.view(*hidden.shape[:-1], plan.O).float()
    return linear_one_row(head, hidden).float()


def orthogonal_(weight: torch.Tensor, gain: float) -> torch.Tensor:
    """Orthogonal init as RWKV-LM does it: gain * sqrt(rows / cols) when rows > cols. Zero gain zeroes.
    A weight on the meta device is left alone (no data; no random numbers drawn)."""
    if weight.is_meta:  # a model built on the meta device (conversion) initialises its real tensors later
        return weight
    if gain == 0:
        return nn.init.zeros_(weight)
    rows, cols = weight.shape
    g = gain * (math.sqrt(rows / cols) if rows > cols else 1.0)
    with torch.no_grad():
        # orthogonal_ works in float32 on CPU; build there and copy, so meta/bf16 weights are fine too.
        tmp = torch.empty(rows, cols, dtype=torch.float32)
        nn.init.orthogonal_(tmp, gain=g)
        weight.copy_(tmp)
    return weight


def _layer_ratios(layer_idx: int, num_layers: int) -> Tuple[float, float]:
    """r01 = l / (L - 1) (0 for a single layer) and r1 = 1 - l / L."""
    r01 = layer_idx / (num_layers - 1) if num_layers > 1 else 0.0
    r1 = 1.0 - layer_idx / num_layers
    return r01, r1


def state_channel_init(state_size: int, head_size: int, layer_idx: int, num_layers: int) -> dict:
    """Per-state-channel vectors of the current init (SPEC section 2), each [A]: w0, a0, v0, k_k."""
    r01, _ = _layer_ratios(layer_idx, num_layers)
    n = torch.arange(state_size, dtype=torch.float64)
    denom = max(state_size - 1, 1)
    lin = n / denom - 0.5
    half = max((head_size - 1) / 2, 1e-12)
    zz = ((n % head_size) - (head_size - 1) / 2) / half
    zig = zz * zz.abs()
    www = -6 + 6 * (n / denom) ** (1 + r01**0.3)
    return {
        "w0": www + 0.5 + 2.5 * zig,
        "a0": -0.19 + 0.3 * zig + 0.4 * lin,
        "v0": 0.73 - 0.4 * lin,
        "k_k": 0.71 - 0.1 * lin,
    }


def mix_init(hidden_size: int, power: float) -> torch.Tensor:
    """Token-shift mix vector mu = 1 - ddd^power, ddd_n = n / C. Returns [C] float64."""
    ddd = torch.arange(hidden_size, dtype=torch.float64) / hidden_size
    return 1.0 - ddd**power


class RWKV7StateHeads(nn.Module):
    """The RWKV-7 state-driven heads given projected r, k, v: decay, in-context learning rate, value
    residual, the WKV-7 recurrence, GroupNorm and the bonus term.

    This is shared by :class:`TimeMix` (which adds the r/k/v/gate/output projections) and by the WuNeng
    hybrid mixer (whose r, k, v come from the teacher's attention projections).

    Parameters (RWKV-LM names): ``x_w, x_a, x_v`` [C] token-shift mixes feeding the LoRAs;
    ``w0`` [A], ``w1`` [C, D_w], ``w2`` [D_w, A] (decay); ``a0/a1/a2`` (alpha); ``v0/v1/v2`` (value
    residual, unused when ``value_residual`` is False); ``k_k, k_a`` [A]; ``r_k`` [H, N]; ``ln_x`` GroupNorm.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_size: int,
        layer_idx: int = 0,
        num_layers: int = 1,
        *,
        decay_rank: Optional[int] = None,
        a_rank: Optional[int] = None,
        v_rank: Optional[int] = None,
        value_residual: Optional[bool] = None,
        norm_eps: float = 64e-5,
        wkv_impl: str = "auto",
    ):
        super().__init__()
        if hidden_size <= 0 or num_heads <= 0 or head_size <= 0:
            raise ValueError(
                f"RWKV7StateHeads: hidden_size, num_heads, head_size must be positive, got {hidden_size}, {num_heads}, {head_size}"
            )
        if not 0 <= layer_idx < num_layers:
            raise ValueError(f"RWKV7StateHeads: layer_idx must be in [0, {num_layers}), got {layer_idx}")
        ranks = lora_ranks(hidden_size, head_size)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_size = head_size
        self.state_size = num_heads * head_size
        self.layer_idx = layer_idx
        self.num_layers = num_layers
        # the first layer produces v_first; later layers mix towards it (value residual)
        self.value_residual = layer_idx > 0 if value_residual is None else value_residual
        self.wkv_impl = wkv_impl
        C, A = hidden_size, self.state_size
        dw, da, dv = decay_rank or ranks["w"], a_rank or ranks["a"], v_rank or ranks["v"]
        self.x_w = nn.Parameter(torch.empty(C))
        self.x_a = nn.Parameter(torch.empty(C))
        self.x_v = nn.Parameter(torch.empty(C))
        self.w0 = nn.Parameter(torch.empty(A))
        self.w1 = nn.Parameter(torch.empty(C, dw))
        self.w2 = nn.Parameter(torch.empty(dw, A))
        self.a0 = nn.Parameter(torch.empty(A))
        self.a1 = nn.Parameter(torch.empty(C, da))
        self.a2 = nn.Parameter(torch.empty(da, A))
        self.v0 = nn.Parameter(torch.empty(A))
        self.v1 = nn.Parameter(torch.empty(C, dv))
        self.v2 = nn.Parameter(torch.empty(dv, A))
        self.k_k = nn.Parameter(torch.empty(A))
        self.k_a = nn.Parameter(torch.empty(A))
        self.r_k = nn.Parameter(torch.empty(num_heads, head_size))
        self.ln_x = nn.GroupNorm(num_heads, A, eps=norm_eps)
        self.reset_state_parameters()

    # -- initialisation ------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_state_parameters(self) -> None:
        """The current RWKV-LM init of the state-head parameters (SPEC section 2)."""
        C, N = self.hidden_size, self.head_size
        _, r1 = _layer_ratios(self.layer_idx, self.num_layers)
        self.x_w.copy_(mix_init(C, 0.9 * r1))
        self.x_a.copy_(mix_init(C, 0.9 * r1))
        self.x_v.copy_(mix_init(C, 0.7 * r1))
        vec = state_channel_init(self.state_size, N, self.layer_idx, self.num_layers)
        for name in ("w0", "a0", "v0", "k_k"):
            getattr(self, name).copy_(vec[name])
        self.k_a.fill_(1.02)
        self.r_k.fill_(-0.04)
        for first, second in (("w1", "w2"), ("a1", "a2"), ("v1", "v2")):
            nn.init.zeros_(getattr(self, first))
            orthogonal_(getattr(self, second), 0.1)
        self.ln_x.weight.fill_(((self.layer_idx + 1) / self.num_layers) ** 0.7)
        self.ln_x.bias.zero_()

    # -- the pieces of SPEC section 2 ----------------------------------------------------------------
    def log_decay(self, x_w: torch.Tensor) -> torch.Tensor:
        """log w = -e^{-1/2} sigmoid(w0 + tanh(x_w W1) W2), float32. x_w [B,T,C] -> [B,T,A]."""
        z = F.linear(torch.tanh(x_w @ self.w1), self.w2.t(), self.w0)  # one addmm for "+ w0"
        # float32 for half/bf16/float32 activations; float64 stays float64 (oracle tests)
        return -DECAY_SCALE * torch.sigmoid(z if z.dtype == torch.float64 else z.float())

    def low_rank_maps(self) -> list:
        """The state heads' LoRAs as :class:`~wuneng.layers.low_rank.LowRankMap` (for the no-grad
        :func:`~wuneng.layers.low_rank.low_rank_bank`): ``decay`` (tanh inside; sigmoid(w0 + tanh(x_w W1) W2)),
        ``alpha`` and, with value residual, ``value_gate``, each read from its token-shift mix (:meth:`mix_vectors`)."""
        maps = [
            LowRankMap("decay", self.w1, self.w2, self.w0, "tanh", True),
            LowRankMap("alpha", self.a1, self.a2, self.a0, None, True),
        ]
        if self.value_residual:
            maps.append(LowRankMap("value_gate", self.v1, self.v2, self.v0, None, True))
        return maps

    def mix_vectors(self) -> list:
        """The token-shift mixes feeding :meth:`low_rank_maps`, in its order: x_w, x_a (, x_v)."""
        return [self.x_w, self.x_a] + ([self.x_v] if self.value_residual else [])

    def wkv_inputs(
        self,
        x: torch.Tensor,
        xx: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        v_first: Optional[torch.Tensor],
        mask: Optional[torch.Tensor] = None,
        mixed: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
        low: Optional[dict] = None,
    ):
        """Decay, keys, values, a and b of the recurrence.

        x, xx: [B,T,C] (the token and ``shift(x) - x``); k, v: [B,T,A]; v_first: [B,T,A] or None;
        mask: [B,T] (1 = real token) or None; mixed: the token-shift mixes (x_w, x_a, x_v) [B,T,C] when the
        caller already has them (:meth:`TimeMix.project`), else computed here; low: the LoRA outputs
        ``{"decay", "alpha"(, "value_gate")}`` [B,T,A] when already evaluated by the no-grad
        :func:`~wuneng.layers.low_rank.low_rank_bank` (then x, xx and mixed are not read), or their
        pre-activations ``{"decay_logit", "alpha_logit"(, "value_gate_logit")}`` (the hybrid mixer's training path,
        :func:`~wuneng.layers.hybrid_training.training_low_rank`, and its no-grad prefill): then the whole chain
        runs in one fused op, :func:`~wuneng.ops.state_inputs.state_inputs`; with ``low["kv_heads"]`` = G (the
        no-grad prefill, no autograd, no value residual only without a mask), k, v are [B,T,G N] grouped heads
        read in place (:func:`~wuneng.ops.state_inputs.state_inputs_grouped`).
        Returns (log_w, k, v, a, b, v_first), all [B,T,A]: k, v, a, b, v_first in the compute dtype (the dtype
        of the projected k: autocast's dtype under ``torch.autocast``, else the parameters'), log_w in float32
        (float64 when the compute dtype is float64), the dtypes :func:`~wuneng.ops.wkv7` takes (:func:`wkv_dtypes`).
        Padded positions get log_w = 0 and k = v = b = 0, so they leave the state untouched.
        """
        B, T, _ = k.shape
        compute_dtype = k.dtype
        H, N = self.num_heads, self.head_size
        if low is not None and "decay_logit" in low:  # training (hybrid_training.py): the chain in one fused op
            if self.value_residual and v_first is None:
                raise ValueError("RWKV7StateHeads: a value-residual layer needs v_first from the first layer")
            vr = self.value_residual
            zv, vf = (low["value_gate_logit"], v_first) if vr else (None, None)
            kv_heads = low.get("kv_heads")
            if kv_heads is not None:  # the no-grad prefill: k, v [B,T,G N] of grouped heads, read in place
                log_w, k2, v2, a, b = state_inputs_grouped(
                    low["decay_logit"], low["alpha_logit"], zv, k, v, vf, self.k_k, self.k_a, H, kv_heads, mask
                )
                v = v2  # without value residual v' = v (times the mask: the caller passes kv_heads only unmasked)
            else:
                log_w, k2, v2, a, b = state_inputs(
                    low["decay_logit"], low["alpha_logit"], zv, k, v, vf, self.k_k, self.k_a, H, mask
                )
            log_w, (k2, v2, a, b, v_first) = wkv_dtypes(compute_dtype, log_w, k2, v2, a, b, v_first if vr else v)
            return log_w, k2, v2, a, b, v_first
        if low is not None:
            decay = low["decay"]  # sigmoid(z), in the activations' dtype
            log_w = -DECAY_SCALE * (decay if decay.dtype == torch.float64 else decay.float())
            alpha, value_gate = low["alpha"], low.get("value_gate")
        else:
            if mixed is None:  # (x_v only where it is used, so that an unused x_v gets no gradient)
                mixes = self.mix_vectors()
                mixed = tuple(token_mixes(x, xx, torch.stack(mixes))) + (None,) * (3 - len(mixes))
            x_w, x_a, x_v = mixed
            log_w = self.log_decay(x_w)
            alpha = torch.sigmoid(F.linear(x_a @ self.a1, self.a2.t(), self.a0))  # in-context learning rate
            value_gate = torch.sigmoid(F.linear(x_v @ self.v1, self.v2.t(), self.v0)) if self.value_residual else None
        if self.value_residual:
            if v_first is None:
                raise ValueError("RWKV7StateHeads: a value-residual layer needs v_first from the first layer")
            v = torch.lerp(v, v_first.to(v.dtype), value_gate.to(v.dtype))  # v + (v_first - v) * gate (lerp: one dtype)
        else:
            v_first = v
        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0, eps=1e-12).view(B, T, -1)  # kappa-hat
        k = k * torch.addcmul(1 - self.k_a, alpha, self.k_a)  # k (1 + (alpha - 1) k_a)
        a, b = -kk, kk * alpha
        if mask is not None:
            m = mask.to(k.dtype).unsqueeze(-1)
            log_w, k, v, b = log_w * m.to(log_w.dtype), k * m, v * m, b * m
        # under autocast the projections are in bf16/fp16 while the products with float32 parameters (k * k_k,
        # k_a, alpha) are promoted to float32: bring them back to one dtype here
        log_w, (k, v, a, b, v_first) = wkv_dtypes(compute_dtype, log_w, k, v, a, b, v_first)
        return log_w, k, v, a, b, v_first

    def read_out(self, y: torch.Tensor, r: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """GroupNorm per head plus the bonus (sum_n r k r_k) v. All [B,T,A] -> [B,T,A] in y's dtype
        (:func:`~wuneng.ops.wkv7.readout.group_norm_bonus`: one fused C pass on CPU, tensor ops elsewhere).

        bf16/fp16 inputs are normalised in float32 (as CUDA autocast runs ``group_norm``; CPU autocast would keep
        fp16) and the result is cast back: the backward divides by each head's standard deviation. Measured on the
        grown Meta-State model of tests/test_mixed_precision.py under fp16 autocast: gradient error against float32
        5.7e-2 with an fp16 read-out, 3.9e-2 with this one."""
        B, T, A = y.shape
        shape = (B, T, self.num_heads, self.head_size)
        dtype = y.dtype
        params = (self.r_k, self.ln_x.weight, self.ln_x.bias)
        if dtype in (torch.float16, torch.bfloat16):
            y, r, k, v = (t.float() for t in (y, r, k, v))
            params = tuple(p.float() for p in params)
        out = group_norm_bonus(
            y.reshape(shape),
            r.reshape(shape),
            k.reshape(shape),
            v.reshape(shape),
            *params,
            self.ln_x.eps,
        )
        return out.view(B, T, A).to(dtype)

    def recur(
        self,
        r: torch.Tensor,
        log_w: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        wkv_state: Optional[torch.Tensor],
        extra_query: Optional[torch.Tensor] = None,
        doc_start: Optional[torch.Tensor] = None,
    ):
        """The WKV-7 recurrence over [B,T,A] inputs. Returns (y [B,T,A], state [B,H,N,N][, y_extra]).

        doc_start: bool [B,T] or None; where True the state restarts from zero (a packed row's document starts,
        :func:`wkv7_documents`)."""
        B, T, A = r.shape
        if doc_start is not None:
            shape = (B, T, self.num_heads, self.head_size)
            q2 = None if extra_query is None else extra_query.reshape(shape)
            with outside_autocast(r.device.type):
                out = wkv7_documents(
                    tuple(t.reshape(shape) for t in (r, log_w, k, v, a, b)), wkv_state, doc_start, q2, self.wkv_impl
                )
        elif T == 1:  # decoding: [B,1,A] -> [B,H,N] views, one step
            step_shape = (B, self.num_heads, self.head_size)
            args = [t.view(step_shape) if t.is_contiguous() else t.reshape(step_shape) for t in (r, log_w, k, v, a, b)]
            q2 = None if extra_query is None else extra_query.reshape(step_shape)
            with outside_autocast(r.device.type):  # the operator computes in its own dtypes
                out = wkv7_step(*args, wkv_state, extra_query=q2)
        else:
            shape = (B, T, self.num_heads, self.head_size)
            q2 = None if extra_query is None else extra_query.reshape(shape)
            with outside_autocast(r.device.type):
                out = wkv7(
                    *(t.reshape(shape) for t in (r, log_w, k, v, a, b)), wkv_state, extra_query=q2, impl=self.wkv_impl
                )
        y, state = out[0].reshape(B, T, A), out[1]
        if q2 is None:
            return y, state
        return y, state, out[2].reshape(B, T, A)

    def forward(
        self,
        x: torch.Tensor,
        xx: torch.Tensor,
        r: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        v_first: Optional[torch.Tensor] = None,
        wkv_state: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        mixed: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
        low: Optional[dict] = None,
        doc_start: Optional[torch.Tensor] = None,
    ):
        """State heads on projected r, k, v ([B,T,A]); x, xx [B,T,C]; mixed and low as in :meth:`wkv_inputs`;
        doc_start: bool [B,T] or None, where the WKV state restarts (xx must then be the document-aware shift,
        :func:`token_shift_documents`).

        Returns (y [B,T,A] after GroupNorm and bonus, new wkv state [B,H,N,N] float32, v_first [B,T,A]).
        """
        log_w, k, v, a, b, v_first = self.wkv_inputs(x, xx, k, v, v_first, mask, mixed, low)
        y, state = self.recur(r, log_w, k, v, a, b, wkv_state, doc_start=doc_start)
        return self.read_out(y, r, k, v), state, v_first


class TimeMix(RWKV7StateHeads):
    """RWKV-7 time-mix (SPEC section 2): token shift, r/k/v projections, the state heads, the gate and
    the output projection. Input and output [B, T, C]; state width A = H * N.

    State for decoding: (shift [B, C] = the last input token, wkv [B, H, N, N] float32).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_size: int,
        layer_idx: int = 0,
        num_layers: int = 1,
        *,
        gate_rank: Optional[int] = None,
        **kwargs,
    ):
        super().__init__(hidden_size, num_heads, head_size, layer_idx, num_layers, **kwargs)
        C, A = hidden_size, self.state_size
        dg = gate_rank or lora_ranks(hidden_size, head_size)["g"]
        self.x_r = nn.Parameter(torch.empty(C))
        self.x_k = nn.Parameter(torch.empty(C))
        self.x_g = nn.Parameter(torch.empty(C))
        self.g1 = nn.Parameter(torch.empty(C, dg))
        self.g2 = nn.Parameter(torch.empty(dg, A))
        self.receptance = nn.Linear(C, A, bias=False)
        self.key = nn.Linear(C, A, bias=False)
        self.value = nn.Linear(C, A, bias=False)
        self.output = nn.Linear(A, C, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The whole current RWKV-LM init of a time-mix (SPEC section 2)."""
        self.reset_state_parameters()
        _, r1 = _layer_ratios(self.layer_idx, self.num_layers)
        self.x_r.copy_(mix_init(self.hidden_size, 0.2 * r1))
        self.x_k.copy_(mix_init(self.hidden_size, 0.7 * r1))
        self.x_g.copy_(mix_init(self.hidden_size, 0.2 * r1))
        nn.init.zeros_(self.g1)
        orthogonal_(self.g2, 0.1)
        orthogonal_(self.receptance.weight, 1.0)
        orthogonal_(self.key.weight, 0.1)
        orthogonal_(self.value.weight, 1.0)
        nn.init.zeros_(self.output.weight)

    def project(
        self,
        x: torch.Tensor,
        shift: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        doc_start: Optional[torch.Tensor] = None,
    ):
        """Token shift and the r/k/v/gate projections.

        x: [B,T,C]; shift: [B,C] (the previous token) or None; mask: [B,T] or None; doc_start: bool [B,T] or None
        (a document starts there: the shift brings zeros, :func:`token_shift_documents`).
        Returns (x, xx, x_key, r, k, v, g, state_inputs): x with padding zeroed, xx = shift(x) - x, x_key =
        x + xx * mu_k (the key's input, [B,T,C]), r, k, v, g [B,T,A], and the keyword arguments that complete
        :meth:`wkv_inputs`: ``{"mixed": (x_w, x_a, x_v)}`` (the token-shift mixes [B,T,C]) with autograd, or,
        without it (inference), ``{"low": ...}``, every LoRA already evaluated in one
        :func:`~wuneng.layers.low_rank.low_rank_bank` (the gate's among them).
        """
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"{type(self).__name__}: expected x of shape [B, T, {self.hidden_size}], got {tuple(x.shape)}"
            )
        if mask is not None:
            x = x * mask.to(x.dtype).unsqueeze(-1)  # padding never enters the token shift
        xx = token_shift(x, shift) if doc_start is None else token_shift_documents(x, shift, doc_start=doc_start)
        if torch.is_grad_enabled():
            mixes = torch.stack([self.x_r, self.x_k, self.x_g, self.x_w, self.x_a, self.x_v])
            x_r, x_key, x_g, x_w, x_a, x_v = token_mixes(x, xx, mixes)
            g = torch.sigmoid(x_g @ self.g1) @ self.g2  # no sigmoid after G2
            state_inputs = {"mixed": (x_w, x_a, x_v)}
        else:  # rows: the LoRA inputs (x_w, x_a[, x_v], x_g) first, for the bank, then x_r, x_k[, x_v]
            vectors = self.mix_vectors() + [self.x_g, self.x_r, self.x_k] + ([] if self.value_residual else [self.x_v])
            block = token_mixes(x, xx, derived_weight(self, "time_mixes", vectors, lambda: torch.stack(vectors)), False)
            maps = self.low_rank_maps() + [LowRankMap("gate", self.g1, self.g2, None, "sigmoid", False)]
            low = low_rank_bank(self, "low_rank_bank", maps, block[: len(maps)])
            n = len(maps)
            x_r, x_key = block[n], block[n + 1]
            x_v = block[2] if self.value_residual else block[n + 2]
            g = low["gate"]
            state_inputs = {"low": low}
        r = self.receptance(x_r)
        k = self.key(x_key)
        v = self.value(x_v)
        return x, xx, x_key, r, k, v, g, state_inputs

    def one_token_weights(self) -> TimeMixWeights:
        """The weights in the layout of :func:`~wuneng.fused.one_token.time_mix_one_token` (the stacked
        token-shift mixes cached, :func:`~wuneng.layers.low_rank.derived_weight`)."""
        mixes = [self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g]
        vr = self.value_residual
        return TimeMixWeights(
            derived_weight(self, "one_token_mixes", mixes, lambda: torch.stack(mixes)),
            self.receptance.weight,
            self.key.weight,
            self.value.weight,
            self.output.weight,
            self.w0,
            self.w1,
            self.w2,
            self.a0,
            self.a1,
            self.a2,
            self.v0 if vr else None,
            self.v1 if vr else None,
            self.v2 if vr else None,
            self.g1,
            self.g2,
            self.k_k,
            self.k_a,
            self.r_k,
            self.ln_x.weight,
            self.ln_x.bias,
            self.ln_x.eps,
        )

    def forward(
        self,
        x: torch.Tensor,
        v_first: Optional[torch.Tensor] = None,
        state: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        mask: Optional[torch.Tensor] = None,
        doc_start: Optional[torch.Tensor] = None,
    ):
        """x: [B,T,C] (the LN1 output); v_first: [B,T,A] from the first layer (None in it);
        state: (shift [B,C], wkv [B,H,N,N]) or None; mask: [B,T] (1 = token, 0 = padding) or None;
        doc_start: bool [B,T] or None, the documents of packed rows (:func:`document_starts`): the token shift
        and the WKV state restart from zero there.

        Returns (out [B,T,C], v_first [B,T,A], new state (shift, wkv)).

        One token without autograd on CPU (decoding) with ``wkv_impl`` "auto" or "cpu" runs as one fused C call
        (:func:`~wuneng.fused.one_token.time_mix_one_token`, where it is preferred); tests hold it equal to the
        tensor path below.
        """
        shift, wkv_state = (None, None) if state is None else state
        fused = None if doc_start is not None else self._one_token_fused(x, v_first, shift, wkv_state, mask)
        if fused is not None:
            return fused
        x, xx, _, r, k, v, g, state_inputs = self.project(x, shift, mask, doc_start)
        y, wkv_state, v_first = super().forward(
            x, xx, r, k, v, v_first, wkv_state, mask, **state_inputs, doc_start=doc_start
        )
        return self.output(y * g), v_first, (x[:, -1], wkv_state)

    def _one_token_fused(self, x, v_first, shift, wkv_state, mask, self_state_query: bool = False):
        """The fused path for one token without autograd (out, v_first, (shift, wkv)[, self-state read-out
        [B, H, N]]), or None where it does not apply: several tokens, autograd, ``wkv_impl`` not "auto"/"cpu", not
        CPU float32/64 or bfloat16 weights, no C kernel, or a batch above
        :data:`~wuneng.fused.one_token.TIME_MIX_MAX_BATCH` (the BLAS's matrix products win there)."""
        if x.dim() != 3 or x.shape[1] != 1 or torch.is_grad_enabled() or self.wkv_impl not in ("auto", "cpu"):
            return None
        if x.shape[-1] != self.hidden_size or (self.value_residual and v_first is None):
            return None  # the tensor path raises the precise error
        if self_state_query and self.hidden_size % self.head_size:
            return None
        B = x.shape[0]
        # the weights checked and their pointers read once per decoding session (rebuilt when a weight changes)
        plan = derived_weight(self, "one_token_plan", self._one_token_sources(), self._one_token_plan)
        if plan is None or x.dtype != plan.dtype or x.device.type != "cpu" or not time_mix_kernel_preferred(B):
            return None
        vf = v_first.reshape(B, -1) if self.value_residual else None
        m = None if mask is None else mask.reshape(B)
        if shift is None:
            shift = x.new_zeros(B, self.hidden_size)
        out, shift, wkv_state, vf, *readout = time_mix_one_token_planned(
            x.reshape(B, -1), shift, wkv_state, vf, plan, m, self_state_query
        )
        return (out.unsqueeze(1), vf.unsqueeze(1), (shift, wkv_state), *readout)

    def _one_token_sources(self) -> list:
        """The tensors :meth:`one_token_weights` reads: this module's own parameters (read from ``_parameters``:
        ``nn.Module.__getattr__`` per name costs more than the kernel call at small widths) and the projections'."""
        linears = (self.receptance, self.key, self.value, self.output)
        return [
            *self._parameters.values(),
            *(m._parameters["weight"] for m in linears),
            *self.ln_x._parameters.values(),
        ]

    def _one_token_plan(self):
        """The fused kernel's plan of this layer's weights (None where the kernel cannot serve them)."""
        return time_mix_plan(self.one_token_weights())


class ChannelMix(nn.Module):
    """RWKV-7 channel-mix: ``relu(x_k W_key)^2 W_value`` with a token shift. [B,T,C] -> [B,T,C].

    State for decoding: shift [B, C], the last input token. One token without autograd on the CPU (decoding, batch
    up to :data:`~wuneng.fused.channel_mix.CHANNEL_MIX_MAX_BATCH`) runs as one multi-threaded C call
    (:func:`~wuneng.fused.channel_mix.channel_mix_one_token_planned`); tests hold it equal to the tensor path.
    """

    def __init__(
        self, hidden_size: int, intermediate_size: Optional[int] = None, layer_idx: int = 0, num_layers: int = 1
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.layer_idx, self.num_layers = layer_idx, num_layers
        self.x_k = nn.Parameter(torch.empty(hidden_size))
        self.key = nn.Linear(hidden_size, self.intermediate_size, bias=False)
        self.value = nn.Linear(self.intermediate_size, hidden_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        _, r1 = _layer_ratios(self.layer_idx, self.num_layers)
        self.x_k.copy_(mix_init(self.hidden_size, r1**4))
        orthogonal_(self.key.weight, 1.0)
        nn.init.zeros_(self.value.weight)

    def mixed_key(
        self, x: torch.Tensor, shift: Optional[torch.Tensor] = None, doc_start: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """x_k = x + (shift(x) - x) * mu_k, [B,T,C] (the shift restarting at ``doc_start``, bool [B,T], if given)."""
        xx = token_shift(x, shift) if doc_start is None else token_shift_documents(x, shift, doc_start=doc_start)
        return x + xx * self.x_k

    def forward(
        self,
        x: torch.Tensor,
        shift: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        doc_start: Optional[torch.Tensor] = None,
    ):
        """x: [B,T,C] (LN2 output); shift: [B,C] or None; doc_start: bool [B,T] or None (documents of packed rows:
        the shift brings zeros there). Returns (out [B,T,C], new shift [B,C])."""
        fused = None if doc_start is not None else self._one_token_fused(x, shift, mask)
        if fused is not None:
            return fused
        if mask is not None:
            x = x * mask.to(x.dtype).unsqueeze(-1)
        h = linear_one_row(self.key, self.mixed_key(x, shift, doc_start))
        if torch.is_grad_enabled():
            k = torch.relu(h) ** 2
        else:  # in place: relu then h * h is one pass each, where ** 2 is a slower pow (prefill profile, 0.1b)
            k = torch.relu_(h).mul_(h)
        return linear_one_row(self.value, k), x[:, -1]

    def _one_token_fused(self, x, shift, mask):
        """The fused C kernel for one token without autograd ((out [B,1,C], new shift [B,C])), or None where it does
        not apply: several tokens, autograd or autocast, not CPU float32/64 or bfloat16 weights, no C kernel, a
        batch above :data:`~wuneng.fused.channel_mix.CHANNEL_MIX_MAX_BATCH` (bfloat16 weights: above
        :data:`~wuneng.fused.channel_mix.BF16_MAX_ROWS`), or projections that are not plain
        bias-free ``nn.Linear`` modules without hooks (they are then called)."""
        if x.dim() != 3 or x.shape[1] != 1:
            return None
        if not fused_rows.row_kernel_fits(x.shape[0], fused_rows.CHANNEL_MIX_MAX_BATCH, x.dtype):  # = the plan's
            return None
        if torch.is_grad_enabled() or x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            return None
        if not (_plain_linear(self.key) and _plain_linear(self.value)) or x.shape[-1] != self.hidden_size:
            return None
        sources = [self.x_k, self.key.weight, self.value.weight]
        plan = derived_weight(self, "one_token_plan", sources, lambda: fused_rows.channel_mix_plan(*sources))
        if plan is None or x.dtype != plan.dtype:
            return None
        B = x.shape[0]
        out, new_shift = fused_rows.channel_mix_one_token_planned(
            x.view(B, -1), shift, plan, None if mask is None else mask.reshape(B)
        )
        return out.unsqueeze(1), new_shift
