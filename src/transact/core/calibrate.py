"""Calibration: token windows -> statistics of the transitional activations, streamed in fp32.

The transitional activations are the inputs of ``o_proj`` (concatenated head outputs, width A) and of
``down_proj`` (act(gate) * up, width P). Hooks reduce each batch to the statistics asked for (see
``STATISTICS``: per-channel sums over tokens or samples) and add them into fp32 accumulators; the
activations themselves are never kept. Where the family normalizes the consumer's output before the
residual stream, the Gram matrices are weighted per token by that normalization (``OUTPUT_NORM_WEIGHTED``).
A metric or corrector that needs a new statistic registers its reducer here with ``register_statistic``.
The one statistic that needs backward passes, |w * dL/dw| of every prunable weight (``WEIGHT_X_GRAD``), is
collected by ``weight_x_grad``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from transact.arch import ModelShape, get_adapter
from transact.arch.parts import ExpertParts, Part, weight_grad
from transact.core.experts import ExpertCall, recording_experts
from transact.errors import TransactError
from transact.io.text import token_stream

# ---------------------------------------------------------------- windows

def sample_windows(tokenizer, texts: list[str], samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens, reproducible from ``seed``. -> (samples, seq_len).

    Documents are shuffled by the seed, tokenized in that order and cut into consecutive windows, so a
    larger ``samples`` with the same seed extends the smaller set rather than replacing it.
    """
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    needed = samples * seq_len
    stream = token_stream(tokenizer, [texts[i] for i in order], limit=needed)
    if stream.numel() < needed:
        raise TransactError(
            f"calibration text has {stream.numel()} tokens, fewer than samples x seq_len = "
            f"{samples} x {seq_len} = {needed}; give more text or fewer/shorter samples"
        )
    return stream.view(samples, seq_len)


def windows_hash(windows: torch.Tensor) -> str:
    """A content hash of the exact calibration tokens (recorded in plan.json)."""
    return "sha256:" + hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------- statistics of the activations

Reducer = Callable[[torch.Tensor], torch.Tensor]


def channel_sum_sq(x: torch.Tensor) -> torch.Tensor:
    """fp32 sum of squares of each channel over all tokens. x: (..., C) -> (C,).

    The reduction is picked per device (docs/results.md, "Calibration cost"): on CUDA, a fused fp32 norm
    reads the activations once and makes no temporaries (x.float().square().sum() cost 1.22x the plain
    forward time of a 1B model on an H100; the fused form is 8x faster per call); on CPU, the same fused
    norm is 10x slower than square-and-sum and less accurate, so the CPU keeps square-and-sum.
    """
    flat = x.reshape(-1, x.shape[-1])  # (tokens, channels)
    if flat.is_cuda:
        return torch.linalg.vector_norm(flat, dim=0, dtype=torch.float32).square_()
    if flat.dtype != torch.float32:
        flat = flat.float()
    return flat.square().sum(dim=0)


def channel_sum(x: torch.Tensor) -> torch.Tensor:
    """fp32 sum of each channel over all tokens. x: (..., C) -> (C,)."""
    return x.reshape(-1, x.shape[-1]).sum(dim=0, dtype=torch.float32)


def sample_abs_mean_sq(x: torch.Tensor) -> torch.Tensor:
    """Sum over samples of the squared per-sample mean |x|. x: (batch, seq, C) -> (C,)."""
    return x.abs().mean(dim=1, dtype=torch.float32).square().sum(dim=0)


NO_CHANNELS = torch.zeros(0)  # the attention statistics of a layer without softmax attention

# name -> reducer of one batch of activations (batch, seq, C) to a sum that adds up over batches.
STATISTICS: dict[str, Reducer] = {"sum_sq": channel_sum_sq, "sum": channel_sum, "abs_mean_sq": sample_abs_mean_sq}
WEIGHT_X_GRAD = "weight_x_grad"  # |w * dL/dw| of every prunable weight: backward passes, not a hook


def register_statistic(name: str, reducer: Reducer) -> None:
    """Make ``name`` collectable by calibration (a plug-in that needs a new statistic calls this)."""
    if STATISTICS.get(name, reducer) is not reducer or name == WEIGHT_X_GRAD:
        raise ValueError(f"a different statistic is already registered as {name!r}")
    STATISTICS[name] = reducer


