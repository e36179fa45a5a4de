"""Model-family knowledge as data: one adapter file per family, looked up by ``config.model_type``.

An unknown family is an error that lists the supported ones, never a silent fallback. Adding a family is
adding one module here that registers its ``FamilyAdapter`` (see docs/architecture.md).
"""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from transact.arch.adapter import CheckpointRules, FamilyAdapter, GgufTarget, HybridStack, ModuleNames, head_layout
from transact.arch.mlp import DenseMlp, ExpertMlp
from transact.arch.parts import AttentionParts, ExpertParts, MlpParts
from transact.arch.shape import HeadRule, LinearAttentionShape, ModelShape
from transact.registry import Registry

# Families transact knows it does not prune yet, and why (the refusal says so rather than only listing others).
NOT_YET = {
    "gpt_oss": "gpt-oss interleaves its experts' gate and up rows, gives experts biases and a clamped SwiGLU, "
               "and adds per-head attention sinks that would have to be sliced with the heads; transact does "
               "not prune it yet",
}


def _unknown_family(name: str, known: tuple[str, ...]) -> str:
    why = f"{NOT_YET[name]}. " if name in NOT_YET else ""
    return f"model_type {name!r} is not supported; {why}transact supports: {', '.join(known)}"


FAMILIES: Registry[FamilyAdapter] = Registry("model family", __name__, key=lambda adapter: adapter.model_type,
                                             unknown=_unknown_family)
register = FAMILIES.register


def get_adapter(model_or_config: nn.Module | PretrainedConfig) -> FamilyAdapter:
    """The adapter for a model (or its config), by ``model_type``; unknown families are an error."""
    config = getattr(model_or_config, "config", model_or_config)
    return FAMILIES.get(getattr(config, "model_type", None))


def shape_of(model_or_config: nn.Module | PretrainedConfig) -> ModelShape:
    """The prunable dimensions of a model (or config), read by its family's adapter."""
    config = getattr(model_or_config, "config", model_or_config)
    return get_adapter(config).shape(config)


SUPPORTED_MODEL_TYPES: tuple[str, ...] = FAMILIES.names()

__all__ = [
    "FAMILIES",
    "SUPPORTED_MODEL_TYPES",
    "AttentionParts",
    "CheckpointRules",
    "DenseMlp",
    "ExpertMlp",
    "ExpertParts",
    "FamilyAdapter",
    "GgufTarget",
    "HeadRule",
    "HybridStack",
    "LinearAttentionShape",
    "MlpParts",
    "ModelShape",
    "ModuleNames",
    "get_adapter",
    "head_layout",
    "register",
    "shape_of",
]
