"""fla-hub interop on a GPU: flash-linear-attention's own RWKV7ForCausalLM, with its real Triton kernels and fused
norms (``fuse_norm=True``, its default), against our model read with ``from_fla`` (and our export read by fla).

Run by scripts/gpu_check.sh (issue 19; it collects tests/cuda); skipped without CUDA or fla. The CPU tests in
tests/models/test_fla_interop.py compare with fla's pure-PyTorch references instead. Logits relative error
``||x - ref|| / ||ref||`` of fla on CUDA against ours in float32 on the CPU: 5e-3, tests/cuda/test_cuda_models.py's
float32 CUDA threshold (fla's float32 kernels may use TF32 dots).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from wuneng import RWKV7Config, RWKV7ForCausalLM

from _helpers import perturb_, rel_err

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
fla_models = pytest.importorskip("fla.models", reason="flash-linear-attention is not installed")
warnings.filterwarnings("ignore", message=".*potentially buggy FLA implementation.*")

V, TOL = 97, 5e-3
SIZES = dict(decay_low_rank_dim=32, a_low_rank_dim=32, v_low_rank_dim=16, gate_low_rank_dim=48, intermediate_size=224)


def tokens(length: int) -> torch.Tensor:
    return torch.randint(0, V, (2, length), generator=torch.Generator().manual_seed(length))


@pytest.mark.parametrize("length", [20, 130])  # fla's recurrent kernel (< 64 tokens, no grad) and its chunked one
def test_fla_on_cuda_matches_from_fla(tmp_path, length):
    torch.manual_seed(0)
    fla = fla_models.RWKV7ForCausalLM(
        fla_models.RWKV7Config(vocab_size=V, hidden_size=128, num_hidden_layers=3, head_dim=64, **SIZES)
    )
    perturb_(fla, 0.1, seed=0)
    fla.save_pretrained(tmp_path / "fla")
    ours = RWKV7ForCausalLM.from_fla(tmp_path / "fla").eval()
    ids = tokens(length)
    with torch.no_grad():
        ref = ours(ids, use_cache=False).logits
        out = fla.cuda().eval()(ids.cuda(), use_cache=False).logits.float().cpu()
        ours_gpu = ours.cuda()(ids.cuda(), use_cache=False).logits.cpu()
    assert rel_err(out, ref) <= TOL
    assert rel_err(ours_gpu, ref) <= TOL


def test_to_fla_runs_in_fla_on_cuda(tmp_path):
    torch.manual_seed(1)
    ours = RWKV7ForCausalLM(
        RWKV7Config(vocab_size=V, hidden_size=128, num_hidden_layers=3, head_size=64, **SIZES)
    ).eval()
    perturb_(ours, 0.1, seed=1)
    ours.to_fla(tmp_path / "fla")
    fla, info = fla_models.RWKV7ForCausalLM.from_pretrained(tmp_path / "fla", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = tokens(70)
    with torch.no_grad():
        ref = ours(ids, use_cache=False).logits
        out = fla.cuda().eval()(ids.cuda(), use_cache=False).logits.float().cpu()
    assert rel_err(out, ref) <= TOL
