"""Streamed training data (wuneng.train.streaming): the eager rows in stream order, workers that neither skip nor
repeat a document, an exact position in checkpoints, and one-line errors."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from wuneng.train.checkpoint import load_data_state
from wuneng.train.config import ConfigError, DataConfig, load_config, validate
from wuneng.train.data import DataError, build_dataset
from wuneng.train.loop import train
from wuneng.train.streaming import TokenStream, list_shards

from train_helpers import CHATS, TEXTS, quick_config, saved_run_files, tiny_qwen2, write_jsonl, write_yaml

WORDS = ["ab", "cde", "f", "ghij", "klmnopq", "r", "st"]


def _texts(seed: int, n: int, max_words: int = 30) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))) + f" #{seed}.{i}" for i in range(n)]


def _corpus(tmp_path):
    """Three text shards (blank lines, a \\r\\n file, long lines) and a JSONL shard, in a folder."""
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.txt").write_text("\n".join(_texts(1, 25)) + "\n\n" + "\n\n\n".join(_texts(2, 6)), encoding="utf-8")
    (root / "b.txt").write_bytes("\r\n".join(_texts(3, 20, 60)).encode("utf-8") + b"\r\n\r\n" + b"tail\r\n")
    (root / "c.md").write_text("\n\n".join(_texts(4, 15, 8)), encoding="utf-8")
    write_jsonl(root / "d.jsonl", [{"text": t} for t in _texts(5, 20)])
    return root


def _same_rows(got, ref):
    """``got``/``ref``: PackedDatasets or their ``batch()`` dicts."""
    for key in ("input_ids", "labels", "attention_mask"):
        a = got[key] if isinstance(got, dict) else getattr(got, key)
        b = ref[key] if isinstance(ref, dict) else getattr(ref, key)
        assert torch.equal(a, b), key


@pytest.mark.parametrize("packing", ["greedy", "concat"])
@pytest.mark.parametrize("text_unit", ["line", "paragraph", "file"])
def test_one_epoch_is_the_eager_rows_in_order(tmp_path, tokenizer, packing, text_unit):
    """In-process and with 2 workers (blocks of 4 documents), an epoch of the stream is build_dataset's rows in
    order, and the next epoch starts over; a glob of the shards gives the same stream as their folder."""
    root = _corpus(tmp_path)
    cfg = DataConfig(sources=[str(root)], seq_len=24, packing=packing, text_unit=text_unit)
    ref = build_dataset(cfg, tokenizer, "pretrain")
    for workers, sources in ((0, [str(root)]), (2, [str(root / "[abc].*"), str(root / "*.jsonl")])):
        stream_cfg = DataConfig(
            sources=sources, seq_len=24, packing=packing, text_unit=text_unit, streaming=True, num_workers=workers
        )
        stream = TokenStream(stream_cfg, tokenizer, block_documents=4)
        _same_rows(stream.next_rows(len(ref)), ref)
        _same_rows(stream.next_rows(3), ref.batch(range(3)))
        stream.close()


def test_parquet_datasets_folder_and_python_sources_stream_like_the_eager_reader(tmp_path, tokenizer):
    datasets = pytest.importorskip("datasets")
    rows = [{"text": t, "other": i} for i, t in enumerate(_texts(7, 30))]
    datasets.Dataset.from_list(rows[:12]).to_parquet(str(tmp_path / "p.parquet"))
    datasets.Dataset.from_list(rows[12:]).save_to_disk(str(tmp_path / "saved"))
    extra = _texts(8, 10)
    sources = [str(tmp_path / "p.parquet"), str(tmp_path / "saved")]
    cfg = DataConfig(sources=sources, seq_len=20, packing="concat")
    ref = build_dataset(cfg, tokenizer, "pretrain", [extra])
    stream = TokenStream(
        DataConfig(sources=sources, seq_len=20, packing="concat", streaming=True), tokenizer, "pretrain", [extra]
    )
    _same_rows(stream.next_rows(len(ref)), ref)
    # resumed inside the parquet file, the datasets folder and the Python list
    for cut in (2, len(ref) // 2, len(ref) - 2):
        first = TokenStream(
            DataConfig(sources=sources, seq_len=20, packing="concat", streaming=True), tokenizer, "pretrain", [extra]
        )
        first.next_rows(cut)
        state = json.loads(json.dumps(first.state_dict()))
        again = TokenStream(
            DataConfig(sources=sources, seq_len=20, packing="concat", streaming=True), tokenizer, "pretrain", [extra]
        )
        again.load_state_dict(state)
        _same_rows(again.next_rows(len(ref) - cut), ref.batch(range(cut, len(ref))))


def test_sft_conversations_and_max_documents_stream_like_the_eager_reader(tmp_path, tokenizer):
    """The sft stage (assistant tokens only as targets) and conversations (truncated to a row, not split) and
    data.max_documents give the eager rows, with 2 workers."""
    # deep copies: the edit below must not reach the module-level CHATS other test files train on
    chats = [
        dict(c, messages=copy.deepcopy(c["messages"]) + [{"role": "user", "content": "x" * (i % 5)}])
        for i, c in enumerate(CHATS)
    ]
    chats[3]["messages"][1]["content"] = "a very long answer " * 6  # longer than a row: truncated
    write_jsonl(tmp_path / "chats.jsonl", chats)
    for stage, max_documents in (("sft", None), ("sft", 7), ("pretrain", 5)):
        kw = dict(sources=[str(tmp_path / "chats.jsonl")], seq_len=48, max_documents=max_documents)
        ref = build_dataset(DataConfig(**kw), tokenizer, stage)
        assert (ref.labels == -100).any() and ref.num_truncated == 1
        stream = TokenStream(DataConfig(**kw, streaming=True, num_workers=2), tokenizer, stage, block_documents=2)
        _same_rows(stream.next_rows(len(ref)), ref)
        _same_rows(stream.next_rows(1), ref.batch([0]))  # then the next epoch
        stream.close()


@pytest.mark.parametrize("shuffle_window", [0, 5])
def test_resumed_stream_hands_out_the_rows_of_an_uninterrupted_one(tmp_path, tokenizer, shuffle_window):
    """N rows in one go == k rows, state (through JSON), a fresh stream, N - k rows; for k every 5 rows across two
    epochs and around the epoch's end, in-process, and for a few k with 2 workers. Shuffled windows are permutations of the stream's rows."""
    root = tmp_path / "small"
    root.mkdir()
    (root / "x.txt").write_text("\n".join(_texts(11, 30, 6)), encoding="utf-8")
    write_jsonl(root / "y.jsonl", [{"text": t} for t in _texts(12, 10, 6)])

    def fresh(workers):
        cfg = DataConfig(
            sources=[str(root)],
            seq_len=16,
            text_unit="line",
            streaming=True,
            num_workers=workers,
            shuffle_window=shuffle_window,
        )
        return TokenStream(cfg, tokenizer, seed=3, block_documents=3)

    ref_eager = build_dataset(DataConfig(sources=[str(root)], seq_len=16, text_unit="line"), tokenizer, "x")
    n = len(ref_eager) * 2 + 5
    ref = fresh(0).next_rows(n)
    if shuffle_window:
        assert not torch.equal(ref.input_ids[: len(ref_eager)], ref_eager.input_ids)  # really shuffled
        for w in range(0, len(ref_eager) - shuffle_window, shuffle_window):  # ... within each window
            got = sorted(map(tuple, ref.input_ids[w : w + shuffle_window].tolist()))
            assert got == sorted(map(tuple, ref_eager.input_ids[w : w + shuffle_window].tolist()))
    else:
        _same_rows(ref.batch(range(len(ref_eager))), ref_eager)
    cuts = [(k, 0) for k in range(1, n, 5)] + [(len(ref_eager) + d, 0) for d in (-1, 0, 1)]
    cuts += [(1, 2), (len(ref_eager), 2), (n - 4, 2)]
    for k, workers in cuts:
        first = fresh(workers)
        head = first.next_rows(k)
        state = json.loads(json.dumps(first.state_dict()))
        first.close()
        second = fresh(workers)
        second.load_state_dict(state)
        tail = second.next_rows(n - k)
        second.close()
        assert torch.equal(torch.cat([head.input_ids, tail.input_ids]), ref.input_ids), (k, workers)
        assert torch.equal(torch.cat([head.labels, tail.labels]), ref.labels), (k, workers)


def test_an_endless_source_streams(tokenizer):
    """Nothing is read ahead of need: a source that never ends gives rows (the eager reader would never return)."""

    def endless():
        i = 0
        while True:
            yield f"document {i} " + "x" * (i % 7)
            i += 1

    stream = TokenStream(DataConfig(seq_len=32, streaming=True, packing="concat"), tokenizer, "pretrain", [endless])
    rows = stream.next_rows(50)
    text = tokenizer.decode(rows.input_ids.flatten().tolist(), skip_special_tokens=True)
    assert "document 0 " in text and "document 99 " in text


def tiny_rwkv7(seed: int = 0):
    from wuneng.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM

    torch.manual_seed(seed)
    return RWKV7ForCausalLM(RWKV7Config(vocab_size=260, hidden_size=32, num_hidden_layers=2, head_size=16))


def test_training_resumed_from_a_checkpoint_sees_the_rows_of_an_uninterrupted_run(tmp_path, tokenizer, monkeypatch):
    """A tiny RWKV-7: 6 steps in one run == 3 steps, checkpoint, --resume, 3 steps: the same rows at every step
    (2 workers, forked after the WKV kernel ran in this process; shuffled windows) and bit-identical weights; the
    checkpoint holds the stream position."""
    corpus = tmp_path / "data.txt"
    corpus.write_text("\n".join(TEXTS + _texts(9, 40)), encoding="utf-8")
    seen: list[torch.Tensor] = []
    original = TokenStream.next_rows

    def spy(self, count):
        rows = original(self, count)
        seen.append(rows.input_ids.clone())
        return rows

    monkeypatch.setattr(TokenStream, "next_rows", spy)

    def config(name, **kw):
        data = DataConfig(
            sources=[str(corpus)], seq_len=16, text_unit="line", streaming=True, num_workers=2, shuffle_window=4
        )
        base = dict(micro_batch_size=2, grad_accum_steps=2, max_steps=6, save_every=3, data=data)
        return quick_config(tmp_path / name, **{**base, **kw})

    torch.manual_seed(0)
    train(config("full"), model=tiny_rwkv7(), tokenizer=tokenizer)
    full_rows, seen[:] = list(seen), []
    torch.manual_seed(0)
    train(config("sliced", stop_at_step=3), model=tiny_rwkv7(), tokenizer=tokenizer)
    assert load_data_state(tmp_path / "sliced/checkpoints/step_00000003")["rows_handed_out"] == 12
    train(config("sliced"), model=tiny_rwkv7(seed=5), tokenizer=tokenizer, resume=True)
    assert len(seen) == len(full_rows) == 6
    for step, (a, b) in enumerate(zip(full_rows, seen), start=1):
        assert torch.equal(a, b), f"step {step}"
    full = load_file(str(tmp_path / "full/checkpoints/step_00000006/model.safetensors"))
    sliced = load_file(str(tmp_path / "sliced/checkpoints/step_00000006/model.safetensors"))
    assert all(torch.equal(full[k], sliced[k]) for k in full)
    damaged = tmp_path / "sliced/checkpoints/step_00000006"
    (damaged / "data_state.json").write_text('{"format": 1, "window', encoding="utf-8")
    with pytest.raises(ValueError, match=r"data_state.json: not valid JSON .* resume from an earlier one"):
        load_data_state(damaged)


def test_errors_are_one_line_naming_the_cause(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"the pattern matches no file"):
        list_shards([str(tmp_path / "shard-*.jsonl")])
    with pytest.raises(DataError, match=r"one-shot iterator .* pass a list or a function"):
        list_shards([iter(["a", "b"])])
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty.txt: the file is empty"):
        list_shards([str(tmp_path / "empty.txt")])
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"text": t} for t in _texts(1, 9)])
    with open(bad, "a", encoding="utf-8") as f:
        f.write('{"text": "cut\n')
    stream = TokenStream(
        DataConfig(sources=[str(bad)], seq_len=16, streaming=True, num_workers=2), tokenizer, block_documents=2
    )
    with pytest.raises(DataError) as err:
        stream.next_rows(40)
    assert "bad.jsonl (line at byte" in str(err.value) and "not valid JSON" in str(err.value)
    assert "\n" not in str(err.value)
    stream.close()
    good = tmp_path / "good.txt"
    good.write_text("\n".join(_texts(2, 10)), encoding="utf-8")
    first = TokenStream(DataConfig(sources=[str(good)], seq_len=16, streaming=True), tokenizer)
    first.next_rows(2)
    state = first.state_dict()
    other = TokenStream(DataConfig(sources=[str(good)], seq_len=32, streaming=True), tokenizer)
    with pytest.raises(DataError, match=r"written with data.seq_len = 16, this run has 32"):
        other.load_state_dict(state)
    cfg = quick_config(tmp_path / "run", data=DataConfig(sources=[str(good)], num_workers=2))
    with pytest.raises(ConfigError, match=r"set data.streaming: true"):
        validate(cfg, has_model=True)
    recipe = write_yaml(
        tmp_path / "run.yaml", {"model": {"config": "x"}, "data": {"streaming": True, "num_workers": -1}}
    )
    with pytest.raises(ConfigError, match=r"num_workers and shuffle_window must be >= 0, got -1"):
        validate(load_config(recipe), has_model=True, has_data=True)
    recipe = write_yaml(
        tmp_path / "run.yaml", {"model": {"config": "x"}, "data": {"streaming": True, "num_workers": 2}}
    )
    assert load_config(recipe).data.num_workers == 2


def test_resuming_a_non_streaming_checkpoint_with_streaming_is_refused(tmp_path, tokenizer):
    corpus = tmp_path / "data.txt"
    corpus.write_text("\n".join(TEXTS), encoding="utf-8")
    data = DataConfig(sources=[str(corpus)], seq_len=16, text_unit="line")
    torch.manual_seed(0)
    train(quick_config(tmp_path / "run", data=data, max_steps=2, save_every=2), model=tiny_qwen2(), tokenizer=tokenizer)
    data.streaming = True
    with pytest.raises(ConfigError, match=r"without data.streaming, so its position in the data stream is unknown"):
        train(
            quick_config(tmp_path / "run", data=data, max_steps=4, save_every=2),
            model=tiny_qwen2(),
            tokenizer=tokenizer,
            resume=True,
        )


@pytest.mark.slow
def test_two_processes_stream_the_rows_of_one(tmp_path, tokenizer):
    """torchrun with 2 processes x micro-batch 2 (each reads the whole stream, 1 worker each, and keeps its rows)
    equals 1 process x 4 within test_distributed's tolerance."""
    from test_distributed import ATOL, STEPS, max_diff, run_both

    data = {
        "sources": [str(tmp_path / "data.txt")],
        "seq_len": 16,
        "text_unit": "line",
        "streaming": True,
        "num_workers": 1,
        "shuffle_window": 4,
    }
    path = saved_run_files(
        tmp_path, tokenizer, data=data, grad_accum_steps=2, max_steps=STEPS, save_every=STEPS,
        optim={"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
    )  # fmt: skip
    one_w, two_w = run_both(tmp_path, path)
    assert (tmp_path / "two" / f"checkpoints/step_{STEPS:08d}/data_state.json").is_file()
    moved, diff = max_diff(one_w, tiny_qwen2().state_dict()), max_diff(one_w, two_w)
    assert moved > 1e-3
    assert diff < ATOL, f"max |w_1proc - w_2proc| = {diff:.3g}"
