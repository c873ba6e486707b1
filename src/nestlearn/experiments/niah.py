"""Needle in a haystack (S-NIAH): accuracy per (context length, needle depth) as a heat map.

``nestlearn experiment niah [--preset tiny|cpu|paper] [--models hope transformer ...]
[--checkpoints RUN ...] [--seeds N | --seed S ...] [--needles passkey number uuid]
[--haystack noise|text] [--lengths 256 512 1024] [--train-lengths 256] [--out DIR]``.

Fresh models (``--models``, byte tokenizer) are first trained on the task at ``--train-lengths``
(answer tokens only, random depths), then tested at every length, so lengths beyond the training
length measure extrapolation. Every (model, seed) is one unit (:mod:`nestlearn.experiments.
units`): trained and tested once, stored under ``OUT/units/MODEL-seedS.json`` and reused by a
rerun with the same settings. Checkpoints (``--checkpoints``) are tested as they are, with their
own tokenizer, on each seed's samples, and lengths beyond a bounded model's context are reported
as not run. The protocol is in ``docs/experiments.md`` and :mod:`nestlearn.eval.niah`. Writes
``result.json`` (every seed's cells under ``results``, per model the accuracy per length over
seeds under ``summary``), ``results.md`` (mean ± std) and ``niah.png`` (heat maps of the mean).
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
from nestlearn.errors import ConfigError, DataError, NonFiniteLossError, NonFiniteMemoryError
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
from nestlearn.eval.synthetic import SMALL_DEFAULTS, small_model, train_synthetic
from nestlearn.experiments.model_source import (
    add_architecture_args,
    add_run_args,
    apply_preset,
    model_overrides,
    setup,
)
from nestlearn.experiments.seeds import format_spread, seeds_label, spread
from nestlearn.experiments.units import run_unit, unit_path, unit_settings
from nestlearn.train.checkpoint import load_model
from nestlearn.train.runtime import seed_everything

DEFAULT_MODELS = ("hope", "hope_attention", "titans_lmm", "gated_deltanet", "transformer")
# Defaults by scale. ``tiny`` trains fresh byte-level models on the task in CPU minutes and tests
# them up to 4x the training length (measured in docs/experiments.md); ``cpu`` is the suite's
# size (every default model, 3 seeds, about 18 CPU-minutes at --threads 1): trained at 160 tokens
# (28 of them haystack), tested at 1x, 2x and 4x that; ``paper`` is RULER's three S-NIAH needles
# at lengths to 8K (``--haystack text`` for the real-text haystack of its number and UUID
# variants).
PRESETS: dict[str, dict[str, object]] = {
    "tiny": {
        "needles": ["passkey"], "haystack": "noise", "lengths": [192, 384, 768],
        "depths": [0.0, 0.25, 0.5, 0.75, 1.0], "samples_per_cell": 8, "train_lengths": [192],
        "steps": 1000, "batch_size": 16, "lr": 3e-3, "warmup": 100, "d_model": 64,
    },
    "cpu": {
        "needles": ["passkey"], "haystack": "noise", "lengths": [160, 320, 640],
        "depths": [0.0, 0.5, 1.0], "samples_per_cell": 8, "train_lengths": [160],
        "steps": 130, "batch_size": 8, "lr": 3e-3, "warmup": 13, "d_model": 64, "n_seeds": 3,
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
        help="scale of the defaults below: tiny (CPU minutes, one seed), cpu (the suite's size, "
        "3 seeds) or paper (RULER-like lengths, a GPU run); any flag given overrides the preset",
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


def _test_samples(
    args, tokenizer, haystack, seed: int
) -> dict[tuple[str, int, float], list[NIAHSample]]:
    """Samples per (needle, length, depth) cell: generated from ``seed``, or read from
    ``--samples`` (the same for every seed)."""
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
                        tokenizer, haystack, needle, length, depth, args.samples_per_cell, seed
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


def _fresh(name: str, seed: int, args, overrides, device, tokenizer, haystack):
    """A fresh ``name`` (initialised from ``seed``) trained on the task at ``--train-lengths``;
    returns the model and its training record (``diverged`` when its loss went non-finite)."""
    seed_everything(seed)
    max_len = max([*args.lengths, *args.train_lengths]) + 64
    model = small_model(
        name, vocab_size=tokenizer.vocab_size, max_seq_len=max_len, d_model=args.d_model,
        n_layers=args.n_layers, n_heads=args.n_heads, overrides=overrides, seed=seed,
    ).to(device)  # fmt: skip
    rng = random.Random(f"niah-train:{seed}")
    label = f"{name} seed {seed}"

    def sample(step: int):
        length = args.train_lengths[step % len(args.train_lengths)]
        return training_batch(tokenizer, haystack, args.needles, length, args.batch_size, rng)

    start = time.perf_counter()
    try:
        losses = train_synthetic(
            model, sample, steps=args.steps, lr=args.lr, warmup=args.warmup, device=device,
            desc=f"niah {label}", progress=not args.no_progress,
        )  # fmt: skip
    except (NonFiniteLossError, NonFiniteMemoryError) as exc:
        print(f"{label}: {exc}; its cells are reported as not run")
        return model, {"diverged": str(exc)}
    info = {"train_seconds": time.perf_counter() - start, "loss_curve": losses[::10]}
    final = sum(losses[-10:]) / len(losses[-10:]) if losses else float("nan")
    info["final_loss"] = final
    print(f"{label}: {info['train_seconds']:.0f}s training, final answer loss {final:.3f}")
    return model, info


def _record(label: str, seed: int, model, info: dict, scores: dict) -> dict:
    return {
        "model": label,
        "seed": seed,
        "params": sum(p.numel() for p in model.parameters()),
        **info,
        "cells": [
            {"needle": n, "length": length, "depth": d, "accuracy": acc}
            for (n, length, d), acc in scores.items()
        ],
    }


def _fresh_unit(name, seed, args, overrides, device, tokenizer, haystack) -> dict:
    """One unit: train a fresh ``name`` with ``seed``, then test it on ``seed``'s samples."""
    cells = _test_samples(args, tokenizer, haystack, seed)
    model, info = _fresh(name, seed, args, overrides, device, tokenizer, haystack)
    start = time.perf_counter()
    if "diverged" in info:
        scores = dict.fromkeys(cells)
    else:
        scores = _evaluate(model, tokenizer, cells, args, device, f"{name} seed {seed}")
        info["test_seconds"] = time.perf_counter() - start
    return _record(name, seed, model, info, scores)


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


