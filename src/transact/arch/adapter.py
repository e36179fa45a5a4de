"""What a family adapter is: where a model family keeps its prunable parts, how its config describes them, and
what its checkpoints can carry.

Every family transact supports names its attention projections ``q/k/v/o_proj`` (or a fused ``qkv_proj``)
inside ``model.layers[i].self_attn``, so one frozen dataclass describes them all. What differs is data, in a
few values: the module names (``ModuleNames``), the MLP block's layout (``DenseMlp`` or ``ExpertMlp``, see
``transact.arch.mlp``), a hybrid stack's layers without softmax attention (``HybridStack``), and the rules of
the family's checkpoints (``CheckpointRules``). No module outside ``transact.arch`` reads ``model_type`` or
family-specific config fields.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from transact.arch.mlp import DenseMlp, MlpLayout
from transact.arch.parts import AttentionParts, ExpertParts, MlpParts, Rows
from transact.arch.shape import HeadRule, LinearAttentionShape, ModelShape, sliding_windows, sub_block_layers
from transact.decilm.modeling_decilm import SkippedAttention, SkippedMlp
from transact.errors import TransactError


@dataclass(frozen=True)
class ModuleNames:
    """Where the text model's decoder layers live (``layers``; in a multimodal checkpoint inside the language
    model, whose config is the attribute ``text_config`` of the model's config, None: the config is the text
    config itself), and the attention block's projections within a layer (``qkv``: one fused projection
    holding q, k, v rows in that order, in place of the three). ``mlp`` is the MLP block's name."""

    layers: str = "model.layers"
    text_config: str | None = None
    attention: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    qkv: str | None = None
    mlp: str = "mlp"


@dataclass(frozen=True)
class HybridStack:
    """A stack where only some layers have softmax attention: ``attention_layers(text_config)`` lists them (the
    others have no attention module and no heads to prune), ``linear_attention(text_config)`` describes the
    other layers' blocks for cost estimates."""

    attention_layers: Callable[[PretrainedConfig], tuple[int, ...]]
    linear_attention: Callable[[PretrainedConfig], LinearAttentionShape | None]


@dataclass(frozen=True)
class NormGain:
    """A norm within each decoder layer (``name``) whose output is its normalized input times
    ``offset + weight`` per channel (Gemma stores gains as offsets from 1)."""

    name: str
    offset: float = 0.0


def _unchanged(config: PretrainedConfig) -> PretrainedConfig:
    return config


@dataclass(frozen=True)
class CheckpointRules:
    """What the family's vanilla checkpoints can hold.

    - ``portable_config`` maps the in-memory config of a pruned model to the config a checkpoint must carry so
      that vanilla ``transformers`` loads it (see ``transact.arch.llama``); ``portable_state(state, config)``
      names a state dict (full model or one layer) as that config's class does, where it lays its weights out
      differently (called only when ``portable_config`` changes the class; None: the names are the same).
    - ``head_rule(text_config)``: the query-head counts a checkpoint can be saved with (None: any); widths
      outside it are refused before any work.
    - ``output_bias_flags``: config flags that give o_proj and down_proj a bias (they also give q/k/v and
      gate/up one); empty where the config cannot express such biases. ``output_bias_rule(text_config,
      num_heads)`` says why a pruned width cannot carry them (None: it can).
    - ``auto_class``: the transformers auto class that loads and builds the family's checkpoints with
      everything they hold (None: ``AutoModelForCausalLM``; a multimodal family whose causal-LM class would
      drop the vision tower names its image-text class).
    - ``per_layer(text_config)``: the fields a DeciLM / Nemotron-NAS config needs beyond the Llama ones to
      hold this family's model with widths that differ per layer (``transact.decilm``), or a TransactError
      naming why it cannot; None: the family has no such checkpoint.
    """

    portable_config: Callable[[PretrainedConfig], PretrainedConfig] = _unchanged
    portable_state: Callable[[dict[str, torch.Tensor], PretrainedConfig], dict[str, torch.Tensor]] | None = None
    head_rule: Callable[[PretrainedConfig], HeadRule | None] | None = None
    output_bias_flags: tuple[str, ...] = ()
    output_bias_rule: Callable[[PretrainedConfig, int], str | None] | None = None
    auto_class: type | None = None
    per_layer: Callable[[PretrainedConfig], dict[str, Any]] | None = None


