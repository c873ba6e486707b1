"""MQAR: train each model on multi-query associative recall, then its accuracy per (T, pairs).

``nestlearn experiment mqar [--models transformer gated_deltanet ...] [--seq-lens 32 64]
[--pairs 2 4 8] [--steps N] [--out DIR]``. Every model sees the same training batches (one
(T, pairs) setting per step, in turn) and the same test sets; the protocol is in
``docs/experiments.md`` and :mod:`nestlearn.eval.mqar`. Writes ``result.json``, ``results.md``
and ``mqar.png`` (accuracy against the number of pairs, one panel per sequence length).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nestlearn.errors import ConfigError, DataError, NonFiniteLossError
from nestlearn.eval.figures import plot_curves
from nestlearn.eval.mqar import chance_accuracy, check_mqar, mqar_accuracy, mqar_batch
from nestlearn.eval.records import read_jsonl, write_jsonl
from nestlearn.eval.results import write_result
from nestlearn.eval.synthetic import IGNORE, small_model, train_synthetic
from nestlearn.experiments.model_source import (
    add_architecture_args,
    add_run_args,
    apply_preset,
    model_overrides,
    setup,
)

DEFAULT_MODELS = ("transformer", "gated_deltanet", "titans_lmm")
# Defaults by scale. ``tiny`` shows the task learned in CPU minutes (measured in
# docs/experiments.md); ``paper`` is the scale of Zoology's MQAR comparison (vocabulary 8,192,
# lengths to 512, up to 64 pairs, 1,000 test sequences per cell).
PRESETS: dict[str, dict[str, object]] = {
    "tiny": {
        "seq_lens": [32, 64], "pairs": [2, 4, 8], "vocab": 32, "steps": 1500, "batch_size": 32,
        "lr": 3e-3, "warmup": 150, "test_examples": 128, "d_model": 64,
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
        help="scale of the defaults below: tiny (CPU minutes) or paper (Zoology's scale, a GPU "
        "run); any flag given overrides the preset",
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


def _test_sets(args, cells) -> dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]]:
    """The same test batches for every model: generated per cell, or read from ``--test-file``."""
    if args.test_file:
        return _read_test_file(args.test_file, args.vocab, args.batch_size)
    sets = {}
    for t, p in cells:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + 7919 * t + p + 1)
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


def _train_and_test(name, args, train_cells, tests, max_len, overrides, device) -> dict:
    """Train a fresh ``name`` on the training settings in turn, then score every test cell.

    A model whose loss goes non-finite is reported with its cells not run (``None``).
    """
    model = small_model(
        name, vocab_size=args.vocab, max_seq_len=max_len, d_model=args.d_model,
        n_layers=args.n_layers, n_heads=args.n_heads, overrides=overrides, seed=args.seed,
    ).to(device)  # fmt: skip
    record = {"model": name, "params": sum(p.numel() for p in model.parameters())}
    g = torch.Generator().manual_seed(args.seed)

    def sample(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        t, p = train_cells[step % len(train_cells)]
        return mqar_batch(args.batch_size, t, p, args.vocab, g)

    start = time.perf_counter()
    try:
        losses = train_synthetic(
            model, sample, steps=args.steps, lr=args.lr, warmup=args.warmup, device=device,
            desc=f"mqar {name}", progress=not args.no_progress,
        )  # fmt: skip
    except NonFiniteLossError as exc:
        print(f"{name}: {exc}; its cells are reported as not run")
        cells = [{"seq_len": t, "n_pairs": p, "accuracy": None} for t, p in tests]
        return {**record, "diverged": str(exc), "cells": cells}
    record["train_seconds"] = time.perf_counter() - start
    record["final_loss"] = sum(losses[-10:]) / len(losses[-10:]) if losses else None
    record["loss_curve"] = losses[:: max(1, len(losses) // 100)]
    bar = tqdm(tests, desc=f"test {name}", disable=args.no_progress, leave=False)
    scores = {cell: mqar_accuracy(model, tests[cell], device=device) for cell in bar}
    record["cells"] = [{"seq_len": t, "n_pairs": p, **score} for (t, p), score in scores.items()]
    best = max(score["accuracy"] for score in scores.values())
    print(
        f"{name}: {record['params']:,} params, {record['train_seconds']:.0f}s training, "
        f"best cell {best:.1%}"
    )
    return record


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
    tests = _test_sets(args, cells)
    if args.save_test:
        write_jsonl(
            args.save_test,
            [
                {"inputs": x.tolist(), "targets": y.tolist(), "n_pairs": p}
                for (_, p), batches in tests.items()
                for xb, yb in batches
                for x, y in zip(xb, yb, strict=True)
            ],
        )
    max_len = max(max(t for t, _ in tests), max(train_lens))
    overrides = model_overrides(args.models, args.sets)

    results = [
        _train_and_test(name, args, train_cells, tests, max_len, overrides[name], device)
        for name in args.models
    ]

    lens = sorted({t for t, _ in tests})
    pairs = sorted({p for _, p in tests})
    headers = ["model", "params", "T", *[f"P={p} (%)" for p in pairs]]
    rows = []
    for r in results:
        acc = {(c["seq_len"], c["n_pairs"]): c["accuracy"] for c in r["cells"]}
        for t in lens:
            cells = [None if acc.get((t, p)) is None else round(100 * acc[t, p], 1) for p in pairs]
            rows.append([r["model"], r["params"], t, *cells])
    panels = {
        f"T = {t}" + ("" if t in train_lens else " (not trained)"): {
            r["model"]: (
                [c["n_pairs"] for c in r["cells"] if c["seq_len"] == t],
                [c["accuracy"] for c in r["cells"] if c["seq_len"] == t],
            )
            for r in results
        }
        for t in lens
    }
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(
        panels, out / "mqar.png", xlabel="key-value pairs", ylabel="accuracy", logx=True,
        baseline=chance_accuracy(args.vocab),
        title=f"MQAR (vocab {args.vocab}, {args.steps} steps, d_model {args.d_model})",
    )  # fmt: skip
    path = write_result(
        out, "mqar", args=vars(args), headers=headers, rows=rows, figures=["mqar.png"],
        results=results, title="MQAR accuracy (multi-query associative recall)",
    )  # fmt: skip
    print(f"wrote {path}, {out / 'results.md'}, {out / 'mqar.png'}")
    return 0
