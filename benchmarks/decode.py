"""Decoding speed of every model: prefill time and tokens/s of the one-token step, side by side.

    nestlearn bench decode [CONFIG ...] [--models all | a,b,...] [--size tiny|demo]
                           [--batch-sizes 1,8] [--prompts 128,1024,4096] [--new-tokens 32]
                           [--repeats 1] [--threads N] [--clock cpu|wall] [--quick]
                           [--json FILE] [--markdown FILE] [--out DIR] [section.key=value ...]

Rows: the named configs given, or every architecture (``--models all``, the default, or a
comma-separated list of architectures) at ``--size``: ``tiny`` (each ``*-tiny`` config and
``tiny`` for the Transformer++) or ``demo`` (the ``demo-*`` configs where one exists, else the
``*-tiny`` config narrowed to ``demo-transformer``'s width and depth). Weights are random
(``model.vocab_size`` from the data section: 257 for bytes, ``data.vocab_size`` for a BPE);
decoding speed does not depend on them.

For each model, batch size ``B`` and prompt length ``P``, one call of the library's own
:func:`nestlearn.models.sampling.generate` (greedy) with ``--new-tokens N`` on random prompt ids
``[B, P]`` is timed in two parts: **prefill** is the time to the first token (``init_state``,
one forward over the prompt and the first argmax), **decode** the time of the remaining
``N − 1`` tokens (each a single-token forward from the state and an argmax), reported as
``B·(N − 1) / decode`` tokens/s. Calls run in turns (every model at one ``(B, P)``, then the
next, the whole list ``--repeats`` times) after one warm-up call per model; each figure is the
best of the repeats. A Transformer whose ``max_seq_len`` is shorter than ``P + N`` is built with
``model.max_seq_len = max(P) + N`` (its KV cache is read up to the current position only, so
the longer buffer costs no decode time). ``ratio`` is a row's decode tokens/s over the
``--ratio-to`` model's at the same ``(B, P)``; ``flat`` is a row's decode tokens/s at its
longest prompt over its shortest (1.0 = no slowdown with context).

Before timing, each model's greedy tokens from the timed path are checked against a plain
reference on the first prompt (one full forward over prompt + generated tokens, no state):
``max |diff|`` is the largest logit difference seen (float32), so a fast step that drifted would
show here.

Cost: the prefills dominate (every model reads ``Σ B·P`` prompt tokens per turn: 47k with the
defaults, minutes for HOPE on one core); ``--quick`` (prompts 128 and 1024, 16 new tokens) checks
the 1024-token target in a few minutes, ``--models`` or configs narrow the rows.

``--clock cpu`` times with the process's CPU time (use ``--threads 1``: on a machine shared with
other jobs it does not count the time spent waiting for a core).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nestlearn.config import load_config
from nestlearn.config.loader import named_configs
from nestlearn.errors import ConfigError
from nestlearn.models.base import LanguageModel
from nestlearn.models.registry import available_models, build_model
from nestlearn.models.sampling import generate
from nestlearn.models.summary import count_parameters
from nestlearn.train.report import markdown_table
from nestlearn.utils.timing import CLOCKS

DEMO_SHAPE = ("model.d_model=128", "model.n_layers=2", "model.n_heads=4", "data.tokenizer=byte")


@dataclass(frozen=True)
class Row:
    label: str
    config: str
    overrides: tuple[str, ...] = ()


def architecture_config(name: str, size: str) -> Row:
    """The config of architecture ``name`` at ``size`` (``tiny`` or ``demo``)."""
    configs = set(named_configs())
    if size == "demo":
        if f"demo-{name}" in configs:
            return Row(name, f"demo-{name}")
        tiny = architecture_config(name, "tiny")
        return Row(name, tiny.config, DEMO_SHAPE)
    config = "tiny" if name == "transformer" else f"{name}-tiny"
    if config not in configs:
        raise ConfigError(f"no config {config!r} for architecture {name!r}; name a config instead")
    return Row(name, config)


def select_rows(args: argparse.Namespace) -> list[Row]:
    """The configs named on the line, else ``--models`` (all or a list) at ``--size``."""
    if args.configs and args.models:
        raise ConfigError("give configs or --models, not both")
    if args.configs:
        labels = [load_config(c).model.name for c in args.configs]
        unique = len(set(labels)) == len(labels)
        return [Row(lab if unique else c, c) for lab, c in zip(labels, args.configs, strict=True)]
    names = available_models() if args.models in (None, "all") else args.models.split(",")
    unknown = sorted(set(names) - set(available_models()))
    if unknown:
        raise ConfigError(f"--models: unknown {unknown}; choose from {available_models()}")
    if "transformer" in names:  # the reference row first
        names = ["transformer", *(n for n in names if n != "transformer")]
    return [architecture_config(n, args.size) for n in names]


def build(row: Row, overrides: list[str], context: int) -> tuple[LanguageModel, list[str]]:
    """Row's model (random weights, eval mode) and the overrides it was built with; a model with
    a context limit below ``context`` gets ``model.max_seq_len = context``."""
    ov = [*row.overrides, *overrides]
    cfg = load_config(row.config, ov)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = 257 if cfg.data.tokenizer == "byte" else cfg.data.vocab_size
    torch.manual_seed(0)
    model = build_model(cfg.model)
    if model.context_limit is not None and model.context_limit < context:
        ov.append(f"model.max_seq_len={context}")
        cfg.model.max_seq_len = context
        torch.manual_seed(0)
        model = build_model(cfg.model)
    return model.eval(), ov


def timed_generate(
    model: LanguageModel, prompt: torch.Tensor, new_tokens: int, now: Callable[[], float]
) -> tuple[float, float, torch.Tensor]:
    """``(prefill_s, decode_s, tokens [B, N])``: one greedy :func:`generate` call, timed to the
    first token and from there to the last."""
    start = now()
    stream = generate(model, prompt, new_tokens, temperature=0.0)
    first = next(stream)
    middle = now()
    rest = list(stream)
    end = now()
    return middle - start, end - middle, torch.stack([first, *rest], dim=1)


@torch.inference_mode()
def reference_diff(model: LanguageModel, prompt: torch.Tensor, tokens: torch.Tensor) -> float:
    """Largest |logit| difference between the stateful prefill + steps and one stateless forward
    over ``prompt + tokens`` (positions that predicted each generated token but the last)."""
    state = model.init_state(prompt.shape[0], prompt.device)
    logits, state = model(prompt, state)
    stepped = [logits[:, -1]]
    for i in range(tokens.shape[1] - 1):
        logits, state = model(tokens[:, i : i + 1], state)
        stepped.append(logits[:, -1])
    full, _ = model(torch.cat([prompt, tokens[:, :-1]], dim=1))
    P = prompt.shape[1]
    return (torch.stack(stepped, 1) - full[:, P - 1 :]).abs().max().item()


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = select_rows(args)
    context = max(args.prompts) + args.new_tokens
    models: dict[str, LanguageModel] = {}
    built: dict[str, list[str]] = {}
    errors: dict[str, str] = {}
    for row in rows:
        try:
            models[row.label], built[row.label] = build(row, args.overrides, context)
        except (ConfigError, ValueError, RuntimeError) as exc:
            errors[row.label] = f"not built: {exc}"
    now = CLOCKS[args.clock]
    vocab = min(m.config.vocab_size for m in models.values()) if models else 1
    gen = torch.Generator().manual_seed(0)
    prompts = {
        (B, P): torch.randint(0, vocab, (B, P), generator=gen)
        for B in args.batch_sizes
        for P in args.prompts
    }
    diffs: dict[str, float] = {}
    first = prompts[(args.batch_sizes[0], args.prompts[0])]
    for label, model in models.items():
        _, _, tokens = timed_generate(model, first, args.new_tokens, now)  # warm-up
        diffs[label] = reference_diff(model, first, tokens)
    best: dict[tuple[str, int, int], list[float]] = {}
    total = args.repeats * len(prompts) * len(models)
    done = 0
    for rep in range(args.repeats):
        for (B, P), prompt in prompts.items():
            for label, model in models.items():
                done += 1
                prefill, decode, _ = timed_generate(model, prompt, args.new_tokens, now)
                old = best.get((label, B, P), [float("inf"), float("inf")])
                best[(label, B, P)] = [min(old[0], prefill), min(old[1], decode)]
                log(
                    f"[{done}/{total}] rep {rep + 1} B={B} P={P} {label}: prefill "
                    f"{prefill * 1e3:,.0f} ms, decode {B * (args.new_tokens - 1) / decode:,.0f} "
                    "tok/s"
                )
    results = []
    for row in rows:
        if row.label in errors:
            results.append({"label": row.label, "config": row.config, "error": errors[row.label]})
            continue
        model = models[row.label]
        cells = []
        for B in args.batch_sizes:
            for P in args.prompts:
                prefill, decode = best[(row.label, B, P)]
                cells.append(
                    {
                        "batch_size": B,
                        "prompt": P,
                        "prefill_s": prefill,
                        "prefill_tokens_per_s": B * P / prefill,
                        "decode_s": decode,
                        "decode_tokens_per_s": B * (args.new_tokens - 1) / decode,
                        "ms_per_step": 1e3 * decode / (args.new_tokens - 1),
                    }
                )
        results.append(
            {
                "label": row.label,
                "config": row.config,
                "overrides": built[row.label],
                "model": model.config.name,
                "params": count_parameters(model),
                "max_abs_diff": diffs[row.label],
                "cells": cells,
            }
        )
    add_ratios(results, args.ratio_to)
    return {
        "benchmark": "decode",
        "device": "cpu",
        "device_name": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "load_average": [round(x, 2) for x in os.getloadavg()]
        if hasattr(os, "getloadavg")
        else None,
        "batch_sizes": args.batch_sizes,
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "ratio_to": args.ratio_to,
        "rows": results,
    }


def add_ratios(rows: list[dict[str, Any]], ref: str) -> None:
    """Each cell's ``ratio`` (decode tokens/s over the ``ref`` row's at the same ``B, P``) and each
    row's ``flat`` per batch size (decode tokens/s at the longest prompt over the shortest)."""
    match = [r for r in rows if "cells" in r and ref in (r["label"], r["model"])]
    cells = match[0]["cells"] if match else []
    ref_rate = {(c["batch_size"], c["prompt"]): c["decode_tokens_per_s"] for c in cells}
    for row in rows:
        for cell in row.get("cells", []):
            key = (cell["batch_size"], cell["prompt"])
            cell["ratio"] = cell["decode_tokens_per_s"] / ref_rate[key] if match else None
        flat = {}
        for B in {c["batch_size"] for c in row.get("cells", [])}:
            by_prompt = sorted((c["prompt"], c["decode_tokens_per_s"]) for c in row["cells"]
                               if c["batch_size"] == B)  # fmt: skip
            flat[str(B)] = by_prompt[-1][1] / by_prompt[0][1]
        row["flat"] = flat


