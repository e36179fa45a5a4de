"""How much memory a recovery run will need, estimated from the model's shape and the recipe before any
weights are read, and whether the device has it.

The peak of ``transact run`` is a training step of the dense model (the first shot trains after the
first prune, so the widest model that trains is the first shot's; the dense widths bound it from above):

- weights: every parameter in the dtype training holds them in (``training.weights``: fp32, or bf16);
- gradients and optimizer: gradients in the weights' dtype (LoRA's adapters in fp32) and AdamW's two
  moments (fp32; bf16 beside bf16 weights; 8 bits plus a scale per 256 values with ``adamw_8bit``) of every
  trainable parameter (all of them, or LoRA's adapters);
- teacher: a frozen copy of the dense model in the weights' dtype for ``method: kd`` on the same device;
- activations (in the weights' dtype): what one micro-batch's forward keeps for the backward pass, per
  token and layer (see ``ACTIVATION_*``), or with gradient checkpointing only each layer's input plus one
  layer recomputed;
- logits: the LM head's output and what the cross-entropy keeps of it (one chunk with ``kd``'s chunked
  loss);
- runtime: the interpreter and libraries (measured on CPU; on a GPU the CUDA context lives outside the
  device memory counted here).

Gradients and activations are not all alive at once: the backward pass frees each layer's activations as
it writes that layer's gradients, so without checkpointing the peak holds the larger of the two (all
activations and the logits when the backward starts, or all gradients when it ends), not their sum. With
checkpointing a layer is recomputed while the gradients accumulate, and both are counted.

With ``training.distributed: fsdp`` over N processes (``transact.recovery.sharded``) each process holds 1/N
of the weights, gradients, moments and teacher, plus what FSDP2 gathers whole for a moment ("gathered": the
root unit, the embeddings and LM head counted as two matrices, its weights and gradients, three decoder
layers: the one computing, the next one prefetched, one's gradients before they are reduced, and a
``kd`` teacher's embeddings, which its root unit keeps gathered after the forward pass); activations
and logits are each process's own micro-batch's. Outside training every process holds the whole model (it
loads it, and a pruning shot slices whole matrices): with the teacher whole while the run loads, and on
the main process with the calibration statistics of a shot (``statistics``, bytes from
``transact.core.calibrate.statistics_bytes``) while it prunes. The larger of the two is the estimate's
floor ("whole model"), the peak where the sharded training step is smaller.

The activation coefficients were fitted to measured peaks on the 2-core CPU machine of docs/results.md
("Memory planner"), where the estimate is checked against measured peaks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from transact.arch import ModelShape
from transact.errors import TransactError
from transact.measure.costs import RUNTIME_OVERHEAD_BYTES
from transact.recovery import optim
from transact.recovery.methods import MemoryInputs, get_method

GIB = 2**30
# Values one decoder layer keeps for the backward pass per token, in units of the widths they scale with:
# hidden-wide (norm inputs and outputs, residual sums, the projections' outputs), attention-wide (q, k, v
# before and after the rotary embedding, the heads' output) and MLP-wide (gate, up, the activation and the
# product), and per query head one row of attention probabilities over the sequence.
ACTIVATION_HIDDEN, ACTIVATION_ATTENTION, ACTIVATION_MLP, ACTIVATION_SCORES = 8, 3, 4, 2


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak bytes of a run, part by part, and the bytes the device has free for it (None: unknown)."""

    parts: dict[str, int]
    device: str
    available: int | None
    overlap: bool = True  # gradients replace activations during the backward pass (no checkpointing)
    floor: int = 0  # bytes held outside training (the whole model of a sharded run), a peak of its own
    processes: int = 1  # the estimate is per process; more than 1: sharded (fsdp) over that many
    statistics: int = 0  # of the floor: a pruning shot's calibration statistics (main process)

    @property
    def step(self) -> int:
        """The peak of a training step."""
        total = sum(self.parts.values())
        if not self.overlap:
            return total
        dynamic = self.parts["activations"] + self.parts["logits"]
        return total - dynamic - self.parts["gradients"] + max(dynamic, self.parts["gradients"])

    @property
    def total(self) -> int:
        return max(self.step, self.floor)

    @property
    def fits(self) -> bool:
        return self.available is None or self.total <= self.available

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value / GIB:.2f}" for name, value in self.parts.items() if value) + " GiB"
        if self.overlap:
            parts += "; gradients and activations not at once"
        if self.floor:
            stats = f", calibration statistics {self.statistics / GIB:.2f}" if self.statistics else ""
            parts += f"; the whole model while loading and pruning{stats}: {self.floor / GIB:.2f} GiB"
        room = f" of {self.available / GIB:.1f} GiB available" if self.available is not None else ""
        each = f" per process of {self.processes} (fsdp)" if self.processes > 1 else ""
        return f"estimated peak memory {self.total / GIB:.2f} GiB{each}{room} on {self.device} ({parts})"


