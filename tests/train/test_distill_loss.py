"""Stage 2's loss: the KL is a mean over real tokens and the CE a mean over its own labels (not -100), each over
its own count of the whole optimiser step; tested on conversation data whose masked prompts make the two counts
differ a lot."""

import copy

import pytest
import torch
import torch.nn.functional as F

from wuneng.train.config import DataConfig, DistillConfig
from wuneng.train.data import build_dataset
from wuneng.train.loop import GlobalSampler, train
from wuneng.train.stages import DistillObjective, kl_divergence_sum

from train_helpers import quick_config, tiny_qwen2

CE_WEIGHT, KL_WEIGHT, TAU = 0.5, 0.7, 1.5
# Conversations with long prompts and responses of 1 to 9 characters: label counts differ between rows.
CHATS = [
    {
        "messages": [
            {"role": "user", "content": f"please repeat the letter {c} a few times"},
            {"role": "assistant", "content": c * (1 + i % 9)},
        ]
    }
    for i, c in enumerate("abcdefghijklmnopqrstuvwx")
]


def reference_sums(teacher, student, batch):
    """(KL sum over attention-mask tokens, CE sum over labels != -100, token count, label count), float64."""
    with torch.no_grad():
        zt = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        zs = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    kl = kl_divergence_sum(zt, zs, batch["attention_mask"], TAU).double()
    labels = batch["labels"][:, 1:]
    ce = F.cross_entropy(zs[:, :-1].reshape(-1, zs.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")
    return float(kl), float(ce), int(batch["attention_mask"].sum()), int((labels != -100).sum())


@pytest.fixture
def chat_data(tokenizer):
    return build_dataset(DataConfig(seq_len=96), tokenizer, "sft", [CHATS])  # prompts are labelled -100


def test_objective_ce_is_a_mean_over_its_own_labels(tokenizer, chat_data):
    teacher, student = tiny_qwen2(seed=0), tiny_qwen2(seed=1)
    batch = chat_data.batch([0, 1, 2])
    kl, ce, n_tok, n_lab = reference_sums(teacher, student, batch)
    assert n_lab < n_tok / 2  # the counts really differ
    obj = DistillObjective(student, teacher, TAU, KL_WEIGHT, CE_WEIGHT, tokenizer_size=len(tokenizer))
    out = {k: v.detach() for k, v in obj(batch).items()}
    n = float(obj.count_tokens(batch))
    assert n == n_tok
    # float32 logits vs the float64 reference: relative 1e-5
    assert float(out["loss_sum"]) / n == pytest.approx(KL_WEIGHT * kl / n_tok + CE_WEIGHT * ce / n_lab, rel=1e-5)
    assert float(out["ce"]) / n == pytest.approx(ce / n_lab, rel=1e-5)
    assert float(out["kl"]) / n == pytest.approx(kl / n_tok, rel=1e-5)


def test_training_step_normalises_each_term_by_its_global_count(tmp_path, tokenizer, chat_data):
    """Two micro-batches with different label counts: the CE is sum / total labels of the step, not a mean of
    per-micro-batch means and not sum / tokens."""
    teacher, student = tiny_qwen2(seed=0), tiny_qwen2(seed=1)
    cfg = quick_config(
        tmp_path / "run", stage="distill", teacher="unused", micro_batch_size=2, grad_accum_steps=2, max_steps=1,
        distill=DistillConfig(temperature=TAU, kl_weight=KL_WEIGHT, ce_weight=CE_WEIGHT),
    )  # fmt: skip
    rows = GlobalSampler(len(chat_data), cfg.seed).rows(0, 4)
    before = copy.deepcopy(student)
    sums = [reference_sums(teacher, before, chat_data.batch(rows[i : i + 2])) for i in (0, 2)]
    kl = sum(s[0] for s in sums) / sum(s[2] for s in sums)
    ce = sum(s[1] for s in sums) / sum(s[3] for s in sums)
    assert sums[0][3] != sums[1][3] and sums[0][3] / sums[0][2] != sums[1][3] / sums[1][2]
    result = train(cfg, model=student, teacher=teacher, tokenizer=tokenizer, dataset=chat_data)
    record = result.history[0]
    assert record["kl"] == pytest.approx(kl, rel=1e-5)
    assert record["ce"] == pytest.approx(ce, rel=1e-5)
    assert record["loss"] == pytest.approx(KL_WEIGHT * kl + CE_WEIGHT * ce, rel=1e-5)


@pytest.mark.slow
def test_two_processes_normalise_the_ce_by_the_global_label_count(tmp_path, tokenizer):
    """torchrun 2 x micro-batch 2 and one process x 4 give the same weights with a CE term: each term is divided
    by its count over both processes (a per-process count would weight the processes' CE differently)."""
    from safetensors.torch import load_file
    from test_distributed import ATOL, max_diff, run_both

    from train_helpers import saved_run_files

    tiny_qwen2(seed=1).save_pretrained(tmp_path / "student")
    path = saved_run_files(tmp_path, tokenizer, stage="distill", teacher=str(tmp_path / "model"), model={"path": str(tmp_path / "student")},
                           distill={"ce_weight": CE_WEIGHT, "kl_weight": KL_WEIGHT, "temperature": TAU},
                           data={"sources": [str(tmp_path / "data.txt")], "seq_len": 64, "text_unit": "line"},
                           grad_accum_steps=2, max_steps=6, save_every=6)  # fmt: skip
    one_w, two_w = run_both(tmp_path, path)
    moved, diff = max_diff(one_w, load_file(str(tmp_path / "student" / "model.safetensors"))), max_diff(one_w, two_w)
    assert moved > 1e-3
    assert diff < ATOL, f"max |w_1proc - w_2proc| = {diff:.3g}"
