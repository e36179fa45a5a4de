"""What a family adapter is: where a model family keeps its prunable parts, how its config describes
them, and what its checkpoints can carry.

Every family transact supports today names its modules the same way
(``model.layers[i].self_attn.{q,k,v,o}_proj`` and ``model.layers[i].mlp.{gate,up,down}_proj``), so one
frozen dataclass describes them all; what differs is data (module names, where a multimodal checkpoint
keeps its text model) and a few family rules given as functions (which config class a pruned checkpoint
is saved as, whether it can carry o_proj/down_proj biases, its llama.cpp architecture). No module outside
``transact.arch`` reads ``model_type`` or family-specific config fields.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from transact.errors import TransactError


@dataclass(frozen=True)
class Rows:
    """Output rows ``[start, start + size)`` of a projection that computes several parts at once (Phi-3's
    ``qkv_proj`` holds q, k and v; its ``gate_up_proj`` gate and up). It reads like the part's own
    ``nn.Linear``: ``weight`` and ``bias`` are views of those rows, ``grad`` of the weight's gradient."""

    linear: nn.Linear
    start: int
    size: int

    @property
    def span(self) -> slice:
        return slice(self.start, self.start + self.size)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight[self.span]

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.linear.bias is None else self.linear.bias[self.span]

    @property
    def grad(self) -> torch.Tensor | None:
        grad = self.linear.weight.grad
        return None if grad is None else grad[self.span]


# One projection of a block: a module of its own, or rows of a fused one.
Part = nn.Linear | Rows


def module_of(part: Part) -> tuple[nn.Linear, int]:
    """The module that computes ``part``, and the index of the part's first output row in it."""
    return (part.linear, part.start) if isinstance(part, Rows) else (part, 0)


def weight_grad(part: Part) -> torch.Tensor | None:
    """The gradient of a part's weight rows (None before a backward pass)."""
    return part.grad if isinstance(part, Rows) else part.weight.grad


def _modules(*parts: Part | None) -> tuple[nn.Linear, ...]:
    """The distinct modules computing ``parts``, in order (a fused module once)."""
    found: dict[int, nn.Linear] = {}
    for part in parts:
        if part is not None:
            module, _ = module_of(part)
            found.setdefault(id(module), module)
    return tuple(found.values())


@dataclass(frozen=True)
class AttentionParts:
    """The four projections of one attention block and its head layout (read from the config)."""

    q: Part
    k: Part
    v: Part
    o: nn.Linear
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_gated: bool = False

    @property
    def q_head_rows(self) -> int:
        """Rows of q per query head: head_dim, or twice that where each head's block of q_proj also holds
        the output gate of that head ([query | gate] per head, Qwen3.5)."""
        return 2 * self.head_dim if self.q_gated else self.head_dim

    @property
    def linears(self) -> tuple[nn.Linear, ...]:
        """The modules computing q, k, v and o (a fused qkv module once)."""
        return _modules(self.q, self.k, self.v, self.o)


@dataclass(frozen=True)
class MlpParts:
    """The projections of one gated MLP; ``gate`` is None for an ungated MLP."""

    gate: Part | None
    up: Part
    down: nn.Linear
    intermediate_size: int

    @property
    def linears(self) -> tuple[nn.Linear, ...]:
        """The modules computing gate, up and down (a fused gate/up module once)."""
        return _modules(self.gate, self.up, self.down)


# transformers runs experts through torch's grouped matmul by default, which needs every row of the fused
# expert weights to span a multiple of 16 bytes ("strides should be multiple of 16 bytes" otherwise): 8
# channels in bf16/fp16. A pruned expert width is kept a multiple of it, as every released one is.
EXPERT_WIDTH_MULTIPLE = 8


@dataclass(frozen=True)
class ExpertParts:
    """The routed experts of one mixture-of-experts block, as transformers fuses them: ``gate_up``
    [E, 2I, H] (each expert's I gate rows, then its I up rows) and ``down`` [E, H, I] are parameters of the
    ``experts`` module; the router's ``weight`` [E, H] scores the experts for each token, and each token goes
    to its best ``top_k``. ``shared`` is an always-active plain MLP beside them (Qwen2-MoE), if any."""

    experts: nn.Module
    router: nn.Module
    num_experts: int
    top_k: int
    intermediate_size: int
    shared: MlpParts | None = None

    @property
    def gate_up(self) -> nn.Parameter:
        return self.experts.gate_up_proj

    @property
    def down(self) -> nn.Parameter:
        return self.experts.down_proj

    @property
    def linears(self) -> tuple[nn.Linear, ...]:
        """The plain modules of the block pruning slices (the shared expert's; the experts are 3-D)."""
        return self.shared.linears if self.shared is not None else ()


