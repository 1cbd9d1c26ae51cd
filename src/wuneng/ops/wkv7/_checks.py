"""Input validation shared by every form of the WKV-7 operator.

Errors name the argument and say what was expected, so that a wrong layout is caught at the
boundary rather than deep inside a matmul.
"""

from __future__ import annotations

from typing import Optional

import torch

SEQ_NAMES = ("r", "log_w", "k", "v", "a", "b")


def check_wkv7_inputs(
    tensors: dict,
    initial_state: Optional[torch.Tensor],
    extra_query: Optional[torch.Tensor],
    *,
    step: bool = False,
) -> None:
    """Validate r, log_w, k, v, a, b ([B, T, H, N], or [B, H, N] when ``step``) and the state [B, H, N, N]."""
    rank = 3 if step else 4
    layout = "[B, H, N]" if step else "[B, T, H, N]"
    ref_name, ref = "r", tensors["r"]
    if not isinstance(ref, torch.Tensor):
        raise TypeError(f"wkv7: r must be a torch.Tensor, got {type(ref).__name__}")
    if ref.dim() != rank:
        raise ValueError(f"wkv7: r must have rank {rank} {layout}, got shape {tuple(ref.shape)}")
    if not ref.is_floating_point():
        raise TypeError(f"wkv7: r must be a floating-point tensor, got {ref.dtype}")
    items = dict(tensors)
    if extra_query is not None:
        items["extra_query"] = extra_query
    for name, t in items.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"wkv7: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != ref.shape:
            raise ValueError(
                f"wkv7: {name} must have the shape of {ref_name} {tuple(ref.shape)} {layout}, got {tuple(t.shape)}"
            )
        if t.device != ref.device:
            raise ValueError(
                f"wkv7: {name} is on {t.device} but {ref_name} is on {ref.device}; put all inputs on one device"
            )
        if t.dtype != ref.dtype and name != "log_w":
            raise TypeError(
                f"wkv7: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; all inputs but log_w must share a dtype"
            )
        if not t.is_floating_point():
            raise TypeError(f"wkv7: {name} must be floating point, got {t.dtype}")
    B, H, N = ref.shape[0], ref.shape[-2], ref.shape[-1]
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor):
            raise TypeError(f"wkv7: initial_state must be a torch.Tensor, got {type(initial_state).__name__}")
        if tuple(initial_state.shape) != (B, H, N, N):
            raise ValueError(
                f"wkv7: initial_state must have shape [B, H, N, N] = {(B, H, N, N)} (S[i, j]: value i, key j), "
                f"got {tuple(initial_state.shape)}"
            )
        if initial_state.device != ref.device:
            raise ValueError(f"wkv7: initial_state is on {initial_state.device} but r is on {ref.device}")
        if not initial_state.is_floating_point():
            raise TypeError(f"wkv7: initial_state must be floating point, got {initial_state.dtype}")


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The state (and the decay) are float32 whatever the activation dtype; float64 inputs keep float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def document_offsets(cu_seqlens, batch: int, seq_len: int) -> list:
    """Validate fla's ``cu_seqlens`` convention and return the offsets as Python ints.

    cu_seqlens: int32/int64 [n_docs + 1] cumulative document lengths ``[0, l_1, l_1 + l_2, ..., T]`` over a
    batch of one row ([1, T, H, N]) holding the documents one after the other. Empty documents are allowed.
    """
    expected = "int32/int64 [n_docs + 1] cumulative lengths [0, ..., T] over a batch of 1 packed row"
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"wkv7: cu_seqlens must be a torch.Tensor ({expected}), got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"wkv7: cu_seqlens must be {expected}; got dtype {cu_seqlens.dtype}, shape {tuple(cu_seqlens.shape)}"
        )
    offsets = [int(x) for x in cu_seqlens.tolist()]
    steps_ok = all(lo <= hi for lo, hi in zip(offsets, offsets[1:]))
    if batch != 1 or offsets[0] != 0 or offsets[-1] != seq_len or not steps_ok:
        raise ValueError(
            f"wkv7: cu_seqlens must be {expected}: start at 0, never decrease, end at T = {seq_len}, with B = 1; "
            f"got B = {batch}, cu_seqlens = {offsets[:8]}{' ...' if len(offsets) > 8 else ''}"
        )
    return offsets
