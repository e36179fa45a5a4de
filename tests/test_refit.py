"""The least-squares refit corrector: the solve against a hand computation, damping, singular Gram
matrices, exact recovery of channels that are linear combinations of kept ones, and the command line."""

import copy
import json

import pytest
import torch
from tiny import FAMILIES, VOCAB, saved_model_and_text, tiny_model
from transformers import AutoModelForCausalLM

from transact.arch import ExpertParts, get_adapter, shape_of
from transact.cli import main
from transact.core.calibrate import collect_statistics
from transact.core.correct.refit import gram, refit_columns
from transact.core.metrics import get_metric, metric_names, no_heads
from transact.core.select import make_plan
from transact.core.step import apply_step
from transact.core.targets import Targets
from transact.errors import TransactError
from transact.recipes import PruneRecipe


def test_refit_equals_least_squares_by_hand():
    torch.manual_seed(0)
    x = torch.randn(200, 5, dtype=torch.float64)  # tokens x channels
    w = torch.randn(3, 5, dtype=torch.float64)
    kept = torch.tensor([0, 2, 3])
    g = x.T @ x
    torch.testing.assert_close(gram(x.reshape(4, 50, 5)).double(), g, rtol=1e-5, atol=1e-4)  # (batch, seq, C)
    got = refit_columns(w, g, kept, damp=0.0)
    # least squares: the kept columns that best reproduce w @ x from x[:, kept]
    expected = torch.linalg.lstsq(x[:, kept], x @ w.T).solution.T
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    assert torch.equal(refit_columns(w, g, torch.arange(5), damp=0.01), w)  # nothing removed: nothing changes


def test_damping_shrinks_toward_the_kept_weights():
    torch.manual_seed(1)
    x, w, kept = torch.randn(100, 4), torch.randn(2, 4), torch.tensor([1, 3])
    g = gram(x)
    corrections = [(refit_columns(w, g, kept, d) - w[:, kept]).norm().item() for d in (0.0, 0.1, 1.0, 100.0)]
    assert corrections == sorted(corrections, reverse=True) and corrections[-1] < 0.02 * corrections[0]
    # the formula with damp: W_S + W_R G_RS (G_SS + damp * mean(diag G_SS) I)^-1
    gd = g.double()
    a = gd[kept][:, kept] + 0.1 * gd[kept][:, kept].diagonal().mean() * torch.eye(2, dtype=torch.float64)
    by_hand = w[:, kept].double() + w[:, [0, 2]].double() @ gd[[0, 2]][:, kept] @ torch.linalg.inv(a)
    torch.testing.assert_close(refit_columns(w, g, kept, 0.1), by_hand.float(), rtol=1e-5, atol=1e-6)


def test_a_dead_kept_channel_does_not_crash_the_solve():
    torch.manual_seed(2)
    x = torch.randn(50, 4)
    x[:, 1] = 0  # a dead channel among the kept: G_SS is singular without damping
    w = torch.randn(3, 4)
    got = refit_columns(w, gram(x), torch.tensor([0, 1, 2]), damp=0.0)
    assert torch.isfinite(got).all()
    expected = torch.linalg.lstsq(x[:, [0, 2]].double(), (x @ w.T).double()).solution.T
    torch.testing.assert_close(got[:, [0, 2]], expected.float(), rtol=1e-4, atol=1e-4)


