"""Document-aware packing (issue 16 item 3, docs/training.md "Document-aware packing"): a packed row whose
``position_ids`` restart at 0 per document gives the logits and the gradients of its documents run one by one.

Metric: max |packed - alone| over the logits, and over every parameter's gradient of a loss that weights each
logit by a fixed random number, in float64; threshold 1e-10 (the packed and the one-by-one forward differ only in
summation order).
"""

from __future__ import annotations

import pytest
import torch

from wuneng.cache import RecurrentStateCache
from wuneng.models.metastate import MetaStateConfig, MetaStateForCausalLM
from wuneng.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM

from _helpers import perturb_

V, C, L, N = 48, 32, 2, 16
LENGTHS = (5, 7, 4)  # three documents in one row of 16 tokens
TOL = 1e-10


def rwkv7(wkv_impl: str) -> RWKV7ForCausalLM:
    torch.manual_seed(0)
    cfg = RWKV7Config(vocab_size=V, hidden_size=C, num_hidden_layers=L, head_size=N, wkv_impl=wkv_impl)
    return perturb_(RWKV7ForCausalLM(cfg).double(), 0.2, seed=1)


def metastate(wkv_impl: str) -> MetaStateForCausalLM:
    torch.manual_seed(0)
    cfg = MetaStateConfig(vocab_size=V, hidden_size=C, num_hidden_layers=L, head_size=N, wkv_impl=wkv_impl)
    return perturb_(MetaStateForCausalLM(cfg).double(), 0.2, seed=1)


def packed_row(lengths=LENGTHS, seed: int = 2):
    """(documents [1, n_i] each, input_ids [1, T], position_ids [1, T] restarting at 0 per document)."""
    gen = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, V, (1, n), generator=gen) for n in lengths]
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    return docs, torch.cat(docs, dim=1), positions


def logits_and_grads(model, calls, weights):
    """Sum over ``calls`` (keyword dicts) of (logits * weights-slice).sum(); returns (logits [1, T, V] joined
    along T, {name: grad})."""
    model.zero_grad(set_to_none=True)
    outs, start = [], 0
    total = 0.0
    for kwargs in calls:
        logits = model(**kwargs, use_cache=False).logits
        T = logits.shape[1]
        total = total + (logits * weights[:, start : start + T]).sum()
        outs.append(logits)
        start += T
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat(outs, dim=1), grads


def assert_packed_equals_alone(model):
    docs, ids, positions = packed_row()
    weights = torch.randn(1, ids.shape[1], V, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    packed, g_packed = logits_and_grads(model, [dict(input_ids=ids, position_ids=positions)], weights)
    alone, g_alone = logits_and_grads(model, [dict(input_ids=d) for d in docs], weights)
    assert (packed - alone).abs().max().item() < TOL
    assert g_packed.keys() == g_alone.keys() and len(g_alone) > 0
    worst = max((g_packed[n] - g_alone[n]).abs().max().item() for n in g_alone)
    assert worst < TOL
    # the test can fail: without position_ids the documents see each other
    unpacked = model(input_ids=ids, use_cache=False).logits
    assert (unpacked - alone).abs().max().item() > 1e-3


@pytest.mark.parametrize("wkv_impl", ["auto", "chunked", "reference"])
def test_rwkv7_packed_row_equals_documents_alone(wkv_impl):
    assert_packed_equals_alone(rwkv7(wkv_impl))


@pytest.mark.parametrize("wkv_impl", ["auto", "chunked"])
def test_metastate_packed_row_equals_documents_alone(wkv_impl):
    assert_packed_equals_alone(metastate(wkv_impl))


@pytest.mark.parametrize("build", [rwkv7, metastate])
def test_packed_batch_of_rows(build):
    """Two rows [2, T], each packing its own documents (a row may start mid-document: positions not from 0)."""
    model = build("auto")
    docs_a, ids_a, pos_a = packed_row((6, 10), seed=4)
    docs_b, ids_b, pos_b = packed_row((3, 9, 4), seed=5)
    pos_a = pos_a.clone()
    pos_a[0, :6] += 7  # the first document of row a continues one that began before the row (positions 7..12)
    with torch.no_grad():
        packed = model(
            input_ids=torch.cat([ids_a, ids_b]), position_ids=torch.cat([pos_a, pos_b]), use_cache=False
        ).logits
        alone_a = torch.cat([model(input_ids=d, use_cache=False).logits for d in docs_a], dim=1)
        alone_b = torch.cat([model(input_ids=d, use_cache=False).logits for d in docs_b], dim=1)
    assert (packed[0] - alone_a[0]).abs().max().item() < TOL
    assert (packed[1] - alone_b[0]).abs().max().item() < TOL


@pytest.mark.parametrize("build", [rwkv7, metastate])
def test_position_ids_without_documents_change_nothing(build):
    """Contiguous positions (what generate() passes), padding, and a continued cache leave the forward as it was."""
    model = build("auto").eval()
    _, ids, positions = packed_row()
    T = ids.shape[1]
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=False).logits
        same = model(input_ids=ids, position_ids=torch.arange(T).unsqueeze(0), use_cache=False).logits
        assert torch.equal(plain, same)
        # with padding, position_ids are not read (transformers' packed-sequence rule: no padding mask)
        mask = torch.ones(1, T, dtype=torch.long)
        mask[0, :2] = 0
        padded = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        padded_pos = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        assert torch.equal(padded, padded_pos)
        # continuing a cache: the cached state is the row's continuation, position_ids are not read
        cache = RecurrentStateCache(L)
        model(input_ids=ids[:, :4], past_key_values=cache, use_cache=True)
        tail = model(input_ids=ids[:, 4:], past_key_values=cache, position_ids=positions[:, 4:] * 0, use_cache=True)
        full = model(input_ids=ids, use_cache=False).logits
        assert (tail.logits - full[:, 4:]).abs().max().item() < TOL


