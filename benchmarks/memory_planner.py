"""The memory planner's estimate against measured peaks: each setup trains a few steps through transact's own
training loop in a fresh process (peak resident memory, VmHWM), next to ``recovery.memory.estimate``.

    python benchmarks/memory_planner.py [--steps 3] [--out docs/bench/memory_planner]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import child_row, machine, write_result

# name -> (model: "smollm2" or a config of a random Llama, training settings)
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 49152}
WIDE_VOCAB = {**TINY, "vocab_size": 151936}
SETUPS = {
    "tiny, full, 4x128": (TINY, {"method": "full", "batch_size": 4, "seq_len": 128}),
    "tiny, 152K vocabulary, full, 4x512": (WIDE_VOCAB, {"method": "full", "batch_size": 4, "seq_len": 512}),
    "tiny, 152K vocabulary, kd, 4x512": (WIDE_VOCAB, {"method": "kd", "batch_size": 4, "seq_len": 512}),
    "SmolLM2-135M, full, 4x256": ("smollm2", {"method": "full", "batch_size": 4, "seq_len": 256}),
    "SmolLM2-135M, full, checkpointing, 4x256": ("smollm2", {"method": "full", "batch_size": 4, "seq_len": 256,
                                                             "gradient_checkpointing": True}),
    "SmolLM2-135M, lora, 4x256": ("smollm2", {"method": "lora", "batch_size": 4, "seq_len": 256}),
    "SmolLM2-135M, kd, 4x256": ("smollm2", {"method": "kd", "batch_size": 4, "seq_len": 256}),
    "SmolLM2-135M, full, 8-bit AdamW, 4x256": ("smollm2", {"method": "full", "batch_size": 4, "seq_len": 256,
                                                           "optimizer": "adamw_8bit"}),
    "SmolLM2-135M, full, bf16 weights + 8-bit AdamW, 4x256": ("smollm2", {
        "method": "full", "batch_size": 4, "seq_len": 256, "weights": "bf16", "optimizer": "adamw_8bit"}),
    "SmolLM2-135M, kd, bf16 weights + 8-bit AdamW, 4x256": ("smollm2", {
        "method": "kd", "batch_size": 4, "seq_len": 256, "weights": "bf16", "optimizer": "adamw_8bit"}),
}


def one(name: str, steps: int) -> dict:
    """Train setup ``name`` for ``steps`` steps here; -> measured peak and the estimate."""

    import torch
    from accelerate import Accelerator
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from transact.arch import shape_of
    from transact.io.models import dtype_name, load_model, prepare_model, smollm2_dir
    from transact.measure.costs import count_parameters
    from transact.recipes.run import Training
    from transact.recovery import memory
    from transact.recovery.data import BlockStream
    from transact.recovery.methods import RunFacts, get_method
    from transact.recovery.train import PhaseSpec, train_phase

    model_spec, settings = SETUPS[name]
    training = Training(tokens_per_shot=1, **{"weights": "fp32", "optimizer": "adamw", **settings})
    dtype = torch.bfloat16 if training.weights == "bf16" else torch.float32
    if model_spec == "smollm2":
        model, tokenizer = load_model(prepare_model(str(smollm2_dir()), "cpu", dtype_name(dtype)))
    else:
        tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **model_spec), dtype=dtype)
    shape, params = shape_of(model), count_parameters(model)
    estimate = memory.estimate(shape, params, training, device="cpu", teacher_here=True)
    method = get_method(training.method)  # as transact run does: the method's teacher, then its wrap
    teacher = method.teacher(RunFacts(training, torch.device("cpu"), 1, [steps], shape.vocab_size))
    if teacher is not None:
        teacher.attach(model)
    model = method.wrap(model, training.settings_of(method.name), 0)
    stream = BlockStream(tokenizer, "builtin", training.seq_len, 0, 16)
    train_phase(Accelerator(cpu=True), model, stream, training, PhaseSpec(phase=1, total_steps=steps),
                teacher=teacher, progress=False)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"setup": name, "measured_bytes": int(status["VmHWM"].split()[0]) * 1024, "estimate": estimate.parts,
            "estimated_bytes": estimate.total, "params": params}


def llama8b_estimates() -> list[dict]:
    """The planner's estimates (not measured) for distillation at Llama-3.1-8B scale on one GPU: seq_len 4096,
    micro-batch 1, gradient checkpointing; the dense 8B model as student (a first shot's upper bound) and a
    4.9 B student (24/6 heads, MLP 7,168), with the 8B teacher in bf16 on the GPU or stored top-k logits."""
    from transformers import LlamaConfig, MistralConfig

    from transact.arch import shape_of
    from transact.io.models import skeleton
    from transact.measure.costs import count_parameters
    from transact.recipes.run import Training
    from transact.recovery import memory

    common = {"hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 128256, "tie_word_embeddings": False}
    dense = LlamaConfig(intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, **common)
    pruned = MistralConfig(intermediate_size=7168, num_attention_heads=24, num_key_value_heads=6, head_dim=128,
                           **common)
    teacher_params = count_parameters(skeleton(dense))
    rows = []
    for student, config in (("8.0 B (dense shape)", dense), ("4.9 B", pruned)):
        shape, params = shape_of(config), count_parameters(skeleton(config))
        for weights, optimizer in (("fp32", "adamw"), ("bf16", "adamw_8bit")):
            training = Training(method="kd", seq_len=4096, batch_size=1, gradient_checkpointing=True,
                                weights=weights, optimizer=optimizer)
            est = memory.estimate(shape, params, training, device="cuda", teacher_here=False)
            teacher = teacher_params * (2 if weights == "bf16" else 4)
            for where, extra in (("on the GPU", teacher), ("stored top-k", 0)):
                rows.append({"student": student, "weights": weights, "optimizer": optimizer, "teacher": where,
                             "estimated_bytes": est.total + extra, "parts": {**est.parts, "teacher": extra}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--setups", nargs="+", choices=tuple(SETUPS), default=list(SETUPS))
    ap.add_argument("--one", choices=tuple(SETUPS), help=argparse.SUPPRESS)
    ap.add_argument("--out", default="docs/bench/memory_planner")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.steps)))
        return
    rows = []
    for name in args.setups:
        rows.append(child_row([sys.executable, __file__, "--one", name, "--steps", str(args.steps)]))
    gib = 2**30
    lines = [f"Peak resident memory (VmHWM) of {args.steps} training steps through transact's training loop, fresh "
             "process per setup, on CPU (fp32 weights and torch's AdamW unless the setup names bf16 weights or "
             "8-bit AdamW), next to `recovery.memory.estimate`.", "",
             "| setup | parameters | estimated GiB | measured GiB | estimate / measured |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['setup']} | {r['params'] / 1e6:.1f} M | {r['estimated_bytes'] / gib:.2f} | "
                     f"{r['measured_bytes'] / gib:.2f} | {r['estimated_bytes'] / r['measured_bytes']:.2f} |")
    large = llama8b_estimates()
    lines += ["", "The planner's estimates (not measured) for distillation from Llama-3.1-8B on one GPU, "
              "seq_len 4,096, micro-batch 1, gradient checkpointing (a student of the dense shape bounds a first "
              "shot):", "",
              "| student | weights | optimizer | teacher | estimated GiB |", "|---|---|---|---|---:|"]
    for r in large:
        lines.append(f"| {r['student']} | {r['weights']} | {r['optimizer']} | {r['teacher']} | "
                     f"{r['estimated_bytes'] / gib:.1f} |")
    write_result(args.out, {"machine": machine(), "args": vars(args), "rows": rows, "llama8b_estimates": large},
                 "\n".join(lines))


if __name__ == "__main__":
    main()
