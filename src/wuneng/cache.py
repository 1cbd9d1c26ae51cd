"""Recurrent-state cache for ``generate()`` and for carrying state across forward calls.

A recurrent model (RWKV-7) keeps, per layer, a few fixed-size tensors instead of a growing key/value cache.
:class:`RecurrentStateCache` stores them as *named* tensors per layer, each with the batch on dim 0, so that
batch selection and beam reordering are one generic ``index_select`` and the memory does not grow with the
context. It is a :class:`transformers.Cache`, so ``generate()`` accepts it as ``past_key_values``, calls
``get_seq_length()``, ``reorder_cache(beam_idx)`` (beam search), ``batch_repeat_interleave`` /
``batch_select_indices`` (contrastive search and friends) on it, and never tries to compile it or roll it back
(``is_compileable`` and ``is_croppable`` are False).

Hybrid models: each entry of ``cache.layers`` is a transformers cache layer. For a pure recurrent model it is
a :class:`transformers.cache_utils.DummyLayer` (no keys/values). A hybrid model (attention + state heads)
passes its own layers, e.g. :class:`GrowingKVLayer` (a ``DynamicLayer`` that appends in place instead of
concatenating) for the attention part, and uses ``cache.update(k, v, i)``
(the ordinary transformers API) beside ``get_state``/``set_state``; every batch operation below acts on both.

State names used by RWKV-7 (``wuneng.models.rwkv7``), per layer:

=================  ===============  ================================================================
name               shape            meaning
=================  ===============  ================================================================
``time_shift``     [B, C]           last LN1 output seen by the time-mix (token shift)
``wkv``            [B, H, N, N]     WKV-7 state, float32, ``S[i, j]``: value index i, key index j
``channel_shift``  [B, C]           last LN2 output seen by the channel-mix
=================  ===============  ================================================================

API summary (all a model needs):

- ``RecurrentStateCache(num_layers, layers=None)``: an empty cache.
- ``get_state(layer_idx, name) -> Tensor | None`` (None: nothing stored yet, i.e. the zero/initial state);
  ``set_state(layer_idx, name, tensor)`` replaces it (old tensor freed, so the size stays constant).
  A state is stored as an *owned* tensor: a view into a larger tensor (``x[:, -1]`` of a [B, T, C] layer
  input) is copied, so that the cache never keeps the activations it was cut from (:func:`owned_state`).
- ``advance(num_tokens)``: the model calls it once per forward; ``get_seq_length()`` returns the total.
- ``reorder_cache(beam_idx)``, ``batch_select_indices(idx)``, ``batch_repeat_interleave(r)``: batch ops.
- ``derived_weights``: the weights the layers derive from their parameters (stacked LoRAs) for this decoding
  session; a model's forward builds them at its first no-grad call with this cache and reuses them per token
  (:mod:`wuneng.layers.low_rank` gives the rule). Not counted by ``nbytes()`` (they are parameter-sized).
- ``reset()`` forgets everything (derived weights included); ``detach_()`` cuts the autograd graph (truncated BPTT);
  ``nbytes()`` the memory held (the storage behind every tensor, each storage counted once); ``batch_size`` the batch of the stored states (-1 when empty).
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from .layers.low_rank import DerivedWeights

try:
    from transformers.cache_utils import DummyLayer
except ImportError:  # older transformers (5.17 has none): the same contract, written here

    class DummyLayer:
        """The cache layer of a layer that keeps no keys or values: holds nothing, and every cache operation on
        it (reset, crop, reorder, batch selection) does nothing."""

        is_compileable = True
        is_croppable = True
        is_sliding = False
        supports_early_init = False

        def __init__(self, **kwargs):
            self.is_initialized = True
            self.keys = self.values = None

        def update(self, key_states, value_states, *args, **kwargs):
            if key_states is None and value_states is None:  # what a DDP cache rebuild passes
                return None, None
            raise NotImplementedError("this layer keeps no keys or values; it cannot be updated")

        def get_seq_length(self) -> int:
            return 0

        def get_max_length(self) -> int:
            return -1

        def _nothing(self, *args, **kwargs) -> None:
            return None

        offload = prefetch = reset = crop = reorder_cache = batch_repeat_interleave = batch_select_indices = _nothing


__all__ = ["RecurrentStateCache", "GrowingKVLayer", "RWKV7_STATE_NAMES", "owned_state", "storage_nbytes"]

# The per-layer state names of an RWKV-7 block (see the module docstring).
RWKV7_STATE_NAMES = ("time_shift", "wkv", "channel_shift")


def owned_state(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself when it is contiguous and alone in a storage of exactly its size, else a contiguous copy.

    A token-shift state is ``x[:, -1]``, a [B, C] view of a [B, T, C] layer input: storing the view would keep
    the whole input (T times the state) alive as long as the cache. The copy is differentiable (``clone``), so
    a cache used under autograd (truncated BPTT) still carries gradients. One decoded token (T = 1) gives a
    view that already owns its storage: no copy.
    """
    nbytes = tensor.numel() * tensor.element_size()
    if (
        tensor.is_contiguous()
        and tensor.storage_offset() == 0
        and tensor.device.type != "meta"
        and tensor.untyped_storage().nbytes() == nbytes
    ):
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def storage_nbytes(tensors) -> int:
    """Bytes of the storages behind ``tensors`` (None entries skipped), each storage counted once: what keeping
    these tensors alive really costs (a view counts its whole storage, spare room included)."""
    seen = set()
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr(), storage.nbytes())
        if storage.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


