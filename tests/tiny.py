"""Tiny deterministic models of every supported family, and a character tokenizer, built in-test."""

from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, PreTrainedTokenizerFast

from transact.arch import FAMILIES as ADAPTERS
from transact.arch import SUPPORTED_MODEL_TYPES, get_adapter, shape_of
from transact.core.metrics.random_choice import random_layer_scores
from transact.core.select import make_plan
from transact.core.step import apply_step
from transact.core.targets import Targets

# Every registered family transact prunes enters the test matrix (exact surgery, round trips, FLOPs); a family
# whose tiny config needs settings of its own lists them in FAMILY_SETTINGS. A family the adapters only read
# (per-layer checkpoints, ``nemotron-nas``: no config of its own in transformers, never pruned again) is
# tested where transact writes it (tests/test_per_layer.py).
FAMILIES = tuple(name for name in SUPPORTED_MODEL_TYPES if ADAPTERS.get(name).prune_refusal is None)
# Settings are chosen so that every family constant pruning must keep is away from its neutral value: an
# attention scale that is not head_dim ** -0.5, windows shorter than the test prompts, NoPE layers.
FAMILY_SETTINGS = {
    "mistral": {"sliding_window": None},
    "gemma2": {"sliding_window": 8, "query_pre_attn_scalar": 20},
    "gemma3_text": {"sliding_window": 8, "query_pre_attn_scalar": 20, "sliding_window_pattern": 2},
    "granite": {"attention_multiplier": 0.3, "residual_multiplier": 0.6, "embedding_multiplier": 2.0,
                "logits_scaling": 1.5},
    "smollm3": {"no_rope_layer_interval": 2},
    "phi3": {"partial_rotary_factor": 0.5},
    # softmax attention in every second layer (the released models: every fourth), and more value heads than
    # key heads in the linear-attention layers, as released; interleaved M-RoPE sections that fill the rotary
    # dims (8 of head_dim 16: 4 frequencies), as the released 11/11/10 fill 64 of 256
    "qwen3_5_text": {"full_attention_interval": 2, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                     "linear_key_head_dim": 8, "linear_value_head_dim": 8,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                         "mrope_section": [2, 1, 1], "mrope_interleaved": True}},
    # four experts, each token routed to two, renormalised among them as in the released Qwen3-MoE models
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": False},
}
# Qwen3.5-MoE: the Qwen3.5 hybrid stack with four experts, two per token, and a shared expert
FAMILY_SETTINGS["qwen3_5_moe_text"] = {**FAMILY_SETTINGS["qwen3_5_text"], "num_experts": 4, "num_experts_per_tok": 2}
# Mixtures of experts whose experts' width is a config key of its own (``mlp`` sets it too).
EXPERT_WIDTH = dict.fromkeys(("qwen3_moe", "qwen2_moe", "qwen3_5_moe_text"), "moe_intermediate_size")
# Mixtures of experts with a shared expert: ``mlp`` sets its width too.
SHARED_WIDTH = dict.fromkeys(("qwen2_moe", "qwen3_5_moe_text"), "shared_expert_intermediate_size")
VOCAB = 128
# Multimodal families: their text family, whose settings the language model takes, and a tiny vision tower.
MULTIMODAL = {"gemma3": "gemma3_text", "qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}
TINY_VISION = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2,
               "image_size": 28, "patch_size": 14}
TINY_QWEN3_5_VISION = {"depth": 1, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "patch_size": 4,
                       "spatial_merge_size": 2, "temporal_patch_size": 2}
# Families whose config class refuses a head count that does not divide the hidden size, with no equivalent
# class to save such a checkpoint as (arch/gemma2.py): those widths must be refused.
HEADS_MUST_DIVIDE_HIDDEN = ("gemma2", "gemma3_text", "gemma3")
# Families whose released checkpoints tie the input embedding and the LM head.
TIED = ("qwen3", "gemma2", "gemma3_text", "gemma3", "qwen3_5_text", "qwen3_5")  # (Qwen3.5-MoE: untied)

