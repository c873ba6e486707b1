"""``nestlearn eval CHECKPOINT [--source TEXT] [eval.key=value ...]``: perplexity and bits/byte."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from nestlearn.config import replace as replace_cfg
from nestlearn.config.loader import parse_overrides
from nestlearn.data import eval_batches, prepare_data, prepare_text, read_documents
from nestlearn.errors import ConfigError
from nestlearn.eval import evaluate_lm
from nestlearn.train.checkpoint import load_model
from nestlearn.train.runtime import resolve_device
from nestlearn.utils.io import atomic_write_text


def add_parser(sub, name: str) -> None:
    parser = sub.add_parser(
        name, help="perplexity of a checkpoint on a text source", description=__doc__
    )
    parser.add_argument("checkpoint", help="run folder (newest valid checkpoint) or step folder")
    parser.add_argument(
        "--source",
        help="file, folder, glob or 'stdlib' to score whole; default: the run's validation split",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    parser.add_argument("overrides", nargs="*", metavar="eval.key=value")


def run(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.overrides)
    if set(overrides) - {"eval"}:
        raise ConfigError("nestlearn eval takes only eval.* overrides (e.g. eval.max_tokens=0)")
    device = resolve_device(args.device)
    model, loaded = load_model(args.checkpoint, device=device)
    cfg = replace_cfg(loaded.config, overrides)
    if args.source:
        # The whole source is scored as one stream: no train/validation split here.
        docs = read_documents(replace(cfg.data, source=args.source, max_bytes=0))
        tokens = prepare_text(docs, loaded.tokenizer, progress=True)
        source = args.source
    else:
        corpus = prepare_data(cfg.data, tokenizer=loaded.tokenizer)
        tokens, source = corpus.val, f"validation split of {cfg.data.source}"
    seq_len = cfg.eval.seq_len or cfg.train.seq_len
    batches = eval_batches(
        tokens, batch_size=cfg.eval.batch_size, seq_len=seq_len, max_tokens=cfg.eval.max_tokens
    )
    result = evaluate_lm(model, batches, loaded.tokenizer.token_byte_lengths(), device=device)
    record = {
        "checkpoint": str(loaded.path),
        "step": loaded.step,
        "source": source,
        "seq_len": seq_len,
        **result,
    }
    print(
        f"{source}: {int(result['tokens']):,} tokens, loss {result['loss']:.4f}, "
        f"ppl {result['ppl']:.3f}, bits/byte {result['bpb']:.4f}"
    )
    if args.json:
        atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
    return 0