class GrowingKVLayer(DynamicLayer):
    """A key/value cache layer whose tensors live in a buffer with spare room, grown in small geometric steps.

    transformers' ``DynamicLayer`` concatenates on every ``update``: one decoded token copies the whole cache
    (2 x B x H_kv x S x d values per layer), which at batch 1 costs more than the attention that reads it.
    Here a token is written in place into ``[B, H_kv, capacity, d]`` buffers and ``keys``/``values`` are the
    views ``buffer[:, :, :S]``. The first update allocates ``max(min_capacity, T)`` positions (a long prefill:
    exactly its T); when the room runs out the buffers are reallocated at :meth:`grown_capacity` of the positions
    needed, ``needed + needed // growth_divisor`` rounded up to a multiple of :attr:`min_capacity`. So after S
    appended positions the buffers hold at most ``S + S // 16 + 256`` positions (the bound
    :meth:`held_positions_bound`; ``DynamicLayer`` holds exactly S, so at most 1.0625x the teacher's bytes plus
    256 positions), and a sequence of S tokens copies about 17 S positions in all (a geometric series) instead
    of ``DynamicLayer``'s O(S^2). Doubling (the rule before) held up to 2x the teacher's bytes. Measured at
    Qwen2.5-0.5B key/value shapes (``benchmarks/hybrid_real.py --kv-growth``: 24 layers, 1024 to 8256 tokens one at
    a time, 1 thread, machine loaded, load average 5.5): 1.66 ms of appends per token against 1.48 ms doubling
    (+0.18 ms, about 0.1% of a decoded token at those shapes), holding 1.085x the teacher's bytes against 1.98x.

    Under autograd (any input requiring grad while grad mode is on) it concatenates like ``DynamicLayer``: an
    in-place write would bump the version of a buffer that an earlier attention call saved for backward.
    The views returned by :meth:`update` are only valid until the next ``update`` (as with any cache).
    """

    #: smallest capacity (positions) of a buffer, and the granularity of a reallocation: prefill of a short prompt
    #: leaves room for this many tokens
    min_capacity = 256
    #: a reallocation adds ``needed // growth_divisor`` spare positions (then rounds up to ``min_capacity``)
    growth_divisor = 16

    @classmethod
    def grown_capacity(cls, needed: int) -> int:
        """The capacity a reallocation for ``needed`` positions allocates: ``needed + needed // growth_divisor``
        rounded up to a multiple of :attr:`min_capacity`."""
        chunk = cls.min_capacity
        return -(-(needed + needed // cls.growth_divisor) // chunk) * chunk

    @classmethod
    def held_positions_bound(cls, length: int) -> int:
        """The most positions the buffers hold after ``length`` positions were appended (crop aside):
        ``length + length // growth_divisor + min_capacity``."""
        return length + length // cls.growth_divisor + cls.min_capacity

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._key_buffer: Optional[torch.Tensor] = None
        self._value_buffer: Optional[torch.Tensor] = None
        self._length = 0
        self._adopted = False  # the buffers are tensors from the autograd path: never written in place

    @property
    def capacity(self) -> int:
        """Positions the buffers can hold before the next reallocation (0 when empty)."""
        return 0 if self._key_buffer is None else self._key_buffer.shape[-2]

    def _set_buffers(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        self._key_buffer, self._value_buffer, self._length = keys, values, length
        self.keys, self.values = keys[..., :length, :], values[..., :length, :]

    def _grown(self, buffer: torch.Tensor, capacity: int) -> torch.Tensor:
        shape = buffer.shape[:-2] + (capacity, buffer.shape[-1])
        new = buffer.new_empty(shape)
        new[..., : self._length, :].copy_(buffer[..., : self._length, :])
        return new

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append key/value states [B, H_kv, T, d]; returns all cached keys and values [B, H_kv, S, d] (views)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        T = key_states.shape[-2]
        if torch.is_grad_enabled() and (
            key_states.requires_grad
            or value_states.requires_grad
            or (self.keys is not None and self.keys.requires_grad)
        ):
            keys, values = key_states, value_states
            if self._length > 0:
                keys = torch.cat([self.keys, key_states], dim=-2)
                values = torch.cat([self.values, value_states], dim=-2)
            self._set_buffers(keys, values, keys.shape[-2])
            self._adopted = True
            return self.keys, self.values
        if self._key_buffer is not None and self._key_buffer.is_inference() and not torch.is_inference_mode_enabled():
            # buffers made under torch.inference_mode() cannot be written outside it: continue in fresh ones
            self._key_buffer, self._value_buffer = self._key_buffer.clone(), self._value_buffer.clone()
        if self._key_buffer is None or self._length == 0:
            capacity = max(self.min_capacity, T)
            self._key_buffer = key_states.new_empty(key_states.shape[:-2] + (capacity, key_states.shape[-1]))
            self._value_buffer = value_states.new_empty(value_states.shape[:-2] + (capacity, value_states.shape[-1]))
            self._length = 0
        elif self._adopted or self._length + T > self.capacity:
            # small steps, not doubling: the held room stays within 1/16 (+ one chunk) of what is used
            capacity = max(self.grown_capacity(self._length + T), self.min_capacity)
            self._key_buffer, self._value_buffer = (
                self._grown(self._key_buffer, capacity),
                self._grown(self._value_buffer, capacity),
            )
        self._adopted = False
        end = self._length + T
        self._key_buffer[..., self._length : end, :].copy_(key_states)
        self._value_buffer[..., self._length : end, :].copy_(value_states)
        self._set_buffers(self._key_buffer, self._value_buffer, end)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._length

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        self._length = 0
        self._adopted = False
        # dropped, not zeroed (transformers 5.17 DynamicLayer.reset zeroes them in place and keeps the memory)
        self.keys = self.values = None
        self.is_initialized = False
        super().reset()

    def crop(self, length: int) -> None:
        """A negative ``length`` drops the last ``-length`` positions (transformers 5's ``DynamicLayer.crop``); a
        positive one keeps the first ``length`` positions (the older ``DynamicLayer.crop(max_length)``: nothing
        happens when at most ``length`` are held); 0 does nothing. The buffers keep their room."""
        if isinstance(length, bool) or not isinstance(length, int):
            raise TypeError(f"GrowingKVLayer.crop: expected an int number of positions, got {length!r}")
        if length == 0 or self._key_buffer is None:
            return
        keep = self._length + length if length < 0 else min(length, self._length)
        self._set_buffers(self._key_buffer, self._value_buffer, max(keep, 0))

    def _map_buffers(self, fn) -> None:
        if self._key_buffer is not None and self._length > 0:
            self._set_buffers(fn(self._key_buffer), fn(self._value_buffer), self._length)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row b becomes row ``beam_idx[b]`` (the buffers keep their spare room)."""
        self._map_buffers(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_buffers(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_buffers(lambda t: t[indices, ...])

    def nbytes(self) -> int:
        """Bytes of the storage held by the keys and values (spare room included)."""
        return storage_nbytes(self._held_tensors())

    def _held_tensors(self) -> list:
        if self._key_buffer is not None:
            return [self._key_buffer, self._value_buffer]
        return [self.keys, self.values]

    def offload(self):
        self._map_buffers(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self._key_buffer is not None and self._key_buffer.device != self.device:
            self._map_buffers(lambda t: t.to(self.device, non_blocking=True))


class RecurrentStateCache(Cache):
    """Constant-size per-layer recurrent state (plus, optionally, per-layer transformers KV layers).

    Args:
        num_layers: number of model layers (each gets a state dictionary).
        layers: optional list of ``num_layers`` transformers cache layers (e.g. ``DynamicLayer()`` for the
            attention half of a hybrid layer). Default: a ``DummyLayer`` per layer (no key/value cache).

    Every stored tensor has the batch on dim 0. A tensor that owns its storage is stored as given; a view into a
    larger tensor is copied (:func:`owned_state`). A model replaces the states with ``set_state`` after each
    forward, so memory stays constant however many tokens pass.
    """

    def __init__(self, num_layers: int, layers: Optional[Sequence] = None):
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers <= 0:
            raise ValueError(f"RecurrentStateCache: num_layers must be a positive int, got {num_layers!r}")
        if layers is None:
            layers = [DummyLayer() for _ in range(num_layers)]
        elif len(layers) != num_layers:
            raise ValueError(f"RecurrentStateCache: got {len(layers)} cache layers for num_layers={num_layers}")
        super().__init__(layers=list(layers))
        self.states: List[Dict[str, torch.Tensor]] = [{} for _ in range(num_layers)]
        self.seen_tokens = 0
        # the weights the layers derive from their parameters for this decoding session (stacked LoRAs...):
        # built at the first no-grad forward with this cache, reused per token (wuneng.layers.low_rank)
        self.derived_weights = DerivedWeights()

    # -- state access ---------------------------------------------------------------------------------
    def _check_layer(self, layer_idx: int) -> None:
        if not 0 <= layer_idx < len(self.states):
            raise IndexError(f"RecurrentStateCache: layer_idx must be in [0, {len(self.states)}), got {layer_idx}")

    def get_state(self, layer_idx: int, name: str) -> Optional[torch.Tensor]:
        """The state ``name`` of layer ``layer_idx``, or None when nothing was stored (the initial state)."""
        self._check_layer(layer_idx)
        return self.states[layer_idx].get(name)

    def set_state(self, layer_idx: int, name: str, tensor: torch.Tensor) -> None:
        """Store (replace) the state ``name`` of layer ``layer_idx``; its dim 0 must be the batch. A view into a
        larger tensor is stored as a copy of its own size (:func:`owned_state`)."""
        self._check_layer(layer_idx)
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"RecurrentStateCache: state {name!r} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() == 0:
            raise ValueError(f"RecurrentStateCache: state {name!r} must have a batch dimension (dim 0), got a scalar")
        batch = self.batch_size
        if batch != -1 and tensor.shape[0] != batch:
            raise ValueError(
                f"RecurrentStateCache: state {name!r} of layer {layer_idx} has batch {tensor.shape[0]}, "
                f"but the cache holds batch {batch}"
            )
        self.states[layer_idx][name] = owned_state(tensor)

    def layer_states(self, layer_idx: int) -> Dict[str, torch.Tensor]:
        """All named states of one layer (a shallow copy of the dictionary)."""
        self._check_layer(layer_idx)
        return dict(self.states[layer_idx])

    def _num_states(self) -> int:
        return sum(len(s) for s in self.states)

    def _tensors(self) -> Iterator[torch.Tensor]:
        for layer_states in self.states:
            yield from layer_states.values()

    def advance(self, num_tokens: int) -> None:
        """Count ``num_tokens`` more tokens as seen (call once per forward, after all layers ran)."""
        self.seen_tokens += int(num_tokens)

    # -- the transformers Cache interface ---------------------------------------------------------------
    def _kv_layer(self, layer_idx: int):
        """The key/value layer ``layer_idx`` when it holds keys and values (not a DummyLayer), else None."""
        if 0 <= layer_idx < len(self.layers):
            layer = self.layers[layer_idx]
            if isinstance(layer, CacheLayerMixin) and not isinstance(layer, DummyLayer):
                return layer
        return None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far (padding included, like ``input_ids.shape[1]``). Attention layers, if any, count; a
        layer without keys and values (ARWKV, RWKV-7) answers with the tokens the model has seen."""
        layer = self._kv_layer(layer_idx)
        return self.seen_tokens if layer is None else layer.get_seq_length()

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> Tuple[int, int]:
        """(key length, key offset) of an attention mask for ``query_length`` new tokens: the layer's own for a
        key/value layer, else all the tokens seen plus the new ones."""
        layer = self._kv_layer(layer_idx)
        if layer is None:
            return self.seen_tokens + query_length, 0
        return layer.get_mask_sizes(query_length)

    @property
    def batch_size(self) -> int:
        """The batch of the stored states (or of the attention layers when no state is stored), -1 when empty."""
        for t in self._tensors():
            return t.shape[0]
        for layer in self.layers:
            keys = getattr(layer, "keys", None)
            if isinstance(keys, torch.Tensor) and keys.dim() > 0 and keys.numel() > 0:
                return keys.shape[0]
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        """A recurrent state cannot be rolled back token by token."""
        return False

    def _map_states(self, fn) -> None:
        for layer_states in self.states:
            for name, t in layer_states.items():
                layer_states[name] = owned_state(fn(t))  # a basic-indexing selection would be a view

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row b of the new cache is row ``beam_idx[b]`` of the old one."""
        super().reorder_cache(beam_idx)
        self._map_states(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows ``indices``."""
        super().batch_select_indices(indices)
        self._map_states(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times (row b becomes rows b*repeats ... b*repeats + repeats - 1)."""
        super().batch_repeat_interleave(repeats)
        self._map_states(lambda t: t.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        """Forget everything: the next forward starts from the initial (zero) state."""
        super().reset()
        for layer_states in self.states:
            layer_states.clear()
        self.seen_tokens = 0
        self.derived_weights.clear()

    def crop(self, tokens_to_remove: int) -> None:
        """Only ``crop(0)`` is possible: a recurrent state keeps no per-token history to roll back."""
        if tokens_to_remove != 0 and self._num_states() > 0:
            raise ValueError(
                f"RecurrentStateCache: cannot remove {abs(tokens_to_remove)} tokens, a recurrent state cannot be "
                "rolled back (assisted generation / speculative decoding are not supported)"
            )
        super().crop(tokens_to_remove)

    # -- utilities ---------------------------------------------------------------------------------------
    def detach_(self) -> "RecurrentStateCache":
        """Detach every stored state from the autograd graph in place (truncated backprop through time)."""
        self._map_states(lambda t: t.detach())
        return self

    def nbytes(self) -> int:
        """Bytes of the storage held by the recurrent states and by any attention keys/values (a
        :class:`GrowingKVLayer`'s spare room included), each storage counted once (:func:`storage_nbytes`)."""
        tensors = list(self._tensors())
        for layer in self.layers:
            if isinstance(layer, GrowingKVLayer):
                tensors += layer._held_tensors()
            else:
                tensors += [getattr(layer, "keys", None), getattr(layer, "values", None)]
        return storage_nbytes(tensors)

    def __repr__(self) -> str:
        names = sorted({n for s in self.states for n in s})
        return (
            f"{self.__class__.__name__}(num_layers={len(self.states)}, batch_size={self.batch_size}, "
            f"seen_tokens={self.seen_tokens}, states={names})"
        )
