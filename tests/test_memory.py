"""The memory planner of ``transact run``: its arithmetic, LoRA's parameter count against peft's, the refusal
before any weights load, and the estimate against measured peaks."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny import char_tokenizer, tiny_config, tiny_model

from transact.arch import shape_of
from transact.errors import TransactError
from transact.jobs import run as run_job
from transact.measure.costs import RUNTIME_OVERHEAD_BYTES, count_parameters
from transact.recipes import RunRecipe
from transact.recipes.run import Training
from transact.recovery import loop, memory


def test_estimate_by_hand():
    shape = shape_of(tiny_config("llama", heads=4, kv_heads=2, head_dim=16, hidden=64, mlp=96, layers=2))
    training = Training(batch_size=2, seq_len=32)
    got = memory.estimate(shape, 1000, training).parts
    tokens, per_token = 64, 8 * 64 + 3 * (64 + 2 * 32) + 4 * 96 + 2 * 4 * 32
    assert got == {"weights": 4000, "gradients": 4000, "optimizer": 8000, "teacher": 0,
                   "activations": 2 * tokens * per_token * 4, "logits": 3 * tokens * 128 * 4,
                   "runtime": RUNTIME_OVERHEAD_BYTES}
    total = 4000 + 8000 + max(got["activations"] + got["logits"], 4000) + RUNTIME_OVERHEAD_BYTES
    assert memory.estimate(shape, 1000, training).total == total  # gradients replace activations in backward
    checkpointed = memory.estimate(shape, 1000, replace(training, gradient_checkpointing=True))
    assert checkpointed.parts["activations"] == 2 * tokens * 64 * 4 + tokens * per_token * 4
    assert checkpointed.total == sum(checkpointed.parts.values())
    kd = memory.estimate(shape, 1000, replace(training, method="kd")).parts
    assert kd["teacher"] == 4000 and kd["logits"] == 2 * 3 * 64 * 128 * 4 + 2 * tokens * 64 * 4  # one chunk of all


@pytest.mark.parametrize("family", ["llama", "qwen3_5_text", "qwen2_moe"])
def test_lora_parameters_equal_what_peft_trains(family):
    from transact.recovery.methods.lora import LoraSettings, lora_parameters, lora_wrap

    model = tiny_model(family, layers=4)
    shape = shape_of(model)
    wrapped = lora_wrap(model, LoraSettings(r=4), 0)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert lora_parameters(shape, 4) == trainable


def _recipe(tmp_path, corpus, **training) -> RunRecipe:
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    text = tmp_path / "train.txt"
    text.write_text("\n\n".join(corpus))
    return RunRecipe.from_dict({
        "model": str(base), "out": str(tmp_path / "out"), "device": "cpu", "target": {"mlp": 48}, "shots": 1,
        "calibration": {"text": str(text), "samples": 4, "seq_len": 32},
        "training": {"data": str(text), "tokens_per_shot": 256, "seq_len": 32, "batch_size": 4, **training},
        "heldout": {"text": str(text), "tokens": 256, "window": 64}})


def test_a_run_that_cannot_fit_is_refused_before_loading_naming_what_would(tmp_path, corpus, monkeypatch):
    recipe = _recipe(tmp_path, corpus, weights="fp32")
    params = count_parameters(tiny_model("llama"))
    full = memory.estimate(shape_of(tiny_config("llama")), params, recipe.training)
    checkpointed = memory.estimate(shape_of(tiny_config("llama")), params,
                                   replace(recipe.training, gradient_checkpointing=True))
    assert checkpointed.total < full.total
    monkeypatch.setattr(memory, "available_bytes", lambda device: (full.total + checkpointed.total) // 2)
    monkeypatch.setattr(run_job, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(TransactError, match=r"does not fit: estimated peak memory .* What would fit: "
                                            r"training.gradient_checkpointing: true \(0.\d\d GiB\)"):
        loop.run(recipe, progress=False)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1)
    with pytest.raises(TransactError, match=r"no single change .* is enough"):
        loop.run(recipe, progress=False)


def test_auto_weights_fall_back_to_bf16_only_where_fp32_cannot_fit(tmp_path, corpus, monkeypatch):
    recipe = _recipe(tmp_path, corpus)  # weights: auto
    params, shape = count_parameters(tiny_model("llama")), shape_of(tiny_config("llama"))
    fp32 = memory.estimate(shape, params, replace(recipe.training, weights="fp32")).total
    bf16 = memory.estimate(shape, params, replace(recipe.training, weights="bf16")).total
    out = tmp_path / "out"
    monkeypatch.setattr(memory, "available_bytes", lambda device: fp32)
    run = loop.Run(recipe, out, resume=False, progress=False)  # checks and plans; loads no weights
    assert run.weights == run.prep.dtype == torch.float32 and run.memory.parts["weights"] == 4 * params
    monkeypatch.setattr(memory, "available_bytes", lambda device: (fp32 + bf16) // 2)
    run = loop.Run(recipe, out, resume=False, progress=False)
    assert run.weights == run.prep.dtype == torch.bfloat16 and run.memory.parts["weights"] == 2 * params
    assert run.memory.total <= (fp32 + bf16) // 2


def test_the_check_can_be_turned_off_and_the_estimate_is_reported(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1)
    result = loop.run(_recipe(tmp_path, corpus, check_memory=False), progress=False)
    report = json.loads((result.out / "report.json").read_text())
    assert report["memory_estimate"]["weights"] == 4 * count_parameters(tiny_model("llama"))


PROBE = Path(__file__).parents[1] / "benchmarks" / "memory_planner.py"
TOLERANCE = 0.25  # |estimate / measured - 1| (docs/results.md, "Memory planner")


def _measured(setup: str) -> dict:
    done = subprocess.run([sys.executable, str(PROBE), "--one", setup, "--steps", "2"], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("setup", ["tiny, full, 4x128", "tiny, 152K vocabulary, full, 4x512"])
def test_estimate_is_within_tolerance_of_the_measured_peak(setup):
    row = _measured(setup)
    assert abs(row["estimated_bytes"] / row["measured_bytes"] - 1) < TOLERANCE, row


@pytest.mark.slow
def test_estimate_is_within_tolerance_on_smollm2():
    row = _measured("SmolLM2-135M, full, 4x256")
    assert abs(row["estimated_bytes"] / row["measured_bytes"] - 1) < TOLERANCE, row
