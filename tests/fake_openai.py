"""A small local OpenAI-compatible HTTP server, for what a real one does not do on demand (timeouts, 5xx, malformed
replies, refusals): the judge's tests and the served teacher's fault cases share it."""

import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeServer:
    """The server's state: `reply(body)` gives (status, payload, delay in seconds) for a chat completion (payload:
    a dict sent as JSON, or bytes sent as they are); `models` are listed at /v1/models; every request is logged."""

    def __init__(self, reply):
        self.models = ["teacher"]
        self.requests = []  # (path, headers (case-insensitive), body)
        self.lock = threading.Lock()
        self.reply = reply
        self.url = ""


def completion(content, finish="stop"):
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}]}


def _handler(state: FakeServer):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            with state.lock:
                state.requests.append((self.path, self.headers, None))
            models = [{"id": name, "object": "model", "created": 0, "owned_by": "me"} for name in state.models]
            self.send(200, {"object": "list", "data": models})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.requests.append((self.path, self.headers, body))
            if self.path != "/v1/chat/completions":
                return self.send(404, {"error": "not found"})
            status, payload, delay = state.reply(body)
            time.sleep(delay)
            self.send(status, payload)

        def send(self, status, payload):
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up on a slow reply
                pass

        def log_message(self, *args):
            pass

    return Handler


@contextmanager
def serving(state: FakeServer):
    """`state` served on a free port of 127.0.0.1 for the block (`state.url`: its /v1 base URL)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