@dataclass(frozen=True)
class GgufTarget:
    """How llama.cpp's converter takes a checkpoint: the GGUF architecture it becomes, config.json keys
    replaced in the converter's input (None: the checkpoint is converted as it is), and options added to
    the converter's command line."""

    architecture: str
    config_overrides: dict[str, Any] | None = None
    converter_args: tuple[str, ...] = ()


def _per_layer(key: str, value: Any, layers: int) -> bool:
    """Whether a config entry is a list with one value per decoder layer."""
    return isinstance(value, list) and len(value) == layers and key != "architectures"


def head_layout(config: PretrainedConfig) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) as a text config states them (kv defaults to MHA)."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, int(head_dim)


@dataclass(frozen=True)
class FamilyAdapter:
    """Where one model family keeps its prunable parts, and its checkpoint rules.

    - ``names``, ``mlp_layout``, ``hybrid``, ``checkpoint``: see their classes.
    - ``q_gated``: each query head's block of q_proj holds 2·head_dim rows, the query and then the gate its
      output is multiplied by (Qwen3.5); a head keeps or loses both.
    - ``logit_transform(text_config)``: what the family's model does to the LM head's output before it returns
      logits (Gemma's soft-capping, Granite's scaling; None: nothing), so that logits can be computed from the
      final hidden states in chunks (``lm_logits``).
    - ``gguf(text_config)``: llama.cpp's architecture for the checkpoint (None: llama.cpp has none).
    - ``notes(text_config)``: what a user should know about pruning this family (``transact info`` prints it).
    - ``mlp_residual(text_config)``: the factor each layer's MLP output is added to the residual stream with
      (Granite's ``residual_multiplier``; 1 for most families), or None where a norm stands between them
      (Gemma's post-feedforward norm), so that no linear map folds into ``down_proj`` (depth pruning's
      compensation, ``transact.core.depth``). ``mlp_output_norm`` names that norm, whose gain can carry a
      per-channel map instead.
    - ``attention_output_norm``: the norm o_proj's output passes through before the residual stream (Gemma's
      post-attention norm), None where there is none. Where o_proj's or down_proj's output is normalized per
      token, calibration weights their inputs' Gram matrices by that normalization
      (``transact.core.calibrate.OUTPUT_NORM_WEIGHTED``).
    - ``prune_refusal``: why transact does not prune models of this kind (None: it does); every job that would
      is refused with it before any work (a run without shots, which only trains, is not).
    """

    model_type: str
    names: ModuleNames = ModuleNames()
    mlp_layout: MlpLayout = field(default_factory=DenseMlp)
    hybrid: HybridStack | None = None
    checkpoint: CheckpointRules = CheckpointRules()
    q_gated: bool = False
    logit_transform: Callable[[PretrainedConfig], Callable[[torch.Tensor], torch.Tensor] | None] | None = None
    gguf: Callable[[PretrainedConfig], GgufTarget] | None = None
    notes: Callable[[PretrainedConfig], tuple[str, ...]] = field(default=lambda config: ())
    mlp_residual: Callable[[PretrainedConfig], float | None] = field(default=lambda config: 1.0)
    mlp_output_norm: NormGain | None = None
    attention_output_norm: NormGain | None = None
    prune_refusal: str | None = None

    def model_class(self) -> type:
        """The auto class whose ``from_pretrained`` / ``from_config`` gives this family's full model."""
        return self.checkpoint.auto_class or AutoModelForCausalLM

    def check_prunable(self) -> None:
        """Refuse, before any work, a job that would prune a model of this kind (``prune_refusal``)."""
        if self.prune_refusal:
            raise TransactError(self.prune_refusal)

    @property
    def layers_path(self) -> str:
        return self.names.layers

    @property
    def is_moe(self) -> bool:
        return self.mlp_layout.is_moe

    # -- the config
    def text_config(self, config: PretrainedConfig) -> PretrainedConfig:
        return getattr(config, self.names.text_config) if self.names.text_config else config

    def mlp_width(self, text_config: PretrainedConfig) -> int:
        """The width pruning keeps a count of: the MLP's, or each routed expert's in a mixture of experts."""
        return self.mlp_layout.width(text_config)

    def shape(self, config: PretrainedConfig) -> ModelShape:
        text = self.text_config(config)
        refusal = self.mlp_layout.refusal(text)
        if refusal:
            raise TransactError(refusal)
        heads, kv_heads, head_dim = head_layout(text)
        num_experts, experts_per_token = self.mlp_layout.counts(text)
        rule = self.checkpoint.head_rule
        return ModelShape(model_type=config.model_type, num_layers=text.num_hidden_layers,
                          hidden_size=text.hidden_size, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                          intermediate_size=self.mlp_width(text), vocab_size=getattr(text, "vocab_size", None),
                          max_positions=getattr(text, "max_position_embeddings", None),
                          head_rule=rule(text) if rule else None,
                          **sub_block_layers(text, self.hybrid.attention_layers(text) if self.hybrid else None),
                          linear_attention=self.hybrid.linear_attention(text) if self.hybrid else None,
                          q_gated=self.q_gated, num_experts=num_experts, experts_per_token=experts_per_token,
                          shared_expert_size=self.mlp_layout.shared_width(text),
                          attention_windows=sliding_windows(text))

    def write_config(self, config: PretrainedConfig, *, num_heads: int, num_kv_heads: int,
                     intermediate_size: int, num_experts: int | None = None, shared_size: int | None = None) -> None:
        """Record the pruned widths in ``config`` (in place); ``head_dim`` is always written explicitly,
        because after pruning it no longer equals ``hidden_size // num_attention_heads``. In a mixture of
        experts ``intermediate_size`` is each expert's width and ``num_experts`` the experts kept."""
        text = self.text_config(config)
        _, _, head_dim = head_layout(text)
        text.head_dim = head_dim
        text.num_attention_heads = num_heads
        text.num_key_value_heads = num_kv_heads
        self.mlp_layout.write_widths(text, intermediate_size, num_experts, shared_size)

    def one_layer_config(self, config: PretrainedConfig, index: int) -> PretrainedConfig:
        """``config`` cut down to its layer ``index``, for running that layer alone: one hidden layer, that
        layer's entry of every per-layer list (``layer_types`` and the like), a one-token vocabulary without
        special tokens, and untied embeddings (a one-layer model never reads its embedding or head). Of a
        multimodal config only the text config is cut: its layer runs in the text-only model class."""
        config = self.text_config(config)
        values = config.to_dict()
        layers = config.num_hidden_layers
        for key, value in values.items():
            if _per_layer(key, value, layers):
                values[key] = [value[index]]
        values.update(num_hidden_layers=1, vocab_size=1, pad_token_id=None, bos_token_id=None, eos_token_id=None,
                      tie_word_embeddings=False)
        one = type(config).from_dict(values)
        one._attn_implementation = config._attn_implementation
        return one

    def keep_layers(self, config: PretrainedConfig, keep: list[int]) -> None:
        """Cut ``config`` to its layers ``keep`` (ascending), in place: ``num_hidden_layers`` and the same
        entries of every per-layer list (``layer_types``, ``no_rope_layers`` and the like) of the text config."""
        text = self.text_config(config)
        layers = text.num_hidden_layers
        for key, value in text.to_dict().items():
            if _per_layer(key, value, layers):
                setattr(text, key, [value[i] for i in keep])
        text.num_hidden_layers = len(keep)

    def apply_changes(self, config: PretrainedConfig, changes: dict[str, Any]) -> None:
        """Set ``changes`` (text-config key -> value, as a pruned one-layer model's config differs from the
        source's) in ``config``, in place."""
        for key, value in changes.items():
            setattr(self.text_config(config), key, value)

    # -- checkpoints
    def portable_config(self, config: PretrainedConfig) -> PretrainedConfig:
        """The config a checkpoint of this (pruned) config carries (see ``CheckpointRules``)."""
        return self.checkpoint.portable_config(config)

    def saved_config(self, config: PretrainedConfig, changes: dict[str, Any], dtype: torch.dtype) -> PretrainedConfig:
        """The config a checkpoint of ``config`` pruned as ``changes`` say carries, saved in ``dtype``."""
        config = copy.deepcopy(config)
        self.apply_changes(config, changes)
        config.dtype = dtype
        return self.portable_config(config)

    def relayouts(self, config: PretrainedConfig) -> bool:
        """Whether a checkpoint of this config lays its weights out differently from the model in memory
        (split fused projections): it then computes the same function with differently shaped matmuls,
        equal only up to floating-point rounding."""
        return self.checkpoint.portable_state is not None and self.portable_config(config) is not config

    def saved_state(self, state: dict[str, torch.Tensor], config: PretrainedConfig) -> dict[str, torch.Tensor]:
        """``state`` (of a model or one layer with this ``config``) named as its checkpoint names it."""
        return self.checkpoint.portable_state(state, config) if self.relayouts(config) else state

    def saved_model_type(self, config: PretrainedConfig) -> str:
        """The ``model_type`` a checkpoint of this (pruned) config is saved as."""
        return self.portable_config(config).model_type

    def output_bias_refusal(self, config: PretrainedConfig, num_heads: int) -> str | None:
        """Why a checkpoint pruned to ``num_heads`` could not carry o_proj/down_proj biases (None: it can)."""
        rules = self.checkpoint
        if not rules.output_bias_flags:
            return f"a vanilla {self.model_type!r} checkpoint cannot carry o_proj/down_proj biases (its config has " \
                   "no option for them)"
        return rules.output_bias_rule(self.text_config(config), num_heads) if rules.output_bias_rule else None

    def enable_output_biases(self, config: PretrainedConfig) -> None:
        for flag in self.checkpoint.output_bias_flags:
            setattr(self.text_config(config), flag, True)

    def per_layer_fields(self, config: PretrainedConfig) -> dict[str, Any]:
        """The DeciLM config fields beyond Llama's that hold this family with per-layer widths (see
        ``CheckpointRules.per_layer``), or a TransactError naming the family and the rule."""
        rule = self.checkpoint.per_layer
        if rule is None:
            raise TransactError(f"the {self.model_type} family has no checkpoint with widths that differ per layer: "
                                "the DeciLM / Nemotron-NAS layout vLLM and llama.cpp load is the Llama block (Llama, "
                                "Mistral without a sliding window, Qwen2)")
        return rule(self.text_config(config))

    def gguf_target(self, config: PretrainedConfig) -> GgufTarget:
        if self.gguf is None:
            raise TransactError(f"no llama.cpp architecture is known for model_type {self.model_type!r}")
        return self.gguf(self.text_config(config))

    def fused_layer_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A decoder layer's tensors as a checkpoint stores them (names within the layer) -> as the layer
        module holds them (a mixture of experts fuses each expert's projections)."""
        return self.mlp_layout.fused_layer_state(state, self.names.mlp)

    def split_layer_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse of ``fused_layer_state``: a layer module's tensors -> as its checkpoint stores them."""
        return self.mlp_layout.split_layer_state(state, self.names.mlp)

    # -- the modules
    def lm_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The logits ``model`` computes from its final (normed) hidden states ``hidden`` (..., H) -> (..., V):
        its LM head, then the family's transform."""
        logits = model.get_output_embeddings()(hidden)
        transform = self.logit_transform(self.text_config(model.config)) if self.logit_transform else None
        return logits if transform is None else transform(logits)

    def layers(self, model: nn.Module) -> Sequence[nn.Module]:
        return model.get_submodule(self.names.layers)

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.names.attention)

    def mlp_module(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.names.mlp)

    def has_mlp(self, layer: nn.Module) -> bool:
        """Whether ``layer`` has an MLP (not one whose MLP was dropped)."""
        return not isinstance(getattr(layer, self.names.mlp, None), SkippedMlp)

    def has_attention(self, layer: nn.Module) -> bool:
        """Whether ``layer`` has softmax attention (a hybrid model's other layers have none, nor has a layer
        whose attention was dropped)."""
        module = getattr(layer, self.names.attention, None)
        return module is not None and not isinstance(module, SkippedAttention)

    def attention(self, layer: nn.Module, config: PretrainedConfig) -> AttentionParts | None:
        """The attention projections of ``layer``; None for a layer without softmax attention."""
        if not self.has_attention(layer):
            return None
        attn, names = self.attention_module(layer), self.names
        heads, kv_heads, head_dim = head_layout(self.text_config(config))
        if names.qkv:
            qkv = getattr(attn, names.qkv)
            q_size, kv_size = heads * head_dim, kv_heads * head_dim
            q, k, v = Rows(qkv, 0, q_size), Rows(qkv, q_size, kv_size), Rows(qkv, q_size + kv_size, kv_size)
        else:
            q, k, v = (getattr(attn, name) for name in (names.q, names.k, names.v))
        return AttentionParts(q=q, k=k, v=v, o=getattr(attn, names.o), num_heads=heads, num_kv_heads=kv_heads,
                              head_dim=head_dim, q_gated=self.q_gated)

    def mlp(self, layer: nn.Module, config: PretrainedConfig) -> MlpParts | ExpertParts | None:
        """The MLP of ``layer``: its projections, or in a mixture of experts its experts and router; None in a
        layer whose MLP was dropped."""
        if not self.has_mlp(layer):
            return None
        return self.mlp_layout.parts(self.mlp_module(layer), self.text_config(config))

    def layer_parts(self, model: nn.Module) -> list[tuple[AttentionParts | None, MlpParts | ExpertParts | None]]:
        """(attention, MLP) of every decoder layer, in order; either is None in a layer without it (a hybrid
        model's other layers have no attention; a dropped sub-block is gone)."""
        return [(self.attention(layer, model.config), self.mlp(layer, model.config)) for layer in self.layers(model)]

    def prunable_linears(self, model: nn.Module) -> list[nn.Linear]:
        """Every module pruning slices (q/k/v/o, gate/up/down, fused ones once), layer by layer."""
        return [linear for attn, mlp in self.layer_parts(model)
                for linear in (*(attn.linears if attn else ()), *(mlp.linears if mlp else ()))]

    def pruned_modules(self, model: nn.Module) -> list[nn.Module]:
        """Every module whose weights pruning slices or a corrector changes: ``prunable_linears`` and each
        mixture-of-experts block's fused experts module."""
        experts = [mlp.experts for _, mlp in self.layer_parts(model) if isinstance(mlp, ExpertParts)]
        return [*self.prunable_linears(model), *experts]

    def sync_modules(self, layer: nn.Module, config: PretrainedConfig) -> None:
        """Bring the per-module copies of head counts and widths in line with ``config``.

        transformers caches a few config values on the modules at construction (``num_key_value_groups``
        drives ``repeat_kv`` in the attention kernels); the names differ between versions, so only the
        attributes that exist are updated.
        """
        text = self.text_config(config)
        heads, kv_heads, head_dim = head_layout(text)
        attn = self.attention_module(layer) if self.has_attention(layer) else None
        for name, value in (("num_key_value_groups", heads // kv_heads), ("num_heads", heads),
                            ("num_attention_heads", heads), ("num_key_value_heads", kv_heads), ("head_dim", head_dim)):
            if attn is not None and hasattr(attn, name):
                setattr(attn, name, value)
        self.mlp_layout.sync(self.mlp_module(layer), text)
