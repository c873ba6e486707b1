"""Zero-shot commonsense tasks through lm-evaluation-harness (SPEC §6; optional ``lm_eval``).

The paper reports LAMBADA, PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, SIQA and BoolQ (the
Titans / Gated DeltaNet protocol): zero-shot, accuracy, normalised accuracy (``acc_norm``) for
HellaSwag and ARC-c, and their mean. :func:`lm_eval_model` wraps a nestlearn model and tokenizer
as an lm-eval ``LM`` (the maths is :class:`~nestlearn.experiments.lm_scorer.LMScorer`), and
:func:`evaluate_tasks` runs lm-eval's own task definitions on it. lm-eval reads its data sets
through ``datasets`` (downloads unless cached); ``--include-path`` adds local task YAMLs.

``nestlearn experiment zero_shot [--checkpoint DIR | --model NAME] [--tasks a,b] [--limit N]``
writes ``result.json``, ``results.md`` and ``accuracy.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nestlearn.data.tokenizer import Tokenizer
from nestlearn.errors import ConfigError, DataError, require
from nestlearn.eval.figures import save_figure
from nestlearn.eval.results import write_result
from nestlearn.experiments.lm_scorer import LMScorer
from nestlearn.experiments.model_source import add_model_args, add_run_args, model_from_args
from nestlearn.experiments.seeds import resolve_seeds
from nestlearn.models.base import LanguageModel
from nestlearn.train.report import markdown_table

NAME = "zero_shot"
# lm-eval task -> the metric the paper reports for it.
PAPER_TASKS = {
    "lambada_openai": "acc",
    "piqa": "acc",
    "hellaswag": "acc_norm",
    "winogrande": "acc",
    "arc_easy": "acc",
    "arc_challenge": "acc_norm",
    "social_iqa": "acc",
    "boolq": "acc",
}


def lm_eval_model(model: LanguageModel, tokenizer: Tokenizer, **kwargs: Any):
    """An ``lm_eval.api.model.LM`` answering with ``model`` (kwargs: see :class:`LMScorer`)."""
    api = require("lm_eval.api.model", "lmeval", "lm_eval")

    class NestlearnLM(LMScorer, api.LM):
        def __init__(self) -> None:
            api.LM.__init__(self)
            LMScorer.__init__(self, model, tokenizer, **kwargs)

    return NestlearnLM()


def headline_metric(task: str, metrics: dict[str, float]) -> str | None:
    """The metric reported for ``task``: the paper's choice, else ``acc``, else none."""
    if task in PAPER_TASKS and PAPER_TASKS[task] in metrics:
        return PAPER_TASKS[task]
    return "acc" if "acc" in metrics else None


def evaluate_tasks(
    lm: Any,
    tasks: Sequence[str],
    include_path: str | None = None,
    limit: int | None = None,
    num_fewshot: int = 0,
    seed: int = 0,
    include_defaults: bool = True,
) -> dict[str, Any]:
    """Run lm-eval's ``simple_evaluate``; return ``{"tasks": {task: {metric: value}},
    "headline": {task: (metric, value)}, "average": mean of the headline values}``.

    ``include_defaults=False`` indexes only the tasks under ``include_path`` (much faster)."""
    lm_eval = require("lm_eval", "lmeval", "lm_eval")
    from lm_eval.tasks import TaskManager

    options: dict[str, Any] = {"include_path": include_path} if include_path else {}
    if not include_defaults:
        if not include_path:
            raise ConfigError("--only-include-path needs --include-path")
        options["include_defaults"] = False
    manager = TaskManager(**options)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"lm-eval knows no task {unknown}; see `lm_eval ls tasks`, or add YAMLs with "
            "--include-path"
        )
    try:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            bootstrap_iters=0,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except Exception as exc:
        if not _is_network_error(exc):
            raise
        raise DataError(offline_message(tasks, exc)) from exc
    per_task: dict[str, dict[str, float]] = {}
    for task, values in out["results"].items():
        metrics = {}
        for key, value in values.items():
            name, _, filt = key.partition(",")
            if filt == "none" and isinstance(value, (int, float)) and "stderr" not in name:
                metrics[name] = float(value)
        per_task[task] = metrics
    headline = {}
    for task in tasks:
        metric = headline_metric(task, per_task.get(task, {}))
        if metric is not None:
            headline[task] = (metric, per_task[task][metric])
    average = float(np.mean([v for _, v in headline.values()])) if headline else None
    return {"tasks": per_task, "headline": headline, "average": average}


def _is_network_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a failed connection: ``datasets``
    raises the built-in ``ConnectionError`` ("Couldn't reach ... on the Hub"), ``requests`` its
    own ``ConnectionError`` / ``Timeout``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ConnectionError, TimeoutError)):
            return True
        if type(current).__module__.startswith("requests") and type(current).__name__ in (
            "ConnectionError",
            "ConnectTimeout",
            "ReadTimeout",
            "Timeout",
        ):
            return True
        current = current.__cause__ or current.__context__
    return False


