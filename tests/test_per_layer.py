"""Per-layer widths end to end: a model whose layers keep different MLP widths is saved in the DeciLM /
Nemotron-NAS layout with the project's own configuration and modeling files, reloads in transformers with
identical logits and generates with the KV cache; ``transact prune --allocate search`` writes it with the
search in plan.json, apply-plan recreates it bit for bit, and what cannot be done is refused up front."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import VOCAB, per_layer_model, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

from transact.arch import shape_of
from transact.cli import main
from transact.core.metrics.random_choice import random_layer_scores
from transact.core.plan import PrunePlan
from transact.core.select import make_plan
from transact.core.step import apply_step, check_allocation
from transact.core.targets import Targets
from transact.decilm.modeling_decilm import DeciLMForCausalLM
from transact.deploy import vllm
from transact.errors import TransactError
from transact.io.checkpoint import write_verified
from transact.io.per_layer import ffn_mult, has_per_layer_widths
from transact.io.text import read_texts, token_stream
from transact.jobs import apply_plan
from transact.measure.costs import count_parameters, model_summary
from transact.measure.perplexity import perplexity
from transact.recipes import PruneRecipe
from transact.recipes.run import RunRecipe


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_per_layer_widths_are_saved_as_decilm_and_reload_exactly(family, tmp_path, tokenizer, capsys):
    model, plan = per_layer_model(family, [32, 80, 56])
    assert has_per_layer_widths(model) and not plan.uniform
    write_verified(model, tokenizer, tmp_path / "out", plan, {}, save_dtype=torch.float32)  # reload check inside
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"] and config["model_type"] == "nemotron-nas"
    assert [b["ffn"]["intermediate_size"] for b in config["block_configs"]] == [32, 80, 56]
    assert {b["attention"]["n_heads_in_group"] for b in config["block_configs"]} == {2}
    assert config.get("qkv_bias", False) == (family == "qwen2")
    assert PrunePlan.load(tmp_path / "out" / "plan.json").mlp_widths == [32, 80, 56]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True,
                                                    attn_implementation="eager").eval()
    ids = torch.randint(2, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
        cached = reloaded.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=1)
        uncached = reloaded.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=1)
    assert torch.equal(cached, uncached)
    assert [layer.mlp.down_proj.in_features for layer in reloaded.model.layers] == [32, 80, 56]
    assert vllm.serve_command(tmp_path / "out", None) == f"vllm serve {tmp_path / 'out'} --trust-remote-code"


def test_a_head_count_that_does_not_divide_the_hidden_size_is_saved_and_reloaded(tmp_path, tokenizer):
    """3 heads of 16 on hidden 64 (Llama's own config refuses it when saved): the DeciLM config checks its own
    rule only, so the checkpoint is written and reloads with identical logits (write_verified checks)."""
    model = tiny_model("llama", layers=3, kv_heads=4)
    scores = random_layer_scores(shape_of(model), 0)
    plan = apply_step(model, make_plan(scores.heads, scores.mlp, Targets(3, 3, 56), shape_of(model),
                                       mlp_widths=[32, 80, 56]))
    out = write_verified(model, tokenizer, tmp_path / "out", plan, {}, save_dtype=torch.float32)
    config = json.loads((out / "config.json").read_text())
    assert config["num_attention_heads"] == 3 and config["head_dim"] == 16 and config["hidden_size"] == 64


def test_the_engines_width_rule_is_written_only_where_it_gives_the_width_back():
    assert ffn_mult(1024, 576) == {"ffn_mult": 2.666667}  # int(2 * 2.666667 * 576 / 3) = 1024
    assert ffn_mult(768, 896) == {"ffn_mult": 1.285714}  # int(767.99...) = 767, rounded up to 768
    assert ffn_mult(1000, 576) == {}  # not a multiple of 256: intermediate_size alone states it


def test_families_the_layout_cannot_hold_are_refused_before_any_work():
    recipe = PruneRecipe(mlp=48, allocation={"step": 16})
    targets = Targets(4, 2, 48)
    for config, message in ((tiny_config("gemma3_text"), "gemma3_text family has no checkpoint"),
                            (tiny_config("mistral", sliding_window=8), "sliding window"),
                            (tiny_config("qwen2", use_sliding_window=True, sliding_window=8), "sliding-window")):
        with pytest.raises(TransactError, match=message):
            check_allocation(config, recipe, targets)
    with pytest.raises(TransactError, match="mixture of experts"):
        check_allocation(tiny_config("mixtral"), recipe, Targets(4, 2, 48, 3))
    with pytest.raises(TransactError, match="mean MLP width 8 is outside"):
        check_allocation(tiny_config("llama"), recipe, Targets(4, 2, 8))
    with pytest.raises(TransactError, match="needs the mean MLP width"):
        PruneRecipe(heads=2, allocation={})
    with pytest.raises(TransactError, match="not with flap_bias"):
        PruneRecipe(mlp=48, correctors=("flap_bias",), allocation={})
    with pytest.raises(TransactError, match="calibration has 4"):
        PruneRecipe(mlp=48, calibration={"samples": 4}, allocation={})
    with pytest.raises(TransactError, match="mlp"):
        RunRecipe.from_dict({"model": "m", "out": "o", "target": {"mlp": 0.5}, "prune": {"allocation": {}}})


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer, corpus):
    root = tmp_path_factory.mktemp("allocate")
    tiny_model("llama", layers=4).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    (root / "cal.txt").write_text("\n\n".join(corpus))
    return root


def test_cli_allocate_search_and_apply_plan_recreate_the_checkpoint(base, tmp_path, capsys):
    args = ["prune", str(base / "base"), "--calib", str(base / "cal.txt"), "--samples", "8", "--seq-len", "32",
            "--quiet", "--mlp", "48"]
    for extra, message in ((["--search-step", "16"], "--search-step belongs to --allocate search"),
                           (["--search-step", "256"], "--search-step belongs to --allocate search"),  # the default
                           (["--search-generations", "40"], "--search-generations belongs to --allocate search"),
                           (["--search-dtype", "float32"], "--search-dtype belongs to --allocate search"),
                           (["--allocate", "search"], "not a multiple of the search step 256"),
                           (["--allocate", "search", "--search-step", "16", "--layerwise"], "not available with"),
                           (["--allocate", "search", "--search-step", "32", "--mlp", "16"],
                            "mean MLP width 16 is outside the candidate widths 32..96")):
        assert main([*args, "--out", str(tmp_path / "x"), *extra]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x").exists()
    # a mean of 42 asks 168 channels in 4 layers: the search spreads 160, the most in steps of 16
    assert main([*args, "--out", str(tmp_path / "a"), "--allocate", "search", "--search-step", "16",
                 "--search-generations", "6", "--mlp", "42"]) == 0
    plan = PrunePlan.load(tmp_path / "a" / "plan.json")
    assert sum(plan.mlp_widths) == 160 and all(w % 16 == 0 for w in plan.mlp_widths) and plan.targets.mlp == 40
    loss = plan.allocation["calibration_loss"]
    assert plan.allocation["generations"] == 6 and loss["searched"] <= loss["uniform"]
    assert plan.recipe["allocation"]["step"] == 16
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["model_type"] == ("llama" if plan.uniform else "nemotron-nas")
    assert main(["apply-plan", str(base / "base"), str(tmp_path / "a" / "plan.json"), "--out", str(tmp_path / "b"),
                 "--quiet"]) == 0
    first, again = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_apply_plan_recreates_per_layer_widths_bit_for_bit(base, tmp_path):
    """A plan with per-layer widths (as the search writes them) applied to its base twice: the same weights."""
    recipe = PruneRecipe(mlp=48, calibration={"text": str(base / "cal.txt"), "samples": 8, "seq_len": 32})
    plan_path = tmp_path / "plan.json"
    model = AutoModelForCausalLM.from_pretrained(base / "base")
    scores = random_layer_scores(shape_of(model), 1)
    plan = make_plan(scores.heads, scores.mlp, Targets(4, 2, 48), shape_of(model), mlp_widths=[16, 96, 64, 16],
                     recipe=recipe.to_json())
    plan.save(plan_path)
    for out in ("a", "b"):
        result = apply_plan.run(apply_plan.ApplyPlanJob(str(base / "base"), str(plan_path), str(tmp_path / out),
                                                        progress=False))
    assert "load model and tokenizer with trust_remote_code=True" in result.summary()
    first, again = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert first["model.layers.1.mlp.down_proj.weight"].shape == (64, 96)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["model_type"] == "nemotron-nas"


def test_transacts_commands_measure_a_per_layer_checkpoint_with_its_own_classes_and_refuse_to_prune_it(
        tmp_path, tokenizer, corpus, capsys, monkeypatch):
    """A per-layer checkpoint is read with the project's own classes (the copies beside the weights never run):
    info lists each layer's width, eval scores what the model in memory scores, its costs count what its
    modules hold; prune, apply-plan and run refuse it by name before any weights are read."""
    model, plan = per_layer_model("qwen2", [32, 80, 56])
    out = write_verified(model, tokenizer, tmp_path / "out", plan, {}, save_dtype=torch.float32)
    (out / "modeling_decilm.py").write_text("raise RuntimeError('the checkpoint copy ran')\n")
    text = tmp_path / "heldout.txt"
    text.write_text("\n\n".join(corpus))
    assert main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "family            nemotron-nas" in printed and "2 heads / 1 KV heads" in printed
    assert "56 channels on average, per layer: 32 80 56" in printed and "prunable          no: " in printed
    assert main(["eval", str(out), "--text", str(text), "--eval-tokens", "300", "--windows", "64", "--json",
                 str(tmp_path / "eval.json"), "--quiet"]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    expected = perplexity(model, token_stream(tokenizer, read_texts(text), limit=300), window=64, progress=False)
    assert result["perplexity"][f"{text}@64"]["perplexity"] == pytest.approx(expected.perplexity, rel=1e-5)
    summary = result["summary"]
    assert summary["mlp"] == 56 and summary["mlp_per_layer"] == [32, 80, 56] and summary["kv_heads"] == 1
    assert result["params"] == count_parameters(model)
    # widths 32, 80, 56 hold as many MLP weights (3 x hidden 64 x 168) as 56 in every layer: the same costs
    uniform = model_summary(tiny_model("qwen2", layers=3, mlp=56, heads=2, kv_heads=1))
    assert summary["params"] == uniform["params"] and summary["flops_per_token"] == uniform["flops_per_token"]
    assert summary["kv_cache_bytes_per_token"] == 2 * 3 * 1 * 16 * 4
    monkeypatch.setattr(DeciLMForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights were read"))
    recipe = tmp_path / "run.yaml"
    recipe.write_text(json.dumps({"model": str(out), "out": str(tmp_path / "r"), "target": {"mlp": 16},
                                  "training": {"data": str(text), "tokens_per_shot": 64}}))
    for argv in (["prune", str(out), "--mlp", "16", "--calib", str(text), "--out", str(tmp_path / "p"), "--quiet"],
                 ["prune", str(out), "--drop-layers", "1", "--out", str(tmp_path / "p"), "--quiet"],
                 ["apply-plan", str(out), str(out / "plan.json"), "--out", str(tmp_path / "p"), "--quiet"],
                 ["run", str(recipe), "--quiet"]):
        assert main(argv) == 2, argv
        assert "per-layer widths (the DeciLM / Nemotron-NAS layout)" in capsys.readouterr().err
    assert not (tmp_path / "p").exists() and not (tmp_path / "r").exists()


def test_a_run_without_shots_trains_a_per_layer_checkpoint_and_keeps_its_widths(tmp_path, tokenizer, corpus):
    """``transact run`` with shots: 0 trains a per-layer checkpoint as it is (the recovery of a searched
    prune): the result is the same DeciLM layout with each layer's width, other weights, and reloads with its
    logits (the run's own check), with the run's report and no plan.json."""
    model, plan = per_layer_model("qwen2", [32, 80, 56])
    out = write_verified(model, tokenizer, tmp_path / "in", plan, {}, save_dtype=torch.float32)
    text = tmp_path / "train.txt"
    text.write_text("\n\n".join(corpus))
    recipe = tmp_path / "run.yaml"
    recipe.write_text(json.dumps({"model": str(out), "out": str(tmp_path / "r"), "shots": 0, "device": "cpu",
                                  "training": {"data": str(text), "final_tokens": 1024, "seq_len": 64,
                                               "batch_size": 4, "lr": 1e-3},
                                  "heldout": {"text": str(text), "tokens": 512, "window": 128}}))
    assert main(["run", str(recipe), "--quiet"]) == 0
    result = tmp_path / "r"
    config = json.loads((result / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas"
    assert [b["ffn"]["intermediate_size"] for b in config["block_configs"]] == [32, 80, 56]
    before, after = load_file(out / "model.safetensors"), load_file(result / "model.safetensors")
    assert before.keys() == after.keys() and all(before[k].shape == after[k].shape for k in before)
    assert not torch.equal(before["model.layers.1.mlp.down_proj.weight"], after["model.layers.1.mlp.down_proj.weight"])
    report = json.loads((result / "report.json").read_text())
    assert report["final"]["mlp_per_layer"] == [32, 80, 56] and len(report["phases"]) == 1
    assert report["phases"][0]["perplexity"] < report["dense"]["perplexity"]  # it learned the toy text
    assert not (result / "plan.json").exists()


def test_only_the_per_layer_checkpoints_transact_writes_are_read(tmp_path, tokenizer, capsys):
    """Another checkpoint with its own code, or a DeciLM one with layers this modeling file does not build
    (widths given only as ffn_mult, a layer with neither attention nor MLP, linear attention, no attention in
    layer 0), is refused by name; transformers never asks to run code."""
    model, plan = per_layer_model("llama", [32, 80, 56])
    out = write_verified(model, tokenizer, tmp_path / "out", plan, {}, save_dtype=torch.float32)
    config = json.loads((out / "config.json").read_text())
    for change, message in (({"model_type": "custom"}, "brings its own modeling code (model_type 'custom')"),
                            ({"block_configs": [{"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": 2.0}}] * 3},
                             "needs, where a layer has them, its ffn.intermediate_size"),
                            ({"block_configs": [{"attention": {"n_heads_in_group": 2}, "ffn": {"intermediate_size": 8}},
                                                *[{"attention": {"no_op": True}, "ffn": {"no_op": True}}] * 2]},
                             "layer 1: a layer with neither attention nor MLP"),
                            ({"block_configs": [{"attention": {"replace_with_linear": True},
                                                 "ffn": {"intermediate_size": 8}}] * 3},
                             "linear blocks are not supported"),
                            ({"block_configs": [{"attention": {"no_op": True}, "ffn": {"intermediate_size": 8}}] * 3},
                             "needs the first layer's attention")):
        (out / "config.json").write_text(json.dumps(config | change))
        assert main(["info", str(out)]) == 2
        assert message in capsys.readouterr().err
