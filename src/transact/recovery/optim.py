"""What recovery training keeps per parameter: the weights' dtype, the optimizer and its moments, and the
optimizer's state on disk.

``training.weights`` and ``training.optimizer`` (both ``auto`` by default):

- ``fp32`` weights + ``adamw``: torch's AdamW with fp32 moments; 16 bytes per trained parameter with the
  gradient. The CPU default: exact, and torch's CPU step is about ten times faster than a low-bit one.
- ``bf16`` weights: parameters and gradients held in bf16. Each update is computed in fp32 and rounded back
  to bf16 *stochastically* (up with probability equal to the discarded fraction), so an update smaller
  than bf16's spacing survives in expectation instead of always rounding away.
- ``adamw_8bit``: AdamW's two moments in 8 bits with one fp32 scale per block of 256 values (tensors of at
  least 4,096 values; smaller ones keep moments in the parameter's dtype).
- ``auto`` weights are fp32 where the run fits the device's free memory that way, else bf16 (the memory
  planner decides before loading, ``memory.choose_weights``): bf16 weights recovered a little less than fp32
  in docs/results.md, 8-bit moments as much. ``auto`` optimizer: ``adamw_8bit`` on a GPU with bf16 (10
  bytes per parameter with fp32 weights, 6 with bf16), ``adamw`` on a CPU.

Both come from torchao (``torchao.optim``: ``AdamW8bit`` and ``_AdamW`` with ``bf16_stochastic_round``):
one maintained implementation of the two, for CPU and GPU alike (its update is a ``torch.compile``d
function, built by the C++ compiler on a CPU and by Triton on a GPU), and a 3 MB wheel. bitsandbytes'
8-bit AdamW also runs on both, but has no stochastic rounding for bf16 weights.

The 8-bit moments are tensor subclasses that safetensors cannot write; ``state_tensors`` stores each as the
plain tensors it is made of (codes, scales, quantisation map) and ``state_dict_from`` rebuilds it, so a
resumed run continues from exactly the moments it stopped with.
"""

from __future__ import annotations

import logging
import math
import warnings
from importlib import import_module

import torch
from torch import nn

from transact.errors import TransactError
from transact.io.models import dtype_name

LOW_BIT_MIN_VALUES, LOW_BIT_BLOCK = 4096, 256  # torchao quantises tensors of at least 4,096 values
_SUBCLASSES = {"OptimState8bit": "torchao.optim.subclass_8bit"}
# torchao logs at import each GPU kernel library a CPU build lacks, and torch a deprecation of how torchao
# registers its enums; neither concerns the user (peft imports torchao too, whenever it is installed).
IMPORT_LOGGERS = ("torchao", "torch.utils._pytree")


def resolve(training, device: torch.device) -> tuple[torch.dtype, str]:
    """The weights' dtype and the optimizer ``training`` (a ``transact.recipes.Training``) asks for on
    ``device``; ``auto`` weights read as fp32 here (``memory.choose_weights`` falls back to bf16 where fp32
    does not fit), the ``auto`` optimizer is adamw_8bit on a GPU that has bf16 and adamw otherwise (adamw
    always with ``fsdp``: torchao's 8-bit moments of sharded parameters were checked on a CPU only, where
    the run asks for them by name)."""
    low = device.type == "cuda" and torch.cuda.is_bf16_supported() and training.distributed != "fsdp"
    optimizer = training.optimizer if training.optimizer != "auto" else ("adamw_8bit" if low else "adamw")
    return (torch.bfloat16 if training.weights == "bf16" else torch.float32), optimizer


def autocast_of(training, device: torch.device, weights: torch.dtype) -> str:
    """The mixed precision of fp32 weights (``training.precision``; ``auto``: bf16 on a GPU that has it), as
    accelerate names it; weights held in bf16 compute in bf16 without it."""
    if weights != torch.float32:
        return "no"
    if training.precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    return "bf16" if training.precision == "bf16" else "no"


def needs_torchao(weights: torch.dtype, optimizer: str) -> bool:
    return weights == torch.bfloat16 or optimizer == "adamw_8bit"


def check_available(weights: torch.dtype, optimizer: str) -> None:
    """Refuse, before any work, a setup whose optimizer is not installed."""
    if needs_torchao(weights, optimizer) and _torchao_optim() is None:
        raise TransactError("training.weights: bf16 and training.optimizer: adamw_8bit need torchao "
                            "(pip install 'transact[train]')")


