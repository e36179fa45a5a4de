"""KV groups chosen by the output error the correction leaves (``transact_residual``): the error formula
against a brute-force computation, the hand-built case where eq. 5 keeps a group of constant output that the
refit can rebuild from the other, exact enumeration against greedy removal, and the metric end to end."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import VOCAB, saved_model_and_text, tiny_model

from transact.arch import get_adapter
from transact.cli import main
from transact.core import salience
from transact.core.calibrate import collect_statistics
from transact.core.correct.refit import damp_for, refit_columns
from transact.core.select import select_heads
from transact.core.step import plan_step
from transact.errors import TransactError
from transact.recipes import PruneRecipe


def _brute_force(weight: torch.Tensor, x: torch.Tensor, kept: list[int], damp: float | None) -> float:
    """sum_t |W x_t - Ŵ_S x_t,S|², with Ŵ_S the refit (damp) or W_S itself (None). x: (T, C)."""
    keep = torch.tensor(kept)
    w = weight.double()
    sliced = refit_columns(w, x.T @ x, keep, damp).double() if damp is not None else w[:, keep]
    return float((x @ w.T - x[:, keep] @ sliced.T).square().sum())


def test_the_error_equals_a_brute_force_computation():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=gen, dtype=torch.float64) + torch.tensor([3.0, 0, 0, 1, 0, 0])  # (T, C)
    w = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    gram = x.T @ x
    for kept in ([0, 1, 2], [3, 4], [1, 2, 4, 5]):
        for damp in (0.0, 0.01, 0.1):
            assert salience.ConsumerError(w, gram, "refit", damp=damp)(torch.tensor(kept)) == \
                pytest.approx(_brute_force(w, x, kept, damp), rel=1e-9)
        assert salience.ConsumerError(w, gram, "none")(torch.tensor(kept)) == \
            pytest.approx(_brute_force(w, x, kept, None), rel=1e-9)
        # FLAP's compensation keeps the removed channels' mean output: only their fluctuation is lost
        mean = x.mean(0)
        removed = [c for c in range(6) if c not in kept]
        fluctuation = float(((x - mean)[:, removed] @ w[:, removed].T).square().sum())
        assert salience.ConsumerError(w, gram, "mean", mean=mean, tokens=50)(torch.tensor(kept)) == \
            pytest.approx(fluctuation, rel=1e-9)


def _two_heads() -> tuple[torch.Tensor, torch.Tensor]:
    """Two heads of two channels, one per KV group, over 4 tokens: head 0 outputs the constant (10, 10); head 1
    a channel near 1 (1.1, 0.9, ...) and a channel alternating ±2. o_proj adds channel c of both heads."""
    x = torch.tensor([[10.0, 10.0, 1.1, 2.0], [10.0, 10.0, 0.9, -2.0],
                      [10.0, 10.0, 1.1, 2.0], [10.0, 10.0, 0.9, -2.0]], dtype=torch.float64)
    o = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    return x, o


def test_a_constant_head_loses_to_a_varying_one_that_can_rebuild_it():
    """Eq. 5 keeps head 0 (channel norms 20, 20 against 2.0, 4). But head 1's channels span the constant
    (x2 - 0.05 x3 = 1), so with head 1 kept the refit rebuilds head 0's output exactly (error 0), while with
    head 0 kept nothing rebuilds head 1's fluctuation (error 4 x 0.01 + 4 x 4 = 16.04): the metric keeps
    head 1. Under FLAP's compensation head 0 costs nothing either; slicing alone, it costs 800."""
    x, o = _two_heads()
    gram = x.T @ x
    eq5 = salience.head_salience(salience.channel_norms(torch.diagonal(gram)), 2, 0.0)
    assert eq5.tolist() == pytest.approx([20.0, (4.04 ** 0.5 + 4.0) / 2])
    assert select_heads(eq5, 2, 1, 1) == ([0], [0])
    refit = salience.ConsumerError(o, gram, "refit", damp=0.0)
    assert refit(torch.tensor([0, 1])) == pytest.approx(16.04, abs=1e-9)
    assert refit(torch.tensor([2, 3])) == pytest.approx(0.0, abs=1e-9)
    kept = salience.least_error_groups(lambda groups: refit(torch.tensor([2 * g + c for g in groups for c in (0, 1)])),
                                       2, 1)
    assert kept == [1]
    assert select_heads(eq5, 2, 1, 1, group_scores=torch.tensor([0.0, 1.0])) == ([1], [1])
    assert salience.ConsumerError(o, gram, "mean", mean=x.mean(0), tokens=4)(torch.tensor([2, 3])) == \
        pytest.approx(0.0, abs=1e-9)
    assert salience.ConsumerError(o, gram, "none")(torch.tensor([2, 3])) == pytest.approx(800.0)


