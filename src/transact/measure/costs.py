"""What a pruned model costs: parameters, weight bytes, KV cache, FLOPs per token, from its shape."""

from __future__ import annotations

import torch
from torch import nn

from transact.arch import LinearAttentionShape, ModelShape, get_adapter, shape_of
from transact.io.models import dtype_name
from transact.io.per_layer import layer_widths

DELTA_RULE_CHUNK = 64  # tokens per chunk of the gated delta rule in transformers and flash-linear-attention


def _unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Each parameter once (tied embeddings are one tensor)."""
    return list({id(p): p for p in model.parameters()}.values())


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in _unique_parameters(model))


def kv_cache_bytes_per_token(shape: ModelShape, dtype: torch.dtype) -> int:
    """Keys and values of every softmax-attention layer for one token: 2 * layers * kv_heads * head_dim *
    bytes (a hybrid model's linear-attention layers keep a fixed-size state instead, not per token)."""
    return shape.num_attention_layers * kv_values_per_layer(shape) * dtype.itemsize


def flops_per_token(shape: ModelShape, context: int, *, windows: bool = True) -> int:
    """Forward FLOPs (2 per multiply-add) for one token attending to ``context`` tokens.

    Counts the matmuls: q/k/v/o (q with each head's output gate where the family has one), gate/up/down
    (in a mixture of experts the router and the experts each token is routed to), the LM head, and
    attention scores and weighted sums (2 * heads * head_dim * attended tokens each); a hybrid model's
    linear-attention layers count ``linear_attention_flops`` in place of attention. A sliding-window layer
    attends to at most its window (what a decode step computes, the cache holding only the window);
    ``windows=False`` counts every layer over the whole context, as a prefill's dense kernels compute the
    masked scores too (``forward_flops``). Norms, RoPE, softmax, activations and the routing's top-k are
    ignored (< 1 %).
    """
    mlp = 2 * mlp_parameters(shape, active=True)
    attended = [shape.attended(layer, context) if windows else context for layer in shape.attention_layer_indices]
    total = sum(attention_flops(shape, tokens) for tokens in attended) + shape.num_mlp_layers * mlp \
        + lm_head_flops(shape)
    if shape.linear_attention is not None:
        linear_layers = shape.num_layers - shape.num_attention_layers
        total += linear_layers * linear_attention_flops(shape.linear_attention, shape.hidden_size)
    return total


def attention_flops(shape: ModelShape, context: int) -> int:
    """Forward FLOPs of one softmax-attention block for one token attending to ``context`` tokens: its
    projections, and the scores and weighted sums (2 * heads * head_dim * context each)."""
    return 2 * (attention_parameters(shape) + 2 * shape.num_heads * shape.head_dim * context)


def kv_values_per_layer(shape: ModelShape) -> int:
    """Values one softmax-attention layer caches per token: a key and a value per KV head."""
    return 2 * shape.num_kv_heads * shape.head_dim


def linear_attention_parameters(block: LinearAttentionShape, hidden_size: int) -> int:
    """Parameters of one linear-attention block's projections and convolution (per-head scalars are
    negligible)."""
    keys, values = block.key_heads * block.key_dim, block.value_heads * block.value_dim
    conv = 2 * keys + values
    return hidden_size * (conv + values + 2 * block.value_heads) + values * hidden_size + conv * block.conv_kernel


def linear_attention_flops(block: LinearAttentionShape, hidden_size: int) -> int:
    """Forward FLOPs of one linear-attention block for one token of a prefill: its projections and
    convolution, and the chunked gated delta rule as transformers' and flash-linear-attention's kernels
    compute it (chunks of ``DELTA_RULE_CHUNK`` tokens): per value head and token, the in-chunk q·k and k·k
    products (2 x chunk x key_dim each), the in-chunk attention on the values (chunk x value_dim), and
    reading, correcting and writing the key_dim x value_dim state (3 x key_dim x value_dim); 2 FLOPs per
    multiply-add. Independent of the context; the triangular solves within each chunk are left out."""
    chunk = DELTA_RULE_CHUNK
    per_head = 2 * chunk * block.key_dim + chunk * block.value_dim + 3 * block.key_dim * block.value_dim
    return 2 * linear_attention_parameters(block, hidden_size) + 2 * block.value_heads * per_head


def attention_parameters(shape: ModelShape) -> int:
    """Parameters of one softmax-attention block's projections (q with its gate rows where the family has
    them)."""
    q_rows = shape.num_heads * shape.head_dim * (2 if shape.q_gated else 1)
    return shape.hidden_size * (q_rows + shape.head_dim * (shape.num_heads + 2 * shape.num_kv_heads))


def mlp_parameters(shape: ModelShape, *, active: bool = False) -> int:
    """Parameters of one layer's MLP: gate/up/down, or in a mixture of experts the router, every expert's
    (``active``: only the experts one token is routed to) and the shared expert with its gate, if any."""
    one = 3 * shape.hidden_size * shape.intermediate_size
    if not shape.is_moe:
        return one
    routed = shape.hidden_size * shape.num_experts + one * (shape.experts_per_token if active else shape.num_experts)
    if shape.shared_expert_size is None:
        return routed
    return routed + 3 * shape.hidden_size * shape.shared_expert_size + shape.hidden_size  # and its sigmoid gate


def active_parameters(model: nn.Module) -> int:
    """Parameters one token's forward pass uses: all but the experts it is not routed to."""
    shape = shape_of(model)
    idle = shape.num_layers * (mlp_parameters(shape) - mlp_parameters(shape, active=True))
    return count_parameters(model) - idle


def lm_head_flops(shape: ModelShape) -> int:
    """FLOPs of the LM head for one token."""
    return 2 * shape.hidden_size * shape.vocab_size


def forward_flops(shape: ModelShape, seq_len: int) -> int:
    """FLOPs of one forward pass over ``seq_len`` tokens (a prefill), as the kernels compute it: every
    token's matmuls plus full ``seq_len`` x ``seq_len`` attention scores (the causal mask, and a sliding
    window's, hides part of them but dense kernels still compute them)."""
    return seq_len * flops_per_token(shape, seq_len, windows=False)


def prefill_flops(shape: ModelShape, seq_len: int) -> int:
    """FLOPs of a generation's prefill over ``seq_len`` prompt tokens: the forward pass with the LM head
    applied to the last token only, since generation (transformers' ``logits_to_keep=1``, llama.cpp) keeps
    only the last token's logits. With a large vocabulary and few layers the head is a large share of
    ``forward_flops``, which counts it at every position."""
    return forward_flops(shape, seq_len) - (seq_len - 1) * lm_head_flops(shape)


def experts_read(shape: ModelShape, batch: int) -> float:
    """The share of a layer's experts one decode step of ``batch`` sequences reads: each sequence's token
    reads its ``experts_per_token``, so E * (1 - (1 - k/E) ** batch) distinct experts are expected under
    uniform routing (k/E at batch 1). 1 for a dense model."""
    if not shape.is_moe:
        return 1.0
    return 1 - (1 - shape.experts_per_token / shape.num_experts) ** batch


def expert_bytes(model: nn.Module) -> int:
    """Bytes of the routed experts' weights (0 for a dense model)."""
    adapter = get_adapter(model)
    if not adapter.is_moe:
        return 0
    return sum(p.numel() * p.element_size() for _, mlp in adapter.layer_parts(model)
               for p in (mlp.gate_up, mlp.down))


def decode_weight_bytes(model: nn.Module, batch: int) -> int:
    """Weight bytes one decode step of ``batch`` sequences reads: every weight once, except the experts no
    sequence is routed to (``experts_read``)."""
    routed = expert_bytes(model)
    return round(weight_bytes(model) - routed * (1 - experts_read(shape_of(model), batch)))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the unique parameters (what a decode step reads at least once)."""
    return sum(p.numel() * p.element_size() for p in _unique_parameters(model))


def mlp_widths_per_layer(model: nn.Module) -> list[int] | None:
    """Each decoder layer's MLP width, read from its modules, where the layers differ (per-layer widths, whose
    shape states the mean; 0 where the MLP was dropped); None where they are all one width, or in a mixture
    of experts."""
    if get_adapter(model).is_moe:
        return None
    widths = [width for _, width in layer_widths(model)]
    return widths if len(set(widths)) > 1 else None


def model_summary(model: nn.Module) -> dict:
    """Widths and costs of a model as it is now (used before and after pruning); ``mlp`` is the mean width
    where the layers keep their own (listed in ``mlp_per_layer``)."""
    shape = shape_of(model)
    per_layer = mlp_widths_per_layer(model)
    dtype = next(model.parameters()).dtype
    hybrid = {"attention_layers": shape.num_attention_layers} if shape.attention_layers is not None else {}
    if shape.mlp_layers is not None:
        hybrid["mlp_layers"] = shape.num_mlp_layers
    moe = {"experts": shape.num_experts, "experts_per_token": shape.experts_per_token,
           "active_params": active_parameters(model)} if shape.is_moe else {}
    if shape.shared_expert_size is not None:
        moe["shared_expert_mlp"] = shape.shared_expert_size
    return {
        "model_type": shape.model_type,
        "layers": shape.num_layers,
        "hidden_size": shape.hidden_size,
        "heads": shape.num_heads,
        "kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        **hybrid,  # how many layers have softmax attention (heads) or an MLP, where some have none
        "mlp": shape.intermediate_size,  # in a mixture of experts: each expert's width
        **({"mlp_per_layer": per_layer} if per_layer else {}),
        "params": count_parameters(model),
        **moe,
        "dtype": dtype_name(dtype),
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(shape, dtype),
        "flops_per_token": {str(c): flops_per_token(shape, c) for c in (256, 1024, 4096)},
    }


# Resident memory of the process before any weights are read: 440 MiB measured after importing transact
# (torch, transformers) and loading a tokenizer on the 2-core CPU machine of docs/results.md ("Layer-wise
# pruning"), plus room for the calibration text and the allocator's slack. A GPU process adds its CUDA
# context on the device side.
RUNTIME_OVERHEAD_BYTES = 600 * 2**20


def layer_parameters(shape: ModelShape) -> int:
    """Parameters of one decoder layer's projections, the larger kind of layer in a hybrid model (norms are
    negligible)."""
    attn = attention_parameters(shape)
    if shape.linear_attention is not None:
        attn = max(attn, linear_attention_parameters(shape.linear_attention, shape.hidden_size))
    return attn + mlp_parameters(shape)


def layerwise_memory(shape: ModelShape, dtype: torch.dtype, calibration, *, refit: bool = True) -> dict[str, int]:
    """The peak memory of a layer-wise prune, part by part (bytes; ``total`` is their sum). ``calibration``
    is a ``transact.recipes.Calibration``.

    - layer weights: the dense layer, and then the pruned layer beside its read-back copy for the write
      check (counted as two dense layers);
    - hidden states: the calibration windows' inputs of the current layer and its outputs;
    - layer activations: one calibration batch inside the layer (q/k/v/o and gate/up/down widths, eager
      attention scores);
    - statistics: with the refit, the fp32 Gram matrices of the o_proj and down_proj inputs (one per
      expert in a mixture of experts), and the fp64 blocks of the larger solve (counted as if every channel
      stayed);
    - runtime: interpreter, torch, transformers and the tokenizer (measured).
    """
    size = dtype.itemsize
    attn_width = shape.num_heads * shape.head_dim
    tokens = calibration.samples * calibration.seq_len
    batch_tokens = calibration.batch_size * calibration.seq_len
    widths = 2 * attn_width + 2 * shape.num_kv_heads * shape.head_dim + 3 * shape.intermediate_size
    scores = calibration.batch_size * shape.num_heads * calibration.seq_len ** 2
    parts = {"layer weights": 2 * layer_parameters(shape) * size,
             "hidden states": 2 * tokens * shape.hidden_size * size,
             "layer activations": (batch_tokens * (widths + 2 * shape.hidden_size) + scores) * size,
             "statistics": (4 * (attn_width ** 2 + (shape.num_experts or 1) * shape.intermediate_size ** 2)
                            + 2 * 8 * shape.intermediate_size ** 2 if refit else 0),
             "runtime": RUNTIME_OVERHEAD_BYTES}
    return {**parts, "total": sum(parts.values())}


def peak_memory_bytes(device: torch.device) -> int:
    """The most memory this process has held so far: allocated on a GPU, resident on a CPU (the kernel's
    high-water mark, libraries included)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
