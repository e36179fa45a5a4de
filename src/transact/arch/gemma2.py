"""Gemma 2: the Llama block with sandwich norms (a norm after attention and after the MLP, before each
residual add), ``(1 + w)`` RMSNorm gains, a scaled embedding, GeGLU, soft-capped attention and final
logits, and alternating sliding-window layers (llama.cpp places them itself: layers whose ``layer_types``
do not alternate, as after dropping one layer, are not exported). None of these depends on the head or channel count:
slicing heads and channels is exact, and the attention scale ``query_pre_attn_scalar ** -0.5`` is a
stored constant that a pruned checkpoint keeps.

The trap: ``Gemma2Config`` (like ``Gemma3TextConfig``) refuses ``hidden_size % num_attention_heads != 0``
even with an explicit ``head_dim``, and no other config class computes the same network, so only head
counts that divide the hidden size can be saved. transformers has no SDPA path for Gemma 2 (SDPA cannot
soft-cap), so it runs, and is calibrated, with eager attention.

llama.cpp (``gemma2``, ``gemma3``) sizes the query projection by heads × ``attention.key_length``, so
pruned heads load, but it does not read ``query_pre_attn_scalar``: it takes the scale as
``1/sqrt(head_dim)``, except for the 27B models (recognised by their layer count), where it takes
``1/sqrt(hidden_size // heads)``. A checkpoint is exported only where that equals the stored constant.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PretrainedConfig

from transact.arch import register
from transact.arch.adapter import CheckpointRules, FamilyAdapter, GgufTarget, NormGain, head_layout
from transact.arch.shape import HeadRule
from transact.errors import TransactError


def heads_dividing_hidden(config: PretrainedConfig) -> HeadRule:
    """Head counts up to the model's own that divide its hidden size (what the Gemma configs accept)."""
    heads, _, _ = head_layout(config)
    counts = tuple(h for h in range(1, heads + 1) if config.hidden_size % h == 0)
    return HeadRule(counts, f"transformers' {type(config).__name__} refuses head counts that do not divide "
                            f"hidden_size {config.hidden_size} (even with head_dim), and no equivalent config "
                            "class accepts them")


def llamacpp_attention_scale_dim(config: PretrainedConfig, layers_27b: int) -> int:
    """The number whose inverse square root llama.cpp takes as the attention scale of a Gemma model."""
    heads, _, head_dim = head_layout(config)
    return config.hidden_size // heads if config.num_hidden_layers == layers_27b else head_dim


def full_attention_every(period: int, architecture: str) -> Callable[[PretrainedConfig], str | None]:
    """llama.cpp's Gemma architectures place the full-attention layers themselves (every ``period``th, the
    others sliding): the check that refuses a checkpoint whose ``layer_types`` differ (dropped layers can
    break the pattern)."""

    def check(config: PretrainedConfig) -> str | None:
        expected = ["full_attention" if (i + 1) % period == 0 else "sliding_attention"
                    for i in range(config.num_hidden_layers)]
        if list(config.layer_types) != expected:
            return (f"llama.cpp's {architecture} architecture makes every {period}th layer a full-attention layer; "
                    f"this model's layer_types differ ({config.layer_types}), so it is not exported")
        return None

    return check


def gemma_gguf(architecture: str, layers_27b: int, check: Callable[[PretrainedConfig], str | None] | None = None
               ) -> Callable[[PretrainedConfig], GgufTarget]:
    """The GGUF rule of a Gemma family: its own llama.cpp architecture, refused where llama.cpp would use
    another attention scale than the checkpoint's (or where ``check`` names another mismatch)."""

    def target(config: PretrainedConfig) -> GgufTarget:
        scale_dim = llamacpp_attention_scale_dim(config, layers_27b)
        if config.query_pre_attn_scalar != scale_dim:
            raise TransactError(
                f"llama.cpp's {architecture} architecture computes the attention scale as 1/sqrt({scale_dim}) "
                f"for this model (from its head size, or hidden_size // heads for the 27B shape), but the "
                f"checkpoint's query_pre_attn_scalar is {config.query_pre_attn_scalar}; it would not compute "
                "the same attention, so it is not exported")
        problem = check(config) if check else None
        if problem:
            raise TransactError(problem)
        return GgufTarget(architecture)

    return target


def gemma_notes(config: PretrainedConfig, layers_27b: int) -> tuple[str, ...]:
    notes = ("attention scale query_pre_attn_scalar ** -0.5 is kept as stored, whatever the head count",)
    if config.num_hidden_layers == layers_27b:
        notes += ("GGUF: llama.cpp derives this model's attention scale from hidden_size // heads, so a "
                  "checkpoint with pruned heads cannot be exported (MLP-only pruning can)",)
    return notes


def soft_capping(config: PretrainedConfig) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Gemma's final logit soft-capping, cap * tanh(logits / cap), where the config sets a cap."""
    cap = getattr(config, "final_logit_softcapping", None)
    return None if cap is None else lambda logits: torch.tanh(logits / cap) * cap


def gemma2_notes(config: PretrainedConfig) -> tuple[str, ...]:
    return ("runs and calibrates with eager attention (transformers has no SDPA path with soft-capping)",
            *gemma_notes(config, GEMMA2_27B_LAYERS))


def normed_mlp_output(config: PretrainedConfig) -> None:
    """Gemma's MLP output passes through post_feedforward_layernorm before it joins the residual stream, so
    no linear map on it folds into down_proj (see ``FamilyAdapter.mlp_residual``); the norm's gain, stored as
    an offset from 1, can carry a per-channel one (``POST_MLP_NORM``)."""
    return None


POST_MLP_NORM = NormGain("post_feedforward_layernorm", offset=1.0)
POST_ATTENTION_NORM = NormGain("post_attention_layernorm", offset=1.0)


GEMMA2_27B_LAYERS = 46  # how llama.cpp recognises Gemma 2 27B

ADAPTER = register(FamilyAdapter("gemma2", checkpoint=CheckpointRules(head_rule=heads_dividing_hidden),
                                 gguf=gemma_gguf("gemma2", GEMMA2_27B_LAYERS, check=full_attention_every(2, "gemma2")),
                                 notes=gemma2_notes,
                                 logit_transform=soft_capping, mlp_residual=normed_mlp_output,
                                 mlp_output_norm=POST_MLP_NORM, attention_output_norm=POST_ATTENTION_NORM))
