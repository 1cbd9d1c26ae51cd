"""The byte-level tokenizer: ids, round trips, specials, chat template, save/load without network."""

import json

import pytest

from wuneng.tokenization import BYTE_VOCAB_SIZE, ByteLevelTokenizer, load_tokenizer


def test_ids_are_utf8_bytes_and_specials_follow(tokenizer):
    text = "héllo, 世界!"
    ids = tokenizer(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (256, 257, 258)
    assert len(tokenizer) == BYTE_VOCAB_SIZE == 259
    assert tokenizer.decode(ids) == text


def test_special_strings_in_text_become_special_ids(tokenizer):
    ids = tokenizer("a<eos>b")["input_ids"]
    assert ids == [97, 258, 98]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab"


def test_invalid_utf8_decodes_with_replacement(tokenizer):
    assert tokenizer.decode([0xC3]) == "\ufffd"  # half a character: replaced, never an exception


def test_bos_eos_options_and_padding():
    tok = ByteLevelTokenizer(prepend_bos=True, append_eos=True)
    assert tok("ab")["input_ids"] == [257, 97, 98, 258]
    batch = tok(["a", "abc"], padding=True)
    assert batch["input_ids"][0] == [257, 97, 258, 256, 256]
    assert batch["attention_mask"][0] == [1, 1, 1, 0, 0]


def test_save_and_load_round_trip(tmp_path):
    tok = ByteLevelTokenizer(prepend_bos=True)
    tok.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "ByteLevelTokenizer"
    loaded = load_tokenizer(tmp_path)
    assert type(loaded) is ByteLevelTokenizer
    assert loaded("xé")["input_ids"] == [257, 120, 195, 169]
    assert loaded.chat_template == tok.chat_template
    assert len(loaded) == 259


def test_chat_template_prefix_property(tokenizer):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "q"}]
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert full == "user: hi<eos>\nassistant: yo<eos>\nuser: q<eos>\n"
    prompt = tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert full.startswith(prompt) and prompt.endswith("assistant: ")


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_tokenizer(tmp_path / "missing")
    assert type(load_tokenizer("byte")) is ByteLevelTokenizer
