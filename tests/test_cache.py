"""RecurrentStateCache: named per-layer states, batch operations, hybrid KV layers, transformers hooks."""

import pytest
import torch
from transformers.cache_utils import Cache, DynamicLayer

from wuneng.cache import RecurrentStateCache


def filled_cache(batch: int = 3) -> RecurrentStateCache:
    cache = RecurrentStateCache(2)
    for i in range(2):
        # row b holds the value b (+ 10 * layer) so that batch moves are visible
        rows = torch.arange(batch, dtype=torch.float32) + 10 * i
        cache.set_state(i, "shift", rows[:, None].expand(batch, 4).clone())
        cache.set_state(i, "wkv", rows[:, None, None, None].expand(batch, 2, 3, 3).clone())
    cache.advance(7)
    return cache


def test_state_access_and_sizes():
    cache = RecurrentStateCache(2)
    assert isinstance(cache, Cache) and len(cache) == 2
    assert cache.get_state(0, "wkv") is None and cache.batch_size == -1 and cache.get_seq_length() == 0
    cache = filled_cache()
    assert cache.batch_size == 3 and cache.get_seq_length() == 7
    assert cache.nbytes() == 2 * (3 * 4 + 3 * 2 * 9) * 4
    assert not cache.is_compileable and not cache.is_croppable
    assert set(cache.layer_states(1)) == {"shift", "wkv"}


def test_reorder_select_repeat():
    cache = filled_cache()
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    assert cache.get_state(0, "shift")[:, 0].tolist() == [2, 0, 0]
    assert cache.get_state(1, "wkv")[:, 0, 0, 0].tolist() == [12, 10, 10]
    cache = filled_cache()
    cache.batch_select_indices(torch.tensor([1, 2]))
    assert cache.get_state(1, "shift")[:, 0].tolist() == [11, 12] and cache.batch_size == 2
    cache.batch_repeat_interleave(2)
    assert cache.get_state(0, "wkv")[:, 0, 0, 0].tolist() == [1, 1, 2, 2]


def test_reset_detach_crop():
    cache = filled_cache()
    x = torch.ones(3, 4, requires_grad=True)
    cache.set_state(0, "shift", x * 2)
    assert cache.get_state(0, "shift").requires_grad
    cache.detach_()
    assert not cache.get_state(0, "shift").requires_grad
    cache.crop(0)  # allowed: nothing to roll back
    with pytest.raises(ValueError, match="cannot be rolled back"):
        cache.crop(-1)
    cache.reset()
    assert cache.get_state(0, "shift") is None and cache.get_seq_length() == 0 and cache.batch_size == -1


def test_bad_use():
    with pytest.raises(ValueError, match="positive int"):
        RecurrentStateCache(0)
    with pytest.raises(ValueError, match="2 cache layers"):
        RecurrentStateCache(3, layers=[DynamicLayer(), DynamicLayer()])
    cache = filled_cache()
    with pytest.raises(IndexError, match=r"\[0, 2\)"):
        cache.get_state(2, "wkv")
    with pytest.raises(ValueError, match="batch 4, but the cache holds batch 3"):
        cache.set_state(0, "other", torch.zeros(4, 1))
    with pytest.raises(TypeError, match="torch.Tensor"):
        cache.set_state(0, "other", [1.0])
    with pytest.raises(ValueError, match="batch dimension"):
        cache.set_state(0, "other", torch.tensor(1.0))


def test_hybrid_layers_share_the_batch_operations():
    """A hybrid cache: attention keys/values in DynamicLayers beside the recurrent states."""
    cache = RecurrentStateCache(2, layers=[DynamicLayer(), DynamicLayer()])
    keys = torch.arange(3.0)[:, None, None, None].expand(3, 1, 5, 2).clone()
    for i in range(2):
        cache.update(keys, keys.clone(), i)
        cache.set_state(i, "wkv", torch.arange(3.0)[:, None])
    assert cache.get_seq_length() == 5 and cache.get_mask_sizes(1, 0) == (6, 0)
    assert cache.nbytes() == 2 * (2 * 3 * 5 * 2 + 3) * 4
    cache.reorder_cache(torch.tensor([1, 1, 0]))
    assert cache.layers[0].keys[:, 0, 0, 0].tolist() == [1, 1, 0]
    assert cache.get_state(1, "wkv")[:, 0].tolist() == [1, 1, 0]
