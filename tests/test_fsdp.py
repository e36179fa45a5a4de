"""Recovery sharded with FSDP2 (``training.distributed: fsdp``): two CPU processes (gloo) end a 2-shot
distillation with the plans of a single-process run and its weights up to summation order, a run killed
mid-phase resumes from its per-process slices bit for bit, and the memory planner divides what sharding
divides."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_iterative import recipe_dict, write_recipe
from tiny import run_killed_at

from transact.arch import ModelShape
from transact.errors import TransactError
from transact.recipes import RunRecipe, Training
from transact.recovery import memory

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun_command(recipe: Path, port: int, *extra: str) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port), "-m", "transact.cli", "run",
            str(recipe), "--quiet", *extra]


def torchrun(recipe: Path, port: int, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(torchrun_command(recipe, port, *extra), capture_output=True, text=True, timeout=400,
                          env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def kd_recipe(root: Path, out: str, **training) -> dict:
    data = recipe_dict(root, out, method="kd", tokens_per_shot=8192, final_tokens=0, lr=3e-3, save_every=4,
                       **training)
    return data | {"reconstruct": True}


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def test_fsdp_ends_with_the_single_process_plans_and_weights(workdir):
    """The same global batches (one process of 8 blocks, or two of 4): the same plans at both shots, and the
    weights within 2e-4 of the single-process run's (the gradients' sums run in another order across the
    processes' slices, so not bit for bit). Both processes hold the same final weights, and the report says
    the run was sharded."""
    single = kd_recipe(workdir, "single", batch_size=8)
    data = kd_recipe(workdir, "fsdp", batch_size=4, distributed="fsdp")
    from transact.recovery import loop

    loop.run(RunRecipe.from_dict(single), progress=False)
    torchrun(write_recipe(workdir, "fsdp", data), 29531)
    report = json.loads((workdir / "fsdp" / "report.json").read_text())
    assert (report["processes"], report["distributed"]) == (2, "fsdp")
    digests = report["weights_sha256_per_process"]
    assert digests[0] == digests[1]
    assert len(report["peak_memory_bytes_per_process"]) == 2
    plans = [json.loads((workdir / name / "plans.json").read_text())["shots"] for name in ("single", "fsdp")]
    keep = [[(s["layers"], s.get("corrections")) for s in shots] for shots in plans]
    assert keep[0] == keep[1]
    a, b = weights_of(workdir / "single"), weights_of(workdir / "fsdp")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert 0 < worst < 2e-4, worst
    steps = [p["train_steps"] for p in report["phases"]]
    single_report = json.loads((workdir / "single" / "report.json").read_text())
    assert steps == [p["train_steps"] for p in single_report["phases"]] == [16, 16]


def test_fsdp_killed_mid_shot_resumes_bit_identically(workdir):
    """SIGKILL every process in shot 2's training; the state holds each process's slice; resuming with two
    processes ends with exactly the weights and losses of an uninterrupted two-process run; one process
    cannot resume those slices and says how many can."""
    path_a = write_recipe(workdir, "fsdp-a", kd_recipe(workdir, "fsdp-a", distributed="fsdp"))
    path_b = write_recipe(workdir, "fsdp-b", kd_recipe(workdir, "fsdp-b", distributed="fsdp"))
    torchrun(path_a, 29532)
    code = run_killed_at(None, path_b, workdir / "fsdp-b", phase=2, step=8, command=torchrun_command(path_b, 29533),
                         env=ENV)
    assert code == -signal.SIGKILL, "the run finished before it could be killed"
    state = workdir / "fsdp-b" / "state"
    saved = json.loads((state / "progress.json").read_text())
    assert saved["phase"] == 2 and saved["step"] >= 8 and not saved["done"]
    assert sorted(f.name for f in state.glob("*.safetensors")) == [
        "model.rank0-of-2.safetensors", "model.rank1-of-2.safetensors",
        "optimizer.rank0-of-2.safetensors", "optimizer.rank1-of-2.safetensors"]

    from transact.recovery import loop

    with pytest.raises(TransactError, match=r"by 2 processes.*this run has 1.*nproc_per_node 2"):
        loop.run(RunRecipe.from_dict(kd_recipe(workdir, "fsdp-b", distributed="fsdp")), resume=True, progress=False)
    torchrun(path_b, 29534, "--resume")
    a, b = weights_of(workdir / "fsdp-a"), weights_of(workdir / "fsdp-b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = json.loads((workdir / "fsdp-a" / "losses.json").read_text())
    lb = json.loads((workdir / "fsdp-b" / "losses.json").read_text())
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]


def test_a_mixture_of_experts_trains_sharded(workdir):
    """Fused expert tensors (gate_up_proj of every expert in one parameter) are sliced and gathered whole
    again: the two processes end equal, each shot's training lowers the perplexity, and the checkpoint loads
    in vanilla transformers."""
    from tiny import char_tokenizer, tiny_model
    from transformers import AutoModelForCausalLM

    moe = workdir / "moe-fsdp-model"
    tiny_model("qwen3_moe", heads=4, kv_heads=2, mlp=96).save_pretrained(moe)
    char_tokenizer().save_pretrained(moe)
    data = recipe_dict(workdir, "moe-fsdp", method="kd", distributed="fsdp", tokens_per_shot=2048,
                       final_tokens=0) | {"model": str(moe), "target": {"mlp": 48, "experts": 3}, "reconstruct": True}
    torchrun(write_recipe(workdir, "moe-fsdp", data), 29535)
    report = json.loads((workdir / "moe-fsdp" / "report.json").read_text())
    digests = report["weights_sha256_per_process"]
    assert report["distributed"] == "fsdp" and digests[0] == digests[1]
    assert all(p["perplexity"] < p["perplexity_pruned"] for p in report["phases"])
    assert AutoModelForCausalLM.from_pretrained(workdir / "moe-fsdp").config.num_experts == 3


def test_a_per_layer_checkpoint_trains_sharded_without_shots(workdir, tmp_path):
    """``shots: 0`` on a per-layer (DeciLM) checkpoint under FSDP2: the whole model gathered again from the
    slices keeps every layer's width, the two processes end equal, and training lowers the perplexity."""
    from tiny import char_tokenizer, per_layer_model

    from transact.io.checkpoint import write_verified

    model, plan = per_layer_model("llama", [32, 80, 56])
    write_verified(model, char_tokenizer(), tmp_path / "in", plan, {}, save_dtype=torch.float32)
    data = {"model": str(tmp_path / "in"), "out": str(tmp_path / "out"), "device": "cpu", "shots": 0,
            "training": {"data": str(workdir / "train.txt"), "final_tokens": 2048, "seq_len": 64, "batch_size": 2,
                         "lr": 1e-3, "distributed": "fsdp"},
            "heldout": {"text": str(workdir / "train.txt"), "tokens": 512, "window": 128}}
    torchrun(write_recipe(tmp_path, "per-layer", data), 29537)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert [b["ffn"]["intermediate_size"] for b in config["block_configs"]] == [32, 80, 56]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    digests = report["weights_sha256_per_process"]
    assert report["distributed"] == "fsdp" and digests[0] == digests[1]
    assert report["phases"][0]["perplexity"] < report["dense"]["perplexity"]


