"""How a family's MLP block is laid out, as one value the adapter holds: a gated MLP (``DenseMlp``) or a mixture
of experts (``ExpertMlp``). Both answer the same questions (the width pruning counts, the parts of a block, how a
config records pruned widths, how checkpoints store a layer's tensors), so the adapter's generic methods ask
the layout and never branch on the kind of MLP; a new kind of MLP block is a new value of this kind."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from transact.arch.parts import ExpertParts, MlpParts, Rows


@dataclass(frozen=True)
class DenseMlp:
    """A gated MLP ``down(act(gate(x)) * up(x))`` (``gate`` None: ungated), its projections named here;
    ``gate_up``: one fused projection holding the gate rows, then the up rows (Phi-3) in place of the two.
    Its width is the config's ``intermediate_size``."""

    gate: str | None = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    gate_up: str | None = None

    is_moe = False
    width_key = "intermediate_size"

    def width(self, text_config: PretrainedConfig) -> int:
        """The width pruning keeps a count of."""
        return int(getattr(text_config, self.width_key))

    def counts(self, text_config: PretrainedConfig) -> tuple[None, None]:
        """(experts per layer, experts each token is routed to): none."""
        return None, None

    def shared_width(self, text_config: PretrainedConfig) -> None:
        return None

    def refusal(self, text_config: PretrainedConfig) -> None:
        return None

    def parts(self, block: nn.Module, text_config: PretrainedConfig) -> MlpParts:
        return self.plain_parts(block, self.width(text_config))

    def plain_parts(self, block: nn.Module, size: int) -> MlpParts:
        """The projections of a gated MLP module of ``size`` channels."""
        if self.gate_up:
            fused = getattr(block, self.gate_up)
            gate, up = Rows(fused, 0, size), Rows(fused, size, size)
        else:
            gate, up = getattr(block, self.gate) if self.gate else None, getattr(block, self.up)
        return MlpParts(gate=gate, up=up, down=getattr(block, self.down), intermediate_size=size)

    def write_widths(self, text_config: PretrainedConfig, intermediate_size: int, num_experts: int | None,
                     shared_size: int | None) -> None:
        setattr(text_config, self.width_key, intermediate_size)

    def sync(self, block: nn.Module, text_config: PretrainedConfig) -> None:
        """Bring the module's cached width in line with the config."""
        if hasattr(block, "intermediate_size"):
            block.intermediate_size = self.width(text_config)

    def fused_layer_state(self, state: dict[str, torch.Tensor], mlp_name: str) -> dict[str, torch.Tensor]:
        """A decoder layer's tensors as checkpoints store them -> as the layer module holds them: the same."""
        return state

    def split_layer_state(self, state: dict[str, torch.Tensor], mlp_name: str) -> dict[str, torch.Tensor]:
        return state


