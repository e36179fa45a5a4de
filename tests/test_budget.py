"""A parameter budget: its candidates meet it by hand-checked arithmetic, the search prunes to the candidate
with the lowest calibration loss (the same model the candidate was scored as), records all of them, and the
plan recreates the checkpoint bit for bit; bad budgets are refused before any work."""

import json
from dataclasses import replace

import pytest
import torch
from tiny import same_weights, tiny_config, tiny_model

from transact.arch import ModelShape, shape_of
from transact.cli import main
from transact.core import step
from transact.core.allocate import WidthSearch
from transact.core.budget import (
    Budget,
    Measure,
    ParamBudget,
    budget_candidates,
    candidate_depth,
    estimated_parameters,
)
from transact.core.depth_calibrate import calibration_loss
from transact.core.plan import PrunePlan
from transact.core.step import budget_step, calibration_windows, check_budget_search, prune_step, scoring_windows
from transact.errors import TransactError
from transact.jobs import apply_plan, prune
from transact.measure.costs import attention_parameters, count_parameters, flops_per_token, kv_cache_bytes_per_token
from transact.recipes import Calibration, PruneRecipe
from transact.recipes.run import RunRecipe

# SmolLM2-135M's shape: 30 layers of hidden 576, 9 heads in 3 KV groups of 64, MLP 1536, tied embeddings
SMOLLM2 = ModelShape("llama", 30, 576, 9, 3, 64, 1536, vocab_size=49152)
SMOLLM2_PARAMETERS = 134_515_008
# Gemma-3-270M's: 18 layers of hidden 640, 4 heads in 1 KV group of 256, MLP 2048, a 262,144-token vocabulary;
# every sixth layer attends to the whole context, the others to a sliding window of 512 tokens
GEMMA3 = ModelShape("gemma3_text", 18, 640, 4, 1, 256, 2048, vocab_size=262144,
                    attention_windows=tuple(None if (i + 1) % 6 == 0 else 512 for i in range(18)))
GEMMA3_PARAMETERS = 268_098_176


def test_estimated_parameters_by_hand():
    # a layer: q and o 576 x 576 each, k and v 576 x 192 each, gate/up/down 3 x 576 x 1536
    layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536
    assert estimated_parameters(SMOLLM2, SMOLLM2_PARAMETERS, 0, 9, 3, 1536) == SMOLLM2_PARAMETERS
    outside = SMOLLM2_PARAMETERS - 30 * layer
    pruned = 2 * 576 * 384 + 2 * 576 * 128 + 3 * 576 * 1000  # 6 heads in 2 groups, MLP 1000
    assert estimated_parameters(SMOLLM2, SMOLLM2_PARAMETERS, 4, 6, 2, 1000) == outside + 26 * pruned


def test_candidates_meet_the_budget_from_width_alone_to_depth_alone():
    candidates = budget_candidates(SMOLLM2, SMOLLM2_PARAMETERS, ParamBudget(0.75))
    target = 0.75 * SMOLLM2_PARAMETERS
    assert [(c.mix, c.drop) for c in candidates] == [("mlp", 0), ("both", 0), ("mlp", 5), ("both", 5), ("depth", 10)]
    # depth alone: the fewest layers whose removal meets the budget (9 layers leave 0.763)
    alone = candidates[-1]
    assert (alone.heads, alone.kv_heads, alone.mlp) == (9, 3, 1536) and alone.params <= target
    assert estimated_parameters(SMOLLM2, SMOLLM2_PARAMETERS, 9, 9, 3, 1536) > target
    for c in candidates[:-1]:  # each fills the budget to within one MLP channel of every layer
        assert target - (30 - c.drop) * 3 * 576 < c.params <= target
    mlp_only, both = candidates[0], candidates[1]
    assert (mlp_only.heads, mlp_only.kv_heads) == (9, 3) and mlp_only.mlp == 887
    assert (both.heads, both.kv_heads) == (6, 2)  # 6/9 of the heads, closest to its MLP's 1057/1536


def test_candidates_round_widths_to_the_multiple_asked():
    for c in budget_candidates(SMOLLM2, SMOLLM2_PARAMETERS, ParamBudget(0.8), multiple_of=128):
        assert c.mlp % 128 == 0 or c.mlp == 1536  # unpruned widths stay as they are, as --multiple-of leaves them
        assert (c.heads * 64) % 128 == 0 or c.heads == 9


