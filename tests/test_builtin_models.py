"""The real models the PyPI data packages ship, behind builtin: names (installed and converted by
scripts/install.sh): their shapes as transact reads them, and the refusal of an unknown name."""

import pytest

from transact.api import model_info
from transact.errors import TransactError
from transact.io import assets
from transact.io.models import resolve_source


def test_an_unknown_builtin_name_lists_the_known_ones():
    with pytest.raises(TransactError, match=r"builtin:smollm2, builtin:qwen2\.5-coder-0\.5b, builtin:gemma3-270m"):
        resolve_source("builtin:llama-3")


@pytest.mark.parametrize("spec, family, layers, heads, kv_heads, head_dim, mlp", [
    ("builtin:smollm2", "llama", 30, 9, 3, 64, 1536),
    ("builtin:qwen2.5-coder-0.5b", "qwen2", 24, 14, 2, 64, 4864),
    ("builtin:gemma3-270m", "gemma3_text", 18, 4, 1, 256, 2048),
])
def test_builtin_models_have_their_real_shapes(spec, family, layers, heads, kv_heads, head_dim, mlp):
    info = model_info(spec)
    assert (info["model_type"], info["layers"], info["heads"], info["kv_heads"], info["head_dim"], info["mlp"]) == \
        (family, layers, heads, kv_heads, head_dim, mlp)
    assert info["source"].startswith(str(assets.cache_dir()))