def test_greedy_removal_beyond_the_exact_limit(monkeypatch):
    """Past EXACT_GROUP_SETS, groups leave one at a time; on an additive error both ways agree."""
    cost = [5.0, 1.0, 4.0, 2.0, 3.0, 0.5]

    def error(groups: list[int]) -> float:
        return sum(c for g, c in enumerate(cost) if g not in groups)

    exact = salience.least_error_groups(error, 6, 3)
    monkeypatch.setattr(salience, "EXACT_GROUP_SETS", 1)
    assert salience.least_error_groups(error, 6, 3) == exact == [0, 2, 4]


def test_transact_residual_end_to_end_and_its_choice_depends_on_the_correction(tmp_path, corpus):
    base, calib = saved_model_and_text(tmp_path, "qwen2", corpus)
    common = ["--heads", "2", "--kv-heads", "1", "--mlp", "48", "--metric", "transact_residual", "--calib",
              str(calib), "--samples", "6", "--seq-len", "48", "--quiet"]
    for name, extra in (("refit", []), ("plain", ["--no-reconstruct"])):
        assert main(["prune", str(base), "--out", str(tmp_path / name), *common, *extra]) == 0
    plans = {n: json.loads((tmp_path / n / "plan.json").read_text()) for n in ("refit", "plain")}
    assert plans["refit"]["recipe"]["metric"] == "transact_residual"
    assert all(len(layer["kv_heads"]) == 1 for layer in plans["refit"]["layers"])
    with pytest.raises(TransactError, match="alpha"):
        PruneRecipe(heads=2, metric="transact_residual", metric_options={"alpha": -1})


