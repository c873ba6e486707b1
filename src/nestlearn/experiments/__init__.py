"""Experiments of the paper (SPEC §6), one command each: ``nestlearn experiment NAME [args]``.

Each experiment is a module with ``main(argv: list[str]) -> int`` that parses its own arguments,
shows progress, and writes a JSON result, a markdown table and (where useful) a figure into its
output folder. :data:`EXPERIMENTS` maps a name to its module, imported only when run.
"""

from nestlearn.experiments.registry import EXPERIMENTS, available_experiments, run_experiment

__all__ = ["EXPERIMENTS", "available_experiments", "run_experiment"]
