"""The command line's flags for plug-ins, built from their registries: ``--metric`` and ``--correct`` choices
with each plug-in's summary, one flag per option a metric or corrector declares (``--alpha``, ``--damp``), and
the switches correctors declare for themselves (``--reconstruct``, ``--flap-bias``). A given option flag goes to
the chosen plug-in that declares it; one that no chosen plug-in declares is refused by name."""

from __future__ import annotations

import argparse
from dataclasses import fields

from transact.core.correct import CORRECTORS, get_corrector
from transact.core.metrics import METRICS, get_metric
from transact.errors import TransactError
from transact.options import OptionSpec, specs
from transact.recipes import PruneRecipe


def option_specs() -> dict[str, tuple[OptionSpec, list[str]]]:
    """Every plug-in option by name: its spec and the plug-ins declaring it ("metric 'transact'")."""
    found: dict[str, tuple[OptionSpec, list[str]]] = {}
    owners = [(f"metric {n!r}", m.options) for n, m in METRICS.items()]
    owners += [(f"corrector {n!r}", c.options) for n, c in CORRECTORS.items()]
    for owner, options in owners:
        for spec in specs(options):
            found.setdefault(spec.name, (spec, []))[1].append(owner)
    return found


def add_plugin_flags(p: argparse.ArgumentParser, default_metric: str) -> None:
    metrics = "; ".join(f"{name}: {m.summary}" for name, m in METRICS.items())
    p.add_argument("--metric", choices=METRICS.names(), default=default_metric, help=f"unit importance: {metrics}")
    p.add_argument("--correct", action="append", choices=CORRECTORS.names(), metavar="NAME",
                   help="a corrector to run after selection (repeatable; default: "
                   + ", ".join(PruneRecipe().correctors) + "): "
                   + "; ".join(f"{name}: {c.summary}" for name, c in CORRECTORS.items()))
    for name, c in CORRECTORS.items():
        if c.flag:
            p.add_argument(f"--{c.flag}", dest=f"corrector_{name}", action=argparse.BooleanOptionalAction,
                           default=None, help=f"--correct {name}; --no-{c.flag}: without it")
    for name, (spec, owners) in option_specs().items():
        kwargs = {"dest": f"option_{name}", "default": None,
                  "help": f"{spec.help} (an option of {' and '.join(owners)})"}
        if spec.kind is bool:
            p.add_argument(spec.flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            metavar = None if spec.choices else name.upper()  # choices show themselves
            p.add_argument(spec.flag, type=spec.kind, choices=spec.choices, metavar=metavar, **kwargs)


def chosen_correctors(args) -> list[str]:
    """--correct and the correctors' own switches together; none of them given: the recipe's default
    correctors, less those switched off."""
    named = list(dict.fromkeys(args.correct or []))
    switched = {name: getattr(args, f"corrector_{name}") for name, c in CORRECTORS.items() if c.flag}
    off = [name for name, value in switched.items() if value is False]
    for name in off:
        if name in named:
            raise TransactError(f"--no-{get_corrector(name).flag} and --correct {name} contradict each other")
    named += [name for name, value in switched.items() if value and name not in named]
    if not named:
        named = [name for name in PruneRecipe().correctors if name not in off]
    return named


def routed_options(args, metric: str, correctors: list[str]) -> tuple[dict, dict]:
    """The option flags given, as (the metric's options, each corrector's options by name)."""
    metric_options, corrector_options = {}, {}
    for name, (spec, owners) in option_specs().items():
        value = getattr(args, f"option_{name}")
        if value is None:
            continue
        takers = [c for c in correctors if name in _names(get_corrector(c).options)]
        if name in _names(get_metric(metric).options):
            metric_options[name] = value
        elif not takers:
            raise TransactError(f"{spec.flag} is an option of {' and '.join(owners)}; this prune uses metric "
                                f"{metric!r} and the correctors {', '.join(correctors) or 'none'}")
        for c in takers:
            corrector_options.setdefault(c, {})[name] = value
    return metric_options, corrector_options


def _names(options: type) -> set[str]:
    return {f.name for f in fields(options)}
