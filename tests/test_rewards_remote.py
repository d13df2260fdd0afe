"""Remote rewards against real local servers on 127.0.0.1: round trips in every encoding, batching,
a timeout, an unreachable server, a server that returns garbage, and `serve_main` as a process."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from flowsteer.rewards import JpegCompressibility, RemoteReward, RemoteRewardError, reward, serve
from flowsteer.rewards.remote import load_reward


def images(n=4, h=16, w=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g)


@pytest.fixture
def server():
    started = []

    def start(r, **kw):
        s = serve(r, "127.0.0.1", 0, **kw)
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


def test_serve_main_in_a_process():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "flowsteer.rewards.remote", "--reward", "jpeg", "--port", "0",
                             "--host", "127.0.0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving reward 'jpeg_compressibility' (pixels) at http://127.0.0.1:"), (line, proc.poll())
        url = line.split(" at ")[1].strip()
        x = images(3)
        torch.testing.assert_close(RemoteReward(url, name="jpeg")(x), JpegCompressibility()(x), rtol=0, atol=0)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


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