def _mean(values: list[float | None]) -> float | None:
    """Mean of ``values``; ``None`` if any is ``None`` (a cell that did not run) or none given."""
    return None if not values or None in values else sum(values) / len(values)


def summarize(results: list[dict], labels: list[str]) -> dict[str, dict[str, dict]]:
    """Per model: ``"L=<length>"`` (each seed's accuracy at that length, averaged over depths and
    needles), ``"<needle> L=<length>"`` too when several needles ran, and ``"accuracy"`` (each
    seed's mean over every cell that ran), as :func:`~nestlearn.experiments.seeds.spread` over
    seeds. A length a seed could not run (context limit, divergence) is missing for that seed."""
    summary: dict[str, dict[str, dict]] = {}
    for label in labels:
        runs = [r for r in results if r["model"] == label]
        needles = list(dict.fromkeys(c["needle"] for r in runs for c in r["cells"]))
        lengths = sorted({c["length"] for r in runs for c in r["cells"]})
        metrics: dict[str, dict] = {}
        groups = [("", needles)] + ([(f"{n} ", [n]) for n in needles] if len(needles) > 1 else [])
        for prefix, chosen in groups:
            for length in lengths:
                metrics[f"{prefix}L={length}"] = spread(
                    [
                        _mean([c["accuracy"] for c in r["cells"]
                               if c["length"] == length and c["needle"] in chosen])
                        for r in runs
                    ]
                )  # fmt: skip
        ran = [[c["accuracy"] for c in r["cells"] if c["accuracy"] is not None] for r in runs]
        metrics["accuracy"] = spread([_mean(acc) for acc in ran])
        summary[label] = metrics
    return summary


