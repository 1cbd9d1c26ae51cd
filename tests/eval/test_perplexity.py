"""Sliding-window perplexity against a per-token float64 oracle, and greedy generation."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from wuneng.eval.generation import generate_text, greedy_generate
from wuneng.eval.perplexity import perplexity, window_plan


class UniformLM(nn.Module):
    """Zero logits: every token has probability 1/V, so perplexity is exactly V."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab_size) + 0 * self.dummy)


class PrefixMeanLM(nn.Module):
    """A context-dependent causal model: logits_t = W · mean(embed(x_0..x_t)), in float64."""

    def __init__(self, vocab_size=11, dim=6):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Parameter(torch.randn(vocab_size, dim, generator=g, dtype=torch.float64))
        self.head = nn.Parameter(torch.randn(dim, vocab_size, generator=g, dtype=torch.float64))

    def forward(self, input_ids):
        e = self.embed[input_ids]  # [B, T, D]
        counts = torch.arange(1, input_ids.shape[1] + 1, dtype=torch.float64)[None, :, None]
        return SimpleNamespace(logits=(e.cumsum(1) / counts) @ self.head)


def oracle_nll(model, ids, context_length, stride):
    """Mean NLL with each token's context derived independently: tokens below W are scored from
    position 0; token i >= W belongs to window k = (i - W) // stride + 1, which ends at
    min(W + k * stride, L) and starts W tokens before its end."""
    total, count = 0.0, 0
    L = len(ids)
    for i in range(1, L):
        if i < context_length:
            begin = 0
        else:
            k = (i - context_length) // stride + 1
            begin = min(context_length + k * stride, L) - context_length
        ctx = torch.tensor([ids[begin:i]])
        logp = torch.log_softmax(model(input_ids=ctx).logits[0, -1].double(), -1)
        total -= logp[ids[i]].item()
        count += 1
    return total / count, count


def test_uniform_model_perplexity_equals_vocab_size():
    torch.manual_seed(0)
    V = 37
    ids = torch.randint(0, V, (200,))
    result = perplexity(UniformLM(V), ids, context_length=32, stride=16, batch_size=3)
    assert result.num_tokens == 199
    assert abs(result.ppl - V) / V < 1e-4
    assert result.nll == pytest.approx(math.log(V), rel=1e-6)
    several = perplexity(UniformLM(V), torch.randint(0, V, (3, 50)), context_length=16, stride=15)
    assert several.num_tokens == 3 * 49 and abs(several.ppl - V) / V < 1e-4


@pytest.mark.parametrize("length, context, stride", [(50, 16, 15), (50, 16, 5), (64, 16, 1), (17, 32, 8), (33, 8, 3)])
def test_sliding_window_matches_per_token_oracle(length, context, stride):
    torch.manual_seed(0)
    model = PrefixMeanLM()
    ids = torch.randint(0, 11, (length,)).tolist()
    expected, count = oracle_nll(model, ids, context, stride)
    for batch_size in (1, 4):
        got = perplexity(model, ids, context_length=context, stride=stride, batch_size=batch_size)
        assert got.num_tokens == count == length - 1
        assert abs(got.nll - expected) / expected < 1e-10
        assert got.ppl == pytest.approx(math.exp(expected), rel=1e-10)


def test_window_plan_tiles_every_token_once():
    for length in range(1, 40):
        for context in (2, 3, 8):
            for stride in range(1, context):
                plan = window_plan(length, context, stride)
                scored = [t for _, end, first in plan for t in range(first, end)]
                assert scored == list(range(1, length))
                assert all(0 <= begin < first and end - begin == min(context, length) for begin, end, first in plan)
                assert all(first - begin >= context - stride for begin, _, first in plan[1:])


def test_texts_with_tokenizer_and_errors():
    torch.manual_seed(0)
    model = PrefixMeanLM()
    encode = lambda s: [ord(c) % 11 for c in s]  # noqa: E731
    texts = ["abcabcabd", "hello there"]
    joined = encode("abcabcabd\n\nhello there")
    assert perplexity(model, texts=texts, tokenizer=encode, context_length=8, stride=4).nll == pytest.approx(
        perplexity(model, joined, context_length=8, stride=4).nll, rel=1e-12
    )
    apart = perplexity(model, texts=texts, tokenizer=encode, context_length=8, stride=4, concatenate=False)
    assert apart.num_tokens == len(texts[0]) - 1 + len(texts[1]) - 1
    for bad_stride in (0, 8, 9):
        with pytest.raises(ValueError, match="stride"):
            perplexity(model, joined, context_length=8, stride=bad_stride)
    with pytest.raises(ValueError, match="exactly one"):
        perplexity(model, context_length=8)
    with pytest.raises(ValueError, match="tokenizer"):
        perplexity(model, texts=texts, context_length=8)
    with pytest.raises(ValueError, match="nothing to score"):
        perplexity(model, [3], context_length=8)
    model.train()
    perplexity(model, joined, context_length=8)
    assert model.training, "the model's training mode is restored"


class CountUpLM(nn.Module):
    """Next token = (last token + 1) mod V, whatever came before."""

    def __init__(self, vocab_size=10):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, input_ids):
        nxt = (input_ids + 1) % self.vocab_size
        return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, self.vocab_size).float())


def test_greedy_generate():
    torch.manual_seed(0)
    model = CountUpLM()
    out = greedy_generate(model, [[1, 2], [5], [7, 8], [3]], max_new_tokens=4, batch_size=1)
    assert out == [[3, 4, 5, 6], [6, 7, 8, 9], [9, 0, 1, 2], [4, 5, 6, 7]]
    assert greedy_generate(model, [[1], [6]], max_new_tokens=5, stop_ids=8) == [[2, 3, 4, 5, 6], [7, 8]]
    assert greedy_generate(model, [[1]], max_new_tokens=0) == [[]]
    with pytest.raises(ValueError, match="empty"):
        greedy_generate(model, [[]], max_new_tokens=2)
    text = generate_text(
        model,
        ["12", "5"],
        encode=lambda s: [int(c) for c in s],
        decode=lambda ids: "".join(map(str, ids)),
        max_new_tokens=3,
    )
    assert text == ["345", "678"]
