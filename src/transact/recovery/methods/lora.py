"""LoRA: peft adapters on every prunable projection of the text model train on the next-token loss and are
merged into the weights at the end of every phase, so every shot and the output are plain checkpoints. The
adapters' optimizer moments end with them (a resumed phase restores them from its mid-phase state)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from transact.arch import ModelShape, get_adapter
from transact.checks import check_float, check_int
from transact.recovery.methods import FP32, MemoryInputs, MethodMemory, RecoveryMethod, every_parameter, register_method


@dataclass(frozen=True)
class LoraSettings:
    """``training.lora``: LoRA adapters on every prunable projection, merged into the weights after each phase."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05

    def __post_init__(self) -> None:
        check_int("training.lora.r", self.r, 1)
        object.__setattr__(self, "alpha", check_float("training.lora.alpha", self.alpha, 0.0, open_low=True))
        object.__setattr__(self, "dropout", check_float("training.lora.dropout", self.dropout, 0.0, 0.99))


def lora_wrap(model: nn.Module, settings: LoraSettings, seed: int) -> nn.Module:
    """The model with LoRA adapters on every prunable projection (q/k/v/o, gate/up/down) of the text
    model, named in full: a vision tower's projections of the same names, and a hybrid model's
    linear-attention blocks, get none."""
    from peft import LoraConfig, get_peft_model

    wanted = {id(m) for m in get_adapter(model).prunable_linears(model)}
    names = [name for name, m in model.named_modules() if id(m) in wanted]
    torch.manual_seed(seed)  # adapter initialisation
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=names, bias="none")
    return get_peft_model(model, config)


def lora_merge(model: nn.Module) -> nn.Module:
    """Fold the adapters into the weights; the result is the plain transformers model again."""
    return model.merge_and_unload()


def lora_parameters(shape: ModelShape, rank: int) -> int:
    """Parameters of LoRA adapters of ``rank`` on every prunable projection (q/k/v/o in the softmax-attention
    layers, gate/up/down of each dense MLP or shared expert; a mixture's routed experts get none)."""
    h, a, kv = shape.hidden_size, shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    q = a * (2 if shape.q_gated else 1)
    attention = rank * ((h + q) + 2 * (h + kv) + (a + h))
    width = shape.shared_expert_size if shape.is_moe else shape.intermediate_size
    mlp = 3 * rank * (h + width) if width else 0
    return shape.num_attention_layers * attention + shape.num_layers * mlp


def lora_memory(memory: MemoryInputs) -> MethodMemory:
    """The adapters train, their gradients and moments in fp32 (peft keeps adapters in fp32 over bf16 weights)."""
    trainable = lora_parameters(memory.shape, memory.training.settings_of("lora").r)
    return MethodMemory(trainable=trainable, gradient_bytes=FP32, moments_dtype=torch.float32, teacher=0,
                        logits=every_parameter(memory).logits)


METHOD = register_method(RecoveryMethod(
    "lora", "peft LoRA adapters on q/k/v/o/gate/up/down (training.lora: r, alpha, dropout), merged after each "
    "phase", settings=LoraSettings, wrap=lora_wrap, merge=lora_merge, keeps_moments=False, memory=lora_memory,
    shards=False))
