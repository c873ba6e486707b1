"""``nestlearn experiment NAME [args]``: run one of the paper's experiments (``--help`` per one).

``nestlearn experiment list`` prints the available experiments with a line on each.
"""

from __future__ import annotations

import argparse

from nestlearn.experiments import EXPERIMENTS, available_experiments, run_experiment


def add_parser(sub, name: str) -> None:
    parser = sub.add_parser(
        name, help="run an experiment (mqar, niah, ...; 'list' shows all)", description=__doc__
    )
    parser.add_argument("experiment", help="experiment name, or 'list'")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the experiment")


def run(args: argparse.Namespace) -> int:
    if args.experiment == "list":
        for name in available_experiments():
            print(f"{name:24s} {EXPERIMENTS[name][1]}")
        return 0
    return run_experiment(args.experiment, args.args)
