"""``experiment zero_shot`` end to end with a stand-in for lm_eval (runs without it installed):
the summary line counts only averaged tasks; a failed download is one clear error line."""

from __future__ import annotations

import sys
from types import ModuleType

import pytest

from nestlearn.cli.main import main
from nestlearn.errors import DataError
from nestlearn.experiments import run_experiment

TINY = ["--model=gated_deltanet", "model.d_model=16", "model.n_layers=1", "model.n_heads=2"]


def stand_in_lm_eval(monkeypatch, simple_evaluate) -> None:
    """Install fake ``lm_eval``, ``lm_eval.api.model`` and ``lm_eval.tasks`` modules."""

    class LM:
        def __init__(self) -> None:
            pass

    class TaskManager:
        def __init__(self, **options) -> None:
            self.all_tasks = ["piqa", "lambada_openai", "my_ppl_task"]

    root, api, model, tasks = (
        ModuleType(n) for n in ("lm_eval", "lm_eval.api", "lm_eval.api.model", "lm_eval.tasks")
    )
    root.simple_evaluate = simple_evaluate
    model.LM = LM
    tasks.TaskManager = TaskManager
    for module in (root, api, model, tasks):
        monkeypatch.setitem(sys.modules, module.__name__, module)


def test_the_summary_counts_only_the_averaged_tasks(monkeypatch, tmp_path, capsys):
    def simple_evaluate(**kwargs):
        return {
            "results": {
                "piqa": {"acc,none": 0.5, "acc_stderr,none": 0.1},
                "lambada_openai": {"perplexity,none": 9.0},
                "my_ppl_task": {"word_perplexity,none": 3.0},
            }
        }

    stand_in_lm_eval(monkeypatch, simple_evaluate)
    argv = [*TINY, "--tasks=piqa,lambada_openai,my_ppl_task", f"--out={tmp_path}"]
    assert run_experiment("zero_shot", argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "average 0.5000 over 1 task (" in line
    assert "lambada_openai, my_ppl_task: no accuracy metric" in line


def test_an_offline_download_is_one_line_that_says_how_to_run_offline(
    monkeypatch, tmp_path, capsys
):
    def simple_evaluate(**kwargs):
        # What datasets raises offline (datasets 5): a built-in ConnectionError from a lookup.
        try:
            raise FileNotFoundError("Dataset baber/piqa is not cached")
        except FileNotFoundError as exc:
            raise ConnectionError(
                "Couldn't reach 'baber/piqa' on the Hub (LocalEntryNotFoundError)"
            ) from exc

    stand_in_lm_eval(monkeypatch, simple_evaluate)
    argv = [*TINY, "--tasks=piqa", f"--out={tmp_path}"]
    with pytest.raises(DataError, match=r"task\(s\) piqa could not be downloaded") as info:
        run_experiment("zero_shot", argv)
    message = str(info.value)
    assert "\n" not in message
    assert "HF_DATASETS_OFFLINE=1" in message and "--include-path" in message
    assert main(["experiment", "zero_shot", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "could not be downloaded" in err


def test_other_errors_inside_lm_eval_keep_their_traceback(monkeypatch, tmp_path):
    def simple_evaluate(**kwargs):
        raise KeyError("a bug, not the network")

    stand_in_lm_eval(monkeypatch, simple_evaluate)
    with pytest.raises(KeyError, match="a bug"):
        run_experiment("zero_shot", [*TINY, "--tasks=piqa", f"--out={tmp_path}"])
