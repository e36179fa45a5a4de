"""Granite (IBM Granite 3.x / 4.x dense): the Llama block with four constants: ``attention_multiplier``
(the attention scale itself, not derived from the head size), ``residual_multiplier``,
``embedding_multiplier`` and ``logits_scaling``. Pruning changes none of them. ``GraniteConfig`` accepts
any head count with an explicit ``head_dim``, and its ``attention_bias``/``mlp_bias`` let a checkpoint carry
FLAP's o_proj/down_proj biases (they also give q/k/v and gate/up a bias, set to zero).

llama.cpp's ``granite`` architecture reads the four constants from the GGUF, but its converter drops
``head_dim`` (it assumes ``hidden_size // heads``), so only checkpoints whose heads × head_dim still equal
the hidden size (MLP-only pruning) are exported.
"""

from transformers import PretrainedConfig

from transact.arch import register
from transact.arch.adapter import CheckpointRules, FamilyAdapter, GgufTarget, head_layout
from transact.errors import TransactError


def granite_gguf(config: PretrainedConfig) -> GgufTarget:
    heads, _, head_dim = head_layout(config)
    if heads * head_dim != config.hidden_size:
        raise TransactError(f"llama.cpp's granite converter ignores head_dim and assumes hidden_size // heads = "
                            f"{config.hidden_size // heads}, but this checkpoint has {heads} heads of {head_dim}; "
                            "a Granite model with pruned heads cannot be exported to GGUF (MLP-only pruning can)")
    return GgufTarget("granite")


def granite_notes(config: PretrainedConfig) -> tuple[str, ...]:
    return ("attention_multiplier, residual_multiplier, embedding_multiplier and logits_scaling are kept as stored",
            "GGUF export: only without head pruning (llama.cpp's granite converter ignores head_dim)")


def logits_scaling(config: PretrainedConfig):
    """Granite divides the LM head's output by ``logits_scaling``."""
    return lambda logits: logits / config.logits_scaling


ADAPTER = register(FamilyAdapter(
    "granite", checkpoint=CheckpointRules(output_bias_flags=("attention_bias", "mlp_bias")), gguf=granite_gguf,
    notes=granite_notes, logit_transform=logits_scaling,
    mlp_residual=lambda config: float(config.residual_multiplier)))
