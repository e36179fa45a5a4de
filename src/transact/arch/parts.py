"""The prunable parts of one decoder layer as views of its modules: attention projections, a gated MLP, or a
mixture of experts' fused expert parameters. An adapter builds them from a layer (``FamilyAdapter.attention``,
``FamilyAdapter.mlp``); calibration, metrics, correctors and surgery read and slice them without knowing the
family."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


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

