"""``nestlearn experiment suite``: parts, order, resume, failures, Ctrl-C, suite.json, report.md.

Most tests run the suite in-process with a fake runner (no subprocess): it stores one unit per
(experiment, model) and, for an assembling run, writes a ``result.json`` from the stored units
as the real experiments do (issue 15 contract).
"""

from __future__ import annotations

import _thread
import dataclasses
import json
import os
import signal
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from nestlearn.errors import ConfigError
from nestlearn.eval.results import write_result
from nestlearn.experiments import EXPERIMENTS, suite
from nestlearn.experiments.seeds import spread
from nestlearn.experiments.suite import build_parser, load_state, options_from_args, run_suite
from nestlearn.experiments.suite_plan import (
    SUITE_MODELS,
    ExperimentSpec,
    SuiteOptions,
    assemble_args,
    module_units,
    plan_parts,
)
from nestlearn.experiments.suite_report import summary_table
from nestlearn.experiments.suite_runner import Outcome, ProcessRunner, Stop, run_parts

SPECS = [
    ExperimentSpec("alpha", ("m1", "m2"), "--models", minutes=3.0),
    ExperimentSpec("beta", ("v1",), "--variants", minutes=1.0),
    ExperimentSpec("gamma", (), minutes=0.5),  # a module naming no units: one process
]
SCORES = {"m1": [1.0, 2.0], "m2": [3.0, 5.0], "v1": [0.5, 0.5], "whole": [7.0, 9.0]}


def _flag_value(args, flag):
    return args[args.index(flag) + 1] if flag in args else None


class FakeRunner:
    """Stands for ``python -m nestlearn experiment ARGS``: stores units, assembles results."""

    def __init__(self, fail=(), on_call=None):
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self.fail = set(fail)
        self.on_call = on_call

    def __call__(self, part, args, stop):
        self.calls.append((part.key, tuple(args)))
        if self.on_call is not None:
            outcome = self.on_call(part, args, stop)
            if outcome is not None:
                return outcome
        if part.key in self.fail:
            return Outcome("failed", 0.1, 1, "Traceback ...\nRuntimeError: boom", tuple(args))
        out = Path(_flag_value(args, "--out"))
        out.mkdir(parents=True, exist_ok=True)
        unit = _flag_value(args, "--models") or _flag_value(args, "--variants")
        if part.unit is not None:
            (out / "units").mkdir(parents=True, exist_ok=True)
            (out / "units" / f"{unit}.json").write_text("{}")
        else:
            flag = "--models" if "--models" in args else "--variants"
            units = list(args[args.index(flag) + 1 :]) if flag in args else ["whole"]
            assert all((out / "units" / f"{u}.json").is_file() for u in units if u != "whole")
            summary = {u: {"score": spread(SCORES[u])} for u in units}
            (out / "fig.png").write_bytes(b"\x89PNG")
            rows = [[u, f"{summary[u]['score']['mean']:.1f}"] for u in units]
            write_result(
                out, part.experiment, args={"seeds": [0, 1], "argv": list(args)},
                headers=["model", "score"], rows=rows, figures=["fig.png"],
                results=[{"model": u, "seed": s, "score": SCORES[u][s]} for u in units
                         for s in (0, 1)], summary=summary,
            )  # fmt: skip
        return Outcome("done", 0.2, 0, "", tuple(args))


def _options(tmp_path, **kw):
    return SuiteOptions(out=tmp_path / "suite", seeds=2, **kw)


def _run(options, runner, specs=SPECS):
    lines: list[str] = []
    rc = run_suite(options, specs=specs, runner=runner, command="nestlearn experiment suite x",
                   emit=lines.append)  # fmt: skip
    return rc, lines


