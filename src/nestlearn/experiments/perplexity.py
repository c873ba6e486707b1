"""Language modelling at equal tokens: perplexity and bits per byte of several models, with the
validation curve, over seeds, in three scoring protocols, in and out of the training domain.

``nestlearn experiment perplexity [--preset tiny|cpu|paper] [--models hope transformer ...]
[--seeds N] [--checkpoints RUN ...] [--modes chunks sliding streaming] [--source TEXT]
[--out DIR]``.

Each ``--models`` entry (an architecture trained from the ``--base`` config, or a named config
such as ``tiny``) is trained once per seed into ``OUT/runs/NAME/seedK`` on the same token stream
(same data, tokenizer, batches and budget; :mod:`nestlearn.experiments.lm_runs`). Architectures
get equal parameter counts (``--equal-params``, default on): each one's MLP width is chosen so its
count is nearest that of ``--params-like`` (default hope). Every (model, seed) is one unit
(:mod:`nestlearn.experiments.units`): a rerun reuses it, and a run folder left by a killed
process is resumed from its checkpoint. ``--checkpoints`` are scored as they are (one seed).

Scores per run: the validation curve (loss vs tokens at every ``train.eval_every`` steps, from
the run's ``metrics.jsonl``), then the held-out text (``--source``, or the run's validation
split; its first ``--max-tokens`` + 1 tokens) in each mode (:mod:`nestlearn.eval.streaming`):
``chunks`` (independent windows), ``sliding`` (windows advancing by ``--stride``, new tokens
only) and ``streaming`` (the recurrent state carried through the whole text; a model with a
context limit streams only text that fits, otherwise the row says it did not run); and an
out-of-domain text in chunks (``--ood-source``, default: the English prose of
``pydoc_data.topics`` against a corpus of Python source). Headline numbers (``summary``, mean ±
std over seeds): ``val_ppl``, ``val_bpb`` (chunks), ``ood_ppl``, ``ood_bpb``. Writes
``result.json``, ``results.md``, ``curves.png`` and ``perplexity.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from nestlearn.config.schema import RunConfig
from nestlearn.errors import ConfigError, RunLockedError
from nestlearn.eval.figures import plot_bars, plot_curves
from nestlearn.eval.results import write_result
from nestlearn.eval.streaming import MODES
from nestlearn.experiments import lm_runs
from nestlearn.experiments.model_source import add_run_args, apply_preset, setup
from nestlearn.experiments.seeds import format_spread, seeds_label, spread
from nestlearn.experiments.units import run_unit, unit_settings
from nestlearn.train.checkpoint_folders import checkpoint_step, list_checkpoints

DEFAULT_MODELS = ("hope", "hope_attention", "titans_lmm", "gated_deltanet", "transformer")
METRICS = lm_runs.METRICS
LOCK_POLL_SECONDS = 10.0
# The suite's LM protocol (docs/experiments.md): byte-level stdlib, 2 blocks of width 64, 1024
# tokens a step; sized so 5 models x 3 seeds cost about 35 CPU-minutes at --threads 1.
CPU_SETS = (
    "model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=128",
    "data.max_bytes=2000000", "train.seq_len=128", "train.batch_size=8", "optim.lr=3e-3",
    "optim.warmup_steps=20", "train.log_every=10", "eval.batch_size=16", "eval.max_tokens=4096",
)  # fmt: skip
PRESETS: dict[str, dict[str, Any]] = {
    # Today's quick defaults: the debug config, 100 steps, one seed.
    "tiny": {"base": "debug", "steps": 100, "max_tokens": 8192, "eval_points": 2},
    "cpu": dict(
        base="debug", steps=400, max_tokens=8192, eval_points=8, n_seeds=3, preset_sets=CPU_SETS
    ),
    # GPU-scale protocol (not run here): the 760M configs, 30B tokens at 0.5M tokens a step.
    "paper": dict(base="760m", steps=57220, max_tokens=262144, eval_points=20, n_seeds=3),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nestlearn experiment perplexity", description=__doc__)
    parser.add_argument(
        "--preset", default="tiny", choices=list(PRESETS),
        help="scale: tiny (seconds), cpu (the suite's, ~35 CPU-minutes, 3 seeds) or paper "
        "(GPU); any flag given overrides the preset",
    )  # fmt: skip
    parser.add_argument(
        "--models", nargs="+", default=None, metavar="NAME",
        help="named configs or architectures to train first (default: "
        f"{' '.join(DEFAULT_MODELS)}, unless --checkpoints are given)",
    )  # fmt: skip
    parser.add_argument("--checkpoints", nargs="+", default=[], metavar="RUN")
    parser.add_argument("--base", help="config an architecture is trained from (preset's)")
    parser.add_argument("--steps", type=int, help="training steps per model (preset's)")
    parser.add_argument(
        "--eval-points", type=int,
        help="validation points on the curve (train.eval_every = steps / N; preset's)",
    )  # fmt: skip
    parser.add_argument(
        "--equal-params", action=argparse.BooleanOptionalAction, default=True,
        help="choose each architecture's MLP width so its parameter count is nearest the "
        "--params-like model's (default on)",
    )  # fmt: skip
    parser.add_argument(
        "--params-like", default=DEFAULT_MODELS[0], metavar="ARCH",
        help=f"the architecture whose parameter count the others match ({DEFAULT_MODELS[0]})",
    )  # fmt: skip
    parser.add_argument(
        "--set", action="append", default=[], dest="sets", metavar="SECTION.KEY=VALUE",
        help="config override for every trained model (e.g. model.d_model=64); repeatable",
    )  # fmt: skip
    parser.add_argument("--source", help="text to score (default: each run's validation split)")
    parser.add_argument(
        "--ood-source", help="out-of-domain text file (default: pydoc_data.topics prose)"
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--window", type=int, default=0, help="window (0 = the run's seq_len)")
    parser.add_argument("--stride", type=int, default=0, help="sliding stride (0 = window / 2)")
    parser.add_argument("--chunk", type=int, default=256, help="tokens per streaming call")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    parser.add_argument(
        "--max-tokens", type=int, help="score the first N+1 tokens (0 = all; preset's)"
    )
    parser.add_argument("--fresh", action="store_true", help="recompute stored units")
    add_run_args(parser, "runs/experiments/perplexity")
    parser.set_defaults(preset_sets=None)
    return parser


def main(argv: list[str]) -> int:
    args = apply_preset(build_parser().parse_args(argv), PRESETS)
    args.preset_sets = list(getattr(args, "preset_sets", None) or [])
    if args.models is None:
        args.models = [] if args.checkpoints else list(DEFAULT_MODELS)
    if not args.models and not args.checkpoints:
        raise ConfigError("nothing to score: give --models and/or --checkpoints")
    if args.steps < 1 or args.eval_points < 1:
        raise ConfigError("--steps and --eval-points must be >= 1")
    device = setup(args)
    out = Path(args.out)
    configs = run_configs(args, args.models, seed=0, out=out)  # the widths, once for all seeds
    widths = equal_widths(args, configs)
    results = []
    for name in args.models:
        stem = Path(name).stem
        for seed in args.seeds:
            settings = unit_settings(args, model=stem, seed=seed, width=widths.get(stem, {}))
            settings.pop("checkpoints", None)

            def compute(name=name, seed=seed) -> dict[str, Any]:
                cfg = cfg_of(args, name, seed, out, widths)
                record = lm_runs.train_and_score(args, cfg, Path(name).stem, seed)
                return {**record, "width": widths.get(Path(name).stem, {})}

            record = run_unit(out, f"{stem}-seed{seed}", settings, compute, fresh=args.fresh)
            results.append(record)
            print(unit_line(record))
    for path in args.checkpoints:
        record = lm_runs.score_run(args, Path(path), Path(path).name, seed=None, device=device)
        results.append(record)
        print(unit_line(record))
    write_tables(args, out, results)
    return 0


def pretrained_run(
    out: Path, name: str, seed: int, *, preset: str = "cpu", device: str = "auto"
) -> Path:
    """The run folder of architecture ``name`` at ``seed`` of ``nestlearn experiment perplexity
    --preset PRESET --out OUT`` (the default models, equal widths), trained there first when it
    is missing or unfinished (reused when finished; :func:`lm_runs.train_run`): the pretrained
    start of the continual-learning experiment."""
    args = apply_preset(
        build_parser().parse_args(["--preset", preset, "--out", str(out), "--no-progress"]),
        PRESETS,
    )
    args.preset_sets = list(getattr(args, "preset_sets", None) or [])
    args.device = device
    if name not in DEFAULT_MODELS:
        raise ConfigError(
            f"{name}: the perplexity experiment trains only {', '.join(DEFAULT_MODELS)}; "
            "start it fresh (--pretrained none) instead"
        )
    widths = equal_widths(args, run_configs(args, list(DEFAULT_MODELS), seed=0, out=out))
    cfg = cfg_of(args, name, seed, out, widths)
    run_dir = Path(cfg.train.out_dir)
    # Another process may be training the same run (the suite's ``hope`` and
    # ``hope+level_periods`` continual units share it): wait for it, then reuse its result.
    while not finished_run(run_dir, cfg):
        try:
            lm_runs.train_run(cfg)
            break
        except RunLockedError as busy:
            print(f"waiting for the pretrained run: {busy}", flush=True)
            time.sleep(LOCK_POLL_SECONDS)
    return run_dir


def finished_run(run_dir: Path, cfg: RunConfig) -> bool:
    """True if ``run_dir`` holds ``cfg``'s run with a checkpoint at its last step (read only: a
    finished run is reused without taking its lock)."""
    found = list_checkpoints(run_dir)
    return (
        bool(found)
        and checkpoint_step(found[-1]) >= cfg.train.steps
        and (lm_runs.same_run(run_dir, cfg))
    )


def run_configs(args: argparse.Namespace, names: list[str], seed: int, out: Path) -> dict:
    """Per model name, its run config for ``seed`` (before width equalization)."""
    configs = {}
    for name in names:
        stem = Path(name).stem
        configs[stem] = lm_runs.run_config(
            name, base=args.base, seed=seed, steps=args.steps,
            run_dir=out / "runs" / stem / f"seed{seed}",
            sets=[*args.preset_sets, *args.sets], train=_eval_every(args),
            progress=not args.no_progress, device=args.device,
        )  # fmt: skip
    return configs


def cfg_of(args: argparse.Namespace, name: str, seed: int, out: Path, widths: dict):
    """The run config of model ``name`` at ``seed``, with its equalized width."""
    stem = Path(name).stem
    return lm_runs.run_config(
        name, base=args.base, seed=seed, steps=args.steps,
        run_dir=out / "runs" / stem / f"seed{seed}", sets=[*args.preset_sets, *args.sets],
        model=widths.get(stem, {}), train=_eval_every(args), progress=not args.no_progress,
        device=args.device,
    )  # fmt: skip


def _eval_every(args: argparse.Namespace) -> dict[str, int]:
    every = max(1, args.steps // args.eval_points)
    return {"eval_every": every, "ckpt_every": every}


def equal_widths(args: argparse.Namespace, configs: dict) -> dict[str, dict[str, int]]:
    """The MLP widths that give every architecture ``--params-like``'s parameter count (printed
    with the counts; the same whichever ``--models`` a process runs, so units run in pieces
    match); none with ``--no-equal-params``."""
    arch = {n: c for n, c in configs.items() if lm_runs.is_architecture(n)}
    if not args.equal_params or not arch:
        return {}
    ref = args.params_like
    if not lm_runs.is_architecture(ref):
        raise ConfigError(f"--params-like {ref}: expected an architecture (e.g. hope)")
    target = lm_runs.parameter_count(
        run_configs(args, [ref], seed=0, out=Path(args.out))[ref].model
    )
    widths = lm_runs.equalize_widths({n: c for n, c in arch.items() if n != ref}, target)
    counts = {
        n: lm_runs.parameter_count(dataclasses.replace(c.model, **widths.get(n, {})))
        for n, c in arch.items()
    }
    listed = ", ".join(f"{n} {counts[n]:,} {widths.get(n, '')}".rstrip() for n in counts)
    print(f"equal parameters (target {target:,}, {ref}'s): {listed}")
    return widths


def unit_line(record: dict[str, Any]) -> str:
    """One printed line per unit."""
    head = f"{record['model']} seed {record.get('seed')}"
    if record.get("failed"):
        return f"{head}: failed ({record['failed']})"
    parts = [f"{k} {record[k]:.4f}" for k in METRICS if record.get(k) is not None]
    reused = " (stored)" if record.get("reused") else ""
    return f"{head}: {', '.join(parts)}, params {record.get('params'):,}{reused}"


def write_tables(args: argparse.Namespace, out: Path, results: list[dict[str, Any]]) -> None:
    """``result.json`` (every seed in ``results``, mean ± std in ``summary``), ``results.md``,
    ``curves.png`` (validation loss vs tokens, ± std band) and ``perplexity.png`` (bits/byte)."""
    labels = list(dict.fromkeys(r["model"] for r in results))
    by_model = {m: [r for r in results if r["model"] == m] for m in labels}
    summary = {
        m: {k: spread([r.get(k) for r in rs]) for k in METRICS} for m, rs in by_model.items()
    }
    rows, bars, bar_err, curves, curve_err = [], {}, {}, {}, {}
    for m, rs in by_model.items():
        params = next((r.get("params") for r in rs if r.get("params")), None)
        row = [m, params, len(rs), *(format_spread(summary[m][k], 4) for k in METRICS)]
        bars[m], bar_err[m] = {}, {}
        for mode in args.modes:
            stat = spread([(r.get("modes") or {}).get(mode, {}).get("bpb") for r in rs])
            bars[m][mode], bar_err[m][mode] = stat["mean"], stat["std"]
            row.append(format_spread(stat, 4))
        rows.append(row)
        stat = summary[m]["ood_bpb"]
        bars[m]["out of domain"], bar_err[m]["out of domain"] = stat["mean"], stat["std"]
        xs, ys, es = mean_curve([r.get("curve") or [] for r in rs])
        curves[m], curve_err[m] = (xs, ys), es
    headers = ["model", "params", "seeds", "val ppl", "val bits/byte", "ood ppl", "ood bits/byte"]
    headers += [f"{mode} bits/byte" for mode in args.modes]
    out.mkdir(parents=True, exist_ok=True)
    label = seeds_label(args.seeds)
    plot_curves({"validation": curves}, out / "curves.png", xlabel="training tokens",
                ylabel="validation loss (nats/token)", title=f"Equal tokens, {label}",
                ylim=None, errors={"validation": curve_err})  # fmt: skip
    plot_bars(bars, out / "perplexity.png", ylabel="bits per byte (lower is better)",
              title=f"Perplexity protocols, {label}", errors=bar_err)  # fmt: skip
    path = write_result(
        out, "perplexity", args=vars(args), headers=headers, rows=rows,
        figures=["curves.png", "perplexity.png"], results=results, summary=summary,
        title=f"Language modelling at equal tokens ({label})",
    )  # fmt: skip
    print(f"wrote {path}, {out / 'results.md'}, {out / 'curves.png'}, {out / 'perplexity.png'}")


def mean_curve(curves: list[list[dict[str, float]]]) -> tuple[list, list, list]:
    """Tokens, mean loss and its std over seeds at the steps every curve has."""
    if not any(curves):
        return [], [], []
    steps = sorted(set.intersection(*({p["step"] for p in c} for c in curves if c)))
    xs, ys, es = [], [], []
    for step in steps:
        points = [next(p for p in c if p["step"] == step) for c in curves if c]
        stat = spread([p["loss"] for p in points])
        xs.append(points[0]["tokens"])
        ys.append(stat["mean"])
        es.append(stat["std"])
    return xs, ys, es
