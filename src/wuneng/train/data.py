"""Training data: reading sources, tokenising documents and conversations, packing into sequences.

Sources (see :class:`~wuneng.train.config.DataConfig`):

- plain text files (``.txt``, ``.md``, or any other suffix not listed below) and folders of them;
- JSONL (``.jsonl``): one JSON object per line with ``text``, or ``messages`` (a list of
  ``{"role", "content"}``), or ``prompt`` + ``response`` (or ``completion``);
- a Hugging Face ``datasets`` folder written by ``save_to_disk``, and ``.parquet`` files or folders of
  them (e.g. a dataset repository downloaded from the Hub); ``datasets`` is imported lazily;
- ``python:package.module:function``, or (from Python) any iterable or zero-argument callable, yielding
  texts, records as above, or lists of token ids (taken as one already-tokenised document).

A *document* becomes ``(ids, labels)``: a text gives ``ids + [eos]`` with every position a target;
a conversation is rendered by the tokenizer's chat template and the rendered text tokenised once; for
SFT only the assistant tokens are targets (``labels = -100`` elsewhere; :func:`assistant_token_mask`
says which tokens those are). Labels are aligned with ``ids`` (the model or the loss shifts them), as
in Hugging Face.

Packing (:func:`pack_documents`) yields fixed-length rows ``input_ids``/``labels``/``attention_mask``
[N, seq_len]; padding has ``attention_mask = 0`` and ``labels = -100``. With document boundaries
(:func:`uses_document_boundaries`: the ``sft`` stage by default) the rows also carry ``position_ids`` restarting at
0 per document, which the training forward passes to the model (docs/training.md, "Document-aware packing").

This module reads everything before training (:func:`build_dataset`); ``data.streaming`` reads the same sources
as a stream instead (:mod:`wuneng.train.streaming`, built on the record and tokenisation functions here).
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch

from ..labels import IGNORE_INDEX
from .config import DataConfig

__all__ = [
    "DataError",
    "Document",
    "PackedDataset",
    "iter_records",
    "encode_record",
    "encode_conversation",
    "assistant_token_mask",
    "pack_documents",
    "uses_document_boundaries",
    "build_dataset",
]

TEXT_SUFFIXES = {".txt", ".md", ".text", ""}
JSONL_SUFFIXES = {".jsonl"}
SKIP_SUFFIXES = {".json", ".yaml", ".yml", ".arrow", ".parquet", ".bin", ".safetensors", ".pt", ".png", ".jpg"}

SourceLike = Union[str, Path, Iterable, Callable[[], Iterable]]


class DataError(ValueError):
    """A problem with a data source; the message names the file (and line)."""


@dataclass
class Record:
    """One item of a source before tokenisation: exactly one of text, messages, token_ids."""

    origin: str  # "file:line" or "source[i]", for error messages
    text: Optional[str] = None
    messages: Optional[list[dict]] = None
    token_ids: Optional[list[int]] = None


@dataclass
class Document:
    """A tokenised document: ``ids`` and aligned ``labels`` (``-100`` = not a target)."""

    ids: list[int]
    labels: list[int]
    splittable: bool = True  # texts may be cut into pieces; conversations are truncated instead


# ------------------------------------------------------------------------------------ reading
def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: the file is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start}); convert the file to UTF-8"
        ) from None


def _split_text(text: str, unit: str) -> list[str]:
    if unit == "file":
        parts = [text]
    elif unit == "line":
        parts = text.splitlines()
    else:  # paragraph
        parts = [p for p in text.replace("\r\n", "\n").split("\n\n")]
    return [p for p in parts if p.strip()]


def _check_messages(messages: Any, origin: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{origin}: `messages` must be a non-empty list of {{'role': ..., 'content': ...}} objects")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{origin}: message {j} must be an object with string 'role' and 'content', got {m!r}")
    return messages


def _record_from_obj(obj: Any, origin: str, cfg: DataConfig) -> Record:
    if isinstance(obj, str):
        return Record(origin, text=obj)
    if isinstance(obj, dict):
        if cfg.messages_field in obj:
            return Record(origin, messages=_check_messages(obj[cfg.messages_field], origin))
        if cfg.text_field in obj:
            text = obj[cfg.text_field]
            if not isinstance(text, str):
                raise DataError(f"{origin}: field {cfg.text_field!r} must be a string, got {type(text).__name__}")
            return Record(origin, text=text)
        if "prompt" in obj and ("response" in obj or "completion" in obj):
            response = obj.get("response", obj.get("completion"))
            if not isinstance(obj["prompt"], str) or not isinstance(response, str):
                raise DataError(f"{origin}: 'prompt' and 'response' must be strings")
            messages = [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": response}]
            return Record(origin, messages=messages)
        raise DataError(
            f"{origin}: a record needs a {cfg.text_field!r} string, a {cfg.messages_field!r} list, "
            f"or 'prompt' and 'response'; found keys {sorted(obj)}"
        )
    if isinstance(obj, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in obj):
        return Record(origin, token_ids=list(obj))
    if isinstance(obj, torch.Tensor) and obj.ndim == 1 and not obj.is_floating_point():
        return Record(origin, token_ids=obj.tolist())
    raise DataError(f"{origin}: expected a text, a record (dict) or a list of token ids, got {type(obj).__name__}")


def _iter_jsonl(path: Path, cfg: DataConfig) -> Iterator[Record]:
    text = _read_utf8(path)
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        yield _record_from_obj(obj, f"{path}:{lineno}", cfg)


def _is_hf_dataset_dir(path: Path) -> bool:
    return (
        (path / "dataset_info.json").is_file()
        or (path / "dataset_dict.json").is_file()
        or (path / "state.json").is_file()
    )


def _import_datasets(path: Path):
    try:
        import datasets  # lazy: only these sources need it
    except ImportError:  # pragma: no cover - depends on the environment
        raise DataError(
            f"{path}: reading Hugging Face datasets / parquet needs datasets, the data extra: pip install 'wuneng[data]'"
        ) from None
    return datasets


def _iter_dataset_rows(ds, path: Path, cfg: DataConfig) -> Iterator[Record]:
    columns = set(ds.column_names)
    if not columns & {cfg.text_field, cfg.messages_field, "prompt"}:
        raise DataError(
            f"{path}: needs a {cfg.text_field!r} or {cfg.messages_field!r} column (set data.text_field / "
            f"data.messages_field); columns are {sorted(columns)}"
        )
    for i, row in enumerate(ds):
        yield _record_from_obj(row, f"{path}[row {i}]", cfg)


def _iter_hf_dataset(path: Path, cfg: DataConfig) -> Iterator[Record]:
    """A ``save_to_disk`` folder (Dataset or DatasetDict)."""
    datasets = _import_datasets(path)
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if cfg.hf_split not in ds:
            raise DataError(f"{path}: no split {cfg.hf_split!r}; set data.hf_split to one of {sorted(ds)}")
        ds = ds[cfg.hf_split]
    yield from _iter_dataset_rows(ds, path, cfg)


def _iter_parquet(files: list[Path], path: Path, cfg: DataConfig) -> Iterator[Record]:
    """Parquet files (e.g. a dataset repository downloaded from the Hub), read by ``datasets``."""
    datasets = _import_datasets(path)
    ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    yield from _iter_dataset_rows(ds, path, cfg)


def _iter_python(spec: str, cfg: DataConfig) -> Iterator[Record]:
    target = spec[len("python:") :]
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise DataError(f"data source {spec!r}: expected python:package.module:function")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise DataError(f"data source {spec!r}: cannot import ({e})") from None
    items = obj(**cfg.generator_kwargs) if callable(obj) else obj
    yield from _iter_objects(items, spec, cfg)


def _iter_objects(items: Any, name: str, cfg: DataConfig) -> Iterator[Record]:
    if callable(items) and not isinstance(items, (str, bytes)):
        items = items()
    if isinstance(items, (str, bytes, dict)) or not isinstance(items, Iterable):
        raise DataError(f"data source {name}: expected an iterable of texts/records, got {type(items).__name__}")
    for i, obj in enumerate(items):
        yield _record_from_obj(obj, f"{name}[{i}]", cfg)


def _iter_path(path: Path, cfg: DataConfig) -> Iterator[Record]:
    if path.is_dir():
        if _is_hf_dataset_dir(path):
            yield from _iter_hf_dataset(path, cfg)
            return
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        parquet = [p for p in files if p.suffix.lower() == ".parquet"]
        files = [p for p in files if p.suffix.lower() not in SKIP_SUFFIXES]
        if parquet:
            yield from _iter_parquet(parquet, path, cfg)
        elif not files:
            raise DataError(f"{path}: the folder has no text (.txt/.md), .jsonl or .parquet files")
        for p in files:
            yield from _iter_path(p, cfg)
        return
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.suffix.lower() in JSONL_SUFFIXES:
        yield from _iter_jsonl(path, cfg)
        return
    if path.suffix.lower() == ".parquet":
        yield from _iter_parquet([path], path, cfg)
        return
    text = _read_utf8(path)
    for j, part in enumerate(_split_text(text, cfg.text_unit)):
        yield Record(f"{path}#{j}", text=part)


def iter_records(source: SourceLike, cfg: DataConfig, name: str = "source") -> Iterator[Record]:
    """Records of one source (path string, ``python:`` spec, iterable or callable)."""
    if isinstance(source, (str, Path)):
        s = str(source)
        if s.startswith("python:"):
            yield from _iter_python(s, cfg)
        else:
            yield from _iter_path(Path(s).expanduser(), cfg)
    else:
        yield from _iter_objects(source, name, cfg)


# ------------------------------------------------------------------------------- tokenisation
def _encode_text(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _tokenizer_name(tokenizer) -> str:
    name = getattr(tokenizer, "name_or_path", "") or ""
    return f"{type(tokenizer).__name__} {name!r}" if name else type(tokenizer).__name__


def _chat_template_of(tokenizer) -> str:
    try:
        return tokenizer.get_chat_template()
    except (ValueError, AttributeError):
        return getattr(tokenizer, "chat_template", None) or ""


def _marked_assistant_spans(
    tokenizer, template: str, messages: list[dict], origin: str
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans of its ``{% generation %}`` blocks (one render)."""
    # transformers' own renderer records the spans (what apply_chat_template(return_assistant_tokens_mask=True)
    # uses); tests/train/test_chat_masking.py checks our mask against that public path.
    from transformers.utils.chat_template_utils import render_jinja_template

    # as apply_chat_template does: keys whose value is None (e.g. tool_calls from a parquet row) are dropped
    plain = [{k: v for k, v in m.items() if v is not None} for m in messages]
    rendered, indices = render_jinja_template(
        conversations=[plain],
        chat_template=template,
        return_assistant_tokens_mask=True,
        add_generation_prompt=False,
        **tokenizer.special_tokens_map,
    )
    text = rendered[0]
    if text != _render(tokenizer, messages, add_generation_prompt=False):
        raise DataError(
            f"{origin}: rendering the chat template of tokenizer {_tokenizer_name(tokenizer)} with generation "
            "tracking gives another text than apply_chat_template; report this with the template"
        )
    spans = [(int(s), int(e)) for s, e in indices[0] if e > s]
    if not spans and any(m["role"] == "assistant" for m in messages):
        raise DataError(
            f"{origin}: the chat template of tokenizer {_tokenizer_name(tokenizer)} has {{% generation %}} markers "
            "but they enclose no text of this conversation's assistant turns; put them around each assistant "
            "message's content and end-of-turn token"
        )
    return text, spans


