"""Tiny checkpoints shared by the lm-eval and ``wuneng eval`` tests."""

from pathlib import Path

import torch

from wuneng.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM
from wuneng.tokenization import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, PAD_ID, ByteLevelTokenizer

ANSWER = "8"


def tiny_config(vocab_size: int = BYTE_VOCAB_SIZE) -> RWKV7Config:
    """A 2-layer, width-32 RWKV-7 config (byte-level vocabulary by default)."""
    return RWKV7Config(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        head_size=16,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def random_model(seed: int = 0) -> RWKV7ForCausalLM:
    torch.manual_seed(seed)
    return RWKV7ForCausalLM(tiny_config()).eval()


def constant_answer_model(token_id: int = ord(ANSWER), margin: float = 8.0) -> RWKV7ForCausalLM:
    """A tiny RWKV-7 whose logits are ``margin`` at ``token_id`` and 0 elsewhere, at every position
    (``ln_out`` scale 0 and bias 1, one non-zero head row): its scores are known in advance."""
    model = random_model()
    with torch.no_grad():
        model.model.ln_out.weight.zero_()
        model.model.ln_out.bias.fill_(1.0)
        model.head.weight.zero_()
        model.head.weight[token_id].fill_(margin / model.config.hidden_size)
    return model


def save_checkpoint(model, folder: Path, tokenizer: bool = True) -> Path:
    """``save_pretrained`` the model (and a :class:`ByteLevelTokenizer`) into ``folder``."""
    model.save_pretrained(folder)
    if tokenizer:
        ByteLevelTokenizer().save_pretrained(folder)
    return folder
