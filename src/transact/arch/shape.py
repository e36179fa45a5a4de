"""The prunable dimensions of a model as plain values: ``ModelShape`` (what plans record and costs are computed
from), the head counts a family allows (``HeadRule``), and the linear-attention blocks of a hybrid stack
(``LinearAttentionShape``; their costs are in ``transact.measure.costs``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import PretrainedConfig

# transformers runs experts through torch's grouped matmul by default, which needs every row of the fused
# expert weights to span a multiple of 16 bytes ("strides should be multiple of 16 bytes" otherwise): 8
# channels in bf16/fp16. A pruned expert width is kept a multiple of it, as every released one is.
EXPERT_WIDTH_MULTIPLE = 8


@dataclass(frozen=True)
class HeadRule:
    """The query-head counts a family's checkpoint can be saved with, and why no others."""

    counts: tuple[int, ...]
    why: str


@dataclass(frozen=True)
class LinearAttentionShape:
    """The linear-attention (Gated DeltaNet) blocks of a hybrid model, which pruning leaves as they are: per
    layer ``key_heads`` query/key heads of ``key_dim`` and ``value_heads`` value heads of ``value_dim``, a
    causal convolution of ``conv_kernel`` taps over q, k and v."""

    key_heads: int
    value_heads: int
    key_dim: int
    value_dim: int
    conv_kernel: int


@dataclass(frozen=True)
class ModelShape:
    """The prunable dimensions of a model's text stack, as plans record them. The widths are the same in
    every layer that has the part; ``attention_layers`` lists the layers with softmax attention where a
    hybrid model has others or some lost theirs (None: every layer), and only those layers have heads to
    prune; ``mlp_layers`` likewise lists the layers that kept their MLP where some were dropped.

    ``vocab_size`` and ``max_positions`` (the trained context, None if unstated) describe the model for
    measurements; ``head_rule`` (None: any head count) is the family's limit on pruned head counts;
    ``linear_attention`` describes the other layers' blocks; ``q_gated``: q_proj also holds each head's
    output gate (see ``AttentionParts.q_head_rows``); ``attention_windows`` gives, per layer, the most tokens
    a sliding-window layer attends to (None: the whole context; the field is None where no layer has a
    window). None of them is part of what a plan must match (``compare=False``).

    A mixture of experts has ``num_experts`` experts per layer, each of ``intermediate_size`` channels, and
    routes each token to ``experts_per_token`` of them; ``shared_expert_size`` is the width of the plain MLP
    every token also goes through (Qwen2-MoE's shared expert; None: none)."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int | None = field(default=None, compare=False)
    max_positions: int | None = field(default=None, compare=False)
    head_rule: HeadRule | None = field(default=None, compare=False)
    attention_layers: tuple[int, ...] | None = None
    linear_attention: LinearAttentionShape | None = field(default=None, compare=False)
    q_gated: bool = field(default=False, compare=False)
    attention_windows: tuple[int | None, ...] | None = field(default=None, compare=False)
    num_experts: int | None = None
    experts_per_token: int | None = None
    shared_expert_size: int | None = None
    # the layers that have an MLP where some had theirs dropped (None: every layer)
    mlp_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("attention_layers", "mlp_layers"):  # a plan read from JSON gives a list
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def is_moe(self) -> bool:
        """Whether the MLPs are routed experts (then ``intermediate_size`` is each expert's width)."""
        return self.num_experts is not None

    @property
    def mlp_multiple(self) -> int:
        """Pruned MLP widths must be multiples of this: ``EXPERT_WIDTH_MULTIPLE`` for experts, else 1."""
        return EXPERT_WIDTH_MULTIPLE if self.is_moe else 1

    def has_attention(self, layer: int) -> bool:
        """Whether layer ``layer`` has softmax attention (query heads to prune)."""
        return self.attention_layers is None or layer in self.attention_layers

    def attended(self, layer: int, context: int) -> int:
        """The tokens layer ``layer`` attends to when ``context`` tokens are in view: all of them, or at most
        its sliding window."""
        window = None if self.attention_windows is None else self.attention_windows[layer]
        return context if window is None else min(context, window)

    @property
    def attention_layer_indices(self) -> tuple[int, ...]:
        """The layers with softmax attention, in order."""
        return tuple(range(self.num_layers)) if self.attention_layers is None else self.attention_layers

    @property
    def num_attention_layers(self) -> int:
        return self.num_layers if self.attention_layers is None else len(self.attention_layers)

    @property
    def num_mlp_layers(self) -> int:
        return self.num_layers if self.mlp_layers is None else len(self.mlp_layers)

    def to_json(self) -> dict[str, Any]:
        """The fields a plan records (the measurement-only ones are left out; ``attention_layers`` and
        ``mlp_layers`` only where some layers lack the part, so plans of the others read as before)."""
        names = ("model_type", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                 "intermediate_size")
        data = {name: getattr(self, name) for name in names}
        if self.attention_layers is not None:
            data["attention_layers"] = list(self.attention_layers)
        if self.mlp_layers is not None:
            data["mlp_layers"] = list(self.mlp_layers)
        if self.is_moe:
            data.update(num_experts=self.num_experts, experts_per_token=self.experts_per_token)
        if self.shared_expert_size is not None:
            data["shared_expert_size"] = self.shared_expert_size
        return data


def sliding_windows(config: Any) -> tuple[int | None, ...] | None:
    """Each layer's sliding window as a transformers text config states it (None per layer: the whole
    context; None in all: no window anywhere). ``layer_types`` marks the windowed layers where the config
    has it (Gemma 2 and 3, Qwen2 with ``use_sliding_window``); without it a ``sliding_window`` applies to
    every layer, as Mistral, Mixtral and Phi-3 use it. A window of 0 or None, or ``use_sliding_window``
    false, is no window."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    types = getattr(config, "layer_types", None)
    if types is None:
        return (window,) * config.num_hidden_layers
    windows = tuple(window if kind == "sliding_attention" else None for kind in types)
    return windows if any(w is not None for w in windows) else None


# The layers whose attention was dropped (``transact.core.sub_block_drop``): set on an in-memory config by the
# drop; a DeciLM config derives it from its no-op blocks.
ATTENTION_DROPPED = "attention_dropped_layers"


# The layers whose MLP was dropped (``transact.core.sub_block_drop``), as ``ATTENTION_DROPPED`` lists attention.
MLP_DROPPED = "mlp_dropped_layers"


def kept_layers(text_config: PretrainedConfig, dropped_key: str) -> tuple[int, ...] | None:
    """The layers that still have a sub-block where some had theirs dropped, as the config lists them under
    ``dropped_key`` (``ATTENTION_DROPPED``, ``MLP_DROPPED``); None: every layer has it."""
    dropped = set(getattr(text_config, dropped_key, None) or ())
    if not dropped:
        return None
    return tuple(i for i in range(text_config.num_hidden_layers) if i not in dropped)


def sub_block_layers(text_config: PretrainedConfig, attention_layers: tuple[int, ...] | None) -> dict[str, Any]:
    """``ModelShape``'s ``attention_layers`` and ``mlp_layers`` of a config: a hybrid family's own attention
    layers where given, else the layers that kept their attention, and the layers that kept their MLP."""
    if attention_layers is None:
        attention_layers = kept_layers(text_config, ATTENTION_DROPPED)
    return {"attention_layers": attention_layers, "mlp_layers": kept_layers(text_config, MLP_DROPPED)}
