"""``transact prune``, ``apply-plan`` and ``info``: flags -> jobs (``transact.jobs.prune``, ``apply_plan``,
``info``)."""

from __future__ import annotations

import argparse

from transact.cli.args import MODEL_HELP, add_runtime, at_least, default, multiple_of, width
from transact.cli.plugins import add_plugin_flags, chosen_correctors, routed_options
from transact.core.allocate import WidthSearch
from transact.core.budget import CONTEXT_KINDS, Budget
from transact.core.depth import BLOCK_SCORES, DepthOptions
from transact.errors import TransactError
from transact.jobs import apply_plan, info, prune
from transact.recipes import Calibration, HeldoutText, PruneRecipe


def add(sub) -> None:
    _prune_parser(sub)
    p = sub.add_parser("apply-plan", help="recreate a pruned model from its base and plan.json")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("plan", help="plan.json written by 'transact prune' (a plan with corrections that depend on "
                   "calibration, such as the refit, is recalibrated on the same text, checked by its hash)")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true")
    p.add_argument("--no-verify", action="store_true")
    add_runtime(p, default(apply_plan.ApplyPlanJob, "device"), default(apply_plan.ApplyPlanJob, "dtype"))
    p.set_defaults(handler=_apply_plan)
    p = sub.add_parser("info", help="family, widths, parameters, KV cache and what can be pruned")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=lambda args: info.run(info.InfoJob(args.model, json=args.json)))


def _prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="calibrate, score, prune and save a smaller model")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--out", required=True, help="output directory (must be empty or absent, unless --force)")
    p.add_argument("--heads", type=width, help="query heads kept per layer: a count or a fraction in (0,1)")
    p.add_argument("--kv-heads", type=width, help="KV heads (groups) kept per layer (default: keep the group size)")
    p.add_argument("--mlp", type=width, help="MLP channels kept per layer (in a mixture of experts: per expert, "
                   "a multiple of 8): a count or a fraction in (0,1)")
    p.add_argument("--experts", type=width, help="mixtures of experts: experts kept per layer, at least the number "
                   "each token is routed to: a count or a fraction in (0,1)")
    _add_depth_flags(p)
    _add_allocation_flags(p)
    _add_budget_flags(p)
    p.add_argument("--multiple-of", type=multiple_of, default=default(PruneRecipe, "multiple_of"), metavar="N|TYPE",
                   help="round every pruned width (heads x head_dim, MLP channels) to a multiple of N, or of what a "
                   "llama.cpp type needs (q4_k_m: 256, q4_0: 32); 128 suits vLLM's 4-bit Marlin kernels")
    p.add_argument("--no-gate-weighting", dest="gate_weighted", action="store_false",
                   help="mixtures of experts: score expert channels on their raw inputs rather than their "
                   "router-weighted ones")
    add_plugin_flags(p, default(PruneRecipe, "metric"))
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
                   help="with --layerwise: calibrate each layer on what the already-pruned layers produce; "
                   "--no-sequential (the default): on the dense model's activations, the same statistics and result "
                   "as without --layerwise")
    p.add_argument("--resume", action="store_true",
                   help="with --layerwise: continue an interrupted run from its last finished layer")
    tokens, window = default(HeldoutText, "tokens"), default(HeldoutText, "window")
    p.add_argument("--eval-text", default=None, metavar="PATH",
                   help="held-out text for perplexity: .txt/.jsonl file, directory, or 'builtin' (LAMBADA passages)")
    p.add_argument("--eval-tokens", type=at_least(0), default=tokens,
                   help=f"use at most this many tokens of the held-out text (0 = all; default {tokens})")
    p.add_argument("--window", type=at_least(2), default=window, help=f"perplexity window in tokens (default {window})")
    p.add_argument("--stride", type=at_least(1), default=None,
                   help="window stride (default: the window, i.e. disjoint)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--no-verify", action="store_true", help="skip reloading the output to compare logits")
    add_runtime(p, default(prune.PruneJob, "device"), default(prune.PruneJob, "dtype"))
    p.set_defaults(handler=_prune)


