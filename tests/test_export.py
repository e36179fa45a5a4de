"""Checkpoints on disk: vanilla AutoModelForCausalLM reloads them with identical logits; writes are atomic."""

import json
import os
import stat

import pytest
import torch
from tiny import FAMILIES, HEADS_MUST_DIVIDE_HIDDEN, TIED, VOCAB, load_kwargs, random_plan, tiny_model
from transformers import AutoModelForCausalLM

from transact.arch import get_adapter, shape_of
from transact.core.metrics.random_choice import random_layer_scores
from transact.core.select import make_plan
from transact.core.surgery import prune_
from transact.core.targets import Targets
from transact.errors import TransactError
from transact.io.checkpoint import reload_and_compare, write_checkpoint
from transact.io.files import check_output_dir, replace_dir, staging_dir, write_json_atomic

CASES = [  # hidden, heads, kv, kept heads, kept kv
    pytest.param(64, 4, 4, 3, 3, id="mha-3of4-indivisible"),
    pytest.param(64, 4, 4, 2, 2, id="mha-2of4"),
    pytest.param(64, 4, 2, 2, 1, id="gqa-2/1of4/2"),
    pytest.param(90, 6, 3, 4, 2, id="gqa-4/2of6/3-indivisible"),
    pytest.param(96, 6, 2, 3, 1, id="gqa-3/1of6/2"),
]


def _pruned(family, hidden, heads, kv, keep_heads, keep_kv, tie=False):
    model = tiny_model(family, heads=heads, kv_heads=kv, hidden=hidden, tie=tie)
    plan = random_plan(model, keep_heads, keep_kv, 40, seed=1)
    prune_(model, plan)
    return model, plan


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("hidden", "heads", "kv", "keep_heads", "keep_kv"), CASES)
def test_roundtrip_vanilla_reload_identical_logits(tmp_path, family, hidden, heads, kv, keep_heads, keep_kv):
    indivisible = hidden % keep_heads != 0
    if family in HEADS_MUST_DIVIDE_HIDDEN and indivisible:
        with pytest.raises(TransactError, match="refuses head counts that do not divide"):
            _pruned(family, hidden, heads, kv, keep_heads, keep_kv)
        return
    model, plan = _pruned(family, hidden, heads, kv, keep_heads, keep_kv, tie=family in TIED)
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = model(x).logits
    out = write_checkpoint(model, None, tmp_path / "out", plan=plan, report={"ok": 1}, save_dtype=torch.float32)

    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and "plan.json" in files and "report.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    config = json.loads((out / "config.json").read_text())
    text = config.get("text_config", config)  # a multimodal checkpoint keeps the widths in its text config
    assert text["num_attention_heads"] == keep_heads and text["num_key_value_heads"] == keep_kv
    adapter = get_adapter(model)
    assert text["head_dim"] == 16 and text[adapter.mlp_layout.width_key] == 40
    expected_type = "mistral" if family == "llama" and indivisible else family
    assert config["model_type"] == expected_type

    reloaded = AutoModelForCausalLM.from_pretrained(out, **load_kwargs(model.config)).eval()
    assert torch.equal(reloaded(x).logits, expected)


def test_llama_indivisible_heads_with_bias_is_refused(tmp_path):
    model = tiny_model("llama", heads=4, kv_heads=4, attention_bias=True)
    shape = shape_of(model.config)
    scores = random_layer_scores(shape, 0)
    plan = make_plan(scores.heads, scores.mlp, Targets(3, 3, 40), shape)
    prune_(model, plan)
    with pytest.raises(TransactError, match="attention_bias"):
        write_checkpoint(model, None, tmp_path / "out", plan=plan, report={}, save_dtype=torch.float32)
    assert not (tmp_path / "out").exists()


def test_failed_verification_leaves_nothing(tmp_path):
    model, plan = _pruned("qwen2", 64, 4, 2, 2, 1)

    def reject(directory):
        assert (directory / "model.safetensors").is_file()  # it was fully written before the check
        raise TransactError("verification failed")

    with pytest.raises(TransactError, match="verification failed"):
        write_checkpoint(model, None, tmp_path / "out", plan=plan, report={}, save_dtype=torch.float32, verify=reject)
    assert list(tmp_path.iterdir()) == []


