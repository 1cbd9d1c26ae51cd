"""SFT masking with BPE tokenizers and chat templates: the chat is tokenised once, and the target tokens are
exactly the assistant turns (content + end-of-turn text as the template writes them).

The tokenizers are tiny byte-level BPEs trained here (tests/train/chat_tokenizers.py): Qwen2-style ChatML and
Llama-3-style headers, each with a template that has ``{% generation %}`` markers and one that has none.
"""

import json
import math

import pytest
import torch

from wuneng.tokenization import DEFAULT_CHAT_TEMPLATE, ByteLevelTokenizer, load_tokenizer
from wuneng.train.config import DataConfig
from wuneng.train.data import IGNORE_INDEX, DataError, build_dataset, encode_conversation
from wuneng.train.loop import train

from chat_tokenizers import BUILDERS, qwen2_style_tokenizer
from train_helpers import quick_config, tiny_qwen2, write_jsonl

A1 = "\n\nhello café 😀 🦀"  # starts with blank lines (ChatML merges them with the header's newline); 🦀 is unseen: bytes
A2 = "  ok 世界  "  # leading / trailing spaces (Llama 3's template trims them)
CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi 世界, add 12 + 30?"},
    {"role": "assistant", "content": A1},
    {"role": "user", "content": "  more?  "},
    {"role": "assistant", "content": A2},
]
# What each assistant run decodes to. ChatML: the first reply's leading "\n" is merged by BPE with the newline that
# ends "<|im_start|>assistant\n" into one token "\n\n", which is a target (it carries a reply character), so the
# first run starts with that header newline. Llama 3: the template trims the content; nothing merges across.
EXPECTED_RUNS = {
    "qwen2": ["\n" + A1 + "<|im_end|>\n", A2 + "<|im_end|>\n"],
    "llama3": [A1.strip() + "<|eot_id|>", A2.strip() + "<|eot_id|>"],
}

_CACHE = {}


def tokenizer_of(style: str, marked: bool = True):
    key = (style, marked)
    if key not in _CACHE:  # training the BPE takes ~0.3 s; every test reads the same seeded one
        _CACHE[key] = BUILDERS[style](marked=marked)
    return _CACHE[key]


def target_runs(ids, labels):
    """Contiguous runs of target positions -> list of id lists."""
    runs, cur = [], []
    for i, l in zip(ids, labels):
        if l != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("marked", [True, False], ids=["generation-markers", "no-markers"])
@pytest.mark.parametrize("style", ["qwen2", "llama3"])
def test_targets_are_exactly_the_assistant_turns(style, marked):
    tok = tokenizer_of(style, marked)
    rendered = tok.apply_chat_template(CHAT, tokenize=False)
    doc = encode_conversation(tok, CHAT, responses_only=True)
    # tokenised once: the ids are those of the whole rendered chat (the old piecewise encoding split "\n\n\n")
    assert doc.ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert decode(tok, doc.ids) == rendered
    runs = target_runs(doc.ids, doc.labels)
    assert [decode(tok, r) for r in runs] == EXPECTED_RUNS[style]
    assert all(l in (i, IGNORE_INDEX) for i, l in zip(doc.ids, doc.labels))  # a target carries its own id
    assert sum(len(r) for r in runs) == sum(l != IGNORE_INDEX for l in doc.labels)
    if style == "qwen2":  # the boundary case is really exercised: one token holds the header's "\n" and the reply's
        first = doc.labels.index(next(l for l in doc.labels if l != IGNORE_INDEX))
        assert decode(tok, [doc.ids[first]]) == "\n\n" and decode(tok, doc.ids[:first]).endswith("assistant")
    # every other stage (or responses_only=False) targets the whole chat, same ids
    full = encode_conversation(tok, CHAT, responses_only=False)
    assert full.ids == doc.ids and full.labels == full.ids


@pytest.mark.parametrize("style", ["qwen2", "llama3"])
def test_mask_equals_transformers_assistant_tokens_mask(style):
    tok = tokenizer_of(style, marked=True)
    out = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    doc = encode_conversation(tok, CHAT, responses_only=True)
    assert doc.ids == list(out["input_ids"])
    assert [int(l != IGNORE_INDEX) for l in doc.labels] == list(out["assistant_masks"])
    # and the template without markers gives the same mask by incremental rendering
    plain = encode_conversation(tokenizer_of(style, marked=False), CHAT, responses_only=True)
    assert plain.ids == doc.ids and plain.labels == doc.labels


FOOTER = "{%- if not add_generation_prompt -%}{{ '<|endoftext|>' }}{%- endif -%}"  # after the last message only


def test_template_that_is_not_incremental_needs_generation_markers():
    tok = qwen2_style_tokenizer(marked=False)
    tok.chat_template = tok.chat_template + FOOTER
    tok.name_or_path = "my-chatml-tokenizer"
    with pytest.raises(DataError, match=r"^c\.jsonl:7: the chat template of tokenizer .*'my-chatml-tokenizer' has no "
                       r"\{% generation %\} markers .* wrap each assistant message's content and end-of-turn token "
                       r"in \{% generation %\}\.\.\.\{% endgeneration %\}") as err:  # fmt: skip
        encode_conversation(tok, CHAT, responses_only=True, origin="c.jsonl:7")
    assert "\n" not in str(err.value)
    # with the markers the same (non-incremental) template is fine: one render, spans from the markers
    marked = qwen2_style_tokenizer(marked=True)
    marked.chat_template = marked.chat_template + FOOTER
    doc = encode_conversation(marked, CHAT, responses_only=True)
    assert [decode(marked, r) for r in target_runs(doc.ids, doc.labels)] == EXPECTED_RUNS["qwen2"]
    assert decode(marked, doc.ids).endswith("<|im_end|>\n<|endoftext|>")


