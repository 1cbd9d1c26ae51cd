"""Meta-State layers (SPEC section 4): the Self-State Encoder and the Meta-State layer that replaces the
RWKV-7 channel-mix, plus the time-mix variant that hands them the state read-out.

One Meta-State block is ``h = h + TimeMix(LN1(h)); h = h + MetaStateLayer(LN2(h), read-out)``. Per token t::

    # time-mix: one WKV-7 call returns y_t = S_t r_t (as RWKV-7) and the SSE read-out z_t = S_t q_t
    q_t^(h)  = L2normalize(x_k^tm[block c(h)])          x_k^tm = x + (shift(x) - x) * mu_k   (time-mix key mix)
    c(h)     = h mod (C / N)                           heads beyond C/N (after growth) reuse width blocks
    # Self-State Encoder: the state read as a matrix acting on the token, no new matrix, no softmax
    e_t[block c] = sum_{h in P, c(h) = c} eta_h * z_t^(h)                 eta in R^{H x N}, init 0
    # Meta-State layer: token-parameter interaction with M parameter tokens (Tokenformer's Pattention, relu^2)
    key_t    = x_k + e_t                               x_k = LN2 input mixed with its token shift (mu_k)
    out_t    = relu(key_t K_P^T)^2 V_P                 K_P, V_P in R^{M x C}

With eta = 0 the Meta-State layer is exactly RWKV-7's channel-mix with ``K_P = W_key`` and ``V_P = W_value^T``.

DECISION (docs/metastate.md): SPEC section 4 writes the SSE query as the channel-mix's own input x_k; that input
depends on this layer's time-mix output, which needs the WKV call first, so it cannot be a second query of
the same chunked call. The query is therefore the time-mix's own key mix x_k^tm, known before the call, and
the read-out z_t = S_t q_t is the raw one (before GroupNorm and the bonus).

Sparse routing ("MoE", off by default): the M parameter tokens form E contiguous groups of M / E; each token
keeps the top-k groups ranked by the mean relu^2 score of the group and zeroes the other scores.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .rwkv7 import TimeMix, _layer_ratios, mix_init, orthogonal_, token_shift, token_shift_documents

__all__ = [
    "MetaStateTimeMix",
    "SelfStateEncoder",
    "MetaStateLayer",
    "resolve_sse_heads",
    "self_state_query",
    "sparse_route_scores",
]


def resolve_sse_heads(sse_heads: Union[int, float, None], num_heads: int) -> int:
    """How many heads (the first ones) feed the Self-State Encoder.

    ``None``: all heads; an int k in [0, H]: the first k heads; a float f in (0, 1]: the first round(f * H).
    """
    if sse_heads is None:
        return num_heads
    if isinstance(sse_heads, bool):
        raise TypeError(f"sse_heads must be None, an int or a float fraction, got {sse_heads!r}")
    if isinstance(sse_heads, int):
        if not 0 <= sse_heads <= num_heads:
            raise ValueError(f"sse_heads must be in [0, num_heads={num_heads}] heads, got {sse_heads}")
        return sse_heads
    if isinstance(sse_heads, float):
        if not 0.0 < sse_heads <= 1.0:
            raise ValueError(f"sse_heads as a fraction of the heads must be in (0, 1], got {sse_heads}")
        return max(1, int(round(sse_heads * num_heads)))
    raise TypeError(f"sse_heads must be None, an int or a float fraction, got {type(sse_heads).__name__}")


@functools.lru_cache(maxsize=64)
def _head_block_ids(num_heads: int, head_size: int, hidden_size: int) -> Tuple[int, ...]:
    if hidden_size % head_size != 0:
        raise ValueError(
            f"Meta-State ties each head to a block of head_size={head_size} channels: hidden_size={hidden_size} "
            "must be a multiple of head_size"
        )
    return tuple(h % (hidden_size // head_size) for h in range(num_heads))


# (ids, device) -> index tensor. Only real tensors made here, on an explicit device, outside inference mode: a
# tensor made under a model's meta-device context (from_pretrained builds models there) or under inference
# mode must never be what a later call reads.
_HEAD_BLOCK_TENSORS: dict = {}


def head_blocks(num_heads: int, head_size: int, hidden_size: int, device=None) -> torch.Tensor:
    """c(h) = h mod (C / N): the width block (N channels of the residual stream) tied to each head. [H] long on
    ``device`` (default CPU); kept per device, since it is read at every decoding step."""
    ids = _head_block_ids(num_heads, head_size, hidden_size)
    device = torch.device("cpu") if device is None else torch.device(device)
    key = (ids, device)
    blocks = _HEAD_BLOCK_TENSORS.get(key)
    if blocks is None:
        with torch.inference_mode(False):
            blocks = torch.tensor(ids, dtype=torch.long, device=device)
        if device.type != "meta":
            _HEAD_BLOCK_TENSORS[key] = blocks
    return blocks


def self_state_query(x_mix: torch.Tensor, num_heads: int, head_size: int) -> torch.Tensor:
    """The SSE query per head: q^(h) = L2normalize(x_mix[block c(h)]).

    x_mix: [B, T, C] (the time-mix key mix x_k^tm). Returns [B, T, H, N] (zero where the block is zero).
    """
    B, T, C = x_mix.shape
    blocks = F.normalize(x_mix.view(B, T, C // head_size, head_size), dim=-1, p=2.0, eps=1e-12)
    idx = head_blocks(num_heads, head_size, C, x_mix.device)
    return blocks.index_select(2, idx)


class MetaStateTimeMix(TimeMix):
    """RWKV-7 time-mix that also returns the Self-State Encoder read-out z_t = S_t q_t of its WKV state.

    Same parameters, initialisation and state as :class:`~wuneng.layers.rwkv7.TimeMix`; the only change is
    the second query (built by :func:`self_state_query` from the key mix) passed to the same WKV call.
    ``state_readout=False`` (no SSE head) skips the second query and returns None as the read-out.
    """

    def __init__(self, *args, state_readout: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.state_readout = state_readout

    def forward(
        self,
        x: torch.Tensor,
        v_first: Optional[torch.Tensor] = None,
        state: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        mask: Optional[torch.Tensor] = None,
        doc_start: Optional[torch.Tensor] = None,
    ):
        """x: [B,T,C] (the LN1 output); v_first [B,T,A] or None (first layer); state (shift [B,C], wkv
        [B,H,N,N]) or None; mask [B,T] or None; doc_start: bool [B,T] or None (documents of packed rows: the
        token shift and the WKV state restart there, as in :meth:`TimeMix.forward`).

        Returns (out [B,T,C], v_first [B,T,A], new state (shift, wkv), read-out [B,T,H,N] or None).

        One token without autograd on CPU takes the fused kernel with the self-state query
        (:func:`~wuneng.fused.one_token.time_mix_one_token`), as :class:`TimeMix` does.
        """
        shift, wkv_state = (None, None) if state is None else state
        fused = None
        if doc_start is None:
            fused = self._one_token_fused(x, v_first, shift, wkv_state, mask, self_state_query=self.state_readout)
        if fused is not None:  # decoding on CPU: one C call, the SSE read-out included
            out, v_first, new_state, *readout = fused
            return out, v_first, new_state, (readout[0].unsqueeze(1) if readout else None)
        x, xx, x_key, r, k, v, g, state_inputs = self.project(
            x, shift, mask, doc_start
        )  # x_key = x_k^tm, the SSE query's source
        log_w, k, v, a, b, v_first = self.wkv_inputs(x, xx, k, v, v_first, mask, **state_inputs)
        readout = None
        if self.state_readout:
            query = self_state_query(x_key, self.num_heads, self.head_size).to(r.dtype)
            y, wkv_state, readout = self.recur(r, log_w, k, v, a, b, wkv_state, extra_query=query, doc_start=doc_start)
            readout = readout.view(*r.shape[:2], self.num_heads, self.head_size)
        else:
            y, wkv_state = self.recur(r, log_w, k, v, a, b, wkv_state, doc_start=doc_start)
        y = self.read_out(y, r, k, v)
        return self.output(y * g), v_first, (x[:, -1], wkv_state), readout


class SelfStateEncoder(nn.Module):
    """Self-State Encoder (SSE): the WKV state of the layer, read as a matrix acting on the token.

    e_t[block c] = sum_{h in P, c(h) = c} eta_h * (S_t^(h) q_t^(h)), with P the first ``sse_heads`` heads.

    Parameters: ``eta`` [H, N] (paper: a per-channel scale of the read-out, zero at init; vectors, no matrix).
    Input: the read-out z = S_t q_t, [B, T, H, N]. Output: e, [B, T, C].
    """

    def __init__(self, hidden_size: int, num_heads: int, head_size: int, sse_heads: Union[int, float, None] = None):
        super().__init__()
        self.hidden_size, self.num_heads, self.head_size = hidden_size, num_heads, head_size
        self.num_sse_heads = resolve_sse_heads(sse_heads, num_heads)
        _head_block_ids(num_heads, head_size, hidden_size)  # checks that C is a multiple of N
        self.eta = nn.Parameter(torch.zeros(num_heads, head_size))  # eta

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.eta)

    def forward(self, readout: torch.Tensor) -> torch.Tensor:
        B, T, H, N = readout.shape
        if (H, N) != (self.num_heads, self.head_size):
            raise ValueError(
                f"SelfStateEncoder: expected a read-out [B, T, {self.num_heads}, {self.head_size}], got {tuple(readout.shape)}"
            )
        P = self.num_sse_heads
        contrib = readout[:, :, :P] * self.eta[:P].to(readout.dtype)  # [B, T, P, N]
        blocks = head_blocks(P, N, self.hidden_size, readout.device)  # c(h) for h in P
        e = readout.new_zeros(B, T, self.hidden_size // N, N).index_add(2, blocks, contrib)
        return e.view(B, T, self.hidden_size)


def sparse_route_scores(scores: torch.Tensor, num_groups: int, top_k: int) -> torch.Tensor:
    """Keep the relu^2 scores of each token's top-k parameter-token groups, zero the rest.

    scores: [..., M] (non-negative), M = E * (M / E) in E contiguous groups. A group's routing score is the
    mean of its scores; ties go to the lower group index (torch.topk). Returns [..., M].
    """
    M = scores.shape[-1]
    if M % num_groups != 0:
        raise ValueError(f"sparse routing: num_param_tokens={M} must be a multiple of moe_groups={num_groups}")
    grouped = scores.unflatten(-1, (num_groups, M // num_groups))
    chosen = grouped.mean(-1).topk(top_k, dim=-1).indices  # [..., k]
    keep = torch.zeros(grouped.shape[:-1], dtype=torch.bool, device=scores.device).scatter_(-1, chosen, True)
    return (grouped * keep.unsqueeze(-1).to(scores.dtype)).flatten(-2)


class MetaStateLayer(nn.Module):
    """Meta-State layer: Self-State Encoder + relu^2 token-parameter interaction (replaces the channel-mix).

    Parameters: ``x_k`` [C] (mu_k, the token-shift mix, init as RWKV-7's channel-mix); ``param_keys`` [M, C]
    (K_P, orthogonal gain 1 like W_key) and ``param_values`` [M, C] (V_P, zero like W_value); ``sse.eta``.
    Sparse routing: ``moe_groups`` E > 1 groups of M / E tokens, ``moe_top_k`` of them used per token.

    State for decoding: shift [B, C], the last input token (the cache's ``channel_shift``).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_size: int,
        num_param_tokens: Optional[int] = None,
        layer_idx: int = 0,
        num_layers: int = 1,
        *,
        sse_heads: Union[int, float, None] = None,
        moe_groups: int = 1,
        moe_top_k: int = 1,
    ):
        super().__init__()
        M = 4 * hidden_size if num_param_tokens is None else num_param_tokens
        if M <= 0:
            raise ValueError(f"MetaStateLayer: num_param_tokens must be positive, got {M}")
        if moe_groups < 1 or M % moe_groups != 0:
            raise ValueError(
                f"MetaStateLayer: moe_groups must be >= 1 and divide num_param_tokens={M}, got {moe_groups}"
            )
        if moe_groups > 1 and not 1 <= moe_top_k <= moe_groups:
            raise ValueError(f"MetaStateLayer: moe_top_k must be in [1, moe_groups={moe_groups}], got {moe_top_k}")
        self.hidden_size, self.num_param_tokens = hidden_size, M
        self.layer_idx, self.num_layers = layer_idx, num_layers
        self.moe_groups, self.moe_top_k = moe_groups, moe_top_k
        self.x_k = nn.Parameter(torch.empty(hidden_size))  # mu_k
        self.param_keys = nn.Parameter(torch.empty(M, hidden_size))  # K_P
        self.param_values = nn.Parameter(torch.empty(M, hidden_size))  # V_P
        self.sse = SelfStateEncoder(hidden_size, num_heads, head_size, sse_heads)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """RWKV-7's channel-mix init (SPEC section 2) for mu_k, K_P (= W_key) and V_P (= W_value^T); eta = 0."""
        _, r1 = _layer_ratios(self.layer_idx, self.num_layers)
        self.x_k.copy_(mix_init(self.hidden_size, r1**4))
        orthogonal_(self.param_keys, 1.0)
        nn.init.zeros_(self.param_values)
        self.sse.reset_parameters()

    @property
    def sparse(self) -> bool:
        return self.moe_groups > 1 and self.moe_top_k < self.moe_groups

    def forward(
        self,
        x: torch.Tensor,
        readout: Optional[torch.Tensor] = None,
        shift: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        doc_start: Optional[torch.Tensor] = None,
    ):
        """x: [B,T,C] (LN2 output); readout: [B,T,H,N] (S_t q_t from this layer's time-mix) or None (no SSE);
        shift: [B,C] or None; mask: [B,T] or None; doc_start: bool [B,T] or None (documents of packed rows: the
        token shift brings zeros there). Returns (out [B,T,C], new shift [B,C])."""
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"MetaStateLayer: expected x of shape [B, T, {self.hidden_size}], got {tuple(x.shape)}")
        if mask is not None:
            x = x * mask.to(x.dtype).unsqueeze(-1)
        xx = token_shift(x, shift) if doc_start is None else token_shift_documents(x, shift, doc_start=doc_start)
        key = x + xx * self.x_k  # x_k
        if readout is not None and self.sse.num_sse_heads > 0:
            key = key + self.sse(readout)  # key_t = x_k + e_t
        scores = torch.relu(key @ self.param_keys.t()) ** 2  # Theta(key K_P^T), [B, T, M]
        if self.sparse:
            scores = sparse_route_scores(scores, self.moe_groups, self.moe_top_k)
        return scores @ self.param_values, x[:, -1]