def test_unreachable_budgets_and_bad_models_are_refused():
    with pytest.raises(TransactError, match=r"least this model reaches .* are outside its layers"):
        budget_candidates(SMOLLM2, SMOLLM2_PARAMETERS, ParamBudget(0.2))
    moe = ModelShape("qwen3_moe", 4, 64, 4, 2, 16, 32, num_experts=8, experts_per_token=2)
    with pytest.raises(TransactError, match="mixture of experts"):
        budget_candidates(moe, 10**6, ParamBudget(0.7))
    for value in (0.0, 1.0, 1.5, "x", True):
        with pytest.raises(TransactError, match="share in"):
            ParamBudget(value)
    with pytest.raises(TransactError, match="params=FRACTION"):
        ParamBudget.parse("tokens=0.5")
    with pytest.raises(TransactError, match="each candidate sets the layers"):
        ParamBudget(0.5, depth={"layers": 2})
    with pytest.raises(TransactError, match="either the budget or mlp"):
        PruneRecipe(mlp=64, budget=ParamBudget(0.5))
    with pytest.raises(TransactError, match=r"prune\.budget"):
        RunRecipe.from_dict({"model": "m", "out": "o", "target": {"mlp": 0.5}, "prune": {"budget": {"params": 0.6}}})


def test_flops_and_kv_cache_counted_by_hand():
    # a layer at 2048 tokens of context: projections 2 x (2 x 576 x 576 + 2 x 576 x 192), scores and sums
    # 4 x 9 heads x 64 x 2048, MLP 2 x 3 x 576 x 1536; the LM head 2 x 576 x 49152
    layer = 2 * 884_736 + 4 * 9 * 64 * 2048 + 2 * 3 * 576 * 1536
    flops = 30 * layer + 2 * 576 * 49152
    assert Measure("flops", 2048).of_model(SMOLLM2, SMOLLM2_PARAMETERS) == flops == flops_per_token(SMOLLM2, 2048)
    kv = 30 * 2 * 3 * 64  # keys and values of 3 KV heads of 64 in 30 layers, per token
    assert Measure("kv", 2048).of_model(SMOLLM2, SMOLLM2_PARAMETERS) == kv * 2048  # holding 2,048 tokens
    assert kv_cache_bytes_per_token(SMOLLM2, torch.float32) == 4 * kv
    assert Measure("params").of_model(SMOLLM2, SMOLLM2_PARAMETERS) == SMOLLM2_PARAMETERS


