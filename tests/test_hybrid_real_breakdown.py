"""benchmarks/hybrid_real.py --breakdown: the per-piece timing of a layer covers each model's own pieces only, and the
work per token (the limits the distance to the issue-17 targets is split by) is the hand-counted one."""

from __future__ import annotations

import pytest
import torch

from _helpers import load_benchmark


@pytest.mark.slow
def test_work_per_token_counts_weights_cache_states_and_flops():
    bench = load_benchmark("hybrid_real")
    models = bench.build_models(bench.QUICK)
    s = bench.QUICK
    L, C, H, H_kv, d = (s[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                       "num_key_value_heads", "head_dim"))  # fmt: skip
    context = 100
    kv = L * 2 * H_kv * d * context * 4
    states = L * 2 * H * d * d * 4  # one [H, d, d] float32 state per layer, read and written
    work = {name: bench.work_per_token(m, context) for name, m in models.items()}
    for name, m in models.items():
        unique = {id(p): p for p in m.parameters()}.values()  # tied embeddings counted once
        assert work[name]["weight_bytes"] == sum(p.numel() * 4 for p in unique)
    assert work["teacher"]["cache_read_bytes"] == kv and work["teacher"]["kv_copy_bytes"] == 2 * kv
    assert work["wuneng"]["cache_read_bytes"] == kv + states and work["wuneng"]["kv_copy_bytes"] == 0
    assert work["arwkv"]["cache_read_bytes"] == L * 2 * (C // 64) * 64 * 64 * 4  # its own heads of size 64
    teacher = models["teacher"]
    embed = teacher.get_input_embeddings().weight
    matmul = sum(p.numel() for p in teacher.parameters() if p.dim() == 2 and p is not embed)
    assert work["teacher"]["prefill_flops"] == 2 * matmul + L * 4 * H * d * (context + 1) / 2
    # WuNeng: the teacher's matmuls plus its own (the state-query matrix once per head) and the WKV-7 steps
    new = dict(models["wuneng"].named_parameters())
    extra = sum(p.numel() for n, p in new.items() if p.dim() == 2 and n in models["wuneng"].new_parameter_names())
    extra += L * (H - 1) * d * d
    assert work["wuneng"]["prefill_flops"] == pytest.approx(
        work["teacher"]["prefill_flops"] + 2 * extra + L * 10 * H * d * d
    )


@pytest.mark.slow
def test_breakdown_times_the_pieces_each_model_has(capsys):
    torch.manual_seed(0)
    bench = load_benchmark("hybrid_real")
    out = bench.main(["--quick", "--threads", "1", "--breakdown"])
    breakdown = out["breakdown"]
    for phase in ("prefill", "decode"):
        rows = breakdown[phase]
        assert set(rows) == {"teacher", "wuneng", "arwkv"}
        for row in rows.values():
            assert set(row) == {key for key, _ in bench.PIECES} | {"step"}
            assert row["mixer"] > 0 and row["mlp"] > 0 and row["step"] > 0
        # only WuNeng has a state side, a state query and a fusion; ARWKV has no q/k/v/o of the teacher
        for key in ("state", "state_query", "fusion"):
            assert rows["wuneng"][key] > 0
            assert rows["teacher"][key] == rows["arwkv"][key] == 0
        assert rows["teacher"]["proj"] > 0 and rows["arwkv"]["proj"] == 0
    assert breakdown["prefill"]["wuneng"]["lowrank"] > 0  # the wide low-rank maps at prefill, the C call at decode
    assert breakdown["decode"]["wuneng"]["lowrank"] == 0
    printed = capsys.readouterr().out
    assert "where the time goes, decode after 64" in printed and "work allows" in printed


@pytest.mark.slow
def test_piece_bytes_are_each_pieces_weights_and_cache():
    bench = load_benchmark("hybrid_real")
    models = bench.build_models(bench.QUICK)
    s = bench.QUICK
    C, H, H_kv, d = (s[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim"))
    teacher, wuneng = (bench.piece_bytes(models[n], 100) for n in ("teacher", "wuneng"))
    projections = (2 * C * H * d + 2 * C * H_kv * d + H * d + 2 * H_kv * d) * 4  # q, o; k, v; the q/k/v biases
    assert teacher["proj"] == wuneng["proj"] == projections
    assert teacher["attn_core"] == wuneng["attn_core"] == 2 * H_kv * d * 100 * 4
    assert teacher["state"] == teacher["fusion"] == 0
    mixer = models["wuneng"].model.layers[-1].self_attn  # with the value-residual LoRA
    assert wuneng["fusion"] == mixer.o_middle.weight.numel() * 4
    assert wuneng["state_query"] == d * d * 4
    # the state side: every weight the fused C call reads (the layer's own LoRAs, mixes, vectors) and the state
    assert (
        wuneng["state"]
        == sum(t.numel() * 4 for t in mixer.one_token_weights()[:-1] if t is not None) + 2 * H * d * d * 4
    )
    assert wuneng["mlp"] == teacher["mlp"] == 3 * C * s["intermediate_size"] * 4
