"""Per-layer MLP widths searched on the calibration loss: a trial width is exactly the uniform prune at that
width, slicing agrees with the trial, trials leave the model as they found it, the search keeps the budget,
never returns an allocation with a higher calibration loss than uniform widths and moves channels out of a
layer whose MLP hardly matters; bad input is refused before any work."""

import copy
import random

import pytest
import torch
from tiny import VOCAB, tiny_model

from transact.arch import shape_of
from transact.core.allocate import (
    WidthSearch,
    check_budget,
    even_split,
    mlp_variants,
    mutate,
    scoring_copy,
    search_widths,
    slice_to_widths_,
    spread_total,
    trial_widths,
    width_levels,
)
from transact.core.calibrate import collect_statistics
from transact.core.correct.refit import damp_for
from transact.core.metrics import get_metric
from transact.core.step import prune_step
from transact.errors import TransactError
from transact.measure.costs import count_parameters
from transact.recipes import PruneRecipe

LEVELS = width_levels(96, 16)  # 16, 32, ..., 96: the tiny models' MLP width is 96


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(2, VOCAB, (2, 20), generator=torch.Generator().manual_seed(seed))


def _sampled_windows(model, count: int = 16, length: int = 24) -> torch.Tensor:
    """Windows sampled from the model itself: its own calibration loss is then near its minimum, so cutting
    channels that matter raises it (on random text it might fall by chance)."""
    torch.manual_seed(0)
    start = torch.randint(2, VOCAB, (count, 1))
    with torch.no_grad():
        return model.generate(start, do_sample=True, max_new_tokens=length - 1, min_new_tokens=length - 1,
                              pad_token_id=1, top_k=0)


def _variants(model, windows):
    recipe = PruneRecipe(mlp=48)
    stats = collect_statistics(model, windows, recipe.statistics)
    scores = get_metric(recipe.metric).score(model, stats, shape_of(model), recipe).mlp
    variants = mlp_variants(model, stats.activation("mlp", "gram"), scores, LEVELS, damp_for(stats))
    return recipe, stats, variants


def test_a_uniform_trial_is_the_default_prune_and_trials_restore_the_weights():
    model = tiny_model("llama", layers=3)
    windows = torch.randint(2, VOCAB, (8, 24), generator=torch.Generator().manual_seed(1))
    recipe, stats, variants = _variants(model, windows)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = copy.deepcopy(model)
    prune_step(pruned, None, recipe, statistics=stats)
    with torch.no_grad():
        expected = pruned(_ids()).logits
        with trial_widths(model, variants) as trial:
            trial.set_([48, 48, 48])
            torch.testing.assert_close(model(_ids()).logits, expected, atol=1e-5, rtol=1e-5)
            trial.set_([96, 96, 96])  # every channel kept: the refit changes nothing
            torch.testing.assert_close(model(_ids()).logits, _logits(before, model), atol=1e-5, rtol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="boom"), trial_widths(model, variants) as trial:
        trial.set_([16, 16, 16])
        raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_without_the_refit_a_trial_is_plain_slicing():
    model = tiny_model("llama", layers=2)
    windows = torch.randint(2, VOCAB, (8, 24), generator=torch.Generator().manual_seed(1))
    recipe = PruneRecipe(mlp=32, correctors=())
    stats = collect_statistics(model, windows, recipe.statistics)
    scores = get_metric(recipe.metric).score(model, stats, shape_of(model), recipe).mlp
    variants = mlp_variants(model, None, scores, LEVELS, None)
    pruned = copy.deepcopy(model)
    prune_step(pruned, None, recipe, statistics=stats)
    with torch.no_grad(), trial_widths(model, variants) as trial:
        trial.set_([32, 32])
        # the removed channels meet zero columns: the same sums up to their order
        torch.testing.assert_close(model(_ids()).logits, pruned(_ids()).logits, atol=1e-5, rtol=1e-5)


def _logits(state, model):
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(state)
    return fresh(_ids()).logits


def test_slicing_to_per_layer_widths_gives_the_trials_model():
    model = tiny_model("llama", layers=3)
    windows = torch.randint(2, VOCAB, (8, 24), generator=torch.Generator().manual_seed(1))
    _, _, variants = _variants(model, windows)
    widths = [16, 96, 32]
    with torch.no_grad(), trial_widths(model, variants) as trial:
        trial.set_(widths)
        expected = model(_ids()).logits
    sliced = slice_to_widths_(copy.deepcopy(model), variants, widths)
    with torch.no_grad():
        torch.testing.assert_close(sliced(_ids()).logits, expected, atol=1e-5, rtol=1e-5)
    downs = [layer.mlp.down_proj.weight.shape for layer in sliced.model.layers]
    assert downs == [torch.Size([64, w]) for w in widths]
    # each removed channel took its gate row, up row and down column (64 values each) with it
    assert count_parameters(model) - count_parameters(sliced) == sum(3 * 64 * (96 - w) for w in widths)


