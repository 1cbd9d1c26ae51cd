"""SFT rows packed with document boundaries (issue 16 item 3; docs/training.md "Document-aware packing"): the rows
carry position_ids restarting at 0 per conversation by default, the training forward passes them, and the loss of
a packed batch equals the sum of its conversations' losses run alone.

Metric: |packed - sum alone| / |sum alone| of the summed next-token cross-entropy (computed in float32 by the
objective, models in float64); threshold 1e-5 (float32 summation order).
"""

from __future__ import annotations

import pytest
import torch

from wuneng.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM
from wuneng.tokenization import ByteLevelTokenizer
from wuneng.train.config import ConfigError, DataConfig, TrainConfig, validate
from wuneng.train.data import build_dataset, encode_record, iter_records
from wuneng.train.stages import CausalLMObjective, shifted_cross_entropy_sum

from _helpers import perturb_
from train_helpers import tiny_qwen2

CHATS = [
    {"messages": [{"role": "user", "content": "add 2 3"}, {"role": "assistant", "content": "5"}]},
    {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello there"},
            {"role": "user", "content": "name?"},
            {"role": "assistant", "content": "rwkv"},
        ]
    },
    {"messages": [{"role": "user", "content": "3 times 4"}, {"role": "assistant", "content": "twelve"}]},
    {"messages": [{"role": "user", "content": "colour of sky"}, {"role": "assistant", "content": "blue"}]},
]
SEQ_LEN = 176
TOL = 1e-5


def packed_sft(document_boundaries=None):
    tok = ByteLevelTokenizer()
    cfg = DataConfig(seq_len=SEQ_LEN, document_boundaries=document_boundaries)
    return tok, build_dataset(cfg, tok, "sft", extra_sources=[CHATS])


def alone_batches(tok):
    """Each conversation tokenised alone, as the sft stage does: (input_ids [1, n], labels [1, n])."""
    docs = [encode_record(r, tok, responses_only=True) for r in iter_records(CHATS, DataConfig(seq_len=SEQ_LEN))]
    return [(torch.tensor([d.ids]), torch.tensor([d.labels])) for d in docs]


def tiny_rwkv7():
    torch.manual_seed(0)
    cfg = RWKV7Config(vocab_size=272, hidden_size=32, num_hidden_layers=2, head_size=16)
    return perturb_(RWKV7ForCausalLM(cfg).double(), 0.2, seed=1).train()


def tiny_wuneng():
    from wuneng.models.wuneng import WuNengForCausalLM

    student = WuNengForCausalLM.from_teacher(
        tiny_qwen2(vocab_size=272, hidden=64).double(), fusion="gate", middle_heads=2
    )
    return perturb_(student, 0.2, only=student.new_parameter_names().__contains__, seed=1).train()


def tiny_transformers_qwen2():
    # noise on every weight: at its init (std 0.02) the tiny model's logits hardly depend on the context
    return perturb_(tiny_qwen2(vocab_size=272).double(), 0.2, seed=1).train()


def test_sft_rows_carry_restarting_position_ids_by_default():
    tok, data = packed_sft()
    assert data.position_ids is not None and len(data) == 1  # the four conversations share one row
    lengths = [ids.shape[1] for ids, _ in alone_batches(tok)]
    expected = torch.cat([torch.arange(n) for n in lengths] + [torch.arange(SEQ_LEN - sum(lengths))])
    assert torch.equal(data.position_ids[0], expected)
    assert torch.equal(data.batch([0])["position_ids"], expected.unsqueeze(0))
    # off on request, and off by default for pretraining
    assert packed_sft(document_boundaries=False)[1].position_ids is None
    text = build_dataset(DataConfig(seq_len=SEQ_LEN), tok, "pretrain", extra_sources=[["ab", "cd"]])
    assert text.position_ids is None and "position_ids" not in text.batch([0])


@pytest.mark.parametrize("build", [tiny_rwkv7, tiny_wuneng, tiny_transformers_qwen2], ids=["rwkv7", "wuneng", "qwen2"])
def test_packed_sft_loss_equals_conversations_alone(build):
    model = build()
    tok, data = packed_sft()
    objective = CausalLMObjective(model)
    packed = objective(data.batch([0]))["loss_sum"].item()
    alone = sum(
        shifted_cross_entropy_sum(model(input_ids=ids).logits, labels)[0].item() for ids, labels in alone_batches(tok)
    )
    assert abs(packed - alone) / abs(alone) < TOL
    # the test can fail: without the boundaries the later conversations see the earlier ones
    _, plain = packed_sft(document_boundaries=False)
    unpacked = objective(plain.batch([0]))["loss_sum"].item()
    assert abs(unpacked - alone) / abs(alone) > 1e-3


def test_concat_packing_continues_a_cut_document_and_streams_match():
    """concat rows cut documents: a document continued in the next row continues its positions; the streamed rows
    (data.streaming) carry the same position_ids as the eager ones, for concat pretraining and greedy SFT."""
    from wuneng.train.streaming import open_stream

    tok = ByteLevelTokenizer()
    texts = ["abcdefghij", "klmno", "pqrstuvwxyzab"]  # 11, 6, 14 tokens with <eos>
    cfg = DataConfig(seq_len=8, packing="concat", document_boundaries=True)
    data = build_dataset(cfg, tok, "pretrain", extra_sources=[texts])
    expected = list(range(11)) + list(range(6)) + list(range(14))
    rows = data.position_ids.reshape(-1)[: len(expected)].tolist()
    assert rows == expected and data.position_ids[-1, -1].item() == 0  # the last row: 7 tokens and one of padding
    for cfg_stream, stage, sources in (
        (DataConfig(seq_len=8, packing="concat", document_boundaries=True, streaming=True), "pretrain", texts),
        (DataConfig(seq_len=SEQ_LEN // 2, streaming=True), "sft", CHATS),
    ):
        eager = build_dataset(DataConfig(**{**cfg_stream.__dict__, "streaming": False}), tok, stage, [sources])
        stream = open_stream(cfg_stream, tok, stage, [sources])
        try:
            streamed = stream.next_rows(len(eager))
        finally:
            stream.close()
        assert torch.equal(streamed.input_ids, eager.input_ids)
        assert eager.position_ids is not None and torch.equal(streamed.position_ids, eager.position_ids)


def test_document_boundaries_config_errors():
    with pytest.raises(ConfigError, match="config.data.document_boundaries: applies to the pretrain and sft stages"):
        validate(TrainConfig(stage="distill", data=DataConfig(document_boundaries=True)), has_teacher=True)
