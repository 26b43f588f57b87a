"""One writer per run directory: an advisory `flock` on `<run_dir>/.lock`.

Two `ecamp run`s on one run directory would read each other's half-written outputs and race on the
catalog. The kernel drops a `flock` when its holder dies, so a lock left by a killed run is never stale:
the next run simply gets it. The file says who holds it, for the error message. Within one process the
lock is re-entrant (the pipeline flow holds it while its stage tasks take it again).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".lock"


class RunDirectoryBusy(RuntimeError):
    """Another process is running stages in this run directory."""


class RunDirectoryInTheWay(ValueError):
    """Something in the run directory stands where the runner must write a file of its own (a folder named
    `.lock` or `_stage.json`); nothing was changed, and the message names the path."""


class RunDirectoryNotWritable(RunDirectoryInTheWay):
    """The run directory or its lock file cannot be created or opened (a read-only file system, no write
    permission): the commands that take the lock catch it as they catch a folder in the way."""


def in_the_way(path: Path, what: str, found: str = "a folder") -> RunDirectoryInTheWay:
    return RunDirectoryInTheWay(
        f"{path} is {found}, not {what}: move it away and run again (nothing in the run directory was "
        f"changed)"
    )


def not_writable(path: Path, err: OSError) -> RunDirectoryNotWritable:
    return RunDirectoryNotWritable(
        f"cannot create {path} ({err.strerror or err}): the run directory must be writable; "
        "choose another --run-dir or fix its permissions"
    )


_held: dict[str, tuple[int, int]] = {}  # resolved run dir -> (fd, depth), for this process
_labels: dict[str, str | None] = {}  # resolved run dir -> who this process is (a flow run), while it holds it
_guard = threading.Lock()


def _describe(raw: bytes) -> str:
    try:
        data = json.loads(raw or b"{}")
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(data["started"]))
        who = f"{data['by']}, " if data.get("by") else ""
        return f"{who}pid {data['pid']} ({data.get('command', '?')}), started {started}"
    except (ValueError, KeyError, OSError):
        return "another process"


def _holder(fd: int) -> str:
    try:
        return _describe(os.pread(fd, 4096, 0))
    except OSError:
        return "another process"


def _acquire(run_dir: Path, label: str | None = None) -> int:
    """Take the flock of `run_dir` (no wait) and write who holds it; RunDirectoryBusy names the holder."""
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except IsADirectoryError:
        raise in_the_way(run_dir / LOCK_FILE, "the run directory's lock file") from None
    except OSError as err:
        raise not_writable(run_dir / LOCK_FILE, err) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise RunDirectoryBusy(
            f"run directory {run_dir} is in use by {holder}; wait for it to finish or use another "
            "--run-dir (a killed run releases the lock by itself)"
        ) from None
    os.ftruncate(fd, 0)
    info = {"pid": os.getpid(), "started": time.time(), "command": " ".join(sys.argv[:3]), "by": label}
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return fd


def _release(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextmanager
def run_lock(run_dir: Path, label: str | None = None) -> Iterator[None]:
    """Hold the run directory's lock, or fail at once naming the holder (`label`: e.g. its flow run), its pid
    and start time."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise not_writable(run_dir, err) from None
    key = str(run_dir.resolve())
    with _guard:
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
        else:
            _held[key], _labels[key] = (_acquire(run_dir, label), 1), label
    try:
        yield
    finally:
        with _guard:
            fd, depth = _held[key]
            if depth > 1:
                _held[key] = (fd, depth - 1)
            else:
                del _held[key]
                _labels.pop(key, None)
                _release(fd)


@contextmanager
def handed_over(run_dir: Path) -> Iterator[None]:
    """Let another process take the lock this one holds for the length of the block: the pipeline waiting
    for a GPU stage that runs on another worker. Taken back after; RunDirectoryBusy if a third run took it."""
    key = str(Path(run_dir).resolve())
    with _guard:
        held = _held.pop(key, None)
        if held is not None:
            _release(held[0])
    try:
        yield
    finally:
        if held is not None:
            with _guard:
                _held[key] = (_acquire(Path(run_dir), _labels.get(key)), held[1])
