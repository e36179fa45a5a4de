"""Qwen3: the Llama block with per-head q/k RMSNorms (they act on head_dim, so head pruning keeps them).
llama.cpp's ``qwen3`` architecture sizes the query projection by heads × head size, so pruned heads load."""

from transact.arch import register
from transact.arch.adapter import FamilyAdapter, GgufTarget

ADAPTER = register(FamilyAdapter("qwen3", gguf=lambda config: GgufTarget("qwen3")))
