"""Every message a stage logs reaches the flow run's logs, not only those written through `ctx.log`."""

from __future__ import annotations

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
