"""Qwen3.5 / Qwen3.6 dense: text models (``Qwen3_5ForCausalLM``, ``model_type`` ``qwen3_5_text``) and the
released multimodal checkpoints (``Qwen3_5ForConditionalGeneration``, ``model_type`` ``qwen3_5``).

A hybrid stack: ``layer_types`` makes three of every four layers linear attention (Gated DeltaNet,
``linear_attn``, no ``self_attn``) and the fourth softmax attention. MLP channels are pruned in every
layer, query heads and KV groups in the softmax-attention layers only. There, ``q_proj`` holds per head
2·head_dim rows, the query and then the gate that the head's output is multiplied by (sigmoid) before
``o_proj``: a head keeps or loses both blocks, and ``o_proj``'s input is still head_dim per head, so its
statistics and slicing are the standard ones. The per-head q/k RMSNorms act on head_dim and stay. The
rotary embedding turns ``head_dim × partial_rotary_factor`` dims of each head (interleaved M-RoPE), unchanged
by pruning; ``Qwen3_5TextConfig`` takes any head count with its explicit ``head_dim``.

The linear-attention layers are left as they are. Their value heads could be removed exactly (each has its
own recurrent state, decay, beta, output gate and per-head norm; ``out_proj`` reads it alone), but only
as many from every key head's group and the same number in every linear layer (the config has one
``linear_num_value_heads``, and value head j reads key head j // (value_heads / key_heads)); transact does
not prune them yet, and ``transact info`` says so.

A multimodal checkpoint keeps its language model under ``model.language_model``; the vision tower
(``model.visual``) is neither hooked nor touched. ``AutoModelForCausalLM`` would load such a checkpoint as
the text-only ``Qwen3_5ForCausalLM`` and drop the vision tower, so transact loads and checks it with
``AutoModelForImageTextToText`` and it reloads as the same multimodal class.

llama.cpp: the converter's ``qwen35`` architecture; see ``qwen35_gguf`` for what its loader takes.
"""

from __future__ import annotations

from transformers import AutoModelForImageTextToText, PretrainedConfig

from transact.arch import register
from transact.arch.adapter import CheckpointRules, FamilyAdapter, GgufTarget, HybridStack, ModuleNames
from transact.arch.mlp import ExpertMlp
from transact.arch.shape import LinearAttentionShape

FULL_ATTENTION = "full_attention"


def full_attention_layers(config: PretrainedConfig) -> tuple[int, ...]:
    return tuple(i for i, kind in enumerate(config.layer_types) if kind == FULL_ATTENTION)


def gated_deltanet(config: PretrainedConfig) -> LinearAttentionShape:
    return LinearAttentionShape(key_heads=config.linear_num_key_heads, value_heads=config.linear_num_value_heads,
                                key_dim=config.linear_key_head_dim, value_dim=config.linear_value_head_dim,
                                conv_kernel=config.linear_conv_kernel_dim)


def qwen3_5_notes(config: PretrainedConfig) -> tuple[str, ...]:
    full = full_attention_layers(config)
    linear = [i for i in range(config.num_hidden_layers) if i not in full]
    return (f"softmax-attention layers (heads pruned there): {list(full)}",
            f"linear-attention (Gated DeltaNet) layers, kept whole: {linear}; their "
            f"{config.linear_num_value_heads} value heads per layer could be removed exactly (the same number "
            f"from each of the {config.linear_num_key_heads} key heads' groups, in every such layer), which "
            "transact does not do yet",
            "MLP channels (of every expert, in a mixture of experts) are pruned in every layer",
            "each query head's q_proj block holds its query and its output gate (2 x head_dim rows); a head "
            "keeps or loses both",
            "the multi-token-prediction head (mtp.*) of released checkpoints is not loaded by transformers, so "
            "a pruned checkpoint has none (llama.cpp's MTP speculative decoding is not available with it)")


def qwen35_gguf(config: PretrainedConfig) -> GgufTarget:
    # transformers never loads the multi-token-prediction head (mtp.*) that released checkpoints carry, so a
    # pruned checkpoint has none; the converter must not look for it
    return GgufTarget("qwen35", converter_args=("--no-mtp",))


_QWEN3_5 = dict(hybrid=HybridStack(full_attention_layers, gated_deltanet), q_gated=True, notes=qwen3_5_notes,
                gguf=qwen35_gguf)
# A multimodal checkpoint: its language model's layers, and the class that loads the vision tower too.
_MULTIMODAL = dict(names=ModuleNames(layers="model.language_model.layers", text_config="text_config"),
                   checkpoint=CheckpointRules(auto_class=AutoModelForImageTextToText))

ADAPTER = register(FamilyAdapter("qwen3_5_text", **_QWEN3_5))
MULTIMODAL_ADAPTER = register(FamilyAdapter("qwen3_5", **_MULTIMODAL, **_QWEN3_5))


# Qwen3.5 / 3.6 mixtures of experts (Qwen3.5-35B-A3B and larger; ``qwen3_5_moe_text``, multimodal
# ``qwen3_5_moe``): the same hybrid stack, with a mixture of experts and a shared expert in every layer's
# MLP. llama.cpp converts them as its ``qwen35moe`` architecture.
def qwen35moe_gguf(config: PretrainedConfig) -> GgufTarget:
    return GgufTarget("qwen35moe", converter_args=("--no-mtp",))


_QWEN3_5_MOE = {**_QWEN3_5, "gguf": qwen35moe_gguf, "mlp_layout": ExpertMlp(shared="shared_expert")}

MOE_ADAPTER = register(FamilyAdapter("qwen3_5_moe_text", **_QWEN3_5_MOE))
MULTIMODAL_MOE_ADAPTER = register(FamilyAdapter("qwen3_5_moe", **_MULTIMODAL, **_QWEN3_5_MOE))