def _add_depth_flags(p) -> None:
    depth = DepthOptions(1)
    p.add_argument("--drop-layers", type=drop_count, default=None, metavar="N|FRACTION",
                   help="also drop a contiguous block of decoder layers (a count, or a fraction of the layers), chosen "
                   "on the calibration text, before the widths are pruned; a least-squares map folded into the layer "
                   "before the block stands in for it where that lowers the calibration loss")
    p.add_argument("--drop-attention", type=drop_count, default=None, metavar="N|FRACTION",
                   help="instead, drop the attention (not the MLP) of this many layers (a count, or a fraction of "
                   "the layers but the first), those whose attention the calibration loss misses least, before the "
                   "widths are pruned; it removes their KV cache, and the checkpoint is saved in the DeciLM / "
                   "Nemotron-NAS layout (vLLM, llama.cpp, transformers with trust_remote_code)")
    p.add_argument("--drop-mlp", type=drop_count, default=None, metavar="N|FRACTION",
                   help="instead, drop the MLP (not the attention) of this many layers (a count, or a fraction of "
                   "the layers), those whose MLP the calibration loss misses least; saved in the same layout "
                   "(measured worse than --mlp or --drop-layers at the same parameters on SmolLM2 and "
                   "Qwen2.5-Coder-0.5B)")
    p.add_argument("--drop-rounds", "--attention-rounds", dest="drop_rounds", type=at_least(1),
                   default=depth.rounds, metavar="R",
                   help=f"with --drop-attention or --drop-mlp: choose in R rounds, each scoring the layers left with "
                   f"the earlier rounds' sub-blocks dropped (default {depth.rounds}; 3 rounds cost 2.5x the passes "
                   "and chose 6-23%% better where half the attentions went: give it where a third or more go)")
    p.add_argument("--block-score", choices=BLOCK_SCORES, default=depth.score,
                   help="with --drop-layers: choose the block by the calibration loss with it skipped (loss, the "
                   "default: one pass over --loss-samples windows per candidate block) or by the angular distance "
                   "between its input and output hidden states (angular: one pass)")
    p.add_argument("--loss-samples", type=int, default=depth.loss_samples,
                   help=f"with --block-score loss: the calibration windows each candidate runs on (default "
                   f"{depth.loss_samples})")
    p.add_argument("--no-depth-map", dest="depth_map", action="store_false",
                   help="with --drop-layers: remove the block without the least-squares map")
    p.add_argument("--depth-damp", type=float, default=depth.damp,
                   help=f"with --drop-layers: the map's damping, relative to its Gram matrix (default {depth.damp})")


def _add_allocation_flags(p) -> None:
    search = WidthSearch()
    p.add_argument("--allocate", choices=("uniform", "search"), default="uniform",
                   help="MLP widths: the same in every layer (uniform, the default), or searched per layer on the "
                   "calibration loss at the same total (search: --mlp is the mean width, or with --budget the chosen "
                   "candidate's MLP width, spread over its layers in steps of --search-step, the most channels "
                   "the step allows up to that mean; "
                   "the checkpoint is saved in the DeciLM / Nemotron-NAS layout, which vLLM and llama.cpp load, and "
                   "transformers with trust_remote_code)")
    p.add_argument("--search-step", type=at_least(1), default=None,
                   help=f"with --allocate search: widths are multiples of this many channels (default {search.step}: "
                   "what llama.cpp's K-quants and its converter's DeciLM widths need)")
    p.add_argument("--search-generations", type=at_least(0), default=None,
                   help=f"with --allocate search: generations of the evolutionary search (default "
                   f"{search.generations}; "
                   f"each scores {search.offspring} candidates on {search.first_samples} calibration windows and "
                   f"{search.survivors + 1} on {search.final_samples})")
    p.add_argument("--search-seconds", type=float, default=None,
                   help="with --allocate search: stop after the generation that passes this many seconds")
    p.add_argument("--search-dtype", choices=("bfloat16", "float32"), default=None,
                   help=f"with --allocate search: score candidates on a copy of the model in this dtype (default "
                   f"{search.score_dtype}: 2.5x faster than float32 on a 2-core CPU; float32 scores on the model "
                   "itself, without the copy's memory)")


