"""vLLM as an engine: ``transact verify`` and ``transact bench --engine vllm`` on tiny checkpoints in vLLM's CPU
build (``scripts/install.sh --vllm``, which CI runs), and the errors before any of it starts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from tiny import char_tokenizer, tiny_model

from transact.deploy import vllm
from transact.errors import TransactError


def _has_vllm() -> bool:
    try:
        vllm.worker_python()
    except TransactError:
        return False
    return True


# README's install (scripts/install.sh --vllm) and CI have vLLM; an install without it runs the rest
needs_vllm = pytest.mark.skipif(not _has_vllm(), reason="vLLM not installed: bash scripts/install.sh --vllm")


def _pruned_llama(tmp_path: Path, heads: int, kv_heads: int) -> tuple[Path, Path]:
    """A tiny Llama (4 heads of 32 in 2 KV groups, hidden 128) and its prune to ``heads``/``kv_heads``, MLP 128."""
    from transact.cli import main

    dense, pruned = tmp_path / "dense", tmp_path / "pruned"
    tiny_model("llama", heads=4, kv_heads=2, head_dim=32, hidden=128, mlp=192).save_pretrained(dense)
    char_tokenizer().save_pretrained(dense)
    assert main(["prune", str(dense), "--out", str(pruned), "--metric", "random", "--no-reconstruct", "--quiet",
                 "--heads", str(heads), "--kv-heads", str(kv_heads), "--mlp", "128"]) == 0
    return dense, pruned


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> tuple[Path, Path]:
    return _pruned_llama(tmp_path_factory.mktemp("vllm"), heads=2, kv_heads=1)


@needs_vllm
def test_verify_and_bench_in_vllm(llamas, capsys):
    """The pruned checkpoint loads in vLLM unchanged and agrees with transformers to float32 rounding; the bench
    measures both models, and the pruned one (1 KV group of 2) holds twice the tokens in the same KV memory."""
    from transact.cli import main
    from transact.jobs.bench import BenchJob
    from transact.jobs.bench import run as run_bench
    from transact.jobs.verify import VerifyJob
    from transact.jobs.verify import run as run_verify
    from transact.measure.bench import BenchGrid

    dense, pruned = llamas
    result = run_verify(VerifyJob(str(pruned), new_tokens=8, progress=False))
    assert result["ok"] and result["architecture"] == "LlamaForCausalLM"
    assert result["steps"] == 32 and result["agree"] == 32
    assert result["max_logprob_diff"] < 1e-3
    assert main(["verify", str(pruned), "--verify-tokens", "4", "--quiet"]) == 0
    assert "agrees with transformers: greedy 16/16 tokens" in capsys.readouterr().out

    grid = BenchGrid(batches=(1, 2), contexts=(16,), gen=4, repeats=1, warmup=0)
    bench = run_bench(BenchJob((str(dense), str(pruned)), grid=grid, engine="vllm", dtype="float32",
                               progress=False))
    assert bench["engine"] == "vllm" and len(bench["rows"]) == 4
    kv = {name: m["kv_cache_tokens"] for name, m in bench["models"].items()}
    kv_dense, kv_pruned = kv.values()
    # 2 layers x 2 groups x 32 dims x (K and V) x 4 bytes = 1,024 bytes a token in 1 GiB (whole blocks of it)
    assert kv_dense <= 2**30 // 1024 and kv_dense > 0.99 * 2**30 // 1024
    assert kv_pruned == pytest.approx(2 * kv_dense, rel=0.01)
    for row in bench["rows"]:
        assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
        assert row["concurrent_sequences"] == (kv_pruned if row["model"] != bench["reference"] else kv_dense) // 20
    assert bench["rows"][1]["decode_speedup_analytic"] > 1
    assert "sequences of 16+4 at once" in bench.summary()


@needs_vllm
def test_a_checkpoint_that_does_not_hold_the_model_is_refused(llamas):
    """The check compares vLLM with the model in memory: another model's weights (a different seed) are refused,
    in both dtypes' tolerances."""
    from transact.io.models import load_model, prepare_model

    _, pruned = llamas
    prep = prepare_model(str(pruned), "cpu", "float32")
    model, tokenizer = load_model(prep)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    check = vllm.compare_predictions(pruned, model, tokenizer, new_tokens=8)
    assert not check["ok"] and check["max_logprob_diff"] > vllm.TOLERANCE["float32"]
    assert "disagree with transformers" in vllm.failure_message(check)