def layer_activation_values(shape: ModelShape, seq_len: int) -> int:
    """Values one decoder layer keeps for the backward pass per token (see the ACTIVATION_* weights); in a
    mixture of experts the MLP width is that of the experts a token is routed to (and a shared expert)."""
    h, a = shape.hidden_size, shape.num_heads * shape.head_dim
    kv = shape.num_kv_heads * shape.head_dim
    mlp = shape.intermediate_size
    if shape.is_moe:
        mlp = shape.experts_per_token * shape.intermediate_size + (shape.shared_expert_size or 0)
    return (ACTIVATION_HIDDEN * h + ACTIVATION_ATTENTION * (a + 2 * kv) + ACTIVATION_MLP * mlp
            + ACTIVATION_SCORES * shape.num_heads * seq_len)


def estimate(shape: ModelShape, params: int, training, *, device: str = "cpu", teacher_here: bool = True,
             available: int | None = None, processes: int = 1, statistics: int = 0) -> MemoryEstimate:
    """The estimated peak of training ``shape`` (``params`` parameters) with ``training`` (a
    ``transact.recipes.Training``) on each of ``processes`` processes; ``teacher_here``: a ``kd`` teacher on
    the same device; ``statistics``: bytes of a shot's calibration statistics (counted where the run is
    sharded, whose training step can be smaller than the pruning)."""
    weights, optimizer = optim.resolve(training, torch.device(device))
    value = weights.itemsize  # weights, teacher and activations are held in the weights' dtype
    tokens = training.batch_size * training.seq_len
    method = get_method(training.method).memory(MemoryInputs(shape, params, training, weights, tokens, teacher_here))
    per_layer = layer_activation_values(shape, training.seq_len) * tokens * value
    if training.gradient_checkpointing:
        activations = shape.num_layers * tokens * shape.hidden_size * value + per_layer
    else:
        activations = shape.num_layers * per_layer
    parts = {"weights": params * value, "gradients": method.trainable * method.gradient_bytes,
             "optimizer": optim.moment_bytes(method.trainable, method.moments_dtype, optimizer),
             "teacher": method.teacher, "activations": activations,
             "logits": method.logits, "runtime": RUNTIME_OVERHEAD_BYTES if device == "cpu" else 0}
    overlap = not training.gradient_checkpointing
    if training.distributed != "fsdp" or processes < 2:
        return MemoryEstimate(parts, device, available, overlap=overlap)
    loading = parts["weights"] + parts["teacher"] + parts["runtime"]
    for name in ("weights", "gradients", "optimizer", "teacher"):
        parts[name] = -(-parts[name] // processes)
    pruning = loading - method.teacher + parts["teacher"] + statistics  # the teacher is sharded by then
    parts["gathered"] = gathered_bytes(shape, params, value, teacher=method.teacher > 0)
    return MemoryEstimate(parts, device, available, overlap=overlap, floor=max(loading, pruning),
                          processes=processes, statistics=statistics)


def gathered_bytes(shape: ModelShape, params: int, value: int, teacher: bool = False) -> int:
    """Bytes FSDP2 holds whole at a moment of a sharded step: the root unit's weights and gradients (the
    embeddings and the LM head, counted as two matrices), three decoder layers, and a teacher's embedding
    matrix (its root unit stays gathered after its forward pass; see the module docstring)."""
    embeddings = (shape.vocab_size or 0) * shape.hidden_size
    layer = max(0, params - embeddings) // max(1, shape.num_layers)
    return (2 * 2 * embeddings + 3 * layer + (embeddings if teacher else 0)) * value


def available_bytes(device: torch.device) -> int | None:
    """Memory the run can still take: free GPU memory, or on a CPU the kernel's MemAvailable plus what this
    process already holds (None where neither can be read)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        meminfo, status = _fields("/proc/meminfo"), _fields("/proc/self/status")
        return (int(meminfo["MemAvailable"].split()[0]) + int(status["VmRSS"].split()[0])) * 1024
    except (OSError, KeyError, ValueError, IndexError):
        return None


def _fields(path: str) -> dict[str, str]:
    """'Name: value' lines of a /proc file."""
    with open(path) as f:
        return dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)


def ways_to_fit(shape: ModelShape, params: int, training, *, device: str, teacher_here: bool,
                available: int, processes: int = 1, statistics: int = 0) -> list[str]:
    """Recipe changes that bring the estimate within ``available``, each with its estimate, in words."""
    options = []
    if not training.gradient_checkpointing:
        options.append(("training.gradient_checkpointing: true", replace(training, gradient_checkpointing=True)))
    batch, accum = training.batch_size, training.grad_accum
    while batch > 1:
        batch, accum = max(1, batch // 2), accum * 2
        options.append((f"training.batch_size: {batch} with grad_accum: {accum} (the same tokens per step)",
                        replace(training, batch_size=batch, grad_accum=accum)))
    for lighter in get_method(training.method).lighter:
        if training.distributed == "fsdp" and not get_method(lighter).shards:  # whole replicas, each lighter
            options.append((f"training.method: {lighter} with distributed: ddp",
                            replace(training, method=lighter, distributed="ddp")))
        else:
            options.append((f"training.method: {lighter}", replace(training, method=lighter)))
    weights, optimizer = optim.resolve(training, torch.device(device))
    options += _lower_precision(training, weights, optimizer)
    found = []
    for words, changed in options:
        total = estimate(shape, params, changed, device=device, teacher_here=teacher_here, processes=processes,
                         statistics=statistics).total
        if total <= available:
            found.append(f"{words} ({total / GIB:.2f} GiB)")
    return found + _ways_with_fsdp(shape, params, training, device, teacher_here, available, statistics) + \
        get_method(training.method).advice(training, device, teacher_here)


def _lower_precision(training, weights: torch.dtype, optimizer: str) -> list[tuple[str, object]]:
    """8-bit moments and bf16 weights, where the run does not use them yet (under ``fsdp`` one or the other,
    see ``Training._check_fsdp``): (words, changed training)."""
    options = []
    fsdp = training.distributed == "fsdp"
    if optimizer != "adamw_8bit" and not (fsdp and weights == torch.bfloat16):
        options.append(("training.optimizer: adamw_8bit", replace(training, optimizer="adamw_8bit")))
    if weights != torch.bfloat16 and not (fsdp and optimizer == "adamw_8bit"):
        options.append(("training.weights: bf16", replace(training, weights="bf16")))
        if optimizer != "adamw_8bit" and not fsdp:
            options.append(("training.weights: bf16 with training.optimizer: adamw_8bit",
                            replace(training, weights="bf16", optimizer="adamw_8bit")))
    return options


def _ways_with_fsdp(shape: ModelShape, params: int, training, device: str, teacher_here: bool,
                    available: int, statistics: int) -> list[str]:
    """The fewest processes (2 to 64, each with a device like this one) over which ``fsdp`` fits, in words
    (with the run's weights and moments, but torch's AdamW beside bf16 weights)."""
    if training.distributed == "fsdp" or not get_method(training.method).shards:
        return []
    both = training.weights == "bf16" and training.optimizer == "adamw_8bit"
    sharded = replace(training, distributed="fsdp", optimizer="adamw" if both else training.optimizer)
    for n in (2, 4, 8, 16, 32, 64):
        total = estimate(shape, params, sharded, device=device, teacher_here=teacher_here, processes=n,
                         statistics=statistics).total
        if total <= available:
            adamw = " and training.optimizer: adamw" if both else ""
            return [f"training.distributed: fsdp{adamw} with {n} processes, each on a device like this one "
                    f"({total / GIB:.2f} GiB each; torchrun --nproc_per_node {n})"]
    return []


def choose_weights(shape: ModelShape, params: int, training, device: str, *, teacher_here: bool,
                   available: int | None, processes: int = 1, statistics: int = 0) -> torch.dtype:
    """The dtype to train in: the recipe's, or for ``auto`` fp32 unless only bf16 fits ``available`` bytes
    (``fsdp`` with 8-bit moments trains fp32 weights only)."""
    weights, optimizer = optim.resolve(training, torch.device(device))
    if training.weights != "auto" or (training.distributed == "fsdp" and optimizer == "adamw_8bit"):
        return weights
    each = {"device": device, "teacher_here": teacher_here, "processes": processes, "statistics": statistics}
    fp32 = estimate(shape, params, replace(training, weights="fp32"), **each)
    if available is None or fp32.total <= available:
        return torch.float32
    bf16 = estimate(shape, params, replace(training, weights="bf16"), **each)
    return torch.bfloat16 if bf16.total <= available else torch.float32  # neither: check_fits says what would


def check_fits(shape: ModelShape, params: int, training, device: str, *, teacher_here: bool,
               available: int | None, processes: int = 1, statistics: int = 0) -> MemoryEstimate:
    """The estimate for this run on ``device`` (each of ``processes``) with ``available`` bytes free (None:
    not checked); a TransactError naming what would fit where it does not."""
    result = estimate(shape, params, training, device=device, teacher_here=teacher_here, available=available,
                      processes=processes, statistics=statistics)
    if result.fits:
        return result
    ways = ways_to_fit(shape, params, training, device=device, teacher_here=teacher_here, available=available,
                       processes=processes, statistics=statistics)
    advice = ("; ".join(ways) if ways else "no single change of gradient checkpointing, micro-batch size, LoRA, "
              "bf16 weights or 8-bit optimizer moments is enough: use a smaller model, a shorter "
              "training.seq_len or a larger device")
    raise TransactError(f"this run does not fit: {result.describe()}. What would fit: {advice}. "
                        "(training.check_memory: false runs it anyway)")


def settle(shape: ModelShape, params: int, training, device: str, *, teacher_here: bool, available: int | None,
           processes: int = 1, statistics: int = 0) -> tuple[torch.dtype, MemoryEstimate]:
    """The dtype the run trains in (``choose_weights``) and its estimate with that dtype (``check_fits``:
    refused where it does not fit)."""
    each = {"teacher_here": teacher_here, "available": available, "processes": processes, "statistics": statistics}
    weights = choose_weights(shape, params, training, device, **each)
    chosen = replace(training, weights="bf16" if weights == torch.bfloat16 else "fp32")
    return weights, check_fits(shape, params, chosen, device, **each)
