"""Calibration: text reading, window sampling, and the streamed statistics the hooks collect."""

import gzip
import json

import pytest
import torch
from tiny import VOCAB, tiny_model

from transact.arch import get_adapter
from transact.core.calibrate import calibrate, record_transitional_stats, sample_windows, windows_hash
from transact.errors import TransactError
from transact.io.text import read_texts


def _captured_inputs(model):
    """The o_proj / down_proj inputs of every layer, captured the slow way for comparison."""
    adapter = get_adapter(model)
    seen = {}
    handles = []
    for i, layer in enumerate(adapter.layers(model)):
        o, down = adapter.attention(layer, model.config).o, adapter.mlp(layer, model.config).down
        for kind, mod in (("attn", o), ("mlp", down)):
            handles.append(mod.register_forward_pre_hook(
                lambda m, args, key=(kind, i): seen.setdefault(key, []).append(args[0].detach().clone())))
    return seen, handles


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_stats_equal_sum_of_squares_of_transitional_activations(family):
    model = tiny_model(family)
    windows = torch.randint(0, VOCAB, (6, 10), generator=torch.Generator().manual_seed(1))
    seen, handles = _captured_inputs(model)
    stats = calibrate(model, windows, batch_size=4, progress=False)
    for h in handles:
        h.remove()
    assert stats.tokens == 60
    for i in range(model.config.num_hidden_layers):
        attn = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen[("attn", i)]])
        mlp = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen[("mlp", i)]])
        assert attn.shape == (60, 64) and mlp.shape == (60, 96)
        torch.testing.assert_close(stats.attn["sum_sq"][i], attn.square().sum(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(stats.mlp["sum_sq"][i], mlp.square().sum(0), rtol=1e-6, atol=1e-6)
        assert stats.attn["sum_sq"][i].dtype == torch.float32


def test_stats_are_fp32_for_bf16_models():
    model = tiny_model("llama").to(torch.bfloat16)
    stats = calibrate(model, torch.randint(0, VOCAB, (2, 8)), progress=False)
    assert all(s.dtype == torch.float32 and torch.isfinite(s).all() for s in stats.attn["sum_sq"] + stats.mlp["sum_sq"])


def _hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("family, statistics", [("mistral", ("sum_sq",)), ("gemma3_text", ("sum_sq", "gram"))])
def test_hooks_are_removed_even_on_error(family, statistics):
    model = tiny_model(family)
    assert _hook_count(model) == 0
    with pytest.raises(RuntimeError, match="boom"), record_transitional_stats(model, statistics):
        assert _hook_count(model) == 2 * model.config.num_hidden_layers
        raise RuntimeError("boom")
    assert _hook_count(model) == 0


@pytest.mark.parametrize("family, normed", [("llama", False), ("gemma3_text", True)])
def test_gram_is_weighted_by_the_output_norm_where_the_family_normalizes_it(family, normed):
    """Gemma normalizes o_proj's and down_proj's outputs per token before the residual stream, so the Gram
    matrices (the refit's objective) are sums of (x / rms(y)) (x / rms(y))ᵀ with y the consumer's output;
    Llama adds them as they are: plain sums of x xᵀ. Eq. 5's sums of squares stay unweighted in both."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    seen, handles = {}, []
    for i, layer in enumerate(adapter.layers(model)):
        consumers = (("attn", adapter.attention(layer, model.config).o), ("mlp", adapter.mlp(layer, model.config).down))
        for kind, mod in consumers:
            handles.append(mod.register_forward_hook(
                lambda m, args, out, key=(kind, i): seen.setdefault(key, []).append((args[0].detach(), out.detach()))))
    windows = torch.randint(0, VOCAB, (6, 10), generator=torch.Generator().manual_seed(1))
    stats = calibrate(model, windows, batch_size=4, progress=False, statistics=("sum_sq", "gram"))
    for h in handles:
        h.remove()
    for (kind, i), calls in seen.items():
        x = torch.cat([a.reshape(-1, a.shape[-1]) for a, _ in calls]).double()  # (60, C)
        y = torch.cat([b.reshape(-1, b.shape[-1]) for _, b in calls]).double()  # (60, hidden)
        weights = y.square().mean(dim=1, keepdim=True).rsqrt() if normed else torch.ones(60, 1, dtype=torch.float64)
        group = stats.attn if kind == "attn" else stats.mlp
        torch.testing.assert_close(group["gram"][i].double(), (x * weights).T @ (x * weights), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(group["sum_sq"][i].double(), x.square().sum(0), rtol=1e-5, atol=1e-6)
        assert normed == (weights.std() > 0.01)  # the weights do differ between tokens


def test_read_texts_formats(tmp_path):
    (tmp_path / "a.txt").write_text("plain text file")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "three"}) + "\n")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    assert read_texts(tmp_path / "b.jsonl") == ["one", "two"]
    assert read_texts(tmp_path) == ["plain text file", "one", "two", "three"]


@pytest.mark.parametrize(("content", "name", "message"), [
    ("", "empty.txt", "contains no text"),
    ("   \n", "blank.txt", "contains no text"),
    ('{"txt": "x"}\n', "bad.jsonl", "needs a string field 'text'"),
    ("not json\n", "broken.jsonl", "not valid JSON"),
    ('{"text": "x"}', "data.json", "use .jsonl"),
])
def test_read_texts_errors(tmp_path, content, name, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(TransactError, match=message):
        read_texts(tmp_path / name)


def test_read_texts_missing_and_empty_dir(tmp_path):
    with pytest.raises(TransactError, match="does not exist"):
        read_texts(tmp_path / "nope.txt")
    with pytest.raises(TransactError, match="holds no"):
        read_texts(tmp_path)


def test_windows_are_reproducible_and_nested(tokenizer, corpus):
    a = sample_windows(tokenizer, corpus, samples=4, seq_len=32, seed=3)
    b = sample_windows(tokenizer, corpus, samples=4, seq_len=32, seed=3)
    more = sample_windows(tokenizer, corpus, samples=8, seq_len=32, seed=3)
    other = sample_windows(tokenizer, corpus, samples=4, seq_len=32, seed=4)
    assert a.shape == (4, 32) and torch.equal(a, b) and torch.equal(more[:4], a)
    assert windows_hash(a) == windows_hash(b) != windows_hash(other)


def test_windows_too_little_text(tokenizer):
    with pytest.raises(TransactError, match="fewer than samples x seq_len"):
        sample_windows(tokenizer, ["short"], samples=4, seq_len=32, seed=0)
