"""Depth pruning: dropped layers leave the rest of the model exact, the least-squares map folds where it
should, the block scores measure what they say, and the prune / apply-plan jobs carry it to disk."""

import json

import pytest
import torch
from tiny import FAMILIES, VOCAB, load_kwargs, same_weights, tiny_model

from transact.arch import get_adapter, shape_of
from transact.cli import main
from transact.core.depth import (
    DepthOptions,
    block_scores,
    drop_block_,
    drop_layers_,
    fit_map,
    fold_map_into_down_,
    least_squares_map,
    per_channel_map,
    remove_layers_,
)
from transact.core.depth_calibrate import (
    angular_distance,
    angular_scores,
    calibration_loss,
    gain_statistics,
    loss_scores,
    map_statistics,
    residual_taps,
    skipping,
)
from transact.core.plan import PrunePlan, whole_plan
from transact.errors import TransactError
from transact.io.checkpoint import write_checkpoint
from transact.jobs import apply_plan, prune
from transact.recipes import Calibration, PruneRecipe
from transact.recipes.run import RunRecipe

OUTPUT_PROJECTIONS = ("o_proj", "down_proj", "out_proj")  # attention, MLP (experts too), linear attention


def _silence_layer(model, index: int) -> None:
    """Zero every output projection of layer ``index``: the layer then adds nothing to the residual stream."""
    layer = get_adapter(model).layers(model)[index]
    with torch.no_grad():
        for name, p in layer.named_parameters():
            parts = name.split(".")
            if parts[-1] in OUTPUT_PROJECTIONS or (len(parts) > 1 and parts[-2] in OUTPUT_PROJECTIONS):
                p.zero_()


def _ids(seed: int = 0, length: int = 20) -> torch.Tensor:
    return torch.randint(2, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def _windows(count: int = 16, length: int = 24) -> torch.Tensor:
    return torch.randint(2, VOCAB, (count, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_silenced_layer_is_removed_with_logits_unchanged(tmp_path, family):
    """Layer 1 of 4 made an identity is dropped: the same logits, the same greedy continuation through the
    KV cache, and a vanilla reload of the checkpoint (fewer layers, per-layer lists cut) gives them too."""
    model = tiny_model(family, layers=4)
    ids = _ids()
    with torch.no_grad():
        dense = model(ids).logits
        _silence_layer(model, 1)
        expected = model(ids).logits
        assert not torch.allclose(dense, expected, atol=1e-3)  # the layer mattered before it was silenced
        continuation = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
    text = get_adapter(model).text_config(model.config)
    per_layer = {k: v for k, v in text.to_dict().items() if isinstance(v, list) and len(v) == 4}
    remove_layers_(model, [1])
    assert shape_of(model).num_layers == 3 and len(get_adapter(model).layers(model)) == 3
    assert all(getattr(text, k) == [v[0], v[2], v[3]] for k, v in per_layer.items())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
        assert torch.equal(model.generate(ids[:1], max_new_tokens=6, do_sample=False), continuation)
    out = write_checkpoint(model, None, tmp_path / "out", plan=whole_plan(shape_of(model)), report={},
                           save_dtype=torch.float32)
    adapter = get_adapter(model)
    reloaded = adapter.model_class().from_pretrained(out, **load_kwargs(model.config)).eval()
    assert adapter.text_config(reloaded.config).num_hidden_layers == 3
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)


def test_removing_layers_refuses_bad_indices():
    model = tiny_model("llama", layers=3)
    for bad in ([], [3], [1, 1], [0, 1, 2]):
        with pytest.raises(TransactError, match="drop"):
            remove_layers_(model, bad)
    assert shape_of(model).num_layers == 3


def test_angular_distance_by_hand():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 3.0], [-1.0, 0.0], [5.0, 0.0], [1.0, 0.0]])
    assert torch.allclose(angular_distance(a, b), torch.tensor([0.5, 1.0, 0.0, 0.25]), atol=1e-6)


def test_least_squares_map_is_the_ridge_solution():
    g = torch.Generator().manual_seed(0)
    m, t = torch.randn(200, 6, generator=g, dtype=torch.float64), torch.randn(200, 6, generator=g, dtype=torch.float64)
    amap = least_squares_map(m.T @ m, m.T @ t, damp=1e-9)
    assert torch.allclose(amap, torch.linalg.lstsq(m, t).solution, atol=1e-8)
    # the damping is relative to the mean of the Gram matrix's diagonal
    ridge = 0.5 * (m.T @ m).diagonal().mean()
    expected = torch.linalg.solve(m.T @ m + ridge * torch.eye(6, dtype=torch.float64), m.T @ t)
    assert torch.allclose(least_squares_map(m.T @ m, m.T @ t, damp=0.5), expected, atol=1e-10)


