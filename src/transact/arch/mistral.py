"""Mistral: the Llama block with an optional sliding window; llama.cpp converts it as ``llama``."""

from transact.arch import register
from transact.arch.base import FamilyAdapter, GgufTarget

ADAPTER = register(FamilyAdapter("mistral", gguf=lambda config: GgufTarget("llama")))