def test_the_suite_runs_every_part_and_writes_suite_json_and_the_report(tmp_path):
    options = _options(tmp_path)
    runner = FakeRunner()
    rc, lines = _run(options, runner)
    assert rc == 0
    keys = [k for k, _ in runner.calls]
    assert sorted(keys) == ["alpha", "alpha/m1", "alpha/m2", "beta", "beta/v1", "gamma"]
    for name in ("alpha", "beta"):  # an experiment is assembled after all of its units
        assert all(keys.index(k) < keys.index(name) for k in keys if k.startswith(name + "/"))
    args = dict(runner.calls)
    out = str(options.out / "alpha")
    assert args["alpha/m2"] == ("alpha", "--preset", "cpu", "--seeds", "2", "--threads", "1",
                                "--no-progress", "--out", out, "--models", "m2")  # fmt: skip
    assert args["alpha"] == (*args["alpha/m2"][:-2], "--models", "m1", "m2")  # the full command
    assert args["beta/v1"][-2:] == ("--variants", "v1")

    record = json.loads((options.out / "suite.json").read_text())
    alpha = record["experiments"]["alpha"]
    assert alpha["status"] == "done"
    assert alpha["summary"]["m2"]["score"]["mean"] == 4.0
    assert alpha["per_seed"] == {"m1": {"0": {"score": 1.0}, "1": {"score": 2.0}},
                                 "m2": {"0": {"score": 3.0}, "1": {"score": 5.0}}}  # fmt: skip
    assert len(alpha["results"]) == 4 and alpha["figures"] == ["alpha/fig.png"]
    assert record["experiments"]["gamma"]["summary"]["whole"]["score"]["mean"] == 8.0
    assert record["parts"]["alpha/m1"]["status"] == "done"
    assert record["machine"]["torch"] and record["command"] == "nestlearn experiment suite x"

    report = (options.out / "report.md").read_text()
    assert "`nestlearn experiment suite x`" in report
    assert "## alpha" in report and "## gamma" in report
    assert "4.0000 ± 1.4142" in report  # m2's score: mean ± sample std over seeds
    assert "![fig](alpha/fig.png)" in report
    command = "nestlearn experiment alpha --preset cpu --seeds 2 --threads 1 --no-progress --out"
    assert f"`{command} {out} --models m1 m2` (done; its processes took 0:00:01)" in report
    assert (options.out / "alpha/fig.png").is_file()  # the link resolves from DIR
    assert "| alpha/m1 | done |" in report
    assert any("start  alpha/m1" in line for line in lines)
    assert any(line.split("] ", 1)[-1].startswith("done   gamma") for line in lines)


def test_a_rerun_skips_done_parts_and_redoes_only_what_is_missing(tmp_path):
    options = _options(tmp_path)
    assert _run(options, FakeRunner())[0] == 0
    again = FakeRunner()
    assert _run(options, again)[0] == 0
    assert again.calls == []
    (options.out / "alpha" / "result.json").unlink()  # an assembled result went missing
    third = FakeRunner()
    assert _run(options, third)[0] == 0
    assert [k for k, _ in third.calls] == ["alpha"]
    # A changed command (another seed count) is not the part that ran: it runs again.
    fourth = FakeRunner()
    assert _run(SuiteOptions(out=options.out, seeds=3, only=("beta",)), fourth)[0] == 0
    assert [k for k, _ in fourth.calls] == ["beta/v1", "beta"]


def test_only_and_skip_run_the_suite_in_pieces(tmp_path):
    options = _options(tmp_path, only=("alpha", "gamma"), skip=("gamma",))
    runner = FakeRunner()
    assert _run(options, runner)[0] == 0
    assert sorted(k for k, _ in runner.calls) == ["alpha", "alpha/m1", "alpha/m2"]
    record = json.loads((options.out / "suite.json").read_text())
    assert record["experiments"]["beta"] == {"status": "not run"}
    assert "No result (not run)" in (options.out / "report.md").read_text()
    rest = FakeRunner()
    assert _run(_options(tmp_path, skip=("alpha",)), rest)[0] == 0
    assert sorted(k for k, _ in rest.calls) == ["beta", "beta/v1", "gamma"]
    record = json.loads((options.out / "suite.json").read_text())
    assert all(e["status"] == "done" for e in record["experiments"].values())


