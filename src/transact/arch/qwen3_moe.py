"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder): Qwen3's attention (per-head q/k norms) with a
mixture of experts in place of the MLP: ``num_experts`` experts of ``moe_intermediate_size`` channels, each
token routed to its best ``num_experts_per_tok``. Expert channels and whole experts are pruned; llama.cpp's
``qwen3moe`` architecture reads the expert width and count from the GGUF, so pruned checkpoints load."""

from transformers import PretrainedConfig

from transact.arch import register
from transact.arch.adapter import FamilyAdapter, GgufTarget
from transact.arch.mlp import ExpertMlp


def dense_layers(config: PretrainedConfig) -> list[int]:
    """The layers whose MLP is a dense one rather than experts (``mlp_only_layers``, ``decoder_sparse_step``)."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    only = set(getattr(config, "mlp_only_layers", None) or ())
    return [i for i in range(config.num_hidden_layers) if i in only or (i + 1) % step]


def mixed_layers_refusal(config: PretrainedConfig) -> str | None:
    dense = dense_layers(config)
    if dense:
        return (f"layers {dense} of this model have a dense MLP and the others experts; transact prunes mixtures "
                "of experts whose every layer has experts (every released checkpoint of the family does)")
    return None


ADAPTER = register(FamilyAdapter("qwen3_moe", mlp_layout=ExpertMlp(rule=mixed_layers_refusal),
                                 gguf=lambda config: GgufTarget("qwen3moe")))
