"""A digest of what a fixed set of transact commands writes, for checking that a change of the code's structure
changes no result.

    python scripts/outputs_digest.py run WORK [--smollm2] > digest.json     # run every command, print the digest
    python scripts/outputs_digest.py compare OLD.json NEW.json              # list every difference

The commands go through the command line only, so the same script runs against any version of the code. They
cover ``prune`` (whole model, ``--layerwise`` with and without ``--no-sequential``, several metrics and
correctors, a mixture of experts), ``apply-plan`` of the plans they wrote, and two-shot ``transact run`` with
each recovery method, uninterrupted and killed (SIGKILL) in shot 2's training and resumed. The digest holds
each output's weight files (SHA-256 of every tensor), its plans, its perplexities and its training losses.
Recipe records are compared after reading them with the current recipe types, so a changed layout of the
same recipe is not a difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tests' tiny models and their killed-run helper


def transact(*args: str, timeout: int = 1800) -> None:
    result = subprocess.run([str(BIN / "transact"), *args, "--quiet"], capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode:
        raise SystemExit(f"transact {' '.join(args)} failed:\n{result.stderr}")


def tensor_digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every tensor's bytes, by name, over the folder's safetensors files."""
    import torch
    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        for name, tensor in load_file(path).items():
            raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            out[name] = f"{tensor.dtype} {list(tensor.shape)} {hashlib.sha256(raw).hexdigest()[:16]}"
    return out


def plan_digest(plan: dict) -> dict:
    return {k: v for k, v in plan.items() if k != "versions"}


def perplexities(report: dict) -> dict:
    found = {}
    for part in ("before", "after"):
        if "perplexity" in report.get(part, {}):
            found[part] = report[part]["perplexity"]["perplexity"]
    for i, phase in enumerate(report.get("phases", [])):
        found[f"phase{i + 1}"] = [phase.get("perplexity_pruned"), phase.get("perplexity")]
    return found


def output_digest(folder: Path) -> dict:
    digest = {"tensors": tensor_digest(folder)}
    if (folder / "plan.json").is_file():
        digest["plan"] = plan_digest(json.loads((folder / "plan.json").read_text()))
    if (folder / "plans.json").is_file():
        digest["plans"] = [plan_digest(p) for p in json.loads((folder / "plans.json").read_text())["shots"]]
    if (folder / "report.json").is_file():
        digest["perplexity"] = perplexities(json.loads((folder / "report.json").read_text()))
    if (folder / "losses.json").is_file():
        digest["losses"] = [[r["step"], r["loss"], r["grad_norm"]] for r in json.loads((folder / "losses.json")
                                                                                          .read_text())]
    return digest


# ---------------------------------------------------------------- the inputs

def tiny_inputs(work: Path) -> None:
    """A tiny Llama (4 heads in 2 KV groups) and a tiny Qwen3-MoE with a character tokenizer, and a text."""
    from tiny import WORDS, char_tokenizer, tiny_model

    for name, family, kwargs in (("llama", "llama", {"heads": 4, "kv_heads": 2, "mlp": 96}),
                                 ("moe_base", "qwen3_moe", {"heads": 4, "kv_heads": 2})):
        tiny_model(family, **kwargs).save_pretrained(work / name)
        char_tokenizer().save_pretrained(work / name)
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(30)) + "." for _ in range(400)]
    (work / "train.txt").write_text("\n".join(lines) + "\n")


def run_recipe(work: Path, out: str, method: str, **extra) -> Path:
    import yaml

    recipe = {"model": str(work / "llama"), "out": str(work / out), "device": "cpu",
              "target": {"heads": 2, "kv_heads": 1, "mlp": 48}, "shots": 2,
              "calibration": {"text": str(work / "train.txt"), "samples": 8, "seq_len": 64, "seed": 0},
              "training": {"data": str(work / "train.txt"), "method": method, "tokens_per_shot": 8192,
                           "final_tokens": 2048, "seq_len": 64, "batch_size": 4, "lr": 1e-3, "save_every": 5},
              "heldout": {"text": str(work / "train.txt"), "tokens": 2048, "window": 256}, **extra}
    path = work / f"{out}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def killed_and_resumed(recipe: Path, out: Path) -> None:
    """Start the run, SIGKILL it once shot 2 has trained 10 steps, then resume it to the end."""
    from tiny import run_killed_at

    if run_killed_at(BIN / "transact", recipe, out, phase=2, step=10, timeout=600) != -signal.SIGKILL:
        raise SystemExit(f"{recipe.name}: the run ended before it could be killed")
    transact("run", str(recipe), "--resume")


