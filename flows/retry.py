"""Which failures Prefect retries: the transient ones (an LLM endpoint's rate limit or dropped connection, a
network file system's I/O error). A deterministic error (bad config, a missing file, a contract violation,
diverged training) would fail the same way again, so it fails at once."""

from __future__ import annotations

import errno
from typing import Any

PERMANENT_OS_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
PERMANENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.ENAMETOOLONG}


def is_transient(exc: BaseException) -> bool:
    """True for errors that may not happen on a second try, or raised from one (`raise ... from err`)."""
    while exc is not None:
        if _transient(exc):
            return True
        exc = exc.__cause__
    return False


def _transient(exc: BaseException) -> bool:
    try:
        import openai

        if isinstance(exc, openai.APIConnectionError | openai.RateLimitError | openai.InternalServerError):
            return True  # APITimeoutError is an APIConnectionError
        if isinstance(exc, openai.APIError):
            return False  # 4xx: a wrong model name or key fails again
    except ImportError:
        pass
    if isinstance(exc, OSError):
        return not isinstance(exc, PERMANENT_OS_ERRORS) and exc.errno not in PERMANENT_ERRNOS
    return False


def transient_failure(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's `retry_condition_fn`: retry the task only when it failed with a transient error."""
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return False