@dataclass
class ActivationStats:
    """Per-layer fp32 statistics of the transitional channels, and the tokens and samples behind them.

    ``attn[name]`` / ``mlp[name]``: one tensor per layer for each statistic collected, (num_heads * head_dim,)
    for attention and (intermediate_size,) for the MLP for the built-in ones: ``sum_sq`` (sum over tokens of
    x^2), ``sum`` (sum over tokens of x), ``abs_mean_sq`` (sum over samples of the squared per-sample mean |x|).

    In a mixture of experts, ``mlp[name][l]`` stacks one statistic per expert, (num_experts, ...), each over
    the tokens routed to that expert (of its router-weighted inputs where calibration was gate-weighted), and
    ``experts`` holds per layer (num_experts,): ``tokens`` (how many tokens were routed to each expert) and
    ``contribution`` (sum over those tokens of the L2 norm of the expert's router-weighted output).
    ``shared[name]`` holds the shared expert's statistics, as a dense MLP's, where there is one.
    """

    attn: dict[str, list[torch.Tensor]]
    mlp: dict[str, list[torch.Tensor]]
    tokens: int = 0
    samples: int = 0
    experts: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    shared: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> ActivationStats:
        def move(group):
            return {name: [t.to(device) for t in values] for name, values in group.items()}

        return ActivationStats(move(self.attn), move(self.mlp), self.tokens, self.samples, move(self.experts),
                               move(self.shared))

    def merged(self, other: ActivationStats) -> ActivationStats:
        """The statistics of two disjoint sets of windows together (every statistic is a sum)."""
        if set(self.attn) != set(other.attn):
            raise ValueError("cannot merge statistics of different kinds")

        def add(a, b):
            return {name: [x + y for x, y in zip(a[name], b[name], strict=True)] for name in a}

        return ActivationStats(add(self.attn, other.attn), add(self.mlp, other.mlp), self.tokens + other.tokens,
                               self.samples + other.samples, add(self.experts, other.experts),
                               add(self.shared, other.shared))


# Statistics that are least-squares objectives (the refit's, and the error-based choices made from it): where
# the consumer's output is normalized per token before the residual stream (Gemma's post-attention and
# post-feedforward norms), an error d in a token's output y reaches the model as about gain * d / rms(y), so
# these are collected over x / rms(y) and the fit minimises the error the model sees. Without it the tokens
# with the largest outputs (a few carry most of the energy) decide the fit, although the norm scales them
# down like every other token (measured on Gemma-3-270M: docs/results.md, "Quality that transfers").
# Eq. 5's norms stay the paper's, unweighted.
OUTPUT_NORM_WEIGHTED = ("gram",)


def output_norm_weights(output: torch.Tensor) -> torch.Tensor:
    """1 / rms over the last axis of a consumer's output: (..., out) -> (..., 1) fp32 per-token weights."""
    return output.float().square().mean(dim=-1, keepdim=True).clamp_min(1e-12).rsqrt()


def _accumulate(store: dict[str, list], index: int, module: nn.Module, args: tuple,
                output: torch.Tensor | None = None) -> None:
    """Add one call's statistics; ``output`` is given only where the consumer's output is normalized."""
    weights = None if output is None else output_norm_weights(output)
    for name, values in store.items():
        x = args[0]
        if weights is not None and name in OUTPUT_NORM_WEIGHTED:
            x = x.float() * weights
        reduced = STATISTICS[name](x)
        if values[index] is None:
            values[index] = torch.zeros_like(reduced)
        values[index].add_(reduced)


EXPERT_STATISTICS = ("sum_sq", "sum", "gram")  # token sums: the only kind a set of routed tokens has


def _accumulate_expert(stats: ActivationStats, index: int, num_experts: int, gate_weighted: bool,
                       call: ExpertCall) -> None:
    """Add one expert call to layer ``index``'s per-expert statistics."""
    if gate_weighted and call.weights is None:
        raise TransactError("this model's experts do not scale their outputs by the routing weights where transact "
                            "can see it; calibrate without gate weighting")
    inputs = call.inputs * call.weights if gate_weighted else call.inputs
    outputs = call.outputs if call.weights is None else call.outputs * call.weights
    for name, values in stats.mlp.items():
        reduced = STATISTICS[name](inputs)
        if values[index] is None:
            values[index] = reduced.new_zeros((num_experts, *reduced.shape))
        values[index][call.expert].add_(reduced)
    stats.experts["tokens"][index][call.expert] += inputs.shape[0]
    stats.experts["contribution"][index][call.expert] += outputs.float().norm(dim=-1).sum()


