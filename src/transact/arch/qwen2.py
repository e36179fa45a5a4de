"""Qwen2 / Qwen2.5: the Llama block with q/k/v biases.

llama.cpp's ``qwen2`` architecture hard-codes the query projection as hidden × hidden and refuses a model
with pruned heads at load time. Its ``llama`` architecture reads the head size from
``attention.key_length``, loads optional q/k/v biases, and the converter permutes q/k (weights and
biases) for llama.cpp's rotary layout, which makes it compute exactly what a Qwen2 block computes. So a
Qwen2 model with pruned heads is converted as ``llama`` (its config.json presented to the converter as
Mistral, whose converter path is Llama's); an unpruned one keeps ``qwen2``.
"""

from transformers import PretrainedConfig

from transact.arch import register
from transact.arch.adapter import CheckpointRules, FamilyAdapter, GgufTarget, head_layout
from transact.errors import TransactError

# The Llama path reads the same keys; the q/k/v biases are optional tensors there. Qwen2 states a window it
# does not use (use_sliding_window is false), which the Llama path must not see.
_AS_LLAMA = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": None}


def qwen2_gguf(config: PretrainedConfig) -> GgufTarget:
    heads, _, head_dim = head_layout(config)
    if heads * head_dim == config.hidden_size:
        return GgufTarget("qwen2")
    if getattr(config, "use_sliding_window", False):
        raise TransactError("this Qwen2 model uses sliding-window attention and has pruned heads: llama.cpp's "
                            "qwen2 architecture cannot load pruned heads and its llama architecture has no "
                            "per-layer sliding window, so it cannot be converted faithfully")
    return GgufTarget("llama", config_overrides=_AS_LLAMA)


def qwen2_per_layer(config: PretrainedConfig) -> dict:
    """Qwen2 in the DeciLM layout: the Llama block with q/k/v biases (``qkv_bias``) and none on o_proj."""
    if getattr(config, "use_sliding_window", False):
        raise TransactError("this Qwen2 model uses sliding-window attention, which the DeciLM / Nemotron-NAS layout "
                            "(per-layer widths) cannot express")
    return {"qkv_bias": True, "attention_bias": False}


ADAPTER = register(FamilyAdapter("qwen2", gguf=qwen2_gguf, checkpoint=CheckpointRules(per_layer=qwen2_per_layer)))
