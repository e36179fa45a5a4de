"""Gemma 3: text models (``Gemma3ForCausalLM``, ``model_type`` ``gemma3_text``) and the multimodal
checkpoints (``Gemma3ForConditionalGeneration``, ``model_type`` ``gemma3``: 4B, 12B, 27B). Gemma 2's block (see
``transact.arch.gemma2``) with per-head q/k RMSNorms (they act on ``head_dim``, so head pruning keeps
them), no attention soft-capping, and five sliding-window layers to each full one, each kind with its own
rotary base. The same trap: only head counts that divide the hidden size can be saved.

A multimodal checkpoint keeps its language model under ``model.language_model`` and its head counts in
``config.text_config``; only that model is pruned. The vision tower (with ``q_proj``s of its own) and the
projector are neither hooked nor touched, and the checkpoint reloads as the same multimodal class. Its
layers run one at a time (``--layerwise``) inside a one-layer ``Gemma3ForCausalLM``, which computes a text
layer exactly as the language model does for text without images.

llama.cpp's ``gemma3`` architecture places the full-attention layers itself (every sixth), so a checkpoint
whose ``layer_types`` follow another pattern is not exported. Its converter writes the language model of a
multimodal checkpoint (the vision tower goes to a separate projector file, which transact does not write).
"""

from __future__ import annotations

from transact.arch import register
from transact.arch.adapter import CheckpointRules, FamilyAdapter, ModuleNames
from transact.arch.gemma2 import (
    POST_ATTENTION_NORM,
    POST_MLP_NORM,
    full_attention_every,
    gemma_gguf,
    gemma_notes,
    heads_dividing_hidden,
    normed_mlp_output,
    soft_capping,
)

LLAMACPP_PERIOD = 6  # llama.cpp's gemma3: layers 6, 12, ... (1-based) attend to the full context

GEMMA3_27B_LAYERS = 62  # how llama.cpp recognises Gemma 3 27B

_GEMMA3 = dict(checkpoint=CheckpointRules(head_rule=heads_dividing_hidden),
               gguf=gemma_gguf("gemma3", GEMMA3_27B_LAYERS, check=full_attention_every(LLAMACPP_PERIOD, "gemma3")),
               notes=lambda config: gemma_notes(config, GEMMA3_27B_LAYERS), mlp_residual=normed_mlp_output,
               mlp_output_norm=POST_MLP_NORM, attention_output_norm=POST_ATTENTION_NORM)

# Gemma3ForCausalLM soft-caps its logits where the config sets a cap; Gemma3ForConditionalGeneration does not
ADAPTER = register(FamilyAdapter("gemma3_text", logit_transform=soft_capping, **_GEMMA3))
MULTIMODAL_ADAPTER = register(FamilyAdapter(
    "gemma3", names=ModuleNames(layers="model.language_model.layers", text_config="text_config"), **_GEMMA3))
