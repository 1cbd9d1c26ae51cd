"""The RWKV-7 language model against the ``rwkv`` PyPI package (0.8.x, ``cpu fp32``) on a random tiny
checkpoint written with RWKV-LM key names, plus generate(), the state cache, save/load, RWKV-LM import/export
and input validation.

Agreement metric: relative L2 error over all logits, ||ours - ref|| / ||ref||, float32, threshold 1e-5.
"""

import os

import pytest
import torch

from wuneng import RWKV7Config, RWKV7ForCausalLM
from wuneng.cache import RecurrentStateCache

from _helpers import rel_err

V, C, L, N = 97, 64, 3, 16
REL_TOL = 1e-5


def tiny_config(**kw) -> RWKV7Config:
    args = dict(vocab_size=V, hidden_size=C, num_hidden_layers=L, head_size=N, eos_token_id=None, bos_token_id=None)
    args.update(kw)
    return RWKV7Config(**args)


def random_model(seed: int = 0, **kw) -> RWKV7ForCausalLM:
    """A tiny model whose every parameter (the zero-initialised ones too) is perturbed."""
    torch.manual_seed(seed)
    model = RWKV7ForCausalLM(tiny_config(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_((0.2 if p.dim() == 1 or name.endswith("r_k") else 0.1) * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def model():
    return random_model(0)


@pytest.fixture(scope="module")
def pip_model(model, tmp_path_factory):
    """The same weights, saved as an RWKV-LM .pth and loaded by the rwkv pip package (strategy cpu fp32)."""
    pytest.importorskip("rwkv")
    os.environ["RWKV_V7_ON"] = "1"
    os.environ["RWKV_JIT_ON"] = "0"
    os.environ["RWKV_CUDA_ON"] = "0"
    from rwkv.model import RWKV

    # the package picks its model class at import time from RWKV_V7_ON
    assert RWKV.__name__ == "RWKV_x070", "rwkv.model was imported before RWKV_V7_ON=1 was set"
    path = tmp_path_factory.mktemp("rwkv_pip") / "tiny.pth"
    torch.save(model.to_rwkv_lm_state_dict(), path)
    return RWKV(model=str(path)[: -len(".pth")], strategy="cpu fp32")


# -- agreement with the rwkv pip package --------------------------------------------------------------------


def test_sequence_logits_match_rwkv_pip(model, pip_model):
    torch.manual_seed(1)
    tokens = torch.randint(0, V, (24,)).tolist()
    ref, ref_state = pip_model.forward(tokens, None, full_output=True)
    with torch.no_grad():
        out = model(torch.tensor([tokens]))
    assert rel_err(out.logits[0], ref) <= REL_TOL
    # the final recurrent state too (RWKV-LM layout: att shift, wkv [H, N, N], ffn shift per layer)
    cache = out.past_key_values
    for i in range(L):
        for j, name in enumerate(("time_shift", "wkv", "channel_shift")):
            assert rel_err(cache.get_state(i, name)[0], ref_state[3 * i + j]) <= REL_TOL, (i, name)


def test_token_by_token_logits_match_rwkv_pip(model, pip_model):
    torch.manual_seed(2)
    tokens = torch.randint(0, V, (16,)).tolist()
    state, refs, ours, cache = None, [], [], None
    with torch.no_grad():
        for t in tokens:
            logits, state = pip_model.forward([t], state)
            refs.append(logits)
            out = model(torch.tensor([[t]]), past_key_values=cache)
            cache = out.past_key_values
            ours.append(out.logits[0, -1])
    assert rel_err(torch.stack(ours), torch.stack(refs)) <= REL_TOL
    assert cache.get_seq_length() == len(tokens)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, REL_TOL)], ids=["float64", "float32"])
