"""RWKV-7 in flash-linear-attention's Hugging Face layout (fla-hub): ``RWKV7ForCausalLM.from_fla`` / ``to_fla`` and
``wuneng import-fla`` / ``export-fla`` against fla's own ``RWKV7ForCausalLM`` (the ``bench`` extra).

fla's model needs Triton for its kernels (token shift, fused addcmul, k update, the chunked and recurrent WKV, the
gated output correction), which this CPU machine lacks. :func:`fla_reference_ops` swaps them, inside fla's modules, for
the pure-PyTorch references fla ships beside them (``token_shift_ref``, ``torch_addcmul_rwkv7``, ``k_update_ref``,
``gate_output_correction_ref`` and the generalized delta rule's ``dplr_recurrence``), with ``fuse_norm=False``
(torch LayerNorm / GroupNorm / F.normalize): fla's model structure (norm placement, LoRAs, value residual, eps) then
runs unchanged on the CPU. ``dplr_recurrence`` computes in float32, so logits are compared in float32: relative
error ``||x - ref|| / ||ref||`` below 1e-5 (measured: 6e-7). tests/cuda/test_cuda_fla_interop.py compares
with fla's real kernels on a GPU.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from wuneng import RWKV7Config, RWKV7ForCausalLM
from wuneng.cli import app
from wuneng.models.rwkv7.convert_fla import FlaConfigError

from _helpers import perturb_, rel_err

fla_models = pytest.importorskip("fla.models", reason="flash-linear-attention (the bench extra) is not installed")
warnings.filterwarnings("ignore", message=".*potentially buggy FLA implementation.*")

V, C, L, N = 97, 128, 3, 64
TOL = 1e-5  # float32 logits, relative (fla's reference recurrence computes in float32)
FLA_SIZES = dict(vocab_size=V, hidden_size=C, num_hidden_layers=L, head_dim=N, decay_low_rank_dim=32,
                 a_low_rank_dim=32, v_low_rank_dim=16, gate_low_rank_dim=48, intermediate_size=224, fuse_norm=False,
                 fuse_cross_entropy=False)  # fmt: skip
runner = CliRunner()


def fla_reference_ops(monkeypatch) -> None:
    """Replace fla's Triton kernels in its RWKV-7 modules by fla's own pure-PyTorch references (see the module doc)."""
    import fla.layers.rwkv7 as fla_layer
    import fla.models.rwkv7.modeling_rwkv7 as fla_model
    from fla.modules.token_shift import token_shift_ref
    from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence
    from fla.ops.rwkv7.fused_addcmul import torch_addcmul_rwkv7
    from fla.ops.rwkv7.fused_k_update import k_update_ref
    from fla.ops.rwkv7.gate_output_correction import gate_output_correction_ref

    def token_shift(x, cu_seqlens=None, output_cache=False, cache=None):
        assert cu_seqlens is None and cache is None
        delta = token_shift_ref(x)
        return (delta, x[:, -1]) if output_cache else delta

    def chunk(r, w, k, v, a, b, scale=1.0, initial_state=None, output_final_state=False, **_):
        # [B, T, H, K] -> [B, H, T, K]; dplr_recurrence scales the query by K^-0.5 itself
        q, k, v, a, b, w = (t.transpose(1, 2) for t in (r * (scale * r.shape[-1] ** 0.5), k, v, a, b, w))
        o, state = dplr_recurrence(q, k, v, a, b, w, initial_state, output_final_state)
        return o.transpose(1, 2), state

    def recurrent(r, w, k, v, kk, a, scale=1.0, initial_state=None, output_final_state=False, **_):
        return chunk(r, w, k, v, -kk, kk * a, scale, initial_state, output_final_state)

    monkeypatch.setattr(fla_layer, "token_shift", token_shift)
    monkeypatch.setattr(fla_model, "token_shift", token_shift)
    monkeypatch.setattr(fla_layer, "fused_addcmul_rwkv7", torch_addcmul_rwkv7)
    monkeypatch.setattr(fla_layer, "fused_k_rwkv7", lambda k, a, ka, **_: k_update_ref(k, a, ka))
    monkeypatch.setattr(fla_layer, "gate_output_correction", gate_output_correction_ref)
    monkeypatch.setattr(fla_layer, "chunk_rwkv7", chunk)
    monkeypatch.setattr(fla_layer, "fused_mul_recurrent_rwkv7", recurrent)


def fla_logits(fla_model, ids) -> torch.Tensor:
    for layer in fla_model.model.layers:  # fla's sqrelu is a torch.compile'd function: the same in plain torch
        layer.ffn.act_fn = lambda x: torch.relu(x) ** 2
    with torch.no_grad():
        return fla_model(ids, use_cache=False).logits.float()


def our_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits.float()


def make_fla(seed: int = 0, **overrides):
    """fla's RWKV7ForCausalLM, its init perturbed (scale 0.1) so that no parameter is zero or repeated."""
    torch.manual_seed(seed)
    model = fla_models.RWKV7ForCausalLM(fla_models.RWKV7Config(**{**FLA_SIZES, **overrides})).eval()
    perturb_(model, 0.1, seed=seed)
    return model


