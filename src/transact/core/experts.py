"""What each routed expert of a mixture of experts sees, recorded without copying transformers' expert code.

transformers fuses a block's experts into 3-D parameters and runs them through one of its registered
experts implementations (``ALL_EXPERTS_FUNCTIONS``, chosen by ``config._experts_implementation``), so there
is no per-expert down projection to hook. transact registers one more implementation, ``transact_record``:
for the experts modules handed to ``recording_experts`` it runs transformers' own eager forward (the
function the class's ``forward`` wraps) under a ``TorchFunctionMode`` that watches two calls of it:

- ``F.linear(x, down_proj[e])``: the weight is a view of the fused ``down_proj``, its storage offset says
  which expert ``e``; ``x`` (tokens routed to e, I) is that expert's transitional activation and the
  result y (tokens, H) its output;
- the multiplication of that output by the tokens' routing weights w (tokens, 1), which follows it.

Each expert call is handed on as ``ExpertCall(expert, x, y, w)``. Other modules, and every module outside
the block, run unchanged; on exit the implementation each config had is restored, also on error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from transact.errors import TransactError

RECORDING_IMPLEMENTATION = "transact_record"
_MULTIPLY = {torch.Tensor.__mul__, torch.Tensor.mul, torch.mul}


@dataclass(frozen=True)
class ExpertCall:
    """One expert's share of one forward pass: ``inputs`` (n, I) its down projection's input, ``outputs``
    (n, H) that projection's output, ``weights`` (n, 1) the routing weights its output was scaled by (None
    where the forward scaled nothing)."""

    expert: int
    inputs: torch.Tensor
    outputs: torch.Tensor
    weights: torch.Tensor | None


Recorder = Callable[[ExpertCall], None]
_RECORDERS: dict[int, Recorder] = {}  # id(experts module) -> what its calls are handed to


class _DownProjections(TorchFunctionMode):
    """Within the mode: each ``F.linear`` whose weight is one expert's slice of ``down`` and the scaling of
    its output by the routing weights become one ``ExpertCall``."""

    def __init__(self, down: torch.Tensor, recorder: Recorder) -> None:
        super().__init__()
        self.down, self.recorder = down, recorder
        self.expert_size = down[0].numel()
        self.pending: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def _expert_of(self, weight: object) -> int | None:
        if not isinstance(weight, torch.Tensor) or weight.shape != self.down.shape[1:]:
            return None
        if weight.untyped_storage().data_ptr() != self.down.untyped_storage().data_ptr():
            return None
        return (weight.storage_offset() - self.down.storage_offset()) // self.expert_size

    def flush(self, weights: torch.Tensor | None = None) -> None:
        if self.pending is not None:
            expert, inputs, outputs = self.pending
            self.pending = None
            self.recorder(ExpertCall(expert, inputs, outputs, weights))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            expert = self._expert_of(args[1] if len(args) > 1 else kwargs.get("weight"))
            if expert is not None:
                self.flush()
                out = func(*args, **kwargs)
                self.pending = (expert, args[0], out)
                return out
        if func in _MULTIPLY and self.pending is not None and len(args) == 2 and args[0] is self.pending[2]:
            self.flush(weights=args[1])
        return func(*args, **kwargs)


def _eager_forward(experts: nn.Module) -> Callable:
    """transformers' own forward of this experts class (the one its implementation dispatcher wraps)."""
    forward = type(experts).forward
    return getattr(forward, "__wrapped__", forward)


def _recording_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    forward = _eager_forward(self)
    recorder = _RECORDERS.get(id(self))
    if recorder is None:
        return forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
    mode = _DownProjections(self.down_proj, recorder)
    with mode:
        out = forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
    mode.flush()
    return out


ALL_EXPERTS_FUNCTIONS[RECORDING_IMPLEMENTATION] = _recording_forward


@contextmanager
def recording_experts(modules: Sequence[nn.Module], recorders: Sequence[Recorder]) -> Iterator[None]:
    """Within the block, every forward of ``modules[i]`` (experts modules) hands each expert call to
    ``recorders[i]``; their configs run the recording implementation and get their own back on exit."""
    configs = {id(m.config): m.config for m in modules}
    saved = {key: config._experts_implementation for key, config in configs.items()}
    try:
        for module, recorder in zip(modules, recorders, strict=True):
            if not hasattr(module, "down_proj") or module.down_proj.ndim != 3:
                raise TransactError(f"{type(module).__name__} does not hold its experts as one fused down_proj")
            _RECORDERS[id(module)] = recorder
        for config in configs.values():
            config._experts_implementation = RECORDING_IMPLEMENTATION
        yield
    finally:
        for module in modules:
            _RECORDERS.pop(id(module), None)
        for key, config in configs.items():
            config._experts_implementation = saved[key]
