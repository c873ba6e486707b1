"""HOPE's ablations (SPEC §5, paper Table 6): full HOPE and each ablated variant trained on the
same tokens over seeds; Δ perplexity against full HOPE with its spread.

``nestlearn experiment ablations [--preset tiny|cpu|paper] [--variants full no_dgd ...]
[--seeds N] [--out DIR]``.

Every variant is HOPE (``model.name=hope`` on ``--base``) with the ``model.*`` fields of
:data:`VARIANTS`; every (variant, seed) is one unit (:mod:`nestlearn.experiments.units`), trained
into ``OUT/runs/VARIANT/seedK`` and scored by :mod:`nestlearn.experiments.lm_runs` (the code of
``nestlearn experiment perplexity``): validation curve, held-out perplexity and bits per byte
(chunks of the training window), and the out-of-domain text. Runs of one seed see the same
batches in the same order, so the effect of a variant is measured paired:
``Δ_s = ppl(variant, s) − ppl(full, s)`` per seed ``s``, reported as mean ± std over seeds
(positive: the ablation hurts, as the paper reports for each). ``--variants`` runs a subset
into the same ``--out``; Δ then uses the stored full-HOPE units (missing until ``full`` ran).
Writes ``result.json`` (``summary[variant]``: ``val_ppl``, ``val_bpb``, ``ood_ppl``,
``ood_bpb``, ``delta_ppl``, ``delta_bpb``), ``results.md`` and ``ablations.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from nestlearn.errors import ConfigError
from nestlearn.eval.figures import plot_bars
from nestlearn.eval.results import write_result
from nestlearn.experiments import lm_runs
from nestlearn.experiments.model_source import add_run_args, apply_preset, setup
from nestlearn.experiments.seeds import format_spread, seeds_label, spread
from nestlearn.experiments.units import load_unit, run_unit, unit_settings
from nestlearn.models.hope import cms_hidden

FULL = "full"
# A CMS level longer than any sequence never updates in context: one plain MLP (as wide as
# full HOPE's levels together, set in run_cfg, so the parameter count stays that of full HOPE).
NEVER = 1 << 30
# variant -> (HopeConfig / CMSFields overrides, what it ablates; paper Table 6 ppl where given,
# full HOPE 12.24).
VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    FULL: ({}, "full HOPE (12.24)"),
    "no_dgd": ({"sm_dgd": False}, "plain GD instead of DGD (w/o DGD 13.41)"),
    "no_momentum": ({"sm_momentum": False}, "no inner momentum (13.58)"),
    "no_retention": ({"sm_retention": False}, "no retention α (w/o weight decay 13.71)"),
    "no_cms": (
        {"cms_chunk_sizes": [NEVER], "cms_lrs": [0.5]},  # cms_hidden: full HOPE's total
        "one MLP level that never updates in context (w/o CMS 13.04)",
    ),
    "fixed_k": ({"fixed_k": True}, "k from a fixed projection (w/o inner k 13.77)"),
    "fixed_v": ({"fixed_v": True}, "v from a fixed projection (w/o inner v 13.90)"),
    "fixed_eta_alpha": (
        {"fixed_eta": True, "fixed_alpha": True},
        "η, α from fixed linear maps of x instead of M_η, M_α",
    ),
    "chunk_start": ({"read": "chunk_start"}, "M_mem read at the chunk-start state"),
    "cms_local": ({"cms_objective": "local"}, "CMS levels learn a local objective, not teach"),
    "cms_nested": ({"cms_variant": "nested"}, "CMS variant nested (default sequential)"),
    "cms_independent": ({"cms_variant": "independent"}, "CMS variant independent"),
    "cms_plain_step": (
        {"cms_step": "plain"},
        "CMS plain summed step (the paper's NL-31), not normalized by 1/(1+E)",
    ),
}
DELTAS = ("delta_ppl", "delta_bpb")
# The suite's size: HOPE of width 32, 2 blocks, 512 byte tokens a step; sized so 13 variants x 3
# seeds cost about 40 CPU-minutes at --threads 1 (docs/experiments.md).
CPU_SETS = (
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64",
    "model.chunk_size=32", "model.other_chunk_size=16", "model.cms_chunk_sizes=[32,8]",
    "data.max_bytes=2000000", "train.seq_len=64", "train.batch_size=8", "optim.lr=3e-3",
    "optim.warmup_steps=10", "train.log_every=10", "eval.batch_size=16", "eval.max_tokens=2048",
)  # fmt: skip
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"base": "debug", "steps": 40, "max_tokens": 2048, "eval_points": 2},
    "cpu": {
        "base": "debug",
        "steps": 150,
        "max_tokens": 4096,
        "eval_points": 5,
        "n_seeds": 3,
        "preset_sets": CPU_SETS,
    },
    # GPU-scale protocol (not run here): the 760M HOPE, 30B tokens at 0.5M tokens a step.
    "paper": {
        "base": "hope-760m",
        "steps": 57220,
        "max_tokens": 262144,
        "eval_points": 20,
        "n_seeds": 3,
    },
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nestlearn experiment ablations", description=__doc__)
    parser.add_argument(
        "--preset", default="tiny", choices=list(PRESETS),
        help="scale: tiny (seconds), cpu (the suite's, ~40 CPU-minutes, 3 seeds) or paper "
        "(GPU); any flag given overrides the preset",
    )  # fmt: skip
    parser.add_argument(
        "--variants", "--models", nargs="+", default=list(VARIANTS), metavar="NAME",
        dest="variants", help=f"variants to run (default all: {' '.join(VARIANTS)})",
    )  # fmt: skip
    parser.add_argument("--base", help="config HOPE is trained from (preset's)")
    parser.add_argument("--steps", type=int, help="training steps per run (preset's)")
    parser.add_argument("--eval-points", type=int, help="validation points on the curve (preset's)")
    parser.add_argument(
        "--set", action="append", default=[], dest="sets", metavar="SECTION.KEY=VALUE",
        help="config override for every run (e.g. model.d_model=64); repeatable",
    )  # fmt: skip
    parser.add_argument("--max-tokens", type=int, help="score the first N+1 tokens (preset's)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    parser.add_argument(
        "--ood-source", help="out-of-domain text file (default: pydoc_data.topics prose)"
    )
    parser.add_argument("--fresh", action="store_true", help="recompute stored units")
    add_run_args(parser, "runs/experiments/ablations")
    # Scoring as perplexity's chunks mode on the validation split (lm_runs.score_run's flags).
    parser.set_defaults(
        preset_sets=None, modes=[], source=None, window=0, stride=0, chunk=256
    )  # fmt: skip
    return parser


def variant_overrides(name: str) -> dict[str, Any]:
    """The ``model.*`` overrides of variant ``name`` (a ConfigError naming the choices)."""
    if name not in VARIANTS:
        raise ConfigError(f"--variants {name}: unknown; choose from {', '.join(VARIANTS)}")
    return dict(VARIANTS[name][0])


def run_cfg(args: argparse.Namespace, name: str, seed: int, out: Path):
    """The run config of variant ``name`` at ``seed``: HOPE on ``--base`` plus its fields
    (``no_cms``: its one level as wide as full HOPE's levels together, so the same parameters)."""
    every = max(1, args.steps // args.eval_points)

    def config(model: dict[str, Any]):
        return lm_runs.run_config(
            "hope", base=args.base, seed=seed, steps=args.steps,
            run_dir=out / "runs" / name / f"seed{seed}", sets=[*args.preset_sets, *args.sets],
            model=model, train={"eval_every": every, "ckpt_every": every},
            progress=not args.no_progress, device=args.device,
        )  # fmt: skip

    overrides = variant_overrides(name)
    if name == "no_cms":
        full = config({}).model
        overrides["cms_hidden"] = cms_hidden(full, full.d_model) * len(full.cms_chunk_sizes)
    return config(overrides)


def settings_of(args: argparse.Namespace, name: str, seed: int) -> dict[str, Any]:
    settings = unit_settings(args, variant=name, seed=seed, overrides=variant_overrides(name))
    settings.pop("variants", None)
    return settings


def main(argv: list[str]) -> int:
    args = apply_preset(build_parser().parse_args(argv), PRESETS)
    args.preset_sets = list(args.preset_sets or [])
    for name in args.variants:
        variant_overrides(name)
    if args.steps < 1 or args.eval_points < 1:
        raise ConfigError("--steps and --eval-points must be >= 1")
    setup(args)
    out = Path(args.out)
    for name in args.variants:  # fail fast on a field this HOPE does not have
        run_cfg(args, name, args.seeds[0], out)
    records: dict[tuple[str, int], dict[str, Any]] = {}
    for name in args.variants:
        for seed in args.seeds:

            def compute(name=name, seed=seed) -> dict[str, Any]:
                cfg = run_cfg(args, name, seed, out)
                return lm_runs.train_and_score(args, cfg, name, seed)

            record = run_unit(
                out, f"{name}-seed{seed}", settings_of(args, name, seed), compute,
                fresh=args.fresh,
            )  # fmt: skip
            records[name, seed] = {**record, "variant": name, "model": name, "seed": seed}
            print(_line(records[name, seed]))
    for seed in args.seeds:  # Δ against full HOPE of the same seed, stored by an earlier run
        if (FULL, seed) not in records:
            stored = load_unit(out, f"{FULL}-seed{seed}", settings_of(args, FULL, seed))
            if stored is not None:
                records[FULL, seed] = {**stored, "variant": FULL, "model": FULL, "seed": seed}
    add_deltas(records)
    write_tables(args, out, records)
    return 0


def add_deltas(records: dict[tuple[str, int], dict[str, Any]]) -> None:
    """``delta_ppl``, ``delta_bpb`` of every record: minus the same seed's full HOPE (None
    where either is missing)."""
    for (_, seed), record in records.items():
        full = records.get((FULL, seed))
        for delta, key in zip(DELTAS, ("val_ppl", "val_bpb"), strict=True):
            a, b = record.get(key), None if full is None else full.get(key)
            record[delta] = None if a is None or b is None else a - b


def summarize(records: dict[tuple[str, int], dict[str, Any]], seeds: list[int]) -> dict:
    """``{variant: {metric: spread over seeds}}`` for every metric and Δ."""
    names = list(dict.fromkeys(name for name, _ in records))
    keys = (*lm_runs.METRICS, *DELTAS)
    return {
        name: {k: spread([records.get((name, s), {}).get(k) for s in seeds]) for k in keys}
        for name in names
    }


def write_tables(args: argparse.Namespace, out: Path, records: dict) -> None:
    """``result.json`` (every seed's record, summary with Δ spreads), ``results.md``,
    ``ablations.png`` (Δ perplexity per variant, ± std over seeds)."""
    summary = summarize(records, args.seeds)
    rows, bars, errors = [], {}, {}
    for name, stat in summary.items():
        cells = [("val_ppl", 3), ("delta_ppl", 3), ("val_bpb", 4), ("delta_bpb", 4),
                 ("ood_bpb", 4)]  # fmt: skip
        rows.append([name, VARIANTS[name][1], *(format_spread(stat[k], d) for k, d in cells)])
        if name != FULL:
            bars[name] = {"Δ ppl": stat["delta_ppl"]["mean"]}
            errors[name] = {"Δ ppl": stat["delta_ppl"]["std"]}
    headers = ["variant", "ablates", "val ppl", "Δ ppl", "val bits/byte", "Δ bits/byte",
               "ood bits/byte"]  # fmt: skip
    label = seeds_label(args.seeds)
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    if bars:
        plot_bars(bars, out / "ablations.png", errors=errors, symlog=1.0,
                  ylabel="Δ perplexity vs full HOPE (> 0: hurts; symlog)",
                  title=f"HOPE ablations, {label}")  # fmt: skip
        figures.append("ablations.png")
    results = [records[k] for k in sorted(records, key=lambda k: (list(VARIANTS).index(k[0]),
                                                                   k[1]))]  # fmt: skip
    path = write_result(
        out, "ablations", args=vars(args), headers=headers, rows=rows, figures=figures,
        results=results, summary=summary, title=f"HOPE ablations (Table 6), {label}",
    )  # fmt: skip
    print(f"wrote {path}, {out / 'results.md'}")


def _line(record: dict[str, Any]) -> str:
    head = f"{record['variant']} seed {record['seed']}"
    if record.get("failed"):
        return f"{head}: failed ({record['failed']})"
    stored = " (stored)" if record.get("reused") else ""
    return f"{head}: val ppl {record['val_ppl']:.3f}, bits/byte {record['val_bpb']:.4f}{stored}"
