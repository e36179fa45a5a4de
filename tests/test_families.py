"""What each family must keep, refuse and say: the constants pruning must not touch, the head counts a
family's config cannot express (refused before any weights are read, naming the valid ones), and what
``transact info`` tells a user."""

import json

import pytest
import torch
from tiny import VOCAB, char_tokenizer, random_plan, tiny_model, two_shot_run
from transformers import AutoModelForCausalLM

import transact.jobs.prune
from transact.arch import get_adapter, shape_of
from transact.cli import main
from transact.core.metrics import metric_names
from transact.core.surgery import prune_
from transact.errors import TransactError
from transact.io.checkpoint import write_checkpoint


def _saved(tmp_path, family, **config):
    base = tmp_path / "base"
    tiny_model(family, **config).save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    return base


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_gemma_info_lists_only_head_counts_that_divide_the_hidden_size(tmp_path, capsys, family):
    base = _saved(tmp_path, family, hidden=90, heads=6, kv_heads=2)
    assert main(["info", str(base)]) == 0
    out = capsys.readouterr().out
    # 4 heads do not divide 90: 4/2 is missing from the pairs a GQA model with groups of 3 could take
    assert "prunable heads    heads/kv 1/1, 2/1, 3/1, 2/2, 6/2\n" in out
    assert "refuses head counts that do not divide hidden_size 90" in out
    assert "query_pre_attn_scalar ** -0.5 is kept as stored" in out


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_gemma_head_count_that_cannot_be_saved_is_refused_before_loading(tmp_path, capsys, monkeypatch, family):
    base = _saved(tmp_path, family, hidden=90, heads=6, kv_heads=2)
    monkeypatch.setattr(transact.jobs.prune, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    out = tmp_path / "out"
    assert main(["prune", str(base), "--out", str(out), "--heads", "4", "--kv-heads", "2", "--quiet",
                 "--no-reconstruct"]) == 2
    err = capsys.readouterr().err
    assert "heads 4: transformers'" in err and "valid pairs: heads/kv 1/1, 2/1, 3/1, 2/2, 6/2" in err
    assert not out.exists()


def test_gemma_attention_scale_and_softcaps_survive_pruning(tmp_path):
    """The scale is query_pre_attn_scalar ** -0.5, a stored constant (20 here, not head_dim 16): pruning heads
    must neither change nor recompute it, and the reloaded checkpoint must compute the same logits."""
    model = tiny_model("gemma2", heads=4, kv_heads=2, hidden=64)
    plan = random_plan(model, 2, 1, 40)
    prune_(model, plan)
    attn = get_adapter(model).attention_module(get_adapter(model).layers(model)[0])
    assert attn.scaling == 20 ** -0.5
    out = write_checkpoint(model, None, tmp_path / "out", plan=plan, report={}, save_dtype=torch.float32)
    config = json.loads((out / "config.json").read_text())
    assert config["query_pre_attn_scalar"] == 20 and config["num_attention_heads"] == 2
    assert config["attn_logit_softcapping"] == 50.0 and config["final_logit_softcapping"] == 30.0
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config._attn_implementation == "eager"  # no SDPA path can soft-cap
    x = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    assert torch.equal(reloaded(x).logits, model(x).logits)


def test_gemma3_keeps_its_layer_types_and_per_type_rotary_bases(tmp_path):
    model = tiny_model("gemma3_text", heads=4, kv_heads=2, layers=4)
    before = (list(model.config.layer_types), dict(model.config.rope_parameters))
    assert before[0] == ["sliding_attention", "full_attention"] * 2
    plan = random_plan(model, 2, 2, 40)
    prune_(model, plan)
    out = write_checkpoint(model, None, tmp_path / "out", plan=plan, report={}, save_dtype=torch.float32)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert (list(reloaded.config.layer_types), dict(reloaded.config.rope_parameters)) == before
    assert reloaded.config.sliding_window == 8


def test_granite_multipliers_are_kept(tmp_path):
    model = tiny_model("granite", heads=4, kv_heads=4)
    plan = random_plan(model, 3, 3, 40)
    prune_(model, plan)
    out = write_checkpoint(model, None, tmp_path / "out", plan=plan, report={}, save_dtype=torch.float32)
    config = json.loads((out / "config.json").read_text())
    assert (config["attention_multiplier"], config["residual_multiplier"], config["embedding_multiplier"],
            config["logits_scaling"]) == (0.3, 0.6, 2.0, 1.5)
    assert config["model_type"] == "granite" and config["num_attention_heads"] == 3  # 3 does not divide 64


def test_smollm3_keeps_its_nope_layers(tmp_path, capsys):
    model = tiny_model("smollm3", heads=4, kv_heads=2, layers=4)
    assert model.config.no_rope_layers == [1, 0, 1, 0]
    plan = random_plan(model, 2, 1, 40)
    prune_(model, plan)
    out = write_checkpoint(model, None, tmp_path / "out", plan=plan, report={}, save_dtype=torch.float32)
    assert AutoModelForCausalLM.from_pretrained(out).config.no_rope_layers == [1, 0, 1, 0]
    assert main(["info", str(out)]) == 0
    assert "layers without rotary embedding (NoPE), kept as they are: [1, 3]" in capsys.readouterr().out


def test_shape_carries_the_head_rule_only_where_the_family_has_one():
    assert shape_of(tiny_model("gemma3_text", hidden=90, heads=6, kv_heads=2)).head_rule.counts == (1, 2, 3, 5, 6)
    assert shape_of(tiny_model("granite", hidden=90, heads=6, kv_heads=2)).head_rule is None


@pytest.mark.parametrize(("family", "settings", "message"), [
    ("gemma2", {"query_pre_attn_scalar": 20}, r"computes the attention scale as 1/sqrt\(16\)"),
    ("gemma3_text", {"query_pre_attn_scalar": 16, "sliding_window_pattern": 2}, "every 6th layer a full-attention"),
    ("smollm3", {"no_rope_layer_interval": 2}, "skips the rotary embedding in every 4th layer"),
])
def test_gguf_refuses_what_llamacpp_would_compute_differently(family, settings, message):
    config = tiny_model(family, **settings).config
    with pytest.raises(TransactError, match=message):
        get_adapter(config).gguf_target(config)


def test_gguf_of_a_granite_model_with_pruned_heads_is_refused():
    model = tiny_model("granite", heads=4, kv_heads=2)
    assert get_adapter(model).gguf_target(model.config).architecture == "granite"
    prune_(model, random_plan(model, 2, 1, 40))
    with pytest.raises(TransactError, match="granite converter ignores head_dim"):
        get_adapter(model).gguf_target(model.config)


def _longrope_phi3(partial: float = 1.0, **config):
    """A Phi-3 with longrope scaling as the released configs state it (original context at the top level), as
    Phi-3.5-mini (full rotary) and Phi-4-mini (partial) have: short/long factors of length
    hidden // heads × partial_rotary_factor / 2."""
    pairs = int(64 // 4 * partial) // 2
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": partial,
            "short_factor": [1.0 + 0.1 * i for i in range(pairs)],
            "long_factor": [2.0 + 0.2 * i for i in range(pairs)]}
    return tiny_model("phi3", heads=4, kv_heads=2, hidden=64, rope_parameters=rope,
                      original_max_position_embeddings=64, **config)


def test_phi3_fused_blocks_keep_their_layout():
    model = tiny_model("phi3", heads=4, kv_heads=2, hidden=64)
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.5  # partial rotary, as in Phi-4-mini
    layer = get_adapter(model).layers(model)[0]
    qkv, gate_up = layer.self_attn.qkv_proj.weight.clone(), layer.mlp.gate_up_proj.weight.clone()
    plan = random_plan(model, 2, 1, 40)
    prune_(model, plan)
    kept = plan.layers[0]
    q = torch.cat([qkv[h * 16:(h + 1) * 16] for h in kept.heads])
    k = torch.cat([qkv[64 + g * 16:64 + (g + 1) * 16] for g in kept.kv_heads])
    v = torch.cat([qkv[96 + g * 16:96 + (g + 1) * 16] for g in kept.kv_heads])
    assert torch.equal(layer.self_attn.qkv_proj.weight, torch.cat([q, k, v]))
    up = [96 + c for c in kept.mlp]
    assert torch.equal(layer.mlp.gate_up_proj.weight, torch.cat([gate_up[kept.mlp], gate_up[up]]))


def test_phi3_partial_rotary_longrope_heads_are_refused_and_its_mlp_prunes(tmp_path, capsys):
    base = tmp_path / "base"
    _longrope_phi3(partial=0.5).save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    assert main(["info", str(base)]) == 0
    info = capsys.readouterr().out
    assert "prunable heads    heads/kv 4/2\n" in info and "longrope short_factor (4 values)" in info
    out = tmp_path / "out"
    assert main(["prune", str(base), "--out", str(out), "--heads", "2", "--quiet", "--no-reconstruct"]) == 2
    assert "heads 2: transformers' Phi3Config requires the longrope short_factor" in capsys.readouterr().err
    assert not out.exists()

    model = _longrope_phi3(partial=0.5)
    plan = random_plan(model, 4, 2, 40)
    prune_(model, plan)
    write_checkpoint(model, None, out, plan=plan, report={}, save_dtype=torch.float32)
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(reloaded).__name__ == "Phi3ForCausalLM"
    x = torch.randint(0, VOCAB, (2, 80), generator=torch.Generator().manual_seed(0))  # past 64: long factors
    assert torch.equal(reloaded(x).logits, model(x).logits)


def test_phi3_full_rotary_longrope_with_pruned_heads_is_saved_as_mistral(tmp_path, capsys):
    """Phi3Config cannot hold 2 heads with this short_factor; the equivalent unfused Mistral checkpoint must
    compute the same logits, also past the original context (64) where the long factors apply."""
    model = _longrope_phi3()
    plan = random_plan(model, 2, 1, 40)
    prune_(model, plan)
    out = write_checkpoint(model, None, tmp_path / "out", plan=plan, report={}, save_dtype=torch.float32)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["num_attention_heads"] == 2
    assert config["rope_parameters"]["rope_type"] == "longrope"
    assert config["rope_parameters"]["original_max_position_embeddings"] == 64
    mistral = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(mistral).__name__ == "MistralForCausalLM"
    x = torch.randint(0, VOCAB, (2, 80), generator=torch.Generator().manual_seed(0))
    # unfused matmuls round differently from the fused ones: equal up to fp32 rounding, not bit for bit
    torch.testing.assert_close(mistral(x).logits, model(x).logits, rtol=0, atol=1e-5)
    with pytest.raises(TransactError, match="longrope"):
        get_adapter(mistral.config).gguf_target(mistral.config)
    assert main(["info", str(out)]) == 0 and "family            mistral" in capsys.readouterr().out


def test_phi3_longrope_layerwise_writes_the_same_mistral_checkpoint(tmp_path, corpus, capsys):
    base = tmp_path / "base"
    _longrope_phi3().save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    assert main(["info", str(base)]) == 0
    assert "saved as the equivalent MistralForCausalLM" in capsys.readouterr().out
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(corpus))
    args = ["--heads", "2", "--kv-heads", "1", "--mlp", "48", "--calib", str(calib), "--samples", "8",
            "--seq-len", "32", "--quiet"]
    assert main(["prune", str(base), "--out", str(tmp_path / "whole"), *args]) == 0
    assert main(["prune", str(base), "--out", str(tmp_path / "layered"), *args, "--layerwise", "--no-sequential"]) == 0
    models = [AutoModelForCausalLM.from_pretrained(tmp_path / d, attn_implementation="eager").eval()
              for d in ("whole", "layered")]
    assert [type(m).__name__ for m in models] == ["MistralForCausalLM"] * 2
    x = torch.randint(0, VOCAB, (2, 80), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(models[1](x).logits, models[0](x).logits, rtol=0, atol=1e-5)


def _vision_state(model) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in model.state_dict().items()
            if name.startswith(("model.vision_tower.", "model.multi_modal_projector."))}


