"""Mistral: the Llama block with an optional sliding window; llama.cpp converts it as ``llama``.

A Mistral checkpoint with longrope scaling (a Phi-3 saved as Mistral, see ``transact.arch.phi3``) is not
exported: llama.cpp's ``llama`` architecture has no longrope."""

from transformers import PretrainedConfig

from transact.arch import register
from transact.arch.adapter import CheckpointRules, FamilyAdapter, GgufTarget
from transact.errors import TransactError


def mistral_gguf(config: PretrainedConfig) -> GgufTarget:
    if (config.rope_parameters or {}).get("rope_type") == "longrope":
        raise TransactError("this Mistral checkpoint uses longrope scaling, which llama.cpp's llama architecture "
                            "does not implement, so it is not exported")
    return GgufTarget("llama")


def mistral_per_layer(config: PretrainedConfig) -> dict:
    """A Mistral model is a Llama one in the DeciLM layout only where it attends to the whole context."""
    if getattr(config, "sliding_window", None) is not None:
        raise TransactError("this Mistral model uses a sliding window, which the DeciLM / Nemotron-NAS layout "
                            "(per-layer widths) cannot express")
    return {}


ADAPTER = register(FamilyAdapter("mistral", gguf=mistral_gguf, checkpoint=CheckpointRules(per_layer=mistral_per_layer)))
