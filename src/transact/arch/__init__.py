"""Model-family knowledge as data: where the prunable projections live and how the config changes.

Every family transact supports today (Llama, Mistral, Qwen2, Qwen3) names its modules the same way
(``model.layers[i].self_attn.{q,k,v,o}_proj`` and ``model.layers[i].mlp.{gate,up,down}_proj``), so one
frozen dataclass describes them all; what differs is data (module names, which config class a pruned
checkpoint must be saved as). A family is looked up by ``config.model_type``; an unknown one is an error
that lists the supported families, never a silent fallback.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn
from transformers import PretrainedConfig

from transact.errors import TransactError


@dataclass(frozen=True)
class AttentionParts:
    """The four projections of one attention block and its head layout (read from the config)."""

    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class MlpParts:
    """The projections of one gated MLP; ``gate`` is None for an ungated MLP."""

    gate: nn.Linear | None
    up: nn.Linear
    down: nn.Linear
    intermediate_size: int


ConfigTranslator = Callable[[PretrainedConfig], PretrainedConfig]


def _unchanged(config: PretrainedConfig) -> PretrainedConfig:
    return config


@dataclass(frozen=True)
class FamilyAdapter:
    """Where one model family keeps its prunable parts.

    ``portable_config`` maps the in-memory config of a pruned model to the config that a checkpoint must
    carry so that vanilla ``transformers`` loads it (see ``transact.arch.llama``).
    """

    model_type: str
    layers_path: str = "model.layers"
    attention_name: str = "self_attn"
    q_name: str = "q_proj"
    k_name: str = "k_proj"
    v_name: str = "v_proj"
    o_name: str = "o_proj"
    mlp_name: str = "mlp"
    gate_name: str | None = "gate_proj"
    up_name: str = "up_proj"
    down_name: str = "down_proj"
    portable_config: ConfigTranslator = field(default=_unchanged)
    # Config flags that give o_proj and down_proj a bias in a vanilla checkpoint (they also give q/k/v and
    # gate/up one); empty where the family's config cannot express such biases.
    output_bias_flags: tuple[str, ...] = ()

    def layers(self, model: nn.Module) -> Sequence[nn.Module]:
        return model.get_submodule(self.layers_path)

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attention_name)

    def mlp_module(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp_name)

    def attention(self, layer: nn.Module, config: PretrainedConfig) -> AttentionParts:
        attn = self.attention_module(layer)
        heads, kv_heads, head_dim = head_layout(config)
        return AttentionParts(
            q=getattr(attn, self.q_name),
            k=getattr(attn, self.k_name),
            v=getattr(attn, self.v_name),
            o=getattr(attn, self.o_name),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
        )

    def mlp(self, layer: nn.Module, config: PretrainedConfig) -> MlpParts:
        mlp = self.mlp_module(layer)
        return MlpParts(
            gate=getattr(mlp, self.gate_name) if self.gate_name else None,
            up=getattr(mlp, self.up_name),
            down=getattr(mlp, self.down_name),
            intermediate_size=config.intermediate_size,
        )

    def write_config(
        self, config: PretrainedConfig, *, num_heads: int, num_kv_heads: int, intermediate_size: int
    ) -> None:
        """Record the pruned widths in ``config`` (in place); ``head_dim`` is always written explicitly,
        because after pruning it no longer equals ``hidden_size // num_attention_heads``."""
        _, _, head_dim = head_layout(config)
        config.head_dim = head_dim
        config.num_attention_heads = num_heads
        config.num_key_value_heads = num_kv_heads
        config.intermediate_size = intermediate_size

    def sync_modules(self, layer: nn.Module, config: PretrainedConfig) -> None:
        """Bring the per-module copies of head counts in line with ``config``.

        transformers caches a few config values on the modules at construction (``num_key_value_groups``
        drives ``repeat_kv`` in the attention kernels); the names differ between versions, so only the
        attributes that exist are updated.
        """
        heads, kv_heads, head_dim = head_layout(config)
        attn = self.attention_module(layer)
        for name, value in (
            ("num_key_value_groups", heads // kv_heads),
            ("num_heads", heads),
            ("num_attention_heads", heads),
            ("num_key_value_heads", kv_heads),
            ("head_dim", head_dim),
        ):
            if hasattr(attn, name):
                setattr(attn, name, value)
        mlp = self.mlp_module(layer)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = config.intermediate_size


def head_layout(config: PretrainedConfig) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) as the config states them (kv defaults to MHA)."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, int(head_dim)


def _registry() -> dict[str, FamilyAdapter]:
    from transact.arch.llama import llama_portable_config

    adapters = [
        FamilyAdapter("llama", portable_config=llama_portable_config,
                      output_bias_flags=("attention_bias", "mlp_bias")),
        FamilyAdapter("mistral"),
        FamilyAdapter("qwen2"),
        FamilyAdapter("qwen3"),
    ]
    return {a.model_type: a for a in adapters}


ADAPTERS: dict[str, FamilyAdapter] = _registry()
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(ADAPTERS))


def get_adapter(model_or_config: nn.Module | PretrainedConfig) -> FamilyAdapter:
    """The adapter for a model (or its config), by ``model_type``; unknown families are an error."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise TransactError(
            f"model_type {model_type!r} is not supported; transact supports: {', '.join(SUPPORTED_MODEL_TYPES)}"
        ) from None


__all__ = [
    "ADAPTERS",
    "SUPPORTED_MODEL_TYPES",
    "AttentionParts",
    "FamilyAdapter",
    "MlpParts",
    "get_adapter",
    "head_layout",
]
