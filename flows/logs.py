"""Every message a stage logs reaches the flow run's logs, not only those written through `ctx.log`; the
console shows the errors the CLI prints as one line without their traceback (the run's log keeps it)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager

STAGE_LOGGERS = ("tasks", "models", "data_contracts", "ecamp")  # the loggers our modules name


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
