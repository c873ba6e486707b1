"""MQAR: train each model on multi-query associative recall, then its accuracy per (T, pairs).

``nestlearn experiment mqar [--preset tiny|cpu|hard|paper] [--models hope transformer ...]
[--seeds N | --seed S ...] [--seq-lens 32 64] [--pairs 2 4 8] [--steps N] [--out DIR]``. Every
(model, seed) is one unit (:mod:`nestlearn.experiments.units`): trained and scored once, stored
under ``OUT/units/MODEL-seedS.json`` and reused by a rerun with the same settings, so the models
can run as separate processes into one ``--out`` and a final full command only assembles. Within
a seed every model sees the same training batches (one (T, pairs) setting per step, in turn) and
the same test sets; the protocol is in ``docs/experiments.md`` and :mod:`nestlearn.eval.mqar`.
Writes ``result.json`` (every seed's cells under ``results``; per model and cell the mean, std
and values over seeds under ``summary``), ``results.md`` (mean ± std) and ``mqar.png`` (accuracy
against the number of pairs, one panel per sequence length, a band of ± one std over seeds).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nestlearn.errors import ConfigError, DataError, NonFiniteLossError, NonFiniteMemoryError
from nestlearn.eval.figures import plot_curves
from nestlearn.eval.mqar import chance_accuracy, check_mqar, mqar_accuracy, mqar_batch
from nestlearn.eval.records import read_jsonl, write_jsonl
from nestlearn.eval.results import write_result
from nestlearn.eval.synthetic import IGNORE, SMALL_DEFAULTS, small_model, train_synthetic
from nestlearn.experiments.model_source import (
    add_architecture_args,
    add_run_args,
    apply_preset,
    model_overrides,
    setup,
)
from nestlearn.experiments.seeds import format_spread, seeds_label, spread
from nestlearn.experiments.units import run_unit, unit_path, unit_settings
from nestlearn.train.runtime import seed_everything

DEFAULT_MODELS = ("hope", "hope_attention", "titans_lmm", "gated_deltanet", "transformer")
# Defaults by scale. ``tiny`` shows the task learned in CPU minutes (measured in
# docs/experiments.md; it saturates: Transformer and Gated DeltaNet at 99.6-100%). ``cpu`` is the
# suite's size (every default model, 3 seeds, about 22 CPU-minutes at --threads 1): tiny's cells
# plus harder ones (16 pairs, a 128-token length not trained on). ``hard`` is the capacity
# setting where the models' states differ (d_model 32, up to 32 pairs, lengths to 256, trained
# long enough to learn it: hours on a CPU, minutes on a GPU). ``paper`` is the scale of Zoology's
# MQAR comparison (vocabulary 8,192, lengths to 512, up to 64 pairs, 1,000 test sequences a cell).
PRESETS: dict[str, dict[str, object]] = {
    "tiny": {
        "seq_lens": [32, 64], "pairs": [2, 4, 8], "vocab": 32, "steps": 1500, "batch_size": 32,
        "lr": 3e-3, "warmup": 150, "test_examples": 128, "d_model": 64,
    },
    "cpu": {
        "seq_lens": [32, 64, 128], "pairs": [2, 4, 8, 16], "train_seq_lens": [32, 64],
        "vocab": 40, "steps": 250, "batch_size": 32, "lr": 3e-3, "warmup": 25,
        "test_examples": 64, "d_model": 64, "n_seeds": 3,
    },
    "hard": {
        "seq_lens": [64, 128, 256], "pairs": [4, 8, 16, 32], "vocab": 128, "steps": 6000,
        "batch_size": 32, "lr": 3e-3, "warmup": 300, "test_examples": 256, "d_model": 32,
        "n_seeds": 3,
    },
    "paper": {
        "seq_lens": [64, 128, 256, 512], "pairs": [4, 8, 16, 32, 64], "vocab": 8192,
        "steps": 20000, "batch_size": 64, "lr": 1e-3, "warmup": 1000, "test_examples": 1000,
        "d_model": 128,
    },
}  # fmt: skip
TEST_SCHEMA = {
    "inputs": ((list,), True),
    "targets": ((list,), True),
    "n_pairs": ((int,), True),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nestlearn experiment mqar", description=__doc__)
    add_architecture_args(parser, DEFAULT_MODELS)
    parser.add_argument(
        "--preset", default="tiny", choices=list(PRESETS),
        help="scale of the defaults below: tiny (CPU minutes, one seed), cpu (the suite's size: "
        "harder cells, 3 seeds), hard (small state, many pairs: a long run) or paper (Zoology's "
        "scale, a GPU run); any flag given overrides the preset",
    )  # fmt: skip
    parser.add_argument("--seq-lens", nargs="+", type=int, metavar="T")
    parser.add_argument("--pairs", nargs="+", type=int, metavar="P")
    parser.add_argument(
        "--train-seq-lens", nargs="+", type=int, metavar="T",
        help="train only on these lengths (default: all --seq-lens); longer test lengths then "
        "measure extrapolation",
    )  # fmt: skip
    parser.add_argument("--vocab", type=int, help="vocabulary (keys | values halves)")
    parser.add_argument("--steps", type=int, help="training steps per model")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float, help="peak AdamW learning rate")
    parser.add_argument("--warmup", type=int, help="linear warmup steps")
    parser.add_argument("--test-examples", type=int, help="test sequences per cell")
    parser.add_argument(
        "--test-file", type=Path,
        help="score on these test sequences instead (JSONL: inputs, targets with -100 where not "
        "scored, n_pairs)",
    )  # fmt: skip
    parser.add_argument("--save-test", type=Path, help="write the generated test sets as JSONL")
    add_run_args(parser, "runs/experiments/mqar")
    return parser


def _cells(args: argparse.Namespace) -> list[tuple[int, int]]:
    cells = [(t, p) for t in args.seq_lens for p in args.pairs if t >= 4 * p]
    if not cells:
        raise ConfigError(
            f"no (T, pairs) setting has T >= 4 * pairs (T: {args.seq_lens}, pairs: {args.pairs});"
            " use longer --seq-lens or fewer --pairs"
        )
    for t, p in cells:
        try:
            check_mqar(t, p, args.vocab)
        except ValueError as exc:
            raise ConfigError(f"MQAR setting T={t}, pairs={p}: {exc}") from None
    return cells


def _test_sets(
    args, cells, seed: int
) -> dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]]:
    """The same test batches for every model of a seed: generated per cell, seeded by ``(seed,
    T, P)``, or read from ``--test-file`` (the same for every seed)."""
    if args.test_file:
        return _read_test_file(args.test_file, args.vocab, args.batch_size)
    sets = {}
    for t, p in cells:
        g = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * t + p + 1)
        inputs, targets = mqar_batch(args.test_examples, t, p, args.vocab, g)
        sets[t, p] = _batches(inputs, targets, args.batch_size)
    return sets


def _batches(inputs: torch.Tensor, targets: torch.Tensor, size: int):
    return list(zip(inputs.split(size), targets.split(size), strict=True))


def _read_test_file(path: Path, vocab: int, batch_size: int):
    groups: dict[tuple[int, int], list[tuple[list[int], list[int]]]] = {}
    for i, rec in enumerate(read_jsonl(path, TEST_SCHEMA), start=1):
        where = f"{path} record {i}"
        inputs, targets = rec["inputs"], rec["targets"]
        if len(inputs) != len(targets) or not inputs:
            raise DataError(f"{where}: 'inputs' and 'targets' need the same non-zero length")
        if not all(isinstance(x, int) and 0 <= x < vocab for x in inputs):
            raise DataError(f"{where}: field 'inputs' must hold ids in [0, {vocab}) (--vocab)")
        if not all(isinstance(y, int) and (y == IGNORE or 0 <= y < vocab) for y in targets):
            raise DataError(
                f"{where}: field 'targets' must hold ids in [0, {vocab}) or {IGNORE} (not scored)"
            )
        groups.setdefault((len(inputs), rec["n_pairs"]), []).append((inputs, targets))
    sets = {}
    for cell, rows in sorted(groups.items()):
        inputs = torch.tensor([r[0] for r in rows])
        targets = torch.tensor([r[1] for r in rows])
        sets[cell] = _batches(inputs, targets, batch_size)
    return sets


def _train_and_test(name, seed, args, train_cells, tests, max_len, overrides, device) -> dict:
    """One unit: train a fresh ``name`` with ``seed`` on the training settings in turn, then score
    every test cell. A model whose loss goes non-finite has its cells reported as not run
    (``None``), with the reason under ``diverged``."""
    seed_everything(seed)
    model = small_model(
        name, vocab_size=args.vocab, max_seq_len=max_len, d_model=args.d_model,
        n_layers=args.n_layers, n_heads=args.n_heads, overrides=overrides, seed=seed,
    ).to(device)  # fmt: skip
    record = {"model": name, "seed": seed, "params": sum(p.numel() for p in model.parameters())}
    g = torch.Generator().manual_seed(seed)

    def sample(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        t, p = train_cells[step % len(train_cells)]
        return mqar_batch(args.batch_size, t, p, args.vocab, g)

    label = f"{name} seed {seed}"
    start = time.perf_counter()
    try:
        losses = train_synthetic(
            model, sample, steps=args.steps, lr=args.lr, warmup=args.warmup, device=device,
            desc=f"mqar {label}", progress=not args.no_progress,
        )  # fmt: skip
    except (NonFiniteLossError, NonFiniteMemoryError) as exc:
        print(f"{label}: {exc}; its cells are reported as not run")
        cells = [{"seq_len": t, "n_pairs": p, "accuracy": None} for t, p in tests]
        return {**record, "diverged": str(exc), "cells": cells}
    record["train_seconds"] = time.perf_counter() - start
    record["final_loss"] = sum(losses[-10:]) / len(losses[-10:]) if losses else None
    record["loss_curve"] = losses[:: max(1, len(losses) // 100)]
    start = time.perf_counter()
    bar = tqdm(tests, desc=f"test {label}", disable=args.no_progress, leave=False)
    scores = {cell: mqar_accuracy(model, tests[cell], device=device) for cell in bar}
    record["test_seconds"] = time.perf_counter() - start
    record["cells"] = [{"seq_len": t, "n_pairs": p, **score} for (t, p), score in scores.items()]
    best = max(score["accuracy"] for score in scores.values())
    print(
        f"{label}: {record['params']:,} params, {record['train_seconds']:.0f}s training, "
        f"best cell {best:.1%}"
    )
    return record


def cell_key(seq_len: int, n_pairs: int) -> str:
    """The summary's name of a test cell: ``"T=64,P=8"``."""
    return f"T={seq_len},P={n_pairs}"


