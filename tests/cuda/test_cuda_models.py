"""Every model kind on CUDA (RWKV-7, WuNeng from Qwen2 and Llama teachers, ARWKV, Meta-State: the tiny perturbed
models of tests/test_mixed_precision.py): training forward + backward in float32, under bf16 autocast and with bf16
parameters against the same model in float32 on the CPU; prefill, token-by-token decoding and generate() with the
cache on the GPU; and the CPU-only fused decoding kernels (C) never reached from CUDA tensors.

Run by scripts/gpu_check.sh (issue 19); skipped without CUDA. Relative errors ``||x - ref|| / ||ref||``; the bf16
thresholds are tests/test_mixed_precision.py's (measured there on the CPU: the same autocast rules); float32 CUDA
against float32 CPU: logits 5e-3, gradients 2e-2 (fla's float32 kernels may use TF32 dots; set before any GPU run).
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_mixed_precision import KINDS, TOL, V, assert_close_to_float32, build, ids, wkv_states

from wuneng.fused import cpu as fused_cpu
from wuneng.fused import one_token as one_token_mod
from wuneng.ops.wkv7 import cpu as cpu_mod
from wuneng.ops.wkv7 import dispatch
from wuneng.ops.wkv7 import readout as readout_mod
from wuneng.ops.wkv7.cpu import cpu_kernel_available
from wuneng.ops.wkv7.dispatch import fla_available

from _helpers import rel_err

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

FLOAT32_TOL = {torch.float32: (5e-3, 2e-2, 1e-3)}  # (logits, gradients, loss) of float32 CUDA against the CPU
# kinds whose WKV calls go to fla on CUDA (no extra query read-out; Meta-State's self-state query is one)
FLA_KINDS = ("rwkv7", "wuneng-qwen2", "wuneng-llama", "arwkv")


def loss_logits_grads(model, tokens, autocast_dtype=None):
    """(loss, logits float32 on the CPU, {name: gradient float32 on the CPU}) of one training forward + backward on
    the model's device, under that device's autocast when a dtype is given."""
    device = next(model.parameters()).device
    model.train()
    model.zero_grad(set_to_none=True)
    tokens = tokens.to(device)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = model(tokens, labels=tokens)
    out.loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.item(), out.logits.detach().float().cpu(), grads


def count_fla_calls(monkeypatch) -> list:
    calls = []
    real = dispatch.wkv7_fla
    monkeypatch.setattr(dispatch, "wkv7_fla", lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))
    return calls


@pytest.fixture(scope="module")
def cpu_reference():
    """{kind: (model on the CPU in float32, its loss/logits/gradients)}, built once per kind."""
    cache = {}

    def get(kind):
        if kind not in cache:
            model = build(kind)
            cache[kind] = (model, loss_logits_grads(model, ids()))
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", KINDS)
def test_float32_on_cuda_matches_the_cpu(kind, cpu_reference, monkeypatch):
    calls = count_fla_calls(monkeypatch)
    model, ref = cpu_reference(kind)
    gpu = copy.deepcopy(model).cuda()
    loss, logits, grads = loss_logits_grads(gpu, ids())
    ref_loss, ref_logits, ref_grads = ref
    assert grads.keys() == ref_grads.keys()
    assert rel_err(logits, ref_logits) <= FLOAT32_TOL[torch.float32][0]
    flat = lambda gs: torch.cat([gs[n].flatten() for n in sorted(gs)])  # noqa: E731
    assert rel_err(flat(grads), flat(ref_grads)) <= FLOAT32_TOL[torch.float32][1]
    assert abs(loss - ref_loss) <= FLOAT32_TOL[torch.float32][2] * abs(ref_loss)
    if kind in FLA_KINDS and fla_available():
        assert calls, f"{kind}: wkv_impl 'auto' did not reach fla on CUDA"


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_autocast_on_cuda_close_to_float32(kind, cpu_reference, monkeypatch):
    calls = count_fla_calls(monkeypatch)
    model, ref = cpu_reference(kind)
    gpu = copy.deepcopy(model).cuda()
    assert_close_to_float32(kind, torch.bfloat16, *loss_logits_grads(gpu, ids(), torch.bfloat16), ref)
    assert all(p.dtype == torch.float32 for p in gpu.parameters())  # autocast keeps float32 parameters
    if kind in FLA_KINDS and fla_available():
        assert calls and set(calls) == {torch.bfloat16}, f"{kind}: fla did not get bf16 activations: {calls}"


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_parameters_on_cuda_close_to_float32(kind, cpu_reference):
    model, ref = cpu_reference(kind)
    gpu = copy.deepcopy(model).to("cuda", torch.bfloat16)
    assert_close_to_float32(kind, torch.bfloat16, *loss_logits_grads(gpu, ids()), ref)


@pytest.mark.parametrize("setting", ["float32", "bf16-autocast", "bf16-parameters"])
@pytest.mark.parametrize("kind", KINDS)
def test_prefill_decode_and_generate_on_cuda(kind, setting, cpu_reference):
    """Prefill 4 tokens, then one token at a time through the cache: equal to the full forward of the same setting
    (float32: 5e-3; bf16: the bf16 logits threshold), every cached tensor on the GPU and the WKV states float32;
    greedy generate() keeps the prompt and picks, at every step up to an end-of-sequence token, a token whose logit
    (full forward of the generated sequence) is the largest up to 1e-3 (float32) or 5e-2 (bf16) of the logits'
    largest magnitude."""
    model = copy.deepcopy(cpu_reference(kind)[0]).cuda().eval()
    if setting == "bf16-parameters":
        model = model.to(torch.bfloat16)
    tokens = ids(length=10).cuda()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=setting == "bf16-autocast")
    with torch.no_grad(), autocast:
        full = model(tokens).logits.float()
        out = model(tokens[:, :4], use_cache=True)
        cache, steps = out.past_key_values, [out.logits.float()]
        for t in range(4, tokens.shape[1]):
            out = model(tokens[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits.float())
        prompt = tokens[:, :5]
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                                   pad_token_id=V - 1)  # fmt: skip
        regen = model(generated).logits.float()
    tol = 5e-3 if setting == "float32" else TOL[torch.bfloat16][0]
    assert rel_err(torch.cat(steps, dim=1), full) <= tol
    states = wkv_states(cache)
    assert states and all(s.dtype == torch.float32 and s.device.type == "cuda" for s in states)
    assert generated.shape == (2, 11) and generated.device.type == "cuda"
    assert torch.equal(generated[:, :5], prompt)
    new = generated[:, 5:]
    picked = regen[:, 4:-1].gather(-1, new.unsqueeze(-1)).squeeze(-1)
    best = regen[:, 4:-1].max(-1).values
    # a row that generated the end-of-sequence token is padded after it
    eos_ids = model.generation_config.eos_token_id
    eos = torch.tensor([] if eos_ids is None else eos_ids, dtype=new.dtype, device=new.device).flatten()
    ended = torch.isin(new, eos).long().cumsum(-1) - torch.isin(new, eos).long() > 0
    slack = (1e-3 if setting == "float32" else TOL[torch.bfloat16][0]) * regen.abs().max()
    assert ((best - picked <= slack) | ended).all(), (best - picked).max()


class CountingLibrary:
    """Stands in for the C library: counts every kernel fetched from it (each C call fetches its function)."""

    def __init__(self, lib):
        self.lib = lib
        self.fetched = []

    def __getattr__(self, name):
        self.fetched.append(name)
        return getattr(self.lib, name)


@pytest.mark.skipif(
    not (cpu_kernel_available() and fused_cpu.fused_kernel_available()),
    reason="the C kernels are not built here: the CPU control cannot run",
)
@pytest.mark.parametrize("kind", KINDS)
def test_decoding_on_cuda_never_reaches_the_cpu_kernels(kind, cpu_reference, monkeypatch):
    """The fused one-token kernels, the C WKV-7 and the C read-out serve CPU tensors only: counted over a no-grad
    prefill, three decoding steps and generate(), none is fetched on CUDA, while the same run on the CPU (the
    control: the count can fail) fetches some."""
    import wuneng.layers.hybrid as hybrid_layers
    import wuneng.layers.rwkv7 as rwkv7_layers

    counting = CountingLibrary(cpu_mod._library())
    for module in (cpu_mod, readout_mod):
        monkeypatch.setattr(module, "_library", lambda: counting)
    counting_fused = CountingLibrary(fused_cpu._library())
    counting_fused.fetched = counting.fetched  # one list for both libraries
    monkeypatch.setattr(one_token_mod, "_library", lambda: counting_fused)
    fused = []
    for module, name in (
        (rwkv7_layers, "time_mix_one_token_planned"),
        (hybrid_layers, "hybrid_state_one_token_planned"),
    ):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: fused.append(_name) or _real(*a, **k))

    def decode(model, device):
        tokens = ids(length=8).to(device)
        with torch.no_grad():
            out = model(tokens[:, :5], use_cache=True)
            cache = out.past_key_values
            for t in range(5, 8):
                cache = model(tokens[:, t : t + 1], past_key_values=cache, use_cache=True).past_key_values
            model.generate(tokens[:, :5], attention_mask=torch.ones_like(tokens[:, :5]), max_new_tokens=3,
                           do_sample=False, pad_token_id=V - 1)  # fmt: skip

    model = copy.deepcopy(cpu_reference(kind)[0]).eval()
    decode(model.cuda(), "cuda")
    assert counting.fetched == [] and fused == [], f"CUDA decoding reached the CPU kernels: {counting.fetched} {fused}"
    decode(model.cpu(), "cpu")
    assert counting.fetched, "the CPU control fetched no kernel: the count is not watching the C calls"
