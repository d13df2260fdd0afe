"""Remote rewards against real local servers on 127.0.0.1: round trips in every encoding, batching,
a timeout, an unreachable server, a server that returns garbage, and `serve_main` as a process; then
the server as a service (limits, an HTTP answer for every error, read timeouts, the connection limit
and backlog, the bearer token) and the client's guards (redirects, a deadline per attempt, a cap on
the answer, every failure a RemoteRewardError)."""
from __future__ import annotations

import base64
import contextlib
import http.client
import json
import math
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from flowsteer.rewards import JpegCompressibility, RemoteReward, RemoteRewardError, reward, serve
from flowsteer.rewards import remote as remote_mod
from flowsteer.rewards.remote import ServerLimits, load_reward


def images(n=4, h=16, w=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g)


@pytest.fixture
def server():
    started = []

    def start(r, host="127.0.0.1", **kw):
        s = serve(r, host, 0, **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        s.shutdown()


@pytest.mark.parametrize("encoding", ["png", "uint8"])
def test_round_trip_matches_local_reward(server, encoding):
    local = JpegCompressibility()
    s = server(local)
    remote = RemoteReward(s.url, name="jpeg_remote", encoding=encoding, batch_size=3)
    x = images(5)
    # Pixels travel as uint8 both ways, which is what the JPEG reward reads anyway: exact.
    torch.testing.assert_close(remote(x), local(x), rtol=0, atol=0)
    assert remote.health() == {"name": "jpeg_compressibility", "input": "pixels", "batch_size": None, "status": "ok"}


def test_round_trip_video_prompts_meta_and_dict_outputs(server):
    seen = []

    def fn(x, prompts, meta):
        seen.append((tuple(x.shape), prompts, meta))
        return {"mean": x.flatten(1).mean(1), "idx": torch.tensor([float(m["i"]) for m in meta])}

    s = server(reward(fn, name="video_stats"))
    remote = RemoteReward(s.url + "/score", name="vr", batch_size=2)
    v = torch.rand(3, 3, 2, 8, 8)
    meta = [{"i": torch.tensor(i)} for i in range(3)]  # tensors are sent as JSON numbers
    out = remote(v, ["a", "b", "c"], meta)
    q = (v * 255).round() / 255
    torch.testing.assert_close(out["mean"], q.flatten(1).mean(1))
    assert out["idx"].tolist() == [0.0, 1.0, 2.0]
    assert [t[0] for t in seen] == [(2, 3, 2, 8, 8), (1, 3, 2, 8, 8)]  # batches of 2
    assert seen[1][1] == ["c"] and seen[1][2] == [{"i": 2}]


def test_round_trip_latents_are_exact(server):
    s = server(reward(lambda x, p, m: x.flatten(1).sum(1), name="lat_sum", input="latents"))
    z = torch.randn(3, 4, 5, 6)
    out = RemoteReward(s.url, name="lat", input="latents")(z)
    torch.testing.assert_close(out, z.flatten(1).sum(1), rtol=0, atol=0)


def test_timeout(server):
    def slow(x, p, m):
        time.sleep(1.0)
        return x.flatten(1).mean(1)

    s = server(reward(slow, name="slow"))
    remote = RemoteReward(s.url, name="vlm_judge", timeout=0.2, retries=1, backoff=0.0)
    t0 = time.perf_counter()
    with pytest.raises(RemoteRewardError, match=r"remote reward 'vlm_judge' at http://127\.0\.0\.1:\d+ timed out.*2 attempts"):
        remote(images(2))
    assert time.perf_counter() - t0 < 1.5  # gave up after two 0.2 s tries, not after the server's 1 s


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable():
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(RemoteRewardError, match=rf"remote reward 'geneval' at {url} is unreachable after 3 attempts.*serve-reward"):
        RemoteReward(url, name="geneval", retries=2, backoff=0.01)(images(2))


class _Garbage(BaseHTTPRequestHandler):
    body = b""
    status = 200

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("body,match", [
    (b"<html>oops</html>", r"returned a response that is not JSON: b'<html>oops</html>'"),
    (b'{"scores": [1, 2]}', "returned JSON without a 'rewards' field"),
    (b'{"rewards": [1.0]}', "returned 1 values in rewards for 2 samples"),
    (b'{"rewards": [NaN, 1.0]}', r"returned nan at rewards\[0\]; expected finite numbers"),
    (b'{"rewards": [1.0, "x"]}', r"returned 'x' at rewards\[1\]"),
    (b'{"rewards": {"a": [1.0]}}', r"returned 1 values in rewards\['a'\] for 2 samples"),
    (b'{"rewards": 3}', "returned rewards as int"),
], ids=["html", "no-rewards", "short", "nan", "string", "dict-short", "scalar"])
def test_garbage_responses(body, match):
    handler = type("H", (_Garbage,), {"body": body})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        with pytest.raises(RemoteRewardError, match=rf"remote reward 'judge' at {url} " + match):
            RemoteReward(url, name="judge", retries=0)(images(2))
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_overloaded_server_is_retried_then_reported():
    handler = type("H", (_Garbage,), {"body": b'{"error": "busy"}', "status": 503})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        with pytest.raises(RemoteRewardError, match=r"remote reward 'j' at .* is unavailable: still HTTP 503: busy after 2 attempts"):
            RemoteReward(url, name="j", retries=1, backoff=0.0)(images(2))
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_server_side_errors_reach_the_client(server):
    def broken(x, p, m):
        raise ValueError("model not loaded")

    s = server(reward(broken, name="broken"))
    with pytest.raises(RemoteRewardError, match=r"answered HTTP 500: reward 'broken' raised ValueError: model not loaded"):
        RemoteReward(s.url, name="b", retries=3)(images(2))
    nan = server(reward(lambda x, p, m: torch.full((x.shape[0],), float("nan")), name="nan_model"))
    with pytest.raises(RemoteRewardError, match="reward 'nan_model' returned nan for sample 0"):
        RemoteReward(nan.url, name="n")(images(2))
    lat = server(reward(lambda x, p, m: x.flatten(1).sum(1), name="lat", input="latents"))
    with pytest.raises(RemoteRewardError, match="HTTP 400: bad request: reward 'lat' takes latents"):
        RemoteReward(lat.url, name="l")(images(2))
    req = urllib.request.Request(s.url, data=b"not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=5)
    info.value.close()
    assert info.value.code == 400


def test_client_argument_errors():
    with pytest.raises(ValueError, match="url must be an http"):
        RemoteReward("127.0.0.1:80")
    with pytest.raises(ValueError, match="encoding must be one of"):
        RemoteReward("http://127.0.0.1:1", encoding="jpeg")
    with pytest.raises(TypeError, match="meta must be JSON-serialisable"):
        RemoteReward("http://127.0.0.1:1", name="m")(images(1), None, [object()])


def test_load_reward_specs(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "import torch\n"
        "def darkness(x, prompts, meta):\n"
        "    return 1 - x.flatten(1).mean(1)\n"
        "def make_scaled(scale=1.0):\n"
        "    return lambda x, prompts, meta: scale * x.flatten(1).mean(1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    x = images(2)
    r = load_reward("my_rewards:darkness")
    assert r.name == "darkness"
    torch.testing.assert_close(r(x), 1 - x.flatten(1).mean(1))
    torch.testing.assert_close(load_reward("my_rewards:make_scaled", {"scale": 2.0})(x), 2 * x.flatten(1).mean(1))
    j = load_reward("flowsteer.rewards.jpeg:JpegIncompressibility", {"quality": 90}, name="jinc", batch_size=1)
    assert (j.name, j.quality, j.batch_size) == ("jinc", 90, 1)
    assert load_reward("jpeg").name == "jpeg_compressibility"
    with pytest.raises(ValueError, match="must be a built-in"):
        load_reward("nonsense")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        load_reward("my_rewards:nope")
    with pytest.raises(ValueError, match="is a reward function; it takes no --reward-kwargs"):
        load_reward("my_rewards:darkness", {"scale": 2})


def test_serve_main_in_a_process(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    (tmp_path / "token").write_text("tok-123\n")
    proc = subprocess.Popen([sys.executable, "-m", "flowsteer.rewards.remote", "--reward", "jpeg", "--port", "0",
                             "--host", "127.0.0.1", "--token-file", str(tmp_path / "token"), "--max-samples", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving reward 'jpeg_compressibility' (pixels; bearer token required) at "
                               "http://127.0.0.1:"), (line, proc.poll())
        url = line.split(" at ")[1].strip()
        x = images(3)
        torch.testing.assert_close(RemoteReward(url, name="jpeg", token="tok-123")(x), JpegCompressibility()(x),
                                   rtol=0, atol=0)
        with pytest.raises(RemoteRewardError, match="HTTP 401"):
            RemoteReward(url, name="jpeg")(x)
        with pytest.raises(RemoteRewardError, match="HTTP 413: too large: images.data holds 5 samples"):
            RemoteReward(url, name="jpeg", token="tok-123", batch_size=5)(images(5))
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def test_serve_main_bad_spec_exits_2(capsys):
    from flowsteer.rewards import serve_main

    assert serve_main(["--reward", "nonsense", "--port", "0"]) == 2
    assert "must be a built-in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        serve_main(["--reward", "jpeg", "--reward-kwargs", "[1]"])


def test_health_body_is_json(server):
    s = server(JpegCompressibility())
    with urllib.request.urlopen(s.url + "/health", timeout=5) as resp:
        assert json.loads(resp.read())["name"] == "jpeg_compressibility"


# ------------------------------------------------------------------------ the server as a service
# Each test below reproduces a failure of the first server and client (see docs/rewards.md,
# "Limits"): against a real server on 127.0.0.1, every error must be an HTTP answer with a message.

def _host_port(url):
    parts = urllib.parse.urlsplit(url)
    return parts.hostname, parts.port


def _read_all(sock):
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return buf
        buf += chunk


def raw_http(url, data: bytes, timeout=5.0):
    """Sends `data` as is; (status, JSON body) of the answer, or (None, b"") when the server closed
    the connection without one."""
    with socket.create_connection(_host_port(url), timeout=timeout) as sock:
        sock.sendall(data)
        buf = _read_all(sock)
    if not buf:
        return None, b""
    head, _, body = buf.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def post(url, body: bytes, headers=None, path="/"):
    conn = http.client.HTTPConnection(*_host_port(url), timeout=10)
    try:
        conn.request("POST", path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(w, h, rows=None):
    """An RGB PNG of w x h black pixels holding `rows` rows of data (all when None; fewer makes a
    truncated file whose header still says w x h)."""
    rows = h if rows is None else rows
    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * w)
    idat = b"".join(comp.compress(row) for _ in range(rows)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_request(*pngs, **extra) -> bytes:
    return json.dumps({"images": {"encoding": "png", "data": [b64(p) for p in pngs]}, **extra}).encode()


def mean_reward():
    return reward(lambda x, p, m: x.flatten(1).mean(1), name="mean")


@pytest.fixture(scope="module")
def shared_server():
    s = serve(mean_reward(), "127.0.0.1", 0, limits=ServerLimits(max_pixels=64 * 64, max_total_pixels=4 * 64 * 64,
                                                                  max_samples=8))
    yield s
    s.shutdown()


def _u8(shape, data=None):
    data = b64(bytes(math.prod(shape))) if data is None else data
    return {"images": {"encoding": "uint8", "shape": shape, "data": data}}


TINY = b64(png_bytes(2, 2))
BAD_REQUESTS = [
    ("images-null", b'{"images": null}', 400, "images must be a JSON object"),
    ("list-body", b"[1, 2]", 400, "the request body must be a JSON object"),
    ("images-list", b'{"images": [1, 2]}', 400, "images must be a JSON object"),
    ("data-not-str", b'{"images": {"encoding": "png", "data": [1]}}', 400, r"images.data\[0\] must be a base64 PNG"),
    ("bad-base64", b'{"images": {"encoding": "png", "data": ["!!"]}}', 400, "bad request"),
    ("not-png", json.dumps({"images": {"encoding": "png", "data": [b64(b"hello")]}}).encode(), 400, "is not a PNG"),
    ("truncated-png", png_request(png_bytes(32, 32)[:-30]), 400, "could not be decoded"),
    ("mixed-sizes", png_request(png_bytes(2, 2), png_bytes(4, 2)), 400, "all images of a request must have one size"),
    ("nested", b"[" * 100000 + b"]" * 100000, 400, "nested too deeply"),
    ("nested-in-meta", b'{"meta": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400, "nested too deeply"),
    ("not-utf8", b"\xff\xfe\x00garbage", 400, "not JSON"),
    ("no-images", b'{"latents": {}}', 400, "needs a 'images' field"),
    ("encoding", b'{"images": {"encoding": "jpeg", "data": []}}', 400, "images.encoding must be one of"),
    ("shape-type", json.dumps(_u8("x", "")).encode(), 400, "images.shape must be a list"),
    ("shape-size", json.dumps(_u8([1, 2, 2, 3], "AAAA")).encode(), 400, "base64 characters"),
    ("n-mismatch", json.dumps({**_u8([2, 2, 2, 3]), "n": 3}).encode(), 400, "n = 3 but images holds 2 samples"),
    ("n-type", json.dumps({**_u8([2, 2, 2, 3]), "n": "2"}).encode(), 400, "n = '2'"),
    ("prompt-count", json.dumps({**_u8([2, 2, 2, 3]), "prompts": ["a"]}).encode(), 400,
     "prompts has 1 entries for 2 samples"),
    ("prompt-type", json.dumps({**_u8([2, 2, 2, 3]), "prompts": [1, 2]}).encode(), 400, r"prompts\[0\] must be a str"),
    ("meta-count", json.dumps({**_u8([2, 2, 2, 3]), "meta": [{}]}).encode(), 400, "meta has 1 entries for 2 samples"),
    ("meta-type", json.dumps({**_u8([2, 2, 2, 3]), "meta": 5}).encode(), 400, "meta must be None, a list"),
    ("too-many-samples", json.dumps(_u8([9, 1, 1, 3])).encode(), 413, "9 samples; this server takes at most 8"),
    ("too-many-pngs", png_request(*[png_bytes(1, 1)] * 9), 413, "9 samples; this server takes at most 8"),
    ("huge-shape", json.dumps(_u8([10 ** 30, 1, 1, 3], "")).encode(), 413, "this server takes at most 8"),
    ("big-frame", json.dumps(_u8([1, 65, 64, 3])).encode(), 413, "4,160 pixels; .* at most 4,096 .*--max-pixels"),
    ("total-pixels", json.dumps(_u8([5, 64, 64, 3])).encode(), 413, "--max-total-pixels"),
    ("big-png", png_request(png_bytes(9000, 9000, rows=1), png_bytes(9000, 9000, rows=1)), 413,
     "9000x9000 = 81,000,000 pixels"),
]


@pytest.mark.parametrize("body,status,match", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_every_bad_request_gets_an_answer(shared_server, body, status, match):
    got, answer = post(shared_server.url, body)
    assert got == status and re.search(match, answer["error"]), (got, answer)
    assert post(shared_server.url, png_request(png_bytes(2, 2)))[0] == 200  # and the server still serves


def test_decompression_bomb_is_refused_before_decoding(server):
    # A real image: 5000 x 5000 black pixels, 75 MB decoded, about 75 KB compressed.
    bomb = png_request(png_bytes(5000, 5000))
    assert len(bomb) < 200_000
    s = server(mean_reward())
    t0 = time.perf_counter()
    status, answer = post(s.url, bomb)
    assert status == 413 and "25,000,000 pixels" in answer["error"] and "--max-pixels" in answer["error"]
    # Past Pillow's own bomb limit (2 * 89 M pixels) with ours raised, Pillow's error is an answer too.
    roomy = server(mean_reward(), limits=ServerLimits(max_pixels=10 ** 12, max_total_pixels=10 ** 12))
    status, answer = post(roomy.url, png_request(png_bytes(20000, 20000, rows=1)))
    assert status == 413 and "decompression bomb" in answer["error"].lower()
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("length,status,match", [
    ("200000000", 413, "the body is 200,000,000 bytes; this server takes at most 134,217,728 .*--max-body-mb"),
    ("20000000000", 413, "the body is 20,000,000,000 bytes"),
    (str(10 ** 12), 413, "the body is 1,000,000,000,000 bytes"),
    ("-5", 400, "Content-Length must be a non-negative integer"),
    ("12abc", 400, "Content-Length must be a non-negative integer"),
    (None, 411, "needs a Content-Length"),
], ids=["200MB", "20GB", "1TB", "negative", "junk", "missing"])
def test_body_size_is_checked_before_reading(server, length, status, match):
    s = server(mean_reward())
    head = "POST /score HTTP/1.1\r\nHost: x\r\n" + (f"Content-Length: {length}\r\n" if length else "") + "\r\n"
    t0 = time.perf_counter()
    got, answer = raw_http(s.url, head.encode() + b'{"images": ')  # a start of the body; the rest never comes
    assert got == status and re.search(match, answer["error"]), (got, answer)
    assert time.perf_counter() - t0 < 2.5  # answered at once (then the connection is drained for at most 2 s)
    assert RemoteReward(s.url).health()["status"] == "ok"


def test_chunked_body_is_refused(server):
    s = server(mean_reward())
    got, answer = raw_http(s.url, b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert got == 411 and "Content-Length" in answer["error"]


def test_client_sees_the_body_limit(server):
    s = server(mean_reward(), limits=ServerLimits(max_body_bytes=2 ** 20))
    remote = RemoteReward(s.url, name="big", encoding="uint8", batch_size=None, retries=2)
    with pytest.raises(RemoteRewardError, match=r"remote reward 'big' at .* answered HTTP 413: the body is 3,14\d,\d\d\d "
                                                 r"bytes; this server takes at most 1,048,576 \(--max-body-mb\)"):
        remote(torch.rand(12, 3, 256, 256))


def test_internal_errors_are_answers(server, monkeypatch):
    s = server(mean_reward())
    for exc in (RuntimeError("boom"), MemoryError()):
        def broken(field, limits=None, exc=exc):
            raise exc

        monkeypatch.setattr(remote_mod, "decode_pixels", broken)
        status, answer = post(s.url, png_request(png_bytes(2, 2)))
        assert status == 500 and answer["error"].startswith(f"internal error: {type(exc).__name__}")
    status, answer = raw_http(s.url, b"DELETE / HTTP/1.0\r\n\r\n")
    assert status == 501 and "Unsupported method" in answer["error"]
    status, answer = raw_http(s.url, b"GET / HTTP/1.0\r\nX: " + b"a" * 70000 + b"\r\n\r\n")
    assert status == 431 and "Line too long" in answer["error"]
    assert post(s.url, b"{}", path="/nope")[0] == 404


def test_read_timeout_frees_slow_and_idle_connections(server):
    s = server(mean_reward(), limits=ServerLimits(read_timeout=0.5))
    host_port = _host_port(s.url)
    partial = socket.create_connection(host_port, timeout=5)
    partial.sendall(b"POST / HTTP/1.0\r\nContent-Length: 100\r\n\r\n0123456789")
    dripping = socket.create_connection(host_port, timeout=5)
    dripping.sendall(b"POST / HTTP/1.0\r\n")
    idle = [socket.create_connection(host_port, timeout=5) for _ in range(100)]  # more than max_connections
    t0 = time.perf_counter()
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # a header byte every 0.1 s: each read is quick, the whole is not
            try:
                dripping.sendall(b"X")
            except OSError:
                break
            time.sleep(0.1)
        assert _read_all(partial).startswith(b"HTTP/1.0 408")
        status_line = _read_all(dripping)
        assert status_line.startswith(b"HTTP/1.0 408") and b"headers did not arrive within 0.5 s" in status_line
        # Closed (no request line ever came), or refused at once past max_connections = 64.
        outcomes = [_read_all(sock)[:12] for sock in idle]
        assert set(outcomes) <= {b"", b"HTTP/1.0 503"} and outcomes.count(b"") >= 60, set(outcomes)
        assert time.perf_counter() - t0 < 3
        deadline = time.monotonic() + 2
        while s.httpd.open and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not s.httpd.open  # every handler thread has ended
    finally:
        for sock in idle + [partial, dripping]:
            sock.close()
    assert RemoteReward(s.url).health()["status"] == "ok"


def test_connection_limit_answers_503(server):
    s = server(mean_reward(), limits=ServerLimits(max_connections=2, read_timeout=5))
    held = [socket.create_connection(_host_port(s.url), timeout=5) for _ in range(2)]
    try:
        deadline = time.monotonic() + 2
        while len(s.httpd.open) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        status, answer = raw_http(s.url, b"GET /health HTTP/1.0\r\n\r\n")
        assert status == 503 and "--max-connections" in answer["error"]
    finally:
        for sock in held:
            sock.close()


def test_twenty_concurrent_clients(server):
    s = server(mean_reward())
    assert s.httpd.request_queue_size == ServerLimits().backlog == 128
    x = images(2, 4, 4)
    expected = ((x * 255).round() / 255).flatten(1).mean(1)
    errors, done = [], []

    def client():
        remote = RemoteReward(s.url, retries=0, timeout=30)
        for _ in range(15):
            try:
                torch.testing.assert_close(remote(x), expected)
                done.append(1)
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                errors.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(done) == 300, errors[:3]


# -------------------------------------------------------------------------------- authentication


def test_bearer_token(server, monkeypatch):
    seen = []
    real = remote_mod.hmac.compare_digest
    monkeypatch.setattr(remote_mod.hmac, "compare_digest", lambda a, b: seen.append(1) or real(a, b))
    s = server(mean_reward(), token="s3cret")
    x = images(2)
    with pytest.raises(RemoteRewardError, match=r"HTTP 401 \(check the token or API key\): this server needs a bearer token"):
        RemoteReward(s.url, name="t")(x)
    with pytest.raises(RemoteRewardError, match="HTTP 401.*wrong bearer token"):
        RemoteReward(s.url, name="t", token="guess")(x)
    with pytest.raises(RemoteRewardError, match="HTTP 401"):
        RemoteReward(s.url, name="t").health()
    assert RemoteReward(s.url, token="s3cret")(x).shape == (2,)
    monkeypatch.setenv("MY_REWARD_TOKEN", "s3cret\n")
    assert RemoteReward(s.url, token_env="MY_REWARD_TOKEN").health()["status"] == "ok"
    assert len(seen) == 3  # compared in constant time, every time a token came
    status, answer = post(s.url, png_request(png_bytes(2, 2)), {"Authorization": "Basic czNjcmV0"})
    assert status == 401
    with pytest.raises(ValueError, match="give token or token_env, not both"):
        RemoteReward(s.url, token="a", token_env="MY_REWARD_TOKEN")
    monkeypatch.delenv("MY_REWARD_TOKEN")
    with pytest.raises(ValueError, match="token_env='MY_REWARD_TOKEN': the environment variable is not set"):
        RemoteReward(s.url, token_env="MY_REWARD_TOKEN")


def test_warns_when_exposed_without_a_token(server):
    with pytest.warns(UserWarning, match=r"answers anyone who can reach 0\.0\.0\.0: it has no token"):
        s = server(mean_reward(), host="0.0.0.0")
    assert s.warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert server(mean_reward(), host="0.0.0.0", token="x").warning is None
        assert server(mean_reward()).warning is None


# ------------------------------------------------------------------------------------ the client


@contextlib.contextmanager
def raw_server(respond):
    """A TCP server on 127.0.0.1 that runs respond(conn, stop) for each connection; shut down on exit."""
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.settimeout(0.05)
    stop, workers = threading.Event(), []

    def run(conn):
        with conn:
            try:
                respond(conn, stop)
            except OSError:
                pass

    def loop():
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(5)
            workers.append(threading.Thread(target=run, args=(conn,), daemon=True))
            workers[-1].start()

    acceptor = threading.Thread(target=loop, daemon=True)
    acceptor.start()
    try:
        yield f"http://127.0.0.1:{lsock.getsockname()[1]}"
    finally:
        stop.set()
        acceptor.join()
        lsock.close()
        for t in workers:
            t.join(5)


def read_request(conn):
    """(head, body) of one request on conn."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return buf, b""
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    m = re.search(rb"content-length: *(\d+)", head, re.I)
    while m and len(body) < int(m.group(1)):
        body += conn.recv(65536)
    return head, body


def test_redirect_to_another_origin_is_not_followed():
    seen = []

    def other(conn, stop):
        seen.append(read_request(conn)[0])
        conn.sendall(b'HTTP/1.0 200 OK\r\nContent-Length: 23\r\n\r\n{"rewards": [9.0, 9.0]}')

    with raw_server(other) as evil:
        for code in (302, 307):
            def redirect(conn, stop, code=code):
                read_request(conn)
                conn.sendall(f"HTTP/1.0 {code} Found\r\nLocation: {evil}/score\r\nContent-Length: 0\r\n\r\n".encode())

            with raw_server(redirect) as url:
                remote = RemoteReward(url, name="judge", token="secret", retries=0)
                with pytest.raises(RemoteRewardError, match=rf"answered HTTP {code} with a redirect to {evil}/score, "
                                                            "another origin; it is not followed"):
                    remote(images(2))
    assert seen == []  # the token never left for the other server


def test_same_origin_307_is_followed(server):
    s = server(mean_reward(), token="secret")

    def moved(conn, stop):
        read_request(conn)
        conn.sendall(b"HTTP/1.0 307 Moved\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n")

    with raw_server(moved) as url:
        with pytest.raises(RemoteRewardError, match="redirected more than 3 times"):
            RemoteReward(url, retries=0)(images(2))
    # A 302 on the same origin is not followed either (it would turn the POST into a GET).
    seen = []

    def found(conn, stop):
        seen.append(read_request(conn)[0])
        conn.sendall(b"HTTP/1.0 302 Found\r\nLocation: /score\r\nContent-Length: 0\r\n\r\n")

    with raw_server(found) as url:
        with pytest.raises(RemoteRewardError, match=r"HTTP 302 .*only 307 and 308 keep the request body"):
            RemoteReward(url, retries=0)(images(2))
    assert len(seen) == 1
    assert RemoteReward(s.url + "/score/", token="secret")(images(2)).shape == (2,)


@pytest.mark.parametrize("where", ["body", "headers"])
def test_deadline_covers_a_dripping_server(where):
    answer = b'{"rewards": [1.0, 2.0]}' + b" " * 100
    head = f"HTTP/1.0 200 OK\r\nContent-Length: {len(answer)}\r\n\r\n".encode()

    def drip(conn, stop):
        read_request(conn)
        data = head + answer
        if where == "body":
            conn.sendall(head)
            data = answer
        for i in range(len(data)):  # a byte every 0.15 s: no single read waits long
            if stop.wait(0.15):
                return
            conn.sendall(data[i:i + 1])

    with raw_server(drip) as url:
        t0 = time.perf_counter()
        with pytest.raises(RemoteRewardError, match=r"timed out: no complete answer within timeout=0\.6 s on any of 1"):
            RemoteReward(url, name="drip", timeout=0.6, retries=0)(images(2))
        assert time.perf_counter() - t0 < 1.2


def _answering(raw: bytes):
    def respond(conn, stop):
        read_request(conn)
        conn.sendall(raw)

    return respond


@pytest.mark.parametrize("raw,match", [
    (b"HTTP/1.0 200 OK\r\nContent-Length: 1000000000000\r\n\r\n{}",
     r"sent too large an answer: its Content-Length is 1,000,000,000,000 bytes, over max_response_bytes=200,000"),
    (b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 300000, "sent too large an answer: the answer is over max_response_bytes=200,000"),
    (b'HTTP/1.0 200 OK\r\n\r\n{"rewards": [1' + b"0" * 400 + b", 1.0]}",
     r"returned an integer of about 401 digits at rewards\[0\]; expected finite numbers"),
    (b"HTTP/1.0 200 OK\r\n\r\n" + b"[" * 100000 + b"]" * 100000, "returned JSON nested too deeply to read"),
    (b"garbage\r\n\r\n", r"sent a malformed HTTP answer \(BadStatusLine"),
    (b"HTTP/1.0 200 OK\r\n" + b"X: y\r\n" * 101 + b"\r\n{}", r"sent a malformed HTTP answer \(HTTPException: got more than 100 headers"),
    (b"", r"closed the connection without a complete answer on 2 attempts \(RemoteDisconnected"),
], ids=["content-length", "no-length", "huge-int", "deep", "status-line", "headers", "closed"])
def test_every_client_failure_is_a_remote_reward_error(raw, match):
    with raw_server(_answering(raw)) as url:
        remote = RemoteReward(url, name="r", retries=1, backoff=0.0, max_response_bytes=200_000)
        with pytest.raises(RemoteRewardError, match=rf"remote reward 'r' at {url} {match}"):
            remote(images(2))


def test_serve_reward_help_lists_the_limits(capsys):
    from flowsteer.cli import main

    with pytest.raises(SystemExit) as info:
        main(["serve-reward", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for option, default in [("--max-body-mb", "default 128"), ("--max-samples", "default 256"),
                            ("--max-pixels", "default 16777216"), ("--max-total-pixels", "default 268435456"),
                            ("--read-timeout", "default 60"), ("--max-connections", "default 64"),
                            ("--backlog", "default 128"), ("--token-file", "Bearer"), ("--token-env", "Bearer")]:
        assert option in out and default in out, option


def test_serve_main_token_errors(capsys, tmp_path, monkeypatch):
    from flowsteer.rewards import serve_main

    monkeypatch.delenv("NO_SUCH_TOKEN_VAR", raising=False)
    assert serve_main(["--reward", "jpeg", "--port", "0", "--token-env", "NO_SUCH_TOKEN_VAR"]) == 2
    assert "--token-env 'NO_SUCH_TOKEN_VAR': the environment variable is not set" in capsys.readouterr().err
    (tmp_path / "empty").write_text("\n")
    assert serve_main(["--reward", "jpeg", "--port", "0", "--token-file", str(tmp_path / "empty")]) == 2
    assert "is empty" in capsys.readouterr().err
    assert serve_main(["--reward", "jpeg", "--port", "0", "--token-file", str(tmp_path / "missing")]) == 2
    assert "cannot read it" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        serve_main(["--reward", "jpeg", "--max-samples", "0"])
    monkeypatch.setenv("A_REWARD_TOKEN", " t0k\n")
    assert remote_mod._read_token(None, "A_REWARD_TOKEN") == "t0k"
    assert serve_main(["--reward", "jpeg", "--token-env", "A_REWARD_TOKEN", "--token-file", "x"]) == 2
    assert "not both" in capsys.readouterr().err
