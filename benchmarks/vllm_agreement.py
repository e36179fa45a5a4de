"""Whether vLLM loads transact's checkpoints and computes what transformers computes.

    python benchmarks/vllm_agreement.py --models builtin:smollm2 runs/smollm2-6h-2kv-1024 \
        --out docs/bench/vllm_agreement
    python benchmarks/vllm_agreement.py --families --out docs/bench/vllm_families

--models: each checkpoint in vLLM at every --dtypes, compared as ``transact verify`` does (teacher-forced
along vLLM's greedy path, four prompts) with no tolerance applied, so the table shows the raw distances the
tolerances were chosen from.

--families: every family transact supports, as a tiny random model (2 layers, hidden 128, 4 heads of 32 in 2
KV groups, MLP 192; embeddings tied where the family's released checkpoints tie them) pruned by
``transact prune --metric random`` to 2 heads in 1 KV group and MLP 128, plus two cases of their own: a Llama
pruned from 4 to 3 heads without grouped queries (saved as ``MistralForCausalLM``) and a Gemma 2 with untied
embeddings. Each is loaded in vLLM (fp32) and compared with vanilla transformers' reload of the checkpoint:
loads, agrees, or is refused, and vLLM's reason.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

from common import machine, write_result

from transact.deploy import vllm
from transact.errors import TransactError
from transact.io.models import load_model, prepare_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def check(spec: str, dtype: str, tokens: int) -> dict:
    prep = prepare_model(spec, "cpu", "float32")
    model, tokenizer = load_model(prep)
    architecture = prep.config.architectures[0] if prep.config.architectures else "?"
    try:
        result = vllm.compare_predictions(prep.source.path, model, tokenizer, dtype=dtype, new_tokens=tokens,
                                          tolerance=float("inf"))
    except TransactError as e:
        return {"model": spec, "dtype": dtype, "architecture": architecture, "loads": False, "reason": str(e)}
    return {"model": spec, "dtype": dtype, "architecture": architecture, "loads": True, "version": result["version"],
            "hf_overrides": result["hf_overrides"],
            "kv_cache_tokens": result["kv_cache_tokens"]} | {
        k: result[k] for k in ("agree", "steps", "max_margin", "max_logprob_diff", "mean_logprob_diff")}


# name -> (family, dense config settings, prune flags)
CASES = {"llama, 4 of 4 heads -> 3 (MHA)": ("llama", {"kv_heads": 4}, ["--heads", "3", "--kv-heads", "3"]),
         "gemma2, untied embeddings": ("gemma2", {"tie": False}, None)}


def family_cases() -> dict[str, tuple[str, dict, list[str] | None]]:
    from tiny import FAMILIES, TIED

    cases = {f: (f, {"tie": f in TIED}, None) for f in FAMILIES}
    return cases | {name: (f, {"tie": f in TIED} | extra, flags) for name, (f, extra, flags) in CASES.items()}


def build_family(folder: Path, family: str, settings: dict, flags: list[str] | None) -> Path:
    from tiny import char_tokenizer, tiny_model

    from transact.cli import main

    dense, pruned = folder / "dense", folder / "pruned"
    tiny_model(family, head_dim=32, hidden=128, mlp=192, heads=4, **{"kv_heads": 2} | settings).save_pretrained(dense)
    char_tokenizer().save_pretrained(dense)
    widths = flags or ["--heads", "2", "--kv-heads", "1"]
    code = main(["prune", str(dense), "--out", str(pruned), "--metric", "random", "--no-reconstruct", "--quiet",
                 "--mlp", "128", *widths])
    if code != 0:
        raise SystemExit(f"{family}: prune failed")
    return pruned


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=[])
    ap.add_argument("--families", action="store_true", help="every family, tiny and pruned (see above)")
    ap.add_argument("--only", nargs="+", default=None, help="--families: only these cases")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    ap.add_argument("--out", required=True, help="path stem for .json and .md")
    ap.add_argument("--table", action="store_true", help="only write OUT.md again from OUT.json")
    ap.add_argument("--merge", action="store_true", help="replace the rows of OUT.json this run measures again "
                    "(same model and dtype), keep the others")
    args = ap.parse_args()
    if args.table:
        saved = json.loads(Path(args.out).with_suffix(".json").read_text())
        write_result(args.out, saved, table(saved["rows"]))
        return
    rows = []
    for spec in args.models:
        for dtype in args.dtypes.split(","):
            rows.append(check(spec, dtype, args.tokens))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.families:
        for name, (family, settings, flags) in family_cases().items():
            if args.only and name not in args.only:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                pruned = build_family(Path(tmp), family, settings, flags)
                rows.append(check(str(pruned), "float32", args.tokens) | {"model": name})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.merge:
        new = {(r["model"], r["dtype"]): r for r in rows}
        saved = json.loads(Path(args.out).with_suffix(".json").read_text())["rows"]
        rows = [new.pop((r["model"], r["dtype"]), r) for r in saved] + list(new.values())
    version = next((r["version"] for r in rows if r.get("version")), None)
    write_result(args.out, {"rows": rows, "machine": machine(), "vllm": version}, table(rows))


def short_reason(reason: str) -> str:
    """The exception vLLM's log ended with (the reason), without the wrapping error around it."""
    tail = re.split(r"its log says: |vLLM's log: ", reason)[-1].replace("\n", " ")
    raised = re.search(r"\b[A-Z]\w*(?:Error|Exception): .*", tail)
    text = raised.group(0) if raised else tail
    return text if len(text) <= 200 else text[:200] + " ..."


def table(rows: list[dict]) -> str:
    """The rows as markdown, with the tolerances ``transact verify`` applies today (worst token; mean)."""
    lines = ["| model | dtype | saved as | loads in vLLM | greedy agreement | worst margin (nats) | worst log-prob "
             "diff (nats) | mean log-prob diff | verify's tolerance (mean) | KV-cache tokens (1 GiB) |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        head = f"| {r['model']} | {r['dtype']} | `{r['architecture']}` |"
        if not r["loads"]:
            lines.append(f"{head} **no**: {short_reason(r['reason'])} | | | | | | |")
            continue
        mean_tol = vllm.MEAN_TOLERANCE[r["dtype"]]
        served = (f"yes, as `{r['hf_overrides']['architectures'][0]}` (--hf-overrides)" if r.get("hf_overrides")
                  else "yes")
        lines.append(f"{head} {served} | {r['agree']}/{r['steps']} | {r['max_margin']:.3g} | "
                     f"{r['max_logprob_diff']:.3g} | {r['mean_logprob_diff']:.3g} | {vllm.TOLERANCE[r['dtype']]}"
                     + (f" ({mean_tol})" if mean_tol else "") + f" | {r['kv_cache_tokens']:,} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