def make_ours(seed: int = 1) -> RWKV7ForCausalLM:
    torch.manual_seed(seed)
    model = RWKV7ForCausalLM(
        RWKV7Config(
            vocab_size=V,
            hidden_size=C,
            num_hidden_layers=L,
            head_size=N,
            intermediate_size=224,
            decay_low_rank_dim=32,
            a_low_rank_dim=32,
            v_low_rank_dim=16,
            gate_low_rank_dim=48,
        )
    ).eval()
    perturb_(model, 0.1, seed=seed)
    return model


def ids(seed: int = 2, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("length", [12, 70])  # fla's recurrent path (< 64 tokens, no grad) and its chunked one
def test_from_fla_gives_fla_logits(tmp_path, monkeypatch, length):
    fla_reference_ops(monkeypatch)
    fla = make_fla()
    fla.save_pretrained(tmp_path / "fla")
    ours = RWKV7ForCausalLM.from_fla(tmp_path / "fla")
    assert ours.dtype == torch.float32 and ours.config.model_type == "wuneng_rwkv7"
    tokens = ids(length=length)
    ref = fla_logits(fla, tokens)
    assert rel_err(our_logits(ours, tokens), ref) < TOL
    assert rel_err(our_logits(ours.double(), tokens), ref) < TOL  # float64 ours against fla's float32 reference


def test_from_fla_maps_each_parameter(tmp_path):
    """Parameter by parameter, written out by hand (not through the converter's table)."""
    fla = make_fla()
    fla.save_pretrained(tmp_path / "fla")
    ours = RWKV7ForCausalLM.from_fla(tmp_path / "fla")
    for name, p in ours.named_parameters():  # real, contiguous, trainable tensors of its own
        assert p.is_contiguous() and not p.is_meta and p.requires_grad, name
    f, o = fla.model, ours.model
    assert torch.equal(o.emb.weight, f.embeddings.weight) and torch.equal(ours.head.weight, fla.lm_head.weight)
    assert torch.equal(o.blocks[0].ln0.bias, f.layers[0].pre_norm.bias) and torch.equal(o.ln_out.weight, f.norm.weight)
    for i in range(L):
        fa, oa = f.layers[i].attn, o.blocks[i].att
        assert torch.equal(o.blocks[i].ln1.weight, f.layers[i].attn_norm.weight)
        assert torch.equal(o.blocks[i].ln2.bias, f.layers[i].ffn_norm.bias)
        for x in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            assert torch.equal(getattr(oa, x), getattr(fa, x).reshape(C))
        assert torch.equal(oa.k_k, fa.k_k) and torch.equal(oa.k_a, fa.k_a) and torch.equal(oa.r_k, fa.r_k)
        assert torch.equal(oa.receptance.weight, fa.r_proj.weight) and torch.equal(oa.output.weight, fa.o_proj.weight)
        assert torch.equal(oa.w1, fa.w_lora.lora[0].weight.t()) and torch.equal(oa.w2, fa.w_lora.lora[2].weight.t())
        assert torch.equal(oa.w0, fa.w_lora.lora[2].bias) and torch.equal(oa.a0, fa.a_lora.lora[2].bias)
        assert torch.equal(oa.g1, fa.g_lora.lora[0].weight.t()) and torch.equal(oa.g2, fa.g_lora.lora[2].weight.t())
        assert torch.equal(oa.ln_x.weight, fa.g_norm.weight) and oa.ln_x.eps == fa.g_norm.eps
        if i > 0:
            assert torch.equal(oa.v2, fa.v_lora.lora[2].weight.t()) and torch.equal(oa.v0, fa.v_lora.lora[2].bias)
        else:  # fla's first layer has no value-residual LoRA; ours (unused there) is zeros
            assert not hasattr(fa, "v_lora") and not oa.v0.any() and not oa.v1.any() and not oa.v2.any()
        assert torch.equal(o.blocks[i].ffn.x_k, f.layers[i].ffn.x_k)
        assert torch.equal(o.blocks[i].ffn.value.weight, f.layers[i].ffn.value.weight)


def test_to_fla_loads_into_fla_with_strict_keys_and_same_logits(tmp_path, monkeypatch):
    fla_reference_ops(monkeypatch)
    ours = make_ours()
    out = ours.to_fla(tmp_path / "fla")
    config = json.loads((tmp_path / "fla" / "config.json").read_text())
    assert config["model_type"] == "rwkv7" and config["head_dim"] == N and config["norm_eps"] == 1e-5
    fla, info = fla_models.RWKV7ForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    fresh = fla_models.RWKV7ForCausalLM(fla_models.RWKV7Config.from_pretrained(out))
    fresh.load_state_dict(load_file(os.path.join(out, "model.safetensors")), strict=True)
    fla.config.fuse_norm = False  # the fused norms are Triton: rebuild the CPU variant with the loaded weights
    cpu_fla = fla_models.RWKV7ForCausalLM(fla.config).eval()
    cpu_fla.load_state_dict(fla.state_dict(), strict=True)
    tokens = ids(length=20)
    assert rel_err(our_logits(ours, tokens), fla_logits(cpu_fla, tokens)) < TOL


def test_round_trip_ours_fla_ours_is_identical(tmp_path):
    ours = make_ours()
    ours.to_fla(tmp_path / "fla")
    back = RWKV7ForCausalLM.from_fla(tmp_path / "fla")
    unused = ours.unused_parameter_names()  # layer 0's v0/v1/v2: not in fla's layout, zeros after the trip
    assert unused == {"model.blocks.0.att.v0", "model.blocks.0.att.v1", "model.blocks.0.att.v2"}
    a, b = ours.state_dict(), back.state_dict()
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a if k not in unused)
    tokens = ids()
    assert torch.equal(our_logits(ours, tokens), our_logits(back, tokens))
    # and the fla folder read back and written again is the same file content
    back.to_fla(tmp_path / "again")
    first, second = (
        load_file(str(tmp_path / "fla" / "model.safetensors")),
        load_file(str(tmp_path / "again" / "model.safetensors")),
    )
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)