def tiny_commands(work: Path) -> dict:
    llama, text = str(work / "llama"), str(work / "train.txt")
    cal = ["--calib", text, "--samples", "8", "--seq-len", "64", "--batch-size", "4"]
    widths = ["--heads", "2", "--kv-heads", "1", "--mlp", "48"]
    prunes = {
        "prune": [*widths, "--eval-text", text, "--eval-tokens", "2048", "--window", "256"],
        "prune_layerwise": [*widths, "--layerwise"],
        "prune_layerwise_dense": [*widths, "--layerwise", "--no-sequential"],
        "prune_flap_bias": [*widths, "--metric", "flap", "--flap-bias"],
        "prune_taylor_plain": [*widths, "--metric", "taylor", "--no-reconstruct"],
        "prune_alpha_damp": [*widths, "--alpha", "0.5", "--damp", "0.05"],
        "prune_minitron": [*widths, "--metric", "minitron"],
    }
    digest = {}
    for name, args in prunes.items():
        transact("prune", llama, "--out", str(work / name), *cal, *args)
        digest[name] = output_digest(work / name)
    for name in ("prune", "prune_flap_bias", "prune_layerwise_dense", "prune_alpha_damp"):
        transact("apply-plan", llama, str(work / name / "plan.json"), "--out", str(work / f"{name}_applied"))
        digest[f"{name}_applied"] = output_digest(work / f"{name}_applied")
    moe = str(work / "moe_base")
    for name, extra in (("moe", []), ("moe_layerwise", ["--layerwise"])):
        transact("prune", moe, "--out", str(work / name), *cal, "--heads", "2", "--kv-heads", "1", "--experts", "3",
                 "--mlp", "0.5", *extra)
        digest[name] = output_digest(work / name)
    for method in ("full", "lora", "kd"):
        transact("run", str(run_recipe(work, f"run_{method}", method)))
        digest[f"run_{method}"] = output_digest(work / f"run_{method}")
        killed_and_resumed(run_recipe(work, f"run_{method}_resumed", method), work / f"run_{method}_resumed")
        digest[f"run_{method}_resumed"] = output_digest(work / f"run_{method}_resumed")
    transact("run", str(run_recipe(work, "run_layerwise", "full", layerwise=True, sequential=True)))
    digest["run_layerwise"] = output_digest(work / "run_layerwise")
    return digest


def smollm2_commands(work: Path) -> dict:
    cal = ["--samples", "8", "--seq-len", "128", "--heads", "6", "--kv-heads", "2", "--mlp", "1024"]
    runs = {"smollm2": ["--eval-text", "builtin", "--eval-tokens", "2048"], "smollm2_layerwise": ["--layerwise"],
            "smollm2_layerwise_dense": ["--layerwise", "--no-sequential"]}
    digest = {}
    for name, extra in runs.items():
        transact("prune", "builtin:smollm2", "--out", str(work / name), *cal, *extra)
        digest[name] = output_digest(work / name)
    transact("apply-plan", "builtin:smollm2", str(work / "smollm2" / "plan.json"), "--out",
             str(work / "smollm2_applied"))
    digest["smollm2_applied"] = output_digest(work / "smollm2_applied")
    return digest


# ---------------------------------------------------------------- comparing

def normalised_recipe(recipe: dict) -> dict:
    """A recipe record as the current code reads it back (so a new layout of the same recipe compares equal)."""
    from transact.recipes import PruneRecipe, RunRecipe

    if "model" in recipe:
        return RunRecipe.from_dict(recipe).to_json()
    notes = {k: recipe[k] for k in ("shot", "layerwise", "sequential") if k in recipe}
    return {**PruneRecipe.from_json(recipe).to_json(), **notes}


def normalised(value):
    if isinstance(value, dict):
        return {k: normalised_recipe(v) if k == "recipe" else normalised(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalised(v) for v in value]
    return value


def differences(old, new, where: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new)):
            if key not in old or key not in new:
                found.append(f"{where}/{key}: only in the {'new' if key not in old else 'old'} digest")
            else:
                found += differences(old[key], new[key], f"{where}/{key}")
        return found
    return [] if old == new else [f"{where}: {json.dumps(old)[:200]} -> {json.dumps(new)[:200]}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("work", type=Path, help="an empty working directory")
    run.add_argument("--smollm2", action="store_true", help="also prune SmolLM2-135M (a few minutes more)")
    compare = sub.add_parser("compare")
    compare.add_argument("old", type=Path)
    compare.add_argument("new", type=Path)
    args = parser.parse_args()
    if args.command == "compare":
        old, new = (normalised(json.loads(p.read_text())) for p in (args.old, args.new))
        found = differences(old, new)
        print("\n".join(found) if found else f"identical: {len(new)} outputs")
        raise SystemExit(1 if found else 0)
    args.work.mkdir(parents=True, exist_ok=False)
    tiny_inputs(args.work)
    digest = tiny_commands(args.work)
    if args.smollm2:
        digest |= smollm2_commands(args.work)
    # paths inside the working directory are written relative to it, so two runs in two directories compare
    print(json.dumps(digest, indent=1, sort_keys=True).replace(str(args.work.resolve()), "WORK"))


if __name__ == "__main__":
    main()
