"""RecurrentStateCache: named per-layer states, batch operations, hybrid KV layers, transformers hooks."""

import pytest
import torch
from transformers.cache_utils import Cache, DynamicLayer

from wuneng.cache import GrowingKVLayer, RecurrentStateCache


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


# -- GrowingKVLayer ------------------------------------------------------------------------------------------
def _kv(generator, batch, length, heads=2, dim=3):
    return (
        torch.randn(batch, heads, length, dim, generator=generator),
        torch.randn(batch, heads, length, dim, generator=generator),
    )


def test_growing_kv_layer_equals_dynamic_layer_through_growth_and_batch_operations():
    """In-place appends into a buffer with spare room give the same keys/values as concatenation, across
    reallocations (to ``needed + needed // growth_divisor`` rounded up to the chunk), beam reordering, batch
    selection/repetition and crop."""
    g = torch.Generator().manual_seed(0)
    grow, ref = GrowingKVLayer(), DynamicLayer()
    saved = GrowingKVLayer.min_capacity, GrowingKVLayer.growth_divisor
    GrowingKVLayer.min_capacity, GrowingKVLayer.growth_divisor = 4, 4  # chunk 4, a quarter spare: visible growth
    try:
        capacities = []
        for step, length in enumerate([3, 1, 1, 2, 1, 5, 1, 20]):
            k, v = _kv(g, 3, length)
            kg, vg = grow.update(k, v)
            kr, vr = ref.update(k, v)
            assert torch.equal(kg, kr) and torch.equal(vg, vr), step
            assert grow.get_seq_length() == ref.get_seq_length() == kr.shape[-2]
            capacities.append(grow.capacity)
        # 3, 4, 5, 7, 8, 13, 14, 34 positions: reallocated at 5 (5 + 1 -> 8), 13 (13 + 3 -> 16), 34 (34 + 8 -> 44);
        # doubling would have given 34 at the last step
        assert capacities == [4, 4, 8, 8, 8, 16, 16, 44]
        assert grow.nbytes() == 2 * 3 * 2 * 44 * 3 * 4
        beams = torch.tensor([2, 0, 0])
        grow.reorder_cache(beams)
        ref.reorder_cache(beams)
        assert grow.capacity == 44 and torch.equal(grow.keys, ref.keys) and torch.equal(grow.values, ref.values)
        grow.batch_repeat_interleave(2)
        ref.batch_repeat_interleave(2)
        grow.batch_select_indices(torch.tensor([0, 3, 5]))
        ref.batch_select_indices(torch.tensor([0, 3, 5]))
        grow.crop(-4)
        ref.crop(-4)
        k, v = _kv(g, 3, 2)
        kg, vg = grow.update(k, v)
        kr, vr = ref.update(k, v)
        assert torch.equal(kg, kr) and torch.equal(vg, vr) and grow.get_seq_length() == 32
        grow.reset()
        assert grow.get_seq_length() == 0 and grow.nbytes() == 0 and grow.keys is None
    finally:
        GrowingKVLayer.min_capacity, GrowingKVLayer.growth_divisor = saved


