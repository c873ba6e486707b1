"""Continual learning: class-incremental text classification (SPEC §6; the paper's CLINC150,
Banking77 and DBpedia setting).

Protocol (``docs/experiments-continual.md``): the classes of a data set are put in a seeded order
and cut into ``T`` tasks of ``K`` classes. The model is fine-tuned on task 0, then task 1, ...
(only the current task's training examples, no replay); classification scores every class name
as a continuation of the prompt (:mod:`nestlearn.experiments.label_scoring`). After task ``i`` it
is tested on the test examples of every task ``j <= i``, choosing among all classes seen so far
(class-incremental: no task id at test time), giving ``R[i, j]``; average accuracy, backward
transfer, forgetting and average incremental accuracy follow
(:mod:`nestlearn.experiments.continual_metrics`).

``nestlearn experiment continual [--data stdlib|clinc150|banking77|dbpedia] [--models NAME ... |
--model NAME | --checkpoint DIR] [--seeds N] [--preset tiny|cpu] [...]`` compares fresh models
(default: hope, hope with CMS level periods across optimizer steps, hope_attention, titans_lmm,
gated_deltanet, transformer), each seed one resumable unit
(:mod:`nestlearn.experiments.model_comparison`), and writes ``result.json``, ``results.md``,
``accuracy.png``, ``metrics.png`` and ``matrices.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from nestlearn.config.schema import OptimConfig
from nestlearn.data.classification import (
    DATASETS,
    ClassificationData,
    LabelledText,
    load_classification,
    per_class,
)
from nestlearn.data.corpus import stable_hash
from nestlearn.errors import ConfigError, NonFiniteLossError
from nestlearn.eval.figures import plot_bars, plot_curves, plot_heatmaps
from nestlearn.eval.results import write_result
from nestlearn.experiments.continual_metrics import continual_metrics
from nestlearn.experiments.label_scoring import LabelScorer
from nestlearn.experiments.model_comparison import (
    ModelSpec,
    add_comparison_args,
    build,
    model_specs,
    parameter_count,
    parameter_counts,
    run_units,
    summary_over_seeds,
)
from nestlearn.experiments.model_source import add_run_args, apply_preset
from nestlearn.experiments.seeds import format_spread, seeds_label
from nestlearn.train.level_steps import LevelSteps
from nestlearn.train.optim import build_optimizer
from nestlearn.train.report import markdown_table

NAME = "continual"
METRIC_KEYS = (
    "average_accuracy",
    "backward_transfer",
    "forgetting",
    "average_incremental_accuracy",
)
# The summary's names of the same numbers, and the table's.
SUMMARY_KEYS = ("ACC", "BWT", "forgetting", "average_incremental_accuracy")
SUMMARY_HEADERS = ["ACC", "BWT", "forgetting", "avg incremental accuracy"]
# Tasks x classes per task, per data set (CLINC150: 150 intents; Banking77: 77; DBpedia: 14).
DEFAULT_SPLITS = {"stdlib": (5, 4), "clinc150": (15, 10), "banking77": (7, 11), "dbpedia": (7, 2)}
# The comparison of issue 15: HOPE, HOPE with CMS level periods across optimizer steps, baselines.
DEFAULT_MODELS = (
    "hope",
    "hope+level_periods",
    "hope_attention",
    "titans_lmm",
    "gated_deltanet",
    "transformer",
)
FIGURES = ("accuracy.png", "metrics.png", "matrices.png")
# The cpu preset's models (d_model 64, 2 blocks, 2 heads) with the MLP / CMS widths that bring
# each to about 150k parameters (byte vocabulary; counts in docs/experiments-continual.md).
CPU_SHARED = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2"]
CPU_SIZES = {
    "hope_attention": ["model.cms_hidden=128"],
    "gated_deltanet": ["model.mlp_hidden=240"],
    "transformer": ["model.mlp_hidden=256"],
}
# ``--pretrained auto``: the perplexity experiment's folder beside ``--out`` (``DIR/continual`` ->
# ``DIR/perplexity``, as the suite lays them out); ``none``: fresh, randomly initialised models.
PRETRAINED_AUTO, PRETRAINED_NONE = "auto", "none"
# Defaults by scale. tiny: the protocol measured in docs/experiments-continual.md on each model's
# NAME-tiny config; cpu: the suite's, fine-tuning the perplexity experiment's trained models (all
# default models x 3 seeds in about 30 CPU-minutes; fresh models at 32 steps a task stayed at
# chance within every task, docs/experiments-continual.md).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "train_per_class": 24, "test_per_class": 12, "steps_per_task": 60, "batch_size": 16,
        "lr": 1e-3, "prompt_len": 96, "eval_batch_size": 32, "default_overrides": [],
        "model_sizes": {}, "pretrained": PRETRAINED_NONE,
    },
    "cpu": {
        "train_per_class": 24, "test_per_class": 6, "steps_per_task": 128, "batch_size": 8,
        "lr": 1e-3, "prompt_len": 64, "eval_batch_size": 32, "default_overrides": CPU_SHARED,
        "model_sizes": CPU_SIZES, "n_seeds": 3, "pretrained": PRETRAINED_AUTO,
    },
}  # fmt: skip


@dataclass
class Task:
    index: int
    classes: list[str]
    train: list[LabelledText]
    test: list[LabelledText]


class Learner(Protocol):
    """What the protocol needs from a classifier that learns."""

    def learn(self, task: Task) -> dict[str, float]:
        """Train on ``task.train``; return statistics to record (e.g. the final loss)."""

    def predict(self, texts: Sequence[str], labels: Sequence[str]) -> list[int]:
        """Index into ``labels`` of each text's predicted class."""


