"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2's attention (q/k/v biases) with a mixture of experts
and a shared expert: every token goes through a plain MLP of ``shared_expert_intermediate_size`` channels,
scaled by a sigmoid gate, besides its routed experts. Expert channels, whole experts and the shared
expert's channels (the same share as the experts') are pruned; the shared expert's gate stays.

llama.cpp's ``qwen2moe`` architecture reads the expert and shared-expert widths from the GGUF, but sizes the
attention projections by the hidden size, so only a checkpoint whose heads were not pruned exports."""

from transformers import PretrainedConfig

from transact.arch import register
from transact.arch.adapter import FamilyAdapter, GgufTarget, head_layout
from transact.arch.mlp import ExpertMlp
from transact.arch.qwen3_moe import mixed_layers_refusal
from transact.errors import TransactError


def qwen2moe_gguf(config: PretrainedConfig) -> GgufTarget:
    heads, _, head_dim = head_layout(config)
    if heads * head_dim != config.hidden_size:
        raise TransactError(f"llama.cpp's qwen2moe architecture sizes q_proj as hidden x hidden "
                            f"({config.hidden_size}), but this checkpoint has {heads} heads of {head_dim}; a "
                            "Qwen2-MoE with pruned heads does not load there (experts and channels alone can be "
                            "pruned for llama.cpp)")
    return GgufTarget("qwen2moe")


def qwen2_moe_notes(config: PretrainedConfig) -> tuple[str, ...]:
    return ("the shared expert keeps the same share of its channels as the routed experts (--mlp)",
            "GGUF export: only without head pruning (llama.cpp's qwen2moe sizes attention by the hidden size)")


ADAPTER = register(FamilyAdapter("qwen2_moe", mlp_layout=ExpertMlp(shared="shared_expert", rule=mixed_layers_refusal),
                                 gguf=qwen2moe_gguf, notes=qwen2_moe_notes))