def test_batch_one_decoding_equals_the_whole_sequence(threads, dtype, tol):
    """Decoding one token at a time at batch 1 (the fused time-mix kernel on `threads` threads, the matrix-vector
    products of the channel-mixes and the head) gives the logits of one forward over the whole sequence (the
    chunked tensor path), relative error <= tol."""
    m = random_model(4).to(dtype)
    ids = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(5))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with torch.no_grad():
            whole = m(ids).logits
            cache, steps = None, []
            for t in range(ids.shape[1]):
                out = m(ids[:, t : t + 1], past_key_values=cache, logits_to_keep=1)
                cache = out.past_key_values
                steps.append(out.logits[:, -1])
    finally:
        torch.set_num_threads(before)
    assert rel_err(torch.stack(steps, 1).double(), whole.double()) <= tol


@pytest.mark.parametrize("dtype,limit,tol", [(torch.float32, 8, REL_TOL), (torch.bfloat16, 4, 2e-2)], ids=str)
def test_decoding_steps_take_the_fused_kernels_up_to_their_batch_limits(monkeypatch, dtype, limit, tol):
    """A decoding step of batch 1 up to the row kernels' default limit (8 rows with float32 weights, 4 with bfloat16:
    CHANNEL_MIX_MAX_BATCH, HEAD_MAX_ROWS, BF16_MAX_ROWS) is one C call per time-mix and channel-mix and one for the
    head (float32 logits); one row more takes the matrix products for the channel-mixes and the head (and, above
    TIME_MIX_MAX_BATCH = 8, for the time-mixes). The steps' logits equal the whole sequence's (relative error <= tol;
    bfloat16: the tensor path rounds its intermediates)."""
    import wuneng.layers.rwkv7 as layers_mod
    from wuneng.fused import channel_mix as rows_mod
    from wuneng.fused import one_token
    from wuneng.fused.cpu import fused_kernel_available

    if not fused_kernel_available():
        pytest.skip("no C kernel")
    calls = []
    for module, name in ((rows_mod, "channel_mix_one_token_planned"), (rows_mod, "linear_one_token_planned"),
                         (layers_mod, "time_mix_one_token_planned")):  # fmt: skip
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _n=name, _f=real: calls.append(_n) or _f(*a))
    m = random_model(6).to(dtype)
    ids = torch.randint(0, V, (limit + 1, 5), generator=torch.Generator().manual_seed(7))
    every = ["time_mix_one_token_planned"] * L + ["channel_mix_one_token_planned"] * L + ["linear_one_token_planned"]
    with torch.no_grad():
        whole = m(ids).logits.double()
        for rows, want_calls in ((1, every), (limit, every), (limit + 1, ["time_mix_one_token_planned"] * L)):
            cache = m(ids[:rows, :4]).past_key_values
            calls.clear()
            step = m(ids[:rows, 4:], past_key_values=cache).logits
            want_calls = want_calls if rows <= one_token.TIME_MIX_MAX_BATCH else []
            assert sorted(calls) == sorted(want_calls), rows
            assert step.dtype == torch.float32
            assert rel_err(step[:, -1].double(), whole[:rows, -1]) <= tol, rows


def test_prefill_in_pieces_equals_whole(model):
    torch.manual_seed(3)
    ids = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        whole = model(ids).logits
        a = model(ids[:, :7])
        b = model(ids[:, 7:], past_key_values=a.past_key_values)
    assert rel_err(torch.cat([a.logits, b.logits], 1), whole) <= REL_TOL