def make_tasks(
    data: ClassificationData,
    n_tasks: int,
    classes_per_task: int,
    train_per_class: int = 0,
    test_per_class: int = 0,
    seed: int = 0,
) -> list[Task]:
    """Cut the classes (in a seeded order) into tasks; ``*_per_class`` caps (0 = all) keep a
    seeded sample of each class's examples."""
    if n_tasks <= 0 or classes_per_task <= 0:
        raise ConfigError("--tasks and --classes-per-task must be > 0")
    train, test = per_class(data.train), per_class(data.test)
    labels = [c for c in data.labels if c in test]
    need = n_tasks * classes_per_task
    if need > len(labels):
        raise ConfigError(
            f"{n_tasks} tasks x {classes_per_task} classes need {need} classes but {data.name} "
            f"has {len(labels)} with test examples; lower --tasks or --classes-per-task"
        )
    labels = sorted(labels, key=lambda c: stable_hash(c, seed))[:need]

    def sample(examples: list[LabelledText], cap: int) -> list[LabelledText]:
        ordered = sorted(examples, key=lambda e: stable_hash(e.text, seed))
        return ordered[:cap] if cap > 0 else ordered

    tasks = []
    for t in range(n_tasks):
        classes = labels[t * classes_per_task : (t + 1) * classes_per_task]
        tasks.append(
            Task(
                t,
                classes,
                [e for c in classes for e in sample(train[c], train_per_class)],
                [e for c in classes for e in sample(test[c], test_per_class)],
            )
        )
    return tasks


def accuracy(learner: Learner, examples: Sequence[LabelledText], labels: Sequence[str]) -> float:
    """Share of ``examples`` whose predicted class (among ``labels``) is their label."""
    if not examples:
        raise ValueError("no test examples to score")
    preds = learner.predict([e.text for e in examples], labels)
    return float(np.mean([labels[p] == e.label for p, e in zip(preds, examples, strict=True)]))


def run_continual(
    learner: Learner, tasks: Sequence[Task], progress: bool = False
) -> dict[str, Any]:
    """The protocol of the module docstring; returns ``R``, the metrics and per-task stats."""
    T = len(tasks)
    R = np.full((T, T), np.nan)
    seen: list[str] = []
    stats = []
    bar = tqdm(total=T, desc="tasks", unit="task", disable=not progress)
    for i, task in enumerate(tasks):
        start = time.perf_counter()
        stats.append(learner.learn(task))
        seen += task.classes
        for j in range(i + 1):
            R[i, j] = accuracy(learner, tasks[j].test, seen)
        stats[-1]["seconds"] = time.perf_counter() - start
        bar.update(1)
        bar.set_postfix(acc=f"{np.nanmean(R[i]):.3f}")
    bar.close()
    return {"accuracy_matrix": R, "metrics": continual_metrics(R), "task_stats": stats}