def test_tied_embeddings_and_no_norm_bias_import(tmp_path, monkeypatch):
    fla_reference_ops(monkeypatch)
    fla = make_fla(seed=3, tie_word_embeddings=True, norm_bias=False)
    fla.save_pretrained(tmp_path / "fla")
    assert "lm_head.weight" not in load_file(str(tmp_path / "fla" / "model.safetensors"))
    ours = RWKV7ForCausalLM.from_fla(tmp_path / "fla")
    assert torch.equal(ours.head.weight, fla.model.embeddings.weight) and not ours.model.ln_out.bias.any()
    assert ours.head.weight.data_ptr() != ours.model.emb.weight.data_ptr()  # untied: a copy, not shared storage
    tokens = ids(length=16)
    assert rel_err(our_logits(ours, tokens), fla_logits(fla, tokens)) < TOL


def test_first_fla_layout_with_stacked_mixes_is_read(tmp_path):
    """fla's first RWKV-7 layout stacked the six token-shift mixes as attn.x_x [6, C] (fla migrates it on load)."""
    from safetensors.torch import save_file

    fla = make_fla()
    fla.save_pretrained(tmp_path / "fla")
    file = str(tmp_path / "fla" / "model.safetensors")
    weights = load_file(file)
    for i in range(L):
        names = [f"model.layers.{i}.attn.{x}" for x in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")]
        weights[f"model.layers.{i}.attn.x_x"] = torch.stack([weights.pop(n).reshape(C) for n in names])
    save_file(weights, file, metadata={"format": "pt"})
    ours = RWKV7ForCausalLM.from_fla(tmp_path / "fla")
    for i in range(L):
        assert torch.equal(ours.model.blocks[i].att.x_v, fla.model.layers[i].attn.x_v.reshape(C))
        assert torch.equal(ours.model.blocks[i].att.x_g, fla.model.layers[i].attn.x_g.reshape(C))


def test_bf16_checkpoint_keeps_its_dtype(tmp_path):
    make_fla().to(torch.bfloat16).save_pretrained(tmp_path / "fla")
    assert RWKV7ForCausalLM.from_fla(tmp_path / "fla").dtype == torch.bfloat16
    assert RWKV7ForCausalLM.from_fla(tmp_path / "fla", dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize(
    "field, value, phrase",
    [
        ("norm_first", False, "norm_first"),
        ("hidden_act", "swish", "hidden_act"),
        ("attn", {"layers": [1], "num_heads": 2}, "attn"),
        ("value_dim", 2 * C, "value_dim"),
        ("norm_eps", 1e-6, "norm_eps"),
        ("model_type", "gla", "model_type"),
    ],
)
def test_unrepresentable_fla_configs_are_refused_naming_the_key(tmp_path, field, value, phrase):
    make_fla().save_pretrained(tmp_path / "fla")
    path = tmp_path / "fla" / "config.json"
    config = json.loads(path.read_text())
    config[field] = value
    path.write_text(json.dumps(config))
    with pytest.raises(FlaConfigError, match=phrase) as err:
        RWKV7ForCausalLM.from_fla(tmp_path / "fla")
    assert "\n" not in str(err.value)


def test_wrong_weights_are_listed(tmp_path):
    from safetensors.torch import save_file

    make_fla().save_pretrained(tmp_path / "fla")
    file = str(tmp_path / "fla" / "model.safetensors")
    weights = load_file(file)
    del weights["model.layers.1.attn.k_k"]
    weights["model.layers.2.attn.r_k"] = torch.zeros(4, 32)
    save_file(weights, file, metadata={"format": "pt"})
    with pytest.raises(
        FlaConfigError, match=r"missing keys \(1\): \['model.layers.1.attn.k_k'\].*wrong shapes.*layers.2.attn.r_k"
    ):
        RWKV7ForCausalLM.from_fla(tmp_path / "fla")


def test_export_refuses_what_fla_cannot_hold(tmp_path):
    torch.manual_seed(0)
    model = RWKV7ForCausalLM(RWKV7Config(vocab_size=V, hidden_size=64, num_hidden_layers=1, head_size=32))
    with pytest.raises(FlaConfigError, match="layer_norm_eps 1e-05 with head_size 32"):
        model.to_fla(tmp_path / "fla")
    assert not (tmp_path / "fla").exists()


def test_cli_import_and_export(tmp_path, monkeypatch):
    fla_reference_ops(monkeypatch)
    fla = make_fla()
    fla.save_pretrained(tmp_path / "fla")
    result = runner.invoke(app, ["import-fla", str(tmp_path / "fla"), str(tmp_path / "ours")])
    assert result.exit_code == 0, result.output
    ours = RWKV7ForCausalLM.from_pretrained(tmp_path / "ours")
    tokens = ids()
    assert rel_err(our_logits(ours, tokens), fla_logits(fla, tokens)) < TOL
    mode = os.stat(tmp_path / "ours" / "model.safetensors").st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
    # an occupied output folder is refused (exit 2), and nothing in it changes
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["import-fla", str(tmp_path / "fla"), str(tmp_path / "occupied")])
    assert result.exit_code == 2 and (tmp_path / "occupied" / "notes.txt").read_text() == "mine"
    result = runner.invoke(app, ["export-fla", str(tmp_path / "ours"), str(tmp_path / "back"), "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    weights = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert weights["model.layers.1.attn.x_r"].dtype == torch.bfloat16
    assert torch.equal(weights["model.layers.1.attn.x_r"], fla.model.layers[1].attn.x_r.to(torch.bfloat16))
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # the input as output is refused even with --overwrite, and the input is untouched
    before = (tmp_path / "fla" / "model.safetensors").read_bytes()
    result = runner.invoke(app, ["import-fla", str(tmp_path / "fla"), str(tmp_path / "fla"), "--overwrite"])
    assert result.exit_code == 2 and (tmp_path / "fla" / "model.safetensors").read_bytes() == before
    # truncated weights: one line naming the file, exit 1, no output
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "config.json").write_bytes((tmp_path / "fla" / "config.json").read_bytes())
    (tmp_path / "cut" / "model.safetensors").write_bytes(before[: len(before) // 2])
    result = runner.invoke(app, ["import-fla", str(tmp_path / "cut"), str(tmp_path / "y")])
    assert result.exit_code == 1 and "model.safetensors" in result.output and "truncated" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "y").exists()
    # export of a folder that is not a wuneng RWKV-7: one line, exit 1
    result = runner.invoke(app, ["export-fla", str(tmp_path / "fla"), str(tmp_path / "x")])
    assert result.exit_code == 1 and "model_type" in result.output and not (tmp_path / "x").exists()
