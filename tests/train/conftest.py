"""Fixtures of the training tests (helpers live in train_helpers.py)."""

import pytest

from wuneng.tokenization import ByteLevelTokenizer


@pytest.fixture
def tokenizer():
    return ByteLevelTokenizer()
