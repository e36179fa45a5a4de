"""Checkpoints of models whose widths differ between layers, in the DeciLM / Nemotron-NAS layout.

A vanilla Llama or Qwen2 config has one MLP width and one KV-head count for every layer, so a model pruned to
per-layer widths (``transact.core.allocate``), or one whose attention or MLP was dropped in some layers
(``transact.core.sub_block_drop``), is saved as ``DeciLMForCausalLM``: the same tensor names, a
config with one ``block_configs`` entry per layer, and the configuration and modeling files the project
writes itself (``transact/decilm/``), copied beside the weights so that transformers loads the checkpoint
with ``trust_remote_code=True``. vLLM runs the layout natively; llama.cpp's converter reads it as ``deci``.
Which families fit the layout, and with which extra fields, is adapter data
(``CheckpointRules.per_layer``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from transact.arch import get_adapter
from transact.arch.adapter import head_layout
from transact.arch.shape import ATTENTION_DROPPED, MLP_DROPPED
from transact.decilm.configuration_decilm import MODEL_TYPE, DeciLMConfig
from transact.decilm.modeling_decilm import DeciLMForCausalLM
from transact.errors import TransactError

SOURCE = Path(__file__).parent.parent / "decilm"  # transact/decilm
FILES = ("configuration_decilm.py", "modeling_decilm.py")
AUTO_MAP = {"AutoConfig": "configuration_decilm.DeciLMConfig",
            "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}
# The Llama config fields a DeciLM config carries over from the pruned model's text config.
CARRIED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "hidden_act",
           "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache", "pad_token_id",
           "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters", "attention_bias",
           "attention_dropout", "mlp_bias")
ENGINE_MULTIPLE = 256  # vLLM and llama.cpp's converter round a width given as ffn_mult up to a multiple of 256


def layer_widths(model: nn.Module) -> list[tuple[int, int]]:
    """(KV heads, MLP width) of each decoder layer, read from its modules; 0 KV heads where the layer's
    attention was dropped, width 0 where its MLP was."""
    adapter = get_adapter(model)
    head_dim = head_layout(adapter.text_config(model.config))[2]
    return [(attn.k.weight.shape[0] // head_dim if attn is not None else 0,
             mlp.down.weight.shape[1] if mlp is not None else 0) for attn, mlp in adapter.layer_parts(model)]


def has_per_layer_widths(model: nn.Module) -> bool:
    """Whether the layers differ in width, or some lost their attention, so that no vanilla config describes
    the model."""
    adapter = get_adapter(model)
    if adapter.is_moe:
        return False
    text = adapter.text_config(model.config)
    if getattr(text, ATTENTION_DROPPED, None) or getattr(text, MLP_DROPPED, None):
        return True
    if any(attn is None for attn, _ in adapter.layer_parts(model)):
        return False  # a hybrid family's other layers
    return len(set(layer_widths(model))) > 1


def attention_block(heads: int, kv_heads: int) -> dict:
    """A layer's ``attention`` entry: its query heads per KV head, or a no-op where it has no KV heads."""
    if kv_heads == 0:
        return {"no_op": True, "replace_with_linear": False, "n_heads_in_group": None}
    return {"no_op": False, "replace_with_linear": False, "n_heads_in_group": heads // kv_heads}


def ffn_block(width: int, hidden: int) -> dict:
    """A layer's ``ffn`` entry: its MLP width (and ``ffn_mult`` where it states it exactly), or a no-op where the
    layer has no MLP."""
    if width == 0:
        return {"no_op": True, "replace_with_linear": False, "intermediate_size": None}
    return {"no_op": False, "replace_with_linear": False, "intermediate_size": width, **ffn_mult(width, hidden)}


def ffn_mult(width: int, hidden: int) -> dict[str, float]:
    """``{"ffn_mult": m}`` where the engines' rule (int(2 m hidden / 3), rounded up to a multiple of 256) gives
    back ``width`` exactly, else nothing (``intermediate_size`` alone then states the width)."""
    if width % ENGINE_MULTIPLE:
        return {}
    mult = round(1.5 * width / hidden, 6)
    derived = int(2 * mult * hidden / 3)
    derived += -derived % ENGINE_MULTIPLE
    return {"ffn_mult": mult} if derived == width else {}


def decilm_config(model: nn.Module) -> DeciLMConfig:
    """The DeciLM config of ``model`` as its modules are (refused, naming the rule, for a family the layout
    cannot hold)."""
    adapter = get_adapter(model)
    text = adapter.text_config(model.config)
    extra = adapter.per_layer_fields(model.config)
    heads = head_layout(text)[0]
    widths = layer_widths(model)
    blocks = [{"attention": attention_block(heads, kv), "ffn": ffn_block(width, text.hidden_size)}
              for kv, width in widths]
    carried = {key: getattr(text, key) for key in CARRIED if hasattr(text, key)}
    carried.update(extra)
    return DeciLMConfig(**carried, intermediate_size=max(w for _, w in widths),
                        num_key_value_heads=max(kv for kv, _ in widths), block_configs=blocks,
                        architectures=["DeciLMForCausalLM"], auto_map=dict(AUTO_MAP))


def decilm_model(model: nn.Module) -> DeciLMForCausalLM:
    """The same tensors, without copying, in a ``DeciLMForCausalLM`` (what the checkpoint holds)."""
    config = decilm_config(model)
    with torch.device("meta"):
        twin = DeciLMForCausalLM(config)
    state = {name: tensor for name, tensor in model.state_dict().items() if "rotary_emb" not in name}
    twin.load_state_dict(state, assign=True, strict=False)
    missing = [name for name, p in twin.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"the DeciLM model lacks values for {missing[:3]}")
    # the source's rotary module: the same frequencies, kept in fp32 (meta buffers have no values)
    twin.model.rotary_emb = getattr(model, model.base_model_prefix).rotary_emb
    if config.tie_word_embeddings:
        twin.tie_weights()
    twin.generation_config = model.generation_config
    twin.config._attn_implementation = model.config._attn_implementation  # the same kernel, the same sums
    return twin.eval()


def copy_code(directory: Path) -> None:
    """Put the configuration and modeling files beside the weights (what ``auto_map`` names)."""
    for name in FILES:
        shutil.copyfile(SOURCE / name, Path(directory) / name)


def read_config(directory: Path) -> DeciLMConfig:
    """The DeciLM config of a checkpoint in this layout, read with the project's own class (the copy beside the
    weights is not run); a layer of a kind transact does not write (no-op or linear blocks, widths given only
    as ``ffn_mult``) is refused by name."""
    try:
        return DeciLMConfig.from_pretrained(directory)
    except (ValueError, TypeError) as e:
        raise TransactError(f"{directory}: {e}; transact reads only the per-layer widths it writes") from None


def load_per_layer(directory: Path) -> DeciLMForCausalLM:
    """A checkpoint transact wrote in this layout, read with the project's own classes (the copies beside the
    weights are not run), fp32, eval mode."""
    return DeciLMForCausalLM.from_pretrained(directory, config=read_config(directory), dtype=torch.float32).eval()


def own_code_config(directory: Path, spec: str) -> DeciLMConfig | None:
    """The config of a checkpoint that brings its own modeling code (``auto_map`` in its config.json): one in
    this layout is read with the project's own classes (``read_config``), any other refused by name, since
    transformers would otherwise stop to ask whether to run it. None: the checkpoint brings none."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # transformers names what is wrong with it
    if not isinstance(config, dict) or "auto_map" not in config:
        return None
    if config.get("model_type") == MODEL_TYPE and "block_configs" in config:
        return read_config(Path(directory))
    raise TransactError(f"{spec!r} brings its own modeling code (model_type {config.get('model_type')!r}), which "
                        "transact does not run; it reads the per-layer checkpoints it writes itself (the DeciLM / "
                        "Nemotron-NAS layout) with its own classes")
