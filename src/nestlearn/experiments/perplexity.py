"""Perplexity and bits per byte of several models, under three scoring protocols.

``nestlearn experiment perplexity [--models transformer gated_deltanet ...] [--checkpoints RUN
...] [--modes chunks sliding streaming] [--source TEXT] [--out DIR]``.

Each ``--models`` entry (a named config such as ``tiny``, or an architecture trained from the
``--base`` config) is trained first into ``OUT/runs/NAME``; ``--checkpoints`` are scored as they
are. Every model then scores the same text (``--source``, or each run's validation split),
capped at its first ``--max-tokens`` + 1 tokens, in each mode (:mod:`nestlearn.eval.streaming`):
``chunks`` (independent windows), ``sliding`` (windows advancing by ``--stride``, new tokens
only) and ``streaming`` (the recurrent state carried through the whole text; a model with a
context limit streams only text that fits, otherwise the row says it did not run). Bits per
byte compare across tokenizers. Writes ``result.json``, ``results.md`` and ``perplexity.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nestlearn.config import load_config, named_configs, parse_overrides
from nestlearn.errors import ConfigError, NonFiniteLossError, SequenceTooLongError
from nestlearn.eval.figures import plot_bars
from nestlearn.eval.results import write_result
from nestlearn.eval.streaming import MODES, stream_perplexity
from nestlearn.eval.text import eval_tokens
from nestlearn.experiments.model_source import add_run_args, setup
from nestlearn.experiments.seeds import resolve_seeds
from nestlearn.models.registry import available_models
from nestlearn.train import Trainer
from nestlearn.train.checkpoint import load_model

DEFAULT_MODELS = ("transformer", "gated_deltanet", "titans_lmm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nestlearn experiment perplexity", description=__doc__)
    parser.add_argument(
        "--models", nargs="+", default=None, metavar="NAME",
        help="named configs or architectures to train first (default: "
        f"{' '.join(DEFAULT_MODELS)}, unless --checkpoints are given)",
    )  # fmt: skip
    parser.add_argument("--checkpoints", nargs="+", default=[], metavar="RUN")
    parser.add_argument(
        "--base", default="debug", help="config an architecture name is trained from (debug)"
    )
    parser.add_argument("--steps", type=int, default=100, help="training steps per model")
    parser.add_argument(
        "--set", action="append", default=[], dest="sets", metavar="SECTION.KEY=VALUE",
        help="config override for every trained model (e.g. model.d_model=64); repeatable",
    )  # fmt: skip
    parser.add_argument("--source", help="text to score (default: each run's validation split)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--window", type=int, default=0, help="window (0 = the run's seq_len)")
    parser.add_argument("--stride", type=int, default=0, help="sliding stride (0 = window / 2)")
    parser.add_argument("--chunk", type=int, default=256, help="tokens per streaming call")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    parser.add_argument(
        "--max-tokens", type=int, default=8192, help="score the first N+1 tokens (0 = all)"
    )
    add_run_args(parser, "runs/experiments/perplexity")
    return parser


def _train(name: str, args: argparse.Namespace, out: Path) -> Path:
    """Train ``name`` (a named config, or an architecture on ``--base``) into ``OUT/runs/NAME``."""
    overrides = parse_overrides(args.sets)
    if name not in named_configs() and not Path(name).suffix:
        if name not in available_models():
            raise ConfigError(
                f"--models {name}: neither a named config nor an architecture; architectures: "
                f"{', '.join(available_models())}"
            )
        overrides.setdefault("model", {})["name"] = name
        config = args.base
    else:
        config = name
    run_dir = out / "runs" / Path(name).stem
    train = overrides.setdefault("train", {})
    train.update(out_dir=str(run_dir), steps=args.steps, seed=args.seed)
    train.setdefault("progress", not args.no_progress)
    train.setdefault("device", args.device)
    cfg = load_config(config, {**overrides, "name": Path(name).stem})
    if run_dir.exists():
        # The experiment owns its output folder: a rerun retrains from scratch.
        import shutil

        shutil.rmtree(run_dir)
    Trainer(cfg).fit()
    return run_dir


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    resolve_seeds(args)
    if args.models is None:
        args.models = [] if args.checkpoints else list(DEFAULT_MODELS)
    if not args.models and not args.checkpoints:
        raise ConfigError("nothing to score: give --models and/or --checkpoints")
    device = setup(args)
    out = Path(args.out)
    runs = [(Path(name).stem, _train(name, args, out)) for name in args.models]
    runs += [(Path(path).name, Path(path)) for path in args.checkpoints]

    results, rows, bars = [], [], {}
    for label, path in runs:
        model, loaded = load_model(path, device=device)
        tokens, source = eval_tokens(loaded.config, loaded.tokenizer, args.source)
        if args.max_tokens > 0:
            tokens = tokens[: args.max_tokens + 1]
        window = args.window or loaded.config.eval.seq_len or loaded.config.train.seq_len
        stride = args.stride or max(1, window // 2)
        n_params = sum(p.numel() for p in model.parameters())
        bars[label] = {}
        for mode in args.modes:
            record = {"model": label, "step": loaded.step, "source": source, "mode": mode}
            record.update(window=None if mode == "streaming" else window,
                          stride={"chunks": window, "sliding": stride}.get(mode))  # fmt: skip
            try:
                metrics = stream_perplexity(
                    model, tokens, loaded.tokenizer.token_byte_lengths(), mode, window=window,
                    stride=stride, chunk=args.chunk, batch_size=args.batch_size, device=device,
                    progress=not args.no_progress,
                )  # fmt: skip
            except (SequenceTooLongError, NonFiniteLossError) as exc:
                print(f"{label} {mode}: not run ({exc})")
                metrics = {"loss": None, "ppl": None, "bpb": None, "tokens": None}
                record["skipped"] = str(exc)
            record.update(metrics)
            results.append(record)
            bars[label][mode] = metrics["bpb"]
            # A streamed target sees the whole prefix: its window is "all".
            window_cell = "all" if mode == "streaming" else window
            rows.append(
                [label, n_params, mode, window_cell, record["stride"], metrics["tokens"],
                 metrics["ppl"], metrics["bpb"]]
            )  # fmt: skip
            if metrics["ppl"] is not None:
                print(f"{label} {mode}: ppl {metrics['ppl']:.3f}, bits/byte {metrics['bpb']:.4f}")
    headers = ["model", "params", "mode", "window", "stride", "tokens", "ppl", "bits/byte"]
    out.mkdir(parents=True, exist_ok=True)
    plot_bars(bars, out / "perplexity.png", ylabel="bits per byte (lower is better)",
              title="Perplexity protocols")  # fmt: skip
    path = write_result(
        out, "perplexity", args=vars(args), headers=headers, rows=rows,
        figures=["perplexity.png"], results=results, title="Perplexity and bits per byte",
    )  # fmt: skip
    print(f"wrote {path}, {out / 'results.md'}, {out / 'perplexity.png'}")
    return 0