def test_flops_of_sliding_window_layers_counted_over_their_window():
    projections = 2 * 640 * (1024 + 256 * (4 + 2))  # q and o of 4 heads of 256, k and v of one
    sliding, full = projections + 4 * 4 * 256 * 512, projections + 4 * 4 * 256 * 2048
    mlp, head = 2 * 3 * 640 * 2048, 2 * 640 * 262144
    flops = 15 * sliding + 3 * full + 18 * mlp + head
    assert Measure("flops", 2048).of_model(GEMMA3, GEMMA3_PARAMETERS) == flops == flops_per_token(GEMMA3, 2048)
    assert flops_per_token(GEMMA3, 2048, windows=False) == 18 * full + 18 * mlp + head
    # a candidate that drops layers is counted as if the cheapest (windowed) went: 9 of 15 dropped leave
    # 6 windowed and 3 full layers, 0.799 of the FLOPs, whichever go
    candidates = budget_candidates(GEMMA3, GEMMA3_PARAMETERS, Budget(flops=0.8))
    depth = candidates[-1]
    assert (depth.mix, depth.drop) == ("depth", 9)
    assert depth.share == round((6 * sliding + 3 * full + 9 * mlp + head) / flops, 6) <= 0.8
    # at no drop the MLP keeps what fits beside every layer's attention: (0.8 x flops - head - attention) /
    # (18 layers x 3,840 FLOPs per channel), rounded down
    width = candidates[0]
    assert (width.mix, width.drop) == ("mlp", 0)
    assert width.mlp == int((0.8 * flops - head - 15 * sliding - 3 * full) // (18 * 2 * 3 * 640)) == 332


def test_kv_cache_budget_keeps_the_mlp_whole_and_drops_groups_or_layers():
    candidates = budget_candidates(SMOLLM2, SMOLLM2_PARAMETERS, Budget(kv=0.5))
    # depth alone: 15 of 30 layers; at 8 dropped, 2 of 3 groups fit (22 x 2 / 90); at none, 1 group (1.5 fit)
    assert [(c.mix, c.drop, c.heads, c.kv_heads, c.mlp) for c in candidates] == \
        [("both", 0, 3, 1, 1536), ("both", 8, 6, 2, 1536), ("depth", 15, 9, 3, 1536)]
    assert [c.share for c in candidates] == [pytest.approx(1 / 3), pytest.approx(44 / 90), 0.5]
    assert candidates[0].params == estimated_parameters(SMOLLM2, SMOLLM2_PARAMETERS, 0, 3, 1, 1536)


def test_kv_cache_budget_offers_dropping_attention_where_the_family_can_hold_it():
    # SmolLM2's 29 attentions that can go (every layer's but the first): 15 bring the cache to half, as 15
    # dropped layers do, but every MLP and width stays, and only the attentions' projections go
    candidates = budget_candidates(SMOLLM2, SMOLLM2_PARAMETERS, Budget(kv=0.5), attention_drops=29)
    last = candidates[-1]
    assert (last.mix, last.part, last.drop, last.heads, last.kv_heads, last.mlp, last.share) == \
        ("attention", "attention", 15, 9, 3, 1536, 0.5)
    assert last.params == SMOLLM2_PARAMETERS - 15 * attention_parameters(SMOLLM2) and last.describe() == \
        "drop 15 attentions"
    assert candidates[:-1] == budget_candidates(SMOLLM2, SMOLLM2_PARAMETERS, Budget(kv=0.5))
    # too few can go, or a budget that does not count the cache: no such candidate
    assert "attention" not in {c.mix for c in budget_candidates(SMOLLM2, SMOLLM2_PARAMETERS, Budget(kv=0.5),
                                                                  attention_drops=14)}
    assert "attention" not in {c.mix for c in budget_candidates(SMOLLM2, SMOLLM2_PARAMETERS, Budget(params=0.9),
                                                                  attention_drops=29)}  # 16 would meet it
    # chosen in 3 rounds where a third or more of the 29 go (15), in one pass where fewer (3 for 0.9)
    mild = budget_candidates(SMOLLM2, SMOLLM2_PARAMETERS, Budget(kv=0.9), attention_drops=29)[-1]
    assert mild.drop == 3
    assert [candidate_depth(Budget(kv=0.5), c, SMOLLM2).rounds for c in (last, mild)] == [3, 1]
    assert candidate_depth(Budget(kv=0.5), last, SMOLLM2).part == "attention"


def test_flops_budget_offers_dropping_attention_and_counts_only_the_attention():
    # at 2,048 tokens of context a SmolLM2 attention is 2 x 884,736 FLOPs of projections and 4 x 9 x 64 x 2,048
    # of scores and weighted sums; a layer's MLP (2 x 3 x 576 x 1,536) and the LM head stay
    attention, mlp, head = 2 * 884_736 + 4 * 9 * 64 * 2048, 2 * 3 * 576 * 1536, 2 * 576 * 49152
    whole = 30 * (attention + mlp) + head
    assert Measure("flops", 2048).of_model(SMOLLM2, SMOLLM2_PARAMETERS) == whole == 410_517_504
    candidates = budget_candidates(SMOLLM2, SMOLLM2_PARAMETERS, Budget(flops=0.85), attention_drops=29)
    last = candidates[-1]
    # 0.15 of the FLOPs is 9.5 attentions: 10 go, where 6 whole layers do (the depth candidate)
    assert (last.mix, last.drop, last.heads, last.kv_heads, last.mlp) == ("attention", 10, 9, 3, 1536)
    assert last.share == round((whole - 10 * attention) / whole, 6) == 0.841954
    assert last.params == SMOLLM2_PARAMETERS - 10 * attention_parameters(SMOLLM2)
    assert candidates[:-1] == budget_candidates(SMOLLM2, SMOLLM2_PARAMETERS, Budget(flops=0.85))
    assert ("depth", 6) in {(c.mix, c.drop) for c in candidates}
    # 0.25 of the FLOPs takes 16 attentions, more than half of the 30 layers (as depth, at most half): none
    assert "attention" not in {c.mix for c in budget_candidates(SMOLLM2, SMOLLM2_PARAMETERS, Budget(flops=0.75),
                                                                  attention_drops=29)}
    # at 8,192 tokens the scores weigh four times as much: 0.25 of the FLOPs takes 11 attentions (10.1)
    longer = budget_candidates(SMOLLM2, SMOLLM2_PARAMETERS, Budget(flops=0.75, context=8192), attention_drops=29)
    assert (longer[-1].mix, longer[-1].drop) == ("attention", 11)


def test_kv_cache_budget_counts_a_sliding_window_layer_up_to_its_window():
    """Gemma-3-270M has one KV head per layer, so only layers can go; 15 of its 18 layers cache at most a
    512-token window. Holding 2,048 tokens, its cache is 15 x 512 + 3 x 2,048 = 13,824 token-layers; a drop is
    counted as if windowed layers went (512 each), whichever the block score then picks."""
    whole = Measure("kv", 2048).of_model(GEMMA3, GEMMA3_PARAMETERS)
    assert whole == 2 * 256 * (15 * 512 + 3 * 2048)
    # 0.7 of it: 9 windowed layers (4,608 token-layers of 13,824) is the fewest that goes far enough
    candidates = budget_candidates(GEMMA3, GEMMA3_PARAMETERS, Budget(kv=0.7))
    assert [(c.mix, c.drop, c.share) for c in candidates] == [("depth", 9, round((6 * 512 + 3 * 2048) / 13824, 6))]
    # holding 512 tokens, every layer caches the same: 6 of 18 layers keep 0.667 <= 0.7
    candidates = budget_candidates(GEMMA3, GEMMA3_PARAMETERS, Budget(kv=0.7, context=512))
    assert [(c.mix, c.drop, c.share) for c in candidates] == [("depth", 6, round(12 / 18, 6))]
    # half the cache at 2,048 tokens is out of reach: dropping 9 layers (at most half) keeps 2/3 of it
    with pytest.raises(TransactError, match=r"least this model reaches .* is 0.667 of its KV cache$"):
        budget_candidates(GEMMA3, GEMMA3_PARAMETERS, Budget(kv=0.5))


def test_flops_budget_fills_each_candidate_to_within_one_channel():
    budget = Budget(flops=0.75, context=2048)
    whole = Measure("flops", 2048).of_model(SMOLLM2, SMOLLM2_PARAMETERS)
    candidates = budget_candidates(SMOLLM2, SMOLLM2_PARAMETERS, budget)
    assert [(c.mix, c.drop) for c in candidates] == [("mlp", 0), ("both", 0), ("mlp", 4), ("both", 4), ("depth", 9)]
    assert all(c.share <= 0.75 for c in candidates)
    for c in candidates:  # where the MLP is pruned, to within one of its channels in every layer
        if c.mlp < 1536:
            assert 0.75 - (30 - c.drop) * 2 * 3 * 576 / whole < c.share
    # the LM head's and the context's FLOPs stay, so the MLP goes further than for 0.75 of the parameters
    assert candidates[0].mlp < budget_candidates(SMOLLM2, SMOLLM2_PARAMETERS, ParamBudget(0.75))[0].mlp
    # at 8,192 tokens of context attention is over 3/4 of a layer's FLOPs: no MLP width alone meets the budget
    longer = budget_candidates(SMOLLM2, SMOLLM2_PARAMETERS, replace(budget, context=8192))
    assert (longer[0].mix, longer[0].drop, longer[0].heads) == ("both", 0, 6)


def test_budget_kinds_are_one_and_checked():
    assert Budget.parse("kv=0.5") == ("kv", 0.5) and Budget.parse("flops=0.6") == ("flops", 0.6)
    for bad, message in (({}, "give one of params, flops, kv$"), ({"params": 0.5, "kv": 0.5}, "not params and kv"),
                         ({"flops": 0.5, "context": 0}, "context must be a positive count"),
                         ({"kv": 1.0}, r"share in \(0, 1\) of the KV cache")):
        with pytest.raises(TransactError, match=message):
            Budget(**bad)
    assert Budget(flops=0.6, context=512).to_json()["context"] == 512
    assert set(Budget(kv=0.5).to_json()) == {"kv", "depths", "score_samples", "depth", "context"}
    assert set(Budget(params=0.5).to_json()) == {"params", "depths", "score_samples", "depth"}
    recipe = PruneRecipe(budget={"flops": 0.6, "context": 512})
    assert (recipe.budget.kind, recipe.budget.share, recipe.budget.context) == ("flops", 0.6, 512)
    assert PruneRecipe.from_json(recipe.to_json()).budget == recipe.budget


def _recipe(root, share: float = 0.7) -> PruneRecipe:
    return PruneRecipe(budget=ParamBudget(share, score_samples=4, depth={"score": "angular"}),
                       calibration=Calibration(str(root / "cal.txt"), samples=16, seq_len=32))


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer, corpus):
    root = tmp_path_factory.mktemp("budget")
    model = tiny_model("llama", seed=3, layers=6, heads=4, kv_heads=2, mlp=96)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    (root / "cal.txt").write_text("\n\n".join(corpus))
    return root


