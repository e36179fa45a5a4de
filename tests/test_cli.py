"""The command line end to end on tiny models saved to disk, and its bad-input errors."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import VOCAB, char_tokenizer, tiny_model
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import transact.jobs.apply_plan
import transact.jobs.prune
from transact.cli import main


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "base"
    tiny_model("llama", heads=4, kv_heads=2, hidden=64).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def calib_file(tmp_path, corpus):
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus))
    return path


@pytest.fixture
def no_model_loading(monkeypatch):
    """Bad input must be rejected before any weights are loaded."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the input was validated")
    monkeypatch.setattr(transact.jobs.prune, "load_model", refuse)
    monkeypatch.setattr(transact.jobs.apply_plan, "load_model", refuse)


def _prune_args(model_dir, out, calib_file, *extra):
    return ["prune", str(model_dir), "--out", str(out), "--heads", "2", "--kv-heads", "1", "--mlp", "40",
            "--calib", str(calib_file), "--samples", "8", "--seq-len", "64", "--quiet", *extra]


def test_prune_then_apply_plan_is_bit_identical(tmp_path, model_dir, calib_file, capsys):
    out = tmp_path / "pruned"
    assert main(_prune_args(model_dir, out, calib_file, "--eval-text", str(calib_file), "--eval-tokens", "600",
                            "--window", "128")) == 0
    printed = capsys.readouterr().out
    assert "heads / kv heads" in printed and "4 / 2" in printed and "2 / 1" in printed and "perplexity" in printed

    plan = json.loads((out / "plan.json").read_text())
    assert plan["targets"] == {"heads": 2, "kv_heads": 1, "mlp": 40}
    assert plan["calibration_hash"].startswith("sha256:") and plan["versions"]["transformers"]
    assert plan["recipe"]["calibration"]["samples"] == 8 and len(plan["layers"]) == 2
    report = json.loads((out / "report.json").read_text())
    assert report["after"]["params"] < report["before"]["params"]
    assert report["after"]["kv_cache_bytes_per_token"] * 2 == report["before"]["kv_cache_bytes_per_token"]
    assert report["after"]["perplexity"]["tokens"] > 0

    again = tmp_path / "again"
    assert main(["apply-plan", str(model_dir), str(out / "plan.json"), "--out", str(again)]) == 0
    a, b = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_attention_heads == 2
    # the base model is untouched
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    assert base.config.num_attention_heads == 4


def test_prune_tells_which_widths_quantize_and_rounds_them_on_request(tmp_path, model_dir, calib_file, capsys):
    """Before any work: 2 heads x 16 = 32 fits the 32-block types but not the K-quants, 40 MLP channels fit
    none; --multiple-of 32 rounds the MLP to 32 and records it in the plan's recipe."""
    args = [a for a in _prune_args(model_dir, tmp_path / "a", calib_file) if a != "--quiet"]
    assert main(args) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert notes == [
        "note: llama.cpp: blk.*.attn_output has input width 32, not a multiple of 256: the K-quants store it in "
        "their fallback type (q4_k_m: Q5_0, q6_k: Q8_0)",
        "note: llama.cpp: blk.*.ffn_down has input width 40, not a multiple of 32: every quantized type (q8_0, "
        "q4_0, q4_k_m, ...) stores it in F16",
        "note: vLLM: 4-bit Marlin kernels need input widths divisible by 128, not so: blk.*.attn_output 32, "
        "blk.*.ffn_down 40"]
    assert main(_prune_args(model_dir, tmp_path / "b", calib_file, "--multiple-of", "q4_0")) == 0
    plan = json.loads((tmp_path / "b" / "plan.json").read_text())
    assert plan["targets"] == {"heads": 2, "kv_heads": 1, "mlp": 32} and plan["recipe"]["multiple_of"] == 32
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "b").config.intermediate_size == 32


def test_random_and_magnitude_metrics_need_no_calibration_text_without_the_refit(tmp_path, model_dir):
    for metric in ("random", "magnitude"):
        out = tmp_path / metric
        assert main(["prune", str(model_dir), "--out", str(out), "--heads", "0.5", "--mlp", "0.5", "--no-reconstruct",
                     "--metric", metric, "--calib", str(tmp_path / "missing.txt"), "--quiet"]) == 0
        plan = json.loads((out / "plan.json").read_text())
        assert plan["targets"] == {"heads": 2, "kv_heads": 1, "mlp": 48} and plan["calibration_hash"] is None


