"""``transact run`` and ``transact teach``: a YAML recipe and overrides -> jobs (``transact.jobs.run``,
``transact.jobs.teach``)."""

from __future__ import annotations

from transact.cli.args import default
from transact.jobs import run, teach
from transact.recipes import load_run_recipe


def add(sub) -> None:
    p = sub.add_parser("run", help="iterative pruning with recovery training, from a YAML recipe (resumable)")
    p.add_argument("recipe", help="recipe YAML (keys: model, out, target, shots or schedule, prune, training, "
                   "heldout; see the README)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="recipe keys to override, dotted for nested ones, e.g. training.lr=1e-4 shots=4 "
                   "prune.corrector_options.refit.damp=0.05")
    p.add_argument("--resume", action="store_true", help="continue the run in the recipe's out directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=lambda args: run.run(run.RunJob(load_run_recipe(args.recipe, args.overrides),
                                                           args.resume, not args.quiet)))
    p = sub.add_parser("teach", help="write the dense model's top-k log-probabilities for a distillation recipe's "
                       "training blocks (training.kd.teacher_logits), so transact run needs no teacher in memory")
    p.add_argument("recipe", help="a transact run recipe with training.method: kd and training.kd.teacher_logits")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe keys to override, as for transact run")
    k = default(teach.TeachJob, "k")
    p.add_argument("--k", type=int, default=k, help=f"log-probabilities kept per token (default {k}; 4 + 6k bytes "
                   "per token on disk)")
    p.add_argument("--processes", type=int, default=default(teach.TeachJob, "processes"),
                   help="processes the run will train on (their batches consume the stream; default 1)")
    p.add_argument("--resume", action="store_true", help="continue writing after the last complete shard")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=lambda args: teach.run(teach.TeachJob(load_run_recipe(args.recipe, args.overrides),
                                                                 args.k, args.processes, args.resume,
                                                                 not args.quiet)))
