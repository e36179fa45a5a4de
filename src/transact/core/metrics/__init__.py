"""Salience metrics: each is one ``Metric`` in one module of this package, registered by name.

A metric declares the statistics it needs (``transact.core.calibrate``: activation statistics from the
hooked forward pass, or ``WEIGHT_X_GRAD`` from backward passes; none for a data-free metric) and turns
them into per-layer scores of query heads and MLP channels (``no_heads()`` in a layer without softmax
attention). Selection, correction and surgery are shared, so every metric yields the same kind of plan and
checkpoint. Adding a metric is adding one module here (see docs/architecture.md); the recipe, the CLI's
``--metric`` choices and its help read this registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from transact.arch import ModelShape
from transact.options import NoOptions
from transact.registry import Registry

if TYPE_CHECKING:
    from transact.core.calibrate import Statistics
    from transact.recipes import PruneRecipe


@dataclass(frozen=True)
class LayerScores:
    """Per-layer unit scores (higher = more important): heads[l] (num_heads,), mlp[l] (intermediate_size,);
    in a mixture of experts mlp[l] (num_experts, intermediate_size) and experts[l] (num_experts,), and where
    it has a shared expert shared[l] (its width,). ``groups[l]`` (num_kv_heads,), where a metric scores KV
    groups itself, ranks the groups (else a group scores the sum of the heads it would keep)."""

    heads: list[torch.Tensor]
    mlp: list[torch.Tensor]
    experts: list[torch.Tensor] | None = None
    shared: list[torch.Tensor] | None = None
    groups: list[torch.Tensor] | None = None


def no_heads() -> torch.Tensor:
    """The head scores of a layer without softmax attention (a hybrid model's linear-attention layers)."""
    return torch.zeros(0)


Scorer = Callable[[nn.Module, "Statistics", ModelShape, "PruneRecipe"], LayerScores]


@dataclass(frozen=True)
class Metric:
    """A salience metric: ``score(model, statistics, shape, recipe)`` -> LayerScores.

    ``statistics`` names what calibration must collect (empty: data-free); ``options`` is the frozen dataclass
    of the metric's own options (``transact.options``: help and bounds on its fields; the recipe holds a
    value of it as ``metric_options``, and ``transact prune`` offers a flag per field); ``summary`` is its
    one-line description in the CLI help; ``experts``: it scores the experts and expert channels of a mixture
    of experts (other metrics are refused on such models before any work); ``corrector_aware``: its choice
    depends on the correctors that follow it (it scores what they leave), so the same metric may select other
    units with and without the refit.
    """

    name: str
    summary: str
    score: Scorer
    statistics: tuple[str, ...] = ()
    options: type = NoOptions
    experts: bool = False
    corrector_aware: bool = False

    @property
    def data_free(self) -> bool:
        return not self.statistics


METRICS: Registry[Metric] = Registry("metric", __name__, key=lambda metric: metric.name, first="transact_residual")
register_metric = METRICS.register
get_metric = METRICS.get
metric_names = METRICS.names  # the default (transact) first
