"""Mixtral: the Mistral block with a mixture of experts in place of the MLP (``num_local_experts`` experts
of ``intermediate_size`` channels, ``num_experts_per_tok`` per token). Its checkpoints name the experts
``block_sparse_moe.experts.E.w1/w2/w3``; llama.cpp converts them as its ``llama`` architecture with experts,
which reads the expert count and width from the GGUF."""

from transact.arch import register
from transact.arch.adapter import FamilyAdapter, GgufTarget
from transact.arch.mlp import ExpertMlp

# Mixtral's checkpoints keep the original layout: block_sparse_moe.experts.E.w1 (gate), w3 (up), w2 (down)
EXPERT_FILES = tuple(f"block_sparse_moe.experts.{{e}}.{w}.weight" for w in ("w1", "w3", "w2"))

ADAPTER = register(FamilyAdapter(
    "mixtral", mlp_layout=ExpertMlp(count_key="num_local_experts", width_key="intermediate_size", files=EXPERT_FILES),
    gguf=lambda config: GgufTarget("llama")))
