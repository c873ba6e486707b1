"""Needle in a haystack (S-NIAH): accuracy per (context length, needle depth) as a heat map.

``nestlearn experiment niah [--models transformer gated_deltanet ...] [--checkpoints RUN ...]
[--needles passkey number uuid] [--haystack noise|text] [--lengths 256 512 1024]
[--train-lengths 256] [--out DIR]``.

Fresh models (``--models``, byte tokenizer) are first trained on the task at ``--train-lengths``
(answer tokens only, random depths), then tested at every length, so lengths beyond the training
length measure extrapolation; checkpoints (``--checkpoints``) are tested as they are, with their
own tokenizer, and lengths beyond a bounded model's context are reported as not run. The
protocol is in ``docs/experiments.md`` and :mod:`nestlearn.eval.niah`. Writes ``result.json``,
``results.md`` and ``niah.png``.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from nestlearn.config.schema import DataConfig
from nestlearn.data import ByteTokenizer, read_documents
from nestlearn.errors import ConfigError, DataError, NonFiniteLossError
from nestlearn.eval.figures import plot_heatmaps
from nestlearn.eval.niah import (
    HAYSTACKS,
    NEEDLES,
    Haystack,
    NIAHSample,
    answer_ids,
    fits,
    make_samples,
    niah_correct,
    training_batch,
)
from nestlearn.eval.records import read_jsonl, write_jsonl
from nestlearn.eval.results import write_result
from nestlearn.eval.synthetic import small_model, train_synthetic
from nestlearn.experiments.model_source import (
    add_architecture_args,
    add_run_args,
    apply_preset,
    model_overrides,
    setup,
)
from nestlearn.train.checkpoint import load_model

# titans_lmm and hope are left out of the default: on a CPU they train about 2x (titans_lmm) and
# 6x (hope) slower per step than gated_deltanet (add them with --models).
DEFAULT_MODELS = ("transformer", "gated_deltanet")
# Defaults by scale. ``tiny`` trains fresh byte-level models on the task in CPU minutes and tests
# them up to 4x the training length (measured in docs/experiments.md); ``paper`` is RULER's three
# S-NIAH needles at lengths to 8K (``--haystack text`` for the real-text haystack of its
# number and UUID variants).
PRESETS: dict[str, dict[str, object]] = {
    "tiny": {
        "needles": ["passkey"], "haystack": "noise", "lengths": [192, 384, 768],
        "depths": [0.0, 0.25, 0.5, 0.75, 1.0], "samples_per_cell": 8, "train_lengths": [192],
        "steps": 1000, "batch_size": 16, "lr": 3e-3, "warmup": 100, "d_model": 64,
    },
    "paper": {
        "needles": ["passkey", "number", "uuid"], "haystack": "noise",
        "lengths": [1024, 2048, 4096, 8192], "depths": [i / 10 for i in range(11)],
        "samples_per_cell": 25, "train_lengths": [1024], "steps": 10000, "batch_size": 32,
        "lr": 1e-3, "warmup": 500, "d_model": 256,
    },
}  # fmt: skip
SAMPLE_SCHEMA = {
    "prompt": ((str,), True),
    "answer": ((str,), True),
    "length": ((int,), False),
    "depth": ((int, float), False),
    "needle": ((str,), False),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nestlearn experiment niah", description=__doc__)
    add_architecture_args(parser, DEFAULT_MODELS)
    parser.set_defaults(models=None)
    parser.add_argument(
        "--checkpoints", nargs="+", default=[], metavar="RUN",
        help="trained run or checkpoint folders to test as they are (no training)",
    )  # fmt: skip
    parser.add_argument(
        "--preset", default="tiny", choices=list(PRESETS),
        help="scale of the defaults below: tiny (CPU minutes) or paper (RULER-like lengths, a "
        "GPU run); any flag given overrides the preset",
    )  # fmt: skip
    parser.add_argument("--needles", nargs="+", choices=list(NEEDLES))
    parser.add_argument("--haystack", choices=HAYSTACKS)
    parser.add_argument(
        "--source", default="stdlib", help="documents of the 'text' haystack (file/folder/glob)"
    )
    parser.add_argument("--lengths", nargs="+", type=int)
    parser.add_argument("--depths", nargs="+", type=float, metavar="D")
    parser.add_argument("--samples-per-cell", type=int)
    parser.add_argument("--train-lengths", nargs="+", type=int, help="fresh models train here")
    parser.add_argument("--steps", type=int, help="training steps per fresh model")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float, help="peak AdamW learning rate")
    parser.add_argument("--warmup", type=int, help="linear warmup steps")
    parser.add_argument(
        "--samples", type=Path,
        help="test these prompts instead (JSONL: prompt, answer, optional length, depth, needle)",
    )  # fmt: skip
    parser.add_argument("--save-samples", type=Path, help="write the generated prompts as JSONL")
    add_run_args(parser, "runs/experiments/niah")
    return parser


def _haystack(args: argparse.Namespace, tokenizer) -> Haystack:
    if args.haystack == "noise":
        return Haystack(tokenizer)
    # A few MB is plenty of haystack; the cap keeps reading the stdlib quick.
    docs = read_documents(replace(DataConfig(), source=args.source, max_bytes=4_000_000))
    return Haystack(tokenizer, [d.text for d in docs])


def _test_samples(args, tokenizer, haystack) -> dict[tuple[str, int, float], list[NIAHSample]]:
    """Samples per (needle, length, depth) cell: generated, or read from ``--samples``."""
    cells: dict[tuple[str, int, float], list[NIAHSample]] = {}
    if args.samples:
        for i, rec in enumerate(read_jsonl(args.samples, SAMPLE_SCHEMA), start=1):
            prompt = tokenizer.encode(rec["prompt"])
            if not prompt:
                raise DataError(f"{args.samples} record {i}: field 'prompt' is empty")
            needle = rec.get("needle", "custom")
            length, depth = rec.get("length", len(prompt)), float(rec.get("depth", 0.0))
            sample = NIAHSample(prompt, rec["answer"], length, depth, needle)
            cells.setdefault((needle, length, depth), []).append(sample)
        return cells
    for needle in args.needles:
        for length in args.lengths:
            for depth in args.depths:
                try:
                    cells[needle, length, depth] = make_samples(
                        tokenizer, haystack, needle, length, depth, args.samples_per_cell, args.seed
                    )
                except ValueError as exc:
                    raise ConfigError(f"--lengths: {exc}") from None
    return cells


def _save_samples(path: Path, tokenizer, cells) -> None:
    write_jsonl(
        path,
        [
            {
                "prompt": tokenizer.decode(s.prompt),
                "answer": s.answer,
                "length": s.length,
                "depth": s.depth,
                "needle": s.needle,
            }
            for samples in cells.values()
            for s in samples
        ],
    )


def _fresh(name: str, args, overrides, device, tokenizer, haystack):
    max_len = max([*args.lengths, *args.train_lengths]) + 64
    model = small_model(
        name, vocab_size=tokenizer.vocab_size, max_seq_len=max_len, d_model=args.d_model,
        n_layers=args.n_layers, n_heads=args.n_heads, overrides=overrides, seed=args.seed,
    ).to(device)  # fmt: skip
    rng = random.Random(f"niah-train:{args.seed}")
    for length in args.train_lengths:
        try:
            training_batch(tokenizer, haystack, args.needles, length, 1, random.Random(0))
        except ValueError as exc:
            raise ConfigError(f"--train-lengths: {exc}") from None

    def sample(step: int):
        length = args.train_lengths[step % len(args.train_lengths)]
        return training_batch(tokenizer, haystack, args.needles, length, args.batch_size, rng)

    start = time.perf_counter()
    try:
        losses = train_synthetic(
            model, sample, steps=args.steps, lr=args.lr, warmup=args.warmup, device=device,
            desc=f"niah {name}", progress=not args.no_progress,
        )  # fmt: skip
    except NonFiniteLossError as exc:
        print(f"{name}: {exc}; its cells are reported as not run")
        return model, {"diverged": str(exc)}
    info = {"train_seconds": time.perf_counter() - start, "loss_curve": losses[::10]}
    final = sum(losses[-10:]) / len(losses[-10:]) if losses else float("nan")
    print(f"{name}: {info['train_seconds']:.0f}s training, final answer loss {final:.3f}")
    return model, info


def _evaluate(model, tokenizer, cells, args, device, label: str) -> dict:
    scores, skipped = {}, []
    bar = tqdm(cells.items(), desc=f"test {label}", disable=args.no_progress, leave=False)
    for (needle, length, depth), samples in bar:
        n_new = max(len(answer_ids(tokenizer, s)) for s in samples) + 2
        if not all(fits(model, len(s.prompt), n_new) for s in samples):
            scores[needle, length, depth] = None
            skipped.append(length)
            continue
        correct = niah_correct(model, tokenizer, samples, batch_size=args.samples_per_cell,
                               device=device)  # fmt: skip
        scores[needle, length, depth] = sum(correct) / len(correct)
    if skipped:
        print(
            f"{label}: lengths {sorted(set(skipped))} do not fit its context limit "
            f"({model.context_limit} tokens); reported as not run (recurrent models stream them)"
        )
    return scores


def _summary(results: list[dict]):
    """The table (accuracy % per length, averaged over depths, and the mean) and the heat maps
    (depth x length per model and needle)."""
    lengths = sorted({c["length"] for r in results for c in r["cells"]})
    depths = sorted({c["depth"] for r in results for c in r["cells"]})
    needles = list(dict.fromkeys(c["needle"] for r in results for c in r["cells"]))
    headers = ["model", "needle", *[f"L={length} (%)" for length in lengths], "mean (%)"]
    rows, panels = [], {}
    for r in results:
        for needle in needles:
            acc = {(c["length"], c["depth"]): c["accuracy"] for c in r["cells"]
                   if c["needle"] == needle}  # fmt: skip
            per_length = []
            for length in lengths:
                values = [acc[length, d] for d in depths if acc.get((length, d)) is not None]
                per_length.append(round(100 * sum(values) / len(values), 1) if values else None)
            ran = [v for v in per_length if v is not None]
            mean = round(sum(ran) / len(ran), 1) if ran else None
            rows.append([r["model"], needle, *per_length, mean])
            panels[f"{r['model']} · {needle}"] = [
                [acc.get((length, d)) for length in lengths] for d in depths
            ]
    return headers, rows, panels, depths, lengths


def main(argv: list[str]) -> int:
    args = apply_preset(build_parser().parse_args(argv), PRESETS)
    if args.models is None:
        args.models = [] if args.checkpoints else list(DEFAULT_MODELS)
    if not args.models and not args.checkpoints:
        raise ConfigError("nothing to test: give --models and/or --checkpoints")
    if any(not 0.0 <= d <= 1.0 for d in args.depths):
        raise ConfigError(f"--depths {args.depths}: every depth must be in [0, 1]")
    device = setup(args)
    out = Path(args.out)
    overrides = model_overrides(args.models, args.sets)
    runs = []  # (label, model, tokenizer, test cells, info)

    if args.models:
        tokenizer = ByteTokenizer()
        haystack = _haystack(args, tokenizer)
        cells = _test_samples(args, tokenizer, haystack)
        for name in args.models:
            model, info = _fresh(name, args, overrides[name], device, tokenizer, haystack)
            runs.append((name, model, tokenizer, cells, info))
    for path in args.checkpoints:
        model, loaded = load_model(Path(path), device=device)
        tokenizer = loaded.tokenizer
        cells = _test_samples(args, tokenizer, _haystack(args, tokenizer))
        label = f"{Path(path).name} step {loaded.step}"
        runs.append((label, model, tokenizer, cells, {"checkpoint": str(loaded.path)}))
    if args.save_samples:
        # The prompts of the first model (all fresh models share them; a checkpoint's own
        # tokenizer may cut its prompts differently).
        _save_samples(args.save_samples, runs[0][2], runs[0][3])

    results = []
    for label, model, tokenizer, cells, info in runs:
        if "diverged" in info:
            scores = dict.fromkeys(cells)
        else:
            scores = _evaluate(model, tokenizer, cells, args, device, label)
        results.append(
            {
                "model": label,
                "params": sum(p.numel() for p in model.parameters()),
                **info,
                "cells": [
                    {"needle": n, "length": length, "depth": d, "accuracy": acc}
                    for (n, length, d), acc in scores.items()
                ],
            }
        )

    headers, rows, panels, depths, lengths = _summary(results)
    out.mkdir(parents=True, exist_ok=True)
    plot_heatmaps(
        panels, out / "niah.png", rows=[f"{d:g}" for d in depths],
        cols=[str(length) for length in lengths], xlabel="context length (tokens)",
        ylabel="needle depth", title=f"S-NIAH accuracy (%), {args.haystack} haystack",
    )  # fmt: skip
    path = write_result(
        out, "niah", args=vars(args), headers=headers, rows=rows, figures=["niah.png"],
        results=results, title="Needle in a haystack (S-NIAH) accuracy",
    )  # fmt: skip
    print(f"wrote {path}, {out / 'results.md'}, {out / 'niah.png'}")
    return 0