def _storage_bytes(*tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (the test's own count: a view counts its whole storage)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def test_growing_kv_layer_holds_at_most_a_sixteenth_more_than_dynamic_layer_plus_one_chunk():
    """Memory bound of the growth rule, with the defaults (chunk 256, growth_divisor 16): a 300-token prefill,
    then one token at a time up to 3000 tokens; at every step the storage behind the keys and values is at most
    the storage behind ``DynamicLayer``'s (exactly the tokens held, what the teacher's cache holds) times 17/16
    plus 256 positions. The rule before (doubling when full) held 1024 positions for 513 tokens (2x) and fails."""
    g = torch.Generator().manual_seed(0)
    grow, ref = GrowingKVLayer(), DynamicLayer()
    position_bytes = 2 * 1 * 2 * 3 * 4  # keys and values, batch 1, 2 heads, dim 3, float32
    k, v = _kv(g, 1, 300)
    grow.update(k, v)
    ref.update(k, v)
    k, v = _kv(g, 1, 2700)
    worst, reallocations, last_capacity = 0.0, 0, grow.capacity
    for t in range(2700):
        kg, vg = grow.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
        kr, vr = ref.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
        held, teacher = _storage_bytes(kg, vg), _storage_bytes(kr, vr)
        assert teacher == kr.shape[-2] * position_bytes
        assert held <= teacher + teacher // 16 + 256 * position_bytes, (kr.shape[-2], held / teacher)
        assert held == grow.nbytes() and grow.capacity <= GrowingKVLayer.held_positions_bound(kr.shape[-2])
        worst = max(worst, held / teacher)
        reallocations += grow.capacity != last_capacity
        last_capacity = grow.capacity
    assert torch.equal(kg, kr) and torch.equal(vg, vr)
    assert worst <= 1.0625 + 256 / 301
    # 300 -> 512 -> 768 -> ... -> 2816 -> 3072: below 4096 tokens each step is one chunk (256 > needed / 16)
    assert reallocations == 11 and grow.capacity == 3072


def test_growing_kv_layer_concatenates_under_autograd():
    """With grad, earlier keys saved by an attention call must not be overwritten in place: backward through two
    updates works and the gradients equal those through DynamicLayer."""
    g = torch.Generator().manual_seed(1)
    parts = [_kv(g, 1, n) for n in (4, 1)]
    grads = []
    for layer in (GrowingKVLayer(), DynamicLayer()):
        leaves = [(k.clone().requires_grad_(), v.clone().requires_grad_()) for k, v in parts]
        loss = 0
        for k, v in leaves:
            keys, values = layer.update(k, v)
            loss = loss + (keys.sin() * values).sum()
        loss.backward()
        grads.append([t.grad for pair in leaves for t in pair])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_growing_kv_layer_continues_outside_inference_mode():
    """A prefill under torch.inference_mode() followed by decoding under no_grad: the buffers made in inference
    mode cannot be written outside it, so the layer moves to fresh ones (same keys/values as concatenation)."""
    g = torch.Generator().manual_seed(2)
    grow, ref = GrowingKVLayer(), DynamicLayer()
    first, second = _kv(g, 1, 5), _kv(g, 1, 1)
    with torch.inference_mode():
        grow.update(*first)
    ref.update(*first)
    with torch.no_grad():
        keys, values = grow.update(*second)
    kr, vr = ref.update(*second)
    assert torch.equal(keys, kr) and torch.equal(values, vr)


def test_growing_kv_layer_never_writes_into_tensors_it_adopted_under_autograd():
    """After an autograd-path update (the caller's tensors are adopted as buffers) and a crop, a no-grad update
    must go to fresh buffers: writing in place would change the caller's keys (and tensors saved for backward)."""
    g = torch.Generator().manual_seed(3)
    layer = GrowingKVLayer()
    k, v = (t.requires_grad_() for t in _kv(g, 1, 4))
    layer.update(k, v)
    layer.crop(-2)
    before = k.detach().clone()
    with torch.no_grad():
        k2, v2 = _kv(g, 1, 1)
        keys, values = layer.update(k2, v2)
    assert torch.equal(k.detach(), before)
    assert torch.equal(keys, torch.cat([before[..., :2, :], k2], dim=-2))
    assert layer.capacity >= 3 and not keys.requires_grad


def test_growing_kv_layer_crop_accepts_a_positive_length_like_dynamic_layer_max_length():
    """crop(n > 0) keeps the first n positions (transformers' DynamicLayer.crop(max_length) before version 5; the
    pinned version refuses a positive value, so the reference is its equivalent negative crop); a length at or
    beyond the held positions changes nothing; crop(-n) drops n positions as DynamicLayer.crop(-n) does."""
    g = torch.Generator().manual_seed(4)
    k, v = _kv(g, 2, 7)
    for length in (5, 1, 7, 9, -3, -7):
        grow, ref = GrowingKVLayer(), DynamicLayer()
        grow.update(k, v)
        ref.update(k, v)
        grow.crop(length)
        if length > 0:
            if length < 7:
                ref.crop(length - 7)
        else:
            ref.crop(length)
        expected = min(length, 7) if length > 0 else 7 + length
        assert grow.get_seq_length() == ref.get_seq_length() == expected, length
        assert torch.equal(grow.keys, ref.keys) and torch.equal(grow.values, ref.values), length
        # decoding continues after the crop exactly as with the reference
        k2, v2 = _kv(g, 2, 1)
        kg, vg = grow.update(k2, v2)
        kr, vr = ref.update(k2, v2)
        assert torch.equal(kg, kr) and torch.equal(vg, vr), length
    with pytest.raises(TypeError, match="int number of positions"):
        GrowingKVLayer().crop(2.0)


def test_wuneng_model_keeps_a_given_cache_with_use_cache_false_like_llama():
    """transformers' LlamaModel reads and updates a cache passed as past_key_values even with use_cache=False
    (use_cache only decides whether a new cache is made) and returns it; WuNengModel does the same: the same
    cache object comes back holding the prompt, and continuing from it equals the full forward. Without a cache,
    use_cache=False returns none, for both."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from wuneng.models.wuneng import WuNengForCausalLM

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64,
    )).eval()  # fmt: skip
    student = WuNengForCausalLM.from_teacher(teacher, middle_heads=1).eval()
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    for model, cache in ((teacher, DynamicCache()), (student, student.new_cache())):
        name = type(model).__name__
        with torch.no_grad():
            full = model(ids, use_cache=False)
            first = model(ids[:, :6], past_key_values=cache, use_cache=False)
            assert first.past_key_values is cache and cache.get_seq_length() == 6, name
            rest = model(ids[:, 6:], past_key_values=cache, use_cache=False)
        assert rest.past_key_values is cache and cache.get_seq_length() == 9, name
        assert full.past_key_values is None, name
        assert (rest.logits - full.logits[:, 6:]).abs().max() <= 1e-5 * full.logits.abs().max(), name
