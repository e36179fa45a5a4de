"""Per-layer widths (the DeciLM / Nemotron-NAS checkpoint transact writes) as llama.cpp's ``deci`` GGUF.

llama.cpp runs such a model as its ``deci`` architecture, which reads every layer's MLP width and KV-head
count from arrays (``deci.feed_forward_length``, ``deci.attention.head_count_kv``). Its converter's own
``deci`` path cannot make the file for transact's checkpoints: it derives each width from ``ffn_mult``,
takes the head size as hidden / heads (wrong once heads are pruned) and reads only Llama 3's or a
SentencePiece vocabulary. So transact converts in two steps, each exact:

1. a *uniform twin*: the same tensors as a vanilla Llama checkpoint, every layer's MLP and KV heads padded
   with zeros to the widest layer's, which the converter's Llama path turns into a ``llama`` GGUF with the
   checkpoint's own vocabulary and the rotary layout llama.cpp expects (q and k rows permuted per head);
2. that file rewritten as ``deci``: the same metadata under the ``deci.`` prefix, the per-layer widths as
   arrays, and each layer's tensors cut back to its own widths (the padding is the trailing rows and columns,
   since the permutation keeps heads in place).

A layer without attention (``attention.no_op``) gets zero attention tensors and a unit input norm in the twin,
and none in the ``deci`` file, whose per-layer head counts are 0 there (llama.cpp's attention-free layer).
A layer without MLP (``ffn.no_op``) gets zero MLP tensors and a unit post-attention norm in the twin, and in the
``deci`` file an MLP of ``NO_OP_MLP_WIDTH`` zero channels, which adds exactly zero: llama.cpp's ``deci`` graph
(2026-10) skips the rest of a layer whose MLP width is 0, its attention's output included, so width 0 loses
the attention (and aborts llama.cpp where it is the last layer).

The twin is never run: its padding only gives the converter one shape per tensor name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from transact.io.per_layer import read_config

UNQUANTIZED = ("f32", "f16", "bf16")
# GGUF tensors cut back to a layer's own widths: which widths, along which numpy axis (GGUF's last dimension
# is numpy's first).
CUT = {"ffn_gate.weight": ("mlp", 0), "ffn_up.weight": ("mlp", 0), "ffn_down.weight": ("mlp", 1),
       "ffn_gate.bias": ("mlp", 0), "ffn_up.bias": ("mlp", 0),
       "attn_k.weight": ("kv", 0), "attn_v.weight": ("kv", 0), "attn_k.bias": ("kv", 0), "attn_v.bias": ("kv", 0)}
LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(.+)")
ATTENTION_TENSORS = ("attn_norm.", "attn_q.", "attn_k.", "attn_v.", "attn_output.")  # what a no-op layer lacks
NO_OP_MLP_WIDTH = 32  # the zero MLP standing in for a dropped one: one block of Q4_0 / Q8_0 along its input


def is_per_layer(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds a checkpoint in the DeciLM layout (``block_configs`` in its config)."""
    path = Path(model_dir) / "config.json"
    return path.is_file() and "block_configs" in json.loads(path.read_text())


def padded(name: str, tensor: torch.Tensor, mlp: int, kv_rows: int) -> torch.Tensor:
    """``tensor`` with zeros appended to reach the twin's widths (``mlp`` channels, ``kv_rows`` k/v rows)."""
    if name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.bias")):
        rows = mlp
    elif name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_proj.bias",
                        "self_attn.v_proj.bias")):
        rows = kv_rows
    elif name.endswith("mlp.down_proj.weight"):
        return torch.nn.functional.pad(tensor, (0, mlp - tensor.shape[1]))
    else:
        return tensor
    return torch.nn.functional.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, rows - tensor.shape[0]))


