"""``transact info``: a model's family, widths, parameters, KV cache and what can be pruned, from its config
alone (no weights read), with the family's limits and traps in words."""

from __future__ import annotations

import json
from dataclasses import dataclass

from transformers import PretrainedConfig

from transact.arch import ModelShape, get_adapter
from transact.core.targets import valid_head_pairs
from transact.deploy import quantize, vllm
from transact.errors import TransactError
from transact.io.models import prepare_model, skeleton
from transact.measure.costs import layerwise_memory, model_summary
from transact.recipes import Calibration


@dataclass(frozen=True)
class InfoJob:
    model: str
    json: bool = False  # summary() prints the result as JSON


class InfoResult(dict):
    """What ``transact info`` reports (a JSON-ready dict); ``summary()`` is its text, or its JSON."""

    as_json: bool = False

    def summary(self) -> str:
        return json.dumps(self, indent=1) if self.as_json else info_text(self)


def run(job: InfoJob) -> InfoResult:
    """Family, widths, parameters and KV cache of a model, from its config alone (no weights read)."""
    prep = prepare_model(job.model)
    info = InfoResult(model_summary(skeleton(prep.config, prep.save_dtype)))
    info.as_json = job.json
    shape = prep.shape
    info["prunable"] = {"heads_kv_pairs": valid_head_pairs(shape), "mlp": f"1..{shape.intermediate_size}"}
    if refusal := get_adapter(prep.config).prune_refusal:
        info["prunable"] = {"refused": refusal}
    elif shape.is_moe:
        m = shape.mlp_multiple
        info["prunable"]["mlp"] = f"{m}..{shape.intermediate_size} per expert, in multiples of {m}"
        info["prunable"]["experts"] = (f"{shape.experts_per_token}..{shape.num_experts} (--experts; at least the "
                                       f"{shape.experts_per_token} each token is routed to)")
    info["notes"] = family_notes(prep.config) + deployment_fit(shape, prep.config)
    source = prep.source
    info["source"] = source.path + (f" ({source.gguf_file})" if source.gguf_file else "")
    info["layerwise_memory_bytes"] = layerwise_memory(shape, prep.dtype, Calibration())
    return info


def family_notes(config: PretrainedConfig) -> list[str]:
    """The family's limits and traps for this model, in words: its head rule, its notes, and whether
    llama.cpp can take it as it is."""
    adapter = get_adapter(config)
    shape = adapter.shape(config)
    lines = [f"heads: {shape.head_rule.why}"] if shape.head_rule else []
    if shape.is_moe:
        lines.append(f"mixture of experts: --experts keeps each layer's best experts by routed contribution (at "
                     f"least the {shape.experts_per_token} each token is routed to); --mlp keeps each kept "
                     "expert's own best channels, measured on its router-weighted inputs")
        lines.append("transact run: LoRA adapts attention (and a shared expert), not the routed experts' fused "
                     "weights; method full trains them too")
    lines += adapter.notes(adapter.text_config(config))
    try:
        lines.append(f"GGUF: converts as llama.cpp's {adapter.gguf_target(config).architecture!r} architecture")
    except TransactError as e:
        lines.append(f"GGUF: {e}")
    return lines


def deployment_fit(shape: ModelShape, config: PretrainedConfig) -> list[str]:
    """Which of the model's matrices llama.cpp's quantized types and vLLM's kernels cannot take as they are, and
    which of its pruned checkpoints vLLM would refuse."""
    widths = quantize.matrix_widths(shape)
    notes = [*quantize.fit_notes(widths), vllm.head_size_note(shape), vllm.marlin_note(widths),
             *vllm.checkpoint_notes(config, heads_pruned=True)]
    return [line for line in notes if line]


def info_text(info: dict) -> str:
    """``transact info``'s text."""
    lines = [f"source            {info['source']}", f"family            {info['model_type']}",
             f"layers            {info['layers']}   hidden {info['hidden_size']}"]
    where = f" in {info['attention_layers']} of {info['layers']} layers" if "attention_layers" in info else ""
    lines.append(f"attention         {info['heads']} heads / {info['kv_heads']} KV heads x head_dim "
                 f"{info['head_dim']}{where}")
    if "experts" in info:
        lines.append(f"experts           {info['experts']} per layer of {info['mlp']} channels each, "
                     f"{info['experts_per_token']} active per token")
        lines.append(f"active parameters {info['active_params']:,} per token")
    elif "mlp_per_layer" in info:
        over = f" of the {info['mlp_layers']} layers with one" if "mlp_layers" in info else ""  # 0: dropped
        lines.append(f"mlp               {info['mlp']} channels on average{over}, per layer: "
                     + " ".join(map(str, info["mlp_per_layer"])))
    else:
        lines.append(f"mlp               {info['mlp']} channels")
    lines += [f"parameters        {info['params']:,} ({info['dtype']})",
              f"KV cache          {info['kv_cache_bytes_per_token']:,} bytes per token"]
    if "refused" in info["prunable"]:
        lines.append(f"prunable          no: {info['prunable']['refused']}")
    else:
        lines += [f"prunable heads    {info['prunable']['heads_kv_pairs']}",
                  f"prunable mlp      {info['prunable']['mlp']}"]
    if "experts" in info["prunable"]:
        lines.append(f"prunable experts  {info['prunable']['experts']}")
    lines += [f"note              {note}" for note in info["notes"]]
    if "refused" in info["prunable"]:
        return "\n".join(lines)
    memory, cal = info["layerwise_memory_bytes"], Calibration()
    lines.append(f"prune --layerwise about {memory['total'] / 2**30:.2f} GiB peak memory with --reconstruct and "
                 f"{cal.samples} x {cal.seq_len} calibration tokens (one layer "
                 f"{memory['layer weights'] / 2**31:.2f} GiB, hidden states {memory['hidden states'] / 2**30:.2f} GiB, "
                 f"Gram matrices and solve {memory['statistics'] / 2**30:.2f} GiB)")
    return "\n".join(lines)
