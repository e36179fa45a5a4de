"""Recovery training's weights and optimizer (transact.recovery.optim): bf16 weights with stochastic
rounding, 8-bit AdamW moments, their exact save and restore, the device defaults and the memory planner's
bytes per parameter. The end-to-end kill-and-resume of a bf16 + 8-bit run is in test_iterative.py."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from tiny import tiny_model

from transact.arch import shape_of
from transact.errors import TransactError
from transact.measure.costs import count_parameters
from transact.recipes import RunRecipe, Training
from transact.recovery import memory, optim
from transact.recovery.methods.lora import lora_parameters

SETUPS = [(torch.float32, "adamw"), (torch.float32, "adamw_8bit"), (torch.bfloat16, "adamw"),
          (torch.bfloat16, "adamw_8bit")]


def _steps(model: torch.nn.Module, optimizer, start: int, count: int) -> None:
    dtype = next(model.parameters()).dtype
    for step in range(start, start + count):
        torch.manual_seed(100 + step)  # as the training loop reseeds every step
        model(torch.randn(8, 64, dtype=dtype)).float().pow(2).mean().backward()
        optim.set_lr(optimizer, 1e-3 * (step + 1))
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("weights, kind", SETUPS)
def test_saved_optimizer_state_continues_exactly(weights, kind):
    """Two steps, save through safetensors-ready tensors and JSON, restore into a new optimizer, two more
    steps: the same weights as four uninterrupted steps, bit for bit (8-bit moments and the stochastic
    rounding's draws included)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)).to(weights)
    training = Training(lr=1e-3, weights="bf16" if weights == torch.bfloat16 else "fp32", optimizer=kind)
    half = copy.deepcopy(model)
    whole = optim.make_optimizer(model, training, kind)
    _steps(model, whole, 0, 4)
    first = optim.make_optimizer(half, training, kind)
    _steps(half, first, 0, 2)
    tensors, meta = optim.state_tensors(first)
    assert all(type(t) is torch.Tensor for t in tensors.values())
    if kind == "adamw_8bit":  # the 128x64 weight's moments are stored as 8-bit codes with per-block scales
        assert tensors["0.exp_avg.codes"].dtype == torch.uint8 and tensors["0.exp_avg.scale"].numel() == 8192 // 256
    resumed = copy.deepcopy(half)
    second = optim.make_optimizer(resumed, training, kind)
    optim.load_state(second, optim.state_dict_from(tensors, json.loads(json.dumps(meta))))
    _steps(resumed, second, 2, 2)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_stochastic_rounding_keeps_updates_below_bf16_spacing():
    """bf16 values of 1.0 and a first AdamW step of lr = 1e-3 (the normalised step is 1): the exact result
    0.999 lies between the bf16 neighbours 1 - 2^-8 and 1. Rounding to nearest keeps every value at 1.0;
    stochastic rounding moves about a quarter of them down a step, so the mean is 0.999 in expectation."""
    values = 1 << 16
    training = Training(lr=1e-3, weights="bf16", optimizer="adamw")

    def one_step(rounding: bool) -> torch.Tensor:
        p = torch.nn.Parameter(torch.ones(values, dtype=torch.bfloat16))
        p.grad = torch.ones_like(p)
        torch.manual_seed(0)
        kind = optim.make_optimizer(torch.nn.ParameterList([p]), training, "adamw") if rounding \
            else torch.optim.AdamW([p], lr=1e-3, weight_decay=0.0)
        kind.step()
        return p.detach().float()

    nearest, stochastic = one_step(False), one_step(True)
    assert torch.equal(nearest, torch.ones(values))
    assert set(stochastic.unique().tolist()) == {1.0 - 2**-8, 1.0}
    assert stochastic.mean().item() == pytest.approx(0.999, abs=2e-5)  # 4 standard errors of 65,536 draws


def test_auto_optimizer_is_adamw_on_a_cpu_and_8bit_on_a_bf16_gpu(monkeypatch):
    training = Training()
    assert optim.resolve(training, torch.device("cpu")) == (torch.float32, "adamw")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert optim.resolve(training, torch.device("cuda")) == (torch.float32, "adamw_8bit")
    assert optim.resolve(replace(training, weights="bf16"), torch.device("cuda")) == (torch.bfloat16, "adamw_8bit")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert optim.resolve(training, torch.device("cuda")) == (torch.float32, "adamw")


def test_auto_weights_are_fp32_unless_only_bf16_fits():
    model = tiny_model("llama", heads=4, kv_heads=2, mlp=96)
    shape, params = shape_of(model.config), count_parameters(model)
    training = Training(seq_len=8, batch_size=1)
    fp32 = memory.estimate(shape, params, replace(training, weights="fp32")).total
    bf16 = memory.estimate(shape, params, replace(training, weights="bf16")).total

    def choose(available, **changes):
        return memory.choose_weights(shape, params, replace(training, **changes), "cpu", teacher_here=False,
                                     available=available)

    assert choose(None) == choose(fp32) == torch.float32
    assert choose(fp32 - 1) == choose(bf16) == torch.bfloat16
    assert choose(bf16 - 1) == torch.float32  # nothing fits: the planner's refusal names what would
    assert choose(fp32, weights="bf16") == torch.bfloat16 and choose(bf16, weights="fp32") == torch.float32


@pytest.mark.parametrize("key, value", [("weights", "fp16"), ("optimizer", "adam8")])
def test_unknown_weights_or_optimizer_are_refused_naming_the_key(key, value):
    with pytest.raises(TransactError, match=f"training.{key}.*must be one of"):
        RunRecipe.from_dict({"model": "m", "out": "o", "target": {"mlp": 0.5}, "training": {key: value}})


def test_planner_counts_bytes_per_parameter_of_each_setup():
    """Hand-computed parts for the tiny Llama: weights 4 or 2 bytes, gradients the same, moments 8 (fp32),
    4 (bf16 beside bf16 weights) or 2 plus one fp32 scale per 256 values (8 bit)."""
    model = tiny_model("llama", heads=4, kv_heads=2, mlp=96)
    shape, params = shape_of(model.config), count_parameters(model)
    blocks = -(-params // 256)
    expected = {("fp32", "adamw"): (4, 4, 8 * params), ("fp32", "adamw_8bit"): (4, 4, 2 * params + 8 * blocks),
                ("bf16", "adamw"): (2, 2, 4 * params), ("bf16", "adamw_8bit"): (2, 2, 2 * params + 8 * blocks)}
    fp32 = memory.estimate(shape, params, Training(weights="fp32", optimizer="adamw"))
    for (weights, kind), (w, g, moments) in expected.items():
        parts = memory.estimate(shape, params, Training(weights=weights, optimizer=kind)).parts
        assert (parts["weights"], parts["gradients"], parts["optimizer"]) == (w * params, g * params, moments)
        assert parts["activations"] == fp32.parts["activations"] * w // 4
    lora = memory.estimate(shape, params, Training(method="lora", weights="bf16", optimizer="adamw")).parts
    adapters = lora_parameters(shape, 16)
    assert (lora["gradients"], lora["optimizer"]) == (4 * adapters, 8 * adapters)  # peft's fp32 adapters


def test_a_run_that_does_not_fit_is_told_about_bf16_weights_and_8bit_moments():
    model = tiny_model("llama", heads=4, kv_heads=2, mlp=96)
    shape, params = shape_of(model.config), count_parameters(model)
    training = Training(seq_len=8, batch_size=1)
    need = memory.estimate(shape, params, training).total
    low = memory.estimate(shape, params, replace(training, weights="bf16", optimizer="adamw_8bit")).total
    ways = memory.ways_to_fit(shape, params, training, device="cpu", teacher_here=False, available=(need + low) // 2)
    assert any(w.startswith("training.weights: bf16 with training.optimizer: adamw_8bit") for w in ways), ways
