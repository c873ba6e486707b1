"""``nestlearn demo [overrides]``: the main job.

Trains every run listed in ``configs/demo.yaml`` (a Transformer++, a recurrent baseline and HOPE)
on the same data (the Python standard library's source by default) and the same token stream
(equal data settings, seed, batch size, sequence length and steps: the demo refuses a spec where
they differ) and writes ``runs/demo/``: ``summary.md`` (one results table, the unigram
baseline, samples), ``loss.png`` (all curves), ``metrics.jsonl`` and ``results.json``, and one
folder per run with its checkpoint, metrics, curve and ``sample.txt``. The demo owns its output
folder: each run's folder is recreated.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from nestlearn.config import load_config, parse_overrides
from nestlearn.config.loader import find_config, read_yaml
from nestlearn.config.schema import RunConfig
from nestlearn.data import prepare_data
from nestlearn.errors import ConfigError
from nestlearn.train import Trainer, TrainResult
from nestlearn.train.metrics import read_metrics
from nestlearn.train.report import markdown_table, plot_losses, write_markdown
from nestlearn.utils.io import atomic_write_text


def add_parser(sub, name: str) -> None:
    parser = sub.add_parser(
        name, help="the main job: train the demo models and report", description=__doc__
    )
    parser.add_argument("--spec", default="demo", help="demo spec (named config or .yaml path)")
    parser.add_argument("--out", help="output folder (default: the spec's out_dir)")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="applied to every run"
    )


def load_demo_spec(name_or_path: str) -> dict[str, Any]:
    spec = read_yaml(find_config(name_or_path))
    runs = spec.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ConfigError(f"demo spec '{name_or_path}' needs a non-empty 'runs' list")
    for run in runs:
        if not isinstance(run, dict) or "name" not in run or "config" not in run:
            raise ConfigError(f"demo spec '{name_or_path}': each run needs 'name' and 'config'")
    return spec


def demo_configs(spec: dict[str, Any], out: Path, overrides: list[str]) -> list[RunConfig]:
    """One validated config per run; all must share the data section (one tokenizer)."""
    cli = parse_overrides(overrides)
    configs = []
    for run in spec["runs"]:
        extra = parse_overrides(f"{k}={v}" for k, v in (run.get("overrides") or {}).items())
        for section, values in cli.items():
            if isinstance(values, dict):
                extra.setdefault(section, {}).update(values)
        extra["name"] = run["name"]
        extra.setdefault("train", {})["out_dir"] = str(out / run["name"])
        configs.append(load_config(run["config"], extra))
    data = {str(c.data) for c in configs}
    if len(data) > 1:
        raise ConfigError("every demo run must use the same data.* settings (one corpus)")
    budgets = {c.name: token_stream(c) for c in configs}
    if len(set(budgets.values())) > 1:
        listed = "; ".join(f"{name}: {_stream_text(b)}" for name, b in budgets.items())
        raise ConfigError(
            f"every demo run must train on the same tokens ({listed}); set train.steps, "
            "batch_size, seq_len, grad_accum and seed alike in the runs' configs"
        )
    return configs


def token_stream(cfg: RunConfig) -> tuple[int, int, int, int, int]:
    """What fixes the training batches: ``(steps, grad_accum, batch_size, seq_len, seed)`` (the
    sampler draws batch ``(step, micro_step)`` from ``seed``), hence the tokens trained on."""
    t = cfg.train
    return (t.steps, t.grad_accum, t.batch_size, t.seq_len, t.seed)


def _stream_text(stream: tuple[int, int, int, int, int]) -> str:
    steps, accum, batch, seq, seed = stream
    return f"{steps} steps x {accum} x {batch} x {seq} tokens, seed {seed}"


def run(args: argparse.Namespace) -> int:
    spec = load_demo_spec(args.spec)
    out = Path(args.out or spec.get("out_dir", "runs/demo"))
    configs = demo_configs(spec, out, args.overrides)
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    corpus = prepare_data(configs[0].data, progress=configs[0].train.progress)
    print(
        f"corpus: {configs[0].data.source}: {corpus.train_docs:,} train / {corpus.val_docs:,} "
        f"validation documents, {corpus.train.size:,} / {corpus.val.size:,} tokens "
        f"({corpus.tokenizer.kind}, vocab {corpus.tokenizer.vocab_size:,})"
    )
    steps, accum, batch, seq, _ = token_stream(configs[0])
    print(
        f"{len(configs)} runs ({', '.join(c.model.name for c in configs)}), each on the same "
        f"{steps * accum * batch * seq:,} training tokens"
    )
    results: list[tuple[RunConfig, TrainResult, str]] = []
    for cfg in configs:
        shutil.rmtree(cfg.train.out_dir, ignore_errors=True)
        print(f"\n== {cfg.name}: {cfg.model.name}, {cfg.train.steps} steps ==")
        trainer = Trainer(cfg, corpus=corpus)
        result = trainer.fit()
        sample = _sample(trainer)
        atomic_write_text(Path(cfg.train.out_dir) / "sample.txt", sample + "\n")
        print(f"-- sample --\n{sample}\n")
        results.append((trainer.cfg, result, sample))
        if result.interrupted:
            break
    _write_demo_report(out, results, corpus, time.perf_counter() - started)
    print((out / "summary.md").read_text())
    return 0


def _sample(trainer: Trainer) -> str:
    from nestlearn.cli.generate import stream_text

    buffer = io.StringIO()
    return stream_text(
        trainer.model.eval(),
        trainer.corpus.tokenizer,
        trainer.cfg,
        trainer.runtime.device,
        out=buffer,
    )


def _write_demo_report(out: Path, results, corpus, wall_seconds: float) -> None:
    curves, lines, table, records = {}, [], [], []
    ref_name, ref = results[0][0].name, results[0][1].tokens_per_s
    budget = token_stream(results[0][0])
    budget_tokens = budget[0] * budget[1] * budget[2] * budget[3]
    for cfg, result, _ in results:
        metrics = read_metrics(Path(cfg.train.out_dir) / "metrics.jsonl")
        curves[cfg.name] = metrics
        lines += [json.dumps({"run": cfg.name, **m}) for m in metrics]
        ev = result.final_eval
        complete = result.tokens_seen == budget_tokens
        table.append(
            [
                cfg.name,
                cfg.model.name,
                result.n_params,
                result.tokens_seen if complete else f"{result.tokens_seen:,} (stopped early)",
                ev.get("ppl", float("nan")),
                ev.get("bpb", float("nan")),
                result.tokens_per_s,
                f"{ref / max(result.tokens_per_s, 1e-9):.2f}x",
                result.train_seconds,
            ]
        )
        records.append(
            {
                "run": cfg.name,
                "model": cfg.model.name,
                "params": result.n_params,
                "steps": result.step,
                "tokens": result.tokens_seen,
                "complete": complete,
                "val": ev,
                "tokens_per_s": result.tokens_per_s,
                "time_per_token_ratio": ref / max(result.tokens_per_s, 1e-9),
                "train_seconds": result.train_seconds,
                "checkpoint": str(result.checkpoint),
                "interrupted": result.interrupted,
            }
        )
    uni = results[0][1].unigram_eval
    table.append(
        [
            "unigram (add-one)",
            "-",
            results[0][0].model.vocab_size,
            corpus.train.size,
            uni["ppl"],
            uni["bpb"],
            "-",
            "-",
            "-",
        ]
    )
    machine = {
        "threads": torch_threads(),
        "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "wall_seconds": wall_seconds,
    }
    atomic_write_text(out / "metrics.jsonl", "".join(line + "\n" for line in lines))
    atomic_write_text(
        out / "results.json",
        json.dumps(
            {
                "runs": records,
                "unigram": uni,
                "val_tokens": int(uni["tokens"]),
                "budget_tokens": budget_tokens,
                "machine": machine,
            },
            indent=2,
        )
        + "\n",
    )
    plot_losses(curves, out / "loss.png", title="nestlearn demo")
    headers = [
        "run",
        "model",
        "params",
        "train tokens",
        "val ppl",
        "val bits/byte",
        "train tok/s",
        f"time/token vs {ref_name}",
        "train s",
    ]
    samples = "\n".join(f"### {cfg.name}\n\n```text\n{sample}\n```\n" for cfg, _, sample in results)
    load = machine["load_average"]
    write_markdown(
        out / "summary.md",
        "# nestlearn demo\n\n"
        f"Corpus `{results[0][0].data.source}`: {corpus.train_docs:,} training / "
        f"{corpus.val_docs:,} held-out documents (split by file), tokenizer "
        f"`{corpus.tokenizer.kind}` ({corpus.tokenizer.vocab_size:,} tokens). Every run trains "
        f"on the same {budget_tokens:,} tokens (same batches, in the same order). Validation on "
        f"{int(uni['tokens']):,} held-out tokens; the unigram row is a bag-of-tokens model fitted "
        "on the training split, the floor every model must beat. `time/token` is the run's "
        "training time per token relative to the first run's (training throughput on this "
        "machine, not a property of the architecture alone).\n\n"
        + markdown_table(headers, table)
        + f"\nDemo wall-clock (data preparation included): {wall_seconds / 60:.1f} min on "
        f"{machine['cpus']} CPUs, torch threads: {machine['threads']}"
        + (f", load average {load[0]:.1f} at the end" if load else "")
        + ".\n\n![loss curves](loss.png)\n\n## Samples\n\n"
        + samples,
    )


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()