class LMLearner:
    """Fine-tunes a language model on each task with AdamW (one optimizer for the whole run).

    ``level_periods`` (a ``train.level_periods`` spec, "" = off) steps the parameters it names
    every ``p`` optimizer steps with the gradient summed over those steps, counted across tasks,
    exactly as the trainer does (:class:`~nestlearn.train.level_steps.LevelSteps`; ``cms``: CMS
    level ``l`` every ``C(l)`` steps, SPEC §4 "across steps")."""

    def __init__(
        self,
        scorer: LabelScorer,
        steps_per_task: int,
        batch_size: int,
        lr: float,
        seed: int = 0,
        eval_batch_size: int = 32,
        progress: bool = False,
        level_periods: str = "",
    ) -> None:
        self.scorer = scorer
        self.steps_per_task = steps_per_task
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.progress = progress
        self.optimizer = build_optimizer(scorer.model, OptimConfig(lr=lr, weight_decay=0.0))
        self.level_steps = LevelSteps.from_spec(scorer.model, level_periods)
        self.step = 0  # optimizer steps over all tasks
        self.generator = torch.Generator().manual_seed(seed)

    def learn(self, task: Task) -> dict[str, float]:
        model = self.scorer.model
        model.train()
        losses = []
        bar = tqdm(
            range(self.steps_per_task),
            desc=f"task {task.index}",
            leave=False,
            disable=not self.progress,
        )
        for _ in bar:
            idx = torch.randint(len(task.train), (self.batch_size,), generator=self.generator)
            batch = [task.train[i] for i in idx.tolist()]
            loss = self.scorer.loss([e.text for e in batch], [e.label for e in batch])
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"continual: the loss became non-finite on task {task.index} (optimizer step "
                    f"{self.step}); lower --lr"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if self.level_steps is not None:
                self.level_steps.apply(self.step)
            self.optimizer.step()
            self.step += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        model.eval()
        tail = losses[-max(1, len(losses) // 5) :] if losses else [float("nan")]
        return {"final_loss": float(np.mean(tail)), "steps": len(losses)}

    def predict(self, texts: Sequence[str], labels: Sequence[str]) -> list[int]:
        return self.scorer.predict(texts, labels, self.eval_batch_size)


def load_data(args: argparse.Namespace, n_classes: int, seed: int) -> ClassificationData:
    if args.data != "stdlib":
        return load_classification(args.data, args.data_path)
    if args.data_path:
        raise ConfigError("--data stdlib is built from this Python; it takes no --data-path")
    if args.train_per_class <= 0 or args.test_per_class <= 0:
        raise ConfigError("--data stdlib needs --train-per-class and --test-per-class > 0")
    from nestlearn.experiments.stdlib_topics import stdlib_classification

    return stdlib_classification(n_classes, args.train_per_class, args.test_per_class, seed=seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"nestlearn experiment {NAME}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_comparison_args(parser, DEFAULT_MODELS, level_periods=True)
    parser.add_argument(
        "--preset", default="tiny", choices=list(PRESETS),
        help="scale of the defaults below: tiny (each model's NAME-tiny config, one seed) or cpu "
        "(the suite's: small models of about equal size, 3 seeds); any flag given overrides it",
    )  # fmt: skip
    data = parser.add_argument_group("data")
    data.add_argument("--data", default="stdlib", choices=("stdlib", *DATASETS))
    data.add_argument("--data-path", help="local file/folder of the data set (default: HF cache)")
    data.add_argument("--tasks", type=int, help="number of tasks (default: per data set)")
    data.add_argument("--classes-per-task", type=int, help="classes per task (default: per set)")
    data.add_argument("--train-per-class", type=int, help="0 = all (tiny: 24)")
    data.add_argument("--test-per-class", type=int, help="0 = all (tiny: 12)")
    run = parser.add_argument_group("protocol")
    run.add_argument("--steps-per-task", type=int, help="tiny: 60")
    run.add_argument("--batch-size", type=int, help="tiny: 16")
    run.add_argument("--lr", type=float, help="tiny: 1e-3")
    run.add_argument("--prompt-len", type=int, help="tokens per prompt (tiny: 96)")
    run.add_argument("--eval-batch-size", type=int, help="tiny: 32")
    run.add_argument(
        "--pretrained", metavar="DIR|auto|none",
        help="start each model from its run (same architecture and seed) of `nestlearn "
        "experiment perplexity --preset cpu --out DIR`, training that run first if it is "
        "missing; auto: the perplexity folder beside --out; none: fresh models (tiny: none, "
        "cpu: auto)",
    )  # fmt: skip
    add_run_args(parser, f"runs/experiments/{NAME}")
    return parser


def pretrained_folder(args: argparse.Namespace) -> Path | None:
    """The perplexity experiment's folder the models start from (``--pretrained``), or None for
    fresh models."""
    choice = args.pretrained or PRETRAINED_NONE
    if choice == PRETRAINED_NONE:
        return None
    if choice == PRETRAINED_AUTO:
        return Path(args.out).parent / "perplexity"
    return Path(choice)


def setup_threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def check_args(args: argparse.Namespace) -> tuple[int, int]:
    """Refuse bad sizes before any work; the number of tasks and classes per task."""
    n_tasks, per_task = DEFAULT_SPLITS[args.data]
    n_tasks = args.tasks or n_tasks
    per_task = args.classes_per_task or per_task
    for flag in ("steps_per_task", "batch_size", "prompt_len", "eval_batch_size"):
        if getattr(args, flag) <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be > 0")
    return n_tasks, per_task


def run_one(args: argparse.Namespace, spec: ModelSpec, seed: int) -> dict[str, Any]:
    """One unit: spec's model, seeded by ``seed`` (init, class order, samples, batches)."""
    n_tasks, per_task = check_args(args)
    data = load_data(args, n_tasks * per_task, seed)
    start = pretrained_folder(args)
    if start is not None and spec.checkpoint is None:
        from nestlearn.experiments.perplexity import pretrained_run

        setup_threads(args)
        run_dir = pretrained_run(start, spec.name or "", seed, device=args.device)
        spec = dataclasses.replace(spec, checkpoint=str(run_dir), overrides=())
    source = build(spec, args, seed)
    tasks = make_tasks(data, n_tasks, per_task, args.train_per_class, args.test_per_class, seed)
    scorer = LabelScorer(source.model, source.tokenizer, args.prompt_len)
    scorer.check_fits([c for t in tasks for c in t.classes])
    progress = not args.no_progress
    learner = LMLearner(
        scorer, args.steps_per_task, args.batch_size, args.lr, seed, args.eval_batch_size,
        progress, spec.level_periods,
    )  # fmt: skip
    result = run_continual(learner, tasks, progress=progress)
    return {
        "source": source.name,
        "pretrained": spec.checkpoint is not None,
        "parameters": parameter_count(source),
        "level_periods": spec.level_periods,
        "data": args.data,
        "protocol": {
            "tasks": n_tasks,
            "classes_per_task": per_task,
            "train_per_class": args.train_per_class,
            "test_per_class": args.test_per_class,
            "steps_per_task": args.steps_per_task,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "prompt_len": args.prompt_len,
            "seed": seed,
        },
        "tasks": [t.classes for t in tasks],
        **result,
        "accuracy_matrix": result["accuracy_matrix"].tolist(),
    }


def unit_metrics(record: Mapping[str, Any]) -> dict[str, float | None]:
    """A seed's headline numbers: ACC, BWT, forgetting, average incremental accuracy, every cell
    ``R[i,j]`` (``j <= i``) of its accuracy matrix and ``seen[i] = mean_{j<=i} R[i,j]``."""
    m = record["metrics"]
    numbers: dict[str, float | None] = {
        name: m[key] for name, key in zip(SUMMARY_KEYS, METRIC_KEYS, strict=True)
    }
    for i, row in enumerate(record["accuracy_matrix"]):
        for j in range(i + 1):
            numbers[f"R[{i},{j}]"] = row[j]
        numbers[f"seen[{i}]"] = float(np.mean(row[: i + 1]))
    return numbers


def main(argv: Sequence[str] = ()) -> int:
    args = apply_preset(build_parser().parse_intermixed_args(list(argv)), PRESETS)
    n_tasks, per_task = check_args(args)
    specs = model_specs(args)
    for spec in specs:  # a level-periods spec the model cannot take fails before any unit
        if spec.level_periods:
            LevelSteps.from_spec(build(spec, args, args.seed).model, spec.level_periods)
    records = run_units(args, specs, lambda spec, seed: run_one(args, spec, seed), NAME)
    cells = [f"R[{i},{j}]" for i in range(n_tasks) for j in range(i + 1)]
    cells += [f"seen[{i}]" for i in range(n_tasks)]
    stats = summary_over_seeds(records, specs, unit_metrics, [*SUMMARY_KEYS, *cells])
    # result.json's summary: the headline numbers; the cells' spreads go to tables and figures.
    summary = {label: {k: s[k] for k in SUMMARY_KEYS} for label, s in stats.items()}
    sizes = parameter_counts(records, specs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_comparison(stats, n_tasks, out, seeds_label(args.seeds))
    rows = [
        [label, sizes[label], *(format_spread(s[k]) for k in SUMMARY_KEYS), s["ACC"]["n"]]
        for label, s in summary.items()
    ]
    headers = ["model", "parameters", *SUMMARY_HEADERS, "seeds"]
    write_result(
        out, NAME, args=vars(args), headers=headers, rows=rows, figures=list(FIGURES),
        results=records, markdown=render_table(args, stats, headers, rows, n_tasks),
        summary=summary,
    )  # fmt: skip
    for label, s in summary.items():
        print(
            f"{NAME} on {args.data} ({n_tasks} tasks x {per_task} classes), {label}: "
            f"ACC {format_spread(s['ACC'])}, BWT {format_spread(s['BWT'])}"
        )
    print(f"results in {out}")
    return 0


def mean_matrix(stats: Mapping[str, Any], n_tasks: int) -> list[list[Any]]:
    """``R[i][j]``'s mean over seeds; None above the diagonal."""
    return [
        [stats[f"R[{i},{j}]"]["mean"] if j <= i else None for j in range(n_tasks)]
        for i in range(n_tasks)
    ]


def render_table(
    args: argparse.Namespace,
    summary: Mapping[str, Mapping[str, Any]],
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    n_tasks: int,
) -> str:
    """The metrics per model (mean ± std over seeds) and each model's accuracy matrix."""
    lines = [
        f"# Continual learning: {args.data}, {seeds_label(args.seeds)}\n",
        "Mean ± sample standard deviation over seeds; `parameters`: the model's count (fresh, "
        "or the pretrained run it starts from).\n",
        markdown_table(list(headers), [["—" if v is None else v for v in r] for r in rows]),
    ]
    for label, stats in summary.items():
        cells = [
            [format_spread(stats[f"R[{i},{j}]"]) if j <= i else "" for j in range(n_tasks)]
            for i in range(n_tasks)
        ]
        lines += [
            f"Accuracy R[i, j] on task j after training task i, {label} (mean ± std):\n",
            markdown_table(
                ["after \\ task", *[str(j) for j in range(n_tasks)]],
                [[f"task {i}", *row] for i, row in enumerate(cells)],
            ),
        ]
    return "\n".join(lines)


def plot_comparison(
    summary: Mapping[str, Mapping[str, Any]], n_tasks: int, out: Path, seeds: str
) -> None:
    """``accuracy.png``: mean accuracy on the tasks seen so far and on task 0 after each task;
    ``metrics.png``: ACC, BWT and forgetting; ``matrices.png``: each model's mean ``R``. Curves
    carry a band and bars an error bar of ± the standard deviation over seeds."""
    stages = list(range(n_tasks))
    seen, first, seen_err, first_err = {}, {}, {}, {}
    for label, stats in summary.items():
        seen[label] = (stages, [stats[f"seen[{i}]"]["mean"] for i in stages])
        seen_err[label] = [stats[f"seen[{i}]"]["std"] for i in stages]
        first[label] = (stages, [stats[f"R[{i},0]"]["mean"] for i in stages])
        first_err[label] = [stats[f"R[{i},0]"]["std"] for i in stages]
    plot_curves(
        {"mean over tasks seen so far": seen, "task 0": first}, out / FIGURES[0],
        xlabel="after training task", ylabel="test accuracy",
        title=f"class-incremental accuracy ({seeds})",
        errors={"mean over tasks seen so far": seen_err, "task 0": first_err},
    )  # fmt: skip
    plot_bars(
        {label: {k: s[k]["mean"] for k in ("ACC", "BWT", "forgetting")}
         for label, s in summary.items()},
        out / FIGURES[1], ylabel="accuracy / change in accuracy",
        title=f"ACC, BWT and forgetting ({seeds})",
        errors={label: {k: s[k]["std"] for k in ("ACC", "BWT", "forgetting")}
                for label, s in summary.items()},
    )  # fmt: skip
    plot_heatmaps(
        {label: mean_matrix(stats, n_tasks) for label, stats in summary.items()},
        out / FIGURES[2], rows=[f"task {i}" for i in stages], cols=[str(j) for j in stages],
        xlabel="tested on task j", ylabel="after training task i",
        title=f"accuracy R[i, j], mean over {seeds}",
    )  # fmt: skip
