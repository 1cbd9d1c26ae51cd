"""The project's models under transformers' ``Trainer`` and TRL's ``SFTTrainer`` (docs/training.md, "Using
transformers' Trainer / TRL"): RWKV-7, Meta-State and WuNeng (converted from a tiny random Qwen2).

Each run is a few steps on one repeated tiny batch (seeded), checking what a user relies on: the loss the trainer
logs is the model's own cross-entropy on the batch, it goes down, gradient accumulation gives the step of one big
batch (the models honour ``num_items_in_batch``), the trainer's checkpoint reloads through ``AutoModelForCausalLM``
with equal logits, and SFT with ``assistant_only_loss`` puts the loss on exactly the assistant replies.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

from wuneng.models.metastate import MetaStateConfig, MetaStateForCausalLM
from wuneng.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM
from wuneng.models.wuneng import WuNengForCausalLM
from wuneng.tokenization import ByteLevelTokenizer

from chat_tokenizers import qwen2_style_tokenizer
from train_helpers import tiny_qwen2

KINDS = ["rwkv7", "metastate", "wuneng"]
TEXTS = ["the cat sat on the mat.", "hello world, hello", "abc abc abc abc abc", "one two three"]


def tiny_model(kind: str, vocab_size: int) -> torch.nn.Module:
    """A seeded tiny model of ``kind``; WuNeng via ``from_teacher`` of a random Qwen2 (head_dim 16)."""
    torch.manual_seed(0)
    if kind == "rwkv7":
        return RWKV7ForCausalLM(RWKV7Config(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, head_size=16))
    if kind == "metastate":
        cfg = MetaStateConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, head_size=16)
        return MetaStateForCausalLM(cfg)
    return WuNengForCausalLM.from_teacher(tiny_qwen2(vocab_size=vocab_size, hidden=64))


def padded_rows(tokenizer, texts: list[str], length: int) -> list[dict]:
    """Right-padded rows of different lengths: input_ids, attention_mask, labels (-100 on the padding)."""
    rows = []
    for text in texts:
        ids = tokenizer(text)["input_ids"][:length]
        pad = length - len(ids)
        rows.append(
            {
                "input_ids": ids + [tokenizer.pad_token_id] * pad,
                "attention_mask": [1] * len(ids) + [0] * pad,
                "labels": ids + [-100] * pad,
            }
        )
    return rows


def training_args(out, **overrides) -> TrainingArguments:
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    base.update(overrides)
    return TrainingArguments(**base)


def logged_losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def batch_of(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}


def hand_cross_entropy(model, batch) -> float:
    """Next-token cross-entropy from the model's logits (float64), -100 labels ignored: the reference."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float(
        F.cross_entropy(
            logits[:, :-1].double().flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100, reduction="mean"
        )
    )


@pytest.mark.parametrize("kind", KINDS)
def test_trainer_trains_and_its_checkpoint_reloads(kind, tmp_path):
    tokenizer = ByteLevelTokenizer()
    rows = padded_rows(tokenizer, TEXTS, 24)
    model = tiny_model(kind, len(tokenizer))
    before = copy.deepcopy(model).eval()
    steps = 6
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path / "out", max_steps=steps, save_strategy="steps", save_steps=steps),
        train_dataset=rows,
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )
    trainer.train()
    losses = logged_losses(trainer)
    assert len(losses) == steps
    # step 1's loss is the untrained model's cross-entropy on the (whole, repeated) batch
    assert losses[0] == pytest.approx(hand_cross_entropy(before, batch_of(rows)), rel=1e-5)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.85 * losses[0], losses

    folder = tmp_path / "out" / f"checkpoint-{steps}"  # the Trainer's own checkpoint (weights, optimizer, state)
    reloaded = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert type(reloaded) is type(model)
    ids = batch_of(rows)["input_ids"]
    model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_accumulation_equals_one_batch(kind, tmp_path):
    """2 micro-batches of 2 rows accumulated = 1 batch of 4 rows (rows of different lengths, plain SGD, no
    clipping): the model's loss must honour the Trainer's ``num_items_in_batch`` (tokens of the whole step)."""
    tokenizer = ByteLevelTokenizer()
    rows = padded_rows(tokenizer, TEXTS, 24)
    runs = {}
    for name, batch, accum in (("one", 4, 1), ("accumulated", 2, 2)):
        model = tiny_model(kind, len(tokenizer))
        args = training_args(
            tmp_path / name,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accum,
            max_steps=2,
            optim="sgd",
            learning_rate=0.5,
            max_grad_norm=0.0,
            weight_decay=0.0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=default_data_collator)
        trainer.train()
        runs[name] = (logged_losses(trainer), {k: v.detach().clone() for k, v in model.state_dict().items()})
    (loss_one, state_one), (loss_acc, state_acc) = runs["one"], runs["accumulated"]
    assert loss_acc == pytest.approx(loss_one, rel=1e-5)
    for k in state_one:
        torch.testing.assert_close(state_acc[k], state_one[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(state_one[k], v) for k, v in tiny_model(kind, len(tokenizer)).state_dict().items())


CHATS = [
    {"messages": [{"role": "user", "content": f"add {a} {b}"}, {"role": "assistant", "content": f"{a + b} ok"}]}
    for a in range(3)
    for b in range(2)
]


@pytest.mark.parametrize("kind", KINDS)
def test_trl_sft_trainer_assistant_only_loss(kind, tmp_path):
    tokenizer = qwen2_style_tokenizer(marked=True)  # {% generation %} blocks: TRL's assistant masks
    model = tiny_model(kind, len(tokenizer))
    before = copy.deepcopy(model).eval()
    steps = 6
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=steps,
        per_device_train_batch_size=len(CHATS),
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        assistant_only_loss=True,
        max_length=64,
        bf16=False,  # SFTConfig's default is bf16 autocast, on the CPU too; compared exactly here in float32
    )
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(CHATS), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    # the loss sits on exactly each reply and its end of turn, nothing of the prompt or the padding
    replies = sorted(tokenizer.decode(row[row != -100]) for row in batch["labels"])
    assert replies == sorted(c["messages"][1]["content"] + "<|im_end|>\n" for c in CHATS)
    trainer.train()
    losses = logged_losses(trainer)
    assert len(losses) == steps
    assert losses[0] == pytest.approx(hand_cross_entropy(before, batch), rel=1e-5)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.85 * losses[0], losses
