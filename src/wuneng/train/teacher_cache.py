"""Cached teacher logits for stage 2 (distillation without the teacher in memory).

One pass of the teacher over the packed training rows writes, per token, its ``k`` largest logits
(``topk_logits`` [n, T, k] float32, raw, before the temperature), their ids (``topk_ids`` [n, T, k] int32 on disk,
int64 when read) and
``rest_lse`` [n, T] float32 = ``logsumexp_{v not in top-k} z_v / tau``, the log-sum-exp of the *rest* of the
vocabulary at the distillation temperature (``-inf`` when k = V). The teacher's full normaliser is then exact:
``log Z_T = logaddexp(logsumexp_i z_i / tau, rest_lse)``.

Layout of the cache folder::

    shard-00000.safetensors   rows [0, shard_rows) of the dataset, by row index (not by sampling order)
    shard-00001.safetensors   ...
    cache.json                written last: the fingerprint and the shard list

Every file is written under a temporary name and renamed, ``cache.json`` only after every shard: an interrupted
build leaves no half shard and no manifest, and a cache without ``cache.json`` is refused. A rebuild reuses the
complete shards whose metadata carry the same fingerprint. Rows map to cache entries by the row index of the
packed dataset (the training sampler picks row indices; any epoch, any order, any number of processes reads the
same entry for the same row). The fingerprint (a hash of the rows' ``input_ids`` and ``attention_mask``, the
teacher's identity, ``seq_len``, ``top_k``, the vocabulary cut and the temperature) is checked when training
starts; a cache made for other data, another teacher or other settings is refused with one line naming what
differs.

The distillation loss against the cache is :func:`bucketed_kl_divergence_sum` (formula there).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "TeacherCacheError",
    "MANIFEST",
    "data_fingerprint",
    "teacher_fingerprint",
    "folder_fingerprint",
    "build_teacher_cache",
    "open_teacher_cache",
    "cache_teacher_for_config",
    "TeacherLogitCache",
    "bucketed_kl_divergence_sum",
    "chunked_bucketed_kl_divergence_sum",
]

logger = logging.getLogger(__name__)

MANIFEST = "cache.json"
FORMAT_VERSION = 2
#: Fields of the manifest a training run must match (in the order a mismatch is reported).
FINGERPRINT_FIELDS = ("data_sha256", "teacher", "seq_len", "top_k", "vocab", "temperature")


class TeacherCacheError(ValueError):
    """A teacher cache that is missing, incomplete, or made for other data/teacher/settings (one line)."""


# ------------------------------------------------------------------------------------ fingerprints
def data_fingerprint(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> str:
    """sha256 of the packed rows (``input_ids`` and ``attention_mask`` [N, T], as int64 bytes, with their shape)."""
    h = hashlib.sha256()
    h.update(repr(tuple(input_ids.shape)).encode())
    h.update(input_ids.to(torch.int64).contiguous().numpy().tobytes())
    h.update(attention_mask.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def teacher_fingerprint(teacher: torch.nn.Module) -> str:
    """sha256 of a teacher in memory: its parameter and buffer names, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for name, t in sorted(teacher.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "params:" + h.hexdigest()


def folder_fingerprint(path: str | Path) -> str:
    """A teacher folder's identity without loading it: sha256 of ``config.json`` and, per weights file
    (``*.safetensors``/``*.bin``), its name, size and first and last MiB."""
    path = Path(path).expanduser()
    h = hashlib.sha256()
    h.update((path / "config.json").read_bytes())
    for f in sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                h.update(fh.read())
    return "folder:" + h.hexdigest()


# ------------------------------------------------------------------------------------ building
def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _write_atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _topk_of(logits: torch.Tensor, top_k: int, temperature: float):
    """logits [B, T, V] -> (topk_ids [B,T,k] int32, topk_logits [B,T,k] float32, rest_lse [B,T] float32)."""
    z = logits.float()
    values, ids = z.topk(top_k, dim=-1)
    if top_k == z.shape[-1]:
        rest = torch.full(z.shape[:-1], -math.inf)
    else:
        rest_logits = (z / temperature).scatter(-1, ids, -math.inf)
        rest = rest_logits.logsumexp(-1)
    return ids.to(torch.int32), values, rest


def build_teacher_cache(
    teacher: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    path: str | Path,
    *,
    top_k: int,
    teacher_id: str,
    temperature: float = 1.0,
    vocab: Optional[int] = None,
    shard_rows: int = 256,
    batch_size: int = 8,
    device: Optional[torch.device] = None,
) -> Path:
    """Run ``teacher`` once over the rows ``input_ids``/``attention_mask`` [N, T] and write the cache to ``path``.

    ``vocab``: the logits are cut to their first ``vocab`` entries (the distillation vocabulary; default the
    teacher's output size). ``teacher_id``: :func:`folder_fingerprint` or :func:`teacher_fingerprint`. Shards of
    ``shard_rows`` rows are written atomically; existing complete shards with the same fingerprint are kept
    (a rebuild after an interruption continues). Returns the folder.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(path).expanduser()
    n_rows, seq_len = input_ids.shape
    if vocab is None:
        vocab = int(teacher.get_output_embeddings().weight.shape[0])
    if not 1 <= top_k <= vocab:
        raise TeacherCacheError(f"teacher_cache.top_k: must be in [1, {vocab}] (the vocabulary), got {top_k}")
    if shard_rows < 1:
        raise TeacherCacheError(f"teacher_cache.shard_rows: must be >= 1, got {shard_rows}")
    meta = {
        "format": FORMAT_VERSION,
        "data_sha256": data_fingerprint(input_ids, attention_mask),
        "teacher": teacher_id,
        "seq_len": int(seq_len),
        "top_k": int(top_k),
        "vocab": int(vocab),
        "temperature": float(temperature),
        "num_rows": int(n_rows),
        "shard_rows": int(shard_rows),
    }
    tag = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    path.mkdir(parents=True, exist_ok=True)
    manifest = path / MANIFEST
    if manifest.exists():
        old = json.loads(manifest.read_text(encoding="utf-8"))
        if old.get("tag") == tag:
            logger.info("teacher cache %s is complete for these rows and settings; nothing to do", path)
            return path
        raise TeacherCacheError(
            f"teacher cache {path} already holds a cache for other data or settings; nothing was overwritten: "
            "choose another teacher_cache.path or delete that folder"
        )
    device = device or next(teacher.parameters()).device
    teacher.eval()
    shards = []
    for s, start in enumerate(range(0, n_rows, shard_rows)):
        stop = min(start + shard_rows, n_rows)
        target = path / _shard_name(s)
        shards.append(target.name)
        if target.exists():
            try:
                with safe_open(str(target), "pt") as f:
                    old_meta = f.metadata() or {}
                if old_meta.get("tag") == tag and old_meta.get("rows") == f"{start}:{stop}":
                    logger.info("teacher cache: %s is complete, kept", target.name)
                    continue
            except Exception:  # unreadable: rebuilt below
                pass
        ids_parts, val_parts, rest_parts = [], [], []
        with torch.no_grad():
            for b in range(start, stop, batch_size):
                sl = slice(b, min(b + batch_size, stop))
                logits = teacher(
                    input_ids=input_ids[sl].to(device), attention_mask=attention_mask[sl].to(device)
                ).logits[..., :vocab]
                ids, values, rest = _topk_of(logits.cpu(), top_k, temperature)
                ids_parts.append(ids)
                val_parts.append(values)
                rest_parts.append(rest)
        tensors = {
            "topk_ids": torch.cat(ids_parts).contiguous(),
            "topk_logits": torch.cat(val_parts).contiguous(),
            "rest_lse": torch.cat(rest_parts).contiguous(),
        }
        tmp = target.with_name(f".{target.name}.tmp")
        save_file(tensors, str(tmp), metadata={"tag": tag, "rows": f"{start}:{stop}"})
        os.replace(tmp, target)
        logger.info("teacher cache: %s written (rows %d-%d of %d)", target.name, start, stop - 1, n_rows)
    _write_atomic_json(manifest, {**meta, "tag": tag, "shards": shards})
    logger.info("teacher cache %s complete: %d rows, top-%d, %d shards", path, n_rows, top_k, len(shards))
    return path


# ------------------------------------------------------------------------------------ reading
@dataclass
class _Expected:
    data_sha256: str
    teacher: Optional[str]
    seq_len: int
    top_k: int
    vocab: Optional[int]
    temperature: float


class TeacherLogitCache:
    """A complete cache folder, read by row index. Keeps the ``keep_shards`` most recently used shards in memory."""

    def __init__(self, path: str | Path, keep_shards: int = 2):
        self.path = Path(path).expanduser()
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise TeacherCacheError(
                f"teacher cache {self.path}: no {MANIFEST} (missing or an interrupted build); build it with "
                "`wuneng cache-teacher RECIPE`"
            )
        try:
            self.meta = json.loads(manifest.read_text(encoding="utf-8"))
        except ValueError as e:
            raise TeacherCacheError(f"teacher cache {manifest}: not valid JSON ({e}); rebuild the cache") from None
        if self.meta.get("format") != FORMAT_VERSION:
            raise TeacherCacheError(
                f"teacher cache {manifest}: format {self.meta.get('format')!r}, expected {FORMAT_VERSION}; rebuild it"
            )
        self.num_rows = int(self.meta["num_rows"])
        self.shard_rows = int(self.meta["shard_rows"])
        self.top_k = int(self.meta["top_k"])
        self.vocab = int(self.meta["vocab"])
        self.temperature = float(self.meta["temperature"])
        self.keep_shards = keep_shards
        self._shards: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()

    def check(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        top_k: int,
        temperature: float,
        vocab: Optional[int] = None,
        teacher_id: Optional[str] = None,
    ) -> None:
        """Refuse (:class:`TeacherCacheError`, one line) a cache made for other rows, teacher or settings.
        ``vocab``/``teacher_id`` None: not checked."""
        want = _Expected(
            data_fingerprint(input_ids, attention_mask),
            teacher_id,
            int(input_ids.shape[1]),
            int(top_k),
            vocab,
            float(temperature),
        )
        for name in FINGERPRINT_FIELDS:
            expected, stored = getattr(want, name), self.meta.get(name)
            if expected is None:
                continue
            if expected != stored:
                what = {
                    "data_sha256": "other training data (the packed rows differ)",
                    "teacher": "another teacher",
                }.get(name, f"{name} {stored!r} (this run: {expected!r})")
                raise TeacherCacheError(
                    f"teacher cache {self.path} was made for {what}; rebuild it for this recipe with "
                    "`wuneng cache-teacher RECIPE` into another teacher_cache.path"
                )

    def _shard(self, index: int) -> dict[str, torch.Tensor]:
        if index in self._shards:
            self._shards.move_to_end(index)
            return self._shards[index]
        from safetensors import safe_open

        file = self.path / _shard_name(index)
        try:
            with safe_open(str(file), "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in ("topk_ids", "topk_logits", "rest_lse")}
        except Exception as e:
            raise TeacherCacheError(f"teacher cache shard {file}: unreadable ({e}); rebuild the cache") from None
        if meta.get("tag") != self.meta.get("tag"):
            raise TeacherCacheError(f"teacher cache shard {file} belongs to another build; rebuild the cache")
        self._shards[index] = tensors
        while len(self._shards) > self.keep_shards:
            self._shards.popitem(last=False)
        return tensors

    def rows(self, indices) -> dict[str, torch.Tensor]:
        """``{"topk_ids" [B,T,k] int64, "topk_logits" [B,T,k], "rest_lse" [B,T]}`` for dataset rows ``indices``."""
        parts = []
        for r in (int(i) for i in indices):
            if not 0 <= r < self.num_rows:
                raise TeacherCacheError(f"teacher cache {self.path} has {self.num_rows} rows; row {r} was asked for")
            shard, offset = divmod(r, self.shard_rows)
            t = self._shard(shard)
            parts.append({k: v[offset] for k, v in t.items()})
        out = {k: torch.stack([p[k] for p in parts]) for k in ("topk_ids", "topk_logits", "rest_lse")}
        out["topk_ids"] = out["topk_ids"].long()  # int32 on disk (a third less), int64 for gather
        return out


# ------------------------------------------------------------------------------------ the loss
def bucketed_kl_divergence_sum(
    topk_ids: torch.Tensor,
    topk_logits: torch.Tensor,
    rest_lse: torch.Tensor,
    student_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Forward KL over the teacher's top-k tokens plus one "rest" bucket, summed over real tokens.

    With ``a_i = z_i / tau`` (teacher's top-k logits, i = 1..k), ``r`` = ``rest_lse`` and
    ``log Z = logsumexp(a_1, ..., a_k, r)`` (the teacher's exact normaliser over the whole vocabulary):

        q_i = exp(a_i - log Z),  q_rest = exp(r - log Z) = 1 - sum_i q_i
        p_i = softmax(s / tau)[id_i],  p_rest = 1 - sum_i p_i  (computed as logsumexp of s / tau off the top-k)
        KL_t = tau^2 * ( sum_i q_i (log q_i - log p_i) + q_rest (log q_rest - log p_rest) )

    and the result is ``sum_t mask_t * KL_t``. With k = V there is no rest bucket and this is
    :func:`~wuneng.train.stages.kl_divergence_sum` exactly (the same sum over the vocabulary, reordered).
    topk_ids/topk_logits [B, T, k], rest_lse [B, T], student_logits [B, T, V], mask [B, T]. Computed in float32, or
    in float64 when the student logits are float64 (the tests' exact check of the formula).
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.to(dtype) / temperature
    # only k + 1 student log-probabilities are needed: no [N, V] log_softmax is materialised
    lse_all = s.logsumexp(-1)
    log_p_top = s.gather(-1, topk_ids) - lse_all.unsqueeze(-1)
    a = topk_logits.to(dtype) / temperature
    k, vocab = topk_ids.shape[-1], s.shape[-1]
    if k == vocab:
        log_q = F.log_softmax(a, dim=-1)
        per_token = (log_q.exp() * (log_q - log_p_top)).sum(-1)
    else:
        r = rest_lse.to(dtype).unsqueeze(-1)
        log_z = torch.cat([a, r], dim=-1).logsumexp(-1, keepdim=True)
        log_q = a - log_z
        log_q_rest = (r - log_z).squeeze(-1)
        log_p_rest = s.scatter(-1, topk_ids, -math.inf).logsumexp(-1) - lse_all
        per_token = (log_q.exp() * (log_q - log_p_top)).sum(-1) + log_q_rest.exp() * (log_q_rest - log_p_rest)
    per_token = per_token * temperature**2
    return (per_token * mask.to(per_token.dtype)).sum()


def chunked_bucketed_kl_divergence_sum(
    topk_ids: torch.Tensor,
    topk_logits: torch.Tensor,
    rest_lse: torch.Tensor,
    student_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = 4096,
) -> torch.Tensor:
    """:func:`bucketed_kl_divergence_sum` over chunks of ``chunk_tokens`` tokens, each recomputed in the backward
    (as :func:`~wuneng.train.stages.chunked_kl_divergence_sum`). Same value and gradient."""
    k, vocab = topk_ids.shape[-1], student_logits.shape[-1]
    ids, vals = topk_ids.reshape(-1, k), topk_logits.reshape(-1, k)
    rest, s, m = rest_lse.reshape(-1), student_logits.reshape(-1, vocab), mask.reshape(-1)
    if s.shape[0] <= chunk_tokens:
        return bucketed_kl_divergence_sum(ids, vals, rest, s, m, temperature)
    from torch.utils.checkpoint import checkpoint

    total = s.new_zeros((), dtype=torch.promote_types(s.dtype, torch.float32))
    for start in range(0, s.shape[0], chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        total = total + checkpoint(
            bucketed_kl_divergence_sum, ids[sl], vals[sl], rest[sl], s[sl], m[sl], temperature, use_reentrant=False
        )
    return total


# ------------------------------------------------------------------------------------ from a recipe
def _teacher_id(config, teacher: Optional[torch.nn.Module]) -> Optional[str]:
    """The identity the cache is keyed to: the teacher object's parameters when one is given, else the teacher
    folder of the recipe (cheap, nothing loaded), else None (not checked)."""
    if teacher is not None:
        return teacher_fingerprint(teacher)
    if config.teacher is not None and (Path(config.teacher).expanduser() / "config.json").is_file():
        return folder_fingerprint(config.teacher)
    return None


def open_teacher_cache(config, dataset, teacher: Optional[torch.nn.Module] = None) -> TeacherLogitCache:
    """The cache of ``config.distill.teacher_cache`` checked against ``dataset`` (a PackedDataset) and the run's
    settings (:meth:`TeacherLogitCache.check`); the teacher is checked when ``teacher`` or ``config.teacher``
    names it."""
    cfg = config.distill.teacher_cache
    cache = TeacherLogitCache(cfg.path)
    cache.check(
        dataset.input_ids,
        dataset.attention_mask,
        top_k=cfg.top_k,
        temperature=config.distill.temperature,
        teacher_id=_teacher_id(config, teacher),
    )
    return cache


def _student_vocab(config) -> Optional[int]:
    """``vocab_size`` of the recipe's student from its config (no model is built), None if unknown."""
    m = config.model
    if m.path is not None:
        file = Path(m.path).expanduser() / "config.json"
    elif isinstance(m.config, str):
        file = Path(m.config).expanduser()
        file = file / "config.json" if file.is_dir() else file
    else:
        return (m.config or {}).get("vocab_size")
    try:
        return json.loads(file.read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError):
        return None


def cache_teacher_for_config(
    config,
    *,
    teacher: Optional[torch.nn.Module] = None,
    tokenizer=None,
    dataset=None,
    data_sources=(),
) -> Path:
    """Build the cache of a distill recipe (``wuneng cache-teacher RECIPE``): the recipe's rows (the same
    :func:`~wuneng.train.data.build_dataset` as ``train``), its teacher, ``distill.teacher_cache`` settings."""
    from ..saving import load_causal_lm
    from .config import ConfigError
    from .data import build_dataset
    from .loop import _pick_tokenizer
    from .stages import _output_vocab, reconcile_vocab_size

    cfg = config.distill.teacher_cache
    if cfg is None or not cfg.path:
        raise ConfigError("config.distill.teacher_cache.path: set the folder the teacher cache is written to")
    if teacher is None:
        if config.teacher is None:
            raise ConfigError("config.teacher: building a teacher cache needs the teacher folder")
        teacher = load_causal_lm(config.teacher, torch.float32, "teacher")
        teacher_id = folder_fingerprint(config.teacher)
    else:
        teacher_id = teacher_fingerprint(teacher)
    if tokenizer is None:
        tokenizer = _pick_tokenizer(config)
    if dataset is None:
        dataset = build_dataset(config.data, tokenizer, "distill", data_sources)
    teacher_vocab = _output_vocab(teacher)
    student_vocab = _student_vocab(config)
    vocab = (
        teacher_vocab if student_vocab is None else reconcile_vocab_size(teacher_vocab, student_vocab, len(tokenizer))
    )
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    teacher.to(device)
    return build_teacher_cache(
        teacher,
        dataset.input_ids,
        dataset.attention_mask,
        cfg.path,
        top_k=cfg.top_k,
        teacher_id=teacher_id,
        temperature=config.distill.temperature,
        vocab=vocab,
        shard_rows=cfg.shard_rows,
        batch_size=cfg.batch_size,
        device=device,
    )
