"""Phi-3 / Phi-3.5 / Phi-4 / Phi-4-mini (``model_type`` ``phi3``): the Llama block with two fused
projections. ``self_attn.qkv_proj`` holds q, k and v as row blocks [q: heads·d | k: kv·d | v: kv·d], and
``mlp.gate_up_proj`` holds [gate: I | up: I]; pruning keeps the kept rows of each block, in that layout.
The attention scale is ``head_dim ** -0.5`` and the rotary dimension ``head_dim × partial_rotary_factor``,
both unchanged by pruning.

The trap: ``Phi3Config`` checks the length of a longrope ``short_factor`` (Phi-3-mini-128k, Phi-3.5-mini,
Phi-4-mini) against ``hidden_size // num_attention_heads × partial_rotary_factor / 2``, ignoring
``head_dim``, so such a checkpoint cannot be saved as Phi-3 with another head count. With full rotary
(Phi-3-mini-128k, Phi-3.5-mini) it is saved as the equivalent ``MistralForCausalLM``: q/k/v and gate/up
unfused, the same ``rope_parameters`` (longrope's short and long factors and original context), the same
window; transformers' Mistral computes exactly what Phi-3 computes (checked on write, and in the tests past
the original context, where the long factors apply). With partial rotary (Phi-4-mini, 0.75) there is no
such class (Mistral rotates the whole head), so its heads stay (MLP channels can be pruned) and the refusal
says why. Without longrope (Phi-3-mini-4k, Phi-4) any head count works.

llama.cpp's ``phi3`` converter derives the rotary dimension from ``hidden_size // heads`` and its loader
sizes the fused q block by the hidden size, so only checkpoints whose heads were not pruned are exported.
"""

import torch
from transformers import MistralConfig, PretrainedConfig

from transact.arch import register
from transact.arch.adapter import CheckpointRules, FamilyAdapter, GgufTarget, ModuleNames, head_layout
from transact.arch.mlp import DenseMlp
from transact.arch.shape import HeadRule
from transact.errors import TransactError


def _rotary_pairs(config: PretrainedConfig, heads: int) -> int:
    """What Phi3Config requires the short_factor length to be, for ``heads`` query heads."""
    return int(config.hidden_size // heads * config.rope_parameters.get("partial_rotary_factor", 1.0)) // 2


def _short_factor(config: PretrainedConfig) -> list | None:
    return (config.rope_parameters or {}).get("short_factor")


def _partial_rotary(config: PretrainedConfig) -> bool:
    return config.rope_parameters.get("partial_rotary_factor", 1.0) != 1.0


def phi3_loadable(config: PretrainedConfig) -> bool:
    """Whether Phi3Config accepts this config's head count (always, without a longrope short_factor)."""
    short_factor = _short_factor(config)
    return short_factor is None or _rotary_pairs(config, config.num_attention_heads) == len(short_factor)


def phi3_head_rule(config: PretrainedConfig) -> HeadRule | None:
    short_factor = _short_factor(config)
    if short_factor is None or not _partial_rotary(config):
        return None  # any head count: as Phi-3, or (longrope, full rotary) as the equivalent Mistral
    heads, _, _ = head_layout(config)
    counts = tuple(h for h in range(1, heads + 1) if _rotary_pairs(config, h) == len(short_factor))
    return HeadRule(counts, f"transformers' Phi3Config requires the longrope short_factor ({len(short_factor)} "
                            "values) to match hidden_size // heads (ignoring head_dim), and with partial rotary "
                            "no other class computes Phi-3's attention, so this model's heads cannot be pruned; "
                            "prune MLP channels only (--mlp)")


# Phi3Config keys that MistralConfig reads the same way (everything else is Phi-3's own or rewritten on save).
_AS_MISTRAL = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
               "rms_norm_eps", "use_cache", "tie_word_embeddings", "sliding_window", "attention_dropout",
               "pad_token_id", "bos_token_id", "eos_token_id", "dtype")


def phi3_portable_config(config: PretrainedConfig) -> PretrainedConfig:
    """The config itself where Phi3Config accepts it, else the equivalent MistralConfig (see the module
    docstring)."""
    if phi3_loadable(config):
        return config
    if _partial_rotary(config):
        raise TransactError(phi3_head_rule(config).why)
    values = {k: v for k, v in config.to_dict().items() if k in _AS_MISTRAL}
    rope = dict(config.rope_parameters)
    rope.setdefault("original_max_position_embeddings", config.original_max_position_embeddings)
    return MistralConfig(**values, rope_parameters=rope, architectures=["MistralForCausalLM"])


def phi3_portable_state(state: dict[str, torch.Tensor], config: PretrainedConfig) -> dict[str, torch.Tensor]:
    """Phi-3's fused tensors split into Mistral's q/k/v and gate/up (views, no copies), for a checkpoint
    saved as Mistral; ``state`` may be a whole model's or one layer's."""
    heads, kv_heads, head_dim = head_layout(config)
    q, kv, mlp = heads * head_dim, kv_heads * head_dim, config.intermediate_size
    out = {}
    for name, tensor in state.items():
        if "qkv_proj." in name:
            parts = (("q_proj", tensor[:q]), ("k_proj", tensor[q:q + kv]), ("v_proj", tensor[q + kv:]))
            out.update((name.replace("qkv_proj", part), value) for part, value in parts)
        elif "gate_up_proj." in name:
            out.update(((name.replace("gate_up_proj", "gate_proj"), tensor[:mlp]),
                        (name.replace("gate_up_proj", "up_proj"), tensor[mlp:])))
        else:
            out[name] = tensor
    return out


def phi3_gguf(config: PretrainedConfig) -> GgufTarget:
    heads, _, head_dim = head_layout(config)
    if heads * head_dim != config.hidden_size:
        raise TransactError("llama.cpp's phi3 architecture sizes the fused q block by the hidden size and its "
                            "converter derives the rotary dimension from hidden_size // heads, so a Phi-3 model "
                            "with pruned heads cannot be exported to GGUF (MLP-only pruning can)")
    return GgufTarget("phi3")


def phi3_notes(config: PretrainedConfig) -> tuple[str, ...]:
    notes = ("fused qkv_proj and gate_up_proj: each keeps the kept rows of its q/k/v (gate/up) blocks",
             "GGUF export: only without head pruning (llama.cpp's phi3 sizes q by the hidden size)")
    if _short_factor(config) is not None and not _partial_rotary(config):
        notes += ("longrope: with pruned heads the checkpoint is saved as the equivalent MistralForCausalLM "
                  "(Phi3Config cannot hold the new head count; llama.cpp cannot take longrope)",)
    return notes


ADAPTER = register(FamilyAdapter(
    "phi3", names=ModuleNames(qkv="qkv_proj"), mlp_layout=DenseMlp(gate_up="gate_up_proj"),
    checkpoint=CheckpointRules(head_rule=phi3_head_rule, portable_config=phi3_portable_config,
                               portable_state=phi3_portable_state),
    gguf=phi3_gguf, notes=phi3_notes))
