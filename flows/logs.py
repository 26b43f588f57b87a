"""Every message a stage logs reaches the flow run's logs, not only those written through `ctx.log`; an error
a user can fix is one line, on the console and in the run: its message at ERROR, its traceback at DEBUG only
(`PREFECT_LOGGING_LEVEL=DEBUG` shows it), and the run's state message is the cause. A bug keeps its
traceback."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

STAGE_LOGGERS = ("tasks", "models", "data_contracts", "ecamp")  # the loggers our modules name


@cache
def known_errors() -> tuple[type[BaseException], ...]:
    """The failures a user can fix from their message alone (config, inputs, device, disk, diverged training,
    a teacher endpoint that refuses): one `error:` line on the CLI, the traceback only in the flow run's log.
    Anything else is a bug and keeps its traceback."""
    from data_contracts.io import ArtifactWriteError
    from flows.gpu_pool import GpuPoolError
    from flows.local_server import LocalServerError
    from models.checkpoints import CheckpointWriteError
    from models.devices import DeviceError
    from models.distill.agreement import StudentTooWeakError
    from models.distill.student import AdapterLoadError
    from models.distill.teacher_http import TeacherFatalError
    from models.images import ImageLoadError
    from tasks.lock import RunDirectoryBusy
    from tasks.seed_distill import TooFewAnswersError

    user_errors = (ValueError, FileNotFoundError, FloatingPointError, ImageLoadError)
    write_errors = (CheckpointWriteError, ArtifactWriteError)  # OSErrors: a full disk
    runtime_errors = (LocalServerError, RunDirectoryBusy, GpuPoolError, TeacherFatalError, AdapterLoadError)
    return (
        *user_errors,
        *write_errors,
        *runtime_errors,
        TooFewAnswersError,
        StudentTooWeakError,
        DeviceError,
    )


def one_line(err: BaseException) -> str:
    """The message of `err` on one line (a preflight lists its problems one per line), for a state message."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " | ".join(line.strip() for line in text.splitlines() if line.strip()) or type(err).__name__


def failed_in_one_line(
    logger: logging.Logger | logging.LoggerAdapter, err: BaseException, where: str | None = None
) -> Any:
    """The Failed state a task or flow returns for a known error instead of raising it: Prefect would log the
    error with its whole traceback (~170 lines through a pipeline and its GPU sub-run). Here: each line of the
    message at ERROR, the traceback at DEBUG, the one-line cause as the state message. The error travels as
    the state's data, so `state.result()` (the CLI, the calling flow) raises it as it was. `where`: the stage
    that failed, put ahead of a message that does not name it."""
    from prefect.states import Failed

    for line in str(err).splitlines() or [type(err).__name__]:
        logger.error("%s", line)
    logger.debug("traceback of the error above", exc_info=err)
    message = one_line(err)
    if where and not message.startswith(where):
        message = f"{where}: {message}"
    return Failed(data=err, message=message)


class ToRunLogger(logging.Handler):
    """Re-emits a record through the Prefect run logger (which sends it to the API with the run's ids)."""

    def __init__(self, run_logger: logging.Logger | logging.LoggerAdapter):
        super().__init__(level=logging.INFO)
        self.run_logger = run_logger

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.run_logger.log(record.levelno, "%s: %s", record.name, record.getMessage())
        except Exception:  # a log line must never fail the stage
            self.handleError(record)


@contextmanager
def forward_stage_logs(run_logger: logging.Logger | logging.LoggerAdapter) -> Iterator[None]:
    """Module loggers (`models.gloria.train`'s resume message, the catalog's warnings) forward INFO and above
    to the run logger while the block runs."""
    handler = ToRunLogger(run_logger)
    loggers = [logging.getLogger(name) for name in STAGE_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        if lg.getEffectiveLevel() > logging.INFO:
            lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)


class WithoutTracebackOf(logging.Formatter):
    """A console formatter that leaves out the traceback of the `known` errors: the CLI says what went wrong
    in one `error:` line, and the flow run's log (the API handler, which formats the record itself) keeps the
    traceback. Other errors are bugs and keep theirs on the console too. The record is copied, not changed."""

    def __init__(self, inner: logging.Formatter | None, known: tuple[type[BaseException], ...]):
        super().__init__()
        self.inner = inner or logging.Formatter()
        self.known = known

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and isinstance(record.exc_info[1], self.known):
            record = copy.copy(record)
            record.exc_info, record.exc_text = None, None
        return self.inner.format(record)


@contextmanager
def console_tracebacks_only_for_bugs(known: tuple[type[BaseException], ...]) -> Iterator[None]:
    """While the block runs, Prefect's console handlers (on the root logger) print no traceback of `known`."""
    from prefect.logging.handlers import PrefectConsoleHandler

    handlers = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    formatters = [h.formatter for h in handlers]
    for handler, formatter in zip(handlers, formatters, strict=True):
        handler.setFormatter(WithoutTracebackOf(formatter, known))
    try:
        yield
    finally:
        for handler, formatter in zip(handlers, formatters, strict=True):
            handler.setFormatter(formatter)


class KnownErrorsAtDebug(logging.Filter):
    """On Prefect's run loggers: a record carrying the traceback of a known error is lowered to DEBUG, and so
    dropped unless DEBUG is logged. Prefect logs a failed run's exception once more on its way out (the
    worker's "Engine execution exited with unexpected exception"); the cause is already one ERROR line
    (`failed_in_one_line`). Bugs pass unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.exc_info and record.exc_info[1] is None
        ):  # "Task run failed with state": no exception to show
            record.exc_info, record.exc_text = None, None
        error = record.exc_info[1] if record.exc_info else None
        if error is None or not isinstance(error, known_errors()):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)  # kept only where DEBUG is logged


def quiet_known_tracebacks() -> None:
    """Install `KnownErrorsAtDebug` on the flow- and task-run loggers (once; a flow module calls it on import,
    which is early enough in a worker's flow-run process)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        run_logger = logging.getLogger(name)
        if not any(isinstance(f, KnownErrorsAtDebug) for f in run_logger.filters):
            run_logger.addFilter(KnownErrorsAtDebug())
