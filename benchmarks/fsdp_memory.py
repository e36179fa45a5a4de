"""Per-process peak memory of recovery training over two processes, whole replicas (``training.distributed:
ddp``) against FSDP2 slices (``fsdp``; also with bf16 weights and with 8-bit moments), next to the memory
planner's per-process estimate. Each setup is one
``transact run`` under ``torchrun --nproc_per_node 2`` (gloo, one compute thread per process): one shot to
the given widths, then a few training steps; measured is each process's peak resident memory as the run's
report records it (``peak_memory_bytes_per_process``), estimated is what the run printed and checked
before loading (``memory_estimate_bytes``).

    python benchmarks/fsdp_memory.py [--model builtin:smollm2] [--steps 3] [--out docs/bench/fsdp_memory]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine, write_result

GIB = 2**30
# (method, gradient checkpointing, micro-batch) x distributed, fp32 weights with torch's AdamW: at 4 x 256
# tokens the activations, which every process keeps for its own micro-batch, are half of the peak; with
# checkpointing and one sequence the weights, gradients, moments and teacher that sharding divides are most
# of it. Then the last setup sharded with bf16 weights, and with 8-bit moments.
SETUPS = [(method, checkpointing, batch, distributed, "fp32", "adamw")
          for method, checkpointing, batch in (("full", False, 4), ("kd", False, 4), ("kd", True, 1))
          for distributed in ("ddp", "fsdp")]
SETUPS += [("kd", True, 1, "fsdp", "bf16", "adamw"), ("kd", True, 1, "fsdp", "fp32", "adamw_8bit")]


def recipe(model: str, out: Path, method: str, checkpointing: bool, batch: int, distributed: str, weights: str,
           optimizer: str, steps: int, seq_len: int) -> dict:
    return {"model": model, "out": str(out), "device": "cpu", "target": {"mlp": 1280}, "shots": 1,
            "prune": {"calibration": {"text": "builtin", "samples": 8, "seq_len": 128}},
            "training": {"method": method, "distributed": distributed, "tokens_per_shot": 2 * steps * batch * seq_len,
                         "batch_size": batch, "seq_len": seq_len, "save_every": 0, "weights": weights,
                         "optimizer": optimizer, "gradient_checkpointing": checkpointing},
            "heldout": {"tokens": 0}}


def run_setup(model: str, setup: tuple, args: argparse.Namespace, root: Path) -> dict:
    import yaml

    method, checkpointing, batch, distributed, weights, optimizer = setup
    name = f"{method}-{'ckpt-' if checkpointing else ''}{batch}-{distributed}-{weights}-{optimizer}"
    out, path = root / name, root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe(model, out, *setup, args.steps, args.seq_len)))
    command = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port",
               str(args.port), "-m", "transact.cli", "run", str(path), "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    report = json.loads((out / "report.json").read_text())
    row = {"method": method, "checkpointing": checkpointing, "micro_batch": batch, "distributed": distributed,
           "weights": weights, "optimizer": optimizer,
           "params": report["dense"]["params"],
           "measured_bytes_per_process": report["peak_memory_bytes_per_process"],
           "estimated_bytes": report["memory_estimate_bytes"], "estimate": report["memory_estimate"],
           "train_seconds": report["phases"][0]["train_seconds"], "seq_len": args.seq_len}
    print(row, file=sys.stderr, flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| setup | distributed | measured GiB (process 0 / 1) | estimated GiB each | estimate / measured | "
             "train s |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        measured = r["measured_bytes_per_process"]
        setup = f"{r['method']}, {'checkpointing, ' if r['checkpointing'] else ''}{r['micro_batch']}x{r['seq_len']}"
        setup += f", {r['weights']} + {r['optimizer']}"
        lines.append(f"| {setup} | {r['distributed']} | {measured[0] / GIB:.2f} / {measured[1] / GIB:.2f} | "
                     f"{r['estimated_bytes'] / GIB:.2f} | {r['estimated_bytes'] / max(measured):.2f} | "
                     f"{r['train_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:smollm2")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--port", type=int, default=29561)
    ap.add_argument("--out", default="docs/bench/fsdp_memory")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_setup(args.model, setup, args, Path(tmp)) for setup in SETUPS]
    result = {"machine": machine(), "settings": vars(args), "rows": rows}
    write_result(args.out, result, table(rows))


if __name__ == "__main__":
    main()
