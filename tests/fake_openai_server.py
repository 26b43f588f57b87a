"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests and benchmarks (stdlib only).

openai>=3 talks through httpx2, which request-mocking libraries do not intercept, so the client is
tested against this server over real sockets. It serves /v1/chat/completions, /v1/completions,
/v1/files, /v1/files/{id}/content and /v1/batches[/{id}], counts every request, and injects faults
from a queue consumed in arrival order:

  "429:<s>"      429 with Retry-After <s>          "429-quota"   429 insufficient_quota
  "500" / "503"  server error                      "401"         authentication error
  "400"          bad request (context too long)    "timeout:<s>" sleep <s> before answering
  "invalid_json" 200 with a broken JSON body        "html"        200 with a text/html body
  "empty"        200 with empty content             "wrong_format" 200 with prose instead of the format
  "no_usage"     200 without a usage block

Its "model" answers with the rules teacher's distillation of the report found in the prompt, so
every answer is checkable.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from models.distill.rules_teacher import distill, mentions_by_study
from models.text.entities import EntityMatcher, build_lexicon

Responder = Callable[[str, list[str]], str]
# The markers that frame the report inside the teacher prompt's last message (models.distill.prompt).
REPORT_MARKER = "Given the report: "
ENTITIES_MARKER = "\nEntities: "


def report_from_prompt(text: str) -> tuple[str, list[str]]:
    """Inverse of the prompt's last message: (report, entities), so the fake model can answer it."""
    start = text.rfind(REPORT_MARKER)
    end = text.find(ENTITIES_MARKER, start)
    if start < 0 or end < 0:
        raise ValueError(
            "text does not contain an ECAMP teacher prompt ('Given the report: ... Entities: ...')"
        )
    report = text[start + len(REPORT_MARKER) : end]
    entity_line = text[end + len(ENTITIES_MARKER) :].split("\n", 1)[0].rstrip(".")
    return report, [e.strip() for e in entity_line.split(",") if e.strip()]


@functools.lru_cache(maxsize=256)
def _matcher(entities: tuple[str, ...]) -> EntityMatcher:
    return EntityMatcher(build_lexicon(entities))


def rules_responder(report: str, entities: list[str]) -> str:
    """The rules teacher on the prompt's report, with stage 2's mentions of the prompt's entities."""
    table = _matcher(tuple(sorted({e.lower() for e in entities}))).match(["prompt"], [report])
    return distill(report, mentions_by_study(table).get("prompt", []))


def prompt_text(body: dict) -> str:
    if "messages" in body:
        return body["messages"][-1]["content"]
    return body.get("prompt", "")