def test_mutate_moves_whole_steps_and_keeps_the_total():
    rng = random.Random(3)
    for _ in range(50):
        child = mutate([32, 48, 64, 48], 16, 16, 96, rng.randint(1, 3), rng)
        assert sum(child) == 192 and all(16 <= w <= 96 and w % 16 == 0 for w in child)
    assert mutate([16, 16], 16, 16, 96, 2, rng) == [16, 16]  # no layer can give
    assert mutate([96, 96], 16, 16, 96, 2, rng) == [96, 96]  # no layer can take
    assert mutate([16, 32], 16, 16, 96, 1, random.Random(0)) == [32, 16]  # only layer 1 can give


def test_the_search_keeps_the_budget_and_starves_a_layer_that_hardly_matters():
    model = tiny_model("llama", layers=3)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1e-3)  # layer 1's MLP adds almost nothing
    windows = _sampled_windows(model)
    _, _, variants = _variants(model, windows)
    options = WidthSearch(step=16, generations=12, offspring=6, first_samples=4, final_samples=8)
    found = search_widths(model, windows, variants, 48, options)
    assert sum(found.widths) == 3 * 48 and found.generations == 12
    assert found.widths[1] == 16 and found.loss < found.uniform_loss
    none = search_widths(model, windows, variants, 48, WidthSearch(step=16, generations=0))
    assert none.widths == [48, 48, 48] and none.loss == none.uniform_loss == pytest.approx(found.uniform_loss)


def test_a_mean_width_between_steps_spreads_the_most_channels_the_step_allows():
    # a mean of 40 in 3 layers asks 120 channels; 112 is the most in steps of 16: 7 steps, 2 per layer and
    # one more, which goes to layer 0
    assert spread_total(40, 3, LEVELS) == 112 and even_split(112, 3, LEVELS) == [48, 32, 32]
    assert spread_total(48, 3, LEVELS) == 144 and even_split(144, 3, LEVELS) == [48, 48, 48]  # uniform
    # 887 channels in 25 layers of steps of 128 (SmolLM2 less 5 layers, at 0.75 of its parameters): 22,175
    # asked, 173 steps = 22,144 given: 23 layers of 896 and 2 of 768
    levels = width_levels(1536, 128)
    widths = even_split(spread_total(887, 25, levels), 25, levels)
    assert sum(widths) == 22_144 and sorted(set(widths)) == [768, 896] and widths.count(768) == 2
    assert [i for i, w in enumerate(widths) if w == 896][:2] == [0, 1]
    model = tiny_model("llama", layers=3)
    windows = _sampled_windows(model)
    _, _, variants = _variants(model, windows)
    found = search_widths(model, windows, variants, 40, WidthSearch(step=16, generations=4))
    assert sum(found.widths) == 112 and all(w % 16 == 0 for w in found.widths)
    assert found.loss <= found.uniform_loss


def test_candidates_are_scored_on_a_bf16_copy_that_leaves_the_model_untouched():
    """``score_dtype`` bfloat16 (the default) scores on a bf16 copy of an fp32 model, float32 on the model
    itself; neither changes the model's weights, and both see nearly the same losses."""
    model = tiny_model("llama", layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert scoring_copy(model, torch.float32) is model
    twin = scoring_copy(model, torch.bfloat16)
    assert twin is not model and next(twin.parameters()).dtype == torch.bfloat16
    assert torch.equal(twin.model.layers[0].mlp.down_proj.weight,
                       model.model.layers[0].mlp.down_proj.weight.to(torch.bfloat16))
    windows = _sampled_windows(model)
    _, _, variants = _variants(model, windows)
    bf16 = search_widths(model, windows, variants, 48, WidthSearch(step=16, generations=3))
    fp32 = search_widths(model, windows, variants, 48, WidthSearch(step=16, generations=3, score_dtype="float32"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert bf16.uniform_loss != fp32.uniform_loss and bf16.uniform_loss == pytest.approx(fp32.uniform_loss, rel=1e-2)
    with pytest.raises(TransactError, match="score_dtype"):
        WidthSearch(score_dtype="float16")


def test_bad_budgets_and_settings_are_refused_before_any_work():
    with pytest.raises(TransactError, match="not a multiple of the search step 64"):
        width_levels(96, 64)
    with pytest.raises(TransactError, match="smallest width 40"):
        width_levels(96, 16, min_width=40)
    for mean in (8, 100):
        with pytest.raises(TransactError, match=f"mean MLP width {mean} is outside the candidate widths 16..96"):
            check_budget(mean, LEVELS)
    check_budget(40, LEVELS)  # between two steps: the search spreads 16 x floor(40 x layers / 16)
    with pytest.raises(TransactError, match="survivors"):
        WidthSearch(offspring=2, survivors=3)
    with pytest.raises(TransactError, match="step"):
        WidthSearch(step=0)
    model = tiny_model("llama", layers=2)
    windows = torch.randint(2, VOCAB, (4, 24), generator=torch.Generator().manual_seed(1))
    _, _, variants = _variants(model, windows)
    with pytest.raises(TransactError, match="draws 8 calibration windows"):
        search_widths(model, windows, variants, 48, WidthSearch(step=16))
    with pytest.raises(TransactError, match="no candidate width 40"), trial_widths(model, variants) as trial:
        trial.set_([40, 48])
    moe = tiny_model("mixtral")
    with pytest.raises(TransactError, match="mixture of experts"):
        mlp_variants(moe, [], [], LEVELS, 0.01)
