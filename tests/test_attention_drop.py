"""Dropping attention sub-blocks: a layer whose attention adds nothing loses it with the logits unchanged, the
scores are the calibration loss with each attention zeroed, the model is saved in the DeciLM layout with
no-op attention (reloaded exactly, generating with the KV cache), and the prune / apply-plan jobs carry it
to disk, refusing what cannot be done before any work."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from tiny import VOCAB, same_weights, saved_model_and_text, tiny_model
from transformers import AutoModelForCausalLM

from transact.arch import get_adapter, shape_of
from transact.cli import main
from transact.core.attention_drop import (
    attention_candidates,
    attention_loss_scores,
    attention_skipped,
    attentions_to_drop,
    choose_attentions,
    lowest,
    round_sizes,
    skip_attention_layers_,
)
from transact.core.budget import Budget
from transact.core.depth import DepthOptions, drop_layers_
from transact.core.depth_calibrate import calibration_loss
from transact.core.plan import PrunePlan, whole_plan
from transact.errors import TransactError
from transact.io.checkpoint import write_verified
from transact.io.per_layer import has_per_layer_widths, load_per_layer
from transact.jobs import apply_plan
from transact.measure.costs import model_summary


def _silence_attention(model, index: int) -> None:
    """Zero layer ``index``'s attention output projection (and its bias): the attention then adds nothing."""
    o_proj = get_adapter(model).layers(model)[index].self_attn.o_proj
    with torch.no_grad():
        o_proj.weight.zero_()
        if o_proj.bias is not None:
            o_proj.bias.zero_()