def markdown_report(report: dict[str, Any]) -> str:
    headers = ["model", "B", "prompt", "prefill ms", "prefill tok/s", "decode tok/s", "ms/token"]
    headers += [f"vs {report['ratio_to']}", "flat", "max |diff|"]
    table = []
    for r in report["rows"]:
        if "error" in r:
            table.append([r["label"], "-", "-", r["error"], *["-"] * 6])
            continue
        for c in r["cells"]:
            ratio = "-" if c["ratio"] is None else f"{c['ratio']:.2f}x"
            table.append(
                [
                    r["label"],
                    c["batch_size"],
                    c["prompt"],
                    c["prefill_s"] * 1e3,
                    c["prefill_tokens_per_s"],
                    c["decode_tokens_per_s"],
                    c["ms_per_step"],
                    ratio,
                    f"{r['flat'][str(c['batch_size'])]:.2f}",
                    f"{r['max_abs_diff']:.1e}",
                ]
            )
    load = report["load_average"]
    return (
        summary_table(report)
        + "\n\n"
        + f"Greedy decoding on {report['device']} ({report['device_name']}, {report['threads']} "
        f"threads, torch {report['torch']}, {report['clock']} clock"
        + (f", load average {load[0]}" if load else "")
        + f"): best of {report['repeats']} turns; decode = {report['new_tokens'] - 1} tokens "
        "after the first; flat = decode tok/s at the longest prompt / the shortest.\n\n"
        + markdown_table(headers, table)
    )


