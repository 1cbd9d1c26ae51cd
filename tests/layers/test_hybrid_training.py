"""The training path of the WuNeng hybrid mixer (wuneng.layers.hybrid_training): the first low-rank factors of all
six maps in one matmul (token-shift mixes by linearity) equal the per-map expressions, values and gradients, in
float64 (rel. error < 1e-12), with and without padding (x differs from u), with and without value residual and
for each fusion's set of maps; and the mixer's training step equals its no-grad forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_hybrid import C, D, H, call, make_mixer  # noqa: F401  (the tiny Qwen2 mixer of the hybrid tests)

from wuneng.layers.hybrid_training import training_low_rank

CONFIGS = [
    dict(fusion="gate", middle_heads=2),
    dict(fusion="add", middle_heads=0),
    dict(fusion="none", middle_heads=1),
]


def per_map_reference(m, u, x, xx):
    """Each map on its own token-shift mix: x_i = x + xx * mu_i, then x_i A_i B_i + bias (no sigmoid)."""
    st = m.state
    out = {
        "decay_logit": st.w0 + torch.tanh((x + xx * st.x_w) @ st.w1) @ st.w2,
        "alpha_logit": st.a0 + ((x + xx * st.x_a) @ st.a1) @ st.a2,
        "r": u @ m.receptance_lora_a,
    }
    if st.value_residual:
        out["value_gate_logit"] = st.v0 + ((x + xx * st.x_v) @ st.v1) @ st.v2
    if m.fusion == "gate":
        out["gate"] = u @ m.gate_lora_a
    if m.num_middle_heads > 0:
        out["middle"] = u @ m.middle_lora_a
    return out


@pytest.mark.parametrize("case", ["plain", "masked", "prev", "docs"])
@pytest.mark.parametrize("value_residual", [False, True])
@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: f"{kw['fusion']}-m{kw['middle_heads']}")
def test_training_low_rank_equals_per_map_expressions(kw, value_residual, case):
    """Cases: no padding (x is u), left padding (x differs from u), a previous token from a cache (the shift's
    first row), document starts of packed rows (the shift brings zeros there); gradients include the previous
    token's."""
    m = make_mixer(value_residual=value_residual, layer_idx=1, num_layers=3, **kw)
    torch.manual_seed(4)
    B, T = 2, 7
    u = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    mask = prev = doc_start = None
    if case == "masked":
        mask = torch.ones(B, T, dtype=torch.long)
        mask[1, :3] = 0
    if case == "prev":
        prev = torch.randn(B, C, dtype=torch.float64, requires_grad=True)
    if case == "docs":
        doc_start = torch.zeros(B, T, dtype=torch.bool)
        doc_start[0, 3] = doc_start[1, 0] = doc_start[1, 5] = True
    x, xx = m.shifted(u, mask, prev, doc_start)
    assert (x is u) == (case != "masked")
    got = training_low_rank(m, u, x, xx)
    want = per_map_reference(m, u, x, xx)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert (got[name] - want[name]).abs().max() <= 1e-12 * want[name].abs().max(), name
    g = {name: torch.randn_like(t) for name, t in want.items()}
    params = [p for p in m.parameters() if p.requires_grad]
    ga = torch.autograd.grad(sum((got[n] * g[n]).sum() for n in g), [u] + params, allow_unused=True, retain_graph=True)
    gb = torch.autograd.grad(sum((want[n] * g[n]).sum() for n in g), [u] + params, allow_unused=True)
    for (name, _), a, b in zip([("u", None)] + list(m.named_parameters()), ga, gb):
        if b is None:
            assert a is None or a.abs().max() == 0, name
            continue
        assert (a - b).abs().max() <= 1e-12 * (b.abs().max() + 1e-300), name


@pytest.mark.parametrize("value_residual", [False, True])
def test_training_step_equals_no_grad_forward(value_residual):
    """The training path (joined first factors, the fused state-head inputs) and the inference path give one
    output with padding (float64, rel. error < 1e-12)."""
    m = make_mixer(value_residual=value_residual, layer_idx=0, num_layers=2)
    torch.manual_seed(5)
    B, T = 2, 9
    u = torch.randn(B, T, C, dtype=torch.float64)
    v_first = torch.randn(B, T, H * D, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :2] = 0
    outs = []
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            out, _ = call(m, u, mask, None, v_first)
        outs.append(out.detach())
    real = mask.bool()
    assert (outs[0][real] - outs[1][real]).abs().max() <= 1e-12 * outs[1][real].abs().max()


def test_decay_logit_feeds_the_fused_inputs():
    """wkv_inputs given pre-activations (the training path) equals wkv_inputs given the per-map expressions'
    sigmoids (the no-grad form), all six outputs (float64, rel. error < 1e-12)."""
    m = make_mixer(value_residual=True, layer_idx=1, num_layers=3)
    st = m.state
    torch.manual_seed(6)
    B, T, A = 2, 5, H * D
    u = torch.randn(B, T, C, dtype=torch.float64)
    k, v, v_first = (torch.randn(B, T, A, dtype=torch.float64) for _ in range(3))
    x, xx = m.shifted(u, None, None)
    logits = per_map_reference(m, u, x, xx)
    sig = {
        "decay": torch.sigmoid(logits["decay_logit"]),
        "alpha": torch.sigmoid(logits["alpha_logit"]),
        "value_gate": torch.sigmoid(logits["value_gate_logit"]),
    }
    got = st.wkv_inputs(x, xx, k, v, v_first, low=logits)
    want = st.wkv_inputs(x, xx, k, v, v_first, low=sig)
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 1e-12 * b.abs().max()
    assert F.mse_loss(got[0], want[0]) < 1e-24
