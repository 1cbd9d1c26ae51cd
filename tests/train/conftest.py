"""Fixtures of the training tests (helpers live in train_helpers.py)."""

import pytest
import torch

from wuneng.tokenization import ByteLevelTokenizer


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core machine run ~10x faster on one thread (no OpenMP spinning)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tokenizer():
    return ByteLevelTokenizer()