@dataclass(frozen=True)
class ExpertMlp:
    """A mixture of experts: the block's ``experts`` module holds every expert's projections as fused 3-D
    parameters (see ``ExpertParts``), ``router`` scores the experts for each token, ``shared`` names an
    always-active plain MLP beside them (None: none; its projections named as ``shared_mlp`` says). The
    config states the expert count under ``count_key``, each expert's width under ``width_key``, the shared
    expert's width under ``shared_width_key``. ``files``: the names (within a decoder layer, ``{e}`` the
    expert) under which checkpoints store each expert's gate, up and down projection: transformers fuses them
    on load and splits them on save, and a layer-wise prune does the same for one layer. ``rule(text_config)``
    says why a model of the family cannot be pruned (None: it can), checked whenever its shape is read."""

    experts: str = "experts"
    router: str = "gate"
    shared: str | None = None
    shared_mlp: DenseMlp = DenseMlp()
    count_key: str = "num_experts"
    width_key: str = "moe_intermediate_size"
    shared_width_key: str = "shared_expert_intermediate_size"
    files: tuple[str, str, str] = ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight",
                                   "mlp.experts.{e}.down_proj.weight")
    rule: Callable[[PretrainedConfig], str | None] | None = None

    is_moe = True

    def width(self, text_config: PretrainedConfig) -> int:
        """Each expert's width (the one pruning keeps a count of)."""
        return int(getattr(text_config, self.width_key))

    def counts(self, text_config: PretrainedConfig) -> tuple[int, int]:
        """(experts per layer, experts each token is routed to)."""
        return int(getattr(text_config, self.count_key)), int(text_config.num_experts_per_tok)

    def shared_width(self, text_config: PretrainedConfig) -> int | None:
        """The shared expert's width (None: the family has none)."""
        return int(getattr(text_config, self.shared_width_key)) if self.shared else None

    def refusal(self, text_config: PretrainedConfig) -> str | None:
        return self.rule(text_config) if self.rule else None

    def parts(self, block: nn.Module, text_config: PretrainedConfig) -> ExpertParts:
        shared = getattr(block, self.shared) if self.shared else None
        num_experts, top_k = self.counts(text_config)
        return ExpertParts(
            experts=getattr(block, self.experts), router=getattr(block, self.router), num_experts=num_experts,
            top_k=top_k, intermediate_size=self.width(text_config),
            shared=None if shared is None else self.shared_mlp.plain_parts(shared, self.shared_width(text_config)))

    def write_widths(self, text_config: PretrainedConfig, intermediate_size: int, num_experts: int | None,
                     shared_size: int | None) -> None:
        setattr(text_config, self.width_key, intermediate_size)
        if num_experts is not None:
            setattr(text_config, self.count_key, num_experts)
        if shared_size is not None:
            setattr(text_config, self.shared_width_key, shared_size)

    def sync(self, block: nn.Module, text_config: PretrainedConfig) -> None:
        """Bring the modules' cached expert count and widths in line with the config."""
        experts, router = getattr(block, self.experts), getattr(block, self.router)
        count, _ = self.counts(text_config)
        for module in (block, experts, router):
            if hasattr(module, "num_experts"):
                module.num_experts = count
        experts.intermediate_dim = self.width(text_config)
        shared = getattr(block, self.shared) if self.shared else None
        if shared is not None and hasattr(shared, "intermediate_size"):
            shared.intermediate_size = self.shared_width(text_config)

    def _fused_names(self, mlp_name: str) -> tuple[str, str]:
        return f"{mlp_name}.{self.experts}.gate_up_proj", f"{mlp_name}.{self.experts}.down_proj"

    def fused_layer_state(self, state: dict[str, torch.Tensor], mlp_name: str) -> dict[str, torch.Tensor]:
        """A decoder layer's tensors as a checkpoint stores them (names within the layer) -> as the layer
        module holds them: each expert's stored projections fused into the 3-D expert parameters."""
        gate, up, down = self.files
        state, count = dict(state), 0
        while gate.format(e=count) in state:
            count += 1
        take = [[state.pop(name.format(e=e)) for e in range(count)] for name in (gate, up, down)]
        gate_up_name, down_name = self._fused_names(mlp_name)
        state[gate_up_name] = torch.stack([torch.cat([g, u]) for g, u in zip(take[0], take[1], strict=True)])
        state[down_name] = torch.stack(take[2])
        return state

    def split_layer_state(self, state: dict[str, torch.Tensor], mlp_name: str) -> dict[str, torch.Tensor]:
        """The inverse of ``fused_layer_state``: a layer module's tensors -> as its checkpoint stores them."""
        gate, up, down = self.files
        gate_up_name, down_name = self._fused_names(mlp_name)
        state = dict(state)
        gate_up, experts_down = state.pop(gate_up_name), state.pop(down_name)
        width = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            state[gate.format(e=e)] = gate_up[e, :width].contiguous()
            state[up.format(e=e)] = gate_up[e, width:].contiguous()
            state[down.format(e=e)] = experts_down[e].contiguous()
        return state


MlpLayout = DenseMlp | ExpertMlp
