"""A decoder whose layers have their own MLP widths and KV-head counts (``configuration_decilm.py``), built
from transformers' Llama modules: each layer is a ``LlamaDecoderLayer`` made from the model's config with
that layer's widths; a layer whose attention was dropped (``attention.no_op``) has ``SkippedAttention`` and no
input norm, one whose MLP was dropped (``ffn.no_op``) ``SkippedMlp`` and no post-attention norm. transact writes
this file into every checkpoint whose pruned widths differ between layers; transformers loads such a
checkpoint with ``trust_remote_code=True``."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from .configuration_decilm import DeciLMConfig


class SkippedAttention(nn.Module):
    """The attention of a layer that has none: it adds nothing to the residual stream (exactly: x + 0 == x)
    and holds no weights and no cache."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


def skip_attention_(layer: nn.Module) -> None:
    """Make a Llama-style decoder layer's attention a no-op, in place: ``self_attn`` becomes
    ``SkippedAttention`` and the input norm, which only feeds it, an identity."""
    layer.self_attn = SkippedAttention()
    layer.input_layernorm = nn.Identity()


class SkippedMlp(nn.Module):
    """The MLP of a layer that has none: it adds nothing to the residual stream and holds no weights."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def skip_mlp_(layer: nn.Module) -> None:
    """Make a Llama-style decoder layer's MLP a no-op, in place: ``mlp`` becomes ``SkippedMlp`` and the
    post-attention norm, which only feeds it, an identity."""
    layer.mlp = SkippedMlp()
    layer.post_attention_layernorm = nn.Identity()


def layer_config(config: DeciLMConfig, index: int) -> DeciLMConfig:
    """The model's config with layer ``index``'s KV heads and MLP width."""
    kv_heads, width = config.layer_widths(index)
    own = copy.copy(config)
    # a layer without attention (0 KV heads) or without MLP (width 0) is built as a Llama layer too, whose
    # sub-block is then replaced (``skip_attention_``, ``skip_mlp_``): any valid width serves for that moment
    own.num_key_value_heads = kv_heads or config.num_attention_heads
    own.intermediate_size = width or config.intermediate_size
    return own


def decoder_layer(config: DeciLMConfig, index: int) -> LlamaDecoderLayer:
    """Layer ``index``: a Llama decoder layer of its own widths; with ``qkv_bias``, q/k/v carry biases and
    o_proj none (Qwen2's layout)."""
    layer = LlamaDecoderLayer(layer_config(config, index), index)
    if config.block_configs[index].ffn.get("no_op"):
        skip_mlp_(layer)
    if config.block_configs[index].attention.get("no_op"):
        skip_attention_(layer)
        return layer
    # the attention kernel is read from the config at every call: the model's own, so that choosing another
    # (attn_implementation=..., set_attn_implementation) reaches every layer
    layer.self_attn.config = config
    if getattr(config, "qkv_bias", False):
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            old = getattr(attn, name)
            setattr(attn, name, nn.Linear(old.in_features, old.out_features, bias=True))
    return layer


class DeciLMModel(LlamaModel):
    config_class = DeciLMConfig

    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__(config)
        self.layers = nn.ModuleList(decoder_layer(config, i) for i in range(config.num_hidden_layers))
        self.post_init()


class DeciLMForCausalLM(LlamaForCausalLM):
    config_class = DeciLMConfig

    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__(config)
        self.model = DeciLMModel(config)
        self.post_init()