@dataclass(frozen=True)
class HeadRule:
    """The query-head counts a family's checkpoint can be saved with, and why no others."""

    counts: tuple[int, ...]
    why: str


DELTA_RULE_CHUNK = 64  # tokens per chunk of the gated delta rule in transformers and flash-linear-attention


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

    def parameters(self, hidden_size: int) -> int:
        """Parameters of one block's projections and convolution (per-head scalars are negligible)."""
        keys, values = self.key_heads * self.key_dim, self.value_heads * self.value_dim
        conv = 2 * keys + values
        return hidden_size * (conv + values + 2 * self.value_heads) + values * hidden_size + conv * self.conv_kernel

    def flops_per_token(self, hidden_size: int) -> int:
        """Forward FLOPs of one block for one token of a prefill: its projections and convolution, and the
        chunked gated delta rule as transformers' and flash-linear-attention's kernels compute it (chunks of
        ``DELTA_RULE_CHUNK`` tokens): per value head and token, the in-chunk q·k and k·k products (2 x chunk
        x key_dim each), the in-chunk attention on the values (chunk x value_dim), and reading, correcting and
        writing the key_dim x value_dim state (3 x key_dim x value_dim); 2 FLOPs per multiply-add.
        Independent of the context; the triangular solves within each chunk are left out."""
        chunk = DELTA_RULE_CHUNK
        per_head = 2 * chunk * self.key_dim + chunk * self.value_dim + 3 * self.key_dim * self.value_dim
        return 2 * self.parameters(hidden_size) + 2 * self.value_heads * per_head


@dataclass(frozen=True)
class ModelShape:
    """The prunable dimensions of a model's text stack, as plans record them. The widths are the same in
    every layer that has the part; ``attention_layers`` lists the layers with softmax attention where a
    hybrid model has others (None: every layer), and only those layers have heads to prune.

    ``vocab_size`` and ``max_positions`` (the trained context, None if unstated) describe the model for
    measurements; ``head_rule`` (None: any head count) is the family's limit on pruned head counts;
    ``linear_attention`` describes the other layers' blocks; ``q_gated``: q_proj also holds each head's
    output gate (see ``AttentionParts.q_head_rows``). None of them is part of what a plan must match
    (``compare=False``).

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
    num_experts: int | None = None
    experts_per_token: int | None = None
    shared_expert_size: int | None = None

    def __post_init__(self) -> None:
        if self.attention_layers is not None:  # a plan read from JSON gives a list
            object.__setattr__(self, "attention_layers", tuple(self.attention_layers))

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

    @property
    def num_attention_layers(self) -> int:
        return self.num_layers if self.attention_layers is None else len(self.attention_layers)

    def to_json(self) -> dict[str, Any]:
        """The fields a plan records (the measurement-only ones are left out; ``attention_layers`` only
        for hybrid models, so plans of the others read as before)."""
        names = ("model_type", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                 "intermediate_size")
        data = {name: getattr(self, name) for name in names}
        if self.attention_layers is not None:
            data["attention_layers"] = list(self.attention_layers)
        if self.is_moe:
            data.update(num_experts=self.num_experts, experts_per_token=self.experts_per_token)
        if self.shared_expert_size is not None:
            data["shared_expert_size"] = self.shared_expert_size
        return data


@dataclass(frozen=True)
class GgufTarget:
    """How llama.cpp's converter takes a checkpoint: the GGUF architecture it becomes, config.json keys
    replaced in the converter's input (None: the checkpoint is converted as it is), and options added to
    the converter's command line."""

    architecture: str
    config_overrides: dict[str, Any] | None = None
    converter_args: tuple[str, ...] = ()


def head_layout(config: PretrainedConfig) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) as a text config states them (kv defaults to MHA)."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, int(head_dim)


def _unchanged(config: PretrainedConfig) -> PretrainedConfig:
    return config