def test_bf16_weights_and_8bit_moments_resume_from_their_slices_bit_identically(tmp_path):
    """tests/fsdp_state_check.py on two processes: bf16 weights (torchao's AdamW, stochastic rounding) and
    fp32 weights with 8-bit moments (saved packed, re-wrapped as distributed tensors on load) continue from
    saved slices exactly as the run that saved them."""
    command = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29536",
               str(Path(__file__).parent / "fsdp_state_check.py"), str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=400, env=ENV, cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [row for rank in (0, 1) for row in json.loads((tmp_path / f"results.rank{rank}.json").read_text())]
    assert [(r["weights"], r["optimizer"]) for r in rows] == [("bf16", "adamw"), ("fp32", "adamw_8bit")] * 2
    assert all(r["identical"] for r in rows)
    kinds = [(r["dtype"], r["packed"]) for r in rows[:2]]
    assert kinds == [("torch.bfloat16", []), ("torch.float32", ["OptimState8bit"])]


def test_bf16_weights_train_sharded(workdir):
    """A 2-shot distillation with bf16 weights over two processes: both end with the same bf16 weights, each
    shot's training lowers the held-out perplexity, and the checkpoint is bf16."""
    data = recipe_dict(workdir, "fsdp-bf16", method="kd", distributed="fsdp", weights="bf16", optimizer="adamw",
                       tokens_per_shot=2048, final_tokens=0, lr=3e-3)
    torchrun(write_recipe(workdir, "fsdp-bf16", data), 29537)
    report = json.loads((workdir / "fsdp-bf16" / "report.json").read_text())
    digests = report["weights_sha256_per_process"]
    assert (report["distributed"], report["weights"], digests[0]) == ("fsdp", "bfloat16", digests[1])
    assert all(p["perplexity"] < p["perplexity_pruned"] for p in report["phases"])
    assert {t.dtype for t in weights_of(workdir / "fsdp-bf16").values()} == {torch.bfloat16}