def test_keys_set_to_none_are_dropped_as_apply_chat_template_does():
    tok = qwen2_style_tokenizer(marked=True)
    tok.chat_template = tok.chat_template.replace(
        "{{ '<|im_start|>assistant\\n' }}",
        "{{ '<|im_start|>assistant' + ('(' + message['name'] + ')' if message['name'] is defined else '') + '\\n' }}",
        1,
    )
    chat = [dict(m, name=None) for m in CHAT]  # e.g. a parquet row whose optional column is empty
    assert tok.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(CHAT, tokenize=False)
    assert encode_conversation(tok, chat, responses_only=True) == encode_conversation(tok, CHAT, responses_only=True)


def test_markers_that_enclose_nothing_and_slow_tokenizers_without_offsets_are_errors():
    tok = qwen2_style_tokenizer(marked=True)
    tok.chat_template = tok.chat_template.replace("message['content'] + '<|im_end|>\\n'", "''")
    with pytest.raises(DataError, match=r"has \{% generation %\} markers but they enclose no text"):
        encode_conversation(tok, CHAT, responses_only=True)

    class NoOffsets(ByteLevelTokenizer):
        encode_with_offsets = None

    with pytest.raises(
        DataError, match=r"tokenizer NoOffsets is a slow \(Python\) tokenizer that gives no character offsets"
    ):
        encode_conversation(NoOffsets(), CHAT, responses_only=True)


@pytest.mark.parametrize("style", ["qwen2", "llama3"])
def test_truncation_at_seq_len_keeps_masks_aligned(style):
    tok = tokenizer_of(style)
    doc = encode_conversation(tok, CHAT, responses_only=True)
    second = max(i for i, l in enumerate(doc.labels) if l != IGNORE_INDEX and doc.labels[i - 1] == IGNORE_INDEX)
    seq_len = second + 1  # cut after the first token of the second reply
    packed = build_dataset(DataConfig(seq_len=seq_len), tok, "sft", [[{"messages": CHAT}]])
    assert len(packed) == 1 and packed.num_truncated == 1
    assert packed.input_ids[0].tolist() == doc.ids[:seq_len]
    assert packed.labels[0].tolist() == doc.labels[:seq_len]
    runs = target_runs(packed.input_ids[0].tolist(), packed.labels[0].tolist())
    assert decode(tok, runs[0]) == EXPECTED_RUNS[style][0]
    assert EXPECTED_RUNS[style][1].startswith(decode(tok, runs[1])) and len(runs[1]) == 1


def test_byte_tokenizer_offsets_and_unchanged_sft_mask(tokenizer):
    text = "a<eos>é世\n<bos>😀"
    ids, offsets = tokenizer.encode_with_offsets(text)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert offsets == [(0, 1), (1, 6), (6, 7), (6, 7), (7, 8), (7, 8), (7, 8), (8, 9), (9, 14)] + [(14, 15)] * 4
    # the byte tokenizer's template has no markers: a reply is its content + "<eos>\n", as before
    doc = encode_conversation(tokenizer, CHAT, responses_only=True)
    assert doc.ids == tokenizer(tokenizer.apply_chat_template(CHAT, tokenize=False))["input_ids"]
    assert [tokenizer.decode(r) for r in target_runs(doc.ids, doc.labels)] == [A1 + "<eos>\n", A2 + "<eos>\n"]
    # the same template with markers around content + "<eos>\n" gives the same mask (marker path, slow tokenizer)
    marked = DEFAULT_CHAT_TEMPLATE.replace("{{ message['role'] + ': ' + message['content'] + eos_token + '\n' }}",
                                           "{{ message['role'] + ': ' }}{% if message['role'] == 'assistant' %}{% generation %}"
                                           "{{ message['content'] + eos_token + '\n' }}{% endgeneration %}"
                                           "{% else %}{{ message['content'] + eos_token + '\n' }}{% endif %}")  # fmt: skip
    assert marked != DEFAULT_CHAT_TEMPLATE
    assert encode_conversation(ByteLevelTokenizer(chat_template=marked), CHAT, responses_only=True) == doc


def test_sft_stage_runs_with_a_saved_bpe_tokenizer_folder(tmp_path):
    tok = qwen2_style_tokenizer(marked=True)
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.is_fast and loaded.chat_template == tok.chat_template
    chats = [
        {"messages": [{"role": "user", "content": f"add {a} {b}"}, {"role": "assistant", "content": f"{a + b} 世界"}]}
        for a in range(6)
        for b in range(4)
    ]
    data = write_jsonl(tmp_path / "chats.jsonl", chats)
    cfg = quick_config(tmp_path / "run", stage="sft", micro_batch_size=4, max_steps=40, save_every=1000,
                       tokenizer=str(tmp_path / "tok"), data=DataConfig(sources=[str(data)], seq_len=80))  # fmt: skip
    torch.manual_seed(0)
    result = train(cfg, model=tiny_qwen2(vocab_size=len(tok)))
    curve = [h["loss"] for h in result.history]
    assert len(curve) == 40 and all(math.isfinite(v) for v in curve)
    assert curve[-1] < 0.7 * curve[0], curve
    # what the stage trained on: each row's targets are the reply + "<|im_end|>\n" of one chat
    packed = build_dataset(cfg.data, loaded, "sft")
    first = json.loads(data.read_text(encoding="utf-8").splitlines()[0])["messages"][1]["content"]
    row = packed.labels[0]
    assert decode(loaded, row[row != IGNORE_INDEX].tolist()) == first + "<|im_end|>\n"
