"""Perplexity, FLOPs, KV cache and parameter counts against hand computation and measured counts."""

import math

import pytest
import torch
import torch.nn.functional as F
from tiny import FAMILIES, VOCAB, random_plan, tiny_config, tiny_model
from torch.utils.flop_counter import FlopCounterMode

from transact.arch import shape_of
from transact.core.surgery import prune_
from transact.errors import TransactError
from transact.measure import costs, perplexity


def _nll_by_hand(model, ids, scored_positions_per_window):
    """Sum of -log p(token) for the given (begin, end, positions) windows, one position at a time."""
    total = 0.0
    with torch.no_grad():
        for begin, end, positions in scored_positions_per_window:
            logp = F.log_softmax(model(ids[begin:end].unsqueeze(0)).logits[0].float(), dim=-1)
            for pos in positions:
                total -= logp[pos - begin - 1, ids[pos]].item()
    return total


def test_perplexity_disjoint_windows_by_hand():
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (25,), generator=torch.Generator().manual_seed(0))
    result = perplexity.perplexity(model, ids, window=10, progress=False)
    # windows [0,10), [10,20), [20,25); each window's first token has no context and is not scored
    windows = [(0, 10, range(1, 10)), (10, 20, range(11, 20)), (20, 25, range(21, 25))]
    nll = _nll_by_hand(model, ids, windows)
    assert result.tokens == 9 + 9 + 4
    assert result.nll_sum == pytest.approx(nll, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll / 22), rel=1e-5)


def test_perplexity_strided_windows_score_every_token_once():
    model = tiny_model("qwen2")
    ids = torch.randint(0, VOCAB, (25,), generator=torch.Generator().manual_seed(1))
    result = perplexity.perplexity(model, ids, window=10, stride=5, progress=False)
    # [0,10) scores 1..9; [5,15) scores 10..14; [10,20) 15..19; [15,25) 20..24
    windows = [(0, 10, range(1, 10)), (5, 15, range(10, 15)), (10, 20, range(15, 20)), (15, 25, range(20, 25))]
    assert result.tokens == 24
    assert result.nll_sum == pytest.approx(_nll_by_hand(model, ids, windows), rel=1e-5)


def test_perplexity_bad_arguments():
    model = tiny_model("llama")
    with pytest.raises(TransactError, match="at least 2 tokens"):
        perplexity.perplexity(model, torch.tensor([3]), window=8)
    with pytest.raises(TransactError, match="stride"):
        perplexity.perplexity(model, torch.arange(20), window=8, stride=9)


def _pruned(family, keep_heads, keep_kv, mlp, **kw):
    model = tiny_model(family, **kw)
    prune_(model, random_plan(model, keep_heads, keep_kv, mlp))
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pruned", [False, True])
def test_flops_formula_matches_measured_count(family, pruned):
    model = _pruned(family, 2, 1, 40) if pruned else tiny_model(family)
    shape = shape_of(model)
    # A hybrid model's linear-attention layers run the delta rule in chunks of 64 tokens (a shorter sequence
    # is padded to a whole chunk), and their convolution computes kernel - 1 padded output positions more
    # (each of kernel taps per channel), which the formula (per token of a long prefill) leaves out.
    seq, padding = 32, 0
    if shape.linear_attention is not None:
        lin = shape.linear_attention
        seq = 64
        conv_channels = 2 * lin.key_heads * lin.key_dim + lin.value_heads * lin.value_dim
        linear_layers = shape.num_layers - shape.num_attention_layers
        padding = linear_layers * 2 * conv_channels * lin.conv_kernel * (lin.conv_kernel - 1)
    if shape.is_moe:  # torch's grouped matmul is not counted by FlopCounterMode; the experts' loop is
        model.config._experts_implementation = "eager"
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, VOCAB, (1, seq)))
    # One forward over `seq` tokens computes full seq x seq attention scores (masked, not skipped, in the
    # sliding-window layers too), so it costs exactly seq x (flops of one token attending to `seq` tokens).
    assert counter.get_total_flops() == seq * costs.flops_per_token(shape, seq, windows=False) + padding
    assert costs.forward_flops(shape, seq) + padding == counter.get_total_flops()


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_prefill_flops_match_a_forward_that_keeps_the_last_logits(family):
    """What bench's prefill computes (logits of the last token only, as generation does) against the
    formula, exactly."""
    model = _pruned(family, 2, 1, 40)
    seq = 24
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, VOCAB, (1, seq)), logits_to_keep=1)
    assert counter.get_total_flops() == costs.prefill_flops(shape_of(model), seq)
    assert costs.forward_flops(shape_of(model), seq) - costs.prefill_flops(shape_of(model), seq) == \
        (seq - 1) * 2 * 64 * VOCAB