def test_fsdp_refuses_what_it_does_not_shard():
    with pytest.raises(TransactError, match=r"training\.distributed.*method full, kd.*ddp with method: lora"):
        Training(distributed="fsdp", method="lora")
    with pytest.raises(TransactError, match=r"training\.distributed.*bf16 weights or 8-bit moments, not both"):
        Training(distributed="fsdp", weights="bf16", optimizer="adamw_8bit")
    Training(distributed="fsdp", weights="bf16")  # each alone is sharded
    Training(distributed="fsdp", optimizer="adamw_8bit")
    with pytest.raises(TransactError, match=r"training\.distributed"):
        Training(distributed="zero3")


SHAPE = ModelShape("llama", num_layers=10, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                   intermediate_size=128, vocab_size=1000)


def test_memory_planner_divides_the_sharded_parts_by_the_processes():
    """Hand-computed: 1,000,000 fp32 parameters distilled with AdamW over 4 processes: weights, gradients,
    moments and teacher each / 4; gathered = (2 x 2 x 64,000 embedding values + 3 x 93,600 per layer + the
    teacher's 64,000 embedding values) x 4 bytes; the floor is the whole student and teacher."""
    training = Training(method="kd", distributed="fsdp")
    params = 1_000_000
    one = memory.estimate(SHAPE, params, training, device="cuda")
    four = memory.estimate(SHAPE, params, training, device="cuda", processes=4)
    for part in ("weights", "gradients", "optimizer", "teacher"):
        assert four.parts[part] == one.parts[part] // 4, part
    assert four.parts["gathered"] == (2 * 2 * 64_000 + 3 * 93_600 + 64_000) * 4
    assert (four.parts["activations"], four.parts["logits"]) == (one.parts["activations"], one.parts["logits"])
    assert four.floor == 2 * params * 4 and one.floor == 0
    assert four.total == max(four.step, four.floor) < one.total
    assert "per process of 4 (fsdp)" in four.describe()
    ddp = memory.estimate(SHAPE, params, replace(training, distributed="ddp"), device="cuda", processes=4)
    assert ddp.total == one.total  # replicas each hold everything


def test_calibration_statistics_are_counted_by_hand():
    """SHAPE: 10 layers, attention width 4 x 16 = 64, MLP 128; a vector per layer and module for sum_sq and
    sum, a square matrix for gram, fp32. A mixture of 4 experts of 32 with a shared expert of 16 holds each
    expert's."""
    from transact.core.calibrate import statistics_bytes

    assert statistics_bytes(SHAPE, ("sum_sq", "sum", "gram")) == 4 * 10 * (2 * (64 + 128) + 64**2 + 128**2)
    moe = replace(SHAPE, intermediate_size=32, num_experts=4, experts_per_token=2, shared_expert_size=16)
    assert statistics_bytes(moe, ("sum", "gram")) == 4 * 10 * (64 + 4 * 32 + 16 + 64**2 + 4 * 32**2 + 16**2)
    assert statistics_bytes(SHAPE, ()) == 0


