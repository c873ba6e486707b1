"""Names of experiments and the modules that run them (imported lazily: some need extras)."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from nestlearn.errors import ConfigError

# name -> (module, one-line summary). A module defines ``main(argv: list[str]) -> int``.
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "ablations": (
        "nestlearn.experiments.ablations",
        "HOPE's Table-6 ablations on the same tokens: Δ perplexity vs full HOPE over seeds",
    ),
    "continual": (
        "nestlearn.experiments.continual",
        "class-incremental classification (stdlib, CLINC, Banking, DBpedia): ACC, BWT, R[i, j]",
    ),
    "test_time": (
        "nestlearn.experiments.test_time",
        "memories keep learning across documents vs reset: fact recall and forgetting",
    ),
    "mqar": (
        "nestlearn.experiments.mqar",
        "multi-query associative recall: accuracy per (sequence length, pairs), Zoology protocol",
    ),
    "niah": (
        "nestlearn.experiments.niah",
        "needle in a haystack (S-NIAH passkey/number/uuid): accuracy per (length, depth) heat map",
    ),
    "perplexity": (
        "nestlearn.experiments.perplexity",
        "perplexity and bits/byte: independent chunks, sliding windows, recurrent streaming",
    ),
    "suite": (
        "nestlearn.experiments.suite",
        "CPU reproduction: perplexity, ablations, mqar, niah, continual, test_time, 3 seeds each",
    ),
    "zero_shot": (
        "nestlearn.experiments.zero_shot",
        "zero-shot commonsense tasks through lm-evaluation-harness (needs lm_eval)",
    ),
}


def available_experiments() -> list[str]:
    return sorted(EXPERIMENTS)


def run_experiment(name: str, argv: Sequence[str] = ()) -> int:
    """Import the experiment's module and run its ``main`` with ``argv``."""
    if name not in EXPERIMENTS:
        known = ", ".join(available_experiments()) or "(none yet)"
        raise ConfigError(f"no experiment '{name}'; available: {known}")
    module = importlib.import_module(EXPERIMENTS[name][0])
    return int(module.main(list(argv)) or 0)