def test_a_failing_part_is_recorded_and_the_others_go_on(tmp_path):
    options = _options(tmp_path)
    runner = FakeRunner(fail={"alpha/m2"})
    rc, lines = _run(options, runner)
    assert rc == 1
    args = dict(runner.calls)
    assert args["alpha"][-2:] == ("--models", "m1")  # assembled from the unit that succeeded
    assert list(json.loads((options.out / "alpha/result.json").read_text())["summary"]) == ["m1"]
    assert "beta" in args and "gamma" in args
    state = load_state(options.out)
    assert state["parts"]["alpha/m2"]["status"] == "failed"
    assert state["parts"]["alpha/m2"]["returncode"] == 1
    assert "RuntimeError: boom" in state["parts"]["alpha/m2"]["stderr_tail"]
    report = (options.out / "report.md").read_text()
    assert "### alpha/m2 failed (exit 1)" in report and "RuntimeError: boom" in report
    assert any("failed alpha/m2" in line and "RuntimeError: boom" in line for line in lines)
    assert any(line.startswith("not done: alpha/m2 ") for line in lines)
    assert (
        json.loads((options.out / "suite.json").read_text())["experiments"]["alpha"]["status"]
        == "partial"
    )
    # The rerun retries the failed unit and assembles the full command; nothing else runs.
    retry = FakeRunner()
    assert _run(options, retry)[0] == 0
    assert [k for k, _ in retry.calls] == ["alpha/m2", "alpha"]
    assert dict(retry.calls)["alpha"] == (*args["alpha"][:-1], "m1", "m2")
    record = json.loads((options.out / "suite.json").read_text())
    assert record["experiments"]["alpha"]["status"] == "done"
    assert "failed (exit" not in (options.out / "report.md").read_text()


def test_an_experiment_whose_units_all_failed_is_not_assembled(tmp_path):
    options = _options(tmp_path, only=("alpha",))
    runner = FakeRunner(fail={"alpha/m1", "alpha/m2"})
    assert _run(options, runner)[0] == 1
    assert "alpha" not in dict(runner.calls)
    assert load_state(options.out)["parts"]["alpha"]["status"] == "skipped"


def test_assemble_args_name_the_units_that_succeeded():
    part = next(p for p in plan_parts(SPECS, SuiteOptions(out=Path("d"))) if p.key == "alpha")
    assert assemble_args(part, ["alpha/m1", "alpha/m2"]) == part.args
    assert part.args[-3:] == ("--models", "m1", "m2")
    assert assemble_args(part, ["alpha/m2"]) == (*part.args[:-3], "--models", "m2")
    assert assemble_args(part, []) is None


def test_parts_run_longest_first_and_measured_times_reorder_them(tmp_path):
    options = _options(tmp_path, jobs=1)
    parts = plan_parts(SPECS, options)
    # alpha's 3 minutes split evenly by weight (unknown models weigh 1): 1.5 each; beta 1; gamma 0.5
    assert [(p.key, p.estimate_s) for p in parts[:4]] == [
        ("alpha/m1", 90.0), ("alpha/m2", 90.0), ("beta/v1", 60.0), ("gamma", 30.0)]  # fmt: skip
    runner = FakeRunner()
    run_parts(parts, runner, jobs=1, done={})
    # An assembling run starts as soon as its units ended, ahead of waiting units.
    assert [k for k, _ in runner.calls] == ["alpha/m1", "alpha/m2", "alpha", "beta/v1", "beta",
                                            "gamma"]  # fmt: skip
    measured = {"gamma": 600.0, "alpha/m2": 200.0}
    order = [p.key for p in plan_parts(SPECS, options, measured)]
    assert order[:3] == ["gamma", "alpha/m2", "alpha/m1"]