def _add_budget_flags(p) -> None:
    p.add_argument("--budget", type=_budget_share, default=None, metavar="KIND=FRACTION",
                   help="instead of widths: keep this share of the model's parameters (params=0.6), of its forward "
                   "FLOPs per token (flops=0.6, the LM head included, at --budget-context tokens) or of its KV cache "
                   "(kv=0.5, holding --budget-context tokens), by the mix of dropped layers (a contiguous block) "
                   "and uniform widths (MLP only, or heads and MLP) with the lowest loss on calibration text its "
                   "fits did not see; --block-score, --loss-samples, --no-depth-map and --depth-damp say how its "
                   "candidates drop layers; with "
                   "--allocate search the chosen candidate's MLP width is then spread over the layers")
    p.add_argument("--budget-depths", type=at_least(1), default=None,
                   help="with --budget: depths tried, from none to depth alone (default "
                   f"{default(Budget, 'depths')})")
    p.add_argument("--budget-context", type=at_least(1), default=None,
                   help="with --budget flops=F or kv=F: the tokens each token attends to, which the attention's FLOPs "
                   "grow with, and the tokens the KV cache holds; a sliding-window layer counts at most its window "
                   f"(default {default(Budget, 'context')})")


def _budget_share(text: str) -> tuple[str, float]:
    try:
        return Budget.parse(text)
    except TransactError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _budget(args, depth: DepthOptions | None) -> Budget | None:
    """The budget ``--budget`` asks for, its candidates dropping layers as the depth flags say."""
    if args.budget is None:
        for flag, value in (("--budget-depths", args.budget_depths), ("--budget-context", args.budget_context)):
            if value is not None:
                raise TransactError(f"{flag} belongs to --budget, which is not given")
        return None
    kind, share = args.budget
    if args.budget_context is not None and kind not in CONTEXT_KINDS:
        raise TransactError(f"--budget-context counts FLOPs or the KV cache; --budget {kind}={share} counts neither")
    return Budget(**{kind: share}, depths=args.budget_depths or default(Budget, "depths"),
                  depth=depth if depth is not None else default(Budget, "depth"),
                  context=args.budget_context or default(Budget, "context"))


def _allocation(args) -> WidthSearch | None:
    """The search ``--allocate search`` asks for (its flags given or their defaults); a search flag without it
    is refused, even at its default value (None: not given)."""
    flags = {"--search-step": args.search_step, "--search-generations": args.search_generations,
             "--search-seconds": args.search_seconds, "--search-dtype": args.search_dtype}
    if args.allocate == "uniform":
        given = [flag for flag, value in flags.items() if value is not None]
        if given:
            raise TransactError(f"{given[0]} belongs to --allocate search, which is not given")
        return None
    defaults = WidthSearch()
    return WidthSearch(step=defaults.step if args.search_step is None else args.search_step,
                       generations=defaults.generations if args.search_generations is None else args.search_generations,
                       seconds=args.search_seconds, seed=args.seed,
                       score_dtype=args.search_dtype or defaults.score_dtype)


def drop_count(text: str) -> int | float:
    """'3' -> 3 layers; '0.25' -> a quarter of the layers."""
    try:
        value: int | float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is neither a count of layers nor a fraction in (0, 1)") \
                from None
    try:
        DepthOptions(value)
    except TransactError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _depth_flags_given(args) -> list[str]:
    """The depth flags given other values than their defaults."""
    defaults = DepthOptions(1)
    return [flag for flag, changed in (("--block-score", args.block_score != defaults.score),
                                       ("--loss-samples", args.loss_samples != defaults.loss_samples),
                                       ("--no-depth-map", not args.depth_map),
                                       ("--depth-damp", args.depth_damp != defaults.damp)) if changed]