@needs_vllm
def test_pruned_qwen2_is_served_through_vllms_llama(tmp_path, capsys):
    """vLLM's Qwen2 cannot take pruned heads; its Llama with q/k/v biases (--hf-overrides) computes the same
    network, and verify loads it so, checks it, and prints the serve command."""
    from transact.cli import main

    dense, pruned = tmp_path / "dense", tmp_path / "pruned"
    tiny_model("qwen2", heads=4, kv_heads=2, head_dim=32, hidden=128, mlp=192).save_pretrained(dense)
    char_tokenizer().save_pretrained(dense)
    assert main(["prune", str(dense), "--out", str(pruned), "--metric", "random", "--no-reconstruct", "--quiet",
                 "--heads", "2", "--kv-heads", "1"]) == 0
    capsys.readouterr()
    assert main(["verify", str(pruned), "--verify-tokens", "8", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "loads it as LlamaForCausalLM" in out and "greedy 32/32 tokens" in out
    overrides = '{"architectures": ["LlamaForCausalLM"], "qkv_bias": true}'
    assert f"vllm serve {pruned} --hf-overrides '{overrides}'" in out


@needs_vllm
def test_a_depth_pruned_gemma3_keeps_its_layer_types_in_vllm(tmp_path, capsys):
    """A Gemma 3 of sliding-window and full-attention layers in alternation, with one layer dropped so the
    alternation breaks: vLLM must take each layer's kind from layer_types (the prompts are longer than the
    8-token window, so a layer of the wrong kind would change the predictions)."""
    from transact.arch import shape_of
    from transact.cli import main
    from transact.core.depth import remove_layers_
    from transact.core.plan import whole_plan
    from transact.io.checkpoint import write_checkpoint

    pruned = tmp_path / "pruned"
    model = tiny_model("gemma3_text", heads=4, kv_heads=2, head_dim=32, hidden=128, mlp=192, layers=5, tie=True)
    remove_layers_(model, [1])
    write_checkpoint(model, char_tokenizer(), pruned, plan=whole_plan(shape_of(model)), report={},
                     save_dtype=torch.float32)
    layer_types = json.loads((pruned / "config.json").read_text())["layer_types"]
    assert layer_types == ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    capsys.readouterr()
    assert main(["verify", str(pruned), "--verify-tokens", "8", "--quiet"]) == 0
    assert "greedy 32/32 tokens" in capsys.readouterr().out


@needs_vllm
def test_a_load_failure_names_vllms_reason(tmp_path):
    """A checkpoint vLLM cannot read fails with vLLM's own reason from its log (here: no weights at all)."""
    folder = tmp_path / "broken"
    tiny_model("llama", heads=4, kv_heads=2, head_dim=32, hidden=128, mlp=192).config.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    with vllm.Runtime() as runtime, pytest.raises(TransactError, match="vLLM could not load"):
        runtime.load("x", folder)


def test_errors_before_any_work(tmp_path, monkeypatch):
    from transact.jobs.bench import BenchJob
    from transact.jobs.bench import run as run_bench
    from transact.jobs.verify import VerifyJob
    from transact.jobs.verify import run as run_verify

    with pytest.raises(TransactError, match="float32, bfloat16"):
        VerifyJob("x", dtype="float16")
    with pytest.raises(TransactError, match="unknown engine"):
        VerifyJob("x", engine="llama.cpp")
    for gib in (0, 0.5):
        with pytest.raises(TransactError, match="--kv-cache-gib must be a whole number of GiB"):
            BenchJob(("x",), engine="vllm", kv_cache_gib=gib)
    # a head size vLLM's CPU attention has no kernel for: refused by name before vLLM starts
    odd = tmp_path / "odd"
    tiny_model("llama", heads=4, kv_heads=2, head_dim=16).save_pretrained(odd)
    char_tokenizer().save_pretrained(odd)
    with pytest.raises(TransactError, match="head_dim 16 is not among the head sizes"):
        run_verify(VerifyJob(str(odd)))
    with pytest.raises(TransactError, match="head_dim 16"):
        run_bench(BenchJob((str(odd),), engine="vllm", dtype="float32"))
    # no vLLM anywhere: the install step is named
    monkeypatch.setenv(vllm.PYTHON_ENV, str(tmp_path / "nowhere" / "python"))
    with pytest.raises(TransactError, match="is not a file"):
        vllm.worker_python()
    monkeypatch.delenv(vllm.PYTHON_ENV)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    monkeypatch.setattr(vllm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TransactError, match=r"scripts/install\.sh --vllm"):
        vllm.worker_python()


def test_worker_speaks_json_lines_and_survives_errors(tmp_path):
    """The worker answers every request on its protocol pipe, an error included, and keeps going: here with a
    stand-in vllm module, so the protocol is checked whatever vLLM prints."""
    import subprocess

    fake = tmp_path / "vllm"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('stand-in')\n")
    requests = [{"op": "load", "name": "a", "model": "m", "dtype": "float32", "max_model_len": 8, "max_num_seqs": 1},
                {"op": "bogus"}, {"op": "exit"}]
    out = subprocess.run([sys.executable, str(vllm.WORKER)], input="\n".join(map(json.dumps, requests)) + "\n",
                         capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path)}, timeout=60)
    answers = [json.loads(line) for line in out.stdout.splitlines()]
    assert answers == [{"error": "ImportError: stand-in"}, {"error": "ValueError: unknown op 'bogus'"}]


