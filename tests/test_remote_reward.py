"""The reward server (``ctrldiff serve-reward``) and its client (``remote:URL``), on loopback only.

Servers run on ephemeral ports of 127.0.0.1, in a thread of this process (or a subprocess for the CLI), and are
always shut down. Faults are injected server-side (slow, failing, NaN-returning rewards; a fake server with
malformed answers; a server that goes away mid-run) and counted there.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fault_helpers  # tests/ is on sys.path; its rewards are served below
from ctrldiff.cli import main
from ctrldiff.errors import CtrlDiffError, RewardError
from ctrldiff.rewards import FunctionReward, make_reward
from ctrldiff.rewards.remote import RemoteReward
from ctrldiff.rewards.server import RewardServer, serve_in_thread
from ctrldiff.rewards.wire import WireError, decode_request, encode_request, encode_tensor
from ctrldiff.train.checkpoint import load_latest_checkpoint

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


@contextmanager
def serving(reward, **kw):
    server = RewardServer(reward, host="127.0.0.1", port=0, **kw)
    thread = serve_in_thread(server)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        assert not thread.is_alive()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: bytes, headers: dict | None = None, method: str = "POST", path: str = "/score"):
    host, port = url.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        try:
            c.request(method, path, body=body, headers=headers if headers is not None else
                      {"Content-Type": "application/json"})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (a 503 at the connection cap) and closed before reading the body: read it
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


class Counting:
    """A reward that records its calls (server-side attempt count) and can sleep / misbehave on chosen calls."""

    differentiable = False

    def __init__(self, base="toy2d-mode-switch", sleep_on=(), sleep_s=0.0, nan_on=()):
        self.base, self.name = make_reward(base), "counting"
        self.calls, self.sleep_on, self.sleep_s, self.nan_on = 0, set(sleep_on), sleep_s, set(nan_on)

    def __call__(self, x, cond=None):
        k, self.calls = self.calls, self.calls + 1
        if k in self.sleep_on or "all" in self.sleep_on:
            time.sleep(self.sleep_s)
        r = self.base(x).detach()
        return torch.full_like(r, float("nan")) if k in self.nan_on else r


# ---- exact agreement, batching ---------------------------------------------------------------------------------
def test_server_matches_the_local_reward_exactly_in_chunks():
    local = make_reward("toy2d-mode-switch")
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(0))
    with serving("toy2d-mode-switch", max_batch=3) as s:
        client = make_reward(f"remote:{s.url};max_batch=3;timeout=10")
        assert client.name == f"remote:{s.url}" and not client.differentiable
        r = client(x, None)
        assert torch.equal(r, local(x)) and r.dtype == torch.float32
        assert s.requests == 3 and client.attempts == 3  # 7 samples in chunks of 3, 3, 1
        assert client.served == "mode_switch"
        status, body = _post(s.url, b"", method="GET", path="/health")
        assert status == 200 and json.loads(body) == {"status": "ok", "reward": "mode_switch", "differentiable": True,
                                                      "max_batch": 3, "max_bytes": 64 << 20, "max_connections": 64}
        # a client allowed bigger chunks than the server takes: a clear, unretried 413
        with pytest.raises(RewardError, match=r"rejected the request \(HTTP 413\): batch of 7 exceeds this server's "
                                              r"max batch 3"):
            make_reward(f"remote:{s.url};max_batch=8")(x)


def test_labels_and_prompts_reach_the_served_reward():
    by_label = FunctionReward(lambda x, c: x.sum(1) * c.float() + (c == 3).float(), "by-label")
    x, y = torch.randn(10, 2), torch.arange(10)
    with serving(by_label) as s:
        torch.testing.assert_close(make_reward(f"remote:{s.url}")(x, y), by_label(x, y), rtol=0, atol=0)
    with serving("digit-alignment") as s:
        with pytest.raises(RewardError, match=r"HTTP 422\): reward 'digit-alignment' needs the conditioned digit"):
            make_reward(f"remote:{s.url}")(torch.zeros(2, 1, 8, 8), None)
    prompts = ["a", "bb", "", "a cat on a mat"]
    by_len = FunctionReward(lambda x, c: x.sum(1) + torch.tensor([float(len(p)) for p in c]), "by-len")
    with serving(by_len) as s:
        x = torch.randn(4, 2)
        torch.testing.assert_close(make_reward(f"remote:{s.url};max_batch=3")(x, prompts), by_len(x, prompts),
                                   rtol=0, atol=0)


# ---- timeouts, refused connections, 5xx: retried as configured ---------------------------------------------------
def test_slow_server_times_out_and_is_retried():
    slow = Counting(sleep_on={"all"}, sleep_s=0.6)
    with serving(slow) as s:
        client = make_reward(f"remote:{s.url};timeout=0.2;retries=2;backoff=0.05")
        t0 = time.perf_counter()
        with pytest.raises(RewardError) as e:
            client(torch.randn(4, 2))
        msg = str(e.value)
        assert f"reward server {s.url}/score" in msg and "no answer within the timeout of 0.2 s" in msg
        assert "gave up after 3 attempts" in msg and "\n" not in msg
        assert time.perf_counter() - t0 < 2.0  # 3 x 0.2 s + backoff 0.05 + 0.1, not 3 x 0.6 s
        deadline = time.time() + 5
        while slow.calls < 3 and time.time() < deadline:
            time.sleep(0.05)
        assert slow.calls == 3 and client.attempts == 3  # every attempt reached the server
    # slow only once: the retry succeeds with the right scores
    once = Counting(sleep_on={0}, sleep_s=0.5)  # the retry (at 0.4 s) waits for the first call's lock until 0.5 s
    with serving(once) as s:
        client = make_reward(f"remote:{s.url};timeout=0.4;retries=1;backoff=0")
        x = torch.randn(4, 2)
        assert torch.equal(client(x), make_reward("toy2d-mode-switch")(x))
        assert client.attempts == 2


def test_refused_connection_is_retried_then_a_clear_error():
    port = _free_port()
    client = RemoteReward(f"http://127.0.0.1:{port}", retries=2, backoff=0.05, timeout=2)
    t0 = time.perf_counter()
    with pytest.raises(RewardError, match=rf"^reward server http://127.0.0.1:{port}/score: connection refused \(is the "
                                          r"server running\?\) \(gave up after 3 attempts\)$"):
        client(torch.randn(2, 2))
    assert client.attempts == 3 and 0.14 < time.perf_counter() - t0 < 3  # backoff 0.05 + 0.1 between the attempts


def test_5xx_is_retried_and_names_the_reward():
    flaky = Counting(nan_on={0})  # NaN on the first call: the server answers 500, the retry gets the scores
    with serving(flaky) as s:
        client = make_reward(f"remote:{s.url};retries=1;backoff=0")
        x = torch.randn(3, 2)
        assert torch.equal(client(x), make_reward("toy2d-mode-switch")(x)) and flaky.calls == 2
        always = Counting(nan_on=set(range(100)))
        s.reward = always
        with pytest.raises(RewardError, match=r"\(serving 'counting'\): HTTP 500: reward 'counting' returned 3 "
                                              r"non-finite value\(s\).*gave up after 3 attempts"):
            make_reward(f"remote:{s.url};retries=2;backoff=0")(x)
        assert always.calls == 3


# ---- malformed answers -----------------------------------------------------------------------------------------------
class _Fake(BaseHTTPRequestHandler):
    """Answers /<mode>/score with a malformed body chosen by <mode>; counts the requests."""

    hits: dict = {}

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        mode = self.path.strip("/").split("/")[0]
        _Fake.hits[mode] = _Fake.hits.get(mode, 0) + 1
        status, body = {"shape": (200, b'{"rewards": [1.0, 2.0]}'), "notjson": (200, b"<html>hello</html>"),
                        "nan": (200, b'{"rewards": [1.0, NaN, 3.0]}'), "inf": (200, b'{"rewards": [1.0, 2.0, Infinity]}'),
                        "strings": (200, b'{"rewards": ["a", "b", "c"]}'), "nokey": (200, b'{"scores": [1, 2, 3]}'),
                        "teapot": (418, b"short and stout"),
                        "close": (None, b"")}[mode]
        if status is None:  # drop the connection without an answer
            self.close_connection = True
            return
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.mark.parametrize("mode,msg,attempts", [
    ("shape", "malformed answer: the answer holds 2 rewards for 3 samples", 1),
    ("notjson", "malformed answer: the answer is not JSON (starts b'<html>hello</html>')", 1),
    ("nan", "malformed answer: the answer holds 1 non-finite reward(s) (NaN/inf)", 1),
    ("inf", "malformed answer: the answer holds 1 non-finite reward(s) (NaN/inf)", 1),
    ("strings", "malformed answer: 'rewards' must be a list of numbers", 1),
    ("nokey", "malformed answer: the answer has no 'rewards'", 1),
    ("teapot", "rejected the request (HTTP 418): I'm a Teapot", 1),
    ("close", "the server closed the connection without an answer (gave up after 2 attempts)", 2),
])
def test_malformed_answers_are_clear_errors(mode, msg, attempts):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{mode}"
        with pytest.raises(RewardError) as e:
            make_reward(f"remote:{url};retries=1;backoff=0")(torch.randn(3, 2))
        assert str(e.value).startswith(f"reward server {url}/score: ") and msg in str(e.value), str(e.value)
        assert _Fake.hits[mode] == attempts
    finally:
        server.shutdown()
        server.server_close()
        t.join(5)


def test_client_options_are_checked():
    for spec, msg in [("remote", "needs the server's URL"), ("remote:ftp://x", "needs an http"),
                      ("remote:http://127.0.0.1:80;timeout=0", "timeout must be a finite number"),
                      ("remote:http://127.0.0.1:80;retries=-1", "retries must be an integer >= 0"),
                      ("remote:http://127.0.0.1:80;max_batch=0", "max_batch must be an integer >= 1"),
                      ("remote:http://127.0.0.1:x", "bad port"),
                      ("remote:http://127.0.0.1:80;colour=red", "unknown argument(s) colour")]:
        with pytest.raises(CtrlDiffError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            make_reward(spec)
    with pytest.raises(CtrlDiffError, match="3 prompts for 2 samples"):
        make_reward("remote:http://127.0.0.1:80")(torch.zeros(2, 2), ["a", "b", "c"])


# ---- the server: strict validation, one-line JSON errors, keeps serving --------------------------------------------
def _req(x: torch.Tensor, cond=None) -> bytes:
    return encode_request(x, cond)


def test_server_rejects_malformed_requests_and_keeps_serving():
    good = _req(torch.randn(2, 2))
    xe = encode_tensor(torch.randn(2, 2))
    cases = [
        (b"", 400, "not valid JSON"), (b"\xff\xfe", 400, "not UTF-8"), (b"[1, 2]", 400, "must be a JSON object"),
        (b'{"x": 1, "y": 2}', 400, "unknown request key(s) 'y'"), (b'{"cond": null}', 400, "has no 'x'"),
        (json.dumps({"x": {**xe, "dtype": "int8"}}).encode(), 400, "x.dtype must be one of float16, float32, float64"),
        (json.dumps({"x": {**xe, "shape": [2, -2]}}).encode(), 400, "x.shape must hold positive integers"),
        (json.dumps({"x": {**xe, "shape": []}}).encode(), 400, "x.shape must be a list of 1 to 8 sizes"),
        (json.dumps({"x": {**xe, "shape": [10 ** 12, 10 ** 12]}}).encode(), 413, "more than this server's limit"),
        (json.dumps({"x": {**xe, "shape": [3, 2]}}).encode(), 400, "holds 16 bytes, shape [3, 2] of float32 needs 24"),
        (json.dumps({"x": {**xe, "data": "!!!!"}}).encode(), 400, "x.data is not valid base64"),
        (json.dumps({"x": {**xe, "extra": 1}}).encode(), 400, "x: unknown key(s) 'extra'"),
        (json.dumps({"x": encode_tensor(torch.tensor([[float("nan"), 0.0]]))}).encode(), 400, "non-finite values"),
        (json.dumps({"x": xe, "cond": ["a"]}).encode(), 400, "must hold 2 prompt strings"),
        (json.dumps({"x": xe, "cond": encode_tensor(torch.arange(3))}).encode(), 400, "cond has first dimension 3"),
        (json.dumps({"x": xe, "cond": 5}).encode(), 400, "cond must be an object with dtype, shape and data"),
        (b'{"x": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400, "nested too deeply"),
        (b'{"x": NaN}', 400, "NaN is not allowed"),
    ]
    with serving("toy2d-mode-switch", max_batch=4, max_bytes=1 << 20) as s:
        for body, status, msg in cases:
            code, out = _post(s.url, body)
            err = json.loads(out)
            assert code == status and msg in err["error"] and err["reward"] == "mode_switch", (body[:80], code, err)
            assert "Traceback" not in err["error"] and "\n" not in err["error"]
        for headers, method, path, status, msg in [
            ({}, "POST", "/score", 411, "Content-Length header is required"),
            ({"Content-Length": "-5"}, "POST", "/score", 400, "bad Content-Length"),
            ({"Content-Length": "abc"}, "POST", "/score", 400, "bad Content-Length"),
            ({"Content-Length": str(2 << 20)}, "POST", "/score", 413, "exceeds this server's limit of 1048576 bytes"),
            ({"Transfer-Encoding": "chunked"}, "POST", "/score", 411, "chunked bodies are not accepted"),
            ({"Content-Length": "0"}, "POST", "/nope", 404, "unknown path '/nope'"),
            ({}, "GET", "/score", 405, "use POST"), ({}, "GET", "/", 404, "unknown path"),
            ({}, "PUT", "/score", 405, "method PUT is not allowed"),
        ]:
            c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
            c.putrequest(method, path, skip_accept_encoding=True)
            for k, v in headers.items():
                c.putheader(k, v)
            c.endheaders()
            r = c.getresponse()
            err = json.loads(r.read())
            c.close()
            assert r.status == status and msg in err["error"], (headers, method, path, r.status, err)
        # a garbage request line and a client that stalls mid-body
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as raw:
            raw.sendall(b"\x00\x01 garbage\r\n\r\n")
            assert raw.recv(4096).startswith(b"HTTP/1.0 400")
        assert s.requests == len(cases)  # the header errors are answered before the reward is involved
        code, out = _post(s.url, good)
        assert code == 200 and len(json.loads(out)["rewards"]) == 2


def test_a_stalled_client_is_dropped_and_others_are_served():
    with serving("toy2d-mode-switch", io_timeout=0.5) as s:
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as raw:
            raw.sendall(b"POST /score HTTP/1.0\r\nContent-Length: 1000\r\n\r\n{\"x\":")  # and then nothing
            code, out = _post(s.url, _req(torch.randn(3, 2)))  # served meanwhile (threads)
            assert code == 200
            raw.settimeout(5)
            assert raw.recv(4096) == b""  # dropped after io_timeout, without an answer


def test_connections_beyond_the_cap_get_503_and_a_retrying_client_gets_through():
    with serving("toy2d-mode-switch", io_timeout=1.0, max_connections=2) as s:
        stalled = [socket.create_connection(("127.0.0.1", s.port), timeout=10) for _ in range(2)]
        try:
            for raw in stalled:  # both slots held by clients that stop mid-body
                raw.sendall(b"POST /score HTTP/1.0\r\nContent-Length: 1000\r\n\r\n{")
            time.sleep(0.15)
            code, out = _post(s.url, _req(torch.randn(3, 2)))
            assert code == 503 and "all 2 connections are in use" in json.loads(out)["error"]
            assert s.refused == 1 and threading.active_count() < 20
            # the stalled clients are dropped after io_timeout; a retrying client then gets its answer
            rr = RemoteReward(s.url, timeout=5, retries=4, backoff=0.3)
            r = rr(torch.randn(4, 2))
            assert r.shape == (4,) and rr.attempts >= 2
        finally:
            for raw in stalled:
                raw.close()
        assert json.loads(_post(s.url, b"", method="GET", path="/health")[1])["max_connections"] == 2
    with pytest.raises(CtrlDiffError, match="--max-connections must be >= 1"):
        RewardServer("toy2d-mode-switch", max_connections=0)


def test_server_reports_failing_rewards_as_500_and_bad_input_as_422():
    def boom(x, cond):
        raise RuntimeError("model exploded")

    with serving(FunctionReward(boom, "boom")) as s:
        code, out = _post(s.url, _req(torch.randn(2, 2)))
        assert code == 500 and json.loads(out)["error"] == "reward 'boom' raised RuntimeError: model exploded"
    with serving("jpeg-compressibility") as s:
        code, out = _post(s.url, _req(torch.randn(2, 2)))
        assert code == 422 and "expect a batch of images [B, C, H, W], got shape (2, 2)" in json.loads(out)["error"]


# ---- fuzzing the request parser (#8) -----------------------------------------------------------------------------
FUZZ = settings(max_examples=120, deadline=timedelta(seconds=2), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_json = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=20),
                     lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=8), c, max_size=5),
                     max_leaves=20)
_dtype = st.sampled_from(["float32", "float16", "float64", "int64", "bool", "int8", "", "float", 3, None])
_shape = st.one_of(st.lists(st.integers(-3, 2 ** 40), max_size=10), st.lists(st.integers(1, 4), min_size=1, max_size=3),
                   _json)


@st.composite
def _tensor_obj(draw):
    shape = draw(_shape)
    n = math.prod(shape) if isinstance(shape, list) and all(isinstance(s, int) and 0 < s < 5 for s in shape) else 3
    nbytes = draw(st.sampled_from([n * 4, n * 2, n * 8, n, 0, n * 4 + 1]))
    data = draw(st.one_of(st.just(base64.b64encode(draw(st.binary(min_size=nbytes, max_size=nbytes))).decode()),
                          st.text(max_size=12), _json))
    obj = {"dtype": draw(_dtype), "shape": shape, "data": data}
    if draw(st.booleans()):
        obj = draw(st.dictionaries(st.sampled_from(["dtype", "shape", "data", "x"]), _json, max_size=4)) | obj
    if draw(st.integers(0, 9)) == 0:
        obj.pop(draw(st.sampled_from(["dtype", "shape", "data"])))
    return obj


_cond = st.one_of(st.none(), st.lists(st.text(max_size=8), max_size=5), _tensor_obj(), _json)
@st.composite
def _valid_request(draw):
    shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.float64]))
    x = torch.tensor(draw(st.lists(st.floats(-6e4, 6e4, width=16), min_size=math.prod(shape),
                                   max_size=math.prod(shape)))).reshape(shape).to(dtype)
    cond = draw(st.one_of(st.none(), st.just(torch.arange(shape[0])), st.just(["p"] * shape[0])))
    req = json.loads(encode_request(x, cond))
    if draw(st.booleans()):  # one field replaced by something random
        where = draw(st.sampled_from(["x", "cond", None]))
        key = draw(st.sampled_from(["dtype", "shape", "data"]))
        target = req if where is None or not isinstance(req.get(where), dict) else req[where]
        target[key if where else draw(st.sampled_from(["x", "cond", "z"]))] = draw(_json)
    return json.dumps(req).encode()


_request = st.one_of(
    _valid_request(),
    st.binary(max_size=200),
    _json.map(lambda v: json.dumps(v).encode()),
    st.builds(lambda x, c, extra: json.dumps({"x": x, "cond": c} | extra).encode(), _tensor_obj(), _cond,
              st.dictionaries(st.sampled_from(["y", "x"]), _json, max_size=1)),
)


@FUZZ
@given(body=_request)
def test_request_parser_only_accepts_valid_requests(body):
    try:
        x, cond = decode_request(body, max_batch=8, max_elements=4096)
    except WireError as e:
        assert 400 <= e.status < 500 and "\n" not in str(e)
        return
    assert x.dtype == torch.float32 and 1 <= x.shape[0] <= 8 and torch.isfinite(x).all()
    assert cond is None or (isinstance(cond, list) and len(cond) == x.shape[0]) or cond.shape[0] == x.shape[0]


@pytest.fixture(scope="module")
def fuzz_server():
    reward = FunctionReward(lambda x, c: x.reshape(x.shape[0], -1).clamp(-1, 1).mean(1), "mean")
    with serving(reward, max_batch=8, max_bytes=1 << 16, io_timeout=2) as s:
        yield s


@settings(FUZZ, max_examples=60, deadline=timedelta(seconds=5))
@given(body=_request)
def test_server_answers_200_or_4xx_json_to_anything(fuzz_server, body):
    code, out = _post(fuzz_server.url, body)
    reply = json.loads(out)
    if code == 200:
        assert len(reply["rewards"]) >= 1 and all(math.isfinite(v) for v in reply["rewards"])
    else:
        assert 400 <= code < 500 and isinstance(reply["error"], str) and "\n" not in reply["error"]


@settings(FUZZ, max_examples=40, deadline=timedelta(seconds=5))
@given(raw=st.binary(max_size=300))
def test_server_survives_raw_garbage(fuzz_server, raw):
    with socket.create_connection(("127.0.0.1", fuzz_server.port), timeout=5) as c:
        try:
            c.sendall(raw + b"\r\n\r\n")
            c.shutdown(socket.SHUT_WR)
            reply = c.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            reply = b""
    assert reply == b"" or reply.startswith(b"HTTP/1.") and b" 5" not in reply.split(b"\r\n")[0]
    code, _ = _post(fuzz_server.url, b"", method="GET", path="/health")
    assert code == 200


# ---- the CLI: ctrldiff serve-reward in a real process ---------------------------------------------------------------
def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(TESTS)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


@pytest.mark.slow
def test_serve_reward_cli_answers_and_stops_on_sigterm():
    p = subprocess.Popen([sys.executable, "-m", "ctrldiff", "serve-reward", "--reward", "toy2d-mode-switch",
                          "--port", "0", "--threads", "1", "--max-batch", "16"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        line = p.stdout.readline()
        assert line.startswith("serving reward 'mode_switch' on http://127.0.0.1:"), (line, p.stderr.read())
        url = line.split(" on ")[1].split(" ")[0]
        code, out = _post(url, b"", method="GET", path="/health")
        assert code == 200 and json.loads(out)["max_batch"] == 16
        x = torch.randn(5, 2)
        assert torch.equal(make_reward(f"remote:{url}")(x), make_reward("toy2d-mode-switch")(x))
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=10)
        assert p.returncode == 0 and out.strip() == "stopped" and err == ""
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_serve_reward_cli_errors_are_one_line(capsys):
    for args, msg in [(["--reward", "nope"], "unknown reward 'nope'"), (["--reward", "toy2d-ring", "--port", "70000"],
                                                                        "--port must lie in 0..65535"),
                      (["--reward", "toy2d-ring", "--max-batch", "0"], "--max-batch must be >= 1")]:
        with pytest.raises(SystemExit) as e:
            main.main(args=["serve-reward", *args], prog_name="ctrldiff")
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.startswith(f"error: {msg}") and err.count("\n") == 1, err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(SystemExit):
            main.main(args=["serve-reward", "--reward", "toy2d-ring", "--port", str(busy.getsockname()[1])],
                      prog_name="ctrldiff")
        assert "error: cannot listen on 127.0.0.1:" in capsys.readouterr().err


# ---- remote rewards in the trainer (#8): stop with a clear error, or skip and count; the checkpoint stays -------------
SMALL = ["--model", "gmm2-exact", "--reward", "toy2d-mode-switch", "--batch-size", "16", "--steps", "4",
         "--set", "log.checkpoint_every=1", "--set", "log.tensorboard=false", "--set", "log.num_eval_samples=16",
         "--set", "log.num_final_eval=0", "--quiet", "--threads", "1", "--set", "rollout_chunk=8",
         "--set", "ctrl.certify_z=0"]  # (the fault servers count calls by epoch; the certification's would shift them)


class FaultyServer(RewardServer):
    """Serves toy2d-mode-switch; from call ``start`` on (every call, or only odd calls = the second chunk of an
    epoch when ``periodic``) injects ``fault``: '500', 'timeout' (answers after 0.6 s) or 'malformed' (1 reward)."""

    def __init__(self, fault: str, start: int, periodic: bool):
        super().__init__("toy2d-mode-switch", port=0)
        self.fault, self.start, self.periodic, self.calls, self.faults = fault, start, periodic, 0, 0

    def score(self, body):
        with self.lock:
            k, self.calls = self.calls, self.calls + 1
        if k >= self.start and (not self.periodic or k % 2 == 1):
            self.faults += 1
            if self.fault == "500":
                return 500, b'{"error": "injected failure", "reward": "mode_switch"}'
            if self.fault == "malformed":
                return 200, b'{"rewards": [1.0]}'
            time.sleep(0.6)
        return super().score(body)


def _cli(capsys, *args: str) -> tuple[int, str]:
    code, _, err = fault_helpers.run_cli(capsys, *args)
    return code, err


_FAULT_MSG = {"500": "HTTP 500: injected failure (gave up after 2 attempts)",
              "timeout": "no answer within the timeout of 0.3 s (gave up after 2 attempts)",
              "malformed": "malformed answer: the answer holds 1 rewards for 8 samples"}


@pytest.mark.parametrize("fault", ["500", "timeout", "malformed"])
def test_failing_remote_reward_stops_the_run_naming_reward_and_batch(fault, tmp_path, capsys):
    # calls 0-3: epochs 0 and 1 (two chunks of 8 each); from call 5 (epoch 2, chunk 1) on, every call fails
    server = FaultyServer(fault, start=5, periodic=False)
    thread = serve_in_thread(server)
    try:
        spec = f"remote:{server.url};timeout=0.3;retries=1;backoff=0"
        code, err = _cli(capsys, "train", *SMALL, "--epochs", "4", "--reward", spec, "--out", str(tmp_path / "run"))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: reward 'remote:{server.url}' on batch 1 of epoch 2: reward server "
                               f"{server.url}/score (serving 'mode_switch'): ") and _FAULT_MSG[fault] in lines[0], lines[0]
    assert server.faults == (1 if fault == "malformed" else 2)  # a malformed answer is not retried
    path, st, rejected = load_latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert st["epoch"] == 2 and not rejected and all(torch.isfinite(v).all() for v in st["model"].values())
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_failing_remote_reward_is_skipped_and_counted(tmp_path, capsys):
    # the second chunk of epoch 2 gets a 500, of epoch 3 a timeout, of epoch 4 a malformed answer (calls 5, 7, 9)
    server = FaultyServer("500", start=4, periodic=True)
    kinds = iter(["500", "timeout", "malformed"])
    real_score = server.score

    def score(body):
        if server.calls >= 4 and server.calls % 2 == 1 and server.calls < 10:
            server.fault = next(kinds)
        if server.calls >= 10:  # training is over: the before/after figure's calls are answered
            server.start = 10**9
        return real_score(body)

    server.score = score
    thread = serve_in_thread(server)
    try:
        code, err = _cli(capsys, "train", *SMALL, "--epochs", "5", "--reward",
                         f"remote:{server.url};timeout=0.3;retries=0", "--set", "reward_errors=skip",
                         "--out", str(tmp_path / "run"))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert code == 0, err
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # 10 training calls (5 epochs x 2 chunks), then the before/after figure scores its two sample sets
    assert [r["reward_skipped"] for r in recs] == [0, 0, 8, 16, 24] and server.faults == 3 and server.calls == 12
    assert all(math.isfinite(r["reward_mean"]) for r in recs)
    assert next(kinds, None) is None  # all three kinds of fault were injected


@pytest.mark.slow
def test_real_train_process_stops_cleanly_when_the_reward_server_goes_away(tmp_path):
    """``ctrldiff train`` in a real process against a loopback server that is shut down mid-run."""
    server = RewardServer("toy2d-mode-switch", port=0)
    thread = serve_in_thread(server)
    out = tmp_path / "run"
    spec = f"remote:{server.url};timeout=5;retries=2;backoff=0.1"
    p = subprocess.Popen([sys.executable, "-m", "ctrldiff", "train", *SMALL, "--epochs", "500", "--reward", spec,
                          "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.time() + 90
        while time.time() < deadline and p.poll() is None:
            if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        served = server.requests
        server.shutdown()
        server.server_close()
        thread.join(5)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if thread.is_alive():
            server.shutdown()
    lines = [x for x in err.splitlines() if x.strip()]
    assert p.returncode == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert f"error: reward 'remote:{server.url}' on batch " in lines[0] and " of epoch " in lines[0]
    assert lines[0].endswith(f"reward server {server.url}/score (serving 'mode_switch'): connection refused (is the "
                             "server running?) (gave up after 3 attempts)"), lines[0]
    epochs = len((out / "metrics.jsonl").read_text().splitlines())
    assert served >= 4 and epochs >= 2
    path, st, rejected = load_latest_checkpoint(out / "checkpoints")
    assert st["epoch"] == epochs and not rejected and all(torch.isfinite(v).all() for v in st["model"].values())
