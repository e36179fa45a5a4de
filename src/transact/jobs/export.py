"""``transact export``: a pruned (or any supported) checkpoint as a GGUF file that llama.cpp loads, checked.

It converts with llama.cpp's own converter (``transact.deploy.llamacpp``); a quantized type (q4_k_m, q4_0, ...)
is then made by llama.cpp's own quantizer from that unquantized file, optionally guided by an importance matrix
from calibration text (``transact.deploy.quantize``). The result is loaded in llama.cpp and its greedy
predictions compared with transformers' (``transact.deploy.agreement``) before the file is renamed into place:
for a file whose types round the weights (q8_0 and the quantizer's), transformers runs the model with the file's
own dequantized weights, so the check asks whether llama.cpp computes what the file holds, and every tensor
must be within its type's rounding of the checkpoint's, so a file of other weights is still refused.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from transact.deploy import deci_gguf, llamacpp, quantize
from transact.deploy.agreement import FILE_WEIGHT_TYPES, compare_predictions, failure_message, quantized_reference
from transact.errors import TransactError
from transact.io.files import check_writable, move_into_place, staging_file
from transact.io.models import load_model, prepare_model, require_tokenizer, resolve_source
from transact.io.per_layer import load_per_layer
from transact.io.text import check_source, read_texts

# measured in docs/results.md ("Why q4_0 broke the recovered Qwen2.5-Coder")
UNGUIDED_NOTE = ("note: quantized without an importance matrix (--imatrix none). One weighs each weight's rounding "
                 "by the activations it meets: a recovered Qwen2.5-Coder-0.5B went to 7.3x its perplexity at q4_0 "
                 "without one, 1.2x with one")


@dataclass(frozen=True)
class GgufExportJob:
    model: str  # a Hugging Face model directory or builtin:smollm2
    out: str  # the .gguf file to write
    outtype: str = "f16"
    verify: bool = True
    force: bool = False
    new_tokens: int = 16  # greedy tokens compared per verification prompt
    tolerance: float | None = None  # nats; None = TOLERANCE[outtype]
    threads: int | None = None
    progress: bool = True
    imatrix: str | None = quantize.IMATRIX_AUTO  # importance-matrix text: a file, a directory, builtin, none, auto
    imatrix_chunks: int = 32  # 512-token chunks of it that llama-imatrix reads

    def __post_init__(self) -> None:
        quantize.check_outtypes([self.outtype])
        if quantize.names_imatrix_text(self.imatrix):
            if not quantize.is_quantized_type(self.outtype):
                raise TransactError(f"--imatrix guides llama.cpp's quantizer; --outtype {self.outtype} is not "
                                    f"quantized by it (choose one of {', '.join(quantize.QUANT_TYPES)})")
            check_source(self.imatrix, builtin="calibration", what="--imatrix text")
        if self.imatrix_chunks < 1:
            raise TransactError("--imatrix-chunks must be >= 1")
        if not str(self.out).endswith(".gguf"):
            raise TransactError(f"the output {self.out} must be a .gguf file name")
        if self.new_tokens < 1:
            raise TransactError("the number of compared tokens must be >= 1")
        if self.tolerance is not None and not self.tolerance > 0:
            raise TransactError("--tolerance must be a positive number of nats")


class ExportResult(dict):
    """What ``transact export`` wrote and checked; ``summary()`` is the text it prints."""

    def summary(self) -> str:
        s = self["summary"]
        lines = [f"wrote {self['out']}: llama.cpp architecture {s['architecture']}, {_per_layer(s['head_count'])} "
                 f"heads / {_per_layer(s['head_count_kv'])} KV heads x {s['key_length']}, "
                 f"{s['file_bytes'] / 2**20:,.1f} MiB "
                 f"({self['outtype']}" + (f", importance matrix over {self['imatrix']}" if self.get("imatrix") else "")
                 + ")"]
        if quantize.is_quantized_type(self["outtype"]) and not self.get("imatrix"):  # q8_0: no --imatrix
            lines.append(UNGUIDED_NOTE)
        if self.get("fallbacks"):
            lines.append(f"llama.cpp wrote {len(self['fallbacks'])} tensors in a fallback type (input width not a "
                         f"multiple of the type's block): {_fallback_counts(self['fallbacks'])}")
        if "verification" in self:
            v = self["verification"]
            if "worst_weight_error" in v:
                lines.append(f"weights: every tensor within {self['outtype']}'s rounding of the checkpoint's (worst "
                             f"{v['worst_tensor']}, {v['worst_weight_error']:.3f} relative)")
            lines.append(f"llama.cpp vs transformers ({v['reference']}): {v['agree']}/{v['steps']} greedy tokens "
                         f"identical on {len(v['prompts'])} prompts; worst margin {v['max_margin']:.3f} nats, "
                         f"worst log-prob difference {v['max_logprob_diff']:.3f} nats (tolerance {v['tolerance']})"
                         + (f", mean {v['mean_logprob_diff']:.3f} (at most {v['mean_tolerance']})"
                            if v.get("mean_tolerance") is not None else "") + "; tokenizers agree")
        return "\n".join(lines)


def _per_layer(count: int | list[int]) -> str:
    """A GGUF head count: one number, or a per-layer array (llama.cpp's deci) as its range."""
    if not isinstance(count, list):
        return str(count)
    return str(count[0]) if len(set(count)) == 1 else f"{min(count)}-{max(count)} (per layer)"


def _fallback_counts(lines: list[str]) -> str:
    """llama-quantize's fallback warnings counted by (asked type -> written type)."""
    import re
    from collections import Counter

    pairs = Counter()
    for line in lines:
        found = re.search(r"type\s+(\S+)\)\s*->\s*falling back to\s+(\S+)", line)
        pairs[f"{found[1]} -> {found[2]}" if found else "other"] += 1
    return ", ".join(f"{pair}: {n}" for pair, n in pairs.most_common())


def check_gguf_output(out: str | Path, *, force: bool) -> Path:
    out = Path(out).expanduser().resolve()
    if out.is_dir():
        raise TransactError(f"the output {out} is a directory; give a .gguf file name")
    if out.exists() and not force:
        raise TransactError(f"{out} exists (use --force to replace it)")
    check_writable(out)
    return out


def _check_per_layer_export(job: GgufExportJob) -> None:
    """Per-layer widths go to llama.cpp's ``deci`` (``transact.deploy.deci_gguf``); a file whose type rounds
    the weights cannot be checked, since transformers does not read a ``deci`` file back."""
    if job.verify and job.outtype in FILE_WEIGHT_TYPES:
        raise TransactError(f"{job.model!r} has per-layer widths (llama.cpp's deci architecture), whose "
                            f"{job.outtype} file transformers cannot read back to check; export f32, f16 or bf16, "
                            "or pass --no-verify")


def run(job: GgufExportJob) -> ExportResult:
    """Convert, verify in llama.cpp, then move into place; returns what was written and checked."""
    source = resolve_source(job.model)
    if source.gguf_file or not source.is_local:
        raise TransactError(f"{job.model!r}: export needs a local Hugging Face model directory")
    per_layer = deci_gguf.is_per_layer(Path(source.path))
    if per_layer:  # not through prepare_model: its nemotron-nas adapter refuses per-layer KV-head counts,
        _check_per_layer_export(job)  # which llama.cpp's deci holds and load_per_layer reads
        prep, arch = None, "deci"
    else:
        prep = prepare_model(job.model, "cpu", "float32")  # family and weight files checked
        arch = llamacpp.gguf_architecture(prep.config)
    out = check_gguf_output(job.out, force=job.force)
    tokenizer = require_tokenizer(source, "GGUF conversion (the vocabulary goes into the file)")
    llamacpp.runtime_version()
    llamacpp.converter_dir(progress=job.progress)

    quantized = quantize.is_quantized_type(job.outtype)
    if quantized:
        if prep is not None:
            for warning in quantize.width_warnings(quantize.matrix_widths(prep.shape), job.outtype):
                print(f"warning: {warning}", file=sys.stderr)
        quantize.tools_dir(progress=job.progress)  # built once, before any conversion

    t0 = time.perf_counter()
    tmp = staging_file(out)
    try:
        if job.progress:
            how = " with llama.cpp's quantizer" if quantized else ""
            print(f"writing {job.model} as {job.outtype} GGUF{how} (llama.cpp architecture {arch}) ...")
        guide, imatrix_text = quantize.imatrix_source(job.imatrix, job.outtype), None
        if guide is not None:
            imatrix_text = "\n\n".join(read_texts(guide, builtin="calibration", what="--imatrix text"))
        done = quantize.write_gguf(Path(source.path), tmp, job.outtype, imatrix_text=imatrix_text,
                                   imatrix_chunks=job.imatrix_chunks, threads=job.threads, progress=job.progress)
        result = ExportResult({"model": job.model, "out": str(out), "outtype": job.outtype, "architecture": arch}
                              | done | ({"imatrix": guide} if guide else {}))
        result["convert_seconds"] = round(time.perf_counter() - t0, 2)
        if job.verify:
            if job.progress:
                print("checking llama.cpp's predictions against transformers ...")
            model = load_per_layer(Path(source.path)) if per_layer else load_model(prep, tokenizer=tokenizer)[0]
            rounded = job.outtype in FILE_WEIGHT_TYPES
            reference, weights = quantized_reference(tmp, model, job.outtype) if rounded else (model, {})
            check = compare_predictions(tmp, reference, tokenizer, job.outtype, new_tokens=job.new_tokens,
                                        tolerance=job.tolerance, threads=job.threads)
            check["reference"] = "the file's dequantized weights" if rounded else "the checkpoint's weights"
            check.update(weights)
            result["verification"] = check
            if not check["ok"]:
                raise TransactError(failure_message(check, job.outtype))
        move_into_place(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    result["summary"] = llamacpp.gguf_summary(out)
    return result



