"""``nestlearn demo [overrides]``: the main job.

Trains every run listed in ``configs/demo.yaml`` (a Transformer++, a recurrent baseline and HOPE)
on the same data (the Python standard library's source by default) and the same token stream
(equal data settings, seed, batch size, sequence length and steps: the demo refuses a spec where
they differ) and writes ``runs/demo/``: ``summary.md`` (one results table, the unigram
baseline, samples), ``loss.png`` (all curves), ``metrics.jsonl`` and ``results.json``, and one
folder per run with its checkpoint, metrics, curve and ``sample.txt``. The demo owns its output
folder: each run's folder is emptied first (refused while another process trains in it).

A run that fails (a non-finite loss, a bad setting, a bug) does not stop the demo: it is marked
failed in the table, its error is listed under "Failed runs" and in ``results.json``, and the
other runs go on. The command then exits with status 1 (after writing the report); 0 means every
run finished.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nestlearn.config import load_config, parse_overrides
from nestlearn.config.loader import find_config, read_yaml
from nestlearn.config.schema import RunConfig
from nestlearn.data import prepare_data
from nestlearn.errors import ConfigError, NestlearnError
from nestlearn.models.summary import count_parameters
from nestlearn.train import Trainer, TrainResult
from nestlearn.train.metrics import read_metrics
from nestlearn.train.report import markdown_table, plot_losses, write_markdown
from nestlearn.train.run_lock import RunLock
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


@dataclass
class DemoRun:
    """One run of the demo: its result (for a failed run, how far it got; None if it failed
    before its model was built), its sample, or the error that stopped it."""

    cfg: RunConfig
    result: TrainResult | None = None
    sample: str = ""
    error: str = ""  # "ErrorClass: message" of a failed run

    @property
    def failed(self) -> bool:
        return bool(self.error)

    @property
    def step(self) -> int:
        return self.result.step if self.result else 0


def run(args: argparse.Namespace) -> int:
    spec = load_demo_spec(args.spec)
    out = Path(args.out or spec.get("out_dir", "runs/demo"))
    if out.exists() and not out.is_dir():
        raise ConfigError(f"the demo's output folder {out} is a file; pass --out with a folder")
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
    runs: list[DemoRun] = []
    for cfg in configs:
        print(f"\n== {cfg.name}: {cfg.model.name}, {cfg.train.steps} steps ==")
        done = _train_one(cfg, corpus)
        runs.append(done)
        if done.result is not None and done.result.interrupted:
            break
    _write_demo_report(out, runs, corpus, time.perf_counter() - started)
    print((out / "summary.md").read_text())
    failed = [r.cfg.name for r in runs if r.failed]
    if failed:
        print(
            f"nestlearn demo: {len(failed)} of {len(runs)} runs failed ({', '.join(failed)}); "
            f"the others are reported in {out / 'summary.md'}",
            file=sys.stderr,
        )
        return 1
    return 0


def _train_one(cfg: RunConfig, corpus) -> DemoRun:
    """Train one run into its (emptied) folder; a failure is recorded, not raised, so the demo
    goes on with the other runs. Only errors of nestlearn's own kind print without traceback."""
    trainer: Trainer | None = None
    lock: RunLock | None = None
    try:
        lock = RunLock(cfg.train.out_dir).acquire()  # not a folder another process trains in
        _empty_folder(Path(cfg.train.out_dir), keep=lock.path)
        trainer = Trainer(cfg, corpus=corpus, _lock=lock)
        result = trainer.fit()  # lets go of the folder when done
    except Exception as exc:
        if lock is not None:
            lock.release()
        if not isinstance(exc, NestlearnError):
            traceback.print_exc()
        error = f"{type(exc).__name__}: {exc}"
        print(f"nestlearn demo: run {cfg.name} failed: {error}", file=sys.stderr)
        return _failed_run(cfg, trainer, error)
    sample = _sample(trainer)
    atomic_write_text(Path(cfg.train.out_dir) / "sample.txt", sample + "\n")
    print(f"-- sample --\n{sample}\n")
    return DemoRun(trainer.cfg, result, sample)


def _failed_run(cfg: RunConfig, trainer: Trainer | None, error: str) -> DemoRun:
    """The failed run's record: how far its trainer got, as a :class:`TrainResult`."""
    if trainer is None:  # failed before its model was built
        return DemoRun(cfg, error=error)
    trainer.close()
    try:
        unigram = trainer.unigram_baseline()
    except Exception:  # the report goes on without it
        unigram = {}
    seconds = trainer.train_seconds
    result = TrainResult(
        run_dir=trainer.run_dir,
        step=trainer.step,
        interrupted=False,
        n_params=count_parameters(trainer.model),
        tokens_seen=trainer.tokens_seen,
        train_seconds=seconds,
        tokens_per_s=trainer.tokens_seen / seconds if seconds > 0 else 0.0,
        final_eval={},
        unigram_eval=unigram,
        checkpoint=trainer.last_checkpoint,
    )
    return DemoRun(trainer.cfg, result, error=error)


