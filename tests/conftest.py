import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import char_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="session")
def corpus():
    """Deterministic English-like text for calibration tests (about 40k characters)."""
    words = ("the model prunes heads and channels while the hidden size stays whole so every layer keeps its "
             "norm and the rest of the network sees the same width as before").split(" ")
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(300)) for i in range(24)]


@pytest.fixture(scope="session")
def smollm2_dir():
    from transact.io.models import smollm2_dir

    return smollm2_dir()
