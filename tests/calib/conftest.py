"""Fixtures of the calibration tests (models and paths live in calib_models.py)."""

import os

import pytest
from calib_models import TOKENIZER


@pytest.fixture
def tokenizer():
    if not os.path.exists(TOKENIZER):
        pytest.fail(f"missing test asset {TOKENIZER}")
    from tokenizers import Tokenizer

    return Tokenizer.from_file(TOKENIZER)
