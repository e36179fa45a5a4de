"""Dropping attention and MLP sub-blocks: a layer whose attention (MLP) adds nothing loses it with the logits
unchanged, the scores are the calibration loss with each sub-block zeroed, the model is saved in the DeciLM
layout with no-op attention or MLP (reloaded exactly, generating with the KV cache), and the prune /
apply-plan jobs carry it to disk, refusing what cannot be done before any work."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from tiny import VOCAB, same_weights, saved_model_and_text, tiny_model
from transformers import AutoModelForCausalLM

from transact.arch import get_adapter, shape_of
from transact.cli import main
from transact.core.budget import Budget
from transact.core.depth import DepthOptions, drop_layers_
from transact.core.depth_calibrate import calibration_loss
from transact.core.plan import PrunePlan, whole_plan
from transact.core.sub_block_drop import (
    candidates,
    choose_sub_blocks,
    count_to_drop,
    loss_scores,
    lowest,
    round_sizes,
    skip_sub_blocks_,
    sub_blocks_skipped,
)
from transact.decilm.configuration_decilm import DeciLMConfig
from transact.errors import TransactError
from transact.io.checkpoint import write_verified
from transact.io.per_layer import has_per_layer_widths, load_per_layer
from transact.jobs import apply_plan
from transact.measure.costs import model_summary


def _silence(model, index: int, part: str) -> None:
    """Zero layer ``index``'s attention output projection or MLP down projection (and its bias): that sub-block
    then adds nothing."""
    layer = get_adapter(model).layers(model)[index]
    out = layer.self_attn.o_proj if part == "attention" else layer.mlp.down_proj
    with torch.no_grad():
        out.weight.zero_()
        if out.bias is not None:
            out.bias.zero_()


def _ids(count: int = 2, length: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, VOCAB, (count, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_a_silenced_attention_is_dropped_with_logits_unchanged_and_saved_as_decilm(family, tmp_path, tokenizer):
    model = tiny_model(family, layers=4, attention_bias=True) if family == "llama" else tiny_model(family, layers=4)
    model.eval()
    _silence(model, 2, "attention")
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    skip_sub_blocks_(model, [2], "attention")
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
    layers = candidates(model, "attention")
    assert layers == [1, 2, 3]
    scores = loss_scores(model, windows, layers, "attention", progress=False)
    dense = calibration_loss(model, windows)
    for j, layer in enumerate(layers):
        with sub_blocks_skipped(model, [layer], "attention"):
            assert float(scores[j]) == pytest.approx(calibration_loss(model, windows), rel=1e-6)
        assert float(scores[j]) != pytest.approx(dense, rel=1e-4)  # the premise: each attention matters
    _silence(model, 3, "attention")
    silenced = calibration_loss(model, windows)
    with sub_blocks_skipped(model, [3], "attention"):  # a silenced attention: zeroing it changes nothing
        assert calibration_loss(model, windows) == silenced
    assert lowest([1, 2, 3], torch.tensor([0.5, 0.2, 0.2]), 2) == [2, 3]
    assert lowest([1, 2, 3], torch.tensor([0.1, 0.3, 0.2]), 1) == [1]


def test_the_drop_records_its_scores_and_removes_the_lowest(tmp_path):
    model = tiny_model("llama", layers=5).eval()
    windows = _ids(8, 16, seed=2)
    scores = loss_scores(model, windows, [1, 2, 3, 4], "attention", progress=False)
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
    once, record = choose_sub_blocks(model, windows, [1, 2, 3, 4], 2, 1, "attention", progress=False)
    assert once == lowest([1, 2, 3, 4], loss_scores(model, windows, [1, 2, 3, 4], "attention", progress=False), 2)
    assert len(record) == 1 and record[0]["dropped"] == once
    greedy, record = choose_sub_blocks(model, windows, [1, 2, 3, 4], 2, 2, "attention", progress=False)
    first = record[0]["dropped"]
    assert len(record) == 2 and len(first) == 1 and sorted(first + record[1]["dropped"]) == greedy
    assert list(record[1]["scores"]) == [str(i) for i in (1, 2, 3, 4) if i not in first]
    for layer, score in record[1]["scores"].items():  # the second round saw the first round's drop
        with sub_blocks_skipped(model, [*first, int(layer)], "attention"):
            assert score == pytest.approx(calibration_loss(model, windows), rel=1e-5)
    plan = drop_layers_(model, windows, DepthOptions(2, part="attention", rounds=2, loss_samples=6), progress=False)
    assert plan.dropped == greedy and plan.rounds == record
    assert PrunePlan.from_json(whole_plan(shape_of(model), depth=plan).to_json()).depth == plan


def test_counts_and_options_are_checked():
    assert [count_to_drop(value, 5, "attention") for value in (0.5, 3, 0.01)] == [2, 3, 1]
    with pytest.raises(TransactError, match="every layer's but the first"):
        count_to_drop(6, 5, "attention")
    with pytest.raises(TransactError, match="calibration loss only"):
        DepthOptions(1, score="angular", part="attention")
    with pytest.raises(TransactError, match="not one of layers, attention, mlp"):
        DepthOptions(1, part="ffn")
    with pytest.raises(TransactError, match="a block of layers is chosen at once"):
        DepthOptions(1, rounds=2)
    with pytest.raises(TransactError, match="rounds must be a positive count"):
        DepthOptions(1, part="attention", rounds=0)
    with pytest.raises(TransactError, match=r"budget\.depth\.part"):
        Budget(params=0.8, depth={"part": "attention"})
    model = tiny_model("llama", layers=3)
    skip_sub_blocks_(model, [1], "attention")
    with pytest.raises(TransactError, match="layer 1 has no attention to drop"):
        skip_sub_blocks_(model, [1], "attention")


def _replayed(base, tmp_path) -> str:
    """``apply-plan`` of the plan in ``tmp_path/a`` on ``base``, into ``tmp_path/b``: the same weights as the
    prune wrote; -> its summary."""
    result = apply_plan.run(apply_plan.ApplyPlanJob(str(base), str(tmp_path / "a" / "plan.json"),
                                                    str(tmp_path / "b"), progress=False))
    assert same_weights(tmp_path / "a", tmp_path / "b")
    return result.summary()


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
                           (["--attention-rounds", "2"], "--drop-rounds belongs to --drop-attention or --drop-mlp"),
                           (["--drop-attention", "1", "--drop-mlp", "1"], "give it without --drop-layers, --drop-mlp")):
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
    summary = _replayed(base, tmp_path)
    assert f"dropped attention in layers {', '.join(map(str, plan.depth.dropped))} (2 of 3" in summary
    assert re.search(r"layers with attention +4 +2 +0.50x", summary)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_a_silenced_mlp_is_dropped_with_logits_unchanged_and_saved_as_decilm(family, tmp_path, tokenizer):
    model = tiny_model(family, layers=4, mlp_bias=True) if family == "llama" else tiny_model(family, layers=4)
    for layer in (0, 3):  # the first and the last layer: where vLLM's fused residual starts and ends
        _silence(model, layer, "mlp")
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    params = model_summary(model)["params"]
    skip_sub_blocks_(model, [0, 3], "mlp")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    shape = shape_of(model)
    assert shape.mlp_layers == (1, 2) and shape.attention_layers is None and has_per_layer_widths(model)
    summary = model_summary(model)
    mlp_params = 3 * 64 * 96 + (2 * 96 + 64 if family == "llama" else 0)  # gate, up, down (and their biases)
    assert summary["mlp_layers"] == 2 and summary["params"] == params - 2 * (mlp_params + 64)  # and the norm
    assert summary["mlp_per_layer"] == [0, 96, 96, 0] and summary["mlp"] == 96
    dense_flops = model_summary(tiny_model(family, layers=4))["flops_per_token"]["256"]
    assert summary["flops_per_token"]["256"] == dense_flops - 2 * 2 * 3 * 64 * 96
    out = write_verified(model, tokenizer, tmp_path / "out", whole_plan(shape), {}, save_dtype=torch.float32)
    config = json.loads((out / "config.json").read_text())
    assert [b["ffn"]["no_op"] for b in config["block_configs"]] == [True, False, False, True]
    assert config["block_configs"][0]["ffn"]["intermediate_size"] is None
    assert not any(b["attention"]["no_op"] for b in config["block_configs"])
    state = load_file(out / "model.safetensors")
    assert not [k for k in state if k.startswith(("model.layers.0.", "model.layers.3."))
                and ("mlp." in k or "post_attention_layernorm" in k)]
    assert "model.layers.1.mlp.down_proj.weight" in state
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, before)
    assert shape_of(load_per_layer(out)).mlp_layers == (1, 2)


def test_mlp_scores_and_a_layer_keeps_one_sub_block():
    model = tiny_model("llama", layers=4).eval()
    windows = _ids(6, 16, seed=4)
    assert candidates(model, "mlp") == [0, 1, 2, 3]  # layer 0's MLP may go
    scores = loss_scores(model, windows, [0, 2], "mlp", progress=False)
    for j, layer in enumerate((0, 2)):
        with sub_blocks_skipped(model, [layer], "mlp"):
            assert float(scores[j]) == pytest.approx(calibration_loss(model, windows), rel=1e-6)
    plan = drop_layers_(model, windows, DepthOptions(2, part="mlp", loss_samples=6), progress=False)
    full = loss_scores(tiny_model("llama", layers=4).eval(), windows, [0, 1, 2, 3], "mlp", progress=False)
    assert plan.part == "mlp" and plan.dropped == lowest([0, 1, 2, 3], full, 2)
    assert PrunePlan.from_json(whole_plan(shape_of(model), depth=plan).to_json()).depth == plan
    assert candidates(model, "attention") == [i for i in (1, 2, 3) if i not in plan.dropped]
    with pytest.raises(TransactError, match="a layer keeps its attention or its MLP"):
        skip_sub_blocks_(model, [max(plan.dropped)], "attention")
    with pytest.raises(TransactError, match="2 layers have an MLP that can go"):
        count_to_drop(3, 2, "mlp")
    with pytest.raises(TransactError, match="every one of the 2 layers that have one: at least one layer keeps it"):
        count_to_drop(2, 2, "mlp")
    assert count_to_drop(3, 3, "attention") == 3  # layer 0, not a candidate, keeps its attention
    with pytest.raises(ValueError, match="neither attention nor MLP"):
        DeciLMConfig(num_hidden_layers=1, block_configs=[{"attention": {"no_op": True}, "ffn": {"no_op": True}}])


def test_cli_drop_mlp_and_apply_plan_recreate_it(saved, tmp_path, capsys):
    base, calib = saved["llama"]
    args = ["prune", str(base), "--calib", str(calib), "--samples", "8", "--seq-len", "32", "--quiet"]
    for extra, message in ((["--drop-mlp", "5"], "4 layers have an MLP that can go"),
                           (["--drop-mlp", "4"], "at least one layer keeps it"),
                           (["--drop-mlp", "1", "--heads", "2"], "prunes no widths in the same run"),
                           (["--drop-mlp", "1", "--block-score", "angular"], "--block-score belongs to"),
                           (["--drop-mlp", "1", "--drop-layers", "1"], "its own depth step")):
        assert main([*args, "--out", str(tmp_path / "x"), *extra]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x").exists()
    assert main([*args, "--out", str(tmp_path / "a"), "--drop-mlp", "0.5", "--drop-rounds", "2"]) == 0
    plan = PrunePlan.load(tmp_path / "a" / "plan.json")
    assert plan.depth.part == "mlp" and len(plan.depth.dropped) == 2 and len(plan.depth.rounds) == 2
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert [b["ffn"]["no_op"] for b in config["block_configs"]] == [i in plan.depth.dropped for i in range(4)]
    capsys.readouterr()
    assert main(["info", str(tmp_path / "a")]) == 0
    assert "96 channels on average of the 2 layers with one" in capsys.readouterr().out
    summary = _replayed(base, tmp_path)
    assert f"dropped MLP in layers {', '.join(map(str, plan.depth.dropped))} (2 of 4" in summary
    assert re.search(r"layers with an MLP +4 +2 +0.50x", summary)


@pytest.mark.parametrize("part", ["attention", "mlp"])
def test_a_run_without_shots_trains_a_checkpoint_with_dropped_sub_blocks_and_keeps_them(part, saved, tmp_path, caplog):
    """``transact run`` with shots: 0 trains a checkpoint whose layers lost a sub-block: the same layers stay
    without it (no tensors for it appear), the others learn, and its config is read with the project's own
    class, so transformers does not warn that reading it "can yield errors"."""
    base, calib = saved["llama"]
    assert main(["prune", str(base), "--calib", str(calib), "--samples", "8", "--seq-len", "32", "--quiet",
                 f"--drop-{part}", "1", "--out", str(tmp_path / "p")]) == 0
    recipe = tmp_path / "run.yaml"
    recipe.write_text(json.dumps({"model": str(tmp_path / "p"), "out": str(tmp_path / "r"), "shots": 0,
                                  "device": "cpu", "heldout": {"text": str(calib), "tokens": 512, "window": 128},
                                  "training": {"data": str(calib), "final_tokens": 1024, "seq_len": 64,
                                               "batch_size": 4, "lr": 1e-3}}))
    assert main(["run", str(recipe), "--quiet"]) == 0
    assert "instantiate a model of type" not in caplog.text
    key = "attention" if part == "attention" else "ffn"
    blocks = [json.loads((tmp_path / d / "config.json").read_text())["block_configs"] for d in ("p", "r")]
    assert [b[key]["no_op"] for b in blocks[1]] == [b[key]["no_op"] for b in blocks[0]] and sum(
        b[key]["no_op"] for b in blocks[1]) == 1
    before, after = load_file(tmp_path / "p" / "model.safetensors"), load_file(tmp_path / "r" / "model.safetensors")
    assert before.keys() == after.keys() and not torch.equal(before["model.norm.weight"], after["model.norm.weight"])
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["phases"][0]["perplexity"] < report["dense"]["perplexity"]  # it learned the toy text
