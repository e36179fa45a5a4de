"""Salience math and selection, checked against numbers computed by hand."""

import pytest
import torch

from transact.arch import ModelShape
from transact.core import salience
from transact.core.select import select_channels, select_heads
from transact.core.targets import Targets, resolve_targets
from transact.errors import TransactError
from transact.recipes import PruneRecipe, Width


def test_head_salience_two_heads_by_hand():
    # head 0 channels have norms (3, 4): mean 3.5, max 4; head 1: (1, 7): mean 4, max 7.
    sum_sq = torch.tensor([9.0, 16.0, 1.0, 49.0])
    norms = salience.channel_norms(sum_sq)
    assert norms.tolist() == [3.0, 4.0, 1.0, 7.0]
    assert salience.head_salience(norms, head_dim=2, alpha=0.0).tolist() == [3.5, 4.0]
    assert salience.head_salience(norms, head_dim=2, alpha=0.5).tolist() == [3.5 + 2.0, 4.0 + 3.5]
    # A large alpha lets the outlier channel decide; alpha 0 keeps the mean ordering.
    assert salience.head_salience(torch.tensor([5.0, 5.0, 0.0, 9.0]), 2, 0.0).argmax().item() == 0
    assert salience.head_salience(torch.tensor([5.0, 5.0, 0.0, 9.0]), 2, 1.0).argmax().item() == 1


def test_default_alpha_is_ten_over_head_dim():
    assert salience.default_alpha(128) == 10 / 128


def test_head_salience_rejects_partial_heads():
    with pytest.raises(ValueError):
        salience.head_salience(torch.ones(5), head_dim=2, alpha=0.1)


def test_mlp_salience_is_channel_norm():
    assert salience.mlp_salience(salience.channel_norms(torch.tensor([4.0, 0.25]))).tolist() == [2.0, 0.5]


def test_magnitude_scores_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0], [0.0, 0.0]])  # (A=4, H=2), head_dim 2
    o = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])  # (H=2, A=4)
    # head 0 owns q rows 0,1 and o columns 0,1: 1 + 4 = 5; head 1: 4.
    assert salience.magnitude_head_scores(q, o, 2).tolist() == pytest.approx([5**0.5, 2.0])
    gate = torch.tensor([[3.0], [0.0]])
    up = torch.tensor([[0.0], [1.0]])
    down = torch.tensor([[4.0, 0.0]])
    assert salience.magnitude_mlp_scores(gate, up, down).tolist() == pytest.approx([5.0, 1.0])


def test_select_heads_mha_keeps_top_in_order():
    heads, groups = select_heads(torch.tensor([0.5, 3.0, 1.0, 2.0]), num_kv_heads=4, keep_heads=2, keep_kv=2)
    assert heads == [1, 3] and groups == [1, 3]


def test_select_heads_gqa_scores_groups_by_their_kept_heads():
    # 2 groups of 3 heads. Keep 1 group with 2 heads.
    # group 0: (10, 0, 0) -> best two sum to 10; group 1: (6, 6, 0) -> best two sum to 12.
    scores = torch.tensor([10.0, 0.0, 0.0, 6.0, 6.0, 0.0])
    heads, groups = select_heads(scores, num_kv_heads=2, keep_heads=2, keep_kv=1)
    assert groups == [1] and heads == [3, 4]
    # Keeping one head per group, group 0's single head (10) beats group 1's (6).
    heads, groups = select_heads(scores, num_kv_heads=2, keep_heads=1, keep_kv=1)
    assert groups == [0] and heads == [0]


def test_select_ties_break_to_lower_index():
    assert select_channels(torch.tensor([1.0, 2.0, 2.0, 2.0]), 2) == [1, 2]


SMOL = ModelShape("llama", num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64,
                  intermediate_size=1536)
MHA = ModelShape("llama", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4, head_dim=16,
                 intermediate_size=96)


@pytest.mark.parametrize(("heads", "kv", "mlp", "expected"), [
    (6, 2, 1024, Targets(6, 2, 1024)),
    (6, None, None, Targets(6, 2, 1536)),       # group size 3 kept
    (0.5, None, 0.5, Targets(6, 2, 768)),      # 0.5 of 3 groups -> 2 groups of 3
    (0.5, 3, None, Targets(6, 3, 1536)),       # 4.5 heads -> nearest multiple of 3
    (None, 1, None, Targets(3, 1, 1536)),      # all heads of the kept group
    (4, 2, None, Targets(4, 2, 1536)),
])
def test_resolve_targets_gqa(heads, kv, mlp, expected):
    assert resolve_targets(PruneRecipe(heads=heads, kv_heads=kv, mlp=mlp), SMOL) == expected


def test_resolve_targets_mha_keeps_kv_equal_to_heads():
    assert resolve_targets(PruneRecipe(heads=3), MHA) == Targets(3, 3, 96)


@pytest.mark.parametrize(("heads", "kv", "mlp", "message"), [
    (10, None, None, "multiple of 3"),
    (12, 3, None, "between 1 and the model's 9"),
    (5, 2, None, "not a multiple of kv heads"),
    (6, 1, None, "only 3"),
    (3, 4, None, "between 1 and the model's 3"),
    (None, None, 2000, "between 1 and the model's 1536"),
])
def test_resolve_targets_rejects_impossible(heads, kv, mlp, message):
    with pytest.raises(TransactError, match=message):
        resolve_targets(PruneRecipe(heads=heads, kv_heads=kv, mlp=mlp), SMOL)


