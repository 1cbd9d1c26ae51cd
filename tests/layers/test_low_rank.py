"""low_rank_bank / derived_weight (wuneng.layers.low_rank): the batched no-grad evaluation of LoRA-shaped maps
against evaluating each map with its own matmuls."""

import pytest
import torch
import torch.nn as nn

from wuneng.layers.low_rank import LowRankMap, derived_weight, derived_weights_session, low_rank_bank


def one_by_one(m: LowRankMap, x: torch.Tensor) -> torch.Tensor:
    h = x @ m.first
    h = {None: h, "tanh": torch.tanh(h), "sigmoid": torch.sigmoid(h)}[m.mid]
    z = h @ m.second + (0 if m.bias is None else m.bias)
    return torch.sigmoid(z) if m.out_sigmoid else z


def make_maps(C=12, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    spec = [  # name, rank, width, bias, mid, out_sigmoid: ranks and widths differ, so padding is exercised
        ("decay", 4, 10, True, "tanh", True),
        ("alpha", 6, 10, True, None, True),
        ("gate", 3, 7, False, "sigmoid", False),
        ("middle", 6, 5, False, None, True),
        ("r", 2, 10, False, None, False),
    ]
    owner = nn.Module()
    maps = []
    for name, rank, width, bias, mid, out in spec:
        first = nn.Parameter(torch.randn(C, rank, generator=g, dtype=dtype))
        second = nn.Parameter(torch.randn(rank, width, generator=g, dtype=dtype))
        b = nn.Parameter(torch.randn(width, generator=g, dtype=dtype)) if bias else None
        for suffix, t in (("1", first), ("2", second), ("0", b)):
            if t is not None:
                owner.register_parameter(name + suffix, t)
        maps.append(LowRankMap(name, first, second, b, mid, out))
    return owner, maps


@pytest.mark.parametrize("lead", [(1,), (3,), (2, 5)])
def test_bank_equals_each_map_alone(lead):
    """float64, rel. error < 1e-13, for decode-shaped ([M, 1, C]) and sequence-shaped inputs."""
    owner, maps = make_maps()
    x = torch.randn(len(maps), *lead, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = low_rank_bank(owner, "bank", maps, x)
    assert list(out) == [m.name for m in maps]
    for i, m in enumerate(maps):
        ref = one_by_one(m, x[i]).detach()
        assert out[m.name].shape == ref.shape, m.name
        assert (out[m.name] - ref).abs().max() <= 1e-13 * ref.abs().max(), m.name


def test_stacked_weights_follow_in_place_updates():
    """Within a session the stacked copy is kept between calls and rebuilt when a source parameter changes in
    place (an optimizer step, load_state_dict); outside a session it is built every call."""
    owner, maps = make_maps()
    x = torch.randn(len(maps), 2, 12, dtype=torch.float64)
    with derived_weights_session() as store:
        before = low_rank_bank(owner, "bank", maps, x)
        stacked = store._store[(id(owner), "bank")][2][0]
        low_rank_bank(owner, "bank", maps, x)
        assert store._store[(id(owner), "bank")][2][0] is stacked and store.builds == 1  # reused
        with torch.no_grad():
            maps[2].second.mul_(2.0)
        after = low_rank_bank(owner, "bank", maps, x)
        assert store._store[(id(owner), "bank")][2][0] is not stacked and store.builds == 2
    ref = one_by_one(maps[2], x[2]).detach()
    assert (after["gate"] - ref).abs().max() <= 1e-13 * ref.abs().max()
    assert not torch.allclose(after["gate"], before["gate"])
    assert "_derived_weights" not in owner.__dict__  # nothing kept on the module itself
    assert torch.equal(low_rank_bank(owner, "bank", maps, x)["gate"], after["gate"])  # no session: built anew


def test_derived_weight_is_not_cached_under_autograd():
    """With autograd recording through the sources the result must be a fresh, differentiable build."""
    owner = nn.Module()
    w = nn.Parameter(torch.randn(3, 2))
    built = derived_weight(owner, "twice", [w], lambda: 2 * w)
    assert built.requires_grad and "_derived_weights" not in owner.__dict__
    built.sum().backward()
    assert torch.equal(w.grad, torch.full_like(w, 2.0))


def test_bank_rejects_a_row_count_that_does_not_match():
    owner, maps = make_maps()
    with pytest.raises(ValueError, match="inputs has 4 rows for 5 maps"):
        low_rank_bank(owner, "bank", maps, torch.randn(4, 1, 12, dtype=torch.float64))