@pytest.mark.parametrize("family", ["llama", "granite", "mixtral", "qwen2_moe"])
def test_the_map_folds_into_the_mlp_output(family):
    """After folding A into layer 1's down projections, layer 1 leaves h - r m + r m A (r: the factor the MLP
    output joins the stream with, Granite's residual_multiplier), and with the block 2-3 skipped it lands
    nearer the block's output than before: the statistics fit what the layer really adds."""
    model = tiny_model(family, layers=5)
    adapter = get_adapter(model)
    scale = adapter.mlp_residual(adapter.text_config(model.config))
    assert scale == (0.6 if family == "granite" else 1.0)
    windows = _windows()
    gram, cross = map_statistics(model, windows, 2, 2, scale, progress=False)
    amap = least_squares_map(gram, cross, damp=1e-6)
    with residual_taps(model, set(), {1, 3}, mlp_of=1) as taps, torch.no_grad():
        model(windows)
        h, target, m = taps.outputs[1].double(), taps.outputs[3].double(), taps.mlp.double()
    fold_map_into_down_(adapter.mlp(adapter.layers(model)[1], model.config), amap.float())
    with skipping(model, [2, 3]), residual_taps(model, set(), {1}) as taps, torch.no_grad():
        model(windows)
        folded = taps.outputs[1].double()
    assert torch.allclose(folded, h - scale * m + scale * m @ amap, atol=1e-4)
    assert (folded - target).norm() < 0.9 * (h - target).norm()


def test_skipping_computes_what_removing_computes():
    """The loss score of a block (its layers skipped by hooks) is the calibration loss of the model without it,
    on the first loss_samples windows."""
    model = tiny_model("qwen3", layers=4)
    windows = _windows(12)
    scores = loss_scores(model, windows[:8], 2, progress=False)
    assert scores.shape == (3,)
    assert torch.equal(block_scores(model, windows, 2, DepthOptions(2), progress=False), scores)
    remove_layers_(model, [1, 2])
    assert scores[1].item() == pytest.approx(calibration_loss(model, windows[:8]), abs=1e-5)


def test_angular_scores_are_the_mean_over_tokens():
    model = tiny_model("llama", layers=3)
    windows = _windows(4, 8)
    scores = angular_scores(model, windows, 2, batch_size=3, progress=False)
    with residual_taps(model, {0, 1}, {1, 2}) as taps, torch.no_grad():
        model(windows)
        expected = [angular_distance(taps.inputs[s], taps.outputs[s + 1]).mean() for s in (0, 1)]
    assert torch.allclose(scores, torch.stack(expected), atol=1e-6)


def test_the_drop_takes_the_lowest_scoring_block_and_records_why():
    model = tiny_model("mixtral", layers=6)
    plan = drop_layers_(model, _windows(32, 32), DepthOptions(2), progress=False)
    assert len(plan.scores) == 5 and plan.dropped == [plan.scores.index(min(plan.scores)) + k for k in (0, 1)]
    assert plan.source.num_layers == 6 and shape_of(model).num_layers == 4
    comp = plan.compensation
    assert comp["into_layer"] == plan.dropped[0] - 1
    assert comp["applied"] == (comp["calibration_loss"]["with"] < comp["calibration_loss"]["without"])


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_a_per_channel_map_folds_into_gemmas_post_mlp_norm(family):
    """Gemma's MLP output passes through post_feedforward_layernorm, so the map is per channel, folded into
    that norm's gain (stored as an offset from 1): layer 1 then leaves h - c + c * d, nearer the block's output."""
    model = tiny_model(family, layers=5)
    windows = _windows()
    numerator, denominator = gain_statistics(model, windows, 2, 2, "post_feedforward_layernorm", progress=False)
    factor = per_channel_map(numerator, denominator, damp=1e-6)
    with residual_taps(model, set(), {1, 3}, mlp_of=1, module="post_feedforward_layernorm") as taps, torch.no_grad():
        model(windows)
        h, target, c = taps.outputs[1].double(), taps.outputs[3].double(), taps.mlp.double()
    fitted = fit_map(model, windows, [2, 3], 1e-6, batch_size=4, progress=False)
    assert fitted.kind == "per_channel"
    fitted.apply()
    with skipping(model, [2, 3]), residual_taps(model, set(), {1}) as taps, torch.no_grad():
        model(windows)
    folded = taps.outputs[1].double()
    assert torch.allclose(folded, h - c + c * factor, atol=1e-4)
    assert (folded - target).norm() < (h - target).norm()
    fitted.undo()
    with residual_taps(model, set(), {1}) as taps, torch.no_grad():
        model(windows)
    assert torch.equal(taps.outputs[1].double(), h)
    plan = drop_block_(model, windows, 2, DepthOptions(2), progress=False)
    assert plan.compensation["kind"] == "per_channel" and plan.compensation["into_layer"] == 1