def test_the_search_prunes_to_the_candidate_with_the_lowest_loss(base, tokenizer, corpus):
    model = tiny_model("llama", seed=3, layers=6, heads=4, kv_heads=2, mlp=96)
    total, recipe = count_parameters(model), _recipe(base)
    plan = prune_step(model, tokenizer, recipe, texts=corpus, progress=False)
    record = plan.budget
    losses = [c["calibration_loss"] for c in record["candidates"]]
    chosen = record["candidates"][record["chosen"]]
    assert len(losses) >= 3 and chosen["calibration_loss"] == min(losses)
    assert {c["mix"] for c in record["candidates"]} >= {"mlp", "both"}
    # the model pruned in place is the model the winner was scored as
    # the 4 windows after the 16 the fits saw
    unseen = scoring_windows(tokenizer, recipe, corpus, recipe.budget.score_samples, "a budget")
    more = replace(recipe, budget=None, mlp=64, calibration=replace(recipe.calibration, samples=20))
    assert torch.equal(unseen, calibration_windows(tokenizer, more, corpus)[16:])
    assert calibration_loss(model, unseen) == pytest.approx(chosen["calibration_loss"], abs=1e-5)
    shape = shape_of(model)
    assert (shape.num_layers, shape.num_heads, shape.intermediate_size) == \
        (6 - chosen["drop"], chosen["heads"], chosen["mlp"])
    assert count_parameters(model) / total == pytest.approx(record["kept"], abs=1e-6) and record["kept"] <= 0.7 + 0.01
    assert "budget" not in plan.recipe and (plan.depth is not None) == (chosen["drop"] > 0)


