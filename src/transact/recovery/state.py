"""The resumable state of ``transact run``: where the run is (a typed ``RunState`` with a JSON round trip)
and the weights and optimizer moments, all under ``OUT/state/``.

A model sharded with FSDP2 is saved in slices, one per process (``save_sharded_state``, see
``transact.recovery.sharded``). The directory is written whole into a hidden sibling and swapped in
(``replace_dir``), so a run killed at any moment finds the last complete state: ``state/``, or the parked
previous one if it died between the two renames.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from transact.errors import TransactError
from transact.io.files import old_dir, replace_dir, staging_dir, write_json_atomic
from transact.recovery import sharded
from transact.recovery.optim import state_dict_from, state_tensors

STATE_FORMAT = 1
STATE = "state"
_SHOT_ONLY = ("widths", "prune_seconds", "perplexity_pruned")


@dataclass
class PhaseRecord:
    """What one phase did: a shot (pruned to ``widths``, then trained) or the final recovery (no widths)."""

    phase: int
    params: int
    widths: list[int] | None = None  # heads, kv_heads, mlp (and experts, in a mixture of experts)
    prune_seconds: float | None = None
    perplexity_pruned: float | None = None
    train_seconds: float = 0.0
    train_steps: int = 0
    train_tokens: int = 0
    perplexity: float | None = None
    train_tokens_per_second: float | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if self.widths is None:  # the final phase prunes nothing
            for key in _SHOT_ONLY:
                data.pop(key)
        return data


@dataclass
class RunState:
    """Where a run is. ``phase`` counts from 1 (shots first, then the final recovery); ``pruned``: this
    phase's shot has been applied; ``step``: optimizer steps done in it; ``data_position``: training blocks
    consumed; ``plans``: every shot's plan.json; ``shots``: the finished phases; ``current``: the phase in
    progress; ``dense``: the dense model's summary and perplexity."""

    phase: int = 1
    pruned: bool = False
    step: int = 0
    data_position: int = 0
    plans: list[dict] = field(default_factory=list)
    shots: list[PhaseRecord] = field(default_factory=list)
    losses: list[dict] = field(default_factory=list)
    done: bool = False
    dense: dict = field(default_factory=dict)
    current: PhaseRecord | None = None
    format: int = STATE_FORMAT

    @property
    def tokens_trained(self) -> int:
        """Global tokens trained in the finished phases (the loss curve's x axis continues from here)."""
        return sum(p.train_tokens for p in self.shots)

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["shots"] = [p.to_json() for p in self.shots]
        if self.current is None:
            del data["current"]
        else:
            data["current"] = self.current.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], where: Path | str = "progress.json") -> RunState:
        if data.get("format") != STATE_FORMAT:
            raise TransactError(f"{where} was written by another version of transact (format {data.get('format')})")
        try:
            values = dict(data)
            values["shots"] = [PhaseRecord(**p) for p in values.get("shots", [])]
            if values.get("current") is not None:
                values["current"] = PhaseRecord(**values["current"])
            return cls(**values)
        except TypeError as e:
            raise TransactError(f"{where} is not a transact run state: {e}") from None


def latest_state(out: Path) -> Path | None:
    """The last complete state directory of the run in ``out``, or None."""
    for state in (out / STATE, old_dir(out / STATE)):
        if (state / "progress.json").is_file():
            return state
    return None


def load_state(state: Path) -> RunState:
    return RunState.from_json(json.loads((state / "progress.json").read_text()), state / "progress.json")


def save_state(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, state: RunState) -> None:
    """Write the resumable state to a new directory and swap it in (the old state survives until then)."""
    tmp = staging_dir(out / STATE)
    try:
        save_model(model, str(tmp / "model.safetensors"))
        if optimizer is not None:
            tensors, meta = state_tensors(optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(meta) + "\n")
        (tmp / "progress.json").write_text(json.dumps(state.to_json(), indent=1) + "\n")
        replace_dir(tmp, out / STATE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_sharded_state(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: RunState,
                       procs) -> None:
    """``save_state`` for a model sharded with FSDP2, on every process at once: each writes its slice of the
    weights and moments (``sharded.save_shards``) into the main process's new directory, which is swapped in
    once all have written. ``procs``: the run's ``Processes``."""
    tmp = staging_dir(out / STATE) if procs.main else None
    tmp = Path(procs.broadcast(str(tmp) if tmp else None))
    try:
        if not tmp.is_dir():
            raise TransactError(f"process {procs.rank} cannot see {tmp}: with training.distributed: fsdp every "
                                "process writes its slice of the state into the run's directory, so it must be "
                                "on a filesystem all of them share")
        sharded.save_shards(tmp, model, optimizer, procs.rank, procs.count)
        procs.wait()
        if procs.main:
            (tmp / "progress.json").write_text(json.dumps(state.to_json(), indent=1) + "\n")
            replace_dir(tmp, out / STATE)
        procs.wait()
    finally:
        if procs.main:
            shutil.rmtree(tmp, ignore_errors=True)


def mark_done(out: Path, state: RunState) -> None:
    """Replace the resumable state by a record that the run finished (its weights are the output)."""
    state.done = True
    shutil.rmtree(out / STATE, ignore_errors=True)
    shutil.rmtree(old_dir(out / STATE), ignore_errors=True)
    (out / STATE).mkdir()
    write_json_atomic(out / STATE / "progress.json", state.to_json())


def load_optimizer_state(state: Path) -> dict | None:
    """The optimizer's state_dict saved in ``state`` (None if the state holds none)."""
    if not (state / "optimizer.safetensors").is_file():
        return None
    meta = json.loads((state / "optimizer.json").read_text())
    return state_dict_from(load_file(str(state / "optimizer.safetensors")), meta)
