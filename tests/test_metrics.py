"""The comparison metrics (FLAP, Minitron, LLM-Pruner's Taylor) on hand-computed toy statistics, their
statistics against a slow capture, and each metric end to end on a tiny model."""

import json

import pytest
import torch
from tiny import VOCAB, char_tokenizer, saved_model_and_text, tiny_model
from transformers import AutoModelForCausalLM

from transact.arch import get_adapter
from transact.cli import main
from transact.core import salience
from transact.core.calibrate import calibrate, weight_x_grad
from transact.core.metrics import metric_names
from transact.errors import TransactError
from transact.recipes import Calibration, PruneRecipe


def test_channel_variance_by_hand():
    # channel 0 saw (1, 3): mean 2, variance 1; channel 1 saw (2, 2): variance 0.
    var = salience.channel_variance(torch.tensor([4.0, 4.0]), torch.tensor([10.0, 8.0]), count=2)
    assert var.tolist() == [1.0, 0.0]


def test_flap_by_hand():
    var = torch.tensor([1.0, 4.0, 0.5, 2.0])
    weight = torch.tensor([[1.0, 0.0, 2.0, 1.0], [1.0, 1.0, 0.0, 1.0]])  # column norms^2: 2, 1, 4, 2
    ch = salience.flap_channel_scores(var, weight)
    assert ch.tolist() == [2.0, 4.0, 2.0, 4.0]
    assert salience.sum_per_head(ch, head_dim=2).tolist() == [6.0, 6.0]


def test_minitron_by_hand():
    # two samples with per-sample mean |x| of (3, 0) and (4, 1) for channels 0 and 1
    abs_mean_sq = torch.tensor([9.0 + 16.0, 0.0 + 1.0])
    ch = salience.minitron_channel_scores(abs_mean_sq)
    assert ch.tolist() == [5.0, 1.0]
    assert salience.minitron_head_scores(torch.tensor([3.0, 4.0, 1.0, 0.0]), 2).tolist() == [5.0, 1.0]


def test_taylor_by_hand():
    # 2 query heads of head_dim 1 sharing 1 KV head; hidden 2. Entries are |w * grad|.
    q = torch.tensor([[1.0, 1.0], [0.0, 3.0]])  # head 0 rows sum 2, head 1: 3
    o = torch.tensor([[1.0, 0.0], [1.0, 2.0]])  # columns: head 0: 2, head 1: 2
    k = torch.tensor([[1.0, 1.0]])  # shared: 2
    v = torch.tensor([[0.5, 1.5]])  # shared: 2 -> 4 split over 2 heads = 2 each
    assert salience.taylor_head_scores(q, k, v, o, head_dim=1, num_kv_heads=1).tolist() == [6.0, 7.0]
    gate = torch.tensor([[1.0], [2.0]])
    up = torch.tensor([[0.0], [1.0]])
    down = torch.tensor([[3.0, 0.0]])
    assert salience.taylor_channel_scores(gate, up, down).tolist() == [4.0, 3.0]