def _incremental_assistant_spans(tokenizer, messages: list[dict], origin: str) -> tuple[str, list[tuple[int, int]]]:
    """For templates without ``{% generation %}``: assistant turn i spans from the end of
    ``render(messages[:i], add_generation_prompt=True)`` to the end of ``render(messages[:i+1])`` in the
    rendering of the whole chat (its content and whatever the template closes the turn with)."""
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    done = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt_end = _render(tokenizer, messages[:i], add_generation_prompt=True)
        turn_end = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(prompt_end) and full.startswith(turn_end) and done <= len(prompt_end) <= len(turn_end)):
            raise DataError(
                f"{origin}: the chat template of tokenizer {_tokenizer_name(tokenizer)} has no {{% generation %}} "
                f"markers and does not render conversations incrementally (the chat up to assistant turn {i} is not "
                "a prefix of the whole chat), so the assistant tokens cannot be located; wrap each assistant "
                "message's content and end-of-turn token in {% generation %}...{% endgeneration %} in the template "
                "(docs/training.md, SFT data)"
            )
        if len(turn_end) > len(prompt_end):
            spans.append((len(prompt_end), len(turn_end)))
        done = len(turn_end)
    return full, spans


def _encode_with_offsets(tokenizer, text: str, origin: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` (no added specials) and each token's character span ``[start, end)``."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [(int(s), int(e)) for s, e in enc["offset_mapping"]]
    encode = getattr(tokenizer, "encode_with_offsets", None)  # ByteLevelTokenizer
    if encode is not None:
        return encode(text)
    raise DataError(
        f"{origin}: tokenizer {_tokenizer_name(tokenizer)} is a slow (Python) tokenizer that gives no character "
        "offsets, which SFT masking needs; load its fast version (a folder with tokenizer.json)"
    )


def _tokens_in_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """Token t is in a span when its characters overlap it (a token that BPE merged across a span boundary
    counts: it carries span characters); a zero-width token when its position lies inside a span."""
    inside = []
    for s, e in offsets:
        if e > s:
            inside.append(any(s < span_e and e > span_s for span_s, span_e in spans))
        else:
            inside.append(any(span_s <= s < span_e for span_s, span_e in spans))
    return inside


def assistant_token_mask(tokenizer, messages: list[dict], origin: str = "conversation") -> tuple[list[int], list[bool]]:
    """Tokenise a chat once and mark its assistant tokens: ``(ids, is_assistant)``, both of length T.

    The chat is rendered by the tokenizer's chat template and the whole text is tokenised in one call (the
    ids are exactly ``tokenizer(rendered, add_special_tokens=False)``). The assistant *characters* are the
    ``{% generation %}`` blocks when the template has them (TRL's training templates put the assistant's
    content and its end-of-turn token there, the ``assistant`` header outside); otherwise, for each
    assistant turn, the text between ``render(messages[:i], add_generation_prompt=True)`` and
    ``render(messages[:i+1])``: its content and what the template closes the turn with. A token is an
    assistant token when its character offsets overlap those characters.
    """
    template = _chat_template_of(tokenizer)
    if template and _GENERATION_TAG.search(template):
        text, spans = _marked_assistant_spans(tokenizer, template, messages, origin)
    else:
        text, spans = _incremental_assistant_spans(tokenizer, messages, origin)
    ids, offsets = _encode_with_offsets(tokenizer, text, origin)
    return ids, _tokens_in_spans(offsets, spans)


def encode_conversation(
    tokenizer, messages: list[dict], responses_only: bool, origin: str = "conversation"
) -> Document:
    """Tokenise a chat through the tokenizer's chat template, once.

    With ``responses_only`` only the assistant tokens are targets (see :func:`assistant_token_mask`);
    otherwise every token is.
    """
    if not responses_only:
        ids = _encode_text(tokenizer, _render(tokenizer, messages, add_generation_prompt=False))
        return Document(ids, list(ids), splittable=False)
    ids, is_assistant = assistant_token_mask(tokenizer, messages, origin)
    labels = [i if a else IGNORE_INDEX for i, a in zip(ids, is_assistant)]
    return Document(ids, labels, splittable=False)


def encode_record(record: Record, tokenizer, responses_only: bool = False) -> Document:
    """Tokenise one record. Texts get ``<eos>`` appended (the document boundary)."""
    if record.token_ids is not None:
        return Document(list(record.token_ids), list(record.token_ids))
    if record.messages is not None:
        return encode_conversation(tokenizer, record.messages, responses_only, record.origin)
    if responses_only:
        raise DataError(
            f"{record.origin}: the sft stage needs conversations (`messages` or `prompt`/`response`), got plain text"
        )
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos token; documents cannot be separated (set tokenizer.eos_token)")
    ids = _encode_text(tokenizer, record.text) + [eos]
    return Document(ids, list(ids))


# ------------------------------------------------------------------------------------ packing
@dataclass
class PackedDataset:
    """Fixed-length rows: ``input_ids``, ``labels``, ``attention_mask``, all ``[N, seq_len]`` int64; with
    document boundaries also ``position_ids`` [N, seq_len] int64, restarting at 0 at every document (and at the
    padding after the last one; docs/training.md, "Document-aware packing")."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    num_documents: int = 0
    num_truncated: int = 0
    position_ids: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        out = {
            "input_ids": self.input_ids[idx],
            "labels": self.labels[idx],
            "attention_mask": self.attention_mask[idx],
        }
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids[idx]
        return out

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def uses_document_boundaries(cfg: DataConfig, stage: str) -> bool:
    """Whether the rows of ``stage`` carry their documents' ``position_ids``: ``data.document_boundaries``, by
    default (null) on for ``sft`` (each conversation trains as if alone), eager or streamed."""
    if cfg.document_boundaries is None:
        return stage == "sft"
    return bool(cfg.document_boundaries)


def pack_documents(
    docs: Iterable[Document], seq_len: int, pad_id: int, mode: str = "greedy", positions: bool = False
) -> PackedDataset:
    """Pack documents into rows of ``seq_len`` tokens.

    ``greedy``: each row holds whole documents in order; a document that does not fit in what is
    left of a row starts the next row (the rest is padding). Texts longer than ``seq_len`` are cut
    into ``seq_len`` pieces; conversations are truncated to ``seq_len`` (counted in ``num_truncated``).
    ``concat``: all documents are one stream cut every ``seq_len`` tokens; only the last row is padded.
    ``positions``: also return ``position_ids``, each token's position in its document (a document cut across
    rows continues its count; the padding counts from 0), so that the model restarts at every document.
    """
    rows: list[tuple[list[int], list[int], list[int]]] = []
    cur_ids: list[int] = []
    cur_labels: list[int] = []
    cur_pos: list[int] = []
    n_docs = 0
    n_trunc = 0

    def flush():
        nonlocal cur_ids, cur_labels, cur_pos
        if cur_ids:
            rows.append((cur_ids, cur_labels, cur_pos))
        cur_ids, cur_labels, cur_pos = [], [], []

    for doc in docs:
        if not doc.ids:
            continue
        n_docs += 1
        if mode == "concat":
            ids, labels, at = doc.ids, doc.labels, 0
            while ids:
                room = seq_len - len(cur_ids)
                cur_ids += ids[:room]
                cur_labels += labels[:room]
                cur_pos += range(at, at + len(ids[:room]))
                ids, labels, at = ids[room:], labels[room:], at + room
                if len(cur_ids) == seq_len:
                    flush()
            continue
        if mode != "greedy":
            raise ValueError(f"packing mode must be 'greedy' or 'concat', got {mode!r}")
        pieces: list[tuple[list[int], list[int], int]]  # (ids, labels, position of the first token)
        if len(doc.ids) > seq_len:
            if doc.splittable:
                pieces = [
                    (doc.ids[s : s + seq_len], doc.labels[s : s + seq_len], s) for s in range(0, len(doc.ids), seq_len)
                ]
            else:
                n_trunc += 1
                pieces = [(doc.ids[:seq_len], doc.labels[:seq_len], 0)]
        else:
            pieces = [(doc.ids, doc.labels, 0)]
        for ids, labels, at in pieces:
            if len(cur_ids) + len(ids) > seq_len:
                flush()
            cur_ids = cur_ids + ids
            cur_labels = cur_labels + labels
            cur_pos = cur_pos + list(range(at, at + len(ids)))
            if len(cur_ids) == seq_len:
                flush()
    flush()
    if not rows:
        raise DataError("no training tokens: every source was empty")
    n = len(rows)
    input_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    labels_t = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, seq_len), dtype=torch.long)
    position_ids = torch.arange(seq_len, dtype=torch.long).repeat(n, 1) if positions else None
    for r, (ids, labels, pos) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels_t[r, : len(ids)] = torch.tensor(labels, dtype=torch.long)
        mask[r, : len(ids)] = 1
        if position_ids is not None:
            position_ids[r, : len(ids)] = torch.tensor(pos, dtype=torch.long)
            position_ids[r, len(ids) :] = torch.arange(seq_len - len(ids))  # the padding: a document of its own
    return PackedDataset(input_ids, labels_t, mask, n_docs, n_trunc, position_ids)


def build_dataset(cfg: DataConfig, tokenizer, stage: str, extra_sources: Sequence[SourceLike] = ()) -> PackedDataset:
    """Read every source of ``cfg`` (plus ``extra_sources`` given from Python), tokenise and pack.

    The ``sft`` stage targets only assistant responses; the other stages target every token.
    """
    responses_only = stage == "sft"
    sources: list[SourceLike] = list(cfg.sources) + list(extra_sources)
    if not sources:
        raise DataError("no data sources: set data.sources")

    def documents() -> Iterator[Document]:
        count = 0
        for k, source in enumerate(sources):
            for record in iter_records(source, cfg, name=f"source[{k}]"):
                if cfg.max_documents is not None and count >= cfg.max_documents:
                    return
                count += 1
                yield encode_record(record, tokenizer, responses_only)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    positions = uses_document_boundaries(cfg, stage)
    packed = pack_documents(documents(), cfg.seq_len, pad_id if pad_id is not None else 0, cfg.packing, positions)
    if packed.num_target_tokens == 0:
        raise DataError("the data has no target tokens (for sft: no assistant responses)")
    return packed