def test_document_starts_rule_and_errors():
    from wuneng.layers.rwkv7 import document_starts

    pos = torch.tensor([[0, 1, 2, 0, 1, 5, 6], [3, 4, 5, 6, 7, 8, 9]])
    starts = document_starts(pos, 2, 7)
    assert starts.tolist() == [[False, False, False, True, False, True, False], [False] * 7]
    assert document_starts(torch.arange(7).unsqueeze(0), 2, 7) is None
    assert document_starts(None, 2, 7) is None
    with pytest.raises(ValueError, match=r"position_ids must be an integer tensor \[B, T\] = \[2, 7\]"):
        document_starts(torch.zeros(2, 6, dtype=torch.long), 2, 7)


# -- WuNeng: the teacher's attention is block-diagonal by transformers; the state side restarts by the model -------
def wuneng_student(layer_kinds, **options):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from wuneng.models.wuneng import WuNengForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    teacher = Qwen2ForCausalLM(cfg).double()
    student = WuNengForCausalLM.from_teacher(teacher, layer_kinds=layer_kinds, **options)
    # noise on the new parameters (zero-initialised paths), so that the state side changes the logits
    return perturb_(student, 0.2, only=student.new_parameter_names().__contains__, seed=1)


@pytest.mark.parametrize(
    "layer_kinds,options",
    [
        (["hybrid", "hybrid", "attention"], dict(fusion="gate", middle_heads=2)),
        (["hybrid", "arwkv", "hybrid"], dict(fusion="concat", middle_heads=0)),
        (["arwkv", "arwkv", "attention"], dict()),  # an ARWKV student
    ],
    ids=["hybrid", "mixed", "arwkv"],
)
def test_wuneng_packed_row_equals_documents_alone(layer_kinds, options):
    student = wuneng_student(layer_kinds, **options).train()  # a training forward: no cache (dropout is 0)
    assert_packed_equals_alone(student)


def test_wuneng_packed_row_inference_path():
    """Without autograd the hybrid mixer takes its batched low-rank path; it restarts at the documents too."""
    student = wuneng_student(["hybrid", "arwkv", "hybrid"], fusion="gate", middle_heads=2).eval()
    docs, ids, positions = packed_row()
    with torch.no_grad():
        packed = student(input_ids=ids, position_ids=positions, use_cache=False).logits
        alone = torch.cat([student(input_ids=d, use_cache=False).logits for d in docs], dim=1)
    assert (packed - alone).abs().max().item() < TOL


@pytest.mark.parametrize("build", ["rwkv7", "metastate", "wuneng"])
def test_trl_padding_free_batch_equals_documents_alone(build):
    """TRL's padding-free collator (``SFTConfig(padding_free=True)``, also what ``packing=True`` trains on): one row,
    ``position_ids`` restarting per sequence, no attention mask, its extra flash-attention keywords passed along. The
    model's mean loss over the row equals the documents' summed losses alone over their label count (relative 1e-6:
    the RWKV-7 family computes its loss in float32), the logits within 1e-10."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = {
        "rwkv7": lambda: rwkv7("auto"),
        "metastate": lambda: metastate("auto"),
        "wuneng": lambda: wuneng_student(["hybrid", "arwkv", "hybrid"], fusion="gate", middle_heads=2),
    }[build]().train()
    docs, _, _ = packed_row()
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": d[0].tolist()} for d in docs]
    )
    assert (
        batch["position_ids"].tolist() == [[t for d in docs for t in range(d.shape[1])]]
        and "attention_mask" not in batch
    )
    with torch.no_grad():
        packed = model(**batch, use_cache=False)
        alone = [model(input_ids=d, labels=d, use_cache=False) for d in docs]
    labelled = sum(d.shape[1] - 1 for d in docs)
    expected = sum(out.loss.item() * (d.shape[1] - 1) for out, d in zip(alone, docs)) / labelled
    assert abs(packed.loss.item() - expected) / expected < 1e-6  # RWKV-7's loss is computed in float32
    assert (packed.logits - torch.cat([out.logits for out in alone], dim=1)).abs().max().item() < TOL