def test_prune_job_writes_the_budgets_record_and_apply_plan_recreates_it(base, tmp_path, capsys):
    args = ["prune", str(base / "base"), "--calib", str(base / "cal.txt"), "--samples", "16", "--seq-len", "32"]
    assert main([*args, "--out", str(tmp_path / "a"), "--budget", "params=0.7", "--budget-depths", "3",
                 "--block-score", "angular"]) == 0
    out = capsys.readouterr()
    assert "<- chosen" in out.out and "budget: " in out.err
    plan = PrunePlan.load(tmp_path / "a" / "plan.json")
    assert plan.budget["budget"]["depth"]["score"] == "angular"
    assert json.loads((tmp_path / "a" / "report.json").read_text())["after"]["layers"] == plan.source.num_layers
    apply_plan.run(apply_plan.ApplyPlanJob(str(base / "base"), str(tmp_path / "a" / "plan.json"),
                                           str(tmp_path / "b"), progress=False))
    assert same_weights(tmp_path / "a", tmp_path / "b")


def test_kv_cache_budget_prunes_to_half_the_cache(base, tmp_path, capsys):
    args = ["prune", str(base / "base"), "--calib", str(base / "cal.txt"), "--samples", "16", "--seq-len", "32"]
    assert main([*args, "--out", str(tmp_path / "a"), "--budget", "kv=0.5", "--block-score", "angular"]) == 0
    out = capsys.readouterr().out
    plan = PrunePlan.load(tmp_path / "a" / "plan.json")
    kept = plan.budget["candidates"][plan.budget["chosen"]]["share"]
    assert plan.budget["kept_share"] == pytest.approx(kept, abs=1e-6)  # the pruned model is the chosen candidate
    assert f"budget            kv=0.5 (KV cache at 2048 tokens of context, kept {kept:.3f}): 4 candidates" in out
    # drop none and keep one of 2 groups, drop 2 layers and keep one group, drop 3 layers, or drop the attention
    # of 3 layers (of the 5 that can lose it: in 3 rounds)
    assert [(c["mix"], c["drop"], c["kv_heads"], c["share"]) for c in plan.budget["candidates"]] == \
        [("both", 0, 1, 0.5), ("both", 2, 1, pytest.approx(1 / 3)), ("depth", 3, 2, 0.5), ("attention", 3, 2, 0.5)]
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    if plan.budget["chosen"] == 3:  # the attention drop: the DeciLM layout
        assert [b["attention"]["no_op"] for b in config["block_configs"]].count(True) == 3
        assert plan.depth.part == "attention" and len(plan.depth.rounds) == 3
    else:
        assert config["num_hidden_layers"] * config["num_key_value_heads"] <= 6 * 2 / 2
    assert config["intermediate_size"] == 96  # MLP width is not what a KV-cache budget counts
    apply_plan.run(apply_plan.ApplyPlanJob(str(base / "base"), str(tmp_path / "a" / "plan.json"),
                                           str(tmp_path / "b"), progress=False))
    assert same_weights(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize(("budget", "drops"), [("kv=0.5", 3), ("flops=0.8", 2)])
def test_a_budget_saves_and_replays_an_attention_winner(budget, drops, base, tmp_path, monkeypatch):
    """Where the attention candidate wins (here made to: its scored loss is lowered by 1; on random weights any
    mix may win), the checkpoint is saved in the DeciLM layout with those attentions dropped, the record counts
    what it kept (on the pruned model: the candidate's estimate, exactly), and apply-plan recreates it without
    scoring. (At 2,048 tokens of context the tiny model's attention is most of a layer's FLOPs.)"""
    real = step.calibration_loss

    def favoured(model, windows, **kwargs):
        dropped = getattr(model.config, "attention_dropped_layers", None)
        return real(model, windows, **kwargs) - (1.0 if dropped else 0.0)

    monkeypatch.setattr(step, "calibration_loss", favoured)
    args = ["prune", str(base / "base"), "--calib", str(base / "cal.txt"), "--samples", "16", "--seq-len", "32",
            "--budget", budget, "--block-score", "angular", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    plan = PrunePlan.load(tmp_path / "a" / "plan.json")
    chosen = plan.budget["candidates"][plan.budget["chosen"]]
    assert chosen["mix"] == "attention" and chosen["drop"] == drops and chosen["share"] <= float(budget[-3:])
    assert plan.depth.part == "attention" and len(plan.depth.dropped) == drops and 0 not in plan.depth.dropped
    # counted on the pruned model, whose shape lists the attentions left
    assert plan.budget["kept_share"] == chosen["share"]
    assert plan.source.attention_layers == tuple(i for i in range(6) if i not in plan.depth.dropped)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert [b["attention"]["no_op"] for b in config["block_configs"]] == [i in plan.depth.dropped for i in range(6)]
    monkeypatch.undo()
    apply_plan.run(apply_plan.ApplyPlanJob(str(base / "base"), str(tmp_path / "a" / "plan.json"),
                                           str(tmp_path / "b"), progress=False))
    assert same_weights(tmp_path / "a", tmp_path / "b")


def test_the_attention_candidate_is_scored_as_the_model_without_those_attentions(base, tokenizer, corpus):
    recipe = replace(_recipe(base), budget=Budget(kv=0.5, score_samples=4, depth={"score": "angular"}))
    seen = {}
    model = tiny_model("llama", seed=3, layers=6, heads=4, kv_heads=2, mlp=96)
    budget_step(model, tokenizer, recipe, texts=corpus, progress=False,
                inspect=lambda candidate, pruned: seen.setdefault(candidate.mix, shape_of(pruned)))
    shape = seen["attention"]
    assert shape.num_layers == 6 and len(shape.attention_layers) == 3 and 0 in shape.attention_layers
    assert (shape.num_heads, shape.num_kv_heads, shape.intermediate_size) == (4, 2, 96)
    assert seen["depth"].num_layers == 3


def test_budget_with_the_width_search_spreads_the_chosen_mlp_width(base, tmp_path, capsys):
    """Candidates are scored at uniform widths; the winner's MLP channels are then spread over its layers in
    the search's steps, as many as the step allows (never worse on the calibration loss than their most even
    split), and apply-plan recreates it."""
    args = ["prune", str(base / "base"), "--calib", str(base / "cal.txt"), "--samples", "16", "--seq-len", "32",
            "--quiet", "--budget", "params=0.7", "--block-score", "angular", "--allocate", "search"]
    assert main([*args, "--out", str(tmp_path / "a"), "--search-step", "16", "--search-generations", "4"]) == 0
    plan = PrunePlan.load(tmp_path / "a" / "plan.json")
    chosen = plan.budget["candidates"][plan.budget["chosen"]]
    assert chosen["mlp"] < 96  # the tiny model's winner prunes the MLP, so the search ran
    layers = 6 - chosen["drop"]
    # the most channels, at most the winner's, in steps of 16
    assert sum(plan.mlp_widths) == chosen["mlp"] * layers // 16 * 16 and all(w % 16 == 0 for w in plan.mlp_widths)
    assert plan.targets.mlp == sum(plan.mlp_widths) // layers
    loss = plan.allocation["calibration_loss"]
    assert plan.allocation["generations"] == 4 and loss["searched"] <= loss["uniform"]
    # spreading the channels keeps the parameter count of the uniform candidate, less the channels the step
    # leaves (an MLP channel of the tiny model: 3 x 64 weights)
    uniform = tiny_model("llama", layers=layers, heads=chosen["heads"], kv_heads=chosen["kv_heads"],
                         mlp=chosen["mlp"])
    dense = count_parameters(tiny_model("llama", layers=6, heads=4, kv_heads=2, mlp=96))
    left = chosen["mlp"] * layers - sum(plan.mlp_widths)
    assert plan.budget["kept"] == pytest.approx((count_parameters(uniform) - left * 3 * 64) / dense, abs=1e-6)
    assert main(["apply-plan", str(base / "base"), str(tmp_path / "a" / "plan.json"), "--out", str(tmp_path / "b"),
                 "--quiet"]) == 0
    assert same_weights(tmp_path / "a", tmp_path / "b")
    for extra, message in ((["--search-step", "7"], "not a multiple of the search step 7"),
                           (["--budget", "kv=0.5"], "nothing to spread")):
        assert main([*args, "--out", str(tmp_path / "x"), *extra]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x").exists()
    searching = replace(_recipe(base), allocation=WidthSearch(step=16))
    with pytest.raises(TransactError, match="gemma3_text family has no checkpoint with widths that differ"):
        check_budget_search(tiny_config("gemma3_text"), searching)
    check_budget_search(tiny_config("llama"), searching)  # a family with per-layer checkpoints passes


def test_cli_refuses_budgets_before_any_work(base, tmp_path, capsys):
    args = ["prune", str(base / "base"), "--calib", str(base / "cal.txt"), "--samples", "16", "--seq-len", "32",
            "--quiet", "--out", str(tmp_path / "x")]
    for extra, message in ((["--budget", "params=0.7", "--mlp", "64"], "either the budget or mlp"),
                           (["--budget", "params=0.7", "--drop-layers", "1"], "either --budget or --drop-layers"),
                           (["--budget-depths", "2", "--mlp", "64"], "--budget-depths belongs to --budget"),
                           (["--budget-context", "512", "--mlp", "64"], "--budget-context belongs to --budget"),
                           (["--budget", "params=0.7", "--budget-context", "512"],
                            "counts FLOPs or the KV cache; --budget params=0.7 counts neither"),
                           (["--budget", "kv=0.1"], "of its KV cache"),
                           (["--budget", "params=0.7", "--layerwise"], "not available with --layerwise"),
                           (["--budget", "params=0.01"], "least this model reaches")):
        assert main([*args, *extra]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        main([*args, "--budget", "0.7"])
    assert "params=FRACTION" in capsys.readouterr().err
    with pytest.raises(TransactError, match="not available with --layerwise, --sequential"):
        prune.run(prune.PruneJob(str(base / "base"), str(tmp_path / "y"), _recipe(base), sequential=True,
                                 progress=False))