@contextmanager
def record_transitional_stats(model: nn.Module, statistics: tuple[str, ...] = ("sum_sq",), *,
                              gate_weighted: bool = True) -> Iterator[ActivationStats]:
    """Within the block, every forward pass adds into the yielded ActivationStats (token and sample counts
    excluded: the caller knows what it fed). The hooks are removed on exit, also on error. Experts are
    measured on their router-weighted inputs where ``gate_weighted``, else on their raw inputs."""
    unknown = sorted(set(statistics) - set(STATISTICS))
    if unknown:
        raise ValueError(f"unknown statistics {unknown}; known: {', '.join(STATISTICS)}")
    parts = get_adapter(model).layer_parts(model)
    routed = {i: mlp for i, (_, mlp) in enumerate(parts) if isinstance(mlp, ExpertParts)}
    if routed and set(statistics) - set(EXPERT_STATISTICS):
        raise TransactError(f"experts are measured by sums over their routed tokens ({', '.join(EXPERT_STATISTICS)}); "
                            f"{', '.join(sorted(set(statistics) - set(EXPERT_STATISTICS)))} cannot be collected")
    inputs = {"attn": [attn.o if attn is not None else None for attn, _ in parts],
              "mlp": [None if i in routed else mlp.down for i, (_, mlp) in enumerate(parts)],
              "shared": [mlp.shared.down if i in routed and mlp.shared else None for i, (_, mlp) in enumerate(parts)]}
    # a layer without softmax attention has no o_proj input: its statistics stay empty
    stats = ActivationStats({name: [None if o is not None else NO_CHANNELS for o in inputs["attn"]]
                             for name in statistics},
                            {name: [None] * len(parts) for name in statistics})
    if routed:
        stats.experts = {name: [torch.zeros(routed[i].num_experts, device=routed[i].down.device) if i in routed
                                else NO_CHANNELS for i in range(len(parts))] for name in ("tokens", "contribution")}
    if any(inputs["shared"]):
        stats.shared = {name: [None] * len(parts) for name in statistics}
    recorders = [partial(_accumulate_expert, stats, i, mlp.num_experts, gate_weighted) for i, mlp in routed.items()]
    adapter = get_adapter(model)
    normed = {"attn": adapter.attention_output_norm is not None, "mlp": adapter.mlp_output_norm is not None,
              "shared": False}
    weighted = bool(set(statistics) & set(OUTPUT_NORM_WEIGHTED))
    handles = []
    try:
        for module, store in (("attn", stats.attn), ("mlp", stats.mlp), ("shared", stats.shared)):
            for i, linear in enumerate(inputs[module]):
                if linear is None:
                    continue
                hook = partial(_accumulate, store, i)
                handles.append(linear.register_forward_hook(hook) if normed[module] and weighted
                               else linear.register_forward_pre_hook(hook))
        with ExitStack() as experts:
            if routed:
                experts.enter_context(recording_experts([mlp.experts for mlp in routed.values()], recorders))
            yield stats
    finally:
        for handle in handles:
            handle.remove()


def decoder_stack(model: nn.Module) -> nn.Module:
    """The model without its LM head: calibration needs only the layers, and the head is a large share
    of a small model's compute (a 49k x 576 matmul per token for SmolLM2)."""
    return getattr(model, model.base_model_prefix, model)