def test_measured_times_come_from_complete_runs_only(tmp_path):
    options = _options(tmp_path, only=("alpha",))
    _run(options, FakeRunner(fail={"alpha/m2"}))
    measured = load_state(options.out)["measured"]
    assert measured["alpha/m1"] == 0.2 and "alpha/m2" not in measured
    _run(options, FakeRunner())  # a rerun after a failure resumes stored units: not measured
    assert "alpha/m2" not in load_state(options.out)["measured"]


def test_ctrl_c_stops_the_running_part_and_keeps_the_finished_ones(tmp_path):
    options = _options(tmp_path, jobs=1, only=("alpha",))
    stopped, saved = [], []

    def interrupt_on_second(part, args, stop):
        if part.key == "alpha/m2":
            # The state is saved as each part ends (a killed suite keeps them too).
            saved.append(load_state(options.out)["parts"]["alpha/m1"]["status"])
            _thread.interrupt_main()  # a Ctrl-C while this part runs
            stopped.append(stop.soft.wait(10))
            return Outcome("failed", 0.1, -2, "KeyboardInterrupt", tuple(args))
        return None

    with pytest.raises(KeyboardInterrupt):
        _run(options, FakeRunner(on_call=interrupt_on_second))
    assert stopped == [True] and saved == ["done"]  # the running part was asked to stop
    state = load_state(options.out)
    assert state["parts"]["alpha/m1"]["status"] == "done"
    assert state["parts"]["alpha/m2"]["status"] == "interrupted"
    assert state["sessions"][-1]["interrupted"] is True
    assert not (options.out / "report.md").exists()
    resume = FakeRunner()
    assert _run(options, resume)[0] == 0
    assert [k for k, _ in resume.calls] == ["alpha/m2", "alpha"]


