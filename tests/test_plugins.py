"""Plug-ins own their options: a metric's and a corrector's options are their own dataclasses, validated when made,
carried by the recipe (and its JSON, read back from plans written before), offered as command-line flags built
from the registries and routed to the plug-in that declares them; ``transact run`` takes a whole ``prune``
section; recovery methods are a registry like the others. The corrector matrix is generated from its registry."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file
from tiny import saved_model_and_text, tiny_model
from transformers import AutoModelForCausalLM

from transact.arch import shape_of
from transact.cli import build_parser, main
from transact.core.correct import CORRECTORS
from transact.core.correct.refit import RefitOptions
from transact.core.metrics import METRICS, LayerScores, Metric, register_metric
from transact.core.metrics.transact import TransactOptions
from transact.core.metrics.transact_residual import TransactResidualOptions
from transact.errors import TransactError
from transact.jobs import run as run_job
from transact.options import build_options, check_options, option
from transact.recipes import PruneRecipe, RunRecipe, Training
from transact.recovery import loop, memory
from transact.recovery.methods import METHODS, MicroBatch, RecoveryMethod, language_modelling, register_method


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


# ---------------------------------------------------------------- options of their own

def test_options_are_checked_when_made():
    assert RefitOptions(damp="1e-3").damp == 1e-3  # YAML reads exponents without a dot as strings
    with pytest.raises(TransactError, match=r"option 'damp' must be >= 0.0, got -1"):
        RefitOptions(damp=-1)
    with pytest.raises(TransactError, match=r"option 'alpha' must be a finite number, got inf"):
        TransactOptions(alpha=float("inf"))
    with pytest.raises(TransactError, match=r"corrector 'refit' has no option 'dampp' \(its options are damp\)"):
        build_options(RefitOptions, {"dampp": 0.1}, "corrector 'refit'")
    with pytest.raises(TransactError, match=r"metric 'flap' has no option 'alpha' \(it has no options\)"):
        PruneRecipe(heads=2, metric="flap", metric_options={"alpha": 0.5})
    with pytest.raises(TransactError, match=r"corrector 'flap_bias', which this recipe does not run"):
        PruneRecipe(heads=2, corrector_options={"flap_bias": {}})
    recipe = PruneRecipe(heads=2, metric_options={"alpha": 0.5}, corrector_options={"refit": {"damp": 0.05}})
    assert recipe.metric_options == TransactResidualOptions(alpha=0.5, mlp_score="auto")  # the default metric's
    assert recipe.options_of("refit") == RefitOptions(0.05)
    assert recipe.options_of("flap_bias") is None


def test_a_recipe_reads_back_its_json_and_the_layout_before_options_moved():
    recipe = PruneRecipe(heads=2, mlp=0.5, metric_options={"alpha": 0.5}, corrector_options={"refit": {"damp": 0.05}})
    data = recipe.to_json()
    assert data["metric_options"] == {"alpha": 0.5, "mlp_score": "auto", "head_score": "auto"}  # defaults too
    assert data["corrector_options"] == {"refit": {"damp": 0.05}}
    assert PruneRecipe.from_json(json.loads(json.dumps(data))) == recipe
    legacy = {k: v for k, v in data.items() if k not in ("metric_options", "corrector_options")}
    assert PruneRecipe.from_json(legacy | {"alpha": 0.5, "damp": 0.05, "shot": 1}) == recipe
    assert PruneRecipe.from_json(legacy | {"alpha": None, "damp": None}) == PruneRecipe(heads=2, mlp=0.5)
    old_flap = legacy | {"correctors": [], "bias_compensation": True, "alpha": None, "damp": None}
    assert PruneRecipe.from_json(old_flap).correctors == ("flap_bias",)


def test_a_plan_in_the_former_layout_applies_bit_identically(tmp_path, corpus):
    """plan.json written before the metric's alpha and the refit's damp moved into their options: apply-plan
    reads it as the same recipe and recreates the same weights."""
    base, calib = saved_model_and_text(tmp_path, "llama", corpus)
    args = ["--heads", "2", "--kv-heads", "1", "--mlp", "48", "--calib", str(calib), "--samples", "6",
            "--seq-len", "48", "--alpha", "0.4", "--damp", "0.05", "--quiet"]
    assert main(["prune", str(base), "--out", str(tmp_path / "new"), *args]) == 0
    plan = json.loads((tmp_path / "new" / "plan.json").read_text())
    recipe = plan["recipe"]
    recipe["alpha"] = recipe.pop("metric_options")["alpha"]
    recipe["damp"] = recipe.pop("corrector_options")["refit"]["damp"]
    (tmp_path / "old.json").write_text(json.dumps(plan))
    assert main(["apply-plan", str(base), str(tmp_path / "old.json"), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    a, b = _weights(tmp_path / "new"), _weights(tmp_path / "again")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- the command line, from the registries

def _prune_parser():
    return build_parser()._subparsers._group_actions[0].choices["prune"]


def test_every_option_of_every_plug_in_is_a_flag():
    from transact.options import specs

    flags = {a.dest: a for a in _prune_parser()._actions}
    for owners in (METRICS, CORRECTORS):
        for name, plugin in owners.items():
            for spec in specs(plugin.options):
                action = flags[f"option_{spec.name}"]
                assert spec.flag in action.option_strings and name in action.help
    assert {a.option_strings[0] for a in flags.values() if a.dest.startswith("corrector_")} == \
        {f"--{c.flag}" for _, c in CORRECTORS.items() if c.flag}


@dataclass(frozen=True)
class PowerOptions:
    power: float = option(2.0, "the exponent of each weight's magnitude", low=0.0)

    def __post_init__(self) -> None:
        check_options(self)


@pytest.fixture
def power_metric():
    """A metric with an option, registered for one test."""
    def scores(model, stats, shape, recipe):
        from transact.arch import get_adapter

        heads, mlp = [], []
        for attn, ffn in get_adapter(model).layer_parts(model):
            o = attn.o.weight.detach().abs() ** recipe.metric_options.power  # (hidden, heads * head_dim)
            heads.append(o.sum(0).view(-1, shape.head_dim).sum(1))
            mlp.append((ffn.down.weight.detach().abs() ** recipe.metric_options.power).sum(0))
        return LayerScores(heads, mlp)

    metric = register_metric(Metric("toy_power", "sum of |o/down column|^power (data-free)", scores,
                                     options=PowerOptions))
    yield metric
    METRICS._items.pop("toy_power")


def test_a_metric_with_an_option_gets_its_flag_and_recipe_key(tmp_path, corpus, power_metric):
    base, _ = saved_model_and_text(tmp_path, "qwen3", corpus)
    parser_flags = {a.dest for a in _prune_parser()._actions}
    assert "option_power" in parser_flags
    common = ["--heads", "2", "--mlp", "48", "--metric", "toy_power", "--no-reconstruct", "--quiet"]
    assert main(["prune", str(base), "--out", str(tmp_path / "p3"), *common, "--power", "3"]) == 0
    plan = json.loads((tmp_path / "p3" / "plan.json").read_text())
    assert plan["recipe"]["metric_options"] == {"power": 3.0}
    assert PruneRecipe.from_json(plan["recipe"]).metric_options == PowerOptions(3.0)
    with pytest.raises(TransactError, match=r"metric 'toy_power': option 'power' must be >= 0.0"):
        PruneRecipe(heads=2, metric="toy_power", metric_options={"power": -1})


def test_an_option_no_chosen_plug_in_takes_is_refused(tmp_path, corpus, capsys):
    base, calib = saved_model_and_text(tmp_path, "llama", corpus)
    common = ["prune", str(base), "--out", str(tmp_path / "x"), "--heads", "2", "--calib", str(calib), "--quiet"]
    assert main([*common, "--metric", "flap", "--alpha", "0.3"]) == 2
    assert ("--alpha is an option of metric 'transact_residual' and metric 'transact'; this prune uses metric "
            "'flap'") in capsys.readouterr().err
    assert main([*common, "--no-reconstruct", "--damp", "0.1"]) == 2
    assert "--damp is an option of corrector 'refit'" in capsys.readouterr().err
    assert main([*common, "--no-reconstruct", "--correct", "refit"]) == 2
    assert "contradict" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("corrector", CORRECTORS.names())
def test_every_corrector_is_recorded_and_recreated_bit_identically(tmp_path, corpus, corrector):
    """The corrector matrix, from the registry: each runs, is recorded in plan.json, and apply-plan recreates
    its weights bit for bit (on Llama, which can carry every corrector's result)."""
    base, calib = saved_model_and_text(tmp_path, "llama", corpus)
    args = ["--heads", "2", "--kv-heads", "1", "--mlp", "48", "--calib", str(calib), "--samples", "6",
            "--seq-len", "48", "--correct", corrector, "--quiet"]
    assert main(["prune", str(base), "--out", str(tmp_path / "out"), *args]) == 0
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert [c["name"] for c in plan["corrections"]] == [corrector]
    assert main(["apply-plan", str(base), str(tmp_path / "out" / "plan.json"), "--out", str(tmp_path / "again"),
                 "--quiet"]) == 0
    a, b = _weights(tmp_path / "out"), _weights(tmp_path / "again")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- transact run's prune section

def _run_recipe(root, out: str, **extra) -> dict:
    return {"model": str(root / "model"), "out": str(root / out), "device": "cpu",
            "target": {"heads": 2, "kv_heads": 1, "mlp": 48}, "shots": 1,
            "prune": {"calibration": {"text": str(root / "train.txt"), "samples": 8, "seq_len": 64}},
            "training": {"data": str(root / "train.txt"), "tokens_per_shot": 1024, "final_tokens": 0, "seq_len": 64,
                         "batch_size": 4, "lr": 1e-3},
            "heldout": {"text": str(root / "train.txt"), "tokens": 512, "window": 256}, **extra}


def test_the_prune_section_and_the_keys_it_replaces(workdir):
    data = _run_recipe(workdir, "x")
    section = RunRecipe.from_dict(data | {"prune": data["prune"] | {"correctors": ["flap_bias"], "metric": "flap"}})
    assert section.prune_recipe(section.target).correctors == ("flap_bias",)
    assert section.prune.metric == "flap" and not section.prune.has_widths
    legacy = {k: v for k, v in data.items() if k != "prune"} | {
        "calibration": {**data["prune"]["calibration"], "seed": 3}, "metric": "transact", "alpha": 0.2,
        "damp": 0.05}
    new = data | {"prune": data["prune"] | {"seed": 3, "metric": "transact", "metric_options": {"alpha": 0.2},
                                            "corrector_options": {"refit": {"damp": 0.05}}}}
    assert RunRecipe.from_dict(legacy) == RunRecipe.from_dict(new)
    assert RunRecipe.from_dict(RunRecipe.from_dict(legacy).to_json()) == RunRecipe.from_dict(new)
    assert RunRecipe.from_dict(legacy | {"reconstruct": False, "damp": None}).prune.correctors == ()
    cases = [({"prune": {"corrector_options": {"refit": {"dampp": 1}}}}, r"'prune'.*corrector 'refit' has no option "
              r"'dampp'"),
             ({"prune": {"correctors": ["refitt"]}}, r"'prune'.*corrector 'refitt' is unknown"),
             ({"prune": {"heads": 2}}, r"'prune.heads'.*target or schedule"),
             ({"prune": {"colour": 1}}, r"'prune.colour'.*unknown key"),
             ({"metric": "flap", "prune": {"metric": "flap"}}, r"'prune.metric'.*give it once"),
             ({"prune": {"calibration": {"sample": 3}}}, r"'prune.calibration.sample'")]
    for extra, message in cases:
        with pytest.raises(TransactError, match=message):
            RunRecipe.from_dict(data | extra)


def test_a_run_refuses_an_unknown_corrector_option_before_loading(workdir, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(run_job, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(_run_recipe(workdir, "never")))  # JSON is YAML
    assert main(["run", str(path), "prune.corrector_options.refit.lambda=0.1"]) == 2
    assert "corrector 'refit' has no option 'lambda' (its options are damp)" in capsys.readouterr().err
    assert not (workdir / "never").exists()


def test_transact_run_with_flap_bias_on_llama(workdir):
    """A corrector other than the refit in transact run: FLAP's metric and bias compensation on a Llama model
    (whose config can carry o_proj/down_proj biases); the checkpoint loads in vanilla transformers."""
    data = _run_recipe(workdir, "flap")
    data["prune"] |= {"metric": "flap", "correctors": ["flap_bias"]}
    result = loop.run(RunRecipe.from_dict(data), progress=False)
    plans = json.loads((result.out / "plans.json").read_text())["shots"]
    assert plans[0]["corrections"] == [{"name": "flap_bias"}] and plans[0]["recipe"]["metric"] == "flap"
    model = AutoModelForCausalLM.from_pretrained(result.out)
    assert model.config.attention_bias and model.model.layers[0].self_attn.o_proj.bias is not None
    assert result.report["phases"][0]["perplexity"] < result.report["phases"][0]["perplexity_pruned"]


# ---------------------------------------------------------------- recovery methods are a registry

@dataclass(frozen=True)
class ScaledSettings:
    scale: float = 1.0


@pytest.fixture
def scaled_method():
    def scaled(batch: MicroBatch) -> torch.Tensor:
        return batch.training.settings_of("scaled").scale * language_modelling(batch)

    method = register_method(RecoveryMethod("scaled", "the next-token loss times training.scaled.scale",
                                            settings=ScaledSettings, loss=scaled))
    yield method
    METHODS._items.pop("scaled")


def test_a_recovery_method_is_one_registered_object(workdir, scaled_method):
    """A method registered at run time: its settings are read under its name, its loss trains (a zero scale
    leaves the pruned weights as they were: AdamW's step on a zero gradient is zero), its memory is the
    default's."""
    training = Training.from_dict({"method": "scaled", "scaled": {"scale": 0.0}})
    assert training.settings_of("scaled") == ScaledSettings(0.0) and training.to_json()["scaled"] == {"scale": 0.0}
    with pytest.raises(TransactError, match=r"'training.scaled.factor'"):
        Training.from_dict({"method": "scaled", "scaled": {"factor": 1}})
    with pytest.raises(TransactError, match=r"'training.method'.*full, kd, lora, scaled"):
        Training(method="sgd")
    estimate = memory.estimate(shape_of(tiny_model("llama")), 1000, training)
    assert estimate.parts["gradients"] == 4 * 1000 and estimate.parts["teacher"] == 0
    frozen = loop.run(RunRecipe.from_dict(_run_recipe(workdir, "scaled") | {
        "training": _run_recipe(workdir, "x")["training"] | {"method": "scaled", "scaled": {"scale": 0.0}}}),
        progress=False)
    untrained = loop.run(RunRecipe.from_dict(_run_recipe(workdir, "untrained") | {
        "training": _run_recipe(workdir, "x")["training"] | {"tokens_per_shot": 0}}), progress=False)
    a, b = _weights(frozen.out), _weights(untrained.out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert frozen.report["phases"][0]["train_steps"] == 4