def test_the_sharded_floor_holds_the_whole_model_and_the_shots_statistics():
    """Loading holds the whole student and teacher; a shot holds the whole student, the teacher's slice and
    the statistics on the main process: the floor is the larger."""
    training, params = Training(method="kd", distributed="fsdp"), 1_000_000
    small = memory.estimate(SHAPE, params, training, device="cuda", processes=4, statistics=1_000)
    assert small.floor == 2 * params * 4
    large = memory.estimate(SHAPE, params, training, device="cuda", processes=4, statistics=6_000_000)
    assert large.floor == params * 4 + params * 4 // 4 + 6_000_000
    assert "calibration statistics 0.01" in large.describe()


def test_fsdp_is_offered_bf16_weights_or_8bit_moments_never_both():
    training = Training(method="full", distributed="fsdp", weights="fp32", optimizer="adamw")
    params = 200_000_000
    one = memory.estimate(SHAPE, params, training, device="cuda", processes=2).total
    ways = memory.ways_to_fit(SHAPE, params, training, device="cuda", teacher_here=False, available=one - 1,
                              processes=2)
    assert any(w.startswith("training.optimizer: adamw_8bit") for w in ways)
    assert any(w.startswith("training.weights: bf16 (") for w in ways)
    assert not any("bf16 with training.optimizer: adamw_8bit" in w for w in ways)
    assert any(w.startswith("training.method: lora with distributed: ddp") for w in ways)  # lora is not sharded
    eight = replace(training, weights="auto", optimizer="adamw_8bit")
    assert memory.choose_weights(SHAPE, params, eight, "cuda", teacher_here=False, available=1,
                                 processes=2) == torch.float32  # bf16 would need both at once
    assert memory.choose_weights(SHAPE, params, replace(eight, optimizer="adamw"), "cuda", teacher_here=False,
                                 available=one - 1, processes=2) == torch.bfloat16


def test_a_run_too_large_for_one_device_is_told_how_many_fsdp_processes_fit():
    training = Training(method="kd", optimizer="adamw", weights="fp32")
    params = 1_000_000_000  # the weights, not the activations, are what does not fit
    one = memory.estimate(SHAPE, params, training, device="cuda").total
    ways = memory.ways_to_fit(SHAPE, params, training, device="cuda", teacher_here=True, available=one * 6 // 10)
    fsdp = [w for w in ways if "fsdp" in w]
    assert len(fsdp) == 1 and "fsdp with 2 processes" in fsdp[0] and "--nproc_per_node 2" in fsdp[0]
    low = replace(training, weights="bf16", optimizer="adamw_8bit")  # not both under fsdp: AdamW it says
    one = memory.estimate(SHAPE, params, low, device="cuda").total
    ways = memory.ways_to_fit(SHAPE, params, low, device="cuda", teacher_here=True, available=one * 6 // 10)
    sharded = [w for w in ways if "fsdp" in w]
    assert len(sharded) == 1 and sharded[0].startswith("training.distributed: fsdp and training.optimizer: adamw")


def test_an_accelerate_config_that_shards_by_itself_is_refused():
    """accelerate's own FSDP/DeepSpeed would shard the model across the pruning shots; the run says how to
    launch instead."""
    from types import SimpleNamespace

    from transact.recovery.distributed import check_launch

    for kind in ("FSDP", "DEEPSPEED"):
        with pytest.raises(TransactError, match=rf"accelerate's {kind} configuration.*training\.distributed: fsdp"):
            check_launch(SimpleNamespace(distributed_type=SimpleNamespace(name=kind)))
    check_launch(SimpleNamespace(distributed_type=SimpleNamespace(name="MULTI_CPU")))