def test_no_map_where_the_block_starts_at_layer_0():
    model = tiny_model("llama", layers=3)
    plan = drop_block_(model, _windows(), 0, DepthOptions(2), progress=False)
    assert plan.dropped == [0, 1] and not plan.map_applied and "layer 0" in plan.compensation["reason"]
    with pytest.raises(TransactError, match="overruns"):
        drop_block_(tiny_model("llama", layers=3), _windows(), 2, DepthOptions(2), progress=False)


def test_depth_options_refuse_bad_values():
    for bad in (0, -1, 1.0, 1.5, True, "2"):
        with pytest.raises(TransactError, match="layers to drop"):
            DepthOptions(bad)
    with pytest.raises(TransactError, match="block score"):
        DepthOptions(1, score="cosine")
    with pytest.raises(TransactError, match="damping"):
        DepthOptions(1, damp=0)
    with pytest.raises(TransactError, match="loss_samples"):
        DepthOptions(1, loss_samples=0)
    with pytest.raises(TransactError, match="at least one must stay"):
        drop_layers_(tiny_model("llama", layers=2), _windows(), DepthOptions(2), progress=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer, corpus):
    """A saved tiny Qwen3 of 6 layers (its map lowers the calibration loss) and its calibration text."""
    root = tmp_path_factory.mktemp("depth")
    model = tiny_model("qwen3", seed=1, layers=6)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    (root / "cal.txt").write_text("\n\n".join(corpus))
    return root


def _recipe(root, **widths) -> PruneRecipe:
    calibration = Calibration(str(root / "cal.txt"), samples=32, seq_len=32)
    return PruneRecipe(**widths, depth=DepthOptions(2, score="angular"), calibration=calibration)


@pytest.mark.parametrize("widths", [{}, {"mlp": 64, "heads": 2}, {"mlp": 64, "metric": "magnitude", "correctors": ()}],
                         ids=["depth-only", "depth-and-widths", "depth-and-data-free-widths"])
def test_prune_drops_layers_and_apply_plan_recreates_it_bit_for_bit(base, tmp_path, widths):
    result = prune.run(prune.PruneJob(str(base / "base"), str(tmp_path / "a"), _recipe(base, **widths),
                                      progress=False))
    plan = PrunePlan.load(tmp_path / "a" / "plan.json")
    assert plan.depth is not None and plan.depth.source.num_layers == 6 and plan.source.num_layers == 4
    assert plan.depth.map_applied  # the premise: the fold is part of what apply-plan must recreate
    assert result.report["before"]["layers"] == 6 and result.report["after"]["layers"] == 4
    assert json.loads((tmp_path / "a" / "config.json").read_text())["num_hidden_layers"] == 4
    assert "dropped layers" in result.summary()
    apply_plan.run(apply_plan.ApplyPlanJob(str(base / "base"), str(tmp_path / "a" / "plan.json"),
                                           str(tmp_path / "b"), progress=False))
    assert same_weights(tmp_path / "a", tmp_path / "b")


def test_cli_drop_layers_and_its_refusals(base, tmp_path, capsys):
    args = ["prune", str(base / "base"), "--calib", str(base / "cal.txt"), "--samples", "8", "--seq-len", "32",
            "--quiet"]
    for extra, message in ((["--drop-layers", "6"], "at least one must stay"),
                           (["--block-score", "angular"], "--block-score belongs to --drop-layers"),
                           (["--loss-samples", "2"], "--loss-samples belongs to --drop-layers"),
                           (["--drop-layers", "1", "--layerwise"], "not available with --layerwise")):
        assert main([*args, "--out", str(tmp_path / "x"), *extra]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        main([*args, "--out", str(tmp_path / "x"), "--drop-layers", "1.5"])
    assert "fraction in (0, 1)" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "ok"), "--drop-layers", "0.34", "--block-score", "angular",
                 "--no-depth-map"]) == 0
    plan = PrunePlan.load(tmp_path / "ok" / "plan.json")
    assert len(plan.depth.dropped) == 2 and plan.depth.score == "angular"
    assert plan.depth.compensation == {"applied": False, "reason": "not asked for"}


def test_the_layer_by_layer_step_refuses_depth(tokenizer, corpus):
    from transact.api import prune as api_prune

    model = tiny_model("llama", layers=3)
    with pytest.raises(TransactError, match="layer by layer"):
        api_prune(model, tokenizer, PruneRecipe(mlp=64, depth=DepthOptions(1)), texts=corpus, sequential=True)
    assert shape_of(model).num_layers == 3


def test_a_run_recipe_refuses_depth():
    with pytest.raises(TransactError, match=r"prune\.depth"):
        RunRecipe.from_dict({"model": "m", "out": "o", "target": {"mlp": 0.5}, "prune": {"depth": {"layers": 2}}})
