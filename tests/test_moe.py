"""Mixtures of experts (Qwen3-MoE, Mixtral, Qwen2-MoE, Qwen3.5-MoE): per-expert statistics, expert channels,
shared experts and whole experts pruned exactly, refusals before any work, and the command line."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from tiny import VOCAB, char_tokenizer, random_plan, tiny_config, tiny_model, two_shot_run
from transformers import AutoConfig

from transact.api import PruneJob, model_info, run_prune
from transact.arch import ExpertParts, get_adapter, shape_of
from transact.cli import main
from transact.core.calibrate import collect_statistics, record_transitional_stats
from transact.core.plan import PrunePlan
from transact.core.step import prune_step
from transact.core.surgery import prune_
from transact.core.targets import resolve_targets
from transact.errors import TransactError
from transact.io.models import skeleton, split_tensors
from transact.recipes import PruneRecipe, RunRecipe
from transact.recipes.text import Calibration
from transact.recovery import loop

MOE = ("qwen3_moe", "mixtral", "qwen2_moe", "qwen3_5_moe_text")


def _blocks(model) -> list[ExpertParts]:
    adapter = get_adapter(model)
    return [adapter.mlp(layer, model.config) for layer in adapter.layers(model)]


def _by_hand(block: ExpertParts, hidden: torch.Tensor, normalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert sum of squares of the router-weighted down-projection inputs, and tokens routed to each
    expert, of one block computed from its weights: hidden (tokens, H) -> ((E, I), (E,))."""
    probs = F.softmax(hidden @ block.router.weight.T, dim=-1)
    top, chosen = probs.topk(block.top_k, dim=-1)
    if normalise:
        top = top / top.sum(-1, keepdim=True)
    width = block.intermediate_size
    sum_sq, routed = torch.zeros(block.num_experts, width), torch.zeros(block.num_experts)
    for e in range(block.num_experts):
        tokens, slot = torch.where(chosen == e)
        gate_up = hidden[tokens] @ block.gate_up[e].T
        x = F.silu(gate_up[:, :width]) * gate_up[:, width:]
        sum_sq[e] = (x * top[tokens, slot, None]).square().sum(0)
        routed[e] = len(tokens)
    return sum_sq, routed


@pytest.mark.parametrize("family", MOE)
def test_expert_statistics_equal_a_hand_computation(family):
    model = tiny_model(family, layers=1)
    block = _blocks(model)[0]
    hidden = torch.randn(1, 40, 64, generator=torch.Generator().manual_seed(1))
    mlp = get_adapter(model).mlp_module(get_adapter(model).layers(model)[0])
    with record_transitional_stats(model, ("sum_sq",)) as stats, torch.no_grad():
        out = mlp(hidden)
    # Mixtral and Qwen3.5-MoE always renormalise the top-k weights; Qwen2/3-MoE as their config says
    sum_sq, routed = _by_hand(block, hidden[0], normalise=getattr(model.config, "norm_topk_prob", True))
    torch.testing.assert_close(stats.mlp["sum_sq"][0], sum_sq, rtol=1e-5, atol=1e-6)
    assert torch.equal(stats.experts["tokens"][0], routed) and routed.sum() == 40 * block.top_k
    assert model.config._experts_implementation != "transact_record"  # the implementation is restored
    with torch.no_grad():
        torch.testing.assert_close(mlp(hidden), out, rtol=0, atol=1e-6)  # recording changed nothing computed
    with record_transitional_stats(model, ("sum_sq",), gate_weighted=False) as raw, torch.no_grad():
        mlp(hidden)
    assert (raw.mlp["sum_sq"][0] > stats.mlp["sum_sq"][0]).all()  # weights below one shrink every channel


def _silence_channels(model, channels_of) -> None:
    """Zero the up rows of channels ``channels_of(expert)`` in every expert, and of ``channels_of(0)`` in the
    shared expert where there is one: their down input is zero."""
    with torch.no_grad():
        for block in _blocks(model):
            for e in range(block.num_experts):
                block.gate_up[e, block.intermediate_size + torch.tensor(channels_of(e))] = 0
            if block.shared is not None:
                block.shared.up.weight[channels_of(0)] = 0


