"""The RWKV-7 channel-mix and the few-row linear map (the language-model head) as multi-threaded C kernels
(wuneng.fused.channel_mix), each against its tensor-op reference computed in float64, and the layers' and the
model's decoding paths that take them.

Relative errors ||x - ref|| / ||ref||: 1e-12 for the float64 kernels (same arithmetic, another order); 1e-5 for
float32 kernels and for bfloat16 weights computed in float32 (against the float64 reference of the same rounded
weights and inputs); 1e-2 where an output is rounded to bfloat16 at the end (2^-9 relative per element).
"""

from __future__ import annotations

import pytest
import torch

from wuneng.fused import channel_mix as rows_mod
from wuneng.fused._abi import ChannelMixArgs, LinearArgs
from wuneng.fused.channel_mix import (
    channel_mix_one_token,
    channel_mix_one_token_reference,
    channel_mix_plan,
    linear_one_token,
    linear_one_token_reference,
)
from wuneng.fused.cpu import fused_kernel_available, fused_kernel_error
from wuneng.layers.rwkv7 import ChannelMix, head_logits

from _helpers import perturb_, rel_err

needs_kernel = pytest.mark.skipif(not fused_kernel_available(), reason=f"C kernel unavailable: {fused_kernel_error()}")


def make_case(B, C, F, seed=0, dtype=torch.float64):
    """x, shift [B, C], mix [C], W_key [F, C], W_value [C, F], mask [B] (every other row padding)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    mask = torch.tensor([1.0, 0.0] * B, dtype=torch.float64)[:B].to(dtype)
    mix = torch.rand(C, generator=g, dtype=torch.float64).to(dtype)
    return rnd(B, C), rnd(B, C), mix, rnd(F, C) / C**0.5, rnd(C, F) / F**0.5, mask


def _with_threads(n, fn):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(n)
        return fn()
    finally:
        torch.set_num_threads(before)


@needs_kernel
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("B,C,F", [(1, 64, 256), (3, 38, 152), (2, 200, 808), (8, 200, 808)], ids=str)
def test_channel_mix_kernel_matches_reference_float64(masked, B, C, F):
    # C = 38, F = 152 and C = 200, F = 808: neither width a multiple of the kernel's 16-row blocks or 4-row groups
    x, shift, mix, Wk, Wv, mask = make_case(B, C, F, seed=C)
    mask = mask if masked else None
    want = channel_mix_one_token_reference(x, shift, mix, Wk, Wv, mask)
    got = channel_mix_one_token(x, shift, mix, Wk, Wv, mask, impl="cpu")
    assert rel_err(got[0], want[0]) <= 1e-12
    assert torch.equal(got[1], want[1])  # the new shift is the masked token itself
    if masked and B > 1:  # a padding row: its shift is zero (it leaves the next token's shift as zeros)
        assert torch.all(got[1][1] == 0)


@needs_kernel
@pytest.mark.parametrize("B,O,I", [(1, 40, 48), (3, 70, 38), (2, 1000, 200), (8, 1000, 200)], ids=str)
def test_linear_kernel_matches_reference_float64(B, O, I):  # noqa: E741
    g = torch.Generator().manual_seed(O)
    x, W = torch.randn(B, I, generator=g, dtype=torch.float64), torch.randn(O, I, generator=g, dtype=torch.float64)
    assert rel_err(linear_one_token(x, W, impl="cpu"), x @ W.t()) <= 1e-12


@needs_kernel
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
def test_kernels_do_not_depend_on_the_thread_count(dtype, tol):
    """Rows split across torch's threads, each output element computed by one thread in the same order: 1 and 2
    threads agree exactly, and both agree with the float64 reference (bfloat16: of the rounded weights and inputs,
    the channel-mix output compared before its final rounding, i.e. with float32 activations)."""
    B, C, F = 2, 200, 808
    case64 = [t.to(dtype).double() for t in make_case(B, C, F, seed=3)]
    x64, shift64, mix64, Wk64, Wv64, mask64 = case64
    want_cm = channel_mix_one_token_reference(x64, shift64, mix64, Wk64, Wv64, mask64)
    want_lin = x64 @ Wk64.t()
    act = torch.float32 if dtype == torch.bfloat16 else dtype  # the kernel's activations
    x, shift, mix, mask = (t.to(act) for t in (x64, shift64, mix64, mask64))
    Wk, Wv = Wk64.to(dtype), Wv64.to(dtype)
    results = [
        _with_threads(
            n,
            lambda: (
                *channel_mix_one_token(x, shift, mix, Wk, Wv, mask, impl="cpu"),
                linear_one_token(x, Wk, impl="cpu"),
            ),
        )  # fmt: skip
        for n in (1, 2)
    ]
    for name, one, two, want in zip(("out", "shift", "linear"), *results, (*want_cm, want_lin)):
        assert torch.equal(one, two), name
        assert one.dtype == act and rel_err(one, want) <= tol, name


@needs_kernel
def test_bfloat16_activations_are_computed_in_float32():
    """bfloat16 weights with bfloat16 activations: the channel-mix returns bfloat16 (its float32 result rounded once,
    within 1e-2 of the float64 reference), the linear map float32 logits (within 1e-5: never rounded to bfloat16)."""
    x64, shift64, mix64, Wk64, Wv64, mask64 = (t.to(torch.bfloat16).double() for t in make_case(1, 64, 256, seed=4))
    bf = [t.to(torch.bfloat16) for t in (x64, shift64, mix64, Wk64, Wv64)]
    out, shift = channel_mix_one_token(*bf, impl="cpu")
    want = channel_mix_one_token_reference(x64, shift64, mix64, Wk64, Wv64)
    assert out.dtype == shift.dtype == torch.bfloat16
    assert rel_err(out, want[0]) <= 1e-2 and torch.equal(shift.double(), x64)
    y = linear_one_token(bf[0], bf[3], impl="cpu")
    assert y.dtype == torch.float32 and rel_err(y, x64 @ Wk64.t()) <= 1e-5


@needs_kernel
def test_the_kernels_are_given_torch_thread_count(monkeypatch):
    """The argument structs carry ``threads`` = torch.get_num_threads() (the OpenMP region's size)."""
    lib, seen = rows_mod._library(), []
    structs = {"channel_mix_one_token_": ChannelMixArgs, "linear_one_token_": LinearArgs}

    class Recording:  # the library, recording the threads field of each call
        def __getattr__(self, name):
            fn = getattr(lib, name)
            cls = next((c for prefix, c in structs.items() if name.startswith(prefix)), None)
            if cls is None:
                return fn
            at = cls.order.index("threads")
            return lambda args: (seen.append(cls.packer.unpack(args)[at]), fn(args))[1]

    monkeypatch.setattr(rows_mod, "_library", lambda: Recording())
    x, shift, mix, Wk, Wv, mask = make_case(2, 32, 64)
    for n in (1, 2):
        _with_threads(n, lambda: (channel_mix_one_token(x, shift, mix, Wk, Wv, mask, impl="cpu"),
                                  linear_one_token(x, Wk, impl="cpu")))  # fmt: skip
    assert seen == [1, 1, 2, 2]


def test_bad_input_names_the_problem():
    x, shift, mix, Wk, Wv, mask = make_case(2, 32, 64)
    with pytest.raises(ValueError, match=r"W_key must be \[F, C\], W_value \[C, F\]"):
        channel_mix_one_token(x, shift, mix, Wk, Wv.t().contiguous())
    with pytest.raises(ValueError, match=r"x must be \[B, C\] with C = 32"):
        channel_mix_one_token(x[:, :16], shift, mix, Wk, Wv)
    with pytest.raises(ValueError, match=r"mask must be \[B\]"):
        channel_mix_one_token(x, shift, mix, Wk, Wv, mask[:1])
    with pytest.raises(ValueError, match=r"x must be \[B, I\] and W \[O, I\]"):
        linear_one_token(x, Wv)
    with pytest.raises(ValueError, match="impl must be one of"):
        linear_one_token(x, Wk, impl="gpu")
    with pytest.raises(ValueError, match="impl='cpu' needs"):  # autograd: no kernel
        linear_one_token(x, Wk.clone().requires_grad_(), impl="cpu")


def test_reference_is_differentiable_and_auto_falls_back_under_autograd():
    x, shift, mix, Wk, Wv, mask = make_case(2, 32, 64)
    Wk.requires_grad_()
    out, _ = channel_mix_one_token(x, shift, mix, Wk, Wv, mask)  # auto under autograd: the reference
    out.square().sum().backward()
    assert Wk.grad is not None and Wk.grad.abs().sum() > 0


# -- the layers' decoding paths ----------------------------------------------------------------------------------


def _count_calls(monkeypatch, module, name) -> list:
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    return calls


@needs_kernel
def test_channel_mix_layer_decodes_batch_one_through_the_kernel(monkeypatch):
    """A ChannelMix step of one token at batch <= CHANNEL_MIX_MAX_BATCH without autograd is one kernel call, equal to
    the layer's tensor path (float64, 1e-12); several tokens, autograd, a larger batch or a hook on a projection take
    the tensor path."""
    monkeypatch.setattr(rows_mod, "CHANNEL_MIX_MAX_BATCH", 1)
    calls = _count_calls(monkeypatch, rows_mod, "channel_mix_one_token_planned")
    torch.manual_seed(0)
    cm = perturb_(ChannelMix(48, 4 * 48, 1, 3).double(), 0.3)
    x, shift = torch.randn(2, 1, 48, dtype=torch.float64), torch.randn(2, 48, dtype=torch.float64)
    mask = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    want = [cm(x[i : i + 1], shift[i : i + 1], mask[i : i + 1]) for i in range(2)]  # autograd: the tensor path
    assert want[0][0].requires_grad and calls == []
    with torch.no_grad():
        got = [cm(x[i : i + 1], shift[i : i + 1], mask[i : i + 1]) for i in range(2)]
        assert calls == [1, 1]
        for (out, new_shift), (out_t, shift_t) in zip(got, want):
            assert out.shape == out_t.shape and rel_err(out, out_t) <= 1e-12 and torch.equal(new_shift, shift_t)
        cm(x, shift)  # batch 2 > CHANNEL_MIX_MAX_BATCH
        cm(torch.randn(1, 3, 48, dtype=torch.float64), shift[:1])  # three tokens
        handle = cm.key.register_forward_hook(lambda *a: None)
        cm(x[:1], shift[:1])  # a hook must run: the module is called
        handle.remove()
    assert calls == [1, 1]


@needs_kernel
def test_head_logits_take_the_kernel_at_one_row(monkeypatch):
    monkeypatch.setattr(rows_mod, "HEAD_MAX_ROWS", 1)
    calls = _count_calls(monkeypatch, rows_mod, "linear_one_token_planned")
    torch.manual_seed(1)
    head = torch.nn.Linear(48, 200, bias=False).double()
    hidden = torch.randn(2, 1, 48, dtype=torch.float64)
    with torch.no_grad():
        one = head_logits(head, hidden[:1])
        two = head_logits(head, hidden)  # two rows: the module
    assert calls == [1] and one.dtype == two.dtype == torch.float32 and one.shape == (1, 1, 200)
    assert rel_err(one, hidden[:1] @ head.weight.t()) <= 1e-7 and torch.equal(one, two[:1])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_layers_take_the_row_kernels_up_to_the_measured_batch(monkeypatch, dtype):
    """By default a decoding step's channel-mix and head take their kernels up to 8 rows with float32/64 weights and
    up to 4 with bfloat16 weights (the batches where they beat the BLAS's products, CHANNEL_MIX_MAX_BATCH /
    HEAD_MAX_ROWS / BF16_MAX_ROWS); one row more takes the products."""
    limit = 4 if dtype == torch.bfloat16 else 8
    cm_calls = _count_calls(monkeypatch, rows_mod, "channel_mix_one_token_planned")
    head_calls = _count_calls(monkeypatch, rows_mod, "linear_one_token_planned")
    torch.manual_seed(4)
    cm = perturb_(ChannelMix(48, 192, 1, 3).double(), 0.3).to(dtype)
    head = torch.nn.Linear(48, 200, bias=False).to(dtype)
    with torch.no_grad():
        for B in (1, limit, limit + 1):
            x, shift = torch.randn(B, 1, 48).to(dtype), torch.randn(B, 48).to(dtype)
            cm(x, shift)
            head_logits(head, x)
    assert cm_calls == [1, limit] and head_calls == [1, limit]


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_channel_mix_layer_and_head_at_batch_8_equal_their_tensor_paths_in_float64(threads):
    """At the largest default batch (8 rows, every other one padding, C = 40: not a multiple of the 16-row blocks)
    the kernel paths equal the tensor paths (the layer under autograd; x W^T): relative error <= 1e-12 (the head's
    logits are returned in float32: <= 1e-7)."""
    torch.manual_seed(5)
    cm = perturb_(ChannelMix(40, 160, 1, 3).double(), 0.3)
    head = torch.nn.Linear(40, 300, bias=False).double()
    x, shift = torch.randn(8, 1, 40, dtype=torch.float64), torch.randn(8, 40, dtype=torch.float64)
    mask = torch.tensor([1.0, 0.0] * 4, dtype=torch.float64).reshape(8, 1)
    want_out, want_shift = cm(x, shift, mask)  # autograd: the tensor path
    got_out, got_shift = _with_threads(threads, lambda: _no_grad(lambda: cm(x, shift, mask)))
    logits = _with_threads(threads, lambda: _no_grad(lambda: head_logits(head, x)))
    assert rel_err(got_out, want_out) <= 1e-12 and torch.equal(got_shift, want_shift)
    assert rel_err(logits, x.detach() @ head.weight.detach().t()) <= 1e-7


def _no_grad(fn):
    with torch.no_grad():
        return fn()


@needs_kernel
def test_bfloat16_channel_mix_layer_lands_nearer_float64_than_its_tensor_path(monkeypatch):
    """A bfloat16 ChannelMix step through the kernel (float32 inside) is nearer the float64 layer of the same rounded
    weights than the bfloat16 tensor path (which rounds every intermediate), both within 3e-2."""
    torch.manual_seed(2)
    cm64 = perturb_(ChannelMix(128, 512, 1, 3).double(), 0.3)
    with torch.no_grad():
        for p in cm64.parameters():
            p.copy_(p.to(torch.bfloat16).double())
    cm = ChannelMix(128, 512, 1, 3)
    cm.load_state_dict(cm64.state_dict())
    cm = cm.to(torch.bfloat16)
    x, shift = torch.randn(1, 1, 128).to(torch.bfloat16), torch.randn(1, 128).to(torch.bfloat16)
    with torch.no_grad():
        want = cm64(x.double(), shift.double())[0]
        fused = cm(x, shift)[0]
        monkeypatch.setattr(rows_mod, "CHANNEL_MIX_MAX_BATCH", 0)  # the kernel off: the tensor path
        tensor = cm(x, shift)[0]
    assert fused.dtype == torch.bfloat16
    err_fused, err_tensor = rel_err(fused, want), rel_err(tensor, want)
    assert err_fused <= err_tensor and err_tensor <= 3e-2, (err_fused, err_tensor)


@needs_kernel
def test_plans_follow_a_weight_changed_within_a_session():
    """The layer keeps its channel-mix plan for a decoding session; a weight changed in place or replaced is seen."""
    from wuneng.layers.low_rank import derived_weights_session

    torch.manual_seed(3)
    cm = perturb_(ChannelMix(32, 128, 1, 3).double(), 0.3)
    x, shift = torch.randn(1, 1, 32, dtype=torch.float64), torch.randn(1, 32, dtype=torch.float64)
    with torch.no_grad(), derived_weights_session():
        cm(x, shift)
        cm.key.weight.mul_(2.0)
        inplace = cm(x, shift)[0]
        cm.value.weight.data = cm.value.weight.data + 0.5
        replaced = cm(x, shift)[0]
    with torch.no_grad():
        want = channel_mix_one_token_reference(x[:, 0], shift, cm.x_k, cm.key.weight, cm.value.weight)[0]
        cm.value.weight.data = cm.value.weight.data - 0.5
        want_inplace = channel_mix_one_token_reference(x[:, 0], shift, cm.x_k, cm.key.weight, cm.value.weight)[0]
    assert rel_err(replaced[:, 0], want) <= 1e-12 and rel_err(inplace[:, 0], want_inplace) <= 1e-12


def test_plan_refuses_what_the_kernel_cannot_serve():
    x, shift, mix, Wk, Wv, mask = make_case(1, 32, 64)
    assert channel_mix_plan(mix, Wk.t().contiguous().t(), Wv) is None  # not contiguous
    assert channel_mix_plan(mix.half(), Wk.half(), Wv.half()) is None  # float16: no kernel
    assert linear_one_token_reference(x, Wk).shape == (1, 64)
