"""One writer per run folder: ``RUN/.lock``, held for as long as a trainer works in the folder.

Two processes training into one folder would delete each other's temporary checkpoints and
interleave their metrics, so a second one is refused with a line that names the holder (pid,
host, command, start time) and what to do.

- POSIX: an exclusive ``fcntl.flock`` on ``RUN/.lock``. The kernel drops it when the holder dies
  in any way (SIGKILL, out-of-memory kill, power loss of a local disk), so a killed run never
  blocks the next one. The holder writes its pid and host into the file for the message and
  removes the file when it lets go.
- Without ``flock`` (Windows, or a file system that refuses it): the file is created with
  ``O_CREAT | O_EXCL`` and holds the pid and host. A lock whose process is gone (same host) is
  stale and taken over; one from another host cannot be checked, so the message says to delete
  the file once sure no run uses the folder.

Under ``torchrun`` only rank 0 holds the lock (:func:`hold_run_dir`); every rank learns whether
it got it, so all of them stop together with the same message.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
import weakref
from pathlib import Path
from typing import Any

from nestlearn.errors import ConfigError, NestlearnError, RunLockedError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"
# flock errors that mean "not supported here" (not "held by someone else"): use the fallback.
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def ensure_run_dir(run_dir: Path) -> None:
    """Create ``run_dir`` (and parents) or say clearly why ``train.out_dir`` cannot be used."""
    run_dir = Path(run_dir)
    for folder in (run_dir, *run_dir.parents):
        if folder.exists() and not folder.is_dir():
            where = "is a file" if folder == run_dir else f"is inside {folder}, which is a file"
            raise ConfigError(
                f"train.out_dir={run_dir} {where}, not a folder; set train.out_dir to a folder "
                "(a new one for a new run)"
            )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create train.out_dir={run_dir} ({exc.strerror or exc}); "
            "set train.out_dir to a folder you can write"
        ) from exc


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (never signals it)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _windows_pid_alive(pid: int) -> bool:
    import ctypes

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return kernel32.GetLastError() == 5  # ERROR_ACCESS_DENIED: exists
    try:
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        return code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def _holder_info() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": _command_line(),
    }


def _command_line() -> str:
    """The holder's command, for the message: ``nestlearn train --resume runs/x``."""
    argv = list(sys.argv) or ["python"]
    prog = Path(argv[0]).name
    argv[0] = "nestlearn" if prog in ("__main__.py", "nestlearn") else prog
    return " ".join(argv)[:200]


def _read_info(path: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None


class RunLock:
    """The exclusive right to write into one run folder; :meth:`acquire`, then :meth:`release`.

    Not re-entrant: a second lock on the same folder in the same process is refused too (two
    trainers of one folder would break each other just the same).
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunLockedError` naming the holder (never waits)."""
        if self.held:
            return self
        ensure_run_dir(self.run_dir)
        fd = self._acquire_flock() if fcntl is not None else None
        flocked = fd is not None
        if fd is None:
            fd = self._acquire_exclusive_file()
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(_holder_info()).encode("utf-8"))
            with contextlib.suppress(OSError):
                os.fsync(fd)
        except BaseException:
            _let_go(fd, str(self.path), flocked, os.getpid())
            raise
        self._fd = fd
        # A trainer dropped without close(): the lock goes with it (and at interpreter exit).
        self._finalizer = weakref.finalize(self, _let_go, fd, str(self.path), flocked, os.getpid())
        return self

    def release(self) -> None:
        """Remove the lock file and let go (safe to call twice)."""
        if self._finalizer is not None:
            self._finalizer()  # runs _let_go once
        self._fd, self._finalizer = None, None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _acquire_flock(self) -> int | None:
        """The fd holding an exclusive flock on the current lock file; None: flock unsupported."""
        assert fcntl is not None
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunLockedError(self._held_message(_wait_for_info(self.path))) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in _NO_FLOCK:
                    return None
                raise
            # The previous holder removes the file as it lets go: if the path now names another
            # file (or none), the lock we got is on a dead file; lock the current one instead.
            try:
                current = os.stat(self.path)
                mine = os.fstat(fd)
                if (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def _acquire_exclusive_file(self) -> int:
        """Fallback without flock: create the file exclusively; take over a dead holder's."""
        host = socket.gethostname()
        for _ in range(20):
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pass
            info = _wait_for_info(self.path)
            if info is None:
                if not self.path.exists():
                    continue
                age = time.time() - self.path.stat().st_mtime
                if age < 10:  # being written by a process that just created it
                    raise RunLockedError(self._held_message(None))
            elif info.get("host") != host or pid_alive(int(info["pid"])):
                raise RunLockedError(self._held_message(info, checkable=info.get("host") == host))
            # Stale: its process is gone. Remove it only if it still is the file judged stale.
            if _read_info(self.path) == info:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
        raise RunLockedError(self._held_message(_read_info(self.path)))

    def _held_message(self, info: dict[str, Any] | None, checkable: bool = True) -> str:
        if info is None:
            who = "another nestlearn process"
        elif info["pid"] == os.getpid() and info.get("host") == socket.gethostname():
            return (
                f"{self.run_dir} is already in use by this process (another Trainer works in it); "
                "let its fit() finish or call its close() first"
            )
        else:
            who = (
                f"pid {info['pid']} on host {info.get('host', '?')}"
                f" (since {info.get('started', '?')}: {info.get('command', '?')})"
            )
        advice = "wait for it to finish or stop it, then try again"
        if not checkable:
            advice += f"; if no run uses the folder any more, delete {self.path}"
        return (
            f"{self.run_dir} is in use by {who}; two processes would overwrite each other's "
            f"checkpoints and metrics: {advice}"
        )


def _wait_for_info(path: Path, tries: int = 10) -> dict[str, Any] | None:
    """The holder's pid/host record; a holder that just took the lock may not have written it."""
    for _ in range(tries):
        info = _read_info(path)
        if info is not None:
            return info
        time.sleep(0.02)
    return None


def _let_go(fd: int, path: str, flocked: bool, owner: int) -> None:
    """Remove the lock file if it still is ours, and close it (which drops a flock).

    flock: the file is removed while still locked, so a waiter that opened it sees the inode
    change and retries on a fresh file (see ``_acquire_flock``). Fallback: the file is the lock;
    it is closed first (Windows cannot delete an open file). A forked child that inherited the
    lock (``owner`` is the pid that took it) never removes its parent's file.
    """
    if os.getpid() != owner:
        return
    try:
        mine, current = os.fstat(fd), os.stat(path)
        ours = (mine.st_dev, mine.st_ino) == (current.st_dev, current.st_ino)
    except OSError:
        ours = False
    if flocked and ours:
        with contextlib.suppress(OSError):
            os.unlink(path)
    with contextlib.suppress(OSError):
        os.close(fd)
    if not flocked and ours:
        with contextlib.suppress(OSError):
            os.unlink(path)


def hold_run_dir(run_dir: Path, env: Any, held: RunLock | None = None) -> RunLock | None:
    """Rank 0 takes (or keeps ``held``) the run folder's lock; every rank of ``env``
    (:class:`~nestlearn.train.distributed.DistEnv`) raises if it could not. Returns the lock on
    rank 0, None elsewhere."""
    error: NestlearnError | None = None
    lock = held
    if env.is_main and lock is None:
        try:
            lock = RunLock(run_dir).acquire()
        except NestlearnError as exc:
            error = exc
    (failed,) = env.any(error is not None)
    if failed:
        if error is not None:
            raise error
        raise RunLockedError(f"rank 0 could not take the run folder {run_dir} (see its message)")
    return lock
