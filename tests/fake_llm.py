"""A local stand-in for an OpenAI-compatible chat server, so LLM features are tested without a network.

Use it as a context manager or through the ``fake_llm`` fixture (the tests' conftest lists this module in
``pytest_plugins``, so every test module can ask for it)::

    with FakeLLMServer(answer="a red circle moving right") as server:
        config = LLMConfig(base_url=server.base_url, api_key="sk-test", timeout_s=0.5)

Set ``behaviour`` (and ``answer``) between calls to choose how the next requests are answered.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

BEHAVIOURS = ("ok", "empty", "malformed", "no_choices", "http_500", "http_401_echo_key", "slow", "redirect")
DEFAULT_ANSWER = "A red circle moves steadily to the right across a plain black background."


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict:
        """The request body parsed as JSON."""
        return json.loads(self.body)


class FakeLLMServer:
    """Serve POST /v1/chat/completions on 127.0.0.1 (free port) from a background thread."""

    def __init__(self, behaviour: str = "ok", answer: str = DEFAULT_ANSWER, delay_s: float = 2.0):
        self.behaviour = behaviour
        self.answer = answer
        self.delay_s = delay_s  # how long "slow" waits before answering
        self.redirect_to = ""  # where "redirect" sends the client (a 307 with this Location)
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """The URL to give an OpenAI client (ends in /v1)."""
        if self._httpd is None:
            raise RuntimeError("the fake LLM server is not running")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> FakeLLMServer:
        """Bind a free port and start serving."""
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-llm", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; a request still sleeping in "slow" gives up without answering."""
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def record(self, request: RecordedRequest) -> None:
        """Keep a request (thread-safe)."""
        with self._lock:
            self.requests.append(request)

    def wait_or_stop(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; return False if the server is stopping meanwhile."""
        return not self._stopping.wait(seconds)


def _make_handler(server: FakeLLMServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # keep test output clean
            pass

        def do_POST(self):
            length = int(self.headers.get("Content-Length", 0))
            body = self.rfile.read(length)
            server.record(RecordedRequest("POST", self.path, dict(self.headers.items()), body))
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                return
            self._answer(server.behaviour)

        def _answer(self, behaviour: str) -> None:
            if behaviour == "slow" and not server.wait_or_stop(server.delay_s):
                self.close_connection = True
                return
            if behaviour in ("ok", "slow"):
                self._send(200, _completion(server.answer))
            elif behaviour == "empty":
                self._send(200, _completion(""))
            elif behaviour == "malformed":
                self._send_raw(200, b'{"id": "chatcmpl-1", "choices": [')
            elif behaviour == "no_choices":
                self._send(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "choices": []})
            elif behaviour == "redirect":
                try:
                    self.send_response(307)
                    self.send_header("Location", server.redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except (BrokenPipeError, ConnectionResetError):
                    pass
            elif behaviour == "http_500":
                self._send(500, {"error": {"message": "the fake server broke", "type": "server_error"}})
            elif behaviour == "http_401_echo_key":
                # Real servers sometimes quote the rejected key back; the client must not pass that on.
                key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                self._send(401, {"error": {"message": f"Incorrect API key provided: {key}", "type": "auth"}})
            else:
                self._send(400, {"error": {"message": f"unknown fake behaviour {behaviour!r}"}})

        def _send(self, status: int, payload: dict) -> None:
            self._send_raw(status, json.dumps(payload).encode())

        def _send_raw(self, status: int, body: bytes) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout): nothing to answer

    return Handler


def _completion(content: str) -> dict:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "fake-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


@pytest.fixture
def fake_llm():
    """A running FakeLLMServer answering "ok"; change ``.behaviour`` / ``.answer`` inside the test."""
    with FakeLLMServer() as server:
        yield server