def test_extra_statistics_match_a_slow_capture():
    model = tiny_model("qwen2")
    windows = torch.randint(0, VOCAB, (5, 12), generator=torch.Generator().manual_seed(0))
    down = get_adapter(model).mlp(get_adapter(model).layers(model)[1], model.config).down
    seen = []
    handle = down.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    stats = calibrate(model, windows, batch_size=2, progress=False, statistics=("sum_sq", "sum", "abs_mean_sq"))
    handle.remove()
    x = torch.cat(seen)  # (5, 12, 96)
    assert stats.samples == 5 and stats.tokens == 60
    torch.testing.assert_close(stats.mlp["sum"][1], x.sum(dim=(0, 1)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.mlp["abs_mean_sq"][1], x.abs().mean(dim=1).square().sum(0), rtol=1e-5, atol=1e-6)
    plain = calibrate(model, windows, progress=False)
    assert set(plain.mlp) == set(plain.attn) == {"sum_sq"}


def test_weight_x_grad_equals_autograd_by_hand_and_restores_the_model():
    model = tiny_model("llama")
    before = {n: p.clone() for n, p in model.named_parameters()}
    windows = torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(1))
    sal = weight_x_grad(model, windows, batch_size=2, progress=False)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())

    reference = tiny_model("llama")
    loss = sum(reference(input_ids=windows[i:i + 2], labels=windows[i:i + 2]).loss for i in (0, 2)) / 2
    loss.backward()
    q_ref = reference.model.layers[1].self_attn.q_proj
    assert len(sal) == 2 and set(sal[1]) == {"q", "k", "v", "o", "gate", "up", "down"}
    torch.testing.assert_close(sal[1]["q"], (q_ref.weight * q_ref.weight.grad).abs().detach(), rtol=1e-4, atol=1e-7)


def test_alpha_belongs_to_transact_only():
    with pytest.raises(TransactError, match="alpha"):
        PruneRecipe(heads=2, metric="flap", metric_options={"alpha": 0.5})


@pytest.mark.parametrize("metric", metric_names())
def test_each_metric_end_to_end(tmp_path, corpus, metric):
    base, calib = saved_model_and_text(tmp_path, "qwen3", corpus)
    out = tmp_path / "out"
    assert main(["prune", str(base), "--out", str(out), "--heads", "2", "--mlp", "48", "--metric", metric,
                 "--calib", str(calib), "--samples", "6", "--seq-len", "48", "--quiet"]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["recipe"]["metric"] == metric and plan["calibration_hash"].startswith("sha256:")
    assert plan["targets"] == {"heads": 2, "kv_heads": 1, "mlp": 48}
    assert AutoModelForCausalLM.from_pretrained(out).config.intermediate_size == 48


# ---------------------------------------------------------------- FLAP's bias compensation

def test_compensation_bias_by_hand():
    weight = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, -1.0]])
    mean = torch.tensor([0.5, 2.0, 1.0])
    # keep channel 1: removed 0 and 2 contribute [1*0.5 + 3*1, 0*0.5 - 1*1] = [3.5, -1]
    assert salience.compensation_bias(weight, mean, torch.tensor([1])).tolist() == [3.5, -1.0]
    assert salience.compensation_bias(weight, mean, torch.tensor([0, 1, 2])).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("metric", ["flap", "transact"])
def test_compensation_keeps_the_mean_output_of_o_proj(corpus, metric):
    """Layer 0 sees the same input before and after pruning, so the mean over the calibration tokens of
    its o_proj output must be unchanged once the removed heads' mean contribution is added back. The
    corrector is independent of the metric that chose the heads."""
    from transact.api import prune
    from transact.core.calibrate import sample_windows

    tok = char_tokenizer()
    windows = sample_windows(tok, corpus, 6, 48, 0)
    model = tiny_model("llama", heads=4, kv_heads=2)

    def mean_o_output(m):
        outputs = []
        o = get_adapter(m).attention(get_adapter(m).layers(m)[0], m.config).o
        handle = o.register_forward_hook(lambda mod, args, out: outputs.append(out.detach()))
        with torch.no_grad():
            m(input_ids=windows)
        handle.remove()
        return outputs[0].double().mean(dim=(0, 1))

    before = mean_o_output(model)
    cal = Calibration(samples=6, seq_len=48)
    recipe = PruneRecipe(heads=2, kv_heads=1, mlp=48, metric=metric, correctors=("flap_bias",), calibration=cal)
    plan = prune(model, tok, recipe, texts=corpus, progress=False)
    after = mean_o_output(model)
    assert model.config.attention_bias and model.config.mlp_bias
    assert plan.corrections == [{"name": "flap_bias"}]
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    without = tiny_model("llama", heads=4, kv_heads=2)
    prune(without, tok, PruneRecipe(heads=2, kv_heads=1, mlp=48, metric=metric, calibration=cal), texts=corpus,
          progress=False)
    assert (mean_o_output(without) - before).abs().max() > 1e-2  # the test would notice a missing bias


