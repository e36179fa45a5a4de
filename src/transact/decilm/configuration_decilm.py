"""The configuration of a decoder whose layers have their own widths, in the DeciLM / Nemotron-NAS layout.

transact writes this file into every checkpoint whose pruned widths differ between layers (a vanilla Llama
or Qwen2 config has one MLP width and one KV-head count for all layers). ``block_configs`` holds one entry
per layer: ``{"attention": {"no_op": false, "replace_with_linear": false, "n_heads_in_group": g},
"ffn": {"no_op": false, "replace_with_linear": false, "intermediate_size": w, "ffn_mult": m}}``, where g is
the query heads per KV head (``num_attention_heads`` is the same in every layer) and w the layer's MLP width.
A layer whose attention was dropped has ``"attention": {"no_op": true, "n_heads_in_group": null, ...}``: no
attention, no input norm and no KV cache; one whose MLP was dropped ``"ffn": {"no_op": true,
"intermediate_size": null, ...}``: no MLP and no post-attention norm (vLLM's and llama.cpp's ``deci`` read
them so).
vLLM runs such checkpoints natively (``DeciLMForCausalLM``; it reads ``ffn_mult`` where present, which is
written only where it gives back w exactly), llama.cpp as its ``deci`` architecture; transformers loads them
with ``trust_remote_code=True`` through this file and ``modeling_decilm.py``. It imports nothing but
transformers (and huggingface_hub, which transformers requires), so that it works wherever the checkpoint is
copied.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig


class Section(dict):
    """One part of a layer's entry (``attention`` or ``ffn``): a dict whose keys also read as attributes, as
    vLLM reads them (``block.ffn.intermediate_size``); a missing key is a missing attribute."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class BlockConfig(dict):
    """One layer's entry of ``block_configs``: its ``attention`` and ``ffn`` sections."""

    def __init__(self, attention: dict, ffn: dict, **rest: Any) -> None:
        super().__init__(attention=Section(attention), ffn=Section(ffn), **rest)

    __getattr__ = Section.__getattr__


MODEL_TYPE = "nemotron-nas"  # vLLM's and the Nemotron-NAS checkpoints' name for this layout


def check_block(index: int, block: BlockConfig) -> None:
    """Refuse, naming the layer, an entry this modeling file cannot build: a linear block, layer 0 without
    attention, a layer with neither attention nor MLP, or a missing width."""
    attention, ffn = block.attention, block.ffn
    if attention.get("replace_with_linear") or ffn.get("replace_with_linear"):
        raise ValueError(f"layer {index}: linear blocks are not supported by this modeling file")
    if attention.get("no_op") and ffn.get("no_op"):
        raise ValueError(f"layer {index}: a layer with neither attention nor MLP is not supported by this modeling "
                         "file (drop the layer)")
    if (not ffn.get("no_op") and not ffn.get("intermediate_size")) or (not attention.get("no_op")
                                                                       and not attention.get("n_heads_in_group")):
        raise ValueError(f"layer {index}: this modeling file needs, where a layer has them, its "
                         "ffn.intermediate_size and attention.n_heads_in_group")
    if index == 0 and attention.get("no_op"):
        # caches count the tokens seen in layer 0, and vLLM starts its residual stream there
        raise ValueError("layer 0: this modeling file needs the first layer's attention")


# transformers' configs are strict dataclasses whose checks (methods named validate_*) are collected when the
# class is decorated: without its own decoration this class would run Llama's validate_architecture, which
# refuses a hidden size that is not a multiple of the (pruned) head count, whenever it is saved.
@strict
class DeciLMConfig(LlamaConfig):
    """A Llama configuration plus ``block_configs`` (and ``qkv_bias``: query, key and value projections
    with biases and an output projection without, as Qwen2 has them)."""

    model_type = MODEL_TYPE

    def __post_init__(self, **kwargs: Any) -> None:
        blocks = kwargs.pop("block_configs", None) or []
        super().__post_init__(**kwargs)
        self.block_configs = [block if isinstance(block, BlockConfig) else BlockConfig(**block) for block in blocks]
        for i, block in enumerate(self.block_configs):
            check_block(i, block)

    def validate_architecture(self) -> None:
        """Every layer's KV heads divide the query heads; the hidden size need not be a multiple of the head
        count (``head_dim`` is explicit: pruned heads)."""
        for i, block in enumerate(self.block_configs):
            if not block.attention.get("no_op") and self.num_attention_heads % block.attention.n_heads_in_group:
                raise ValueError(f"layer {i}: {block.attention.n_heads_in_group} query heads per KV head do not "
                                 f"divide {self.num_attention_heads} heads")

    def layer_widths(self, index: int) -> tuple[int, int]:
        """(KV heads, MLP width) of layer ``index``; 0 KV heads where its attention was dropped, width 0 where
        its MLP was."""
        block = self.block_configs[index]
        kv_heads = 0 if block.attention.get("no_op") else self.num_attention_heads // block.attention.n_heads_in_group
        return kv_heads, 0 if block.ffn.get("no_op") else block.ffn.intermediate_size

    @property
    def attention_dropped_layers(self) -> list[int]:
        """The layers without attention (``attention.no_op``)."""
        return [i for i, block in enumerate(self.block_configs) if block.attention.get("no_op")]

    @property
    def mlp_dropped_layers(self) -> list[int]:
        """The layers without MLP (``ffn.no_op``)."""
        return [i for i, block in enumerate(self.block_configs) if block.ffn.get("no_op")]

    def widths(self) -> list[tuple[int, int]]:
        """(KV heads, MLP width) of every layer."""
        return [self.layer_widths(i) for i in range(len(self.block_configs))]

    def uniform_llama(self) -> dict[str, Any]:
        """The values of a vanilla Llama config as wide as this model's widest layer (its MLP width and KV-head
        count), without the per-layer entries: a shape every layer of this model fits inside."""
        widths = self.widths()
        own = ("block_configs", "auto_map", "qkv_bias", "model_type", "architectures", "transformers_version")
        values = {key: value for key, value in self.to_dict().items() if key not in own}
        return values | {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                         "intermediate_size": max(w for _, w in widths),
                         "num_key_value_heads": max(kv for kv, _ in widths),
                         "head_dim": self.head_dim or self.hidden_size // self.num_attention_heads}