def summary_table(report: dict[str, Any]) -> str:
    """One row per model: decode tok/s per ``(B, P)`` with the ratio to the reference row."""
    keys = [(B, P) for B in report["batch_sizes"] for P in report["prompts"]]
    headers = ["decode tok/s", *(f"B={B} P={P}" for B, P in keys)]
    table = []
    for r in report["rows"]:
        if "error" in r:
            table.append([r["label"], *["-"] * len(keys)])
            continue
        cells = {(c["batch_size"], c["prompt"]): c for c in r["cells"]}
        table.append([r["label"], *(_rate(cells[key]) for key in keys)])
    return markdown_table(headers, table)


def _rate(cell: dict[str, Any]) -> str:
    ratio = "" if cell["ratio"] is None else f" ({cell['ratio']:.2f}x)"
    return f"{cell['decode_tokens_per_s']:,.0f}{ratio}"


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected ints >= 1, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="nestlearn bench decode", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("words", nargs="*", metavar="CONFIG | section.key=value")
    parser.add_argument("--models", help="'all' (default) or comma-separated architectures")
    parser.add_argument("--size", choices=("tiny", "demo"), default="tiny")
    parser.add_argument("--batch-sizes", type=_int_list, default=[1, 8])
    parser.add_argument("--prompts", type=_int_list, default=[128, 1024, 4096])
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per generate call")
    parser.add_argument("--repeats", type=int, default=1, help="turns over every model")
    parser.add_argument("--quick", action="store_true", help="prompts 128,1024, 16 new tokens")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--ratio-to", default="transformer", help="label or model of the ref row")
    parser.add_argument("--json", help="write the report as JSON")
    parser.add_argument("--markdown", help="write the table as markdown")
    parser.add_argument("--out", help="folder for decode.json and decode.md")
    args = parser.parse_args(argv)
    args.configs = [w for w in args.words if "=" not in w]
    args.overrides = [w for w in args.words if "=" in w]
    if args.quick:
        args.prompts, args.new_tokens = [128, 1024], 16
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (the first token closes the prefill)")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.threads < 0:
        parser.error("--threads must be >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args)
    text = markdown_report(report)
    print(text)
    outputs = [(args.json, json.dumps(report, indent=2)), (args.markdown, text)]
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        outputs += [(folder / "decode.json", json.dumps(report, indent=2)),
                    (folder / "decode.md", text)]  # fmt: skip
    for path, content in outputs:
        if path:
            Path(path).write_text(content + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