def _duplicated_units_model(family: str):
    """A tiny model in which MLP channel 2c+1 is twice channel 2c (same gate row, doubled up row) and query
    head 2h+1 is a copy of head 2h in its KV group, in every layer: the odd units' inputs to down_proj and
    o_proj are exact multiples of the even ones'."""
    model = tiny_model(family, heads=4, kv_heads=2, mlp=48)
    with torch.no_grad():
        for attn, mlp in get_adapter(model).layer_parts(model):
            if isinstance(mlp, ExpertParts):  # in every expert: [gate | up] rows of gate_up_proj
                mlp.gate_up[:, 1:48:2] = mlp.gate_up[:, 0:48:2]
                mlp.gate_up[:, 49::2] = 2 * mlp.gate_up[:, 48::2]
                mlp = mlp.shared  # and the shared expert, where there is one
            if mlp is not None:
                mlp.gate.weight[1::2] = mlp.gate.weight[0::2]
                mlp.up.weight[1::2] = 2 * mlp.up.weight[0::2]
            hd = attn.q_head_rows if attn else 0  # a head's q rows (with its output gate's, in Qwen3.5)
            for h in (0, 2) if attn else ():
                attn.q.weight[(h + 1) * hd:(h + 2) * hd] = attn.q.weight[h * hd:(h + 1) * hd]
                if attn.q.bias is not None:
                    attn.q.bias[(h + 1) * hd:(h + 2) * hd] = attn.q.bias[h * hd:(h + 1) * hd]
    return model


def _even_units_plan(model):
    shape = shape_of(model)
    heads = [torch.tensor([1.0, 0.0, 1.0, 0.0]) if shape.has_attention(i) else no_heads()
             for i in range(shape.num_layers)]  # keep heads 0 and 2, one per KV group
    mlp = [torch.tensor([1.0, 0.0] * 24)] * shape.num_layers  # keep the even channels (of every expert)
    if not shape.is_moe:
        return make_plan(heads, mlp, Targets(2, 2, 24), shape)
    experts = shape.num_experts  # all kept: what a dropped expert carried is no combination of the others'
    shared = None if shape.shared_expert_size is None else 24
    return make_plan(heads, [m.expand(experts, -1) for m in mlp], Targets(2, 2, 24, experts, shared), shape,
                     [torch.ones(experts)] * shape.num_layers, mlp if shared else None)


@pytest.mark.parametrize("family", FAMILIES)
def test_refit_recovers_units_that_are_combinations_of_kept_ones(family):
    model = _duplicated_units_model(family)
    x = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
    dense = model(x).logits
    stats = collect_statistics(model, x, ("gram",), progress=False)
    plan = _even_units_plan(model)
    sliced = copy.deepcopy(model)  # the same model, sliced without the refit
    apply_step(sliced, plan)
    refitted = apply_step(model, plan, stats, PruneRecipe(heads=2, kv_heads=2, mlp=24, correctors=("refit",),
                                                          corrector_options={"refit": {"damp": 0.0}}))
    assert refitted.corrections == [{"name": "refit", "damp": 0.0}]
    assert (sliced(x).logits - dense).abs().max() > 1e-2  # slicing alone loses what the odd units carried
    torch.testing.assert_close(model(x).logits, dense, rtol=0, atol=2e-5)  # fp32 rounding of the solve


def test_units_whose_contribution_was_zeroed_are_still_removed_exactly():
    """With W_R = 0 the refit's correction W_R G_RS (...)^-1 is zero: pruning stays exact."""
    model = tiny_model("qwen2", heads=4, kv_heads=2, mlp=48)
    x = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    plan = _even_units_plan(model)
    with torch.no_grad():
        for (attn, mlp), kept in zip(get_adapter(model).layer_parts(model), plan.layers, strict=True):
            for h in set(range(4)) - set(kept.heads):
                attn.o.weight[:, h * 16:(h + 1) * 16] = 0
            mlp.down.weight[:, sorted(set(range(48)) - set(kept.mlp))] = 0
    zeroed = model(x).logits
    stats = collect_statistics(model, x, ("gram",), progress=False)
    apply_step(model, plan, stats, PruneRecipe(heads=2, kv_heads=2, mlp=24, correctors=("refit",)))
    torch.testing.assert_close(model(x).logits, zeroed, rtol=0, atol=2e-5)