def _accuracies(record: dict) -> dict[tuple[int, int], float | None]:
    return {(c["seq_len"], c["n_pairs"]): c["accuracy"] for c in record["cells"]}


def summarize(results: list[dict], models: list[str]) -> dict[str, dict[str, dict]]:
    """Per model, every cell's accuracy over seeds (``"T=64,P=8"``) and ``"accuracy"``: the mean
    over cells of each seed (missing for a seed that did not run every cell), as
    :func:`~nestlearn.experiments.seeds.spread` (mean, sample std, values)."""
    summary: dict[str, dict[str, dict]] = {}
    for name in models:
        runs = [r for r in results if r["model"] == name]
        cells = list(dict.fromkeys(cell for r in runs for cell in _accuracies(r)))
        metrics = {
            cell_key(t, p): spread([_accuracies(r).get((t, p)) for r in runs]) for t, p in cells
        }
        means = []
        for r in runs:
            acc = [_accuracies(r).get(cell) for cell in cells]
            means.append(None if not acc or None in acc else sum(acc) / len(acc))
        metrics["accuracy"] = spread(means)
        summary[name] = metrics
    return summary


def _table_and_panels(results, summary, models, train_lens):
    lens = sorted({c["seq_len"] for r in results for c in r["cells"]})
    pairs = sorted({c["n_pairs"] for r in results for c in r["cells"]})
    params = {r["model"]: r["params"] for r in results}
    headers = ["model", "params", "T", *[f"P={p} (%)" for p in pairs]]
    rows = [
        [name, params[name], t,
         *[format_spread(summary[name].get(cell_key(t, p)), digits=1, scale=100) for p in pairs]]
        for name in models
        for t in lens
    ]  # fmt: skip
    panels, errors = {}, {}
    for t in lens:
        panel = f"T = {t}" + ("" if t in train_lens else " (not trained)")
        panels[panel], errors[panel] = {}, {}
        for name in models:
            stats = [(p, summary[name].get(cell_key(t, p))) for p in pairs]
            stats = [(p, s) for p, s in stats if s is not None]
            panels[panel][name] = ([p for p, _ in stats], [s["mean"] for _, s in stats])
            errors[panel][name] = [s["std"] for _, s in stats]
    return headers, rows, panels, errors


