"""A reward server: any reward spec served over HTTP (``ctrldiff serve-reward``), for :class:`RemoteReward`.

stdlib only (``http.server.ThreadingHTTPServer``). The wire format and status codes are in
:mod:`ctrldiff.rewards.wire`. Every request is validated before the reward sees it; whatever a client sends,
the answer is one JSON object (an error is one line, never a traceback) and the server keeps serving.
Reward calls are serialised by a lock (models need not be thread-safe); a client that stops sending mid-request
is dropped after ``io_timeout`` seconds; at most ``max_connections`` connections are served at once (one thread
each): a connection beyond that gets an immediate 503, which :class:`RemoteReward` retries after its backoff.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from ..errors import CtrlDiffError, RewardError
from .base import Reward, call_reward, make_reward
from .wire import WireError, decode_request, encode_response, error_body

log = logging.getLogger("ctrldiff.serve")


class RewardServer(ThreadingHTTPServer):
    """``RewardServer(reward, host, port)``; ``port=0`` picks a free port (``server.port``)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, reward: Reward | str, host: str = "127.0.0.1", port: int = 0, max_batch: int = 256,
                 max_bytes: int = 64 << 20, device: str = "cpu", io_timeout: float = 30.0, verbose: bool = False,
                 max_connections: int = 64):
        if max_batch < 1:
            raise CtrlDiffError(f"--max-batch must be >= 1, got {max_batch}")
        if max_connections < 1:
            raise CtrlDiffError(f"--max-connections must be >= 1, got {max_connections}")
        self.max_connections = max_connections
        self.slots = threading.BoundedSemaphore(max_connections)
        self.refused = 0  # connections answered 503 because every slot was busy
        if max_bytes < 1024:
            raise CtrlDiffError(f"--max-mb gives a request limit of {max_bytes} bytes; it must be at least 1 KiB")
        self.reward = make_reward(reward)
        self.max_batch, self.max_bytes, self.device, self.verbose = max_batch, max_bytes, torch.device(device), verbose
        self.max_elements = max_bytes // 2  # float16 is the smallest dtype accepted; base64 makes it smaller still
        self.lock = threading.Lock()
        self.requests = 0  # /score requests answered, any status
        handler = type("Handler", (_Handler,), {"timeout": io_timeout})
        try:
            super().__init__((host, port), handler)
        except OSError as e:
            raise CtrlDiffError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None

    def process_request(self, request, client_address) -> None:
        """One thread per connection, up to ``max_connections``; beyond that an immediate 503 (no thread)."""
        if not self.slots.acquire(blocking=False):
            self.refused += 1
            body = error_body(f"server busy: all {self.max_connections} connections are in use; retry later",
                              self.reward.name)
            try:
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
                                + str(len(body)).encode() + b"\r\n\r\n" + body)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.server_address[0]}:{self.port}"

    def score(self, body: bytes) -> tuple[int, bytes]:
        """(HTTP status, JSON body) for a /score request body."""
        name = self.reward.name
        try:
            x, cond = decode_request(body, self.max_batch, self.max_elements)
        except WireError as e:
            return e.status, error_body(e, name)
        try:
            with self.lock:
                r = call_reward(self.reward, x.to(self.device), cond.to(self.device) if torch.is_tensor(cond) else cond)
        except RewardError as e:
            return 500, error_body(e, name)
        except CtrlDiffError as e:  # the reward cannot use this input (e.g. labels for a text-image reward)
            return 422, error_body(e, name)
        except Exception as e:  # noqa: BLE001 - call_reward wraps the reward's own errors; anything else is ours
            return 500, error_body(f"{type(e).__name__}: {e}", name)
        return 200, encode_response(r, name)

    def health(self) -> bytes:
        return json.dumps({"status": "ok", "reward": self.reward.name,
                           "differentiable": bool(self.reward.differentiable), "max_batch": self.max_batch,
                           "max_bytes": self.max_bytes, "max_connections": self.max_connections}).encode()


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    server_version = "ctrldiff-reward"
    protocol_version = "HTTP/1.0"
    default_request_version = "HTTP/1.0"  # so that even a garbled request line gets a status line back

    def _send(self, status: int, body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client went away
            pass
        self.close_connection = True

    def send_error(self, code, message=None, explain=None):  # http.server's own errors (bad request line, ...)
        # the client's fault, so a 4xx: an unknown method (501) is 405, an unsupported HTTP version (505) is 400
        code = {501: 405, 505: 400}.get(int(code), int(code))
        self._send(code, error_body(message or self.responses.get(code, ("error",))[0], self.server.reward.name))

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        if self.server.verbose:
            log.info("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        if self.path.split("?")[0] == "/health":
            self._send(200, self.server.health())
        elif self.path.split("?")[0] == "/score":
            self._send(405, error_body("use POST for /score", self.server.reward.name))
        else:
            self._send(404, error_body(f"unknown path {self.path[:100]!r}; use POST /score or GET /health",
                                       self.server.reward.name))

    def do_POST(self) -> None:
        name = self.server.reward.name
        if self.path.split("?")[0] != "/score":
            return self._send(404, error_body(f"unknown path {self.path[:100]!r}; use POST /score", name))
        if self.headers.get("Transfer-Encoding"):
            return self._send(411, error_body("chunked bodies are not accepted; send a Content-Length", name))
        length = self.headers.get("Content-Length")
        if length is None:
            return self._send(411, error_body("a Content-Length header is required", name))
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            return self._send(400, error_body(f"bad Content-Length {length[:40]!r}", name))
        if n > self.server.max_bytes:
            return self._send(413, error_body(f"request of {n} bytes exceeds this server's limit of "
                                              f"{self.server.max_bytes} bytes", name))
        try:
            body = self.rfile.read(n)
        except OSError:  # timed out or reset while reading: nothing to answer
            self.close_connection = True
            return None
        if len(body) != n:
            return self._send(400, error_body(f"the body ended after {len(body)} of {n} bytes", name))
        status, out = self.server.score(body)
        self.server.requests += 1
        return self._send(status, out)

    def _not_allowed(self) -> None:
        self._send(405, error_body(f"method {self.command} is not allowed; use POST /score or GET /health",
                                   self.server.reward.name))

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _not_allowed


def serve_in_thread(server: RewardServer) -> threading.Thread:
    """Start ``server.serve_forever`` on a daemon thread (stop with ``server.shutdown(); server.server_close()``)."""
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    return t