@pytest.mark.parametrize("family", ["gemma3_text", "gemma2", "llama"])
def test_a_decode_step_costs_flops_per_token_with_sliding_windows(family):
    """A decode step's count, measured: the cache of a sliding-window layer holds its window (8 tokens in the
    tiny Gemmas, every second layer), so its attention costs 8 tokens' scores, not the context's 32."""
    model = _pruned(family, 2, 1, 40)
    shape = shape_of(model)
    with torch.no_grad():
        cache = model(torch.randint(0, VOCAB, (1, 31)), use_cache=True).past_key_values
        with FlopCounterMode(display=False) as counter:
            model(torch.randint(0, VOCAB, (1, 1)), past_key_values=cache, use_cache=True)
    assert counter.get_total_flops() == costs.flops_per_token(shape, 32)
    windowed = [layer for layer in range(shape.num_layers) if shape.attended(layer, 32) < 32]
    assert windowed == ([0] if family != "llama" else [])  # the tiny models have 2 layers, the first windowed
    saved = 2 * 2 * 2 * 16 * (32 - 8) * len(windowed)  # scores and sums of 2 heads of 16 over 24 fewer tokens
    assert costs.flops_per_token(shape, 32, windows=False) - costs.flops_per_token(shape, 32) == saved


@pytest.mark.parametrize(("family", "settings", "windows"), [
    ("mistral", {"sliding_window": 16, "num_hidden_layers": 3}, (16, 16, 16)),  # no layer_types: every layer
    ("mistral", {"sliding_window": None}, None),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1, "num_hidden_layers": 3},
     (None, 16, 16)),
    ("qwen2", {"use_sliding_window": False, "sliding_window": 16}, None),
    ("qwen2_moe", {"sliding_window": 0}, None),  # its config's default: no window
    ("gemma3_text", {"sliding_window": 16, "num_hidden_layers": 4}, (16, None, 16, None)),
])
def test_sliding_windows_as_each_config_states_them(family, settings, windows):
    config = tiny_config(family, **settings)
    assert shape_of(config).attention_windows == windows


def test_kv_cache_bytes_match_the_cache_tensors():
    model = _pruned("llama", 2, 1, 40, heads=4, kv_heads=2)
    with torch.no_grad():
        out = model(torch.randint(0, VOCAB, (1, 7)), use_cache=True)
    cache = out.past_key_values
    cached = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                 for layer in cache.layers)
    assert cached == 7 * costs.kv_cache_bytes_per_token(shape_of(model), torch.float32) == 7 * 2 * 2 * 1 * 16 * 4


def test_parameter_count_counts_tied_embeddings_once():
    tied, untied = tiny_model("qwen3", tie=True), tiny_model("qwen3", tie=False)
    assert costs.count_parameters(untied) - costs.count_parameters(tied) == VOCAB * 64
    summary = costs.model_summary(_pruned("mistral", 2, 1, 40))
    assert (summary["heads"], summary["kv_heads"], summary["mlp"], summary["head_dim"]) == (2, 1, 40, 16)
