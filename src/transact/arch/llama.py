"""Llama (Llama 1/2/3, SmolLM): the one family whose pruned checkpoints cannot always keep their own
config class.

transformers 5.x ``LlamaConfig`` refuses ``hidden_size % num_attention_heads != 0`` even when ``head_dim``
is given, at construction and in ``from_pretrained`` (transformers issue #46082). Pruning heads (say 6 of
32 on a 4096-wide model) produces exactly such a model. ``MistralConfig`` accepts any head count with an
explicit ``head_dim``, and ``MistralForCausalLM`` with ``sliding_window=None`` computes exactly what
``LlamaForCausalLM`` computes: the same module names, RMSNorm, gated SiLU MLP, the same rotary embedding
code (``rope_parameters`` including the ``llama3`` scaling type), causal attention. vLLM serves
``MistralForCausalLM`` with its Llama implementation and llama.cpp's converter maps it to its ``llama``
architecture, which reads the head size from ``attention.key_length``. So a Llama model whose pruned head
count does not divide the hidden size is saved as a Mistral checkpoint; otherwise it stays Llama.

Two Llama options have no Mistral counterpart (``attention_bias``, ``mlp_bias``): such a model with an
indivisible head count is refused with a clear message rather than saved in a form that would load wrong,
and o_proj/down_proj biases (FLAP's compensation) are only possible with a head count that divides.
"""

from __future__ import annotations

from transformers import MistralConfig, PretrainedConfig

from transact.arch import register
from transact.arch.adapter import CheckpointRules, FamilyAdapter, GgufTarget
from transact.errors import TransactError

# Keys that only LlamaConfig knows, or that save_pretrained rewrites itself.
_LLAMA_ONLY_KEYS = ("attention_bias", "mlp_bias", "pretraining_tp", "model_type", "architectures",
                    "transformers_version", "auto_map")


def llama_config_is_loadable(config: PretrainedConfig) -> bool:
    return config.hidden_size % config.num_attention_heads == 0


def llama_portable_config(config: PretrainedConfig) -> PretrainedConfig:
    """The config a pruned Llama checkpoint is saved with: itself when LlamaConfig accepts it, else the
    equivalent MistralConfig."""
    if llama_config_is_loadable(config):
        return config
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise TransactError(
            f"{config.num_attention_heads} heads do not divide hidden_size {config.hidden_size}, which "
            "transformers' LlamaConfig refuses to load, and this model uses attention_bias/mlp_bias, which "
            "the equivalent Mistral config cannot express. Choose a head count that divides "
            f"{config.hidden_size}."
        )
    values = {k: v for k, v in config.to_dict().items() if k not in _LLAMA_ONLY_KEYS}
    values["sliding_window"] = None  # Llama attends to the whole context
    values["architectures"] = ["MistralForCausalLM"]
    return MistralConfig(**values)


def llama_output_bias_rule(config: PretrainedConfig, num_heads: int) -> str | None:
    """o_proj/down_proj biases need LlamaConfig's attention_bias/mlp_bias, so the checkpoint must stay Llama."""
    if config.hidden_size % num_heads:
        return (f"{num_heads} heads do not divide hidden_size {config.hidden_size}, so the checkpoint would have "
                "to be saved as Mistral, which has no o_proj/down_proj biases; choose a head count that divides it")
    return None


ADAPTER = register(FamilyAdapter("llama", checkpoint=CheckpointRules(
    portable_config=llama_portable_config, output_bias_flags=("attention_bias", "mlp_bias"),
    output_bias_rule=llama_output_bias_rule, per_layer=lambda config: {}), gguf=lambda config: GgufTarget("llama")))