def test_eval_and_info(tmp_path, model_dir, calib_file, capsys):
    out_json = tmp_path / "eval.json"
    assert main(["eval", str(model_dir), "--text", str(calib_file), "--eval-tokens", "300", "--windows", "100,1000",
                 "--json", str(out_json), "--quiet"]) == 0
    result = json.loads(out_json.read_text())
    short, long = (result["perplexity"][f"{calib_file}@{w}"] for w in (100, 1000))
    assert short["tokens"] == 297 and short["perplexity"] > 1
    # 1000 is clipped to the model's 512 positions: windows of 512 over 300 tokens score 299 of them
    assert long["window"] == 512 and long["requested_window"] == 1000 and long["tokens"] == 299
    assert result["params"] == sum(p.numel() for p in tiny_model("llama").parameters())
    assert main(["info", str(model_dir)]) == 0
    printed = capsys.readouterr().out
    assert "4 heads / 2 KV heads x head_dim 16" in printed and "llama" in printed


def _assert_error(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_bad_inputs_fail_before_loading_and_write_nothing(tmp_path, model_dir, calib_file, capsys,
                                                          no_model_loading):
    out = tmp_path / "out"
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB)).save_pretrained(gpt2)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")

    _assert_error(capsys, _prune_args(gpt2, out, calib_file),
                  "'gpt2' is not supported; transact supports: gemma2, gemma3, gemma3_text, granite, llama")
    _assert_error(capsys, _prune_args(tmp_path / "nope", out, calib_file), "does not exist")
    _assert_error(capsys, _prune_args(model_dir, out, empty), "contains no text")
    _assert_error(capsys, _prune_args(model_dir, out, tmp_path / "missing.txt"), "does not exist")
    _assert_error(capsys, _prune_args(model_dir, busy, calib_file), "not empty")
    _assert_error(capsys, _prune_args(model_dir, model_dir, calib_file, "--force"), "overwrite the input")
    bad_heads = _prune_args(model_dir, out, calib_file)
    bad_heads[bad_heads.index("--heads") + 1] = "3"
    _assert_error(capsys, bad_heads, "needs 3 query heads per group, but each group has only 2")
    bad_heads[bad_heads.index("--kv-heads") + 1] = "2"
    _assert_error(capsys, bad_heads, "not a multiple of kv heads")
    if not torch.cuda.is_available():
        _assert_error(capsys, _prune_args(model_dir, out, calib_file, "--device", "cuda"), "no CUDA device")
    _assert_error(capsys, _prune_args(model_dir, out, calib_file, "--dtype", "int4"), "unknown dtype")
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    _assert_error(capsys, _prune_args(not_a_model, out, calib_file), "no config.json")
    assert not out.exists()
    assert sorted(p.name for p in busy.iterdir()) == ["x"]


def test_bad_plan_file(tmp_path, model_dir, capsys, no_model_loading):
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    _assert_error(capsys, ["apply-plan", str(model_dir), str(bad), "--out", str(tmp_path / "o")], "not valid JSON")
    _assert_error(capsys, ["apply-plan", str(model_dir), str(tmp_path / "none.json"), "--out", str(tmp_path / "o")],
                  "does not exist")


def test_width_flag_errors_are_argparse_errors(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["prune", str(model_dir), "--out", str(tmp_path / "o"), "--heads", "1.5"])
    assert e.value.code == 2 and "fraction in (0, 1)" in capsys.readouterr().err


def test_bf16_compute_on_fp32_checkpoint_saves_bf16_and_reapplies_exactly(tmp_path, calib_file):
    """A narrower compute dtype rounds the weights, so they are saved in it; the reload check must compare
    like with like (loading straight into bf16 rather than casting, which would round the RoPE buffer)."""
    base = tmp_path / "mha"
    tiny_model("llama", heads=4, kv_heads=4, hidden=64).save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    out, again = tmp_path / "bf16", tmp_path / "again"
    assert main(["prune", str(base), "--out", str(out), "--heads", "3", "--mlp", "0.5", "--calib", str(calib_file),
                 "--samples", "4", "--seq-len", "64", "--dtype", "bfloat16", "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["dtype"] == "bfloat16"
    assert main(["apply-plan", str(base), str(out / "plan.json"), "--out", str(again), "--dtype", "bfloat16"]) == 0
    a, b = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert all(a[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)


def test_model_without_tokenizer(tmp_path, calib_file, capsys):
    """Plans and weight-magnitude pruning need no tokenizer; calibration does, and says so up front."""
    bare = tmp_path / "bare"
    tiny_model("qwen2", heads=4, kv_heads=2).save_pretrained(bare)
    assert main(["prune", str(bare), "--out", str(tmp_path / "mag"), "--heads", "2", "--metric", "magnitude",
                 "--no-reconstruct", "--quiet"]) == 0
    assert main(["apply-plan", str(bare), str(tmp_path / "mag" / "plan.json"), "--out", str(tmp_path / "again")]) == 0
    assert not (tmp_path / "again" / "tokenizer.json").exists()
    _assert_error(capsys, _prune_args(bare, tmp_path / "cal", calib_file), "has no tokenizer files")
    assert not (tmp_path / "cal").exists()