def test_prune_says_which_checkpoints_vllm_refuses(tmp_path, capsys):
    """Measured refusals (docs/deployment.md) are said before any work: a Qwen2 with pruned heads (vLLM's Qwen2
    takes the head size from hidden // heads) and an untied Gemma 2; an MLP-only Qwen2 prune loads, so no note."""
    from tiny import tiny_config

    from transact.cli import main

    qwen2, gemma2 = tiny_config("qwen2"), tiny_config("gemma2", tie=False)
    assert "--hf-overrides" in vllm.checkpoint_notes(qwen2, heads_pruned=True)[0]
    assert "prune only the MLP" in vllm.checkpoint_notes(tiny_config("qwen2_moe"), heads_pruned=True)[0]
    assert vllm.checkpoint_notes(qwen2, heads_pruned=False) == []
    assert "(untied) does not load there" in vllm.checkpoint_notes(gemma2, heads_pruned=False)[0]
    assert vllm.checkpoint_notes(tiny_config("gemma2", tie=True), heads_pruned=True) == []
    base = tmp_path / "qwen2"
    tiny_model("qwen2").save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    common = ["--metric", "random", "--no-reconstruct", "--no-verify", "--force"]
    assert main(["prune", str(base), "--out", str(tmp_path / "a"), "--heads", "2", "--kv-heads", "1", *common]) == 0
    assert "note: vLLM: its qwen2 model takes the head size as hidden_size // heads" in capsys.readouterr().err
    # a checkpoint vLLM is known to refuse is refused by verify before vLLM starts
    from transact.jobs.verify import VerifyJob
    from transact.jobs.verify import run as run_verify

    untied = tmp_path / "gemma2"
    tiny_model("gemma2", head_dim=32, hidden=128, tie=False).save_pretrained(untied)
    char_tokenizer().save_pretrained(untied)
    with pytest.raises(TransactError, match="ties the output layer to the embeddings; this checkpoint is untied"):
        run_verify(VerifyJob(str(untied)))
    assert main(["prune", str(base), "--out", str(tmp_path / "b"), "--mlp", "64", *common]) == 0
    assert "vLLM: its qwen2" not in capsys.readouterr().err


@needs_vllm
@pytest.mark.parametrize(("part", "dropped"), [("attention", []), ("attention", [1, 3]), ("mlp", [0, 3])],
                         ids=["widths", "widths-and-no-attention", "no-mlp"])
def test_per_layer_widths_run_in_vllm_as_decilm(tmp_path, part, dropped):
    """A Qwen2 whose layers keep different MLP widths (and, in the second case, no attention in layers 1
    and 3), or all its widths but no MLP in layers 0 and 3 (where vLLM's fused residual starts and ends),
    saved in the DeciLM layout: vLLM loads it natively (DeciLMForCausalLM, q/k/v biases through qkv_bias,
    no-op attention and MLPs) and its greedy tokens are transformers' (fp32)."""
    from transformers import AutoModelForCausalLM

    from transact.arch import shape_of
    from transact.core.metrics.random_choice import random_layer_scores
    from transact.core.plan import whole_plan
    from transact.core.select import make_plan
    from transact.core.step import apply_step
    from transact.core.sub_block_drop import skip_sub_blocks_
    from transact.core.targets import Targets
    from transact.io.checkpoint import write_verified

    model = tiny_model("qwen2", heads=4, kv_heads=2, head_dim=32, hidden=128, mlp=192, layers=4)
    skip_sub_blocks_(model, dropped, part)
    if part == "mlp":
        plan = whole_plan(shape_of(model))
    else:
        scores = random_layer_scores(shape_of(model), 0)
        plan = apply_step(model, make_plan(scores.heads, scores.mlp, Targets(4, 2, 120), shape_of(model),
                                           mlp_widths=[64, 192, 128, 96]))
    out = write_verified(model, char_tokenizer(), tmp_path / "out", plan, {}, save_dtype=torch.float32)
    prompts = [[5 + i, 40, 41, 42 + i, 70] for i in range(4)]
    with vllm.Runtime() as runtime:
        runtime.load("m", out, dtype="float32", max_model_len=64, max_num_seqs=4)
        served = runtime.generate("m", prompts, 12)["tokens"]
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        expected = [reloaded.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False,
                                      pad_token_id=1)[0, len(p):].tolist() for p in prompts]
    assert served == expected
