"""Several models over several seeds, each (model, seed) one resumable unit: the plumbing that the
continual-learning and test-time-learning experiments share.

- :func:`add_comparison_args`: ``--models NAME ...`` (fresh models, default
  :data:`DEFAULT_MODELS`), or one model with ``--model NAME`` / ``--checkpoint DIR`` (as
  :func:`~nestlearn.experiments.model_source.add_model_args`), ``model.key=value`` overrides and,
  where the experiment trains with them, ``--level-periods SPEC``.
- A model token ``NAME+level_periods`` (e.g. ``hope+level_periods``) is NAME trained with its
  parameters stepped every ``p`` optimizer steps as ``train.level_periods=SPEC`` does in the
  trainer (:class:`~nestlearn.train.level_steps.LevelSteps`; ``cms``: CMS level ``l`` every
  ``C(l)`` steps, SPEC §4); tables call it ``NAME (level periods)``.
- Model sizes: a preset gives overrides for every fresh model (``default_overrides``, the fields a
  model lacks are skipped) and per architecture (``model_sizes``: chosen so that the models have
  about the same parameter count); ``model.key=value`` words on the command line replace both.
- :func:`run_units`: every (model, seed) through :func:`~nestlearn.experiments.units.run_unit`
  (key ``MODEL-seedS``), so a rerun reuses finished units and ``--models M`` runs only M's; a
  run that diverges (non-finite loss or memory) is stored as failed for that seed.
- :func:`summary_over_seeds`: ``{label: {metric: spread over seeds}}``, for
  ``write_result(summary=...)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nestlearn.errors import ConfigError, NonFiniteLossError, NonFiniteMemoryError
from nestlearn.experiments.model_source import ExperimentModel, fresh_model_config, model_from_args
from nestlearn.experiments.seeds import spread
from nestlearn.experiments.units import run_unit, unit_settings

DEFAULT_MODELS = ("hope", "hope_attention", "titans_lmm", "gated_deltanet", "transformer")
LEVEL_PERIODS = "+level_periods"
# Arguments that choose models; a unit's settings hold its own model's resolved values instead.
SELECTION_ARGS = frozenset(
    {"model", "models", "checkpoint", "overrides", "default_overrides", "model_sizes",
     "level_periods", "preset", "default_models"}
)  # fmt: skip


@dataclass(frozen=True)
class ModelSpec:
    """One row of a comparison: how to build the model and what to call it."""

    key: str  # command-line token and unit-key prefix ("hope", "hope+level_periods")
    label: str  # row name in tables and the summary ("hope (level periods)")
    name: str | None  # --model NAME / architecture of a fresh model; None for a checkpoint
    checkpoint: str | None = None
    overrides: tuple[str, ...] = ()  # model.key=value of the fresh model
    level_periods: str = ""  # train.level_periods spec; "" = off


def add_comparison_args(
    parser: argparse.ArgumentParser,
    default_models: Sequence[str] = DEFAULT_MODELS,
    *,
    level_periods: bool = False,
) -> None:
    """``--models``, ``--model``, ``--checkpoint``, ``model.key=value`` (and ``--level-periods``).

    ``default_overrides`` and ``model_sizes`` (a preset's model sizes) default to None so that
    :func:`~nestlearn.experiments.model_source.apply_preset` fills them."""
    group = parser.add_argument_group("models")
    group.add_argument(
        "--models", nargs="+", metavar="NAME", default=None,
        help="fresh models to compare, each a named config or an architecture (its NAME-tiny "
        "config); NAME+level_periods trains NAME with --level-periods (default: "
        f"{' '.join(default_models)})",
    )  # fmt: skip
    group.add_argument(
        "--model", default=None,
        help="one fresh model instead of --models (named config, .yaml or architecture)",
    )  # fmt: skip
    group.add_argument(
        "--checkpoint", help="one trained model instead of --models: run or checkpoint folder"
    )
    if level_periods:
        group.add_argument(
            "--level-periods", default="cms", metavar="SPEC",
            help="train.level_periods of the NAME+level_periods models: 'cms' (CMS level l "
            "stepped every C(l) optimizer steps) or 'glob=period' entries (default: cms)",
        )  # fmt: skip
    parser.add_argument(
        "overrides", nargs="*", metavar="model.key=value",
        help="fresh models' config overrides (each model takes the fields it has); they replace "
        "the preset's model sizes",
    )  # fmt: skip
    parser.set_defaults(
        default_models=list(default_models), default_overrides=None, model_sizes=None
    )


def model_fields(name: str) -> set[str]:
    """The ``model.*`` fields of the fresh model ``--model NAME`` builds."""
    from nestlearn.models.registry import model_config_class

    arch = fresh_model_config(name).name
    return {f.name for f in dataclasses.fields(model_config_class(arch))}


def _key(override: str) -> str:
    key, sep, _ = override.partition("=")
    if not sep or not key.startswith("model."):
        raise ConfigError(
            f"override '{override}' is not of the form model.key=value (e.g. model.d_model=64)"
        )
    return key.removeprefix("model.")


def _sizes(args: argparse.Namespace, name: str) -> tuple[str, ...]:
    """The overrides of fresh model ``name``: the command line's, else the preset's (shared, then
    per architecture), each kept only where the model has the field."""
    fields = model_fields(name)
    arch = fresh_model_config(name).name
    if args.overrides:
        chosen = list(args.overrides)
    else:
        chosen = [*(args.default_overrides or []), *(args.model_sizes or {}).get(arch, [])]
    return tuple(o for o in chosen if _key(o) in fields)


def _label(key: str) -> str:
    name = key.removesuffix(LEVEL_PERIODS)
    return f"{name} (level periods)" if key.endswith(LEVEL_PERIODS) else name


def model_specs(args: argparse.Namespace) -> list[ModelSpec]:
    """The rows this command runs (see the module docstring); raises :class:`ConfigError` on
    conflicting flags, unknown names or an override no chosen model has."""
    if args.models is not None:  # "--models a b model.k=v": the list swallows the overrides
        args.overrides = [*args.overrides, *(m for m in args.models if "=" in m)]
        args.models = [m for m in args.models if "=" not in m] or None
    chosen = [args.models is not None, args.model is not None, args.checkpoint is not None]
    if sum(chosen) > 1:
        raise ConfigError("give one of --models, --model and --checkpoint")
    spec_periods = getattr(args, "level_periods", None)
    if args.checkpoint is not None:
        if args.overrides:
            raise ConfigError(
                "model.* overrides apply to fresh models only; a checkpoint's model is fixed"
            )
        path = str(args.checkpoint)
        return [ModelSpec("checkpoint", path, None, checkpoint=path)]
    keys = [args.model] if args.model is not None else list(args.models or args.default_models)
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--models {' '.join(keys)}: a model is repeated")
    specs = []
    for key in keys:
        name = key.removesuffix(LEVEL_PERIODS)
        periods = ""
        if key.endswith(LEVEL_PERIODS):
            if spec_periods is None:
                raise ConfigError(f"{key}: this experiment takes no level periods; use {name}")
            periods = spec_periods
        specs.append(ModelSpec(key, _label(key), name, None, _sizes(args, name), periods))
    if args.overrides:
        kept = {_key(o) for s in specs for o in s.overrides}
        lost = [o for o in args.overrides if _key(o) not in kept]
        if lost:
            raise ConfigError(
                f"{' '.join(lost)}: none of the models {' '.join(keys)} has this field"
            )
    return specs


def build(spec: ModelSpec, args: argparse.Namespace, seed: int) -> ExperimentModel:
    """Spec ``spec``'s model for ``seed`` (fresh: initialised from the seed) on ``--device``,
    with ``--threads`` applied and every RNG seeded with ``seed``."""
    ns = argparse.Namespace(**vars(args))
    ns.seeds, ns.seed = [seed], seed
    ns.model, ns.checkpoint = spec.name, spec.checkpoint
    ns.overrides = [] if spec.checkpoint else list(spec.overrides)
    ns.default_overrides = []
    return model_from_args(ns)


def parameter_count(source: ExperimentModel) -> int:
    return sum(p.numel() for p in source.model.parameters())


def parameter_counts(
    records: Sequence[Mapping[str, Any]], specs: Sequence[ModelSpec]
) -> dict[str, int | None]:
    """Each row's parameter count, from its first record that has one (None if all failed)."""
    return {
        spec.label: next(
            (r["parameters"] for r in records if r["model"] == spec.label and "parameters" in r),
            None,
        )
        for spec in specs
    }


def settings_of(args: argparse.Namespace, spec: ModelSpec, seed: int) -> dict[str, Any]:
    """What determines unit (spec, seed): the protocol's flags and this model's own choices."""
    protocol = {k: v for k, v in vars(args).items() if k not in SELECTION_ARGS}
    return unit_settings(
        protocol, model=spec.key, seed=seed, checkpoint=spec.checkpoint,
        overrides=list(spec.overrides), level_periods=spec.level_periods,
    )  # fmt: skip


def run_units(
    args: argparse.Namespace,
    specs: Sequence[ModelSpec],
    compute: Callable[[ModelSpec, int], dict[str, Any]],
    experiment: str,
) -> list[dict[str, Any]]:
    """``compute(spec, seed)``'s record for every (spec, seed in ``args.seeds``), stored and
    reused under ``--out``/units; each record gets ``model`` (the label), ``seed``, ``seconds``
    (wall) and ``cpu_seconds``. A diverged run becomes ``{"model", "seed", "failed": ...}``."""
    out = Path(args.out)
    records = []
    for spec in specs:
        for seed in args.seeds:

            def unit(spec: ModelSpec = spec, seed: int = seed) -> dict[str, Any]:
                start, cpu = time.perf_counter(), time.process_time()
                try:
                    record = compute(spec, seed)
                except (NonFiniteLossError, NonFiniteMemoryError) as error:
                    record = {"failed": f"{type(error).__name__}: {error}"}
                seconds = time.perf_counter() - start
                cpu = time.process_time() - cpu  # CPU of this process (all its threads)
                return {"model": spec.label, "seed": seed, **record, "seconds": seconds,
                        "cpu_seconds": cpu}  # fmt: skip

            key = f"{spec.key}-seed{seed}"
            record = run_unit(out, key, settings_of(args, spec, seed), unit)
            done = "stored"
            if not record.get("reused"):
                done = f"{record['seconds']:.0f} s, {record['cpu_seconds']:.0f} s of CPU"
            state = f"failed: {record['failed']}" if record.get("failed") else "done"
            print(f"{experiment}: {spec.label} seed {seed} {state} ({done})", flush=True)
            records.append(record)
    return records


def summary_over_seeds(
    records: Sequence[Mapping[str, Any]],
    specs: Sequence[ModelSpec],
    metrics: Callable[[Mapping[str, Any]], Mapping[str, float | None]],
    keys: Sequence[str],
) -> dict[str, dict[str, Any]]:
    """``{label: {metric: spread over the label's seeds}}`` for every metric in ``keys``;
    ``metrics(record)`` gives a successful record's numbers (a failed seed counts as missing)."""
    summary: dict[str, dict[str, Any]] = {}
    for spec in specs:
        mine = [r for r in records if r["model"] == spec.label]
        values = [{} if r.get("failed") else metrics(r) for r in mine]
        summary[spec.label] = {k: spread([v.get(k) for v in values]) for k in keys}
    return summary