@pytest.mark.parametrize("text", ["0", "-1", "1.0", "1.5", "abc", "nan", "0.0"])
def test_width_parse_rejects(text):
    with pytest.raises(TransactError):
        Width.parse(text)


def test_width_parse_accepts():
    assert Width.parse("6").value == 6 and Width.parse("0.25").value == 0.25
    assert Width.parse("0.25").of(9) == 2 and Width.parse("6").of(9) == 6


def test_recipe_rejects_bad_fields():
    with pytest.raises(TransactError, match="nothing to prune"):  # a recipe without widths says only how
        resolve_targets(PruneRecipe(), ModelShape("llama", 2, 64, 4, 2, 16, 96))
    with pytest.raises(TransactError, match="metric"):
        PruneRecipe(heads=2, metric="taylorish")
    with pytest.raises(TransactError, match=r"metric 'transact_residual': option 'alpha' must be >= 0.0, got -1.0"):
        PruneRecipe(heads=2, metric_options={"alpha": -1.0})


def _joint_removal_error(w: torch.Tensor, hinv: torch.Tensor, removed: list[int]) -> float:
    """The least output error left after removing channels ``removed`` and refitting the rest:
    tr(W_R [H⁻¹]_RR⁻¹ W_Rᵀ), computed from scratch."""
    r = torch.tensor(removed)
    return float(torch.trace(w[:, r] @ torch.linalg.inv(hinv[r][:, r]) @ w[:, r].T))


@pytest.mark.parametrize("unit", [1, 2])
def test_refit_removal_order_is_the_greedy_least_error_order(unit):
    """Each greedy step must remove the unit whose removal, together with those already removed, leaves the
    least refitted error: checked against that error computed from scratch for every candidate."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=gen, dtype=torch.float64)
    x[:, 5] = 0.9 * x[:, 1] + 0.1 * x[:, 6]  # channel 5 is nearly rebuilt from 1 and 6 by the refit
    w = torch.randn(4, 8, generator=gen, dtype=torch.float64) * torch.tensor([1, 1, 1, 1, 1, 9, 1, 1.0])
    gram, damp = x.T @ x, 0.01
    h = gram.clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = torch.linalg.inv(h)
    scores = salience.refit_removal_order(w, gram, unit, damp)
    order = scores.argsort().tolist()
    removed: list[int] = []
    for step, chosen in enumerate(order):
        candidates = [u for u in range(8 // unit) if u not in order[:step]]
        errors = {u: _joint_removal_error(w, hinv, removed + list(range(u * unit, (u + 1) * unit)))
                  for u in candidates}
        assert chosen == min(errors, key=errors.get)
        removed += list(range(chosen * unit, (chosen + 1) * unit))
    if unit == 1:
        assert order[0] in (1, 5)  # one of the two channels the other (with 6) rebuilds goes first


def test_refit_removal_order_stops_after_the_units_to_remove():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(100, 6, generator=gen)
    scores = salience.refit_removal_order(torch.randn(3, 6, generator=gen), x.T @ x, 1, 0.01, remove=2)
    assert sorted(scores.tolist()) == [0.0, 1.0, 6.0, 6.0, 6.0, 6.0]


@pytest.mark.parametrize(("heads", "kv", "mlp", "multiple", "expected"), [
    (6, 2, 1000, 256, Targets(4, 2, 1024)),    # 6 x 64 = 384 is no multiple of 256; 4 x 64 = 512 is
    (6, 2, 1100, 32, Targets(6, 2, 1088)),     # 384 already is a multiple of 32; 1100 -> 34 x 32
    (6, 2, 1000, 1, Targets(6, 2, 1000)),      # 1: as asked
    (None, None, 1000, 256, Targets(9, 3, 1024)),  # unpruned heads stay, though 9 x 64 is no multiple of 256
    (None, None, 100, 256, Targets(9, 3, 256)),    # at least one multiple
    (2, 2, None, 256, Targets(4, 2, 1536)),    # the only fitting pair
    (3, 1, 1500, 128, Targets(2, 1, 1536)),    # 2 and 4 heads tie, (2, 1) keeps the KV heads; 1500 -> 12 x 128
])
def test_resolve_targets_rounds_to_a_multiple(heads, kv, mlp, multiple, expected):
    recipe = PruneRecipe(heads=heads, kv_heads=kv, mlp=mlp, multiple_of=multiple)
    assert resolve_targets(recipe, SMOL) == expected


def test_multiple_of_refusals_and_record():
    with pytest.raises(TransactError, match=r"multiple of 256 only for head counts that are multiples of 16"):
        resolve_targets(PruneRecipe(heads=2, multiple_of=256), MHA)  # head_dim 16, 4 heads
    with pytest.raises(TransactError, match=r"mlp 50: the model's width 96 is less than the multiple 128"):
        resolve_targets(PruneRecipe(mlp=50, multiple_of=128), MHA)
    for bad in (0, -32, 1.5, True, "256"):
        with pytest.raises(TransactError, match="multiple_of must be a positive integer"):
            PruneRecipe(heads=2, multiple_of=bad)
    assert "multiple_of" not in PruneRecipe(heads=2).to_json()  # plans without it read as before
    recipe = PruneRecipe(heads=2, multiple_of=256)
    assert recipe.to_json()["multiple_of"] == 256 and PruneRecipe.from_json(recipe.to_json()) == recipe