def test_refit_removal_errors_equal_the_error_each_removal_leaves():
    """Each channel's error is what ``ConsumerError`` measures with every other channel kept and refitted."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(60, 7, generator=gen, dtype=torch.float64) + torch.tensor([2.0, 0, 0, 0, 1, 0, 0])  # (T, C)
    w = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    gram = x.T @ x
    errors = salience.refit_removal_errors(w, gram, 0.0)
    for channel in range(7):
        kept = torch.tensor([c for c in range(7) if c != channel])
        assert float(errors[channel]) == pytest.approx(salience.ConsumerError(w, gram, "refit", damp=0.0)(kept),
                                                       rel=1e-6)
    assert gram.dtype == torch.float64 and torch.equal(gram, x.T @ x)  # the statistics are not damped in place


def test_a_large_channel_the_others_rebuild_costs_less_than_a_small_one_they_cannot():
    """Channel 2 is 5 x channel 0 (eq. 5: norm 5x channel 0's, the largest); channel 1 is small and
    independent. Removing channel 2, the refit moves its weight onto channel 0: error ~0. Removing channel 1
    loses the part of its output channel 0 cannot explain: |w_1|² (Σ x_1² - (x_0·x_1)² / Σ x_0²) =
    1 - 1.25² / 6.25 = 0.75. So the refit-aware ranking keeps channel 1."""
    x0 = torch.tensor([1.0, -1.0, 2.0, 0.5], dtype=torch.float64)
    x1 = torch.tensor([0.5, 0.5, -0.5, -0.5], dtype=torch.float64)
    x = torch.stack([x0, x1, 5 * x0], dim=1)  # (T=4, C=3)
    w = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)  # down_proj with one output
    errors = salience.refit_removal_errors(w, x.T @ x, 0.0)
    assert float(errors[2]) < 1e-4  # 0 up to the damping floor (1e-8 relative) that keeps H invertible
    assert float(errors[1]) == pytest.approx(0.75, rel=1e-6)
    eq5 = salience.mlp_salience(salience.channel_norms((x * x).sum(0)))
    assert int(eq5.argmin()) == 1 and int(errors.argmax()) == 1
    assert salience.refit_removal_errors(w, torch.zeros(3, 3), 0.01).tolist() == [0.0, 0.0, 0.0]  # never fired


def _mlp_channels(plan) -> list[list[int]]:
    return [sorted(layer.mlp) for layer in plan.layers]


def test_mlp_score_consumer_error_ranks_channels_by_the_error_their_removal_leaves():
    """``mlp_score="consumer_error"``: under the refit each layer keeps the channels whose single removal costs
    most after the refit; with slicing alone, those carrying most output (Σ x² · |W_:,j|²); eq5 keeps the
    largest activation norms. The default, auto, is consumer_error under the refit where the MLP keeps at
    least half its channels (32 and 24 of 48 here), eq5 where more go (16 of 48) and without the refit. On
    this model the three rankings choose differently, so a wrong branch shows."""
    model = tiny_model("qwen2", heads=4, kv_heads=2, mlp=48)
    x = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    stats = collect_statistics(model, x, ("sum_sq", "sum", "gram"), progress=False)
    downs = [ffn.down.weight for _, ffn in get_adapter(model).layer_parts(model)]
    sum_sq, grams = stats.activation("mlp", "sum_sq"), stats.activation("mlp", "gram")

    def top(scores: list[torch.Tensor], mlp: int = 32) -> list[list[int]]:
        return [sorted(s.topk(mlp).indices.tolist()) for s in scores]

    refit_errors = [salience.refit_removal_errors(w, g, damp_for(stats)) for w, g in zip(downs, grams, strict=True)]
    refit = top(refit_errors)
    sliced = top([s.double() * w.double().square().sum(0) for w, s in zip(downs, sum_sq, strict=True)])
    norms = [salience.channel_norms(s) for s in sum_sq]
    eq5 = top(norms)

    def chosen(correctors: tuple, mlp_score: str | None, mlp: int = 32) -> list[list[int]]:
        options = {"mlp_score": mlp_score} if mlp_score else None
        recipe = PruneRecipe(heads=4, kv_heads=2, mlp=mlp, metric="transact_residual", correctors=correctors,
                             metric_options=options)
        plan, _ = plan_step(model, None, recipe, statistics=stats, progress=False)
        return [sorted(layer.mlp) for layer in plan.layers]

    assert len({str(refit), str(sliced), str(eq5)}) == 3
    assert chosen(("refit",), "consumer_error") == chosen(("refit",), None) == refit
    assert chosen((), "consumer_error") == sliced
    assert chosen(("refit",), "eq5") == chosen((), "eq5") == chosen((), None) == eq5
    assert chosen(("refit",), None, 24) == top(refit_errors, 24)  # half kept: still the error
    assert top(norms, 16) != top(refit_errors, 16)
    assert chosen(("refit",), None, 16) == top(norms, 16)  # less than half: eq. 5
    few = collect_statistics(model, x[:4], ("sum_sq", "sum", "gram"), progress=False)  # 128 tokens < 4 x 48
    recipe = PruneRecipe(heads=4, kv_heads=2, mlp=32, metric="transact_residual", correctors=("refit",))
    few_plan, _ = plan_step(model, None, recipe, statistics=few, progress=False)
    few_norms = [salience.channel_norms(s) for s in few.activation("mlp", "sum_sq")]
    assert [sorted(layer.mlp) for layer in few_plan.layers] == top(few_norms)  # few tokens a channel: eq. 5
    with pytest.raises(TransactError, match="mlp_score"):
        PruneRecipe(heads=2, metric="transact_residual", metric_options={"mlp_score": "obs"})


def test_mlp_score_compare_keeps_the_ranking_whose_pruned_model_has_the_lower_unseen_loss(tokenizer, corpus):
    """``mlp_score="compare"`` prunes a copy with each ranking (refit included) and keeps the one with the
    lower loss on the windows after the calibration's: the model pruned in place is, to the bit, the winner's
    ranking pruned alone, its loss on those windows is the recorded one, and apply-plan recreates it from the
    plan (which records the chosen ranking, not compare). Layer by layer it is auto's rule (here, half the
    MLP kept: consumer_error); too little text for the unseen windows is refused by name."""
    import copy
    from dataclasses import replace

    from transact.core.calibrate import sample_windows
    from transact.core.depth_calibrate import calibration_loss
    from transact.core.reapply import reapply_plan
    from transact.core.step import MLP_SCORE_WINDOWS, prune_step

    model = tiny_model("qwen2", heads=4, kv_heads=2, mlp=48)
    calibration = {"text": "builtin", "samples": 8, "seq_len": 32}
    recipe = PruneRecipe(heads=4, kv_heads=2, mlp=24, correctors=("refit",), calibration=calibration,
                         metric_options={"mlp_score": "compare"})
    pruned = copy.deepcopy(model)
    plan = prune_step(pruned, tokenizer, recipe, texts=corpus, progress=False)
    choice = plan.recipe["mlp_score_choice"]
    losses = choice["losses"]
    assert set(losses) == {"eq5", "consumer_error"} and losses["eq5"] != losses["consumer_error"]
    assert choice["chosen"] == min(losses, key=losses.get) and plan.recipe["metric_options"]["mlp_score"] == \
        choice["chosen"]
    alone = copy.deepcopy(model)
    prune_step(alone, tokenizer, replace(recipe, metric_options={"mlp_score": choice["chosen"]}), texts=corpus,
               progress=False)
    ids = torch.randint(2, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(pruned(ids).logits, alone(ids).logits)
    unseen = sample_windows(tokenizer, corpus, 8 + MLP_SCORE_WINDOWS, 32, 0)[8:]
    assert calibration_loss(pruned, unseen) == pytest.approx(losses[choice["chosen"]], abs=1e-5)
    again = copy.deepcopy(model)
    reapply_plan(again, plan, tokenizer, recipe=PruneRecipe.from_json(plan.recipe), texts=corpus, progress=False)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, pruned(ids).logits)
    from transact.core.layerwise import prune_by_layer

    layerwise, ranked, eq5 = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    by_layer = prune_by_layer(layerwise, tokenizer, recipe, sequential=False, texts=corpus, progress=False)
    by_error = prune_by_layer(ranked, tokenizer, replace(recipe, metric_options={"mlp_score": "consumer_error"}),
                              sequential=False, texts=corpus, progress=False)
    by_eq5 = prune_by_layer(eq5, tokenizer, replace(recipe, metric_options={"mlp_score": "eq5"}), sequential=False,
                            texts=corpus, progress=False)
    assert [layer.mlp for layer in by_layer.layers] == [layer.mlp for layer in by_error.layers] != \
        [layer.mlp for layer in by_eq5.layers]
    with pytest.raises(TransactError, match="mlp_score compare scores its candidates on 16 windows"):
        prune_step(copy.deepcopy(model), tokenizer, recipe, texts=[corpus[0][:600]], progress=False)


def test_query_heads_inside_a_group_by_the_error_their_keeping_leaves(monkeypatch):
    """Within one group, the constant head 0 and the varying head 1 of ``_two_heads``: eq. 5 keeps head 0;
    ``least_error_heads`` keeps head 1, whose channels rebuild head 0's output (error 0 against 16.04). On an
    additive error across two groups, the greedy removal past the exact limit agrees with enumeration."""
    x, o = _two_heads()
    refit = salience.ConsumerError(o, x.T @ x, "refit", damp=0.0)

    def heads_error(heads: list[int]) -> float:
        return refit(torch.tensor([2 * h + c for h in heads for c in (0, 1)]))

    assert salience.least_error_heads(heads_error, [[0, 1]], 1) == [1]
    cost = [5.0, 1.0, 4.0, 2.0, 3.0, 0.5]  # heads 0-2 in one group, 3-5 in the other

    def additive(heads: list[int]) -> float:
        return sum(c for h, c in enumerate(cost) if h not in heads)

    exact = salience.least_error_heads(additive, [[0, 1, 2], [3, 4, 5]], 2)
    monkeypatch.setattr(salience, "EXACT_GROUP_SETS", 1)
    assert salience.least_error_heads(additive, [[0, 1, 2], [3, 4, 5]], 2) == exact == [0, 2, 3, 4]


def test_head_score_consumer_error_keeps_the_least_error_heads_of_every_layer():
    """``head_score="consumer_error"``: each layer keeps, inside its kept groups, the query heads (two of each
    group's four) with the least refit error of o_proj among every choice (brute force here); ``eq5`` keeps
    eq. 5's, which differ on this model, so a wrong branch shows; ``auto`` (the default) is one or the other
    by the share of MLP channels kept, and eq5 with under 4 calibration tokens per channel of the widest Gram
    matrix (here o_proj's 128: 512 tokens are enough, 256 are not)."""
    import itertools

    model = tiny_model("qwen2", heads=8, kv_heads=2, mlp=48)
    x = torch.randint(0, VOCAB, (16, 32), generator=torch.Generator().manual_seed(0))
    stats = collect_statistics(model, x, ("sum_sq", "sum", "gram"), progress=False)
    damp = damp_for(stats)

    def least_error(attn, gram) -> list[int]:
        error = salience.ConsumerError(attn.o.weight, gram, "refit", damp=damp)
        sets = itertools.product(itertools.combinations(range(4), 2), itertools.combinations(range(4, 8), 2))
        chosen = min(sets, key=lambda s: error(torch.tensor([h * 16 + c for g in s for h in g for c in range(16)])))
        return sorted(h for g in chosen for h in g)

    parts = get_adapter(model).layer_parts(model)
    expected = [least_error(attn, g) for (attn, _), g in zip(parts, stats.activation("attn", "gram"), strict=True)]

    def chosen(head_score: str | None, mlp: int = 48, statistics=stats) -> list[list[int]]:
        recipe = PruneRecipe(heads=4, kv_heads=2, mlp=mlp, metric="transact_residual", correctors=("refit",),
                             metric_options={"head_score": head_score} if head_score else None)
        plan, _ = plan_step(model, None, recipe, statistics=statistics, progress=False)
        return [sorted(layer.heads) for layer in plan.layers]

    eq5 = chosen("eq5")
    assert chosen("consumer_error") == expected and eq5 != expected
    # the default, auto: error-chosen heads while the MLP keeps at least 3/4 of its 48 channels, eq. 5 below
    assert chosen(None) == chosen(None, mlp=36) == expected
    assert chosen(None, mlp=35) == chosen("auto", mlp=24) == eq5
    few = collect_statistics(model, x[:8], ("sum_sq", "sum", "gram"), progress=False)
    assert chosen(None, statistics=few) == chosen("eq5", statistics=few) != chosen("consumer_error", statistics=few)
    with pytest.raises(TransactError, match="head_score"):
        PruneRecipe(heads=2, metric="transact_residual", metric_options={"head_score": "obs"})


def test_the_fast_greedy_removes_the_heads_the_solving_greedy_removes():
    """Past the exact limit (6³ = 216 choices here) under the refit, heads leave by optimal-brain-surgeon
    updates of H⁻¹ (``refit_greedy_heads``); each step removes the head that a full solve per candidate
    (``least_error_heads`` on ``ConsumerError``) removes, so both keep the same heads."""
    gen = torch.Generator().manual_seed(3)
    mix = torch.randn(24, 24, generator=gen, dtype=torch.float64)
    x = torch.randn(300, 24, generator=gen, dtype=torch.float64) @ mix  # correlated channels: 12 heads of 2
    w = torch.randn(5, 24, generator=gen, dtype=torch.float64)
    groups = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    refit = salience.ConsumerError(w, x.T @ x, "refit", damp=1e-8)

    def heads_error(heads: list[int]) -> float:
        return refit(torch.tensor([2 * h + c for h in heads for c in (0, 1)]))

    solved = salience.least_error_heads(heads_error, groups, 2)
    fast = salience.refit_greedy_heads(w, x.T @ x, 2, 1e-8, groups, 2)
    assert fast == solved and len(fast) == 6 and all(sum(h in fast for h in g) == 2 for g in groups)


def test_many_heads_per_group_take_the_fast_greedy():
    """A layer of 12 heads in 2 groups keeping 3 of 6 in each (400 choices): the plan keeps, in every layer,
    the heads ``refit_greedy_heads`` keeps (768 calibration tokens: 4 per o_proj input channel, enough for
    auto to choose heads by the error)."""
    model = tiny_model("qwen2", heads=12, kv_heads=2, mlp=48)
    x = torch.randint(0, VOCAB, (24, 32), generator=torch.Generator().manual_seed(1))
    stats = collect_statistics(model, x, ("sum_sq", "sum", "gram"), progress=False)
    recipe = PruneRecipe(heads=6, kv_heads=2, mlp=48, metric="transact_residual", correctors=("refit",))
    plan, _ = plan_step(model, None, recipe, statistics=stats, progress=False)
    parts = get_adapter(model).layer_parts(model)
    groups = [list(range(6)), list(range(6, 12))]
    expected = [salience.refit_greedy_heads(attn.o.weight, g, 16, damp_for(stats), groups, 3)
                for (attn, _), g in zip(parts, stats.activation("attn", "gram"), strict=True)]
    assert [sorted(layer.heads) for layer in plan.layers] == expected