@pytest.mark.parametrize("family", MOE)
def test_channels_each_expert_does_not_use_are_pruned_exactly(family):
    model = tiny_model(family)
    # each expert silences a different half of its 96 channels
    _silence_channels(model, lambda e: [c for c in range(96) if (c // 8 + e) % 2])
    x = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
    dense = model(x).logits
    recipe = PruneRecipe(mlp=48, calibration=Calibration(samples=4, seq_len=24))
    stats = collect_statistics(model, x, recipe.statistics, progress=False)
    plan = prune_step(model, None, recipe, statistics=stats)
    for kept in plan.layers:
        assert kept.experts == [0, 1, 2, 3]
        assert kept.expert_mlp == [[c for c in range(96) if not (c // 8 + e) % 2] for e in range(4)]
        assert kept.mlp == ([c for c in range(96) if not (c // 8) % 2] if _blocks(model)[0].shared else [])
    torch.testing.assert_close(model(x).logits, dense, rtol=0, atol=2e-5)
    assert shape_of(model).intermediate_size == 48 and model.model.layers[0].mlp.experts.down_proj.shape == (4, 64, 48)


def _never_routed(model, expert: int) -> None:
    """Make ``expert`` lose every routing decision: hidden dimension 0 holds a positive constant through the
    whole model (its embedding column, and nothing writes to it), and the expert's router row is a large
    negative multiple of that dimension, so its softmax weight underflows to zero for every token."""
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 3.0
        for layer, block in zip(get_adapter(model).layers(model), _blocks(model), strict=True):
            for name, linear in layer.named_modules():  # everything that writes to the residual stream
                if name.endswith(("o_proj", "out_proj", "down_proj")) and isinstance(linear, torch.nn.Linear):
                    linear.weight[0] = 0
            block.down[:, 0] = 0
            block.router.weight[:, 0] = 0
            block.router.weight[expert] = 0
            block.router.weight[expert, 0] = -1e4


@pytest.mark.parametrize("family", MOE)
def test_an_expert_the_router_never_picks_is_the_one_dropped_with_logits_unchanged(tmp_path, family):
    model = tiny_model(family)
    _never_routed(model, 2)
    x = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
    dense = model(x).logits
    recipe = PruneRecipe(experts=3, calibration=Calibration(samples=4, seq_len=24))
    stats = collect_statistics(model, x, recipe.statistics, progress=False)
    assert all(t[2] == 0 and t.sum() == 4 * 24 * 2 for t in stats.activations.experts["tokens"])
    plan = prune_step(model, None, recipe, statistics=stats)
    assert [kept.experts for kept in plan.layers] == [[0, 1, 3]] * 2
    assert plan.dropped_expert_routes == [0.0, 0.0]
    torch.testing.assert_close(model(x).logits, dense, rtol=0, atol=2e-5)
    # the plan survives JSON and reads back the same
    plan.save(tmp_path / "plan.json")
    assert PrunePlan.load(tmp_path / "plan.json") == plan


@pytest.mark.parametrize("family", MOE)
def test_expert_files_are_what_transformers_writes(family):
    """The per-expert names a layer-wise prune reads and writes are save_pretrained's own."""
    adapter = get_adapter(tiny_config(family))
    stored = {name.split(".", 3)[3] for name in split_tensors(skeleton(tiny_config(family))) if ".layers.0." in name}
    assert stored == {name.format(e=e) for name in adapter.mlp_layout.files for e in range(4)}


def test_an_iterative_schedule_keeps_expert_widths_whole_multiples():
    from transact.core.targets import Targets
    from transact.recovery.schedule import linear_schedule

    shape = shape_of(tiny_config("qwen3_moe"))
    steps = linear_schedule(shape, Targets(4, 2, 40, 2), 3)
    assert [(t.mlp, t.experts) for t in steps] == [(80, 3), (56, 3), (40, 2)]  # 77.3 and 58.7 to multiples of 8


def test_refusals_before_any_work(tmp_path):
    shape = shape_of(tiny_config("qwen3_moe"))
    with pytest.raises(TransactError, match="experts 1: must be between the 2 experts each token is routed to"):
        resolve_targets(PruneRecipe(experts=1), shape)
    with pytest.raises(TransactError, match=r"channels per expert 50: must be a multiple of 8 .* nearest: 48, 56"):
        resolve_targets(PruneRecipe(mlp=50), shape)
    assert resolve_targets(PruneRecipe(mlp=0.5, experts=0.75), shape).describe() == "4/2/48, 3 experts"
    with pytest.raises(TransactError, match="this model has no experts"):
        resolve_targets(PruneRecipe(experts=2), shape_of(tiny_config("qwen3")))
    with pytest.raises(TransactError, match=r"'gpt_oss' is not supported; gpt-oss interleaves .* sinks"):
        get_adapter(AutoConfig.for_model("gpt_oss"))
    with pytest.raises(TransactError, match="layers \\[0\\] of this model have a dense MLP"):
        shape_of(tiny_config("qwen3_moe", mlp_only_layers=[0]))
    base = tmp_path / "base"
    tiny_model("qwen3_moe").save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    for recipe, message in ((PruneRecipe(mlp=48, metric="flap"), "metric 'flap' does not score experts"),
                            (PruneRecipe(mlp=48, correctors=("flap_bias",)), "cannot carry o_proj/down_proj biases")):
        with pytest.raises(TransactError, match=message):
            run_prune(PruneJob(model=str(base), out=str(tmp_path / "out"), recipe=recipe, progress=False))
        assert not (tmp_path / "out").exists()
    run = RunRecipe.from_dict({"model": str(base), "out": str(tmp_path / "run"), "target": {"experts": 3},
                               "metric": "taylor"})
    with pytest.raises(TransactError, match="metric 'taylor' does not score experts"):
        loop.run(run, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("family", MOE)
def test_cli_prunes_experts_and_channels_into_a_vanilla_checkpoint(tmp_path, capsys, corpus, family):
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    tiny_model(family).save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(corpus))
    assert main(["info", str(base)]) == 0
    info = capsys.readouterr().out
    assert "experts           4 per layer of 96 channels each, 2 active per token" in info, info
    assert "prunable experts  2..4" in info and "prunable mlp      8..96 per expert, in multiples of 8" in info
    assert model_info(str(base))["active_params"] < model_info(str(base))["params"]
    out = tmp_path / "out"
    assert main(["prune", str(base), "--out", str(out), "--experts", "3", "--mlp", "0.5", "--heads", "2",
                 "--kv-heads", "1", "--calib", str(calib), "--samples", "4", "--seq-len", "32", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "experts" in printed and "dropped experts   took" in printed
    shape = shape_of(AutoConfig.from_pretrained(out))
    assert (shape.num_experts, shape.intermediate_size, shape.num_heads, shape.num_kv_heads) == (3, 48, 2, 1)
    assert shape.shared_expert_size == (48 if family in ("qwen2_moe", "qwen3_5_moe_text") else None)
    plan = json.loads((out / "plan.json").read_text())
    shared = {"shared_mlp": 48} if shape.shared_expert_size else {}
    assert plan["targets"] == {"heads": 2, "kv_heads": 1, "mlp": 48, "experts": 3, **shared}
    assert len(plan["dropped_expert_routes"]) == 2 and all(0 <= s < 1 for s in plan["dropped_expert_routes"])
    layerwise = tmp_path / "layerwise"  # the same prune one layer at a time: the same plan and weights
    assert main(["prune", str(base), "--out", str(layerwise), "--experts", "3", "--mlp", "0.5", "--heads", "2",
                 "--kv-heads", "1", "--calib", str(calib), "--samples", "4", "--seq-len", "32", "--quiet",
                 "--layerwise", "--no-sequential"]) == 0
    assert json.loads((layerwise / "plan.json").read_text())["layers"] == plan["layers"]
    assert json.loads((layerwise / "plan.json").read_text())["dropped_expert_routes"] == plan["dropped_expert_routes"]
    report = json.loads((out / "report.json").read_text())
    assert report["after"]["experts"] == 3 and report["after"]["active_params"] < report["before"]["active_params"]
    reloaded = AutoModelForCausalLM.from_pretrained(out)  # vanilla, the default experts implementation
    x = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    assert reloaded(x).logits.isfinite().all()


def test_qwen2_moe_exports_to_llamacpp_with_its_heads_kept_and_refuses_pruned_heads(tmp_path, smollm2_dir):
    from transformers import AutoTokenizer

    from transact.deploy.gguf import GgufExportJob, run_gguf_export
    from transact.io.checkpoint import write_checkpoint

    model = tiny_model("qwen2_moe", vocab_size=49152)
    plan = random_plan(model, 4, 2, 64)  # 3 of 4 experts, 64 of 96 channels, every head
    prune_(model, plan)
    write_checkpoint(model, AutoTokenizer.from_pretrained(smollm2_dir), tmp_path / "m", plan=plan, report={},
                     save_dtype=torch.float32)
    result = run_gguf_export(GgufExportJob(str(tmp_path / "m"), str(tmp_path / "m.gguf"), "f32", new_tokens=8,
                                           progress=False))
    check = result["verification"]
    assert check["ok"] and check["agree"] >= 30 and check["max_logprob_diff"] < 0.01
    prune_(model, random_plan(model, 2, 1, 64, experts=3))
    with pytest.raises(TransactError, match="qwen2moe architecture sizes q_proj as hidden x hidden"):
        get_adapter(model).gguf_target(model.config)


def test_transact_run_prunes_experts_over_two_shots_and_trains_them(tmp_path, corpus):
    """``transact run`` on a mixture of experts: two shots towards 2 of 4 experts with 48 of 96 channels,
    each followed by full fine-tuning (the fused expert weights train like any other), into a vanilla
    checkpoint whose plan maps back to the dense model's experts."""
    from transformers import AutoModelForCausalLM

    dense = tiny_model("qwen3_moe")
    result = two_shot_run(tmp_path, dense, corpus, {"mlp": 48, "experts": 2}, "full", 1e-3)
    report = json.loads((result.out / "report.json").read_text())
    assert [p["widths"] for p in report["phases"]] == [[4, 2, 72, 3], [4, 2, 48, 2]]
    pruned = AutoModelForCausalLM.from_pretrained(result.out)
    assert shape_of(pruned).num_experts == 2 and shape_of(pruned).intermediate_size == 48
    plan = json.loads((result.out / "plan.json").read_text())
    kept, channels = plan["layers"][0]["experts"], plan["layers"][0]["expert_mlp"]
    original = dense.model.layers[0].mlp.experts.down_proj[kept[0]][:, channels[0]]
    trained = pruned.model.layers[0].mlp.experts.down_proj[0]
    assert trained.shape == original.shape and not torch.equal(trained, original)  # trained
