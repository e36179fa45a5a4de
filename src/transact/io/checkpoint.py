"""Writing a pruned model as a plain Hugging Face checkpoint (safetensors) plus plan.json and report.json.

The directory is assembled in a hidden temporary sibling, reloaded there with vanilla transformers and
compared logit for logit, and only then renamed into place, so a failure never leaves a half-written or
wrong output; an existing non-empty directory is only replaced with ``force``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from transact.arch import get_adapter, shape_of
from transact.decilm.modeling_decilm import DeciLMForCausalLM
from transact.errors import TransactError
from transact.io.files import check_output_dir, replace_dir, staging_dir
from transact.io.models import dtype_name, skeleton
from transact.io.per_layer import copy_code, decilm_model, has_per_layer_widths

if TYPE_CHECKING:
    from transact.core.plan import PrunePlan


def save_tokenizer(tokenizer, folder: Path) -> None:
    """``tokenizer.save_pretrained(folder)``, plus the SentencePiece model it was read from, which
    transformers 5 no longer writes: llama.cpp's converters for SentencePiece families (Gemma 2, Llama 2)
    read the vocabulary from ``tokenizer.model``, so a checkpoint without it could not be exported."""
    tokenizer.save_pretrained(folder)
    source = getattr(tokenizer, "vocab_file", None)
    if isinstance(source, str) and Path(source).is_file() and not (Path(folder) / Path(source).name).exists():
        shutil.copyfile(source, Path(folder) / Path(source).name)


def portable_model(model: nn.Module) -> nn.Module:
    """The model as vanilla transformers will load it from disk.

    Usually ``model`` itself. When the family's config class cannot describe the pruned shape (Llama with
    a head count that does not divide the hidden size; a longrope Phi-3 with pruned heads), the same tensors
    are re-homed, without copying, into the equivalent class whose config can (see ``transact.arch.llama``,
    ``transact.arch.phi3``).
    """
    if has_per_layer_widths(model):
        return decilm_model(model)
    adapter = get_adapter(model)
    config = adapter.portable_config(model.config)
    if config is model.config:
        return model
    twin = skeleton(config, next(model.parameters()).dtype)
    twin.load_state_dict(adapter.saved_state(model.state_dict(), model.config), assign=True, strict=True)
    if twin.config.tie_word_embeddings:
        twin.tie_weights()
    twin.generation_config = model.generation_config
    return twin.eval()


def write_checkpoint(
    model: nn.Module,
    tokenizer,
    out: str | Path,
    *,
    plan: PrunePlan | None,
    report: dict,
    save_dtype: torch.dtype,
    force: bool = False,
    verify: Callable[[Path], None] | None = None,
) -> Path:
    """Save ``model`` (cast to ``save_dtype``) with tokenizer, plan.json (none where ``plan`` is None: a
    model trained without pruning) and report.json, atomically.

    ``verify`` is called on the finished temporary directory before it is moved into place; an exception
    there leaves no output behind.
    """
    out = check_output_dir(out, force=force)
    tmp = staging_dir(out)
    try:
        to_save = portable_model(model)
        if save_dtype == next(to_save.parameters()).dtype:
            to_save.save_pretrained(tmp, safe_serialization=True)
        else:
            _save_cast(to_save, tmp, save_dtype)
        if isinstance(to_save, DeciLMForCausalLM):
            copy_code(tmp)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        if plan is not None:
            plan.save(tmp / "plan.json")
        (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        if verify is not None:
            verify(tmp)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _save_cast(model: nn.Module, directory: Path, dtype: torch.dtype) -> None:
    """save_pretrained with the floating-point tensors cast to ``dtype``, leaving the model untouched.

    Casting the model itself and back would round its fp32 buffers (the rotary frequencies) for good.
    Tensors that share storage (tied embeddings) stay shared, so the tie is still recognised.
    """
    cast: dict[int, torch.Tensor] = {}
    state = {}
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            t = cast.setdefault(t.data_ptr(), t.to(dtype))
        state[name] = t
    model.save_pretrained(directory, state_dict=state, safe_serialization=True)
    config = json.loads((directory / "config.json").read_text())
    config["dtype"] = dtype_name(dtype)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# A checkpoint whose weights were laid out anew (Phi-3 saved as Mistral: q/k/v and gate/up unfused) runs
# matmuls of other shapes, whose float sums round differently: its outputs must agree within this many
# machine epsilons of their largest magnitude (measured on fp32: 1.5e-6 on logits up to 3.3, i.e. 4 eps).
RELAYOUT_EPS = 32


def outputs_match(expected: torch.Tensor, got: torch.Tensor, *, exact: bool) -> bool:
    """Exactly equal, or (``exact`` False: a relaid-out checkpoint) equal within RELAYOUT_EPS epsilons."""
    if exact:
        return torch.equal(expected, got)
    scale = expected.abs().max().clamp_min(1.0)
    return bool((expected - got).abs().max() <= RELAYOUT_EPS * torch.finfo(expected.dtype).eps * scale)


def reload_and_compare(reference: nn.Module, tokens: torch.Tensor) -> Callable[[Path], None]:
    """A ``verify`` callback: vanilla ``AutoModelForCausalLM`` (for a multimodal family whose causal-LM
    class would drop the vision tower, its image-text auto class) must reload the directory and, cast to the
    reference's dtype and device, give exactly the reference's logits on ``tokens`` (1, T) (within
    floating-point rounding where the checkpoint lays the weights out anew, see ``outputs_match``)."""
    exact = not get_adapter(reference).relayouts(reference.config)
    model_class = get_adapter(reference).model_class()
    own_code = has_per_layer_widths(reference)  # the project's DeciLM files, which transformers runs as remote code

    def check(directory: Path) -> None:
        param = next(reference.parameters())
        # Load straight into the reference dtype: casting a loaded model with .to(dtype) would also round
        # its fp32 rotary-frequency buffer, which the reference never had rounded.
        if own_code:  # the reference's attention kernel, so that the sums agree to the bit
            reloaded = AutoModelForCausalLM.from_pretrained(directory, dtype=param.dtype, trust_remote_code=True,
                                                            attn_implementation=reference.config._attn_implementation)
        else:
            reloaded = model_class.from_pretrained(directory, dtype=param.dtype)
        reloaded = reloaded.to(param.device).eval()
        with torch.inference_mode():
            expected = reference(input_ids=tokens.to(param.device)).logits
            got = reloaded(input_ids=tokens.to(param.device)).logits
        if not outputs_match(expected, got, exact=exact):
            diff = (expected - got).abs().max().item()
            raise TransactError(f"the saved checkpoint does not reproduce the pruned model (max |Δlogit| {diff:.3g})")

    return check


def write_verified(model: nn.Module, tokenizer, out: str | Path, plan: PrunePlan | None, report: dict, *,
                   save_dtype: torch.dtype, force: bool = False, verify: bool = True,
                   probe: torch.Tensor | None = None) -> Path:
    """``write_checkpoint`` with the reload check on a probe sequence: the first 64 of ``probe``'s tokens
    (held-out text, when there is some), else 16 fixed token ids."""
    if probe is None:
        probe = torch.arange(16) % shape_of(model).vocab_size
    check = reload_and_compare(model, probe[:64].unsqueeze(0)) if verify else None
    return write_checkpoint(model, tokenizer, out, plan=plan, report=report, save_dtype=save_dtype, force=force,
                            verify=check)