def _depth(args) -> DepthOptions | None:
    """``--drop-layers`` (or ``--drop-attention``, ``--drop-mlp``) with its flags; with ``--budget`` and no
    count, the flags alone (how the budget's candidates drop layers, their count a placeholder)."""
    sub_blocks = [(flag, part, value) for flag, part, value in (("--drop-attention", "attention", args.drop_attention),
                                                                ("--drop-mlp", "mlp", args.drop_mlp))
                  if value is not None]
    if sub_blocks:
        flag, part, value = sub_blocks[0]
        if len(sub_blocks) > 1 or args.drop_layers is not None or args.budget is not None:
            raise TransactError(f"{flag} is its own depth step: give it without --drop-layers, "
                                f"{'--drop-mlp' if part == 'attention' else '--drop-attention'} and --budget")
        if layer_flags := [given for given in _depth_flags_given(args) if given != "--loss-samples"]:
            raise TransactError(f"{layer_flags[0]} belongs to --drop-layers; {flag} scores by the calibration loss "
                                "and folds no map")
        return DepthOptions(value, loss_samples=args.loss_samples, part=part, rounds=args.drop_rounds)
    if args.drop_rounds != DepthOptions(1).rounds:
        raise TransactError("--drop-rounds belongs to --drop-attention or --drop-mlp, neither of which is given")
    if args.drop_layers is None:
        given = _depth_flags_given(args)
        if given and args.budget is None:
            raise TransactError(f"{given[0]} belongs to --drop-layers or --budget, neither of which is given")
        if args.budget is None or not given:
            return None
    return DepthOptions(args.drop_layers or 1, score=args.block_score, compensate=args.depth_map,
                        damp=args.depth_damp, loss_samples=args.loss_samples)


def _eval_text(args) -> HeldoutText | None:
    if args.eval_text is None:
        return None
    if args.stride is not None and args.stride > args.window:
        raise TransactError(f"--stride {args.stride} is longer than --window {args.window}")
    return HeldoutText(text=args.eval_text, tokens=args.eval_tokens, window=args.window, stride=args.stride)


def recipe_of(args) -> PruneRecipe:
    """The prune recipe the flags describe."""
    correctors = chosen_correctors(args)
    metric_options, corrector_options = routed_options(args, args.metric, correctors)
    depth = _depth(args)
    if args.budget is not None and args.drop_layers is not None:
        raise TransactError("--budget chooses the layers to drop itself; give either --budget or --drop-layers")
    budget = _budget(args, depth)
    return PruneRecipe(heads=args.heads, kv_heads=args.kv_heads, mlp=args.mlp, experts=args.experts,
                       gate_weighted=args.gate_weighted, metric=args.metric, metric_options=metric_options,
                       seed=args.seed, multiple_of=args.multiple_of, correctors=tuple(correctors),
                       corrector_options=corrector_options, depth=None if budget else depth,
                       allocation=_allocation(args), budget=budget,
                       calibration=Calibration(text=args.calib, samples=args.samples, seq_len=args.seq_len,
                                               batch_size=args.batch_size))


def _prune(args) -> prune.PruneResult:
    return prune.run(prune.PruneJob(
        model=args.model, out=args.out, recipe=recipe_of(args), device=args.device, dtype=args.dtype,
        eval_text=_eval_text(args), force=args.force, verify=not args.no_verify, progress=not args.quiet,
        layerwise=args.layerwise, sequential=args.sequential, resume=args.resume))


def _apply_plan(args) -> prune.PruneResult:
    return apply_plan.run(apply_plan.ApplyPlanJob(model=args.model, plan=args.plan, out=args.out, device=args.device,
                                                  dtype=args.dtype, force=args.force, verify=not args.no_verify,
                                                  progress=not args.quiet))
