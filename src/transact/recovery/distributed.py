"""What the processes of a distributed run share: one of them decides (calibrates, measures, writes) and
tells the others; at the end all must hold the same weights. With one process every call is a no-op."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from transact.errors import TransactError


class Processes:
    """The processes of one run, through an ``accelerate.Accelerator``."""

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def count(self) -> int:
        return self.accelerator.num_processes

    def broadcast(self, value: Any) -> Any:
        """The main process's ``value`` on every process."""
        if self.count == 1:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value``, in process order, on every process."""
        if self.count == 1:
            return [value]
        from accelerate.utils import gather_object

        return list(gather_object([value]))

    def broadcast_parameters(self, modules: list[nn.Module]) -> None:
        """The main process's parameters of ``modules`` copied into every process's."""
        if self.count == 1:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for module in modules:
                for p in module.parameters():
                    dist.broadcast(p.data, src=0)

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()


def check_launch(accelerator) -> None:
    """Refuse an accelerate configuration that would shard or partition the model itself (its FSDP,
    DeepSpeed or Megatron plugins): a pruning shot slices whole matrices between phases, so sharding is the
    run's own (``training.distributed: fsdp``), under a plain multi-process launch."""
    kind = accelerator.distributed_type.name
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise TransactError(f"transact run was launched with accelerate's {kind} configuration; launch it as plain "
                            "processes (torchrun, or an accelerate config without FSDP/DeepSpeed) and set "
                            "training.distributed: fsdp in the recipe to shard the model")


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over every tensor of the state dict (names, dtypes, shapes, values), for comparing replicas."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