def _table_and_panels(results: list[dict], labels: list[str]):
    """The table (mean ± std over seeds of the accuracy % per length, averaged over depths, and
    of the mean over lengths) per model and needle, and the heat maps (depth x length, the mean
    over seeds) per model and needle."""
    lengths = sorted({c["length"] for r in results for c in r["cells"]})
    depths = sorted({c["depth"] for r in results for c in r["cells"]})
    needles = list(dict.fromkeys(c["needle"] for r in results for c in r["cells"]))
    headers = ["model", "needle", *[f"L={length} (%)" for length in lengths], "mean (%)"]
    rows, panels = [], {}
    for label in labels:
        runs = [r for r in results if r["model"] == label]
        for needle in needles:
            accs = [
                {(c["length"], c["depth"]): c["accuracy"] for c in r["cells"]
                 if c["needle"] == needle}
                for r in runs
            ]  # fmt: skip
            per_seed = [  # [seed][length]: the mean over depths, None where not run
                [_mean([acc.get((length, d)) for d in depths]) for length in lengths]
                for acc in accs
            ]
            cells = [spread([s[i] for s in per_seed]) for i in range(len(lengths))]
            means = [_mean([v for v in s if v is not None] or [None]) for s in per_seed]
            rows.append(
                [label, needle, *[format_spread(c, digits=1, scale=100) for c in cells],
                 format_spread(spread(means), digits=1, scale=100)]
            )  # fmt: skip
            panels[f"{label} · {needle}"] = [
                [spread([acc.get((length, d)) for acc in accs])["mean"] for length in lengths]
                for d in depths
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
    results, labels = [], []

    if args.models:
        tokenizer = ByteTokenizer()
        haystack = _haystack(args, tokenizer)
        # Checked before any training: every sample and training length fits its needle.
        first = _test_samples(args, tokenizer, haystack, args.seed)
        for length in args.train_lengths:
            try:
                training_batch(tokenizer, haystack, args.needles, length, 1, random.Random(0))
            except ValueError as exc:
                raise ConfigError(f"--train-lengths: {exc}") from None
        if args.save_samples:  # the first seed's prompts (every fresh model gets them)
            _save_samples(args.save_samples, tokenizer, first)
        for name in args.models:
            labels.append(name)
            for seed in args.seeds:

                def compute(name=name, seed=seed) -> dict:
                    return _fresh_unit(
                        name, seed, args, overrides[name], device, tokenizer, haystack
                    )

                key = f"{name}-seed{seed}"
                small = SMALL_DEFAULTS.get(name)
                settings = unit_settings(args, model=name, seed=seed, small=small)
                record = run_unit(out, key, settings, compute)
                if record.pop("reused", False):
                    print(f"{name} seed {seed}: reused {unit_path(out, key)}")
                results.append(record)
    for path in args.checkpoints:  # tested as they are: cheap, so not stored as units
        model, loaded = load_model(Path(path), device=device)
        tokenizer = loaded.tokenizer
        haystack = _haystack(args, tokenizer)
        label = f"{Path(path).name} step {loaded.step}"
        labels.append(label)
        info = {"checkpoint": str(loaded.path)}
        for seed in args.seeds:
            cells = _test_samples(args, tokenizer, haystack, seed)
            if args.save_samples and not args.models and seed == args.seed and not results:
                _save_samples(args.save_samples, tokenizer, cells)
            scores = _evaluate(model, tokenizer, cells, args, device, f"{label} seed {seed}")
            results.append(_record(label, seed, model, info, scores))

    summary = summarize(results, labels)
    headers, rows, panels, depths, lengths = _table_and_panels(results, labels)
    out.mkdir(parents=True, exist_ok=True)
    trained = ", ".join(map(str, args.train_lengths)) if args.models else ""
    plot_heatmaps(
        panels, out / "niah.png", rows=[f"{d:g}" for d in depths],
        cols=[str(length) for length in lengths],
        xlabel="context length (tokens)" + (f"; fresh models trained at {trained}" if trained
                                            else ""),
        ylabel="needle depth",
        title=f"S-NIAH accuracy (%), {args.haystack} haystack; mean over "
        f"{seeds_label(args.seeds)}",
    )  # fmt: skip
    path = write_result(
        out, "niah", args=vars(args), headers=headers, rows=rows, figures=["niah.png"],
        results=results, summary=summary,
        title=f"Needle in a haystack (S-NIAH) accuracy, {seeds_label(args.seeds)}",
    )  # fmt: skip
    print(f"wrote {path}, {out / 'results.md'}, {out / 'niah.png'}")
    return 0