def test_every_parameter_changes_the_logits(model):
    """The tiny checkpoint exercises every path: moving any tensor moves the logits (layer 0's unused
    v0/v1/v2 excepted, as in RWKV-LM)."""
    ids = torch.randint(0, V, (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base = model(ids, use_cache=False).logits
        for name, p in model.named_parameters():
            if name.startswith("model.blocks.0.att.v"):
                continue
            saved = p.clone()
            p.add_(0.05)
            moved = model(ids, use_cache=False).logits
            p.copy_(saved)
            assert not torch.allclose(moved, base), name


# -- generate() and the state cache -------------------------------------------------------------------------


def test_greedy_generate_equals_manual_argmax_loop(model):
    torch.manual_seed(5)
    prompt = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=12, do_sample=False)
        seq = prompt
        for _ in range(12):  # no cache: the full forward at every step
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(generated, seq)


def test_cache_memory_does_not_grow(model):
    prompt = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(6))
    sizes = []
    with torch.no_grad():
        for n in (10, 200):
            out = model.generate(prompt, max_new_tokens=n, do_sample=False, return_dict_in_generate=True)
            assert out.sequences.shape[1] == 5 + n
            cache = out.past_key_values
            assert isinstance(cache, RecurrentStateCache)
            sizes.append(cache.nbytes())
    expected = L * (C * 4 + (C // N) * N * N * 4 + C * 4)  # two shifts [C] + wkv [H, N, N], float32, batch 1
    assert sizes == [expected, expected]


def test_generate_continues_from_a_returned_cache(model):
    """generate(..., past_key_values=cache) with the full sequence feeds only the tokens the cache has not seen."""
    prompt = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(16))
    with torch.no_grad():
        whole = model.generate(prompt, max_new_tokens=10, do_sample=False)
        first = model.generate(prompt, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        assert first.past_key_values.get_seq_length() == 6 + 3  # the last generated token is not fed yet
        rest = model.generate(first.sequences, past_key_values=first.past_key_values, max_new_tokens=6, do_sample=False)
    assert torch.equal(rest, whole)


def test_beam_search_with_cache_equals_without(model):
    """Beam search reorders the cache (reorder_cache); without a cache it recomputes everything."""
    prompt = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(7))
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, early_stopping=True)
    with torch.no_grad():
        with_cache = model.generate(prompt, use_cache=True, **kw)
        without = model.generate(prompt, use_cache=False, **kw)
    assert torch.equal(with_cache, without)


def test_left_padding_equals_unpadded(model):
    torch.manual_seed(8)
    short, long_ = torch.randint(0, V, (1, 5)), torch.randint(0, V, (1, 9))
    pad = 0
    batch = torch.cat([torch.cat([torch.full((1, 4), pad), short], 1), long_], 0)
    mask = torch.cat([torch.cat([torch.zeros(1, 4), torch.ones(1, 5)], 1), torch.ones(1, 9)], 0).long()
    with torch.no_grad():
        out = model(batch, attention_mask=mask)
        alone = model(short)
        assert rel_err(out.logits[0, 4:], alone.logits[0]) <= REL_TOL
        for i in range(L):
            for name in ("time_shift", "wkv", "channel_shift"):
                got = out.past_key_values.get_state(i, name)[0]
                assert rel_err(got, alone.past_key_values.get_state(i, name)[0]) <= REL_TOL, (i, name)
        gen = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=pad)
        gen_alone = model.generate(short, max_new_tokens=5, do_sample=False)
    assert torch.equal(gen[0, 4:], gen_alone[0])


def test_labels_loss_is_shifted_cross_entropy(model):
    torch.manual_seed(9)
    ids = torch.randint(0, V, (2, 10))
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    logits = out.logits
    expect = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert torch.allclose(out.loss, expect)
    out.loss.backward()
    assert model.head.weight.grad is not None and model.model.blocks[0].att.w1.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_gradient_checkpointing_gives_the_same_gradients():
    m = random_model(10)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(10))
    m.train()
    m(ids, labels=ids).loss.backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    (
        m.activation_checkpointing_enable
        if hasattr(m, "activation_checkpointing_enable")
        else m.gradient_checkpointing_enable
    )()  # transformers 5.17 has only the old name
    assert all(b.gradient_checkpointing for b in m.model.blocks)
    m(ids, labels=ids).loss.backward()
    for n, p in m.named_parameters():
        if n in ref:
            assert torch.allclose(p.grad, ref[n], rtol=1e-5, atol=1e-7), n


