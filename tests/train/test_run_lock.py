"""One writer per run folder (``RUN/.lock``): a second process is refused with one line naming the
holder; a lock left by a killed process never blocks; ``train.out_dir`` is checked before work."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from nestlearn.cli.main import main
from nestlearn.errors import ConfigError, RunLockedError
from nestlearn.train import Trainer, run_lock
from nestlearn.train.run_lock import LOCK_FILE, RunLock, hold_run_dir
from tests.conftest import subprocess_env

# Loads run_lock.py alone (not the nestlearn.train package, which imports torch): starts fast.
HOLDER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("run_lock", sys.argv[3])
run_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_lock)
if sys.argv[2] == "fallback":
    run_lock.fcntl = None
lock = run_lock.RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def start_holder(run_dir: Path, mode: str = "flock") -> subprocess.Popen:
    """Another process holding ``run_dir``'s lock until killed."""
    cmd = [sys.executable, "-c", HOLDER, str(run_dir), mode, run_lock.__file__]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("mode", ["flock", "fallback"])
def test_a_live_holder_is_named_and_a_killed_one_does_not_block(tmp_path, monkeypatch, mode):
    if mode == "fallback":  # as on Windows: no fcntl, an O_EXCL file with the holder's pid
        monkeypatch.setattr(run_lock, "fcntl", None)
    holder = start_holder(tmp_path, mode)
    try:
        with pytest.raises(RunLockedError) as refused:
            RunLock(tmp_path).acquire()
        message = str(refused.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message
        assert "wait for it to finish or stop it" in message and "\n" not in message
    finally:
        kill(holder)
    # SIGKILL ran no cleanup: the kernel dropped the flock / the pid is gone, so it is stale.
    with RunLock(tmp_path) as lock:
        info = json.loads(lock.path.read_text())
        assert info["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()  # released: the file goes


def test_a_second_lock_in_the_same_process_is_refused_until_released(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(RunLockedError, match="already in use by this process"):
        RunLock(tmp_path).acquire()
    first.release()
    first.release()  # twice is harmless
    RunLock(tmp_path).acquire().release()


def test_fallback_takes_over_a_dead_pid_and_refuses_another_hosts_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "fcntl", None)
    lock_file = tmp_path / LOCK_FILE
    lock_file.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    RunLock(tmp_path).acquire().release()
    # A pid on another machine cannot be checked: refused, with how to clear it by hand.
    lock_file.write_text(json.dumps({"pid": dead_pid(), "host": "elsewhere"}))
    with pytest.raises(RunLockedError, match=rf"host elsewhere.*delete {lock_file}"):
        RunLock(tmp_path).acquire()


def test_dropped_trainer_lets_go_and_fit_releases(debug_config):
    cfg = debug_config("train.steps=2", "train.ckpt_every=0", "train.eval_every=0")
    trainer = Trainer(cfg)
    with pytest.raises(RunLockedError, match="this process"):
        Trainer(cfg)
    trainer.fit()  # fit lets go when it returns
    assert not (Path(cfg.train.out_dir) / LOCK_FILE).exists()
    resumed = Trainer.from_checkpoint(cfg.train.out_dir, {"train": {"steps": 3}})
    del resumed  # garbage: its lock goes with it
    Trainer.from_checkpoint(cfg.train.out_dir).close()


def test_cli_refuses_a_second_process_on_a_run_folder(debug_config, tmp_path, capsys):
    """The reported bug: a second `train --resume RUN` (or a fresh run into RUN) while a training
    process works in it; then the holder is killed and the folder is usable at once."""
    cfg = debug_config("train.steps=2", "train.ckpt_every=2", "train.eval_every=0")
    run = Path(cfg.train.out_dir)
    Trainer(cfg).fit()
    cmd = [sys.executable, "-m", "nestlearn", "train", "--resume", str(run), "train.steps=100000"]
    holder = subprocess.Popen(cmd, env=subprocess_env(), stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not _held_by(run, holder.pid):
            assert holder.poll() is None and time.monotonic() < deadline, "holder did not start"
            time.sleep(0.1)
        capsys.readouterr()
        for argv in (
            ["train", "--resume", str(run)],
            ["train", "debug", f"train.out_dir={run}"],
        ):
            assert main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"is in use by pid {holder.pid}" in err[0], err
            assert "train --resume" in err[0]  # the holder's command
    finally:
        kill(holder)
    assert main(["train", "--resume", str(run), "train.steps=3"]) == 0


def _held_by(run: Path, pid: int) -> bool:
    try:
        return json.loads((run / LOCK_FILE).read_text())["pid"] == pid
    except (OSError, ValueError):
        return False


def test_torchrun_ranks_stop_together_when_rank_0_cannot_lock(tmp_path):
    """Only rank 0 locks; the others learn from the all-reduce that it failed."""
    holder = RunLock(tmp_path).acquire()
    try:
        rank0 = SimpleNamespace(is_main=True, any=lambda *flags: flags)
        with pytest.raises(RunLockedError, match="this process"):
            hold_run_dir(tmp_path, rank0)
        rank1 = SimpleNamespace(is_main=False, any=lambda *flags: (True,))  # rank 0 failed
        with pytest.raises(RunLockedError, match="rank 0 could not"):
            hold_run_dir(tmp_path, rank1)
        fine = SimpleNamespace(is_main=False, any=lambda *flags: (False,))
        assert hold_run_dir(tmp_path, fine) is None  # rank 1 never touches the lock
    finally:
        holder.release()


@pytest.mark.parametrize("inside", [False, True])
def test_out_dir_that_is_a_file_is_refused_before_any_work(
    debug_config, tmp_path, monkeypatch, inside
):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "run" if inside else blocker

    def no_data(*args, **kwargs):
        raise AssertionError("data was prepared before train.out_dir was checked")

    monkeypatch.setattr("nestlearn.train.trainer.prepare_data", no_data)
    with pytest.raises(ConfigError, match=r"train.out_dir=.*a_file.* not a folder"):
        Trainer(debug_config(f"train.out_dir={out}"))
    assert blocker.read_text() == "not a folder"