def write_twin(model_dir: Path, stage: Path) -> tuple[dict, list[tuple[int, int]]]:
    """The uniform twin of ``model_dir`` in ``stage`` (tokenizer files linked, weights padded);
    -> (its config values, the per-layer (KV heads, MLP width))."""
    from safetensors.torch import load_file, save_file

    config = read_config(model_dir)
    widths, twin = config.widths(), config.uniform_llama()
    stage.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.name != "config.json" and not f.name.endswith((".safetensors", ".py", ".safetensors.index.json")):
            (stage / f.name).symlink_to(f.resolve())
    (stage / "config.json").write_text(json.dumps(twin, indent=1))
    kv_rows = max(kv for kv, _ in widths) * twin["head_dim"]
    state = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        state |= {name: padded(name, t, twin["intermediate_size"], kv_rows) for name, t in load_file(shard).items()}
    for layer in config.attention_dropped_layers:  # layer 0 always has attention: the shapes to copy
        state |= missing_sub_block(layer, state, 0, ("self_attn.", "input_layernorm."))
    with_mlp = next(i for i, (_, width) in enumerate(widths) if width)
    for layer in config.mlp_dropped_layers:
        state |= missing_sub_block(layer, state, with_mlp, ("mlp.", "post_attention_layernorm."))
    save_file(state, str(stage / "model.safetensors"), metadata={"format": "pt"})
    return twin, widths


def missing_sub_block(layer: int, state: dict[str, torch.Tensor], source: int,
                      prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The twin's tensors for a layer without a sub-block (the tensors named with ``prefixes``), shaped as
    layer ``source``'s in the padded ``state``: zero projections and biases, a unit norm."""
    head = f"model.layers.{source}."
    own = {name[len(head):]: t for name, t in state.items()
           if name.startswith(head) and name[len(head):].startswith(prefixes)}
    return {f"model.layers.{layer}.{name}": torch.ones_like(t) if "layernorm" in name else torch.zeros_like(t)
            for name, t in own.items()}


def cut_tensor(name: str, data, widths: list[tuple[int, int]], head_dim: int):
    """A twin tensor (numpy, GGUF name) cut back to its layer's own widths; others unchanged."""
    match = LAYER_TENSOR.fullmatch(name)
    if match is None or match.group(2) not in CUT:
        return data
    kv, mlp = widths[int(match.group(1))]
    which, axis = CUT[match.group(2)]
    keep = mlp if which == "mlp" else kv * head_dim
    return data[:keep] if axis == 0 else data[:, :keep]


def rewrite_as_deci(twin_file: Path, out_file: Path, widths: list[tuple[int, int]], head_dim: int) -> None:
    """The converter's ``llama`` file of the uniform twin written again as ``deci`` with per-layer widths (and
    the head size stated, which llama.cpp would otherwise take as hidden / heads)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(str(twin_file))
    writer = GGUFWriter(str(out_file), "deci")
    widths = [(kv, width or NO_OP_MLP_WIDTH) for kv, width in widths]  # a dropped MLP: zero channels
    heads = int(reader.fields["llama.attention.head_count"].contents())
    per_layer = {"llama.feed_forward_length": [w for _, w in widths],
                 "llama.attention.head_count_kv": [kv for kv, _ in widths]}
    if any(kv == 0 for kv, _ in widths):  # layers without attention have no heads
        per_layer["llama.attention.head_count"] = [heads if kv else 0 for kv, _ in widths]
    present = set(reader.fields)
    for key in ("llama.attention.key_length", "llama.attention.value_length"):
        if key not in present:
            writer.add_uint32("deci." + key[len("llama."):], head_dim)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue  # the header's own counts, and the architecture the writer sets
        name = "deci." + field.name[len("llama."):] if field.name.startswith("llama.") else field.name
        if field.name in per_layer:
            writer.add_array(name, per_layer[field.name])
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub)
    for tensor in reader.tensors:
        match = LAYER_TENSOR.fullmatch(tensor.name)
        if match and widths[int(match.group(1))][0] == 0 and match.group(2).startswith(ATTENTION_TENSORS):
            continue
        data = cut_tensor(tensor.name, tensor.data, widths, head_dim)
        writer.add_tensor(tensor.name, data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
