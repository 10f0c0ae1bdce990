"""The client of a reward server (``ctrldiff serve-reward``): ``remote:URL[;timeout=60;retries=3;...]``.

A batch is sent in chunks of at most ``max_batch`` samples (one POST /score each, wire format in
:mod:`ctrldiff.rewards.wire`). Each request may take ``timeout`` seconds per socket operation (connect, each
read); a refused or reset connection, a timeout or a 5xx answer is retried up to ``retries`` more times, waiting
``backoff * 2**k`` seconds (at most ``max_backoff``) before retry k+1. A 4xx answer (the server rejects the input)
and a malformed answer (not JSON, wrong length, NaN) are not retried. When it gives up, a :class:`RewardError` names
the URL, the reward it serves (when known) and what went wrong on the last attempt.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse

import torch
from torch import Tensor

from ..errors import CtrlDiffError, RewardError
from .base import register_reward
from .wire import WireError, decode_response, encode_request

MAX_ANSWER_BYTES = 64 << 20


class RemoteReward:
    """Scores by POSTing to a reward server; not differentiable (gradients do not cross HTTP)."""

    differentiable = False

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 3, backoff: float = 0.5,
                 max_backoff: float = 10.0, max_batch: int = 64):
        u = urlparse(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise CtrlDiffError(f"reward 'remote' needs an http(s) URL such as remote:http://127.0.0.1:8000, got {url!r}")
        try:
            u.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            raise CtrlDiffError(f"reward 'remote': bad port in URL {url!r}") from None
        for key, v, lo in (("timeout", timeout, 1e-3), ("backoff", backoff, 0.0), ("max_backoff", max_backoff, 0.0)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= lo or v != v or v == float("inf"):
                raise CtrlDiffError(f"reward 'remote': {key} must be a finite number >= {lo:g} seconds, got {v!r}")
        for key, v, lo in (("retries", retries, 0), ("max_batch", max_batch, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise CtrlDiffError(f"reward 'remote': {key} must be an integer >= {lo}, got {v!r}")
        base = url.rstrip("/")
        self.url = base if base.endswith("/score") else base + "/score"
        self.name = f"remote:{url}"
        self.timeout, self.retries = float(timeout), retries
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.max_batch = max_batch
        # a loopback server is reached directly, never through an http_proxy from the environment
        loopback = u.hostname in ("127.0.0.1", "localhost", "::1")
        self._open = (urllib.request.build_opener(urllib.request.ProxyHandler({})).open if loopback
                      else urllib.request.urlopen)
        self.served: str | None = None  # the served reward's name, from the server's answers
        self.attempts = 0  # requests sent, retries included

    def _where(self) -> str:
        return f"reward server {self.url}" + (f" (serving {self.served!r})" if self.served else "")

    def __call__(self, x: Tensor, cond=None) -> Tensor:
        if isinstance(cond, Tensor) and cond.shape[:1] != x.shape[:1]:
            raise CtrlDiffError(f"reward {self.name!r}: cond has {cond.shape[0]} rows for {x.shape[0]} samples")
        if isinstance(cond, (list, tuple)) and len(cond) != x.shape[0]:
            raise CtrlDiffError(f"reward {self.name!r}: {len(cond)} prompts for {x.shape[0]} samples")
        out = []
        for i in range(0, x.shape[0], self.max_batch):
            xc = x[i:i + self.max_batch]
            cc = None if cond is None else cond[i:i + self.max_batch]
            try:
                body = encode_request(xc, cc)
            except WireError as e:
                raise CtrlDiffError(f"reward {self.name!r}: {e}") from None
            answer = self._post(body)
            try:
                r, served = decode_response(answer, xc.shape[0])
            except WireError as e:
                raise RewardError(f"{self._where()}: malformed answer: {e}") from None
            self.served = served or self.served
            out.append(r)
        return torch.cat(out).to(x.device)

    def _post(self, body: bytes) -> bytes:
        """POST with retries; the answer's bytes, or RewardError once the attempts are spent."""
        attempts, last = self.retries + 1, ""
        for k in range(attempts):
            self.attempts += 1
            req = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with self._open(req, timeout=self.timeout) as resp:
                    data = resp.read(MAX_ANSWER_BYTES + 1)
                if len(data) > MAX_ANSWER_BYTES:
                    raise RewardError(f"{self._where()}: the answer is larger than {MAX_ANSWER_BYTES >> 20} MiB")
                return data
            except urllib.error.HTTPError as e:
                msg = self._error_message(e)
                if e.code < 500:
                    raise RewardError(f"{self._where()}: the server rejected the request (HTTP {e.code}): {msg}") from None
                last = f"HTTP {e.code}: {msg}"
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                last = self._describe(e)
            if k + 1 < attempts:
                time.sleep(min(self.backoff * 2 ** k, self.max_backoff))
        raise RewardError(f"{self._where()}: {last} (gave up after {attempts} attempt{'s' * (attempts > 1)})")

    def _error_message(self, e: urllib.error.HTTPError) -> str:
        try:
            obj = json.loads(e.read(65536).decode("utf-8"))
            self.served = obj.get("reward") or self.served
            return str(obj["error"])
        except Exception:  # noqa: BLE001 - not our server's JSON error
            return str(e.reason)

    def _describe(self, e: BaseException) -> str:
        reason = getattr(e, "reason", e)
        if isinstance(reason, (TimeoutError, socket.timeout)) or "timed out" in str(reason):
            return f"no answer within the timeout of {self.timeout:g} s"
        if isinstance(reason, ConnectionRefusedError):
            return "connection refused (is the server running?)"
        if isinstance(reason, (ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError)):
            return "the server closed the connection without an answer"
        if isinstance(reason, socket.gaierror):
            return f"cannot resolve the host ({reason})"
        return f"{type(reason).__name__}: {reason}"

    def __repr__(self) -> str:
        return f"RemoteReward({self.url})"


@register_reward("remote")
def remote(url: str | None = None, timeout: float = 60.0, retries: int = 3, backoff: float = 0.5,
           max_backoff: float = 10.0, max_batch: int = 64) -> RemoteReward:
    if url is None:
        raise CtrlDiffError("reward 'remote' needs the server's URL: remote:http://HOST:PORT")
    return RemoteReward(url, timeout=timeout, retries=retries, backoff=backoff, max_backoff=max_backoff,
                        max_batch=max_batch)