def _torchao_optim():
    """torchao.optim, or None, imported without its import-time logs (``IMPORT_LOGGERS``)."""
    loggers = [logging.getLogger(name) for name in IMPORT_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        return import_module("torchao.optim")
    except ImportError:
        return None
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def make_optimizer(model: nn.Module, training, optimizer: str) -> torch.optim.Optimizer:
    """The optimizer of ``model``'s trainable parameters; bf16 ones are updated with stochastic rounding."""
    params = [p for p in model.parameters() if p.requires_grad]
    weights = torch.bfloat16 if any(p.dtype == torch.bfloat16 for p in params) else torch.float32
    settings = {"lr": training.lr, "betas": training.betas, "weight_decay": training.weight_decay}
    if not needs_torchao(weights, optimizer):
        return torch.optim.AdamW(params, **settings, foreach=False)
    check_available(weights, optimizer)
    ao = _torchao_optim()
    # torch.compile notes, once per process, that torchao's state class offers no stable hash for its cache.
    warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching")
    if optimizer == "adamw_8bit":  # stochastic rounding applies to the bf16 parameters only
        return ao.AdamW8bit(params, **settings, eps=1e-8, block_size=LOW_BIT_BLOCK, bf16_stochastic_round=True)
    return ao._AdamW(params, **settings, eps=1e-8, bf16_stochastic_round=True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate; torchao keeps it as a tensor its compiled update reads."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        elif _wants_tensor_lr(optimizer):
            group["lr"] = torch.tensor(lr, dtype=torch.float32)
        else:
            group["lr"] = lr


def _wants_tensor_lr(optimizer: torch.optim.Optimizer) -> bool:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    return type(inner).__module__.startswith("torchao.")


def moment_bytes(values: int, weights: torch.dtype, optimizer: str) -> int:
    """Bytes of AdamW's two moments over ``values`` parameters, counted as if every tensor were large enough
    to quantise (norms and biases, the small ones, are a negligible share of a model)."""
    if optimizer == "adamw_8bit":
        return 2 * (values + 4 * math.ceil(values / LOW_BIT_BLOCK))  # codes + one fp32 scale per block
    per_value = 2 if weights == torch.bfloat16 else 4  # torchao keeps a bf16 parameter's moments in bf16
    return 2 * values * per_value


# ---------------------------------------------------------------- the state on disk

def state_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state_dict as plain tensors (for safetensors) and JSON metadata."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    keys: dict[str, list[str]] = {}
    packed: dict[str, dict] = {}
    for i, values in state["state"].items():
        keys[str(i)] = list(values)
        for k, v in values.items():
            name = f"{i}.{k}"
            v = local_part(v)
            if type(v) is torch.Tensor:
                tensors[name] = v.detach().cpu().contiguous()
                continue
            inner, context = v.__tensor_flatten__()
            if type(v).__name__ not in _SUBCLASSES:
                raise TransactError(f"cannot save optimizer state of type {type(v).__name__}")
            for part in inner:
                tensors[f"{name}.{part}"] = getattr(v, part).detach().cpu().contiguous()
            packed[name] = {"type": type(v).__name__, "parts": list(inner), "context": _context_json(context)}
    groups = [{k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in g.items()}
              for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "keys": keys, "packed": packed}


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This process's slice of a tensor sharded with FSDP2 (a DTensor); any other tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def state_dict_from(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The state_dict ``state_tensors`` wrote, with every packed moment rebuilt."""
    packed = meta.get("packed", {})
    state = {}
    for i, keys in meta["keys"].items():
        values = {}
        for k in keys:
            name = f"{i}.{k}"
            values[k] = _unpack(tensors, name, packed[name]) if name in packed else tensors[name]
        state[int(i)] = values
    return {"state": state, "param_groups": meta["param_groups"]}


def load_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Load a state_dict into ``optimizer`` without converting packed moments (torch's loader casts every
    floating state to its parameter's dtype, which would unpack them)."""
    packed = {(i, k): v for i, s in state_dict["state"].items() for k, v in s.items() if type(v) is not torch.Tensor}
    plain = {i: {k: v for k, v in s.items() if (i, k) not in packed} for i, s in state_dict["state"].items()}
    optimizer.load_state_dict({**state_dict, "state": plain})
    if packed:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for (i, k), value in packed.items():
            optimizer.state[params[i]][k] = value.to(params[i].device)
    if _wants_tensor_lr(optimizer):
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32)


def _context_json(context) -> list:
    return [dtype_name(c) if isinstance(c, torch.dtype) else c for c in context]


def _unpack(tensors: dict[str, torch.Tensor], name: str, info: dict):
    cls = getattr(import_module(_SUBCLASSES[info["type"]]), info["type"])
    context = [getattr(torch, c) if isinstance(c, str) and isinstance(getattr(torch, c, None), torch.dtype) else c
               for c in info["context"]]
    return cls.__tensor_unflatten__({part: tensors[f"{name}.{part}"] for part in info["parts"]}, context)
