import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import WORDS, char_tokenizer, tiny_model


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


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny Llama (4 heads in 2 KV groups, MLP 96) with a character tokenizer, and a training text
    (``transact run`` and ``transact teach`` tests; one per module)."""
    import random

    root = tmp_path_factory.mktemp("training")
    model = tiny_model("llama", heads=4, kv_heads=2, mlp=96)
    model.save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(30)) + "." for _ in range(400)]
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return root
