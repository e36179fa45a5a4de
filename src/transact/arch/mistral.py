"""Mistral: the Llama block with an optional sliding window; llama.cpp converts it as ``llama``.

A Mistral checkpoint with longrope scaling (a Phi-3 saved as Mistral, see ``transact.arch.phi3``) is not
exported: llama.cpp's ``llama`` architecture has no longrope."""

from transformers import PretrainedConfig

from transact.arch import register
from transact.arch.adapter import FamilyAdapter, GgufTarget
from transact.errors import TransactError


def mistral_gguf(config: PretrainedConfig) -> GgufTarget:
    if (config.rope_parameters or {}).get("rope_type") == "longrope":
        raise TransactError("this Mistral checkpoint uses longrope scaling, which llama.cpp's llama architecture "
                            "does not implement, so it is not exported")
    return GgufTarget("llama")


ADAPTER = register(FamilyAdapter("mistral", gguf=mistral_gguf))
