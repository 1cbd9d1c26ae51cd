"""Data sources, error messages naming file and line, packing, and SFT masks."""

import pytest

from wuneng.train.config import DataConfig
from wuneng.train.data import (
    IGNORE_INDEX,
    DataError,
    Document,
    build_dataset,
    encode_conversation,
    iter_records,
    pack_documents,
)

from train_helpers import write_jsonl


def cfg(**kw):
    return DataConfig(**kw)


# ---------------------------------------------------------------------------------- bad files
def test_empty_file(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text("  \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.txt: the file is empty"):
        list(iter_records(p, cfg()))


def test_not_utf8_names_file_and_line(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("line one\nline two\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt:3: not valid UTF-8"):
        list(iter_records(p, cfg()))


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n\n{"text": "fine"}\n{"text": broken}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:4: not valid JSON"):
        list(iter_records(p, cfg()))


@pytest.mark.parametrize(
    "row, message",
    [
        ({"body": "x"}, r"d\.jsonl:1: a record needs a 'text' string"),
        ({"text": 3}, r"d\.jsonl:1: field 'text' must be a string"),
        ({"messages": [{"role": "user"}]}, r"d\.jsonl:1: message 0 must be an object"),
        ([1.5, 2], r"d\.jsonl:1: expected a text, a record"),
    ],
)
def test_bad_records(tmp_path, row, message):
    p = write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(DataError, match=message):
        list(iter_records(p, cfg()))


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        list(iter_records(tmp_path / "nope.txt", cfg()))
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match="has no text"):
        list(iter_records(tmp_path / "sub", cfg()))


# ---------------------------------------------------------------------------------- sources
def test_folder_text_units_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("p1 l1\np1 l2\n\np2\n", encoding="utf-8")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "t"}, {"prompt": "q", "response": "r"}, [5, 6]])
    recs = list(iter_records(tmp_path, cfg(text_unit="paragraph")))
    assert [r.text for r in recs[:2]] == ["p1 l1\np1 l2", "p2\n"]
    assert recs[2].text == "t" and recs[2].origin.endswith("b.jsonl:1")
    assert recs[3].messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]
    assert recs[4].token_ids == [5, 6]
    assert [r.text for r in iter_records(tmp_path / "a.txt", cfg(text_unit="line"))] == ["p1 l1", "p1 l2", "p2"]


def test_python_source_and_iterables(tmp_path, monkeypatch):
    (tmp_path / "my_gen.py").write_text("def texts(n):\n    return [f'sample {i}' for i in range(n)]\nNAME = 'x'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recs = list(iter_records("python:my_gen:texts", cfg(generator_kwargs={"n": 2})))
    assert [r.text for r in recs] == ["sample 0", "sample 1"]
    with pytest.raises(DataError, match="expected an iterable of texts/records, got str"):
        list(iter_records("python:my_gen:NAME", cfg()))
    gen = lambda: (f"doc {i}" for i in range(3))  # noqa: E731
    assert [r.text for r in iter_records(gen, cfg())] == ["doc 0", "doc 1", "doc 2"]
    with pytest.raises(DataError, match="cannot import"):
        list(iter_records("python:no_such_module:f", cfg()))


def test_hf_datasets_folder(tmp_path, tokenizer):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["alpha", "beta"]}).save_to_disk(str(tmp_path / "ds"))
    recs = list(iter_records(tmp_path / "ds", cfg()))
    assert [r.text for r in recs] == ["alpha", "beta"]
    (tmp_path / "pq" / "data").mkdir(parents=True)
    datasets.Dataset.from_dict({"text": ["gamma"]}).to_parquet(str(tmp_path / "pq" / "data" / "train-0.parquet"))
    datasets.Dataset.from_dict({"text": ["delta"]}).to_parquet(str(tmp_path / "pq" / "data" / "train-1.parquet"))
    assert [r.text for r in iter_records(tmp_path / "pq", cfg())] == ["gamma", "delta"]
    assert [r.text for r in iter_records(tmp_path / "pq" / "data" / "train-1.parquet", cfg())] == ["delta"]
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "ds2"))
    with pytest.raises(DataError, match=r"needs a 'text' or 'messages' column"):
        list(iter_records(tmp_path / "ds2", cfg()))


# ---------------------------------------------------------------------------------- packing
def test_greedy_packing_keeps_documents_whole():
    docs = [
        Document(list(range(100 + 10 * i, 100 + 10 * i + n)), list(range(100 + 10 * i, 100 + 10 * i + n)))
        for i, n in enumerate([3, 4, 2, 6, 3])
    ]
    packed = pack_documents(docs, seq_len=8, pad_id=0, mode="greedy")
    rows = [r[m.bool()].tolist() for r, m in zip(packed.input_ids, packed.attention_mask)]
    assert rows == [docs[0].ids + docs[1].ids, docs[2].ids + docs[3].ids, docs[4].ids]
    assert (packed.labels[packed.attention_mask == 0] == IGNORE_INDEX).all()
    assert (packed.input_ids[packed.attention_mask == 0] == 0).all()


def test_long_texts_split_conversations_truncate_and_concat():
    long_text = Document(list(range(20)), list(range(20)))
    long_chat = Document(list(range(20)), list(range(20)), splittable=False)
    packed = pack_documents([long_text], seq_len=8, pad_id=0)
    assert packed.input_ids[:, :8].flatten()[:20].tolist() == list(range(20))
    packed = pack_documents([long_chat], seq_len=8, pad_id=0)
    assert len(packed) == 1 and packed.num_truncated == 1
    docs = [Document([1, 2, 3], [1, 2, 3]), Document([4, 5, 6, 7, 8], [4, 5, 6, 7, 8])]
    packed = pack_documents(docs, seq_len=3, pad_id=0, mode="concat")
    assert packed.input_ids.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 0]]


def test_text_documents_end_with_eos(tokenizer):
    packed = build_dataset(cfg(seq_len=16), tokenizer, "pretrain", [["ab", "cd"]])
    assert packed.input_ids[0, :6].tolist() == [97, 98, 258, 99, 100, 258]
    assert packed.labels[0, :6].tolist() == [97, 98, 258, 99, 100, 258]


# ---------------------------------------------------------------------------------- SFT
def test_sft_targets_only_assistant_responses(tokenizer):
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "ok!"},
    ]
    doc = encode_conversation(tokenizer, msgs, responses_only=True)
    assert tokenizer.decode(doc.ids) == tokenizer.apply_chat_template(msgs, tokenize=False)
    targets = [i for i, l in zip(doc.ids, doc.labels) if l != IGNORE_INDEX]
    assert tokenizer.decode(targets) == "yo<eos>\nok!<eos>\n"
    # positions that are targets carry their own id
    assert all(l == i for i, l in zip(doc.ids, doc.labels) if l != IGNORE_INDEX)
    full = encode_conversation(tokenizer, msgs, responses_only=False)
    assert full.labels == full.ids


def test_sft_needs_conversations(tokenizer):
    with pytest.raises(DataError, match="sft stage needs conversations"):
        build_dataset(cfg(), tokenizer, "sft", [["plain text"]])