@dataclass(frozen=True)
class FamilyAdapter:
    """Where one model family keeps its prunable parts, and its checkpoint rules.

    - ``text_config_name``: the attribute of a multimodal config holding the text model's config (None when
      the config is the text config itself); ``layers_path`` then points into the language model.
    - ``portable_config`` maps the in-memory config of a pruned model to the config a checkpoint must carry
      so that vanilla ``transformers`` loads it (see ``transact.arch.llama``).
    - ``output_bias_flags``: config flags that give o_proj and down_proj a bias in a vanilla checkpoint (they
      also give q/k/v and gate/up one); empty where the config cannot express such biases.
      ``output_bias_rule(text_config, num_heads)`` says why a pruned width cannot carry them (None: it can).
    - ``gguf(text_config)``: llama.cpp's architecture for the checkpoint (None: llama.cpp has none).
    - ``head_rule(text_config)``: the query-head counts a checkpoint of this family can be saved with
      (None: any); widths outside it are refused before any work.
    - ``notes(text_config)``: what a user should know about pruning this family (``transact info`` prints it).
    - ``qkv_name`` / ``gate_up_name``: a fused projection holding q, k, v (rows in that order) / gate, up
      (gate first) in place of the separate ones (None: separate modules).
    - ``portable_state(state, config)``: the state dict (full model or one layer) under the tensor names
      of ``portable_config(config)``'s class, where that class lays its weights out differently (called only
      when ``portable_config`` changes the class; None: the names are the same).
    - ``attention_layers(text_config)``: the layers with softmax attention in a hybrid model (None: all);
      the others have no ``attention_name`` module and no heads to prune. ``linear_attention(text_config)``
      describes those other layers' blocks for cost estimates.
    - ``q_gated``: each query head's block of q_proj holds 2·head_dim rows, the query and then the gate
      its output is multiplied by (Qwen3.5); a head keeps or loses both.
    - ``logit_transform(text_config)``: what the family's model does to the LM head's output before it
      returns logits (Gemma's soft-capping, Granite's scaling; None: nothing), so that logits can be
      computed from the final hidden states in chunks (``lm_logits``).
    - ``auto_class``: the transformers auto class that loads and builds the family's checkpoints with
      everything they hold (None: ``AutoModelForCausalLM``; a multimodal family whose causal-LM class
      would drop the vision tower names its image-text class).
    - ``experts_name``: the module of the MLP block holding the routed experts (fused 3-D parameters, see
      ``ExpertParts``) in a mixture-of-experts family (None: a dense MLP); ``router_name`` the block's router,
      ``shared_expert_name`` its always-active plain MLP (None: none). The config states the expert count
      under ``num_experts_key`` and each expert's width under ``expert_width_key``. ``moe_refusal(text_config)``
      says why a model of the family cannot be pruned (None: it can), checked whenever its shape is read.
      The shared expert's width is the config's ``shared_width_key``. ``expert_files``: the names (within a
      decoder layer, ``{e}`` the expert) under which checkpoints store each expert's gate, up and down
      projection: transformers fuses them on load and splits them on save, and a layer-wise prune does the
      same for one layer (``fused_layer_state`` / ``split_layer_state``).
    """

    model_type: str
    layers_path: str = "model.layers"
    text_config_name: str | None = None
    attention_name: str = "self_attn"
    q_name: str = "q_proj"
    k_name: str = "k_proj"
    v_name: str = "v_proj"
    o_name: str = "o_proj"
    mlp_name: str = "mlp"
    gate_name: str | None = "gate_proj"
    up_name: str = "up_proj"
    down_name: str = "down_proj"
    qkv_name: str | None = None
    gate_up_name: str | None = None
    portable_config: Callable[[PretrainedConfig], PretrainedConfig] = field(default=_unchanged)
    output_bias_flags: tuple[str, ...] = ()
    output_bias_rule: Callable[[PretrainedConfig, int], str | None] | None = None
    gguf: Callable[[PretrainedConfig], GgufTarget] | None = None
    head_rule: Callable[[PretrainedConfig], HeadRule | None] | None = None
    notes: Callable[[PretrainedConfig], tuple[str, ...]] = field(default=lambda config: ())
    portable_state: Callable[[dict[str, torch.Tensor], PretrainedConfig], dict[str, torch.Tensor]] | None = None
    attention_layers: Callable[[PretrainedConfig], tuple[int, ...] | None] | None = None
    linear_attention: Callable[[PretrainedConfig], LinearAttentionShape | None] | None = None
    q_gated: bool = False
    auto_class: type | None = None
    logit_transform: Callable[[PretrainedConfig], Callable[[torch.Tensor], torch.Tensor] | None] | None = None
    experts_name: str | None = None
    router_name: str = "gate"
    shared_expert_name: str | None = None
    num_experts_key: str = "num_experts"
    expert_width_key: str = "moe_intermediate_size"
    moe_refusal: Callable[[PretrainedConfig], str | None] | None = None
    expert_files: tuple[str, str, str] = ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight",
                                          "mlp.experts.{e}.down_proj.weight")
    shared_width_key: str = "shared_expert_intermediate_size"

    def model_class(self) -> type:
        """The auto class whose ``from_pretrained`` / ``from_config`` gives this family's full model."""
        return self.auto_class or AutoModelForCausalLM

    # -- the config
    def text_config(self, config: PretrainedConfig) -> PretrainedConfig:
        return getattr(config, self.text_config_name) if self.text_config_name else config

    @property
    def is_moe(self) -> bool:
        return self.experts_name is not None

    def mlp_width(self, text_config: PretrainedConfig) -> int:
        """The width pruning keeps a count of: the MLP's, or each routed expert's in a mixture of experts."""
        return int(getattr(text_config, self.expert_width_key if self.is_moe else "intermediate_size"))

    def shape(self, config: PretrainedConfig) -> ModelShape:
        text = self.text_config(config)
        refusal = self.moe_refusal(text) if self.moe_refusal else None
        if refusal:
            raise TransactError(refusal)
        heads, kv_heads, head_dim = head_layout(text)
        num_experts, experts_per_token = self.expert_counts(text) if self.is_moe else (None, None)
        return ModelShape(model_type=config.model_type, num_layers=text.num_hidden_layers,
                          hidden_size=text.hidden_size, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                          intermediate_size=self.mlp_width(text), vocab_size=getattr(text, "vocab_size", None),
                          max_positions=getattr(text, "max_position_embeddings", None),
                          head_rule=self.head_rule(text) if self.head_rule else None,
                          attention_layers=self.attention_layers(text) if self.attention_layers else None,
                          linear_attention=self.linear_attention(text) if self.linear_attention else None,
                          q_gated=self.q_gated, num_experts=num_experts, experts_per_token=experts_per_token,
                          shared_expert_size=self.shared_width(text))

    def expert_counts(self, text_config: PretrainedConfig) -> tuple[int, int]:
        """(experts per layer, experts each token is routed to) of a mixture of experts."""
        return int(getattr(text_config, self.num_experts_key)), int(text_config.num_experts_per_tok)

    def shared_width(self, text_config: PretrainedConfig) -> int | None:
        """The shared expert's width (None: the family has none)."""
        return int(getattr(text_config, self.shared_width_key)) if self.shared_expert_name else None

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
        setattr(text, self.expert_width_key if self.is_moe else "intermediate_size", intermediate_size)
        if num_experts is not None:
            setattr(text, self.num_experts_key, num_experts)
        if shared_size is not None:
            setattr(text, self.shared_width_key, shared_size)

    def one_layer_config(self, config: PretrainedConfig, index: int) -> PretrainedConfig:
        """``config`` cut down to its layer ``index``, for running that layer alone: one hidden layer, that
        layer's entry of every per-layer list (``layer_types`` and the like), a one-token vocabulary without
        special tokens, and untied embeddings (a one-layer model never reads its embedding or head). Of a
        multimodal config only the text config is cut: its layer runs in the text-only model class."""
        config = self.text_config(config)
        values = config.to_dict()
        layers = config.num_hidden_layers
        for key, value in values.items():
            if isinstance(value, list) and len(value) == layers and key != "architectures":
                values[key] = [value[index]]
        values.update(num_hidden_layers=1, vocab_size=1, pad_token_id=None, bos_token_id=None, eos_token_id=None,
                      tie_word_embeddings=False)
        one = type(config).from_dict(values)
        one._attn_implementation = config._attn_implementation
        return one

    def relayouts(self, config: PretrainedConfig) -> bool:
        """Whether a checkpoint of this config lays its weights out differently from the model in memory
        (split fused projections): it then computes the same function with differently shaped matmuls,
        equal only up to floating-point rounding."""
        return self.portable_state is not None and self.portable_config(config) is not config

    def saved_state(self, state: dict[str, torch.Tensor], config: PretrainedConfig) -> dict[str, torch.Tensor]:
        """``state`` (of a model or one layer with this ``config``) named as its checkpoint names it."""
        return self.portable_state(state, config) if self.relayouts(config) else state

    def saved_model_type(self, config: PretrainedConfig) -> str:
        """The ``model_type`` a checkpoint of this (pruned) config is saved as."""
        return self.portable_config(config).model_type

    def output_bias_refusal(self, config: PretrainedConfig, num_heads: int) -> str | None:
        """Why a checkpoint pruned to ``num_heads`` could not carry o_proj/down_proj biases (None: it can)."""
        if not self.output_bias_flags:
            return f"a vanilla {self.model_type!r} checkpoint cannot carry o_proj/down_proj biases (its config has " \
                   "no option for them)"
        return self.output_bias_rule(self.text_config(config), num_heads) if self.output_bias_rule else None

    def enable_output_biases(self, config: PretrainedConfig) -> None:
        for flag in self.output_bias_flags:
            setattr(self.text_config(config), flag, True)

    def family_notes(self, config: PretrainedConfig) -> list[str]:
        """The family's limits and traps for this model, in words: its head rule, its notes, and whether
        llama.cpp can take it as it is."""
        shape = self.shape(config)
        lines = [f"heads: {shape.head_rule.why}"] if shape.head_rule else []
        if shape.is_moe:
            lines.append(f"mixture of experts: --experts keeps each layer's best experts by routed contribution (at "
                         f"least the {shape.experts_per_token} each token is routed to); --mlp keeps each kept "
                         "expert's own best channels, measured on its router-weighted inputs")
            lines.append("transact run: LoRA adapts attention (and a shared expert), not the routed experts' fused "
                         "weights; method full trains them too")
        lines += self.notes(self.text_config(config))
        try:
            lines.append(f"GGUF: converts as llama.cpp's {self.gguf_target(config).architecture!r} architecture")
        except TransactError as e:
            lines.append(f"GGUF: {e}")
        return lines

    def gguf_target(self, config: PretrainedConfig) -> GgufTarget:
        if self.gguf is None:
            raise TransactError(f"no llama.cpp architecture is known for model_type {self.model_type!r}")
        return self.gguf(self.text_config(config))

    # -- one decoder layer's tensors, as checkpoints store them
    def _fused_names(self) -> tuple[str, str]:
        experts = f"{self.mlp_name}.{self.experts_name}"
        return f"{experts}.gate_up_proj", f"{experts}.down_proj"

    def fused_layer_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A decoder layer's tensors as a checkpoint stores them (names within the layer) -> as the layer
        module holds them: each expert's stored projections fused into the 3-D expert parameters."""
        if not self.is_moe:
            return state
        gate, up, down = self.expert_files
        state, count = dict(state), 0
        while gate.format(e=count) in state:
            count += 1
        take = [[state.pop(name.format(e=e)) for e in range(count)] for name in (gate, up, down)]
        gate_up_name, down_name = self._fused_names()
        state[gate_up_name] = torch.stack([torch.cat([g, u]) for g, u in zip(take[0], take[1], strict=True)])
        state[down_name] = torch.stack(take[2])
        return state

    def split_layer_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse of ``fused_layer_state``: a layer module's tensors -> as its checkpoint stores them."""
        if not self.is_moe:
            return state
        gate, up, down = self.expert_files
        gate_up_name, down_name = self._fused_names()
        state = dict(state)
        gate_up, experts_down = state.pop(gate_up_name), state.pop(down_name)
        width = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            state[gate.format(e=e)] = gate_up[e, :width].contiguous()
            state[up.format(e=e)] = gate_up[e, width:].contiguous()
            state[down.format(e=e)] = experts_down[e].contiguous()
        return state

    # -- the modules
    def lm_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The logits ``model`` computes from its final (normed) hidden states ``hidden`` (..., H) -> (..., V):
        its LM head, then the family's transform."""
        logits = model.get_output_embeddings()(hidden)
        transform = self.logit_transform(self.text_config(model.config)) if self.logit_transform else None
        return logits if transform is None else transform(logits)

    def layers(self, model: nn.Module) -> Sequence[nn.Module]:
        return model.get_submodule(self.layers_path)

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attention_name)

    def mlp_module(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp_name)

    def has_attention(self, layer: nn.Module) -> bool:
        """Whether ``layer`` has softmax attention (a hybrid model's other layers have none)."""
        return hasattr(layer, self.attention_name)

    def attention(self, layer: nn.Module, config: PretrainedConfig) -> AttentionParts | None:
        """The attention projections of ``layer``; None for a layer without softmax attention."""
        if not self.has_attention(layer):
            return None
        attn = self.attention_module(layer)
        heads, kv_heads, head_dim = head_layout(self.text_config(config))
        if self.qkv_name:
            qkv = getattr(attn, self.qkv_name)
            q_size, kv_size = heads * head_dim, kv_heads * head_dim
            q, k, v = Rows(qkv, 0, q_size), Rows(qkv, q_size, kv_size), Rows(qkv, q_size + kv_size, kv_size)
        else:
            q, k, v = (getattr(attn, name) for name in (self.q_name, self.k_name, self.v_name))
        return AttentionParts(q=q, k=k, v=v, o=getattr(attn, self.o_name), num_heads=heads, num_kv_heads=kv_heads,
                              head_dim=head_dim, q_gated=self.q_gated)

    def mlp(self, layer: nn.Module, config: PretrainedConfig) -> MlpParts | ExpertParts:
        """The MLP of ``layer``: its projections, or in a mixture of experts its experts and router."""
        mlp = self.mlp_module(layer)
        text = self.text_config(config)
        if self.is_moe:
            shared = getattr(mlp, self.shared_expert_name) if self.shared_expert_name else None
            num_experts, top_k = self.expert_counts(text)
            return ExpertParts(
                experts=getattr(mlp, self.experts_name), router=getattr(mlp, self.router_name),
                num_experts=num_experts, top_k=top_k, intermediate_size=self.mlp_width(text),
                shared=None if shared is None else self._plain_mlp(shared, self.shared_width(text)))
        return self._plain_mlp(mlp, text.intermediate_size)

    def _plain_mlp(self, mlp: nn.Module, size: int) -> MlpParts:
        if self.gate_up_name:
            fused = getattr(mlp, self.gate_up_name)
            gate, up = Rows(fused, 0, size), Rows(fused, size, size)
        else:
            gate, up = getattr(mlp, self.gate_name) if self.gate_name else None, getattr(mlp, self.up_name)
        return MlpParts(gate=gate, up=up, down=getattr(mlp, self.down_name), intermediate_size=size)

    def layer_parts(self, model: nn.Module) -> list[tuple[AttentionParts | None, MlpParts | ExpertParts]]:
        """(attention, MLP) of every decoder layer, in order; attention is None in a layer without it."""
        return [(self.attention(layer, model.config), self.mlp(layer, model.config)) for layer in self.layers(model)]

    def prunable_linears(self, model: nn.Module) -> list[nn.Linear]:
        """Every module pruning slices (q/k/v/o, gate/up/down, fused ones once), layer by layer."""
        return [linear for attn, mlp in self.layer_parts(model)
                for linear in ((*attn.linears, *mlp.linears) if attn else mlp.linears)]

    def pruned_modules(self, model: nn.Module) -> list[nn.Module]:
        """Every module whose weights pruning slices or a corrector changes: ``prunable_linears`` and each
        mixture-of-experts block's fused experts module."""
        experts = [mlp.experts for _, mlp in self.layer_parts(model) if isinstance(mlp, ExpertParts)]
        return [*self.prunable_linears(model), *experts]

    def sync_modules(self, layer: nn.Module, config: PretrainedConfig) -> None:
        """Bring the per-module copies of head counts in line with ``config``.

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
        mlp = self.mlp_module(layer)
        if self.is_moe:
            experts, router = getattr(mlp, self.experts_name), getattr(mlp, self.router_name)
            count, _ = self.expert_counts(text)
            for module in (mlp, experts, router):
                if hasattr(module, "num_experts"):
                    module.num_experts = count
            experts.intermediate_dim = self.mlp_width(text)
            shared = getattr(mlp, self.shared_expert_name) if self.shared_expert_name else None
            if shared is not None and hasattr(shared, "intermediate_size"):
                shared.intermediate_size = self.shared_width(text)
        elif hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = text.intermediate_size

