"""Run by tests/test_fsdp.py under ``torchrun --nproc_per_node 2``: for bf16 weights with AdamW and fp32
weights with 8-bit AdamW, train a sharded tiny Llama 2 steps, save each process's slices, train 2 more;
then a fresh sharded model loads the slices and trains the same 2 steps (state under the directory given as
the argument). Each process writes ``results.rankR.json``: per setup, whether the two ended bit-identical,
and the kinds of saved moments."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from tiny import tiny_model

from transact.recovery import optim, sharded

SETUPS = (("bf16", "adamw"), ("fp32", "adamw_8bit"))
TRAINING = SimpleNamespace(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)


def sharded_model(dtype: torch.dtype) -> torch.nn.Module:
    return sharded.shard(tiny_model("llama", heads=4, kv_heads=2, mlp=4096).to(dtype))  # MLP slices >= 4,096 values


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    torch.manual_seed(seed)  # stochastic rounding of bf16 weights draws from torch's generator, as a run seeds it
    tokens = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 100, (2, 16), generator=tokens)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def local_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: optim.local_part(p).detach().clone() for name, p in model.named_parameters()}


def check(weights: str, kind: str, directory: Path, rank: int) -> dict:
    dtype = torch.bfloat16 if weights == "bf16" else torch.float32
    model = sharded_model(dtype)
    optimizer = optim.make_optimizer(model, TRAINING, kind)
    train(model, optimizer, 2, seed=0)
    sharded.save_shards(directory, model, optimizer, rank, 2)
    train(model, optimizer, 2, seed=1)
    resumed = sharded_model(dtype)
    saved = sharded.load_shards(directory, resumed, rank, 2)
    resumed_optimizer = optim.make_optimizer(resumed, TRAINING, kind)
    optim.load_state(resumed_optimizer, saved)
    sharded.wrap_moments(resumed_optimizer)
    train(resumed, resumed_optimizer, 2, seed=1)
    a, b = local_weights(model), local_weights(resumed)
    meta = json.loads((directory / sharded.shard_files(rank, 2)[2]).read_text())
    return {"weights": weights, "optimizer": kind, "rank": rank, "dtype": str(next(iter(a.values())).dtype),
            "identical": all(torch.equal(a[k], b[k]) for k in a),
            "packed": sorted({p["type"] for p in meta["packed"].values()})}


def main(root: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = []
    for weights, kind in SETUPS:
        directory = root / f"{weights}-{kind}"
        directory.mkdir(exist_ok=True)
        results.append(check(weights, kind, directory, rank))
        dist.barrier()
    (root / f"results.rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()

if __name__ == "__main__":
    main(Path(sys.argv[1]))