def _empty_folder(folder: Path, keep: Path) -> None:
    """The demo owns its runs' folders: clear one for a fresh run (its lock file stays)."""
    for entry in folder.iterdir():
        if entry == keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


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


def _steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def _status(run: DemoRun, budget_tokens: int) -> str:
    if run.failed or run.result is None:
        return "failed"
    if run.result.interrupted:
        return "interrupted"
    return "finished" if run.result.tokens_seen == budget_tokens else "stopped early"


def _write_demo_report(out: Path, runs: list[DemoRun], corpus, wall_seconds: float) -> None:
    curves, lines, table, records = {}, [], [], []
    budget = token_stream(runs[0].cfg)
    budget_tokens = budget[0] * budget[1] * budget[2] * budget[3]
    timed = [r for r in runs if not r.failed and r.result.tokens_per_s > 0]
    ref_name, ref = (timed[0].cfg.name, timed[0].result.tokens_per_s) if timed else ("-", 0.0)
    for run in runs:
        cfg, result = run.cfg, run.result
        tokens_seen = result.tokens_seen if result else 0
        tokens_per_s = result.tokens_per_s if result else 0.0
        train_seconds = result.train_seconds if result else 0.0
        metrics = read_metrics(Path(cfg.train.out_dir) / "metrics.jsonl")
        curves[cfg.name] = metrics
        lines += [json.dumps({"run": cfg.name, **m}) for m in metrics]
        ev = result.final_eval if result is not None else {}
        status = _status(run, budget_tokens)
        ratio = ref / tokens_per_s if ref and tokens_per_s > 0 else None
        if run.failed:
            tokens: object = f"failed after {_steps(run.step)} ({run.error.split(':')[0]})"
        elif status == "finished":
            tokens = tokens_seen
        else:
            tokens = f"{tokens_seen:,} (stopped early)"
        table.append(
            [
                cfg.name,
                cfg.model.name,
                result.n_params if result else "-",
                tokens,
                ev.get("ppl", "-" if run.failed else float("nan")),
                ev.get("bpb", "-" if run.failed else float("nan")),
                tokens_per_s if tokens_per_s > 0 else "-",
                f"{ratio:.2f}x" if ratio is not None else "-",
                train_seconds if train_seconds > 0 else "-",
            ]
        )
        records.append(
            {
                "run": cfg.name,
                "model": cfg.model.name,
                "status": status,
                "error": run.error or None,
                "params": result.n_params if result else None,
                "steps": run.step,
                "tokens": tokens_seen,
                "complete": status == "finished",
                "val": ev,
                "tokens_per_s": tokens_per_s,
                "time_per_token_ratio": ratio,
                "train_seconds": train_seconds,
                "checkpoint": str(result.checkpoint) if result and result.checkpoint else None,
                "interrupted": status == "interrupted",
            }
        )
    uni = next((r.result.unigram_eval for r in runs if r.result and r.result.unigram_eval), None)
    if uni is not None:
        table.append(
            [
                "unigram (add-one)",
                "-",
                corpus.tokenizer.vocab_size,
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
                "failed": [r.cfg.name for r in runs if r.failed],
                "unigram": uni,
                "val_tokens": int(uni["tokens"]) if uni else None,
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
    samples = "\n".join(
        f"### {r.cfg.name}\n\n```text\n{r.sample}\n```\n" for r in runs if not r.failed
    )
    failures = "".join(
        f"- **{r.cfg.name}** (`{r.cfg.model.name}`), after {_steps(r.step)}: {r.error}\n"
        for r in runs
        if r.failed
    )
    if failures:
        failures = (
            "\n## Failed runs\n\nThese runs stopped with an error (the table shows how far "
            "they got); the demo went on with the others.\n\n" + failures
        )
    validation = (
        f"Validation on {int(uni['tokens']):,} held-out tokens; the unigram row is a "
        "bag-of-tokens model fitted on the training split, the floor every model must beat. "
        if uni
        else ""
    )
    load = machine["load_average"]
    write_markdown(
        out / "summary.md",
        "# nestlearn demo\n\n"
        f"Corpus `{runs[0].cfg.data.source}`: {corpus.train_docs:,} training / "
        f"{corpus.val_docs:,} held-out documents (split by file), tokenizer "
        f"`{corpus.tokenizer.kind}` ({corpus.tokenizer.vocab_size:,} tokens). Every run trains "
        f"on the same {budget_tokens:,} tokens (same batches, in the same order). "
        + validation
        + f"`time/token` is the run's training time per token relative to {ref_name}'s (the "
        "first run that finished; training throughput on this machine, not a property of the "
        "architecture alone).\n\n"
        + markdown_table(headers, table)
        + f"\nDemo wall-clock (data preparation included): {wall_seconds / 60:.1f} min on "
        f"{machine['cpus']} CPUs, torch threads: {machine['threads']}"
        + (f", load average {load[0]:.1f} at the end" if load else "")
        + ".\n"
        + failures
        + "\n![loss curves](loss.png)\n\n## Samples\n\n"
        + samples,
    )


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()