def _ids(count: int = 2, length: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, VOCAB, (count, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_a_silenced_attention_is_dropped_with_logits_unchanged_and_saved_as_decilm(family, tmp_path, tokenizer):
    model = tiny_model(family, layers=4, attention_bias=True) if family == "llama" else tiny_model(family, layers=4)
    model.eval()
    _silence_attention(model, 2)
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    skip_attention_layers_(model, [2])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert shape_of(model).attention_layers == (0, 1, 3) and has_per_layer_widths(model)
    summary = model_summary(model)
    assert summary["attention_layers"] == 3 and summary["kv_cache_bytes_per_token"] == 3 * 2 * 2 * 16 * 4
    out = write_verified(model, tokenizer, tmp_path / "out", whole_plan(shape_of(model)), {},
                         save_dtype=torch.float32)  # its reload check runs inside
    config = json.loads((out / "config.json").read_text())
    assert [b["attention"]["no_op"] for b in config["block_configs"]] == [False, False, True, False]
    assert config["block_configs"][2]["attention"]["n_heads_in_group"] is None
    state = load_file(out / "model.safetensors")
    assert not [k for k in state if k.startswith("model.layers.2.") and ("self_attn" in k or "input_layernorm" in k)]
    assert "model.layers.1.self_attn.o_proj.weight" in state
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, before)
        cached = reloaded.generate(ids[:1], max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=1)
        uncached = reloaded.generate(ids[:1], max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=1)
    assert torch.equal(cached, uncached)
    assert shape_of(load_per_layer(out)).attention_layers == (0, 1, 3)


def test_the_scores_are_the_loss_with_each_attention_zeroed_and_the_lowest_go():
    model = tiny_model("llama", layers=4).eval()
    windows = _ids(6, 16, seed=1)
    candidates = attention_candidates(model)
    assert candidates == [1, 2, 3]
    scores = attention_loss_scores(model, windows, candidates, progress=False)
    dense = calibration_loss(model, windows)
    for j, layer in enumerate(candidates):
        with attention_skipped(model, [layer]):
            assert float(scores[j]) == pytest.approx(calibration_loss(model, windows), rel=1e-6)
        assert float(scores[j]) != pytest.approx(dense, rel=1e-4)  # the premise: each attention matters
    _silence_attention(model, 3)
    silenced = calibration_loss(model, windows)
    with attention_skipped(model, [3]):  # a silenced attention: zeroing it changes nothing
        assert calibration_loss(model, windows) == silenced
    assert lowest([1, 2, 3], torch.tensor([0.5, 0.2, 0.2]), 2) == [2, 3]
    assert lowest([1, 2, 3], torch.tensor([0.1, 0.3, 0.2]), 1) == [1]


def test_the_drop_records_its_scores_and_removes_the_lowest(tmp_path):
    model = tiny_model("llama", layers=5).eval()
    windows = _ids(8, 16, seed=2)
    scores = attention_loss_scores(model, windows, [1, 2, 3, 4], progress=False)
    plan = drop_layers_(model, windows, DepthOptions(2, part="attention", loss_samples=8), progress=False)
    assert plan.part == "attention" and plan.dropped == lowest([1, 2, 3, 4], scores, 2)
    assert plan.scores == [round(float(v), 6) for v in scores]
    assert plan.compensation["applied"] is False and plan.source.attention_layers is None
    again = PrunePlan.from_json(whole_plan(shape_of(model), depth=plan).to_json()).depth
    assert again == plan


def test_rounds_score_the_layers_left_with_the_earlier_choices_dropped():
    model = tiny_model("llama", layers=5).eval()
    windows = _ids(6, 16, seed=3)
    assert round_sizes(10, 3) == [4, 3, 3] and round_sizes(2, 5) == [1, 1] and round_sizes(3, 1) == [3]
    once, record = choose_attentions(model, windows, [1, 2, 3, 4], 2, 1, progress=False)
    assert once == lowest([1, 2, 3, 4], attention_loss_scores(model, windows, [1, 2, 3, 4], progress=False), 2)
    assert len(record) == 1 and record[0]["dropped"] == once
    greedy, record = choose_attentions(model, windows, [1, 2, 3, 4], 2, 2, progress=False)
    first = record[0]["dropped"]
    assert len(record) == 2 and len(first) == 1 and sorted(first + record[1]["dropped"]) == greedy
    assert list(record[1]["scores"]) == [str(i) for i in (1, 2, 3, 4) if i not in first]
    for layer, score in record[1]["scores"].items():  # the second round saw the first round's drop
        with attention_skipped(model, [*first, int(layer)]):
            assert score == pytest.approx(calibration_loss(model, windows), rel=1e-5)
    plan = drop_layers_(model, windows, DepthOptions(2, part="attention", rounds=2, loss_samples=6), progress=False)
    assert plan.dropped == greedy and plan.rounds == record
    assert PrunePlan.from_json(whole_plan(shape_of(model), depth=plan).to_json()).depth == plan


def test_counts_and_options_are_checked():
    assert attentions_to_drop(0.5, 5) == 2 and attentions_to_drop(3, 5) == 3 and attentions_to_drop(0.01, 5) == 1
    with pytest.raises(TransactError, match="every layer's but the first"):
        attentions_to_drop(6, 5)
    with pytest.raises(TransactError, match="calibration loss only"):
        DepthOptions(1, score="angular", part="attention")
    with pytest.raises(TransactError, match="not one of layers, attention"):
        DepthOptions(1, part="mlp")
    with pytest.raises(TransactError, match="a block of layers is chosen at once"):
        DepthOptions(1, rounds=2)
    with pytest.raises(TransactError, match="rounds must be a positive count"):
        DepthOptions(1, part="attention", rounds=0)
    with pytest.raises(TransactError, match=r"budget\.depth\.part"):
        Budget(params=0.8, depth={"part": "attention"})
    model = tiny_model("llama", layers=3)
    skip_attention_layers_(model, [1])
    with pytest.raises(TransactError, match="layer 1 has no attention to drop"):
        skip_attention_layers_(model, [1])


@pytest.fixture(scope="module")
def saved(tmp_path_factory, corpus):
    """A 4-layer tiny Llama and a 4-layer tiny Gemma 3, each saved with its tokenizer and the calibration text."""
    return {family: saved_model_and_text(tmp_path_factory.mktemp(family), family, corpus, layers=4)
            for family in ("llama", "gemma3_text")}


def test_cli_drop_attention_with_widths_and_apply_plan_recreate_it(saved, tmp_path, capsys):
    base, calib = saved["llama"]
    args = ["prune", str(base), "--calib", str(calib), "--samples", "8", "--seq-len", "32", "--quiet"]
    for extra, message in ((["--drop-attention", "4"], "3 layers have attention that can go"),
                           (["--drop-attention", "1", "--block-score", "angular"], "--block-score belongs to"),
                           (["--drop-attention", "1", "--no-depth-map"], "--no-depth-map belongs to"),
                           (["--drop-attention", "1", "--drop-layers", "1"], "its own depth step"),
                           (["--drop-attention", "1", "--budget", "params=0.8"], "its own depth step"),
                           (["--drop-attention", "1", "--layerwise"], "not available with --layerwise"),
                           (["--attention-rounds", "2"], "--attention-rounds belongs to --drop-attention")):
        assert main([*args, "--out", str(tmp_path / "x"), *extra]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x").exists()
    gemma = ["prune", str(saved["gemma3_text"][0]), "--calib", str(calib), "--quiet", "--drop-attention", "1"]
    assert main([*gemma, "--out", str(tmp_path / "x")]) == 2
    assert "has no checkpoint with widths that differ per layer" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "a"), "--drop-attention", "2", "--attention-rounds", "2",
                 "--heads", "2", "--mlp", "48"]) == 0
    plan = PrunePlan.load(tmp_path / "a" / "plan.json")
    assert plan.depth.part == "attention" and len(plan.depth.dropped) == 2 and 0 not in plan.depth.dropped
    assert len(plan.depth.rounds) == 2 and plan.recipe["depth"]["rounds"] == 2
    assert plan.source.attention_layers == tuple(i for i in range(4) if i not in plan.depth.dropped)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert [b["attention"]["no_op"] for b in config["block_configs"]] == [i in plan.depth.dropped for i in range(4)]
    assert {b["ffn"]["intermediate_size"] for b in config["block_configs"]} == {48}
    assert config["num_attention_heads"] == 2
    capsys.readouterr()
    assert main(["info", str(tmp_path / "a")]) == 0  # read with the project's own classes
    assert "2 heads / 1 KV heads x head_dim 16 in 2 of 4 layers" in capsys.readouterr().out
    result = apply_plan.run(apply_plan.ApplyPlanJob(str(base), str(tmp_path / "a" / "plan.json"),
                                                    str(tmp_path / "b"), progress=False))
    assert same_weights(tmp_path / "a", tmp_path / "b")
    assert f"dropped attention in layers {', '.join(map(str, plan.depth.dropped))} (2 of 3" in result.summary()
    assert re.search(r"layers with attention +4 +2 +0.50x", result.summary())