def _pruned_to_2_1_48(tmp_path, corpus, dense, layerwise: bool):
    """``dense`` saved with the character tokenizer, pruned from the command line to 2 heads / 1 KV head /
    48 channels, calibrated on ``corpus``. -> (base, out) directories."""
    base = tmp_path / "base"
    dense.save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(corpus))
    out = tmp_path / "out"
    args = ["prune", str(base), "--out", str(out), "--heads", "2", "--kv-heads", "1", "--mlp", "48",
            "--calib", str(calib), "--samples", "8", "--seq-len", "32", "--quiet"]
    assert main(args + (["--layerwise"] if layerwise else [])) == 0
    return base, out


@pytest.mark.parametrize("layerwise", [False, True])
def test_gemma3_multimodal_prunes_its_language_model_only(tmp_path, corpus, layerwise):
    """A Gemma3ForConditionalGeneration: the language model is pruned (calibrated through the full model's
    own forward), the vision tower and projector come back bit for bit, image features are unchanged,
    and the checkpoint reloads as the same multimodal class."""
    dense = tiny_model("gemma3", heads=4, kv_heads=2, tie=True)
    base, out = _pruned_to_2_1_48(tmp_path, corpus, dense, layerwise)
    pruned = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(pruned).__name__ == "Gemma3ForConditionalGeneration"
    text = pruned.config.text_config
    assert (text.num_attention_heads, text.num_key_value_heads, text.intermediate_size) == (2, 1, 48)
    assert pruned.config.vision_config.num_attention_heads == 2  # the vision tower's own heads, untouched
    before, after = _vision_state(dense), _vision_state(pruned)
    assert before.keys() == after.keys() and len(before) > 10
    assert all(torch.equal(before[name], after[name]) for name in before)
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    reloaded_dense = AutoModelForCausalLM.from_pretrained(base).eval()  # the same attention kernels as `pruned`
    with torch.no_grad():
        features = [m.model.get_image_features(pixel_values=pixels) for m in (reloaded_dense, pruned)]
    features = [f.pooler_output if hasattr(f, "pooler_output") else f for f in features]
    assert torch.equal(features[0], features[1])


