"""Recovery training sharded with FSDP2 (``training.distributed: fsdp``), for students whose weights,
gradients and optimizer moments do not fit one device.

During a phase every process holds 1/N of each parameter, of its gradient and of its AdamW moments
(``torch.distributed.fsdp.fully_shard``: each decoder layer one unit, gathered whole only while it computes;
the embeddings, final norm and LM head the root unit). Between phases the model is whole again on every
process (``plain_model``), because a pruning shot slices whole matrices: the main process calibrates and
plans on it, every process applies the plan, and the next phase shards the pruned model afresh.

accelerate drives FSDP2 only on accelerators (on a CPU its ``FullyShardedDataParallelPlugin`` is ignored and
the run would silently become DDP), so the sharding is done here with torch's own ``fully_shard``, the same
call accelerate makes, on a CPU (gloo) and a GPU (NCCL) alike; accelerate still starts the processes.

A state saved in the middle of a phase is sharded: each process writes its own slice of the weights and of
the moments (``shard_files``), in parallel and without gathering anything. It resumes with the same number
of processes (the slices are cut by the process count); a state saved at the end of a phase is whole (the
model as the next shot starts from it) and resumes with any number.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from transact.arch import get_adapter
from transact.errors import TransactError
from transact.io.models import skeleton
from transact.recovery.optim import local_part, state_dict_from, state_tensors

# FSDP2 warns on every forward that the model returns a view (its hidden states); nothing here writes
# into a model's output in place, the case the warning is about.
_VIEW_WARNING = r".*returned a view tensor.*"


def shard(model: nn.Module, mixed_precision: str = "no") -> nn.Module:
    """Shard ``model`` in place across the default process group: each decoder layer its own FSDP2 unit,
    the rest (embeddings, final norm, LM head; tied weights stay in one unit) the root unit. With
    ``mixed_precision`` "bf16" the fp32 weights compute in bf16 and gradients are reduced in fp32; bf16
    weights (``training.weights: bf16``) are sharded, computed and reduced as they are."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    warnings.filterwarnings("ignore", message=_VIEW_WARNING)
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision == "bf16" else MixedPrecisionPolicy())
    for layer in get_adapter(model).layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def plain_model(sharded: nn.Module, dense_config, plans: list, dtype: torch.dtype) -> nn.Module:
    """The whole model that ``sharded`` holds in slices, on every process, as a plain module: the dense
    architecture cut by ``plans`` (``PrunePlan``s), built without memory, then given the gathered weights and
    the buffers (rotary tables) of ``sharded``. Collective: every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from transact.core.step import apply_step

    weights = {name: _own_storage(t) for name, t in
               get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True)).items()}
    model = skeleton(copy.deepcopy(dense_config), dtype)  # the skeleton shares its config, which pruning changes
    for plan in plans:
        apply_step(model, plan)
    model.load_state_dict(weights, assign=True, strict=True)
    buffers = dict(sharded.named_buffers())
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:  # non-persistent buffers are in no state dict
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = buffers[name].detach().clone()
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.to(next(iter(weights.values())).device).eval()


# ---------------------------------------------------------------- the sharded state on disk

MODEL_SLICES = "model.rank*-of-*.safetensors"  # every process's slice of the weights (``shard_files``)


def shard_files(rank: int, count: int) -> tuple[str, str, str]:
    """The files of process ``rank`` of ``count`` in a sharded state: its slice of the weights, of the optimizer
    moments, and the moments' metadata."""
    tag = f"rank{rank}-of-{count}"
    return f"model.{tag}.safetensors", f"optimizer.{tag}.safetensors", f"optimizer.{tag}.json"


def save_shards(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int, count: int) -> None:
    """Write this process's slice of ``model``'s parameters and of ``optimizer``'s state into ``directory``."""
    model_file, optimizer_file, meta_file = shard_files(rank, count)
    local = {name: local_part(p).detach().cpu().contiguous() for name, p in model.named_parameters()}
    save_file(local, str(directory / model_file))
    tensors, meta = state_tensors(optimizer)
    save_file(tensors, str(directory / optimizer_file))
    (directory / meta_file).write_text(json.dumps(meta) + "\n")


def check_shards(directory: Path, count: int) -> None:
    """Refuse a sharded state written by another number of processes, naming the count that resumes it."""
    written = sorted(directory.glob(MODEL_SLICES))
    if not written:
        return
    counts = {int(f.name.split("-of-")[1].split(".")[0]) for f in written}
    if counts != {count}:
        raise TransactError(f"--resume: {directory} was saved in the middle of a phase by {', '.join(map(str, counts))}"
                            f" processes, each holding its slice of the weights and moments; this run has {count}. "
                            f"Resume it with {min(counts)} processes (torchrun --nproc_per_node {min(counts)}); a "
                            "state saved at the end of a phase resumes with any number")
    missing = [r for r in range(count) if not (directory / shard_files(r, count)[0]).is_file()]
    if missing:
        raise TransactError(f"--resume: {directory} lacks the slices of processes {missing}")


def has_shards(directory: Path) -> bool:
    return any(directory.glob(MODEL_SLICES))


def load_shards(directory: Path, model: nn.Module, rank: int, count: int) -> dict:
    """Copy this process's saved slice into ``model``'s (sharded) parameters; -> its optimizer state_dict, to
    load once the optimizer exists (``optim.load_state``, then ``wrap_moments``)."""
    model_file, optimizer_file, meta_file = shard_files(rank, count)
    saved = load_file(str(directory / model_file))
    with torch.no_grad():
        for name, p in model.named_parameters():
            local_part(p).copy_(saved[name])
    meta = json.loads((directory / meta_file).read_text())
    return state_dict_from(load_file(str(directory / optimizer_file)), meta)


def wrap_moments(optimizer: torch.optim.Optimizer) -> None:
    """After loading saved slices into an optimizer of sharded parameters: each moment saved as the local
    slice becomes a distributed tensor laid out as its parameter is (torch's loader leaves it plain; an
    8-bit moment is wrapped whole, as torchao makes it for a sharded parameter)."""
    from torch.distributed.tensor import DTensor

    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                local = isinstance(value, torch.Tensor) and not isinstance(value, DTensor)
                if local and value.dim() and value.shape == p.to_local().shape:
                    state[key] = DTensor.from_local(value.to(p.device), p.device_mesh, p.placements,
                                                    shape=p.shape, stride=p.stride(), run_check=False)


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, copied where it is a view into a larger buffer (a gathered parameter of uneven size can be),
    which safetensors refuses to save."""
    whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    return tensor if whole and tensor.is_contiguous() else tensor.clone(memory_format=torch.contiguous_format)
