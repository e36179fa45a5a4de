"""SmolLM3: the Llama block in which some layers (``no_rope_layers``, every fourth in the released models)
have no rotary embedding. That list is per layer and untouched by pruning; ``SmolLM3Config`` accepts any
head count with an explicit ``head_dim``.

llama.cpp's ``smollm3`` architecture sizes q by heads × ``attention.key_length``, but places the NoPE layers
itself (every fourth, no GGUF key says otherwise), so a checkpoint with another pattern is not exported.
"""

from transformers import PretrainedConfig

from transact.arch import register
from transact.arch.adapter import FamilyAdapter, GgufTarget
from transact.errors import TransactError

LLAMACPP_NOPE_STEP = 4


def smollm3_gguf(config: PretrainedConfig) -> GgufTarget:
    expected = [int((i + 1) % LLAMACPP_NOPE_STEP != 0) for i in range(config.num_hidden_layers)]
    if list(config.no_rope_layers) != expected:
        raise TransactError(f"llama.cpp's smollm3 architecture skips the rotary embedding in every "
                            f"{LLAMACPP_NOPE_STEP}th layer; this model's no_rope_layers differ "
                            f"({config.no_rope_layers}), so it is not exported")
    return GgufTarget("smollm3")


def smollm3_notes(config: PretrainedConfig) -> tuple[str, ...]:
    nope = [i for i, rope in enumerate(config.no_rope_layers) if not rope]
    return (f"layers without rotary embedding (NoPE), kept as they are: {nope}",)


ADAPTER = register(FamilyAdapter("smollm3", gguf=smollm3_gguf, notes=smollm3_notes))