# words of the training texts the run tests build
WORDS = "the cat sat on a mat and then it ran to the dog who was very happy about it".split()


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character; id 0 = <unk>, id 1 = </s>."""
    vocab = {"<unk>": 0, "</s>": 1} | {chr(c): c for c in range(32, 127)} | {"\n": 10}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="</s>")


def tiny_config(family: str, *, heads: int = 4, kv_heads: int = 2, head_dim: int = 16, hidden: int = 64,
                mlp: int = 96, layers: int = 2, tie: bool = False, **extra):
    kwargs = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                  max_position_embeddings=512, tie_word_embeddings=tie, bos_token_id=None, eos_token_id=1,
                  pad_token_id=1)
    text_family = MULTIMODAL.get(family, family)
    kwargs.update(FAMILY_SETTINGS.get(text_family, {}))
    if text_family in EXPERT_WIDTH:
        kwargs[EXPERT_WIDTH[text_family]] = mlp
    if text_family in SHARED_WIDTH:
        kwargs[SHARED_WIDTH[text_family]] = mlp
    kwargs.update(extra)
    if family not in MULTIMODAL:
        return AutoConfig.for_model(family, **kwargs)
    # The image tokens lie outside the text vocabulary, so no text input (random test ids included) holds one.
    text = AutoConfig.for_model(text_family, **kwargs).to_dict()
    if family in ("qwen3_5", "qwen3_5_moe"):
        return AutoConfig.for_model(family, text_config=text, tie_word_embeddings=tie,
                                    vision_config={**TINY_QWEN3_5_VISION, "out_hidden_size": hidden},
                                    image_token_id=VOCAB + 3, video_token_id=VOCAB + 4,
                                    vision_start_token_id=VOCAB + 1, vision_end_token_id=VOCAB + 2)
    return AutoConfig.for_model(family, text_config=text, vision_config=TINY_VISION, mm_tokens_per_image=4,
                                boi_token_index=VOCAB + 1, eoi_token_index=VOCAB + 2, image_token_index=VOCAB + 3,
                                tie_word_embeddings=tie)


def random_plan(model, heads: int, kv_heads: int, mlp: int, seed: int = 0, experts: int | None = None):
    """A plan keeping ``heads``/``kv_heads``/``mlp`` per layer, chosen by seeded random scores; a mixture of
    experts keeps ``experts`` experts (default: one fewer than it has) of ``mlp`` channels each."""
    from transact.arch import shape_of
    from transact.core.metrics.random_choice import random_layer_scores
    from transact.core.select import make_plan
    from transact.core.targets import Targets, shared_width

    shape = shape_of(model.config)
    scores = random_layer_scores(shape, seed)
    if shape.is_moe and experts is None:
        experts = shape.num_experts - 1
    return make_plan(scores.heads, scores.mlp, Targets(heads, kv_heads, mlp, experts, shared_width(shape, mlp)), shape,
                     scores.experts, scores.shared)


def load_kwargs(config) -> dict:
    """How the tests load a tiny model: eager attention; torch's grouped matmul (transformers' default for
    experts) needs 16-byte rows, so a hidden size that is no multiple of 4 fp32 values runs the experts'
    eager loop instead."""
    text = config.get_text_config()
    odd_experts = get_adapter(config).is_moe and text.hidden_size % 4
    return {"attn_implementation": "eager", **({"experts_implementation": "eager"} if odd_experts else {})}


def same_weights(first_dir, second_dir) -> bool:
    """Whether two checkpoints' model.safetensors hold the same tensors, bit for bit."""
    from safetensors.torch import load_file

    first, again = load_file(f"{first_dir}/model.safetensors"), load_file(f"{second_dir}/model.safetensors")
    return first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def tiny_model(family: str, seed: int = 0, **config_kwargs):
    """A model whose every parameter (biases and norm gains included) is random, so no slicing error can
    hide behind a zero or a one."""
    config = tiny_config(family, **config_kwargs)
    torch.manual_seed(seed)
    model_class = get_adapter(config).model_class()  # a multimodal family's full class, vision tower included
    model = model_class.from_config(config, dtype=torch.float32, **load_kwargs(config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    return model.eval()


def saved_model_and_text(tmp_path, family: str, corpus: list[str], **config_kwargs):
    """A tiny model of ``family`` (4 heads in 2 KV groups; ``config_kwargs`` as ``tiny_config`` takes them)
    saved with its tokenizer under ``tmp_path/base``, and ``corpus`` as a calibration file."""
    base = tmp_path / "base"
    tiny_model(family, heads=4, kv_heads=2, **config_kwargs).save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(corpus))
    return base, calib


def two_shot_run(tmp_path, dense, corpus: list[str], target: dict, method: str, lr: float):
    """``transact run`` of ``dense`` (saved with the character tokenizer) to ``target`` in two shots of
    1,024 training tokens each with ``method`` at ``lr``, calibrated, trained and scored on ``corpus``."""
    from transact.recipes import RunRecipe
    from transact.recovery import loop

    base = tmp_path / "base"
    dense.save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    text = tmp_path / "train.txt"
    text.write_text("\n\n".join(corpus))
    recipe = RunRecipe.from_dict({
        "model": str(base), "out": str(tmp_path / "out"), "device": "cpu", "target": target, "shots": 2,
        "calibration": {"text": str(text), "samples": 6, "seq_len": 32, "seed": 0},
        "training": {"data": str(text), "method": method, "tokens_per_shot": 1024, "final_tokens": 0,
                     "seq_len": 32, "batch_size": 4, "lr": lr},
        "heldout": {"text": str(text), "tokens": 512, "window": 128}})
    return loop.run(recipe, progress=False)


def run_killed_at(transact_bin, recipe, out, phase: int = 2, step: int = 10, timeout: float = 240,
                  command: list[str] | None = None, env: dict | None = None) -> int:
    """Start ``transact run RECIPE`` (or ``command``) and SIGKILL it, with every process it started, once its
    saved state (``OUT/state/progress.json``) is at least ``step`` steps into ``phase``; -> the process's
    return code (-SIGKILL when it was killed, not ended)."""
    import contextlib
    import json
    import os
    import signal
    import subprocess
    import time
    from pathlib import Path

    proc = subprocess.Popen(command or [str(transact_bin), "run", str(recipe), "--quiet"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    progress = Path(out) / "state" / "progress.json"
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        try:
            saved = json.loads(progress.read_text())
            if (saved["phase"], saved["step"]) >= (phase, step):
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    time.sleep(0.2)
    for pid in [proc.pid, *descendants(proc.pid)]:  # a launcher's workers too, as when the machine stops
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return proc.wait()


def descendants(pid: int) -> list[int]:
    """Every process started by ``pid``, its children's too (read from /proc; a launcher such as torchrun
    starts its workers in sessions of their own)."""
    from pathlib import Path

    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def per_layer_model(family: str, widths: list[int]):
    """A tiny model of ``family`` with 2 of its 4 heads (one KV group) and MLP widths ``widths`` per layer,
    chosen by seeded random scores; -> (model, plan)."""
    model = tiny_model(family, layers=len(widths))
    shape = shape_of(model)
    scores = random_layer_scores(shape, 0)
    plan = make_plan(scores.heads, scores.mlp, Targets(2, 1, sum(widths) // len(widths)), shape,
                     mlp_widths=widths)
    return model, apply_step(model, plan)
