"""``nestlearn eval [TASK] ...``: evaluate a checkpoint; TASK is perplexity (default), mqar or niah.

- ``nestlearn eval [perplexity] CHECKPOINT [--source TEXT] [--mode chunks|sliding|streaming]
  [--window W] [--stride S] [--json FILE] [eval.key=value ...]``: perplexity and bits per byte.
  ``chunks`` (default) is the trainer's validation protocol: non-overlapping windows of
  ``eval.seq_len`` (0 = ``train.seq_len``), evenly spread over the stream when
  ``eval.max_tokens`` caps it. ``sliding`` and ``streaming`` score the first ``eval.max_tokens``
  + 1 tokens (0 = all) with overlapping windows or the recurrent state
  (:mod:`nestlearn.eval.streaming`).
- ``nestlearn eval niah CHECKPOINT [args]``: needle in a haystack on the checkpoint
  (``nestlearn experiment niah --checkpoints CHECKPOINT [args]``).
- ``nestlearn eval mqar [args]``: ``nestlearn experiment mqar [args]`` (MQAR trains its models).

A run folder literally named ``perplexity``, ``mqar`` or ``niah`` is given as ``./NAME``.
"""

from __future__ import annotations

import argparse
import json

from nestlearn.config import replace as replace_cfg
from nestlearn.config.loader import parse_overrides
from nestlearn.data import eval_batches
from nestlearn.errors import ConfigError
from nestlearn.eval import evaluate_lm
from nestlearn.eval.streaming import MODES, stream_perplexity
from nestlearn.eval.text import eval_tokens
from nestlearn.experiments import run_experiment
from nestlearn.train.checkpoint import load_model
from nestlearn.train.runtime import resolve_device
from nestlearn.utils.io import atomic_write_text

TASKS = ("perplexity", "mqar", "niah")


def add_parser(sub, name: str) -> None:
    parser = sub.add_parser(
        name,
        help="evaluate a checkpoint: perplexity (default), niah; or run mqar",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", help="perplexity, mqar, niah, or a checkpoint (= perplexity)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the task")


def perplexity_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nestlearn eval perplexity", description="Perplexity and bits/byte of a checkpoint."
    )
    parser.add_argument("checkpoint", help="run folder (newest valid checkpoint) or step folder")
    parser.add_argument(
        "--source",
        help="file, folder, glob or 'stdlib' to score whole; default: the run's validation split",
    )
    parser.add_argument("--mode", default="chunks", choices=MODES)
    parser.add_argument("--window", type=int, default=0, help="window (0 = eval.seq_len)")
    parser.add_argument("--stride", type=int, default=0, help="sliding stride (0 = window / 2)")
    parser.add_argument("--chunk", type=int, default=512, help="tokens per streaming call")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    parser.add_argument("overrides", nargs="*", metavar="eval.key=value")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.target == "mqar":
        return run_experiment("mqar", args.args)
    if args.target == "niah":
        if not args.args or args.args[0].startswith("-"):
            raise ConfigError("nestlearn eval niah needs a checkpoint: eval niah RUN [args]")
        return run_experiment("niah", ["--checkpoints", args.args[0], *args.args[1:]])
    argv = args.args if args.target == "perplexity" else [args.target, *args.args]
    # Overrides may follow options (`RUN --source X eval.max_tokens=0`).
    return perplexity(perplexity_parser().parse_intermixed_args(argv))


def perplexity(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.overrides)
    if set(overrides) - {"eval"}:
        raise ConfigError("nestlearn eval takes only eval.* overrides (e.g. eval.max_tokens=0)")
    device = resolve_device(args.device)
    model, loaded = load_model(args.checkpoint, device=device)
    cfg = replace_cfg(loaded.config, overrides)
    tokens, source = eval_tokens(cfg, loaded.tokenizer, args.source, progress=True)
    token_bytes = loaded.tokenizer.token_byte_lengths()
    seq_len = args.window or cfg.eval.seq_len or cfg.train.seq_len
    if args.mode == "chunks":
        batches = eval_batches(
            tokens, batch_size=cfg.eval.batch_size, seq_len=seq_len, max_tokens=cfg.eval.max_tokens
        )
        result = evaluate_lm(model, batches, token_bytes, device=device)
    else:
        if cfg.eval.max_tokens > 0:
            tokens = tokens[: cfg.eval.max_tokens + 1]
        result = stream_perplexity(
            model, tokens, token_bytes, args.mode, window=seq_len, stride=args.stride,
            chunk=args.chunk, batch_size=cfg.eval.batch_size, device=device, progress=True,
        )  # fmt: skip
    record = {
        "checkpoint": str(loaded.path),
        "step": loaded.step,
        "source": source,
        "mode": args.mode,
        "seq_len": seq_len,
        **result,
    }
    if args.mode == "sliding":
        record["stride"] = args.stride or max(1, seq_len // 2)
    print(
        f"{source} ({args.mode}): {int(result['tokens']):,} tokens, loss {result['loss']:.4f}, "
        f"ppl {result['ppl']:.3f}, bits/byte {result['bpb']:.4f}"
    )
    if args.json:
        atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
    return 0