def test_reload_check_catches_a_wrong_checkpoint(tmp_path):
    model, plan = _pruned("mistral", 64, 4, 2, 2, 1)
    x = torch.randint(0, VOCAB, (1, 8))
    write_checkpoint(model, None, tmp_path / "out", plan=plan, report={}, save_dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0  # the in-memory model drifts from the file
    with pytest.raises(TransactError, match="does not reproduce"):
        reload_and_compare(model, x)(tmp_path / "out")


def test_output_dir_rules(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("precious")
    with pytest.raises(TransactError, match="not empty"):
        check_output_dir(tmp_path / "full", force=False)
    assert check_output_dir(tmp_path / "full", force=True) == (tmp_path / "full").resolve()
    (tmp_path / "model").mkdir()
    with pytest.raises(TransactError, match="overwrite the input"):
        check_output_dir(tmp_path / "model", force=True, inputs=(tmp_path / "model",))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(TransactError, match="not a directory"):
        check_output_dir(tmp_path / "afile", force=True)


def test_force_replaces_existing_output(tmp_path):
    model, plan = _pruned("qwen3", 64, 4, 2, 2, 1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    write_checkpoint(model, None, out, plan=plan, report={}, save_dtype=torch.float32, force=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bf16_save_dtype(tmp_path):
    model, plan = _pruned("llama", 64, 4, 2, 2, 1)
    model.to(torch.bfloat16)
    out = write_checkpoint(model, None, tmp_path / "o", plan=plan, report={}, save_dtype=torch.bfloat16)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert next(reloaded.parameters()).dtype == torch.bfloat16


def test_llama3_rope_scaling_survives_the_mistral_rehoming(tmp_path):
    """Llama-3's rope_parameters (type llama3) must carry over when 3 heads of 64 force a Mistral config."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model = tiny_model("llama", heads=4, kv_heads=4, rope_parameters=rope, max_position_embeddings=512)
    shape = shape_of(model.config)
    scores = random_layer_scores(shape, 2)
    plan = make_plan(scores.heads, scores.mlp, Targets(3, 3, 40), shape)
    prune_(model, plan)
    x = torch.randint(0, VOCAB, (1, 200), generator=torch.Generator().manual_seed(3))  # past the original 64
    expected = model(x).logits
    out = write_checkpoint(model, None, tmp_path / "out", plan=plan, report={}, save_dtype=torch.float32)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["rope_parameters"]["rope_type"] == "llama3"
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert torch.equal(reloaded(x).logits, expected)


def test_outputs_get_the_usual_permissions(tmp_path):
    """Staged in mkdtemp/mkstemp (owner-only), outputs still end with the mode the umask gives new files."""
    umask = os.umask(0o022)
    try:
        model, plan = _pruned("llama", 64, 4, 2, 2, 1)
        out = write_checkpoint(model, None, tmp_path / "ckpt", plan=plan, report={}, save_dtype=torch.float32)
        write_json_atomic(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(umask)
    entries = [out, *out.rglob("*")]
    assert {"model.safetensors", "plan.json"} <= {e.name for e in entries}  # safetensors itself writes 0600
    wrong = {e.name: oct(stat.S_IMODE(e.stat().st_mode)) for e in entries
             if stat.S_IMODE(e.stat().st_mode) != (0o755 if e.is_dir() else 0o644)}
    assert wrong == {}
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644
    tools = staging_dir(tmp_path / "tools")  # a directory of programs (the llama.cpp tools) stays runnable
    (tools / "prog").write_text("")
    (tools / "prog").chmod(0o700)
    umask = os.umask(0o022)
    try:
        replace_dir(tools, tmp_path / "tools")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "tools" / "prog").stat().st_mode) == 0o755
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}


def test_relaid_out_checkpoints_are_compared_within_rounding_only():
    from transact.io.checkpoint import RELAYOUT_EPS, outputs_match

    logits = torch.tensor([[3.0, -2.0, 0.5]])
    rounding = RELAYOUT_EPS * torch.finfo(torch.float32).eps * 3.0
    assert outputs_match(logits, logits.clone(), exact=True)
    assert not outputs_match(logits, logits + 1e-6, exact=True)
    assert outputs_match(logits, logits + rounding * 0.9, exact=False)
    assert not outputs_match(logits, logits + rounding * 1.1, exact=False)
    assert not outputs_match(logits, logits + 1e-3, exact=False)  # a wrong checkpoint moves logits far more