def main(argv: list[str]) -> int:
    args = apply_preset(build_parser().parse_args(argv), PRESETS)
    device = setup(args)
    out = Path(args.out)
    cells = _cells(args)
    train_lens = args.train_seq_lens or args.seq_lens
    train_cells = [(t, p) for t in train_lens for p in args.pairs if t >= 4 * p]
    if not train_cells:
        raise ConfigError(
            f"no training setting has T >= 4 * pairs (T: {train_lens}); lengthen them"
        )
    for t, p in train_cells:
        check_mqar(t, p, args.vocab)
    first = _test_sets(args, cells, args.seed)
    if args.save_test:
        write_jsonl(
            args.save_test,
            [
                {"inputs": x.tolist(), "targets": y.tolist(), "n_pairs": p}
                for (_, p), batches in first.items()
                for xb, yb in batches
                for x, y in zip(xb, yb, strict=True)
            ],
        )
    max_len = max(max(t for t, _ in first), max(train_lens))
    overrides = model_overrides(args.models, args.sets)

    results = []
    for name in args.models:
        for seed in args.seeds:

            def compute(name=name, seed=seed) -> dict:
                tests = first if seed == args.seed else _test_sets(args, cells, seed)
                return _train_and_test(
                    name, seed, args, train_cells, tests, max_len, overrides[name], device
                )

            key = f"{name}-seed{seed}"
            settings = unit_settings(args, model=name, seed=seed, small=SMALL_DEFAULTS.get(name))
            record = run_unit(out, key, settings, compute)
            if record.pop("reused", False):
                print(f"{name} seed {seed}: reused {unit_path(out, key)}")
            results.append(record)

    summary = summarize(results, args.models)
    headers, rows, panels, errors = _table_and_panels(results, summary, args.models, train_lens)
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(
        panels, out / "mqar.png", xlabel="key-value pairs", ylabel="accuracy", logx=True,
        baseline=chance_accuracy(args.vocab), errors=errors,
        title=f"MQAR (vocab {args.vocab}, {args.steps} steps, d_model {args.d_model}; "
        f"{seeds_label(args.seeds)}, mean ± std)",
    )  # fmt: skip
    path = write_result(
        out, "mqar", args=vars(args), headers=headers, rows=rows, figures=["mqar.png"],
        results=results, summary=summary,
        title=f"MQAR accuracy (multi-query associative recall), {seeds_label(args.seeds)}",
    )  # fmt: skip
    print(f"wrote {path}, {out / 'results.md'}, {out / 'mqar.png'}")
    return 0