def test_an_iterative_schedule_keeps_to_the_head_rule():
    """Gemma 3 270M's shape (640 wide, 4 heads in 1 KV group): 4 -> 2 heads in two shots cannot pass
    through 3 heads, which Gemma3TextConfig refuses; the schedule takes 4 or 2 instead."""
    from transact.core.targets import Targets
    from transact.recovery.schedule import check_schedule, linear_schedule

    shape = shape_of(tiny_model("gemma3_text", hidden=640, heads=4, kv_heads=1, head_dim=16, mlp=64))
    assert shape.head_rule.counts == (1, 2, 4)
    steps = linear_schedule(shape, Targets(2, 1, 32), 2)
    assert steps[0].heads in (2, 4) and steps[0].mlp == 48 and steps[-1] == Targets(2, 1, 32)
    check_schedule(shape, steps)
    free = shape_of(tiny_model("qwen3", hidden=640, heads=4, kv_heads=1, head_dim=16, mlp=64))
    assert linear_schedule(free, Targets(2, 1, 32), 2)[0].heads == 3  # no rule: the nearest width


# ---------------------------------------------------------------- Qwen3.5: hybrid linear/softmax attention

def _qwen3_5_vision_state(model) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in model.state_dict().items() if name.startswith("model.visual.")}


def _linear_attention_state(model) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in model.state_dict().items() if ".linear_attn." in name}


