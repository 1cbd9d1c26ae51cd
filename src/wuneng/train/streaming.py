"""Streaming training data: sources read as streams, tokenised on the fly by DataLoader workers, packed into rows.

``data.streaming: true`` (see :class:`~wuneng.train.config.DataConfig`) replaces the eager
:func:`~wuneng.train.data.build_dataset` (every source read, tokenised and packed into memory before step 1) by a
:class:`TokenStream`:

- **Shards.** Every source is expanded into an ordered list of shards: a file (plain text or ``.jsonl``), a
  ``.parquet`` file (read by row groups with ``pyarrow``), a ``datasets`` ``save_to_disk`` folder (memory-mapped,
  read in slices), or a Python source (``python:module:function``, a callable or a re-iterable such as a list).
  Folders expand as the eager reader expands them (parquet files first, then the other files, sorted); a source
  with ``*``, ``?`` or ``[`` that names no existing path is a glob (sorted matches).
- **Global document order.** The documents (records) of all shards, in order, form one stream; one epoch is one
  pass; the stream repeats epoch after epoch (training is counted in steps). Each document has a global index
  and a *position* ``(shard, offset, skip)`` from which a reader restarts at it without reading what precedes
  it (a byte offset in text/JSONL files, a row index in parquet/datasets, an item index in Python sources).
- **Workers.** Documents are cut into blocks of ``block_documents`` consecutive documents (a block never spans
  two epochs). With ``W = data.num_workers`` DataLoader workers, worker ``w`` tokenises blocks ``w, w + W, ...``
  (it skims the other blocks without parsing or tokenising them); the DataLoader hands out its workers' items in
  round-robin order, so the main process receives the tokenised documents exactly in stream order, whatever
  ``W`` is. No document is tokenised twice and none is skipped.
- **Packing** happens in the main process, row by row, with the rules of
  :func:`~wuneng.train.data.pack_documents` (``greedy`` or ``concat``); at the end of an epoch the partial row is
  emitted padded. One epoch therefore gives exactly the rows the eager path builds, in source order.
- **Shuffling** (``data.shuffle_window: K``): the rows of an epoch are taken in consecutive windows of K rows,
  and each window is emitted in a permutation drawn from ``(seed, epoch, window)``. 0 = stream order.
- **Memory** is bounded by the blocks in flight (``prefetch`` per worker), one shuffle window and one parquet row
  group or ``datasets`` slice per worker; it does not grow with the corpus.
- **Position.** :meth:`TokenStream.state_dict` is the start of the next row that has not been handed out
  (``epoch``, the document's global index and position, the token offset inside it, and the shuffle window's
  start and progress): plain JSON, saved in every checkpoint (:func:`wuneng.train.checkpoint.save_checkpoint`,
  ``data_state``). A stream restored from it (:meth:`TokenStream.load_state_dict`) hands out exactly the rows an
  uninterrupted stream would. The state also records the shard names, ``seq_len`` and the packing mode; resuming
  with other sources or another row shape is refused.

Every process of a multi-process run reads the whole stream (each takes its rows of every step, as with the
eager path), so the data of a step does not depend on the number of processes.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..labels import IGNORE_INDEX
from .config import DataConfig
from .data import (
    JSONL_SUFFIXES,
    SKIP_SUFFIXES,
    DataError,
    Document,
    PackedDataset,
    Record,
    SourceLike,
    _import_datasets,
    _is_hf_dataset_dir,
    _iter_python,
    _record_from_obj,
    encode_record,
    uses_document_boundaries,
)

__all__ = ["Shard", "TokenStream", "list_shards", "open_stream", "STREAM_STATE_FORMAT"]

logger = logging.getLogger(__name__)

STREAM_STATE_FORMAT = 1
GLOB_CHARS = ("*", "?", "[")
_PARQUET_BATCH_ROWS = 1024
_DATASET_SLICE_ROWS = 1024


@dataclass(frozen=True)
class Shard:
    """One readable unit of a source. ``kind``: text, jsonl, parquet, hf (a save_to_disk folder) or python."""

    kind: str
    name: str  # the path, or the source's name for Python sources (messages, and the resume check)
    obj: Any = None  # python: the spec string, callable or iterable


# ------------------------------------------------------------------------------------------ shards
def _path_shards(path: Path) -> list[Shard]:
    if path.is_dir():
        if _is_hf_dataset_dir(path):
            return [Shard("hf", str(path))]
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        parquet = [p for p in files if p.suffix.lower() == ".parquet"]
        others = [p for p in files if p.suffix.lower() not in SKIP_SUFFIXES]
        if not parquet and not others:
            raise DataError(f"{path}: the folder has no text (.txt/.md), .jsonl or .parquet files")
        return [Shard("parquet", str(p)) for p in parquet] + [s for p in others for s in _path_shards(p)]
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return [Shard("parquet", str(path))]
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    return [Shard("jsonl" if suffix in JSONL_SUFFIXES else "text", str(path))]


def list_shards(sources: Sequence[SourceLike]) -> list[Shard]:
    """The shards of ``sources`` in stream order (see the module docstring); one-line :class:`DataError` on a
    missing path, an empty file, a glob without matches or a one-shot iterator."""
    shards: list[Shard] = []
    for k, source in enumerate(sources):
        if isinstance(source, (str, Path)):
            s = str(source)
            if s.startswith("python:"):
                shards.append(Shard("python", s, s))
                continue
            path = Path(s).expanduser()
            if not path.exists() and any(c in s for c in GLOB_CHARS):
                matches = sorted(glob.glob(str(path), recursive=True))
                if not matches:
                    raise DataError(f"data source {s!r}: the pattern matches no file or folder")
                for m in matches:
                    shards.extend(_path_shards(Path(m)))
                continue
            shards.extend(_path_shards(path))
            continue
        if not callable(source):
            try:
                one_shot = iter(source) is source
            except TypeError:
                raise DataError(
                    f"data source source[{k}]: expected a path, a callable or an iterable, got {type(source).__name__}"
                ) from None
            if one_shot:
                raise DataError(
                    f"data source source[{k}]: a one-shot iterator ({type(source).__name__}) cannot be streamed (it is "
                    "read again every epoch and by every worker); pass a list or a function that returns the iterable"
                )
        shards.append(Shard("python", f"source[{k}]", source))
    if not shards:
        raise DataError("no data sources: set data.sources")
    return shards


# ------------------------------------------------------------------------------------------ reading
# A reader yields (offset, skip, raw): the document is the `skip`-th one produced when reading restarts at
# `offset`; `raw` becomes a Record only in the worker that tokenises it (_to_record).
def _decode(line: bytes, shard: Shard, at: int) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{shard.name}: not valid UTF-8 ({e.reason} at byte {at + e.start}); convert the file to UTF-8"
        ) from None


def _read_text(shard: Shard, cfg: DataConfig, offset: int) -> Iterator[tuple[int, int, Any]]:
    with open(shard.name, "rb") as f:
        if cfg.text_unit == "file":
            if offset == 0:
                text = _decode(f.read(), shard, 0)
                if text.strip():
                    yield 0, 0, text
            return
        f.seek(offset)
        at = offset
        paragraph: list[str] = []
        paragraph_at = at
        for line in iter(f.readline, b""):
            text = _decode(line, shard, at)
            if cfg.text_unit == "line":
                # bytes split at b"\n" never cut a "\r\n" or a UTF-8 character: splitting each line like the
                # whole text (str.splitlines) gives the eager reader's lines
                parts = [p for p in text.splitlines() if p.strip()]
                for j, p in enumerate(parts):
                    yield at, j, p
            else:  # paragraph: the eager reader splits the whole text (with "\r\n" -> "\n") at "\n\n"
                text = text.replace("\r\n", "\n")
                if not paragraph:
                    paragraph_at = at
                if text == "\n" and paragraph and paragraph[-1].endswith("\n"):
                    # "\n\n": the paragraph ends (without its last "\n"); the next one starts at the next line
                    done = "".join(paragraph)[:-1]
                    paragraph = []
                    if done.strip():
                        yield paragraph_at, 0, done
                else:
                    paragraph.append(text)
            at += len(line)
        if paragraph:
            done = "".join(paragraph)
            if done.strip():
                yield paragraph_at, 0, done


def _read_jsonl(shard: Shard, offset: int) -> Iterator[tuple[int, int, Any]]:
    with open(shard.name, "rb") as f:
        f.seek(offset)
        at = offset
        for line in iter(f.readline, b""):
            if line.strip():
                yield at, 0, line
            at += len(line)


def _needed_columns(names: Sequence[str], cfg: DataConfig, where: str) -> list[str]:
    if not set(names) & {cfg.text_field, cfg.messages_field, "prompt"}:
        raise DataError(
            f"{where}: needs a {cfg.text_field!r} or {cfg.messages_field!r} column (set data.text_field / "
            f"data.messages_field); columns are {sorted(names)}"
        )
    wanted = {cfg.text_field, cfg.messages_field, "prompt", "response", "completion"}
    return [c for c in names if c in wanted]


def _read_parquet(shard: Shard, cfg: DataConfig, offset: int) -> Iterator[tuple[int, int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - depends on the environment
        _import_datasets(Path(shard.name))
        raise
    try:
        pf = pq.ParquetFile(shard.name)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{shard.name}: not a readable parquet file ({e})") from None
    columns = _needed_columns(pf.schema_arrow.names, cfg, shard.name)
    meta = pf.metadata
    first_row, groups = 0, []
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if first_row + n > offset:
            groups.append(g)
        else:
            first_row += n
    row = first_row
    if not groups:
        return
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, row_groups=groups, columns=columns):
        for obj in batch.to_pylist():
            if row >= offset:
                yield row, 0, obj
            row += 1


def _read_hf(shard: Shard, cfg: DataConfig, offset: int) -> Iterator[tuple[int, int, Any]]:
    datasets = _import_datasets(Path(shard.name))
    ds = datasets.load_from_disk(shard.name)  # memory-mapped Arrow files
    if isinstance(ds, datasets.DatasetDict):
        if cfg.hf_split not in ds:
            raise DataError(f"{shard.name}: no split {cfg.hf_split!r}; set data.hf_split to one of {sorted(ds)}")
        ds = ds[cfg.hf_split]
    columns = _needed_columns(ds.column_names, cfg, shard.name)
    ds = ds.select_columns(columns)
    for start in range(offset, len(ds), _DATASET_SLICE_ROWS):
        part = ds[start : start + _DATASET_SLICE_ROWS]
        for i, values in enumerate(zip(*(part[c] for c in columns))):
            yield start + i, 0, dict(zip(columns, values))


def _read_python(shard: Shard, cfg: DataConfig, offset: int) -> Iterator[tuple[int, int, Any]]:
    if isinstance(shard.obj, str):  # python:module:function, imported and called like the eager reader does
        records = _iter_python(shard.obj, cfg)
        for i, record in enumerate(records):
            if i >= offset:
                yield i, 0, record
        return
    items = shard.obj() if callable(shard.obj) else shard.obj
    if isinstance(items, (str, bytes, dict)) or not hasattr(items, "__iter__"):
        raise DataError(f"data source {shard.name}: expected an iterable of texts/records, got {type(items).__name__}")
    for i, obj in enumerate(items):
        if i >= offset:
            yield i, 0, obj


def _read_shard(shard: Shard, cfg: DataConfig, offset: int) -> Iterator[tuple[int, int, Any]]:
    if shard.kind == "text":
        return _read_text(shard, cfg, offset)
    if shard.kind == "jsonl":
        return _read_jsonl(shard, offset)
    if shard.kind == "parquet":
        return _read_parquet(shard, cfg, offset)
    if shard.kind == "hf":
        return _read_hf(shard, cfg, offset)
    return _read_python(shard, cfg, offset)


def _to_record(shard: Shard, offset: int, skip: int, raw: Any, cfg: DataConfig) -> Record:
    if shard.kind == "text":
        return Record(f"{shard.name}@{offset}#{skip}", text=raw)
    if shard.kind == "jsonl":
        where = f"{shard.name} (line at byte {offset})"
        text = _decode(raw, shard, offset)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        return _record_from_obj(obj, where, cfg)
    if isinstance(raw, Record):  # python:module:function sources come as records already
        return raw
    where = f"{shard.name}[row {offset}]" if shard.kind in ("parquet", "hf") else f"{shard.name}[{offset}]"
    return _record_from_obj(raw, where, cfg)


# ------------------------------------------------------------------------------------------ positions
@dataclass(frozen=True)
class _Position:
    """Where a document is: epoch, global index in the epoch, shard, reader offset and skip."""

    epoch: int = 0
    record: int = 0
    shard: int = 0
    offset: int = 0
    skip: int = 0


def _walk(shards: Sequence[Shard], cfg: DataConfig, start: _Position) -> Iterator[tuple[_Position, Any, bool]]:
    """Every document from ``start`` on, forever: ``(position, raw, last_of_epoch)``."""
    epoch, record, shard_i, offset, skip = start.epoch, start.record, start.shard, start.offset, start.skip
    limit = cfg.max_documents
    while True:
        pending: Optional[tuple[_Position, Any]] = None
        produced = record
        stop = False
        for i in range(shard_i, len(shards)):
            for at, j, raw in _read_shard(shards[i], cfg, offset if i == shard_i else 0):
                if i == shard_i and at == offset and j < skip:
                    continue
                if limit is not None and produced >= limit:
                    stop = True
                    break
                if pending is not None:
                    yield pending[0], pending[1], False
                pending = (_Position(epoch, produced, i, at, j), raw)
                produced += 1
            if stop:
                break
        if pending is None:
            if produced == 0:
                raise DataError("no training documents: every source is empty")
        else:
            yield pending[0], pending[1], True
        epoch, record, shard_i, offset, skip = epoch + 1, 0, 0, 0, 0


def _blocks(shards, cfg, start: _Position, block_documents: int) -> Iterator[list[tuple[_Position, Any, bool]]]:
    """Consecutive documents in blocks of ``block_documents``; a block ends with the epoch's last document."""
    block: list = []
    for item in _walk(shards, cfg, start):
        block.append(item)
        if len(block) == block_documents or item[2]:
            yield block
            block = []