@pytest.mark.parametrize("family", ["llama", "granite"])
def test_flap_bias_checkpoint_round_trips_and_apply_plan_recreates_it(tmp_path, corpus, capsys, family):
    base, calib = saved_model_and_text(tmp_path, family, corpus)
    out = tmp_path / "out"
    args = ["--heads", "2", "--kv-heads", "1", "--mlp", "48", "--metric", "flap", "--correct", "flap_bias",
            "--calib", str(calib), "--samples", "6", "--seq-len", "48", "--quiet"]
    assert main(["prune", str(base), "--out", str(out), *args]) == 0  # includes the vanilla reload check
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    layer = reloaded.model.layers[0]
    assert reloaded.config.attention_bias and reloaded.config.mlp_bias
    assert layer.self_attn.o_proj.bias.abs().sum() > 0 and layer.mlp.down_proj.bias.abs().sum() > 0
    assert layer.self_attn.q_proj.bias.abs().sum() == 0  # zero: only implied by the config flag
    plan = json.loads((out / "plan.json").read_text())
    assert plan["corrections"] == [{"name": "flap_bias"}] and plan["recipe"]["correctors"] == ["flap_bias"]
    # apply-plan recomputes the biases from the same calibration windows: the same checkpoint, bit for bit
    assert main(["apply-plan", str(base), str(out / "plan.json"), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    same = AutoModelForCausalLM.from_pretrained(tmp_path / "again").state_dict()
    assert all(torch.equal(p, same[n]) for n, p in reloaded.state_dict().items())
    legacy = plan | {"corrections": None}  # a plan written before correctors had their own record
    del legacy["corrections"]
    legacy["recipe"] = {k: v for k, v in plan["recipe"].items() if k != "correctors"} | {"bias_compensation": True}
    (tmp_path / "legacy.json").write_text(json.dumps(legacy))
    assert main(["apply-plan", str(base), str(tmp_path / "legacy.json"), "--out", str(tmp_path / "legacy"),
                 "--quiet"]) == 0
    legacy_model = AutoModelForCausalLM.from_pretrained(tmp_path / "legacy").state_dict()
    assert all(torch.equal(p, legacy_model[n]) for n, p in reloaded.state_dict().items())


@pytest.mark.parametrize("family, heads, kv, message", [
    ("qwen2", 2, 1, "vanilla 'qwen2' checkpoint cannot carry"),
    ("mistral", 2, 1, "vanilla 'mistral' checkpoint cannot carry"),
    ("qwen3", 2, 1, "vanilla 'qwen3' checkpoint cannot carry"),
    ("llama", 3, 3, "3 heads do not divide hidden_size 64"),
    ("gemma2", 2, 1, "vanilla 'gemma2' checkpoint cannot carry"),
    ("gemma3_text", 2, 1, "vanilla 'gemma3_text' checkpoint cannot carry"),
    ("smollm3", 2, 1, "vanilla 'smollm3' checkpoint cannot carry"),
])
def test_flap_bias_is_refused_before_loading_where_a_checkpoint_cannot_hold_it(tmp_path, corpus, capsys,
                                                                               family, heads, kv, message):
    base = tmp_path / "base"
    extra = {"kv_heads": 4} if kv == 3 else {}
    tiny_model(family, heads=4, **({"kv_heads": 2} | extra)).save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    out = tmp_path / "out"
    assert main(["prune", str(base), "--out", str(out), "--heads", str(heads), "--kv-heads", str(kv),
                 "--metric", "flap", "--flap-bias", "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(TransactError, match="corrector 'flap_bais' is unknown; choose one of flap_bias"):
        PruneRecipe(heads=2, correctors=("flap_bais",))