@pytest.mark.parametrize("layerwise", [False, True])
def test_qwen3_5_multimodal_prunes_mlp_everywhere_and_heads_in_softmax_layers(tmp_path, corpus, layerwise):
    """A Qwen3_5ForConditionalGeneration with linear-attention layers 0 and 2: heads go only in layers 1 and
    3 (each head's query and output-gate rows together), MLP channels everywhere; the Gated DeltaNet blocks
    and the vision tower come back bit for bit; the checkpoint reloads as the same multimodal class, and
    vanilla AutoModelForCausalLM reads its language model with the same text logits."""
    from transformers import AutoModelForImageTextToText

    dense = tiny_model("qwen3_5", heads=4, kv_heads=2, layers=4)
    _, out = _pruned_to_2_1_48(tmp_path, corpus, dense, layerwise)

    pruned = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert type(pruned).__name__ == "Qwen3_5ForConditionalGeneration"
    text = pruned.config.text_config
    assert (text.num_attention_heads, text.num_key_value_heads, text.intermediate_size) == (2, 1, 48)
    assert text.layer_types == ["linear_attention", "full_attention"] * 2
    layers = pruned.model.language_model.layers
    assert layers[1].self_attn.q_proj.weight.shape == (2 * 2 * 16, 64)  # 2 heads x (query + gate)
    assert layers[1].self_attn.o_proj.weight.shape == (64, 2 * 16)
    assert all(layer.mlp.down_proj.weight.shape == (64, 48) for layer in layers)
    for name, keep in (("vision", _qwen3_5_vision_state), ("linear attention", _linear_attention_state)):
        before, after = keep(dense), keep(pruned)
        assert before.keys() == after.keys() and len(before) > 5, name
        assert all(torch.equal(before[k], after[k]) for k in before), name
    plan = json.loads((out / "plan.json").read_text())
    assert plan["source"]["attention_layers"] == [1, 3]
    assert [len(layer["heads"]) for layer in plan["layers"]] == [0, 2, 0, 2]

    text_only = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(text_only).__name__ == "Qwen3_5ForCausalLM"
    x = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(text_only(x).logits, pruned(x).logits)


