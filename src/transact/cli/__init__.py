"""``transact`` command line: a thin layer that parses flags into a job (``transact.jobs``), runs it and prints
the result's summary. Defaults shown in the help are read from the recipe and job dataclasses, so the command
line and the Python API cannot drift apart; metric and corrector choices and options come from their
registries (``transact.cli.plugins``)."""

from __future__ import annotations

import argparse
import logging
import sys

from transact.cli import measure, prune, recovery
from transact.errors import TransactError
from transact.recovery.optim import IMPORT_LOGGERS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transact", description="Structured pruning of decoder LLMs by "
                                     "transitional activations, into plain Hugging Face checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    for commands in (prune, measure, recovery):
        commands.add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # transformers draws a bar for every weight load and shard write; transact's own bars say what the
    # long steps are, so the command line turns the library's off (the Python API leaves them alone).
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    for name in IMPORT_LOGGERS:  # for the whole command: peft imports torchao too
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        text = args.handler(args).summary()
    except TransactError as e:
        print(f"transact: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("transact: interrupted; nothing was written", file=sys.stderr)
        return 130
    if text:
        print(text)
    return 0
