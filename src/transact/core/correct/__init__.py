"""Correctors: steps that run after selection and before slicing and may change the weights that stay.

Each is one ``Corrector`` in one module of this package, registered by name. It declares the statistics it
needs (collected in the same calibration pass as the metric's), checks before any computation that the
family's vanilla checkpoint can carry its result, and returns a record that plan.json keeps. A corrector
whose result plan.json cannot reproduce (it depends on calibration statistics) makes ``apply-plan`` refuse
the plan rather than silently write different weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PretrainedConfig

from transact.arch import FamilyAdapter, get_adapter
from transact.core.surgery import unit_rows
from transact.options import NoOptions
from transact.registry import Registry

if TYPE_CHECKING:
    from transact.core.calibrate import Statistics
    from transact.core.plan import PrunePlan
    from transact.core.targets import Targets


@dataclass(frozen=True)
class Corrector:
    """``check(adapter, config, targets)`` raises TransactError where the result could not be saved;
    ``apply(model, plan, statistics, options)`` changes the unpruned model's weights in place (the plan's
    slicing follows; ``options`` is the corrector's own options value, see ``transact.options``) and returns
    what plan.json records beyond the name. ``options`` is the frozen dataclass of its options (the recipe
    holds a value of it in ``corrector_options``, and ``transact prune`` offers a flag per field);
    ``conflicts`` names the correctors it cannot run with; ``flag``: a command-line switch that means
    ``--correct NAME`` (``--no-FLAG``: without it), kept where users know it by that name."""

    name: str
    summary: str
    apply: Callable[[nn.Module, PrunePlan, Statistics, Any], dict[str, Any]]
    check: Callable[[FamilyAdapter, PretrainedConfig, Targets], None]
    statistics: tuple[str, ...] = ()
    options: type = NoOptions
    conflicts: tuple[str, ...] = ()
    reproducible: bool = False  # whether apply-plan can redo it from plan.json and the base model alone
    flag: str | None = None


CORRECTORS: Registry[Corrector] = Registry("corrector", __name__, key=lambda corrector: corrector.name)
register_corrector = CORRECTORS.register
get_corrector = CORRECTORS.get
corrector_names = CORRECTORS.names


@dataclass(frozen=True)
class ExpertDown:
    """One expert's slice [H, I] of a fused ``down_proj`` [E, H, I], read like a bias-free ``nn.Linear``:
    writing into ``weight`` writes into the fused parameter."""

    down: torch.Tensor
    expert: int
    bias = None

    @property
    def weight(self) -> torch.Tensor:
        return self.down[self.expert]


@dataclass(frozen=True)
class KeptInput:
    """One projection that consumes transitional activations (o_proj, down_proj, or one routed expert's
    down projection), in layer ``layer`` of ``module`` ("attn", "mlp" or "shared"), and the indices of its input
    columns the plan keeps (on the CPU). ``expert`` is the expert's index in a mixture of experts (None
    otherwise): its statistics are that expert's row of the layer's stacked ones."""

    layer: int
    module: str
    linear: nn.Linear | ExpertDown
    cols: torch.Tensor
    expert: int | None = None

    def statistic(self, per_layer: list[torch.Tensor]) -> torch.Tensor:
        """This projection's input statistic, from a per-layer statistic of its module."""
        value = per_layer[self.layer]
        return value if self.expert is None else value[self.expert]


def kept_inputs(model: nn.Module, plan: PrunePlan) -> Iterator[KeptInput]:
    """What a corrector may change, layer by layer: the projections that consume the transitional
    activations, with the input columns the plan keeps. A layer without softmax attention has only its MLP;
    a mixture of experts has one down projection per kept expert, and its shared expert's ("shared")."""
    cpu = torch.device("cpu")
    for i, ((attn, mlp), kept) in enumerate(zip(get_adapter(model).layer_parts(model), plan.layers, strict=True)):
        if attn is not None:
            yield KeptInput(i, "attn", attn.o, unit_rows(kept.heads, plan.source.head_dim, cpu))
        if kept.experts is None:
            yield KeptInput(i, "mlp", mlp.down, torch.tensor(kept.mlp, dtype=torch.long))
            continue
        for e, channels in zip(kept.experts, kept.expert_mlp, strict=True):
            yield KeptInput(i, "mlp", ExpertDown(mlp.down, e), torch.tensor(channels, dtype=torch.long), e)
        if mlp.shared is not None:
            yield KeptInput(i, "shared", mlp.shared.down, torch.tensor(kept.mlp, dtype=torch.long))
