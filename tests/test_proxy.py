"""Report text never leaves through a proxy the data-use policy did not judge (issue 26, point 3).

A sink proxy on 127.0.0.1 records every connection and answers 502. With HTTP_PROXY/HTTPS_PROXY/ALL_PROXY
pointing at it, the teacher still talks to its configured endpoint only; a proxy the config names is judged
like an endpoint; Prefect's own client reaches the temporary server directly, and a configured
PREFECT_API_URL that the proxy cannot relay is one line naming the variable.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from typer.testing import CliRunner

from flows import local_server
from flows.cli import app
from models.distill.governance import EndpointPolicyError
from models.distill.teacher_http import TeacherClient
from tests.fake_openai_server import FakeOpenAIServer
from tests.test_teacher_http import REPORTS, cfg_for, expected, requests_for, run

DEMO = "configs/demo.yaml"
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


class SinkProxy:
    """Accepts connections on 127.0.0.1, keeps the first bytes of each request, answers 502 Bad Gateway."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.received: list[bytes] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)

    def serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    self.received.append(conn.recv(65536))
                    conn.sendall(
                        b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                except OSError:
                    pass


@contextmanager
def sink_proxy() -> Iterator[SinkProxy]:
    proxy = SinkProxy()
    proxy.thread.start()
    try:
        yield proxy
    finally:
        proxy.stop.set()
        proxy.thread.join()
        proxy.sock.close()


@pytest.fixture()
def proxied(monkeypatch) -> Iterator[SinkProxy]:
    """Every proxy variable names the sink, and NO_PROXY covers nothing."""
    with sink_proxy() as proxy:
        for name in PROXY_VARIABLES:
            monkeypatch.setenv(name, proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        yield proxy


def test_the_sink_proxy_would_capture_an_environment_honouring_client(proxied):
    """The setting is real: httpx with its defaults sends a request for 127.0.0.1 to the sink."""
    import httpx

    with FakeOpenAIServer() as server:
        assert httpx.get(f"{server.base_url}/models").status_code == 502
        assert sum(server.counts.values()) == 0
    assert len(proxied.received) == 1 and b"/v1/models" in proxied.received[0]


def test_the_teacher_ignores_proxy_variables_and_talks_to_its_endpoint_only(proxied):
    with FakeOpenAIServer() as server:
        results = run(requests_for(REPORTS), cfg_for(server, concurrency=2))
        assert [r.content for r in results] == [expected(r) for r in REPORTS]
        assert sum(server.counts.values()) == len(REPORTS)
    assert proxied.received == []


def test_a_configured_proxy_is_judged_like_an_endpoint(proxied):
    with FakeOpenAIServer() as server:
        with pytest.raises(EndpointPolicyError) as raised:
            TeacherClient(cfg_for(server, proxy="http://proxy.example.com:3128"), None)
        assert str(raised.value).startswith(
            "refusing to send reports to external proxy host 'proxy.example.com' with no acknowledgement."
        )
        (result,) = run(requests_for(REPORTS[:1]), cfg_for(server, proxy=proxied.url, max_retries=0))
        assert result.content is None and "502" in result.error  # the configured proxy got the request
        assert sum(server.counts.values()) == 0
    assert len(proxied.received) == 1 and b"/v1/chat/completions" in proxied.received[0]


def test_a_configured_prefect_api_the_proxy_cannot_relay_names_the_variable(proxied, monkeypatch, tmp_path):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.delenv("ALL_PROXY")
    monkeypatch.delenv("all_proxy")
    monkeypatch.delenv("http_proxy")
    result = CliRunner().invoke(
        app, ["stage", "extract_reports", "-c", DEMO, "--run-dir", str(tmp_path / "r")]
    )
    assert result.exit_code == 2
    assert result.output == (
        f"error: PREFECT_API_URL http://127.0.0.1:9/api goes through the proxy in HTTP_PROXY={proxied.url}, "
        "which did not relay http://127.0.0.1:9/api/health (HTTP 502): add 127.0.0.1 to NO_PROXY, or unset "
        "HTTP_PROXY\n"
    )
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert local_server.proxy_variable("http://127.0.0.1:9/api") is None


@pytest.mark.slow  # a whole stage through a real Prefect server
def test_the_temporary_prefect_server_is_reached_directly_under_a_proxy(proxied, monkeypatch, tmp_path):
    """A real stage through a real temporary Prefect server, with every proxy variable set to the sink."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    corpus = tmp_path / "corpus"
    made = CliRunner().invoke(
        app, ["synth", "--out", str(corpus), "--n", "6", "--set", "synth.image_size=64"]
    )
    assert made.exit_code == 0, made.output
    argv = [
        "stage",
        "extract_reports",
        "-c",
        DEMO,
        "--run-dir",
        str(tmp_path / "run"),
        "--set",
        f"data.root={corpus}",
    ]
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # even after a test configured one
        result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "extract_reports" / "reports.parquet").is_file()
    assert proxied.received == []
    assert "127.0.0.1" not in os.environ.get("NO_PROXY", "")  # restored after the command