class FakeOpenAIServer:
    def __init__(
        self,
        responder: Responder = rules_responder,
        latency_s: float = 0.0,
        require_key: str | None = None,
        batch_polls_until_done: int = 2,
        batch_failed_ids: frozenset[str] = frozenset(),
    ):
        self.responder = responder
        self.latency_s = latency_s
        self.require_key = require_key
        self.faults: deque[str] = deque()
        self.counts: Counter[str] = Counter()  # "POST /v1/chat/completions" -> n
        self.prompts_answered: Counter[str] = Counter()  # prompt text -> successful answers (paid requests)
        self.auth_headers: list[str] = []
        self.redirect_to: str | None = None  # answer every request with 307 to this base URL
        self.in_flight = 0
        self.max_in_flight = 0  # the most completion requests served at the same time
        self.arrivals: list[
            float
        ] = []  # time.monotonic() of each completion request, as the provider sees it
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.batch_polls_until_done = batch_polls_until_done
        self.batch_failed_ids = batch_failed_ids
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> FakeOpenAIServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output clean
                return

            def do_GET(self) -> None:
                server._handle(self, "GET")

            def do_POST(self) -> None:
                server._handle(self, "POST")

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    @property
    def completions_sent(self) -> int:
        return self.counts["POST /v1/chat/completions"] + self.counts["POST /v1/completions"]

    # -- request handling ----------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = h.path.split("?")[0]
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        with self._lock:
            self.counts[f"{method} {path}"] += 1
            self.auth_headers.append(h.headers.get("Authorization") or h.headers.get("api-key") or "")
        if self.redirect_to is not None:
            return _send(h, 307, b"", "text/plain", {"Location": self.redirect_to + path.removeprefix("/v1")})
        if self.require_key and h.headers.get("Authorization") != f"Bearer {self.require_key}":
            return _send_json(
                h, 401, {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}}
            )
        try:
            if method == "POST" and path.endswith(("/chat/completions", "/completions")):
                return self._completion(h, json.loads(raw), chat=path.endswith("/chat/completions"))
            if method == "POST" and path == "/v1/files":
                return self._upload(h, raw)
            if method == "POST" and path == "/v1/batches":
                return self._create_batch(h, json.loads(raw))
            if method == "GET" and path.startswith("/v1/batches/"):
                return self._poll_batch(h, path.rsplit("/", 1)[1])
            if method == "GET" and path.startswith("/v1/files/") and path.endswith("/content"):
                return _send(h, 200, self.files[path.split("/")[3]], "application/jsonl")
        except (KeyError, ValueError) as e:
            return _send_json(h, 400, {"error": {"message": f"bad request: {e}"}})
        return _send_json(h, 404, {"error": {"message": f"no route {method} {path}"}})

    def _next_fault(self) -> str | None:
        with self._lock:
            return self.faults.popleft() if self.faults else None

    def _completion(self, h: BaseHTTPRequestHandler, body: dict, chat: bool) -> None:
        with self._lock:
            self.arrivals.append(time.monotonic())
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self._answer(h, body, chat)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _answer(self, h: BaseHTTPRequestHandler, body: dict, chat: bool) -> None:
        fault = self._next_fault()
        if self.latency_s:
            time.sleep(self.latency_s)
        if fault is not None:
            kind, _, arg = fault.partition(":")
            if kind == "429":
                return _send_json(
                    h,
                    429,
                    {"error": {"message": "rate limited", "type": "rate_limit"}},
                    {"Retry-After": arg or "0"},
                )
            if kind == "429-quota":
                return _send_json(h, 429, {"error": {"message": "quota", "code": "insufficient_quota"}})
            if kind in ("500", "503", "401", "400"):
                return _send_json(h, int(kind), {"error": {"message": f"injected {kind}"}})
            if kind == "timeout":
                time.sleep(float(arg))
            if kind == "invalid_json":
                return _send(h, 200, b'{"choices": [{"message": {"content": "There is', "application/json")
            if kind == "html":
                return _send(h, 200, b"<html>gateway</html>", "text/html")
        text = prompt_text(body)
        if fault == "empty":
            content = ""
        elif fault == "wrong_format":
            content = "The patient appears well. Findings are described in the report above."
        else:
            content = self.responder(*report_from_prompt(text))
            with self._lock:
                self.prompts_answered[text] += 1
        out = completion_body(body.get("model", "m"), content, chat, usage=fault != "no_usage")
        _send_json(h, 200, out)

    def _upload(self, h: BaseHTTPRequestHandler, raw: bytes) -> None:
        content = _multipart_file(h.headers.get("Content-Type", ""), raw)
        with self._lock:
            file_id = f"file-{len(self.files) + 1}"
            self.files[file_id] = content
        _send_json(h, 200, _file_obj(file_id, len(content)))

    def _create_batch(self, h: BaseHTTPRequestHandler, body: dict) -> None:
        with self._lock:
            batch_id = f"batch_{len(self.batches) + 1}"
            self.batches[batch_id] = {
                "input_file_id": body["input_file_id"],
                "endpoint": body["endpoint"],
                "polls": 0,
            }
        _send_json(h, 200, self._batch_obj(batch_id, "validating"))

    def _poll_batch(self, h: BaseHTTPRequestHandler, batch_id: str) -> None:
        b = self.batches[batch_id]
        b["polls"] += 1
        if b["polls"] < self.batch_polls_until_done:
            return _send_json(h, 200, self._batch_obj(batch_id, "in_progress"))
        if "output_file_id" not in b:
            self._run_batch(batch_id)
        _send_json(h, 200, self._batch_obj(batch_id, "completed"))

    def _run_batch(self, batch_id: str) -> None:
        b = self.batches[batch_id]
        out, err = [], []
        for line in self.files[b["input_file_id"]].decode().splitlines():
            req = json.loads(line)
            cid = req["custom_id"]
            if cid in self.batch_failed_ids:
                err.append(
                    {
                        "id": f"req_{cid}",
                        "custom_id": cid,
                        "response": None,
                        "error": {"code": "server_error", "message": "injected batch failure"},
                    }
                )
                continue
            text = prompt_text(req["body"])
            content = self.responder(*report_from_prompt(text))
            self.prompts_answered[text] += 1
            body = completion_body(req["body"]["model"], content, chat=True, usage=True)
            out.append(
                {
                    "id": f"req_{cid}",
                    "custom_id": cid,
                    "response": {"status_code": 200, "body": body},
                    "error": None,
                }
            )
        out.reverse()  # the real service does not keep input order either
        for kind, rows in (("output_file_id", out), ("error_file_id", err)):
            if rows:
                file_id = f"file-{len(self.files) + 1}"
                self.files[file_id] = "".join(json.dumps(r) + "\n" for r in rows).encode()
                b[kind] = file_id
        b["counts"] = {"total": len(out) + len(err), "completed": len(out), "failed": len(err)}

    def _batch_obj(self, batch_id: str, status: str) -> dict:
        b = self.batches[batch_id]
        return {
            "id": batch_id,
            "object": "batch",
            "endpoint": b["endpoint"],
            "input_file_id": b["input_file_id"],
            "completion_window": "24h",
            "status": status,
            "created_at": 0,
            "output_file_id": b.get("output_file_id"),
            "error_file_id": b.get("error_file_id"),
            "request_counts": b.get("counts", {"total": 0, "completed": 0, "failed": 0}),
        }


def completion_body(model: str, content: str, chat: bool, usage: bool) -> dict:
    prompt_tokens, completion_tokens = 100, max(1, len(content) // 4)
    if chat:
        choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}
    else:
        choice = {"index": 0, "finish_reason": "stop", "text": content}
    body = {
        "id": "cmpl-1",
        "object": "chat.completion" if chat else "text_completion",
        "created": 0,
        "model": model,
        "choices": [choice],
    }
    if usage:
        body["usage"] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
    return body


def _file_obj(file_id: str, size: int) -> dict:
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": 0,
        "filename": "input.jsonl",
        "purpose": "batch",
        "status": "processed",
    }


def _multipart_file(content_type: str, raw: bytes) -> bytes:
    """The bytes of the `file` part of a multipart/form-data body."""
    boundary = content_type.split("boundary=", 1)[1].strip('"').encode()
    for part in raw.split(b"--" + boundary):
        head, _, data = part.partition(b"\r\n\r\n")
        if b'name="file"' in head:
            return data.rstrip(b"\r\n")
    raise ValueError("multipart body has no 'file' part")


def _send_json(
    h: BaseHTTPRequestHandler, status: int, body: dict, headers: dict[str, str] | None = None
) -> None:
    _send(h, status, json.dumps(body).encode(), "application/json", headers)


def _send(
    h: BaseHTTPRequestHandler, status: int, data: bytes, ctype: str, headers: dict | None = None
) -> None:
    try:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
        pass