# -- initialisation -----------------------------------------------------------------------------------------


def test_model_init_matches_spec():
    torch.manual_seed(11)
    m = RWKV7ForCausalLM(tiny_config())
    emb = m.model.emb.weight
    assert emb.abs().max() <= 1e-4 and emb.std() > 1e-5
    head = m.head.weight  # [V, C], V > C: columns orthogonal with gain 0.5 * sqrt(V / C)
    gain2 = 0.25 * V / C
    assert torch.allclose(head.T @ head, gain2 * torch.eye(C), atol=1e-4)
    for name, p in m.named_parameters():
        if any(k in name for k in ("ln0.", "ln1.", "ln2.", "ln_out.")):
            assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name
    # layers were initialised by their own reset (spot check; test_rwkv7_layers checks every formula)
    assert torch.all(m.model.blocks[1].att.r_k == -0.04)
    assert torch.all(m.model.blocks[2].att.output.weight == 0)
    small_v = RWKV7ForCausalLM(tiny_config(vocab_size=32))  # V <= C: gain 0.5
    h = small_v.head.weight
    assert torch.allclose(h @ h.T, 0.25 * torch.eye(32), atol=1e-5)


# -- save / load and RWKV-LM import / export ----------------------------------------------------------------


def test_save_load_round_trip(model, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is RWKV7ForCausalLM and AutoConfig.from_pretrained(tmp_path).model_type == "wuneng_rwkv7"
    # from_pretrained must not re-initialise loaded weights
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_from_pretrained_initialises_only_missing_weights(model, tmp_path):
    """A checkpoint without two tensors: those get the SPEC init, every loaded tensor is kept as loaded."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.blocks.1.att.w1"], weights["head.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = RWKV7ForCausalLM.from_pretrained(tmp_path)
    changed = [
        n for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()) if not torch.equal(a, b)
    ]
    assert sorted(changed) == ["head.weight", "model.blocks.1.att.w1"]
    assert torch.all(loaded.model.blocks[1].att.w1 == 0)
    head = loaded.head.weight
    assert torch.allclose(head.T @ head, 0.25 * V / C * torch.eye(C), atol=1e-4)


def test_rwkv_lm_export_names_and_shapes(model):
    sd = model.to_rwkv_lm_state_dict()
    H = C // N
    assert tuple(sd["emb.weight"].shape) == (V, C) and tuple(sd["head.weight"].shape) == (V, C)
    assert tuple(sd["blocks.0.ln0.weight"].shape) == (C,) and "blocks.1.ln0.weight" not in sd
    assert tuple(sd["blocks.1.att.x_r"].shape) == (1, 1, C) and tuple(sd["blocks.2.ffn.x_k"].shape) == (1, 1, C)
    assert tuple(sd["blocks.1.att.w1"].shape) == (C, 32) and tuple(sd["blocks.1.att.w2"].shape) == (32, C)
    assert tuple(sd["blocks.1.att.r_k"].shape) == (H, N)
    assert tuple(sd["blocks.1.ffn.key.weight"].shape) == (4 * C, C)
    assert len(sd) == 4 + 2 + L * 33
    assert torch.equal(sd["blocks.1.att.w1"], model.model.blocks[1].att.w1)


def test_rwkv_lm_import_export_round_trip(model, tmp_path):
    sd = model.to_rwkv_lm_state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save(sd, path)
    for source in (sd, path, str(path)):
        back = RWKV7ForCausalLM.from_rwkv_lm(source)
        sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "head_size", "intermediate_size",
                 "decay_low_rank_dim", "a_low_rank_dim", "v_low_rank_dim", "gate_low_rank_dim")  # fmt: skip
        assert all(getattr(back.config, k) == getattr(model.config, k) for k in sizes)
        for (n, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
            assert torch.equal(a, b), n
    back_sd = back.to_rwkv_lm_state_dict()
    assert back_sd.keys() == sd.keys() and all(torch.equal(back_sd[k], sd[k]) for k in sd)


def test_import_reads_sizes_and_ranks_from_shapes():
    src = random_model(13, hidden_size=64, head_size=32, num_hidden_layers=2, intermediate_size=96,
                       decay_low_rank_dim=8, a_low_rank_dim=12, v_low_rank_dim=4, gate_low_rank_dim=20)  # fmt: skip
    sd = src.to_rwkv_lm_state_dict()
    del sd["blocks.0.att.v0"], sd["blocks.0.att.v1"], sd["blocks.0.att.v2"]  # optional: unused by layer 0
    m = RWKV7ForCausalLM.from_rwkv_lm(sd)
    c = m.config
    assert (c.num_hidden_layers, c.hidden_size, c.head_size, c.intermediate_size) == (2, 64, 32, 96)
    assert (c.decay_low_rank_dim, c.a_low_rank_dim, c.v_low_rank_dim, c.gate_low_rank_dim) == (8, 12, 4, 20)
    ids = torch.randint(0, V, (1, 7), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        assert torch.allclose(m(ids).logits, src(ids).logits, rtol=0, atol=0)
    # bf16 checkpoints load as bf16 (the checkpoint's dtype) unless a dtype is given
    bf = src.to_rwkv_lm_state_dict(torch.bfloat16)
    assert RWKV7ForCausalLM.from_rwkv_lm(bf).dtype == torch.bfloat16
    assert RWKV7ForCausalLM.from_rwkv_lm(bf, dtype=torch.float32).dtype == torch.float32


def test_cli_import_rwkv(model, tmp_path):
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from wuneng.cli import app

    path = tmp_path / "ckpt.pth"
    torch.save(model.to_rwkv_lm_state_dict(), path)
    out_dir = tmp_path / "imported"
    res = CliRunner().invoke(app, ["import-rwkv", str(path), str(out_dir)])
    assert res.exit_code == 0, res.output
    loaded = AutoModelForCausalLM.from_pretrained(out_dir)
    ids = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    again = CliRunner().invoke(app, ["import-rwkv", str(path), str(out_dir)])
    assert again.exit_code == 2 and "overwrite" in again.output  # an occupied output: usage error
    bad = CliRunner().invoke(app, ["import-rwkv", str(path), str(out_dir), "--overwrite", "--head-size", "8"])
    assert bad.exit_code == 1 and "head_size" in bad.output


# -- bad input ----------------------------------------------------------------------------------------------


def test_bad_config():
    with pytest.raises(ValueError, match="head_size .* must divide hidden_size"):
        RWKV7Config(vocab_size=V, hidden_size=64, num_hidden_layers=1, head_size=24)
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        RWKV7Config(vocab_size=V, hidden_size=-64, num_hidden_layers=1, head_size=16)
    with pytest.raises(ValueError, match="num_hidden_layers must be a positive int"):
        RWKV7Config(vocab_size=V, hidden_size=64, num_hidden_layers=0, head_size=16)
    with pytest.raises(ValueError, match="wkv_impl"):
        RWKV7Config(vocab_size=V, hidden_size=64, num_hidden_layers=1, head_size=16, wkv_impl="cuda")
    with pytest.raises(ValueError, match=r"RWKV7Config: gate_low_rank_dim must be a positive int \(or None"):
        RWKV7Config(vocab_size=V, hidden_size=64, num_hidden_layers=1, head_size=16, gate_low_rank_dim=-1)
    with pytest.raises(ValueError, match="RWKV7Config: intermediate_size must be a positive int"):
        RWKV7Config(vocab_size=V, hidden_size=64, num_hidden_layers=1, head_size=16, intermediate_size=0)
    with pytest.raises(ValueError, match="RWKV7Config: layer_norm_eps must be a positive float"):
        RWKV7Config(vocab_size=V, hidden_size=64, num_hidden_layers=1, head_size=16, layer_norm_eps=-1.0)


def test_bad_forward_inputs(model):
    ids = torch.randint(0, V, (2, 5))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model(ids[0])  # rank 1
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model(ids[None])  # rank 3
    with pytest.raises(TypeError, match="integer"):
        model(ids.float())
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        model(ids + V)
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(TypeError, match="dtype"):
        model(inputs_embeds=torch.randn(2, 5, C, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[B, T, 64\]"):
        model(inputs_embeds=torch.randn(2, 5, C + 1))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="only 0 .padding. and 1"):
        model(ids, attention_mask=torch.full((2, 5), 2))
    with pytest.raises(ValueError, match="is on meta"):
        model(ids.to("meta"))
    with pytest.raises(ValueError, match="is on meta"):
        model(ids, attention_mask=torch.ones(2, 5, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="has 2 layers, the model has 3"):
        model(ids, past_key_values=RecurrentStateCache(2))
    with pytest.raises(TypeError, match="RecurrentStateCache"):
        model(ids, past_key_values=(torch.zeros(1),))
    with torch.no_grad():
        cache = model(ids).past_key_values
    with pytest.raises(ValueError, match="batch 2"):
        model(ids[:1], past_key_values=cache)
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=ids[:, :3])


def test_bad_rwkv_lm_checkpoints(model, tmp_path):
    sd = model.to_rwkv_lm_state_dict()
    missing = {k: v for k, v in sd.items() if k not in ("blocks.1.att.k_k", "ln_out.bias")}
    with pytest.raises(ValueError, match=r"missing keys \(2\): \['blocks.1.att.k_k', 'ln_out.bias'\]"):
        RWKV7ForCausalLM.from_rwkv_lm(missing)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): \['blocks.0.att.extra'\]"):
        RWKV7ForCausalLM.from_rwkv_lm({**sd, "blocks.0.att.extra": torch.zeros(1)})
    wrong = dict(sd, **{"blocks.2.att.a2": torch.zeros(32, C + 1)})
    with pytest.raises(ValueError, match=r"blocks.2.att.a2: expected \[32, 64\], got \[32, 65\]"):
        RWKV7ForCausalLM.from_rwkv_lm(wrong)
    with pytest.raises(ValueError, match="head_size: given 32, checkpoint has 16"):
        RWKV7ForCausalLM.from_rwkv_lm(sd, head_size=32)
    gap = {k: v for k, v in sd.items() if not k.startswith("blocks.1.")}
    with pytest.raises(ValueError, match=r"blocks \[1\] are missing"):
        RWKV7ForCausalLM.from_rwkv_lm(gap)
    mixed = dict(sd, **{"head.weight": sd["head.weight"].double()})
    with pytest.raises(TypeError, match="mixes dtypes"):
        RWKV7ForCausalLM.from_rwkv_lm(mixed)
    with pytest.raises(FileNotFoundError, match="not found"):
        RWKV7ForCausalLM.from_rwkv_lm(tmp_path / "nope.pth")
    with pytest.raises(TypeError, match="state dict"):
        RWKV7ForCausalLM.from_rwkv_lm([1, 2, 3])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(model):
    ids = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(15))
    gpu = random_model(0).cuda()
    with torch.no_grad():
        ref = model(ids).logits
        out = gpu(ids.cuda())
        assert rel_err(out.logits.cpu(), ref) <= 1e-4  # TF32 / kernel differences
        cache = out.past_key_values
        assert cache.get_state(0, "wkv").device.type == "cuda"
        with pytest.raises(ValueError, match="is on cpu"):
            gpu(ids)
        gen = gpu.generate(ids[:, :5].cuda(), max_new_tokens=6, do_sample=False)
    assert gen.shape == (2, 11)
