"""A temporary Prefect server that dies with the command that started it.

Without PREFECT_API_URL, Prefect starts a temporary server subprocess on first use and stops it at interpreter
exit (`prefect.server.api.server.SubprocessASGIServer`). A CLI killed by SIGKILL, or by SIGTERM (which skips
atexit), leaves that server running, and Prefect has no setting to prevent it. So the CLI starts the same
server itself (Prefect's app in ephemeral mode, UI off) and asks Linux to SIGTERM it when the CLI dies
(PR_SET_PDEATHSIG); a command that ends normally stops it on the way out.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
NO_PROXY_VARIABLES = ("NO_PROXY", "no_proxy")
LOOPBACK = ("127.0.0.1", "localhost")
STARTUP_TIMEOUT_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
# what SubprocessASGIServer sets: no UI, the ephemeral server's services only
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


class LocalServerError(RuntimeError):
    """The Prefect API cannot be used: the temporary server did not come up, its PREFECT_HOME is not a
    writable folder, or the server PREFECT_API_URL names does not answer."""


def die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn making the kernel SIGTERM the child when this process dies (Linux; None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: the child only calls it
    parent = os.getpid()

    def set_parent_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGTERM))
        if os.getppid() != parent:  # the parent died before prctl took effect: nobody will signal us
            os.kill(os.getpid(), signal.SIGTERM)

    return set_parent_death_signal


def server_command(fd: int) -> list[str]:
    """Prefect's own temporary-server command, serving on a socket bound by the caller (no race for the
    port)."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "prefect.server.api.server:create_app",
        "--fd",
        str(fd),
        "--log-level",
        "error",
        "--lifespan",
        "on",
        "--timeout-graceful-shutdown",
        "5",
    ]


def launch_server() -> tuple[subprocess.Popen, str]:
    """Start the server on a free 127.0.0.1 port; returns the process and its API URL (not yet answering)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        proc = subprocess.Popen(
            server_command(sock.fileno()),
            pass_fds=[sock.fileno()],
            env={**os.environ, **SERVER_ENV},
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent(),  # only prctl (and getppid) run between fork and exec
        )
        return proc, f"http://127.0.0.1:{sock.getsockname()[1]}/api"


def startup_timeout() -> float:
    """Prefect's own startup timeout setting (the CLI gives it 120 s unless the environment says
    otherwise)."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    return float(
        os.environ.get(STARTUP_TIMEOUT_SETTING) or PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    )


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 never goes via a proxy
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LocalServerError(
                f"the temporary Prefect server exited with code {proc.returncode} before answering "
                f"{url}/health"
            )
        try:
            with opener.open(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise LocalServerError(
        f"the temporary Prefect server did not answer {url}/health within {timeout_s:g} s "
        f"({STARTUP_TIMEOUT_SETTING}); or set PREFECT_API_URL to a running server"
    )


def check_answers(url: str, timeout_s: float = 10.0) -> None:
    """A configured PREFECT_API_URL must accept a connection: else Prefect's client fails on the first flow
    with a long traceback. Any HTTP answer counts (a hosted API may want a key for /health)."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as err:  # URLError is an OSError; ValueError: not a URL
        reason = getattr(err, "reason", err)
        raise LocalServerError(
            f"PREFECT_API_URL {url} does not answer ({reason}): start that server, or unset PREFECT_API_URL "
            "to let the command start a temporary one"
        ) from None


def check_prefect_home() -> None:
    """The temporary server keeps its database in PREFECT_HOME (default ~/.prefect): a folder this process
    can write, or one line saying so before the server starts (it would fail with a SQLite traceback)."""
    from prefect.settings import PREFECT_HOME

    home = Path(PREFECT_HOME.value()).expanduser()
    try:
        home.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=home):
            pass
    except OSError as err:
        raise LocalServerError(
            f"PREFECT_HOME {home} is not a writable folder ({err.strerror or err}): set PREFECT_HOME to one, "
            "or PREFECT_API_URL to a running Prefect server"
        ) from None


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def drain_prefect_workers() -> None:
    """Send the logs and events still queued while the server is up (as prefect_test_harness does)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    try:
        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)
    except Exception as err:  # undelivered logs must not replace the command's own result or error
        print(f"warning: Prefect logs/events not delivered: {err}", file=sys.stderr)


def proxy_variable(url: str) -> str | None:
    """The environment variable that sends requests for `url` through a proxy, as Prefect's client (httpx)
    reads them: `<scheme>_proxy` or `all_proxy` in either case, unless NO_PROXY covers the host."""
    parts = urlsplit(url)
    if urllib.request.proxy_bypass_environment(parts.hostname or ""):
        return None
    for name in (f"{parts.scheme}_proxy", "all_proxy"):
        for variable in (name, name.upper()):
            if os.environ.get(variable):
                return variable
    return None


def check_api_through_proxy(url: str) -> None:
    """A configured PREFECT_API_URL that a proxy variable captures must answer through that proxy.

    Otherwise Prefect's client reports the proxy's answer as a server of an "Invalid version"; this names the
    variable instead.
    """
    variable = proxy_variable(url)
    if variable is None:
        return
    import httpx

    try:
        answer = httpx.get(f"{url}/health", timeout=10)  # trust_env on: the route Prefect's client takes
        why = None if answer.status_code == 200 else f"HTTP {answer.status_code}"
    except httpx.HTTPError as err:
        why = type(err).__name__
    if why is not None:
        host = urlsplit(url).hostname
        raise LocalServerError(
            f"PREFECT_API_URL {url} goes through the proxy in {variable}={os.environ[variable]}, which did "
            f"not relay {url}/health ({why}): add {host} to NO_PROXY, or unset {variable}"
        )


@contextmanager
def loopback_without_proxy() -> Iterator[None]:
    """Add 127.0.0.1 and localhost to NO_PROXY while the block runs: the temporary server is on this machine,
    and Prefect's client would otherwise send its requests to whatever HTTP(S)_PROXY names."""
    saved = {name: os.environ.get(name) for name in NO_PROXY_VARIABLES}
    hosts = ",".join(h for h in (saved["NO_PROXY"], saved["no_proxy"], *LOOPBACK) if h)
    for name in NO_PROXY_VARIABLES:
        os.environ[name] = hosts
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def prefect_api(say: Callable[[str], None] = print) -> Iterator[None]:
    """Flows in this block use PREFECT_API_URL when set; else a temporary server living exactly as long as the
    block, or as this process, whichever ends first."""
    from prefect.context import refresh_global_settings_context
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if configured := os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value():
        check_api_through_proxy(configured)
        check_answers(configured)
        yield
        return
    check_prefect_home()
    proc, url = launch_server()
    say(f"temporary Prefect server at {url} (pid {proc.pid}); it stops with this command")
    try:
        wait_healthy(proc, url, startup_timeout())
        os.environ["PREFECT_API_URL"] = url
        refresh_global_settings_context()  # threads started without a copied context read the global one
        with loopback_without_proxy(), temporary_settings({PREFECT_API_URL: url}):
            try:
                yield
            finally:
                drain_prefect_workers()
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        refresh_global_settings_context()
        stop_server(proc)
