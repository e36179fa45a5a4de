"""Checkpoints with per-layer widths, as transact writes them (the DeciLM / Nemotron-NAS layout,
``transact.io.per_layer``): Llama blocks (with q/k/v biases where ``qkv_bias`` says so) whose MLP width is each
layer's own, read with the project's own classes (``transact/decilm``), never with the copies beside the
weights.

transact measures and serves them (``eval``, ``bench``, ``compare``, ``info``, ``verify``, ``export``), which need
the modules and the model's costs: the MLP parts of a layer are as wide as its own ``down_proj``, and the shape
states the mean width, which gives the exact parameter and FLOP counts whenever the widths average to a whole
number (what ``--allocate search`` keeps; otherwise the mean is rounded). Layers with different KV-head counts
are refused (the shape states one KV cache per layer), and so is pruning such a checkpoint again: plans and the
memory planner describe one width per part for every layer, so prune the model it came from instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PretrainedConfig

from transact.arch import register
from transact.arch.adapter import CheckpointRules, FamilyAdapter, GgufTarget
from transact.arch.mlp import DenseMlp
from transact.arch.parts import MlpParts
from transact.decilm.configuration_decilm import MODEL_TYPE, DeciLMConfig
from transact.decilm.modeling_decilm import DeciLMForCausalLM
from transact.errors import TransactError

PRUNE_REFUSAL = ("this checkpoint has per-layer widths (the DeciLM / Nemotron-NAS layout); transact measures, "
                 "verifies, exports and trains it (transact run with shots: 0), but does not prune it again: plans "
                 "describe one width per part for every layer. Prune the model it came from instead (its plan.json "
                 "names it)")


def _widths(text_config: PretrainedConfig) -> list[tuple[int, int]]:
    return text_config.widths()


@dataclass(frozen=True)
class PerLayerMlp(DenseMlp):
    """A gated MLP whose width is each layer's own (``block_configs``)."""

    def width(self, text_config: PretrainedConfig) -> int:
        """The mean of the widths of the layers that have an MLP (rounded; the shape lists those layers):
        what the shape states for the model's costs."""
        widths = [width for _, width in _widths(text_config) if width]  # 0: a layer whose MLP was dropped
        return round(sum(widths) / len(widths))

    def refusal(self, text_config: PretrainedConfig) -> str | None:
        kv_heads = sorted({kv for kv, _ in _widths(text_config) if kv})  # 0: a layer without attention
        if len(kv_heads) > 1:
            return (f"the layers of this per-layer checkpoint keep different KV-head counts ({kv_heads}); transact "
                    "reads per-layer MLP widths only (`transact export` still writes it for llama.cpp)")
        return None

    def parts(self, block: nn.Module, text_config: PretrainedConfig) -> MlpParts:
        return self.plain_parts(block, getattr(block, self.down).in_features)

    def write_widths(self, text_config: PretrainedConfig, intermediate_size: int, num_experts: int | None,
                     shared_size: int | None) -> None:
        raise TransactError(PRUNE_REFUSAL)

    def sync(self, block: nn.Module, text_config: PretrainedConfig) -> None:
        """Each layer's module already states its own width."""


class DeciLMClasses:
    """Builds and loads ``DeciLMForCausalLM`` as the auto classes build and load the other families (what
    ``FamilyAdapter.model_class`` returns), without ``trust_remote_code``."""

    @staticmethod
    def from_config(config: DeciLMConfig, **kwargs: Any) -> DeciLMForCausalLM:
        return DeciLMForCausalLM._from_config(config, **kwargs)

    @staticmethod
    def from_pretrained(path: Any, **kwargs: Any) -> DeciLMForCausalLM:
        return DeciLMForCausalLM.from_pretrained(path, **kwargs)


def decilm_per_layer(config: PretrainedConfig) -> dict:
    """The fields beyond Llama's it is saved with again: its q/k/v biases."""
    return {"qkv_bias": bool(getattr(config, "qkv_bias", False))}


ADAPTER = register(FamilyAdapter(
    MODEL_TYPE, mlp_layout=PerLayerMlp(), prune_refusal=PRUNE_REFUSAL,
    checkpoint=CheckpointRules(auto_class=DeciLMClasses, per_layer=decilm_per_layer),
    gguf=lambda config: GgufTarget("deci")))