CHILD = """
import os, sys, time
print("out", os.environ.get("OMP_NUM_THREADS"), *sys.argv[1:])
if sys.argv[1] == "sleep":
    time.sleep(60)
print("line 1\\nRuntimeError: boom", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""


def test_the_process_runner_logs_a_child_and_keeps_its_stderr_tail(tmp_path):
    runner = ProcessRunner(tmp_path / "logs", threads=1, prefix=[sys.executable, "-c", CHILD])
    part = plan_parts(SPECS, _options(tmp_path))[0]
    outcome = runner(part, ["3", "--flag"], Stop())
    assert (outcome.status, outcome.returncode) == ("failed", 3)
    assert outcome.stderr_tail == "line 1\nRuntimeError: boom"
    assert outcome.args == ("3", "--flag")
    stem = part.key.replace("/", ".")
    assert (tmp_path / "logs" / f"{stem}.out").read_text() == "out 1 3 --flag\n"
    assert runner(part, ["0"], Stop()).status == "done"


def test_the_process_runner_stops_a_child_on_request(tmp_path):
    runner = ProcessRunner(tmp_path / "logs", prefix=[sys.executable, "-c", CHILD], grace_s=5)
    part = plan_parts(SPECS, _options(tmp_path))[0]
    stop = Stop()
    threading.Timer(0.5, stop.soft.set).start()
    start = time.monotonic()
    outcome = runner(part, ["sleep"], stop)
    assert outcome.status == "interrupted"
    assert time.monotonic() - start < 30  # SIGINT ended it, long before its 60 s sleep
    assert "KeyboardInterrupt" in outcome.stderr_tail


def test_options_check_names_and_fill_the_preset(tmp_path):
    parse = build_parser().parse_args
    with pytest.raises(ConfigError, match=r"--only nope: not a part of the suite; choose from"):
        options_from_args(parse(["--only", "nope"]))
    with pytest.raises(ConfigError, match="--jobs 0"):
        options_from_args(parse(["--jobs", "0"]))
    cpu = options_from_args(parse(["--out", str(tmp_path)]))
    assert (cpu.jobs, cpu.threads, cpu.seeds, cpu.split) == (2, 1, 3, True)
    paper = options_from_args(parse(["--preset", "paper", "--out", str(tmp_path)]))
    assert (paper.jobs, paper.threads, paper.split) == (1, 0, False)
    parts = plan_parts(SPECS, paper)
    assert [p.key for p in parts] == ["alpha", "beta", "gamma"]  # each experiment whole
    assert "--threads" not in parts[0].args and parts[0].args[:3] == ("alpha", "--preset", "paper")


def test_the_cli_dry_run_lists_the_parts_without_running_them(tmp_path, capsys):
    from nestlearn.cli.main import main as cli_main

    assert cli_main(["experiment", "suite", "--out", str(tmp_path / "s"), "--dry-run",
                     "--only", "mqar"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "--models" in text and "experiment mqar --preset cpu --seeds 3 --threads 1" in text
    assert not (tmp_path / "s").exists()
    assert cli_main(["experiment", "suite", "--only", "nope"]) == 2


@pytest.fixture
def fake_module(monkeypatch):
    def register(name, **attributes):
        module = types.ModuleType(f"fake_suite_{name}")
        for key, value in attributes.items():
            setattr(module, key, value)
        monkeypatch.setitem(sys.modules, module.__name__, module)
        monkeypatch.setitem(EXPERIMENTS, name, (module.__name__, "a test double"))

    return register


def test_units_come_from_the_experiment_module(fake_module, monkeypatch):
    fake_module("ablations", VARIANTS={"full": 1, "no_momentum": 2})
    assert module_units("ablations") == (("full", "no_momentum"), "--variants")
    fake_module("mqar", DEFAULT_MODELS=("transformer", "hope"))
    assert module_units("mqar") == (("transformer", "hope"), "--models")
    fake_module("continual")  # no list yet: the models every experiment must run
    assert module_units("continual") == (SUITE_MODELS, "--models")
    fake_module("ablations")  # no variants named: the experiment runs whole
    assert module_units("ablations") == ((), "--variants")
    monkeypatch.delitem(EXPERIMENTS, "ablations")
    assert module_units("ablations") == ((), "--models")


def test_many_metrics_are_shown_one_per_row():
    few = {"a": {"x": spread([1.0, 3.0])}, "b": {"x": spread([2.0])}}
    assert summary_table(few).splitlines()[0].split("|")[1].strip() == "model"
    assert "2.0000 ± 1.4142" in summary_table(few) and "| 2.0000 |" in summary_table(few)
    many = {"a": {f"T={t}": spread([0.5, 0.7]) for t in range(9)}}
    assert summary_table(many).splitlines()[0].split("|")[1].strip() == "metric"


@pytest.mark.slow
def test_a_real_experiment_runs_per_model_then_assembles(tmp_path):
    """Two tiny MQAR units as subprocesses, then the assembling run: the wiring end to end."""
    tiny = ("--steps", "2", "--seq-lens", "16", "--pairs", "2", "--test-examples", "8",
            "--batch-size", "4", "--d-model", "16", "--n-layers", "1", "--vocab", "16")  # fmt: skip
    spec = ExperimentSpec("mqar", ("transformer", "gated_deltanet"), minutes=0.2, extra_args=tiny)
    options = SuiteOptions(out=tmp_path / "suite", preset="tiny", seeds=1, no_progress=True)
    rc = run_suite(options, specs=[spec], emit=lambda line: None)
    record = json.loads((options.out / "suite.json").read_text())
    assert rc == 0, {k: p["stderr_tail"] for k, p in record["parts"].items()}
    mqar = record["experiments"]["mqar"]
    assert mqar["status"] == "done" and mqar["args"]["models"] == ["transformer", "gated_deltanet"]
    assert mqar["figures"] and (options.out / mqar["figures"][0]).is_file()
    assert (options.out / "logs" / "mqar.transformer.err").is_file()
    assert set(record["parts"]) == {"mqar", "mqar/transformer", "mqar/gated_deltanet"}


def test_the_report_names_the_command_that_reproduces_it(tmp_path):
    options = _options(tmp_path, only=("gamma",), jobs=1)
    assert run_suite(options, specs=SPECS, runner=FakeRunner(), emit=lambda line: None) == 0
    record = json.loads((options.out / "suite.json").read_text())
    command = f"nestlearn experiment suite --preset cpu --out {options.out} --seeds 2 --jobs 1"
    assert record["command"] == command + " --threads 1 --only gamma"
    assert record["experiments"]["gamma"]["command"].startswith("nestlearn experiment gamma ")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_stop_the_suite_even_where_sigint_came_in_ignored(
    sig, monkeypatch, tmp_path
):
    # A job started with '&' by a script inherits SIGINT ignored; its children would too.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:

        def signalled_run(options, **kw):
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the handler raises here
            return 0

        monkeypatch.setattr(suite, "run_suite", signalled_run)
        with pytest.raises(KeyboardInterrupt):
            suite.main(["--out", str(tmp_path)])
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # restored afterwards
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_broken_scheduler_leaves_no_child_running(tmp_path):
    runner = ProcessRunner(tmp_path / "logs", prefix=[sys.executable, "-c", CHILD], grace_s=60)
    quick, slow = plan_parts(SPECS, _options(tmp_path))[:2]
    quick = dataclasses.replace(quick, args=("0",), estimate_s=1.0)
    slow = dataclasses.replace(slow, args=("sleep",), estimate_s=2.0)

    def broken(kind, part, outcome):
        if kind == "end":
            raise OSError("disk full")

    start = time.monotonic()
    with pytest.raises(OSError, match="disk full"):
        run_parts([quick, slow], runner, jobs=2, done={}, on_event=broken)
    assert time.monotonic() - start < 30  # the sleeping child was killed, not waited for


FOLLOW_SPECS = [
    ExperimentSpec("perplexity", ("m1", "m2"), "--models", minutes=0.1),
    # continual's units are the longest: without the order they would start first.
    ExperimentSpec("continual", ("m1", "m1+level_periods", "m2"), "--models", minutes=30.0),
]


@pytest.fixture
def level_periods_scores(monkeypatch):
    monkeypatch.setitem(SCORES, "m1+level_periods", [1.5, 2.5])


def test_continual_units_wait_for_the_perplexity_unit_of_their_model(
    tmp_path, level_periods_scores
):
    parts = {p.key: p for p in plan_parts(FOLLOW_SPECS, _options(tmp_path))}
    assert parts["continual/m1"].after == ("perplexity/m1",)
    assert parts["continual/m1+level_periods"].after == ("perplexity/m1",)
    assert parts["continual/m2"].after == ("perplexity/m2",)
    assert parts["perplexity/m1"].after == () and parts["continual"].after == ()
    runner = FakeRunner()
    assert _run(_options(tmp_path, jobs=1), runner, specs=FOLLOW_SPECS)[0] == 0
    order = [key for key, _ in runner.calls]
    for unit in ("m1", "m1+level_periods", "m2"):
        source = f"perplexity/{unit.split('+')[0]}"
        assert order.index(source) < order.index(f"continual/{unit}")


def test_continual_run_alone_waits_for_nothing(tmp_path, level_periods_scores):
    parts = plan_parts(FOLLOW_SPECS, _options(tmp_path, only=("continual",)))
    assert parts and all(p.after == () for p in parts)
    runner = FakeRunner()
    assert _run(_options(tmp_path, only=("continual",)), runner, specs=FOLLOW_SPECS)[0] == 0
    assert sorted(k for k, _ in runner.calls) == [
        "continual", "continual/m1", "continual/m1+level_periods", "continual/m2",
    ]  # fmt: skip