def test_qwen3_5_info_names_its_layer_kinds_and_leaves_deltanet_value_heads(tmp_path, capsys):
    base = _saved(tmp_path, "qwen3_5_text", heads=4, kv_heads=2, layers=4)
    assert main(["info", str(base)]) == 0
    out = capsys.readouterr().out
    assert "softmax-attention layers (heads pruned there): [1, 3]" in out
    assert "linear-attention (Gated DeltaNet) layers, kept whole: [0, 2]" in out
    assert "4 value heads per layer could be removed exactly" in out and "transact does not do yet" in out
    assert "query and its output gate" in out
    assert "GGUF: converts as llama.cpp's 'qwen35' architecture" in out


def test_qwen3_5_costs_count_the_gate_rows_and_only_softmax_layers_cache_keys():
    model = tiny_model("qwen3_5_text", heads=4, kv_heads=2, layers=4)
    shape = shape_of(model)
    from transact.measure import costs

    # 2 softmax layers x (k + v) x 2 kv heads x 16 x 4 bytes; the DeltaNet state does not grow with tokens
    assert costs.kv_cache_bytes_per_token(shape, torch.float32) == 2 * 2 * 2 * 16 * 4
    attn = model.model.layers[1].self_attn
    assert costs.attention_parameters(shape) == sum(p.numel() for p in attn.parameters() if p.ndim == 2)


def _drop_value_heads(model, keep: list[int]):
    """A copy of ``model`` whose Gated DeltaNet layers keep only value heads ``keep``, sliced by hand: the
    value rows of in_proj_qkv and their conv1d channels, in_proj_z rows, in_proj_a/b rows, dt_bias, A_log,
    out_proj columns."""
    config = model.config
    lin = shape_of(model).linear_attention
    dv, v_start = lin.value_dim, 2 * lin.key_heads * lin.key_dim
    channels = torch.tensor([v_start + h * dv + i for h in keep for i in range(dv)])
    per_head = torch.tensor([h * dv + i for h in keep for i in range(dv)])
    heads = torch.tensor(keep)
    state = {}
    for name, t in model.state_dict().items():
        if ".linear_attn." in name:
            part = name.split(".linear_attn.")[1]
            if part in ("in_proj_qkv.weight", "conv1d.weight"):
                t = torch.cat([t[:v_start], t[channels]])
            elif part == "in_proj_z.weight":
                t = t[per_head]
            elif part in ("in_proj_a.weight", "in_proj_b.weight", "dt_bias", "A_log"):
                t = t[heads]
            elif part == "out_proj.weight":
                t = t[:, per_head]
        state[name] = t
    smaller = type(config).from_dict({**config.to_dict(), "linear_num_value_heads": len(keep)})
    copy = type(model)(smaller).eval()
    copy.load_state_dict(state, strict=True)
    return copy


