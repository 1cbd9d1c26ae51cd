"""The training objectives of the four stages (SPEC section 5).

Each objective is an ``nn.Module`` wrapping the trained model (``.student``) so that data-parallel
wrappers (DDP/FSDP) see one module whose ``forward(batch)`` returns *sums over tokens*:

    {"loss_sum": scalar tensor with grad, "<metric>": detached scalar sums, ...}

and ``count_tokens(batch)`` gives the number of tokens those sums run over. The loop divides by the
token count of the whole optimiser step (all micro-batches, all processes), so the gradient is the
exact token mean of the global batch however it is split. A term averaged over *other* tokens (the
distillation CE over labels, the KL over input tokens) names its count in ``term_counts(batch)``; the
loop then passes ``term_scales={term: n_tokens / n_term}`` (global counts of the step) to ``forward``,
which multiplies that term's sum by it, so the term ends up divided by its own global count.

- :class:`CausalLMObjective` (pretrain, sft): next-token cross-entropy on positions whose label is
  not -100 (sft data masks prompts).
- :class:`DistillObjective` (stage 2): ``tau^2 * KL(p_T || p_S)`` per real token at temperature tau,
  plus ``ce_weight`` x cross-entropy; teacher logits on the fly, or cached top-k logits
  (``teacher_cache``: :func:`wuneng.train.teacher_cache.bucketed_kl_divergence_sum`).
- :class:`AlignObjective` (stage 1): per-layer ``||y_T - y_S||_2 / sqrt(C)`` of converted mixers fed
  the teacher's own layer inputs (teacher-forced across depth).

A teacher is held outside the module's parameters (``object.__setattr__``), so DDP never syncs it and
the optimizer never sees it.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..labels import IGNORE_INDEX
from ..layers.hybrid import HybridContext

__all__ = [
    "Objective",
    "CausalLMObjective",
    "DistillObjective",
    "AlignObjective",
    "shifted_cross_entropy_sum",
    "kl_divergence_sum",
    "chunked_kl_divergence_sum",
    "capture_teacher_attention",
    "check_align_teacher",
    "reconcile_vocab_size",
    "build_objective",
]


def shifted_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy and its token count.

    logits [B, T, V], labels [B, T] aligned with the inputs (-100 = ignore); position t predicts
    ``labels[t + 1]``. Computed in float32.
    """
    target = labels[:, 1:]
    pred = logits[:, :-1].float()
    loss = F.cross_entropy(
        pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, (target != IGNORE_INDEX).sum()


def kl_divergence_sum(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``sum_t mask_t * tau^2 * sum_v p_T(v) (log p_T(v) - log p_S(v))`` with ``p = softmax(z / tau)``.

    teacher_logits, student_logits [B, T, V] (same V), mask [B, T] (1 = real token). Forward KL, the
    ``tau^2`` factor keeps gradient magnitudes comparable across temperatures (Hinton et al.).
    Computed in float32. This is the reference for :func:`chunked_kl_divergence_sum`.
    """
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    per_token = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * temperature**2
    return (per_token * mask.to(per_token.dtype)).sum()


def chunked_kl_divergence_sum(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = 4096,
) -> torch.Tensor:
    """:func:`kl_divergence_sum` over chunks of ``chunk_tokens`` tokens, each recomputed in the backward
    pass (activation checkpointing): the float32 softmax intermediates of only one chunk are alive at a
    time (at V = 152k and 2k tokens the unchunked form holds ~5 GB of them). Same value and gradient."""
    vocab = teacher_logits.shape[-1]
    t = teacher_logits.reshape(-1, vocab)
    s = student_logits.reshape(-1, vocab)
    m = mask.reshape(-1)
    if t.shape[0] <= chunk_tokens:
        return kl_divergence_sum(t, s, m, temperature)
    from torch.utils.checkpoint import checkpoint

    total = s.new_zeros((), dtype=torch.float32)
    for start in range(0, t.shape[0], chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        total = total + checkpoint(kl_divergence_sum, t[sl], s[sl], m[sl], temperature, use_reentrant=False)
    return total


def _output_vocab(model: nn.Module) -> int:
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return int(emb.weight.shape[0])
    return int(model.config.vocab_size)


def reconcile_vocab_size(teacher_vocab: int, student_vocab: int, tokenizer_size: Optional[int]) -> int:
    """The vocabulary both logit tensors are cut to for distillation.

    Equal sizes: that size. Different sizes (one model's embedding is padded): the smaller, provided
    the tokenizer produces no id beyond it; otherwise the models do not share a vocabulary and a
    ValueError says so.
    """
    if teacher_vocab == student_vocab:
        return teacher_vocab
    common = min(teacher_vocab, student_vocab)
    if tokenizer_size is not None and tokenizer_size <= common:
        return common
    raise ValueError(
        f"teacher vocabulary ({teacher_vocab}) and student vocabulary ({student_vocab}) differ and the tokenizer has "
        f"{tokenizer_size} ids, more than the smaller one ({common}): the models do not share a vocabulary. "
        "Distil from a teacher with the student's tokenizer (e.g. the model the student was converted from)."
    )


class Objective(nn.Module):
    """Base: holds the trained model as ``self.student``."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student
        # Let FSDP auto-wrap find the decoder layer classes through the wrapper.
        self._no_split_modules = getattr(student, "_no_split_modules", None)

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def term_counts(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{term: count}`` for terms normalised by their own count instead of :meth:`count_tokens` (default
        none); ``forward`` then takes ``term_scales`` (see the module docstring)."""
        return {}

    def unused_names(self, align: bool = False) -> set[str]:
        """Parameters the student declares unused by its forward (``unused_parameter_names()``, e.g. the
        value-residual LoRA of the layer that produces v_first, or the state side of a WuNeng layer whose output
        does not read the state): kept frozen, so that DDP needs no ``find_unused_parameters``. ``align``: unused
        by the stage-1 ``align_forward`` instead."""
        fn = getattr(self.student, "unused_parameter_names", None)
        if not callable(fn):
            return set()
        return set(fn(align=True) if align else fn())

    def set_trainable(self) -> None:
        """Set ``requires_grad`` of the student's parameters for this stage (default: all used ones)."""
        unused = self.unused_names()
        for n, p in self.student.named_parameters():
            p.requires_grad_(n not in unused)


class CausalLMObjective(Objective):
    """Next-token cross-entropy (pretrain; sft with prompt labels = -100)."""

    def count_tokens(self, batch):
        return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "position_ids" in batch:
            # packed documents (data.document_boundaries): the position_ids restarting at 0 mark them, read by
            # transformers (block-diagonal attention) and by the recurrent models only without an attention mask
            # and a cache; the padding at a row's end comes after every real token, so no real token sees it
            out = self.student(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        else:
            out = self.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        ce, _ = shifted_cross_entropy_sum(out.logits, batch["labels"])
        return {"loss_sum": ce, "ce": ce.detach()}


class DistillObjective(Objective):
    """Stage 2: ``kl_weight * KL + ce_weight * CE``: the KL is a mean over the real (attention-mask) tokens, the
    CE a mean over the labels that are not -100 (next-token targets: one fewer per row, none on masked
    prompts), each over its own count of the whole optimiser step."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 1.0,
        kl_weight: float = 1.0,
        ce_weight: float = 0.0,
        freeze_mlp: bool = False,
        tokenizer_size: Optional[int] = None,
        chunk_tokens: int = 4096,
        teacher_cache=None,
    ):
        super().__init__(student)
        object.__setattr__(self, "teacher", teacher)  # not a submodule: never synced nor optimised
        # teacher_cache: a TeacherLogitCache read by batch["row_index"] instead of running the teacher (the KL is
        # then wuneng.train.teacher_cache.bucketed_kl_divergence_sum: top-k tokens plus a "rest" bucket).
        object.__setattr__(self, "teacher_cache", teacher_cache)
        self.chunk_tokens = chunk_tokens
        self.temperature = temperature
        self.kl_weight = kl_weight
        self.ce_weight = ce_weight
        self.freeze_mlp = freeze_mlp
        teacher_vocab = teacher_cache.vocab if teacher_cache is not None else _output_vocab(teacher)
        self.vocab = reconcile_vocab_size(teacher_vocab, _output_vocab(student), tokenizer_size)
        if teacher_cache is not None and self.vocab != teacher_cache.vocab:
            raise ValueError(
                f"teacher cache {teacher_cache.path} holds logits over {teacher_cache.vocab} ids but distillation "
                f"uses {self.vocab}; rebuild it with `wuneng cache-teacher` for this student"
            )

    def set_trainable(self) -> None:
        frozen = 0
        unused = self.unused_names()
        for name, p in self.student.named_parameters():
            is_mlp = ".mlp." in f".{name}"
            p.requires_grad_(not (self.freeze_mlp and is_mlp) and name not in unused)
            frozen += int(self.freeze_mlp and is_mlp)
        if self.freeze_mlp and frozen == 0:
            raise ValueError("distill.freeze_mlp is set but the student has no parameters named '*.mlp.*'")

    def count_tokens(self, batch):
        return batch["attention_mask"].sum()

    def term_counts(self, batch):
        return {"ce": (batch["labels"][:, 1:] != IGNORE_INDEX).sum()} if self.ce_weight else {}

    def forward(self, batch, term_scales: Optional[dict[str, float]] = None):
        """Sums over the batch (see the module docstring). ``term_scales["ce"]`` = tokens / labels of the whole
        optimiser step (the loop's); without it, this batch's own ratio: ``loss_sum / count_tokens(batch)`` is
        then the KL's token mean plus ``ce_weight`` x the CE's label mean of this batch."""
        v = self.vocab
        if self.teacher_cache is not None:
            from .teacher_cache import chunked_bucketed_kl_divergence_sum

            cached = self.teacher_cache.rows(batch["row_index"].tolist())
            dev = batch["input_ids"].device
            student_logits = self.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            kl = chunked_bucketed_kl_divergence_sum(
                cached["topk_ids"].to(dev),
                cached["topk_logits"].to(dev),
                cached["rest_lse"].to(dev),
                student_logits[..., :v],
                batch["attention_mask"],
                self.temperature,
                self.chunk_tokens,
            )
        else:
            with torch.no_grad():
                teacher_logits = self.teacher(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
            student_logits = self.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            kl = chunked_kl_divergence_sum(
                teacher_logits[..., :v],
                student_logits[..., :v],
                batch["attention_mask"],
                self.temperature,
                self.chunk_tokens,
            )
        loss = self.kl_weight * kl
        metrics = {"kl": kl.detach()}
        if self.ce_weight:
            ce, n_labels = shifted_cross_entropy_sum(student_logits, batch["labels"])
            if term_scales is None:
                scale = self.count_tokens(batch).to(ce.dtype) / n_labels.clamp_min(1).to(ce.dtype)
            else:
                scale = term_scales["ce"]
            ce = ce * scale  # divided by the token count later: the CE's mean over its labels
            loss = loss + self.ce_weight * ce
            metrics["ce"] = ce.detach()
        return {"loss_sum": loss, **metrics}


# ------------------------------------------------------------------------------------ stage 1
class _StopForward(Exception):
    """Raised by the last capture hook: the teacher's remaining layers are not needed."""


def capture_teacher_attention(
    teacher: nn.Module, layers: Sequence[int], input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
) -> dict[int, dict[str, Any]]:
    """Run the teacher (no grad) and capture, for each layer i in ``layers``, what its attention
    ``teacher.model.layers[i].self_attn`` received and returned:

    ``{"hidden_states": [B,T,C] (the normed layer input), "args": the other positional arguments, "kwargs": the
    keyword arguments (position embeddings, the teacher's own attention mask, ...), "output": [B,T,C] y_T incl.
    o_proj}``: what a WuNeng mixer's ``align_forward`` takes. The forward stops after the last captured layer.
    """
    captured: dict[int, dict[str, Any]] = {}
    last = max(layers)
    handles = []

    def make_hook(i: int):
        def hook(module, args, kwargs, output):
            kwargs = dict(kwargs)
            if "hidden_states" in kwargs:
                hidden = kwargs.pop("hidden_states")
            else:
                hidden, args = args[0], args[1:]
            y = output[0] if isinstance(output, (tuple, list)) else output
            captured[i] = {
                "hidden_states": hidden.detach(),
                "args": tuple(args),
                "kwargs": kwargs,
                "output": y.detach(),
            }
            if i == last:
                raise _StopForward

        return hook

    try:
        decoder_layers = teacher.model.layers
    except AttributeError:
        raise TypeError(
            "the teacher must be a transformers decoder-only causal LM (teacher.model.layers[i].self_attn)"
        ) from None
    for i in layers:
        if not 0 <= i < len(decoder_layers):
            raise ValueError(f"align layer {i} is out of range: the teacher has {len(decoder_layers)} layers")
        handles.append(decoder_layers[i].self_attn.register_forward_hook(make_hook(i), with_kwargs=True))
    try:
        with torch.no_grad():
            teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in layers if i not in captured]
    if missing:
        raise RuntimeError(f"the teacher's forward did not call self_attn of layers {missing}")
    return captured


def _rms_distance_sum(y_teacher: torch.Tensor, y_student: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum_tokens mask * ||y_T - y_S||_2 / sqrt(C)`` over [B, T, C] in float32."""
    diff = y_teacher.float() - y_student.float()
    per_token = diff.norm(dim=-1) / math.sqrt(diff.shape[-1])
    return (per_token * mask.to(per_token.dtype)).sum()


#: Config fields a stage-1 teacher shares with the student converted from it (the student keeps the teacher's shapes).
ALIGN_TEACHER_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
)


def check_align_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """Stage 1 needs the teacher the student was converted from: a transformers decoder
    (``teacher.model.layers[i].self_attn``, else TypeError) of the architecture recorded in the student's
    ``config.teacher_model_type`` and with its shapes (:data:`ALIGN_TEACHER_FIELDS`), else a ValueError naming
    each differing field."""
    layers = getattr(getattr(teacher, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise TypeError(
            f"align: the teacher ({type(teacher).__name__}) is not a transformers decoder-only causal LM "
            "(teacher.model.layers[i].self_attn); expected the model the student was converted from: set `teacher:` to that folder"
        )
    sc, tc = getattr(student, "config", None), getattr(teacher, "config", None)
    expected_type, teacher_type = getattr(sc, "teacher_model_type", None), getattr(tc, "model_type", None)
    if expected_type is not None and teacher_type != expected_type:
        raise ValueError(
            f"align: the teacher is a {teacher_type!r} model ({type(teacher).__name__}) but the student was converted "
            f"from a {expected_type!r} teacher (config.teacher_model_type); expected the model the student was "
            "converted from: set `teacher:` to that folder"
        )
    differing = []
    for field in ALIGN_TEACHER_FIELDS:
        want, got = getattr(sc, field, None), getattr(tc, field, None)
        if field == "head_dim" and got is None and tc is not None:
            got = tc.hidden_size // tc.num_attention_heads
        if want is not None and got is not None and want != got:
            differing.append(f"{field} {got} (teacher) vs {want} (student)")
    if differing:
        raise ValueError(
            f"align: the teacher's shapes do not match the student's ({', '.join(differing)}); expected the model the "
            "student was converted from: set `teacher:` to that folder"
        )


class AlignObjective(Objective):
    """Stage 1 (ARWKV alignment, SPEC section 5), teacher-forced across depth.

    The student follows the WuNeng contract: ``student.model.layers[i].self_attn.align_forward(
    hidden_states, *args, wuneng_context=HybridContext(mask), **kwargs) -> {"output", ["state"]}`` with what the
    teacher's attention of that layer received (:func:`capture_teacher_attention`) and the 2-D padding mask [B, T],
    ``student.converted_layer_indices()`` and ``student.new_parameter_names()``. Only the new
    parameters of the aligned layers train. Loss = mean over layers of the output term plus
    ``state_weight`` x mean over layers of the state term (hybrid mixers only); both are reported
    (``align_output``, ``align_state``).
    """

    def __init__(
        self, student: nn.Module, teacher: nn.Module, layers: Optional[Sequence[int]] = None, state_weight: float = 1.0
    ):
        super().__init__(student)
        for attr in ("converted_layer_indices", "new_parameter_names"):
            if not callable(getattr(student, attr, None)):
                raise TypeError(
                    f"the align stage needs a converted student (WuNengForCausalLM from `wuneng convert`) with "
                    f"`{attr}()`; got {type(student).__name__}"
                )
        check_align_teacher(student, teacher)
        object.__setattr__(self, "teacher", teacher)
        converted = list(student.converted_layer_indices())
        # Ascending: hybrid mixers share v_first, which the first converted layer publishes.
        self.layers = sorted(layers) if layers is not None else sorted(converted)
        if not self.layers:
            raise ValueError("the student has no converted layers to align")
        # Converted layers below the last aligned one also run (without grad, no loss): a hybrid/ARWKV
        # mixer may read v_first, which the first converted layer publishes in its align_forward.
        self.run_layers = [i for i in sorted(converted) if i <= max(self.layers)] if self.layers else []
        not_converted = sorted(set(self.layers) - set(converted))
        if not_converted:
            raise ValueError(
                f"align.layers {not_converted} are not converted layers of the student (converted: {converted})"
            )
        self.state_weight = state_weight

    def trainable_names(self) -> set[str]:
        new = set(self.student.new_parameter_names())
        prefixes = tuple(f"model.layers.{i}." for i in self.layers)
        return {n for n in new if n.startswith(prefixes)} - self.unused_names(align=True)

    def set_trainable(self) -> None:
        names = self.trainable_names()
        params = dict(self.student.named_parameters())
        unknown = sorted(n for n in names if n not in params)
        if unknown:
            raise ValueError(f"new_parameter_names() lists parameters the student does not have: {unknown[:5]}")
        if not names:
            raise ValueError("the aligned layers have no new parameters to train")
        for n, p in params.items():
            p.requires_grad_(n in names)

    def count_tokens(self, batch):
        return batch["attention_mask"].sum()

    def forward(self, batch):
        mask = batch["attention_mask"]
        captured = capture_teacher_attention(self.teacher, self.run_layers, batch["input_ids"], mask)
        out_sum = torch.zeros((), device=mask.device)
        state_sum = torch.zeros((), device=mask.device)
        n_state = 0
        aligned = set(self.layers)
        # one context for the batch: the 2-D padding mask, and v_first published by the first converted layer
        context = HybridContext(mask)
        for i in self.run_layers:
            c = captured[i]
            mixer = self.student.model.layers[i].self_attn
            with contextlib.nullcontext() if i in aligned else torch.no_grad():
                result = mixer.align_forward(c["hidden_states"], *c["args"], wuneng_context=context, **c["kwargs"])
            if i not in aligned:
                continue
            out_sum = out_sum + _rms_distance_sum(c["output"], result["output"], mask)
            if "state" in result and result["state"] is not None:
                state_sum = state_sum + _rms_distance_sum(c["output"], result["state"], mask)
                n_state += 1
        n = len(self.layers)
        out_term = out_sum / n
        metrics = {"align_output": out_term.detach()}
        loss = out_term
        if n_state:
            state_term = state_sum / n_state
            loss = loss + self.state_weight * state_term
            metrics["align_state"] = state_term.detach()
        return {"loss_sum": loss, **metrics}


def build_objective(
    stage: str,
    student: nn.Module,
    teacher: Optional[nn.Module],
    config,
    tokenizer_size: Optional[int] = None,
    teacher_cache=None,
) -> Objective:
    """The objective of ``stage`` with its trainable parameters set (``teacher_cache``: distill from cached logits)."""
    if stage in ("pretrain", "sft"):
        obj: Objective = CausalLMObjective(student)
    elif stage == "distill":
        d = config.distill
        obj = DistillObjective(
            student,
            teacher,
            d.temperature,
            d.kl_weight,
            d.ce_weight,
            d.freeze_mlp,
            tokenizer_size,
            d.chunk_tokens,
            teacher_cache=teacher_cache,
        )
    elif stage == "align":
        obj = AlignObjective(student, teacher, config.align.layers, config.align.state_weight)
    else:
        raise ValueError(f"unknown stage {stage!r}; use one of pretrain, align, distill, sft")
    obj.set_trainable()
    if getattr(config, "peft", None) is not None:  # LoRA / frozen parts on top of the stage's trainable set
        from .peft_options import apply_peft_options

        apply_peft_options(student, config.peft, stage)
    return obj
