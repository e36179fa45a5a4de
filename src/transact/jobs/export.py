"""``transact export``: a pruned (or any supported) checkpoint as a GGUF file that llama.cpp loads, checked.

It converts with llama.cpp's own converter (``transact.deploy.llamacpp``), loads the result in llama.cpp and
compares its greedy predictions with transformers' (``transact.deploy.agreement``) before the file is renamed
into place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from transact.deploy import llamacpp
from transact.deploy.agreement import compare_predictions, failure_message
from transact.errors import TransactError
from transact.io.files import check_writable, move_into_place, staging_file
from transact.io.models import load_model, prepare_model, require_tokenizer


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

    def __post_init__(self) -> None:
        llamacpp.check_outtypes([self.outtype])
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
        lines = [f"wrote {self['out']}: llama.cpp architecture {s['architecture']}, {s['head_count']} heads / "
                 f"{s['head_count_kv']} KV heads x {s['key_length']}, {s['file_bytes'] / 2**20:,.1f} MiB "
                 f"({self['outtype']})"]
        if "verification" in self:
            v = self["verification"]
            lines.append(f"llama.cpp vs transformers: {v['agree']}/{v['steps']} greedy tokens identical on "
                         f"{len(v['prompts'])} prompts; worst margin {v['max_margin']:.3f} nats, worst log-prob "
                         f"difference {v['max_logprob_diff']:.3f} nats (tolerance {v['tolerance']}); tokenizers agree")
        return "\n".join(lines)


def check_gguf_output(out: str | Path, *, force: bool) -> Path:
    out = Path(out).expanduser().resolve()
    if out.is_dir():
        raise TransactError(f"the output {out} is a directory; give a .gguf file name")
    if out.exists() and not force:
        raise TransactError(f"{out} exists (use --force to replace it)")
    check_writable(out)
    return out


def run(job: GgufExportJob) -> ExportResult:
    """Convert, verify in llama.cpp, then move into place; returns what was written and checked."""
    prep = prepare_model(job.model, "cpu", "float32")  # family and weight files checked
    source = prep.source
    if source.gguf_file or not source.is_local:
        raise TransactError(f"{job.model!r}: export needs a local Hugging Face model directory")
    arch = llamacpp.gguf_architecture(prep.config)
    out = check_gguf_output(job.out, force=job.force)
    tokenizer = require_tokenizer(source, "GGUF conversion (the vocabulary goes into the file)")
    llamacpp.runtime_version()
    llamacpp.converter_dir(progress=job.progress)

    t0 = time.perf_counter()
    tmp = staging_file(out)
    try:
        if job.progress:
            print(f"converting {job.model} to {job.outtype} GGUF (llama.cpp architecture {arch}) ...")
        llamacpp.convert(Path(source.path), tmp, job.outtype, progress=job.progress)
        result = ExportResult({"model": job.model, "out": str(out), "outtype": job.outtype, "architecture": arch,
                  "convert_seconds": round(time.perf_counter() - t0, 2)})
        if job.verify:
            if job.progress:
                print("checking llama.cpp's predictions against transformers ...")
            model, _ = load_model(prep, tokenizer=tokenizer)
            check = compare_predictions(tmp, model, tokenizer, job.outtype, new_tokens=job.new_tokens,
                                        tolerance=job.tolerance, threads=job.threads)
            result["verification"] = check
            if not check["ok"]:
                raise TransactError(failure_message(check, job.outtype))
        move_into_place(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    result["summary"] = llamacpp.gguf_summary(out)
    return result