def test_qwen3_5_deltanet_value_heads_can_be_removed_exactly():
    """The finding behind the note in ``transact info``: a value head whose out_proj columns are zero can be
    cut out of every Gated DeltaNet layer (one from each key head's group of two) with the logits unchanged
    up to fp32 rounding: each value head has its own state, decay, beta, output gate and per-head norm."""
    model = tiny_model("qwen3_5_text", heads=4, kv_heads=2, layers=4)
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    dense = model(x).logits
    keep, dv = [0, 3], 8  # value heads 0, 1 read key head 0 and 2, 3 key head 1: one of each group stays
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer, "linear_attn"):
                for h in set(range(4)) - set(keep):
                    layer.linear_attn.out_proj.weight[:, h * dv:(h + 1) * dv] = 0
    zeroed = model(x).logits
    assert (zeroed - dense).abs().max() > 1e-3  # the dropped heads mattered
    sliced = _drop_value_heads(model, keep)
    # fp32 rounding of differently shaped matmuls: up to 2.6e-5 seen on an AMD EPYC CPU (1e-3 is what the dropped
    # heads move, asserted above)
    torch.testing.assert_close(sliced(x).logits, zeroed, rtol=0, atol=1e-4)


@pytest.mark.parametrize("metric", metric_names())
def test_every_metric_prunes_a_hybrid_model(tmp_path, corpus, metric):
    """Each metric scores heads only where the layer has softmax attention (the others have none), and the
    checkpoint passes its reload check."""
    base = _saved(tmp_path, "qwen3_5_text", heads=4, kv_heads=2, layers=4)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(corpus))
    out = tmp_path / "out"
    assert main(["prune", str(base), "--out", str(out), "--heads", "2", "--mlp", "48", "--metric", metric,
                 "--calib", str(calib), "--samples", "6", "--seq-len", "32", "--quiet"]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert [len(layer["heads"]) for layer in plan["layers"]] == [0, 2, 0, 2]
    assert [len(layer["mlp"]) for layer in plan["layers"]] == [48] * 4


def test_qwen3_5_multi_token_prediction_head_is_left_out_layer_by_layer(tmp_path, corpus):
    """Released Qwen3.5 checkpoints carry an mtp.* head that transformers does not load; the layer-wise
    writer leaves it out as the whole-model save does (it has the dense widths, which the config no longer
    describes)."""
    from safetensors.torch import load_file, save_file

    base = _saved(tmp_path, "qwen3_5_text", heads=4, kv_heads=2, layers=2)
    weights = load_file(base / "model.safetensors")
    weights["mtp.fc.weight"] = torch.randn(64, 128)
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(corpus))
    out = tmp_path / "out"
    assert main(["prune", str(base), "--out", str(out), "--heads", "2", "--mlp", "48", "--calib", str(calib),
                 "--samples", "6", "--seq-len", "32", "--quiet", "--layerwise"]) == 0
    names = [name for f in out.glob("*.safetensors") for name in load_file(f)]
    assert names and not [name for name in names if name.startswith("mtp.")]


def test_qwen3_5_multimodal_recovers_with_lora_through_transact_run(tmp_path, corpus):
    """``transact run`` on a hybrid multimodal model: two shots with LoRA on every prunable projection of
    the language model (the softmax layers' q/k/v/o, every MLP), merged into a plain checkpoint of the
    same class; the Gated DeltaNet blocks get no adapters and the vision tower is not trained."""
    from transformers import AutoModelForImageTextToText

    dense = tiny_model("qwen3_5", heads=4, kv_heads=2, layers=4)
    result = two_shot_run(tmp_path, dense, corpus, {"heads": 2, "kv_heads": 1, "mlp": 48}, "lora", 3e-3)
    pruned = AutoModelForImageTextToText.from_pretrained(result.out).eval()
    assert type(pruned).__name__ == "Qwen3_5ForConditionalGeneration"
    assert pruned.config.text_config.num_attention_heads == 2
    before, after = _qwen3_5_vision_state(dense), _qwen3_5_vision_state(pruned)
    assert all(torch.equal(before[k], after[k]) for k in before)
    before, after = _linear_attention_state(dense), _linear_attention_state(pruned)
    assert all(torch.equal(before[k], after[k]) for k in before)
    down = "model.language_model.layers.0.mlp.down_proj.weight"
    plan = json.loads((result.out / "plan.json").read_text())
    kept = plan["layers"][0]["mlp"]
    assert not torch.equal(dense.state_dict()[down][:, kept], pruned.state_dict()[down])  # LoRA trained it
