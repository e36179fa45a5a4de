"""Phi-3 / Phi-3.5 / Phi-4 / Phi-4-mini (``model_type`` ``phi3``): the Llama block with two fused
projections. ``self_attn.qkv_proj`` holds q, k and v as row blocks [q: heads·d | k: kv·d | v: kv·d], and
``mlp.gate_up_proj`` holds [gate: I | up: I]; pruning keeps the kept rows of each block, in that layout.
The attention scale is ``head_dim ** -0.5`` and the rotary dimension ``head_dim × partial_rotary_factor``,
both unchanged by pruning.

The trap: ``Phi3Config`` checks the length of a longrope ``short_factor`` (Phi-3-mini-128k, Phi-3.5-mini,
Phi-4-mini) against ``hidden_size // num_attention_heads × partial_rotary_factor / 2``, ignoring
``head_dim``, so such a checkpoint cannot be saved with another head count: its heads stay (MLP channels
can be pruned) and the refusal says why. Without longrope (Phi-3-mini-4k, Phi-4) any head count works.

llama.cpp's ``phi3`` converter derives the rotary dimension from ``hidden_size // heads`` and its loader
sizes the fused q block by the hidden size, so only checkpoints whose heads were not pruned are exported.
"""

from transformers import PretrainedConfig

from transact.arch import register
from transact.arch.base import FamilyAdapter, GgufTarget, HeadRule, head_layout
from transact.errors import TransactError


def _rotary_pairs(config: PretrainedConfig, heads: int) -> int:
    """What Phi3Config requires the short_factor length to be, for ``heads`` query heads."""
    return int(config.hidden_size // heads * config.rope_parameters.get("partial_rotary_factor", 1.0)) // 2


def phi3_head_rule(config: PretrainedConfig) -> HeadRule | None:
    short_factor = (config.rope_parameters or {}).get("short_factor")
    if short_factor is None:
        return None
    heads, _, _ = head_layout(config)
    counts = tuple(h for h in range(1, heads + 1) if _rotary_pairs(config, h) == len(short_factor))
    return HeadRule(counts, f"transformers' Phi3Config requires the longrope short_factor ({len(short_factor)} "
                            "values) to match hidden_size // heads (ignoring head_dim), so this model's heads "
                            "cannot be pruned; prune MLP channels only (--mlp)")


def phi3_gguf(config: PretrainedConfig) -> GgufTarget:
    heads, _, head_dim = head_layout(config)
    if heads * head_dim != config.hidden_size:
        raise TransactError("llama.cpp's phi3 architecture sizes the fused q block by the hidden size and its "
                            "converter derives the rotary dimension from hidden_size // heads, so a Phi-3 model "
                            "with pruned heads cannot be exported to GGUF (MLP-only pruning can)")
    return GgufTarget("phi3")


def phi3_notes(config: PretrainedConfig) -> tuple[str, ...]:
    return ("fused qkv_proj and gate_up_proj: each keeps the kept rows of its q/k/v (gate/up) blocks",
            "GGUF export: only without head pruning (llama.cpp's phi3 sizes q by the hidden size)")


ADAPTER = register(FamilyAdapter("phi3", qkv_name="qkv_proj", gate_up_name="gate_up_proj",
                                 head_rule=phi3_head_rule, gguf=phi3_gguf, notes=phi3_notes))
