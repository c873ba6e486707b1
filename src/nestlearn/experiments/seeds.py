"""Seeds of an experiment and the statistics over them.

Every experiment takes ``--seed S [S ...]`` (the seeds themselves) or ``--seeds N`` (seeds
``0 .. N-1``); :func:`resolve_seeds` turns either into ``args.seeds`` (a list) and sets
``args.seed`` to the first one, so code that runs one seed at a time reads ``args.seed``. A seed
fixes everything random in one run: model initialisation, training data and order, test sets.

Over seeds a number is reported as its mean and sample standard deviation (:func:`spread`;
``ddof = 1``, so one seed has no spread), formatted ``mean ± std`` (:func:`format_spread`). A
seed that could not produce the number (a run that diverged) is counted as missing, never as 0.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from typing import Any

from nestlearn.errors import ConfigError

MISSING = "—"


def add_seed_args(parser: argparse.ArgumentParser) -> None:
    """``--seed S [S ...]`` and ``--seeds N`` (mutually exclusive; default: seed 0)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--seed", nargs="+", type=int, default=None, dest="seed_list", metavar="S",
        help="seed(s) of data, model init and sampling; several run the experiment once per "
        "seed and report mean ± std (default 0)",
    )  # fmt: skip
    group.add_argument(
        "--seeds", type=int, default=None, dest="n_seeds", metavar="N",
        help="run seeds 0 .. N-1 (same as --seed 0 1 ... N-1)",
    )  # fmt: skip


def resolve_seeds(args: argparse.Namespace) -> list[int]:
    """Set ``args.seeds`` (the list) and ``args.seed`` (the first) from :func:`add_seed_args`.

    Idempotent; a namespace without the seed arguments keeps its ``seed`` (default 0). A preset
    (:func:`~nestlearn.experiments.model_source.apply_preset`) may fill ``n_seeds``."""
    if isinstance(getattr(args, "seeds", None), list):
        return args.seeds
    n = getattr(args, "n_seeds", None)
    given = getattr(args, "seed_list", None)
    if given:  # explicit seeds win over a count (which a preset may fill in)
        if len(set(given)) != len(given):
            raise ConfigError(f"--seed {' '.join(map(str, given))}: a seed is repeated")
        seeds = list(given)
    elif n is not None:
        if n < 1:
            raise ConfigError(f"--seeds {n}: needs at least 1 seed")
        seeds = list(range(n))
    else:
        seeds = [int(getattr(args, "seed", 0) or 0)]
    if any(s < 0 for s in seeds):
        raise ConfigError(f"seeds must be >= 0, got {seeds}")
    args.seeds = seeds
    args.seed = seeds[0]
    return seeds


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"mean", "std", "n", "missing", "values"}`` of the finite ``values``.

    ``std`` is the sample standard deviation (``ddof = 1``), ``None`` for fewer than two values;
    ``None`` and non-finite entries (a seed whose run failed) count as ``missing``."""
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(kept)
    mean = sum(kept) / n if n else None
    std = None
    if n >= 2:
        std = math.sqrt(sum((v - mean) ** 2 for v in kept) / (n - 1))
    return {
        "mean": mean,
        "std": std,
        "n": n,
        "missing": len(values) - n,
        "values": [None if v is None else float(v) for v in values],
    }


def format_spread(stat: Mapping[str, Any] | None, digits: int = 3, scale: float = 1.0) -> str:
    """``"mean ± std"`` (``mean`` alone for one seed, ``—`` for none), each times ``scale`` and
    rounded to ``digits`` decimals; ``(k failed)`` where seeds are missing."""
    if not stat or stat.get("mean") is None:
        return MISSING
    text = f"{stat['mean'] * scale:.{digits}f}"
    if stat.get("std") is not None:
        text += f" ± {stat['std'] * scale:.{digits}f}"
    if stat.get("missing"):
        text += f" ({stat['missing']} failed)"
    return text


def seeds_label(seeds: Sequence[int]) -> str:
    """``"seed 0"`` or ``"3 seeds (0, 1, 2)"``: for titles and captions."""
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    return f"{len(seeds)} seeds ({', '.join(map(str, seeds))})"
