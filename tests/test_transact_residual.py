"""KV groups chosen by the output error the correction leaves (``transact_residual``): the error formula
against a brute-force computation, the hand-built case where eq. 5 keeps a group of constant output that the
refit can rebuild from the other, exact enumeration against greedy removal, and the metric end to end."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import saved_model_and_text

from transact.cli import main
from transact.core import salience
from transact.core.correct.refit import refit_columns
from transact.core.select import select_heads
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
