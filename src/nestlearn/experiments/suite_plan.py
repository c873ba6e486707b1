"""The parts of ``nestlearn experiment suite``: what runs, as which command, in which order.

The suite runs each experiment of SPEC §6–7 (issue 15) as separate processes, one per
(experiment, model) — per ablation variant for ``ablations`` — all writing into ``DIR/NAME``
(each model's seeds are stored units, :mod:`nestlearn.experiments.units`), then one
*assembling* run of the full command per experiment (naming all its units: ``--models A B C``),
which finds every unit stored and only writes the tables and figures. An experiment whose
module does not name its models or variants runs as one process (the ``paper`` preset runs every
experiment that way).

Order: longest part first (the classic longest-processing-time rule, which keeps the ``--jobs``
workers busy to the end). A part's expected time is its measured time from an earlier run
(``suite_state.json``) or else its share of the experiment's budget in CPU-minutes at one thread
(:data:`BUDGET_MINUTES`, the sizes the experiments' ``cpu`` presets are held to), split between
its models by :data:`MODEL_WEIGHT`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SUITE_EXPERIMENTS = ("perplexity", "ablations", "mqar", "niah", "continual", "test_time")
# The models every experiment compares (issue 15 contract); used when a module names none.
SUITE_MODELS = ("hope", "hope_attention", "titans_lmm", "gated_deltanet", "transformer")
# Expected CPU-minutes of a whole experiment (all models, 3 seeds, one thread): the budgets of
# the experiments' ``--preset cpu`` (154 in all: under 90 minutes on 2 cores, side by side).
BUDGET_MINUTES: dict[str, float] = {
    "perplexity": 35, "ablations": 40, "mqar": 22, "niah": 18, "continual": 30, "test_time": 13,
}  # fmt: skip
# Relative cost of a model's unit within an experiment, until measured times replace it.
# Relative CPU cost per unit, measured at the cpu presets (2026-12-07: HOPE about 8x the
# Transformer per step, HOPE-attention 3.5x, Titans 2.2x, Gated DeltaNet 1.5x).
MODEL_WEIGHT: dict[str, float] = {
    "hope": 8.0, "hope+level_periods": 8.0, "hope_attention": 3.5, "titans_lmm": 2.2,
    "gated_deltanet": 1.5, "transformer": 1.0,
}  # fmt: skip
ASSEMBLE_MINUTES = 0.5
# Experiments that start from another's results: continual learning fine-tunes the perplexity
# experiment's trained models (``continual --pretrained auto``), so its unit for model M starts
# after perplexity's unit for M has ended (when both are in the plan).
FOLLOWS: dict[str, str] = {"continual": "perplexity"}
# Module attributes naming an experiment's units, with the flag that selects one of them.
UNIT_SOURCES = (
    ("DEFAULT_VARIANTS", "--variants"),
    ("VARIANTS", "--variants"),
    ("DEFAULT_MODELS", "--models"),
)


@dataclass(frozen=True)
class ExperimentSpec:
    """How the suite runs one experiment: its ``units`` (models or variants, selected one per
    process by ``unit_flag``; empty: the whole experiment in one process), its expected
    ``minutes`` in all, and ``extra_args`` appended to its every command."""

    name: str
    units: tuple[str, ...] = ()
    unit_flag: str = "--models"
    minutes: float = 10.0
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Part:
    """One process of the suite. ``key`` is ``NAME/UNIT`` for a unit and ``NAME`` for the
    assembling (or whole-experiment) run; ``args`` follow ``nestlearn experiment``; an assembling
    run waits for ``requires`` (its units' keys)."""

    key: str
    experiment: str
    args: tuple[str, ...]
    estimate_s: float
    unit: str | None = None
    unit_flag: str = "--models"
    requires: tuple[str, ...] = field(default=())
    after: tuple[str, ...] = field(default=())  # parts that must end before it starts

    @property
    def assembles(self) -> bool:
        return bool(self.requires)


@dataclass(frozen=True)
class SuiteOptions:
    """The suite's settings (``nestlearn experiment suite --help``)."""

    out: Path
    preset: str = "cpu"
    seeds: int = 3
    jobs: int = 2
    threads: int = 1
    device: str | None = None
    only: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    no_progress: bool = False
    split: bool = True  # one process per (experiment, unit); ``paper`` runs experiments whole


def module_units(name: str) -> tuple[tuple[str, ...], str]:
    """The units the experiment's module runs by default and the flag selecting one:
    ``DEFAULT_VARIANTS``/``VARIANTS`` (``--variants``) or ``DEFAULT_MODELS`` (``--models``).

    A module that cannot be imported or names neither gives ``((), "--models")``, except that an
    experiment without ``DEFAULT_MODELS`` that is not ``ablations`` gets :data:`SUITE_MODELS`."""
    from nestlearn.experiments.registry import EXPERIMENTS

    try:
        module = importlib.import_module(EXPERIMENTS[name][0])
    except Exception:  # not registered, an extra missing, or broken: run it whole (it fails)
        return (), "--models"
    for attribute, flag in UNIT_SOURCES:
        value = getattr(module, attribute, None)
        if isinstance(value, Mapping):
            value = list(value)
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            return tuple(value), flag
    if name == "ablations":
        return (), "--variants"
    return SUITE_MODELS, "--models"


def default_specs(names: Sequence[str] = SUITE_EXPERIMENTS) -> list[ExperimentSpec]:
    """The suite's experiments with their units read from their modules."""
    specs = []
    for name in names:
        units, flag = module_units(name)
        specs.append(ExperimentSpec(name, units, flag, BUDGET_MINUTES.get(name, 10.0)))
    return specs


def base_args(spec: ExperimentSpec, options: SuiteOptions) -> list[str]:
    """``NAME --preset P --seeds N [--threads T] --no-progress --out DIR/NAME [--device D]``."""
    args = [spec.name, "--preset", options.preset, "--seeds", str(options.seeds)]
    if options.threads:
        args += ["--threads", str(options.threads)]
    args += ["--no-progress", "--out", str(Path(options.out) / spec.name)]
    if options.device:
        args += ["--device", options.device]
    return args + list(spec.extra_args)


def plan_parts(
    specs: Sequence[ExperimentSpec],
    options: SuiteOptions,
    measured: Mapping[str, float] | None = None,
) -> list[Part]:
    """Every part of the selected experiments (``--only``/``--skip``), each with its expected
    seconds (``measured`` where known), longest first; an assembling run after its units."""
    measured = dict(measured or {})
    chosen = [s for s in specs if (not options.only or s.name in options.only)]
    chosen = [s for s in chosen if s.name not in options.skip]
    parts: list[Part] = []
    for spec in chosen:
        args = base_args(spec, options)
        if not (options.split and spec.units):
            est = measured.get(spec.name, spec.minutes * 60)
            parts.append(Part(spec.name, spec.name, tuple(args), est, unit_flag=spec.unit_flag))
            continue
        weights = [MODEL_WEIGHT.get(u.split("+")[0], 1.0) for u in spec.units]  # hope+level_...
        keys = []
        for unit, weight in zip(spec.units, weights, strict=True):
            key = f"{spec.name}/{unit}"
            est = measured.get(key, spec.minutes * 60 * weight / sum(weights))
            unit_args = (*args, spec.unit_flag, unit)
            parts.append(Part(key, spec.name, unit_args, est, unit, spec.unit_flag))
            keys.append(key)
        # The full command, naming its units: it needs exactly the units stored above.
        full = (*args, spec.unit_flag, *spec.units)
        est = measured.get(spec.name, ASSEMBLE_MINUTES * 60)
        parts.append(Part(spec.name, spec.name, full, est, None, spec.unit_flag, tuple(keys)))
    return sorted(_order_after(parts), key=lambda p: (p.assembles, -p.estimate_s))


def _order_after(parts: list[Part]) -> list[Part]:
    """Each part of an experiment in :data:`FOLLOWS` waits for the planned part it starts from:
    the same model's unit (``hope+level_periods`` starts from ``hope``), or the whole experiment
    when either runs unsplit. Parts not in the plan (``--only``) impose nothing."""
    keys = {p.key for p in parts}
    ordered = []
    for part in parts:
        source = FOLLOWS.get(part.experiment)
        if source is None or part.assembles:
            ordered.append(part)
            continue
        unit_key = f"{source}/{part.unit.split('+')[0]}" if part.unit else None
        after = unit_key if unit_key in keys else source if source in keys else None
        ordered.append(dataclasses.replace(part, after=(after,)) if after else part)
    return ordered


def assemble_args(part: Part, succeeded: Sequence[str]) -> tuple[str, ...] | None:
    """The assembling command once its units ran: the full command (``--models`` every unit)
    when all succeeded, the command for those that did when some failed, None when none did."""
    units = [key.split("/", 1)[1] for key in part.requires]
    ok = [u for u in units if f"{part.experiment}/{u}" in succeeded]
    if len(ok) == len(units):
        return part.args
    if not ok:
        return None
    return (*part.args[: -len(units) - 1], part.unit_flag, *ok)