def _keep(item: Any) -> Any:
    """DataLoader ``collate_fn``: the worker's item as it is (numpy arrays travel pickled, not in shared memory)."""
    return item


class _TokenisedBlocks(IterableDataset):
    """The worker side: worker w of W tokenises blocks w, w + W, ... of the stream that starts at ``start``."""

    def __init__(self, shards, cfg, tokenizer, responses_only: bool, start: _Position, block_documents: int):
        self.shards, self.cfg, self.tokenizer = shards, cfg, tokenizer
        self.responses_only, self.start, self.block_documents = responses_only, start, block_documents

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        try:
            for k, block in enumerate(_blocks(self.shards, self.cfg, self.start, self.block_documents)):
                if k % workers != worker:
                    continue
                docs = []
                for pos, raw, last in block:
                    record = _to_record(self.shards[pos.shard], pos.offset, pos.skip, raw, self.cfg)
                    doc = encode_record(record, self.tokenizer, self.responses_only)
                    docs.append(
                        (
                            pos,
                            np.asarray(doc.ids, dtype=np.int64),
                            np.asarray(doc.labels, dtype=np.int64),
                            doc.splittable,
                            last,
                        )
                    )
                yield {"docs": docs}
        except DataError as e:  # one line in the main process (a worker's exception would arrive as a traceback)
            yield {"error": str(e)}