def offline_message(tasks: Sequence[str], exc: BaseException) -> str:
    """One line: the tasks' data could not be downloaded, and how to run without a network."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return (
        f"the data of lm-eval task(s) {', '.join(tasks)} could not be downloaded ({reason}); "
        "to run offline, download them once with a network (they stay in the datasets cache, "
        "then set HF_DATASETS_OFFLINE=1), or point --include-path at task YAMLs whose "
        "dataset_path reads local files (e.g. dataset_path: json with data_files), "
        "with --only-include-path"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"nestlearn experiment {NAME}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(parser)
    parser.add_argument(
        "--tasks", default=",".join(PAPER_TASKS), help="comma-separated lm-eval task names"
    )
    parser.add_argument("--include-path", help="folder of extra lm-eval task YAMLs")
    parser.add_argument(
        "--only-include-path",
        action="store_true",
        help="index only the --include-path tasks, not lm-eval's built-in ones (faster)",
    )
    parser.add_argument("--limit", type=int, help="examples per task (default: all)")
    parser.add_argument("--num-fewshot", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    add_run_args(parser, f"runs/experiments/{NAME}")
    return parser


def main(argv: Sequence[str] = ()) -> int:
    args = build_parser().parse_intermixed_args(list(argv))
    resolve_seeds(args)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--tasks is empty: name at least one lm-eval task")
    if args.limit is not None and args.limit <= 0:
        raise ConfigError("--limit must be > 0")
    require("lm_eval", "lmeval", "lm_eval")
    if args.no_progress:
        os.environ["TQDM_DISABLE"] = "1"  # lm-eval's own progress bars (tqdm >= 4.66)
    source = model_from_args(args)
    lm = lm_eval_model(source.model, source.tokenizer, batch_size=args.batch_size)
    result = evaluate_tasks(
        lm,
        tasks,
        args.include_path,
        args.limit,
        args.num_fewshot,
        seed=args.seed,
        include_defaults=not args.only_include_path,
    )
    record = {
        "model": source.name,
        "protocol": {"num_fewshot": args.num_fewshot, "limit": args.limit, "tasks": tasks},
        "tasks": result["tasks"],
        "headline": {t: {"metric": m, "value": v} for t, (m, v) in result["headline"].items()},
        "average": result["average"],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    if record["headline"]:
        figures.append(plot_accuracy(record, out / "accuracy.png").name)
    names = list(record["headline"])
    write_result(
        out, NAME, args=vars(args), headers=["model", *names, "average"],
        rows=[[source.name, *(record["headline"][t]["value"] for t in names), record["average"]]],
        figures=figures, results=record, markdown=render_table(record),
    )  # fmt: skip
    print(f"{NAME}, {source.name}: {summary(tasks, record)}; results in {out}")
    return 0


def summary(tasks: Sequence[str], record: dict[str, Any]) -> str:
    """``average X over N task(s)``, N counting only the tasks that have a headline metric, and
    the requested tasks that have none."""
    counted = len(record["headline"])
    average = "n/a" if record["average"] is None else f"{record['average']:.4f}"
    text = f"average {average} over {counted} task{'' if counted == 1 else 's'}"
    missing = [t for t in tasks if t not in record["headline"]]
    if missing:
        text += f" ({', '.join(missing)}: no accuracy metric, not averaged)"
    return text


def render_table(record: dict[str, Any]) -> str:
    rows = []
    for task, metrics in record["tasks"].items():
        head = record["headline"].get(task)
        rows.append(
            [
                task,
                "" if head is None else f"{head['metric']} {head['value']:.4f}",
                ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())),
            ]
        )
    average = record["average"]
    rows.append(["**average**", "" if average is None else f"{average:.4f}", ""])
    limit = record["protocol"]["limit"]
    return (
        f"# Zero-shot: {record['model']}\n\n"
        f"{record['protocol']['num_fewshot']}-shot, "
        f"{'all examples' if limit is None else f'{limit} examples per task'}.\n\n"
        + markdown_table(["task", "reported", "all metrics"], rows)
    )


def plot_accuracy(record: dict[str, Any], path: Path) -> Path:
    names = list(record["headline"])
    values = [record["headline"][t]["value"] for t in names]

    def draw(fig) -> None:
        ax = fig.subplots()
        ax.bar(range(len(names)), values, color="C0")
        if record["average"] is not None:
            ax.axhline(record["average"], color="k", lw=1, ls="--", label="average")
            ax.legend(fontsize=8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([f"{t}\n({record['headline'][t]['metric']})" for t in names], fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(f"zero-shot: {record['model']}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)

    return save_figure(path, draw, (max(5.0, 1.1 * len(names)), 4.0))