def calibrate(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4, progress: bool = True,
              statistics: tuple[str, ...] = ("sum_sq",), gate_weighted: bool = True) -> ActivationStats:
    """Run ``windows`` (n, seq_len) through the model in batches and return the statistics (on CPU)."""
    device = next(model.parameters()).device
    body = decoder_stack(model)
    with record_transitional_stats(model, statistics, gate_weighted=gate_weighted) as stats, torch.inference_mode():
        for start in tqdm(range(0, len(windows), batch_size), desc="calibrating", unit="batch",
                          total=-(-len(windows) // batch_size), disable=not progress):
            batch = windows[start : start + batch_size].to(device)
            body(input_ids=batch, use_cache=False)
            stats.tokens += batch.numel()
            stats.samples += batch.shape[0]
    return stats.to("cpu")


# ---------------------------------------------------------------- weights x gradients

@contextmanager
def gradients_of_prunable_weights(model: nn.Module) -> Iterator[None]:
    """Within the block only the prunable projections' weights require grad (embeddings, norms and the
    LM head keep none, which saves their gradient memory); every flag and .grad is restored on exit."""
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    saved_grads = [p.grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for linear in get_adapter(model).prunable_linears(model):
            linear.weight.requires_grad_(True)
        yield
    finally:
        for p, flag, grad in zip(params, saved_flags, saved_grads, strict=True):
            p.requires_grad_(flag)
            p.grad = grad


def _weight_x_grad(part: Part) -> torch.Tensor:
    return (part.weight.detach().float() * weight_grad(part).float()).abs().cpu()


def weight_x_grad(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4,
                  progress: bool = True) -> list[dict[str, torch.Tensor]]:
    """|w * dL/dw| of every prunable projection, with the language-modelling loss averaged over the
    calibration batches (forward and backward passes; weights are not changed).
    -> per layer {"q", "k", "v", "o" (where the layer has softmax attention), "up", "down" and, gated,
    "gate": (out, in)}."""
    device = next(model.parameters()).device
    n_batches = -(-len(windows) // batch_size)
    adapter = get_adapter(model)
    with gradients_of_prunable_weights(model), torch.enable_grad():
        for start in tqdm(range(0, len(windows), batch_size), desc="gradients", unit="batch",
                          total=n_batches, disable=not progress):
            batch = windows[start : start + batch_size].to(device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss / n_batches
            loss.backward()
        layers = []
        for attn, mlp in adapter.layer_parts(model):
            parts = {"gate": mlp.gate, "up": mlp.up, "down": mlp.down}
            if attn is not None:
                parts.update(q=attn.q, k=attn.k, v=attn.v, o=attn.o)
            layers.append({name: _weight_x_grad(part) for name, part in parts.items() if part is not None})
        return layers


# ---------------------------------------------------------------- everything a step needs

@dataclass
class Statistics:
    """What calibration measured for one pruning step: activation statistics, weight saliences (only
    where asked for), and the hash of the exact calibration tokens (None for data-free steps)."""

    activations: ActivationStats | None = None
    weight_x_grad: list[dict[str, torch.Tensor]] | None = None
    calibration_hash: str | None = None
    # (index, num_layers): the statistics (and the model they come with) are layer ``index`` of a model of
    # ``num_layers`` layers, as a layer-wise prune sees it; None: the whole model.
    layer: tuple[int, int] | None = None

    def has(self, name: str) -> bool:
        if name == WEIGHT_X_GRAD:
            return self.weight_x_grad is not None
        return self.activations is not None and name in self.activations.attn

    def activation(self, module: str, name: str) -> list[torch.Tensor]:
        """Per-layer statistic ``name`` of ``module`` ("attn" or "mlp"); a clear error if not collected."""
        group = getattr(self.activations, module, None) or {}
        if name not in group:
            raise TransactError(f"the statistic {name!r} was not collected; calibrate with it")
        return group[name]


def statistics_bytes(shape: ModelShape, names: tuple[str, ...]) -> int:
    """Bytes ``collect_statistics`` holds for ``names`` over the whole model: fp32 accumulators of each
    softmax-attention layer's o_proj input (width heads x head_dim) and each layer's down_proj input (the MLP
    width; each expert's and a shared expert's in a mixture), a vector per statistic and a square matrix for
    "gram"; and for ``WEIGHT_X_GRAD`` the prunable weights' gradients and their products, in fp32.
    Hand-checked in tests/test_fsdp.py."""
    attention = shape.num_heads * shape.head_dim
    mlp = [shape.intermediate_size] * (shape.num_experts or 1) + [shape.shared_expert_size or 0]
    total = 0
    for name in names:
        if name == WEIGHT_X_GRAD:
            kv = shape.num_kv_heads * shape.head_dim
            total += 2 * shape.hidden_size * (shape.num_attention_layers * (2 * attention + 2 * kv)
                                              + shape.num_layers * 3 * sum(mlp))
            continue
        power = 2 if name == "gram" else 1
        total += shape.num_attention_layers * attention**power + shape.num_layers * sum(w**power for w in mlp)
    return 4 * total


def collect_statistics(model: nn.Module, windows: torch.Tensor | None, names: tuple[str, ...], *,
                       batch_size: int = 4, progress: bool = True, gate_weighted: bool = True) -> Statistics:
    """One hooked forward pass over ``windows`` for every activation statistic in ``names``, and backward
    passes when ``WEIGHT_X_GRAD`` is among them. ``gate_weighted``: see ``record_transitional_stats``."""
    if not names:
        return Statistics()
    if windows is None:
        raise TransactError(f"the statistics {', '.join(names)} need calibration windows")
    activation_names = tuple(n for n in names if n != WEIGHT_X_GRAD)
    stats = Statistics(calibration_hash=windows_hash(windows))
    if WEIGHT_X_GRAD in names:
        stats.weight_x_grad = weight_x_grad(model, windows, batch_size=batch_size, progress=progress)
    if activation_names:
        stats.activations = calibrate(model, windows, batch_size=batch_size, progress=progress,
                                      statistics=activation_names, gate_weighted=gate_weighted)
    return stats