# ------------------------------------------------------------------------------------------ the stream
@dataclass
class _Row:
    ids: list[int]
    labels: list[int]
    start: tuple[_Position, int]  # the first document of the row and the token offset in it
    positions: list[int]  # each token's position in its document (pack_documents' position_ids)


class TokenStream:
    """Fixed-length rows from streamed sources; see the module docstring.

    Args:
        cfg: the ``data`` section (``sources``, ``seq_len``, ``packing``, ``text_unit``, fields,
            ``num_workers``, ``shuffle_window``, ``max_documents``).
        tokenizer: a Hugging Face tokenizer (picklable when ``num_workers > 0`` uses a non-fork start method).
        stage: ``sft`` targets only assistant tokens (as :func:`~wuneng.train.data.build_dataset`).
        extra_sources: more sources given from Python (callables or re-iterables).
        seed: draws the shuffle windows' permutations.
        block_documents: documents per worker item.
        prefetch: items each worker prepares ahead (DataLoader ``prefetch_factor``).
    """

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer,
        stage: str = "pretrain",
        extra_sources: Sequence[SourceLike] = (),
        *,
        seed: int = 0,
        block_documents: int = 64,
        prefetch: int = 4,
    ):
        if block_documents < 1:
            raise ValueError(f"block_documents must be >= 1, got {block_documents}")
        if cfg.packing not in ("greedy", "concat"):
            raise ValueError(f"packing mode must be 'greedy' or 'concat', got {cfg.packing!r}")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.responses_only = stage == "sft"
        self.document_positions = uses_document_boundaries(cfg, stage)  # rows carry position_ids
        self.shards = list_shards(list(cfg.sources) + list(extra_sources))
        self.seq_len = cfg.seq_len
        self.seed = seed
        self.block_documents = block_documents
        self.prefetch = prefetch
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad if pad is not None else 0
        self.rows_handed_out = 0
        self._start: tuple[_Position, int] = (_Position(), 0)  # where the next row starts
        self._window_start: tuple[_Position, int] = (_Position(), 0)  # where its shuffle window starts
        self._window_taken = 0  # rows of that window already handed out
        self._rows: Optional[Iterator[_Row]] = None
        self._ahead: deque = deque()  # (row, window_start, window_taken) of rows produced but not handed out
        logger.info(
            "streaming %d shard(s) with %d tokenising worker(s), rows of %d tokens (%s packing)",
            len(self.shards),
            cfg.num_workers,
            cfg.seq_len,
            cfg.packing,
        )

    # ---- documents, in stream order
    def _documents(self, start: _Position) -> Iterator[tuple[_Position, Document, bool]]:
        blocks = _TokenisedBlocks(
            self.shards, self.cfg, self.tokenizer, self.responses_only, start, self.block_documents
        )
        if self.cfg.num_workers > 0:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # fast tokenizers in forked workers
            loader = DataLoader(
                blocks,
                batch_size=None,
                num_workers=self.cfg.num_workers,
                collate_fn=_keep,
                prefetch_factor=self.prefetch,
            )
            items = iter(loader)
        else:
            items = iter(blocks)
        error = None
        try:
            for item in items:
                if "error" in item:
                    error = item["error"]
                    break
                for pos, ids, labels, splittable, last in item["docs"]:
                    yield pos, Document(ids.tolist(), labels.tolist(), splittable), last
        finally:
            # stop the workers now: the DataError's traceback (or a generator left suspended) would otherwise keep
            # the DataLoader iterator, and its worker processes, alive until garbage collection
            stop = getattr(items, "_shutdown_workers", None)
            if stop is not None:
                stop()
            items = None
        if error is not None:
            raise DataError(error)

    # ---- rows, in stream order (pack_documents' rules, one row at a time)
    def _packed(self, start: tuple[_Position, int]) -> Iterator[Optional[_Row]]:
        """Rows from ``start``; ``None`` after the last row of every epoch."""
        seq_len, concat = self.seq_len, self.cfg.packing == "concat"
        cur_ids: list[int] = []
        cur_labels: list[int] = []
        cur_pos: list[int] = []
        cur_start: Optional[tuple[_Position, int]] = None
        first_offset = start[1]
        rows_this_epoch = 0
        whole_epoch = start[0].record == 0 and start[1] == 0  # an epoch read from its start
        for pos, doc, last in self._documents(start[0]):
            skip_to, first_offset = first_offset, 0
            n = len(doc.ids)
            if n:
                if concat:
                    # concat: fill what is left of the row, then whole rows
                    off = skip_to
                    while off < n:
                        room = seq_len - len(cur_ids)
                        if not cur_ids:
                            cur_start = (pos, off)
                        cur_ids += doc.ids[off : off + room]
                        cur_labels += doc.labels[off : off + room]
                        cur_pos += range(off, min(off + room, n))
                        off += room
                        if len(cur_ids) == seq_len:
                            yield _Row(cur_ids, cur_labels, cur_start, cur_pos)
                            rows_this_epoch += 1
                            cur_ids, cur_labels, cur_pos = [], [], []
                else:
                    if n > seq_len:
                        offsets = range(0, n, seq_len) if doc.splittable else range(0, 1)
                    else:
                        offsets = range(0, 1)
                    for off in offsets:
                        if off < skip_to:
                            continue
                        ids = doc.ids[off : off + seq_len]
                        if len(cur_ids) + len(ids) > seq_len:
                            yield _Row(cur_ids, cur_labels, cur_start, cur_pos)
                            rows_this_epoch += 1
                            cur_ids, cur_labels, cur_pos = [], [], []
                        if not cur_ids:
                            cur_start = (pos, off)
                        cur_ids = cur_ids + ids
                        cur_labels = cur_labels + doc.labels[off : off + seq_len]
                        cur_pos = cur_pos + list(range(off, off + len(ids)))
                        if len(cur_ids) == seq_len:
                            yield _Row(cur_ids, cur_labels, cur_start, cur_pos)
                            rows_this_epoch += 1
                            cur_ids, cur_labels, cur_pos = [], [], []
            if last:
                if cur_ids:
                    yield _Row(cur_ids, cur_labels, cur_start, cur_pos)
                    rows_this_epoch += 1
                    cur_ids, cur_labels, cur_pos = [], [], []
                if rows_this_epoch == 0 and whole_epoch:
                    raise DataError("no training tokens: every source was empty")
                rows_this_epoch, whole_epoch = 0, True
                yield None

    # ---- rows in training order (shuffle windows)
    def _ordered(self, window_start: tuple[_Position, int], taken: int) -> Iterator[tuple[_Row, tuple, int]]:
        """Rows in training order from the window that starts at ``window_start``, ``taken`` of its rows already
        handed out: ``(row, window_start, rows of the window handed out before this one)``."""
        window = max(1, self.cfg.shuffle_window)  # 1: stream order (a window of one row)
        packed = self._packed(window_start)
        while True:
            rows: list[_Row] = []
            while len(rows) < window:
                row = next(packed)
                if row is None:  # the epoch ends: so does the window
                    break
                rows.append(row)
            if not rows:
                continue
            start = rows[0].start
            order = [0]
            if window > 1:
                key = ((self.seed * 1_000_003 + start[0].epoch) * 1_000_003 + start[0].record) * 65_537 + start[1]
                g = torch.Generator().manual_seed(key % (1 << 63))
                order = torch.randperm(len(rows), generator=g).tolist()
            for i in range(taken, len(rows)):
                yield rows[order[i]], start, i
            taken = 0

    def _next_row(self) -> _Row:
        if self._rows is None:
            self._rows = self._ordered(self._window_start, self._window_taken)
        if not self._ahead:
            self._ahead.append(next(self._rows))
        row, window_start, taken = self._ahead.popleft()
        self.rows_handed_out += 1
        # the position after this row: the next produced row's (looked ahead lazily in state_dict)
        self._window_start, self._window_taken = window_start, taken + 1
        return row

    def next_rows(self, count: int) -> PackedDataset:
        """The next ``count`` rows: ``input_ids``/``labels``/``attention_mask`` ``[count, seq_len]`` int64."""
        input_ids = torch.full((count, self.seq_len), self.pad_id, dtype=torch.long)
        labels = torch.full((count, self.seq_len), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((count, self.seq_len), dtype=torch.long)
        position_ids = torch.arange(self.seq_len).repeat(count, 1) if self.document_positions else None
        for r in range(count):
            row = self._next_row()
            n = len(row.ids)
            input_ids[r, :n] = torch.as_tensor(row.ids, dtype=torch.long)
            labels[r, :n] = torch.as_tensor(row.labels, dtype=torch.long)
            mask[r, :n] = 1
            if position_ids is not None:  # as pack_documents: the padding counts from 0
                position_ids[r, :n] = torch.as_tensor(row.positions, dtype=torch.long)
                position_ids[r, n:] = torch.arange(self.seq_len - n)
        return PackedDataset(input_ids, labels, mask, position_ids=position_ids)

    # ---- position
    def state_dict(self) -> dict:
        """The position of the next row (plain JSON data); see :meth:`load_state_dict`."""
        if self._rows is None:
            self._rows = self._ordered(self._window_start, self._window_taken)
        if not self._ahead:
            self._ahead.append(next(self._rows))
        row, window_start, taken = self._ahead[0]
        pos, offset = window_start
        return {
            "format": STREAM_STATE_FORMAT,
            "window_start": {**pos.__dict__, "token_offset": offset},
            "window_taken": taken,
            "rows_handed_out": self.rows_handed_out,
            "seq_len": self.seq_len,
            "packing": self.cfg.packing,
            "shuffle_window": self.cfg.shuffle_window,
            "shards": [s.name for s in self.shards],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict` (of a stream over the same shards, ``seq_len`` and packing)."""
        if not isinstance(state, dict) or state.get("format") != STREAM_STATE_FORMAT:
            raise DataError(
                f"the checkpoint's data stream position has format {state.get('format') if isinstance(state, dict) else state!r}; "
                f"this version reads format {STREAM_STATE_FORMAT}"
            )
        mine = {
            "seq_len": self.seq_len,
            "packing": self.cfg.packing,
            "shuffle_window": self.cfg.shuffle_window,
            "shards": [s.name for s in self.shards],
        }
        for key, value in mine.items():
            if state.get(key) != value:
                shown = value if key != "shards" else f"{len(value)} shards"
                saved = state.get(key) if key != "shards" else f"{len(state.get(key) or [])} shards"
                raise DataError(
                    f"the checkpoint's data stream was written with data.{key if key != 'shards' else 'sources'} = "
                    f"{saved}, this run has {shown}; resume with the same data settings (or start a new run)"
                )
        ws = dict(state["window_start"])
        offset = int(ws.pop("token_offset"))
        self.close()
        self._window_start = (_Position(**{k: int(v) for k, v in ws.items()}), offset)
        self._window_taken = int(state["window_taken"])
        self.rows_handed_out = int(state.get("rows_handed_out", 0))
        self._rows = None
        self._ahead.clear()

    def close(self) -> None:
        """Stop the workers (a later :meth:`next_rows` starts new ones from the current position)."""
        if self._rows is not None:
            self._rows.close()  # the nested generators close in turn; _documents' finally stops the workers
        self._rows = None
        self._ahead.clear()


def open_stream(
    cfg: DataConfig, tokenizer, stage: str, extra_sources: Sequence[SourceLike] = (), *, seed: int = 0
) -> TokenStream:
    """The :class:`TokenStream` of a run's ``data`` section (the streaming counterpart of ``build_dataset``)."""
    return TokenStream(cfg, tokenizer, stage, extra_sources, seed=seed)