def test_recipe_rules():
    assert PruneRecipe(heads=2).correctors == ("refit",)  # the default
    with pytest.raises(TransactError, match="options are given for the corrector 'refit', which this recipe does "
                                            "not run"):
        PruneRecipe(heads=2, corrector_options={"refit": {"damp": 0.1}}, correctors=())
    with pytest.raises(TransactError, match=r"corrector 'refit': option 'damp' must be >= 0\.0, got -1\.0"):
        PruneRecipe(heads=2, correctors=("refit",), corrector_options={"refit": {"damp": -1.0}})
    with pytest.raises(TransactError, match="refit and flap_bias both compensate"):
        PruneRecipe(heads=2, correctors=("refit", "flap_bias"))
    recipe = PruneRecipe(heads=2, metric="random", correctors=("refit",))
    assert recipe.needs_calibration and recipe.statistics == ("gram",)  # a data-free metric still calibrates


# a corrector-aware metric scores what the refit leaves, so the refit moves its selection; the others' is the same
@pytest.mark.parametrize("metric", [name for name in metric_names() if not get_metric(name).corrector_aware])
def test_reconstruct_from_the_command_line_with_every_metric(tmp_path, corpus, capsys, metric):
    base, calib = saved_model_and_text(tmp_path, "qwen2", corpus)  # a family that cannot carry FLAP's biases
    args = ["--heads", "2", "--kv-heads", "1", "--mlp", "48", "--metric", metric, "--calib", str(calib),
            "--samples", "6", "--seq-len", "48", "--quiet"]
    assert main(["prune", str(base), "--out", str(tmp_path / "plain"), *args, "--no-reconstruct"]) == 0
    assert main(["prune", str(base), "--out", str(tmp_path / "refit"), *args, "--reconstruct", "--damp", "0.05"]) == 0
    plan = json.loads((tmp_path / "refit" / "plan.json").read_text())
    assert plan["corrections"] == [{"name": "refit", "damp": 0.05}]
    assert plan["recipe"]["corrector_options"] == {"refit": {"damp": 0.05}}
    plain = json.loads((tmp_path / "plain" / "plan.json").read_text())
    assert plan["layers"] == plain["layers"]  # the refit changes weights, not the selection
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "refit")  # vanilla, same config, no extra biases
    configs = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("plain", "refit")]
    assert configs[0] == configs[1] and b.model.layers[0].self_attn.o_proj.bias is None
    changed = {n for n, p in b.state_dict().items() if not torch.equal(p, a.state_dict()[n])}
    assert changed == {f"model.layers.{i}.{m}.weight" for i in (0, 1) for m in ("self_attn.o_proj", "mlp.down_proj")}
    # apply-plan recalibrates on the same text (checked by the tokens' hash) and writes the same weights
    assert main(["apply-plan", str(base), str(tmp_path / "refit" / "plan.json"), "--out", str(tmp_path / "x"),
                 "--quiet"]) == 0
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "x").state_dict()
    assert all(torch.equal(p, again[n]) for n, p in b.state_dict().items())
    assert json.loads((tmp_path / "x" / "plan.json").read_text())["corrections"] == plan["corrections"]
    calib.write_text("a different calibration text. " * 400)  # other calibration tokens: refused, nothing written
    capsys.readouterr()
    assert main(["apply-plan", str(base), str(tmp_path / "refit" / "plan.json"), "--out", str(tmp_path / "y")]) == 2
    assert "hash differs" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_default_damping_follows_the_tokens_per_channel():
    from transact.core.correct.refit import default_damp

    assert default_damp(tokens=2048, channels=1536) == 0.1  # 1.3 tokens a channel: a noisy Gram matrix
    assert default_damp(tokens=6144, channels=1536) == 0.01
    model = tiny_model("llama", heads=4, kv_heads=2, mlp=48)
    x = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(4))  # 40 tokens, 48 channels
    plan = apply_step(model, _even_units_plan(model), collect_statistics(model, x, ("gram",), progress=False),
                      PruneRecipe(heads=2, kv_heads=2, mlp=24, correctors=("refit",)))
    assert plan.corrections == [{"name": "refit", "damp": 0.1}]
