"""VLM judges over the OpenAI-compatible chat API, against a fake server on 127.0.0.1 that answers
with fixed, scripted and malformed replies: the request (data URLs, template, key), every parse
rule, parse failures (raised, or counted and logged), retries, the bounded pool, video frames, the
pairwise judge with WinRateReward and both orders, and the transport limits of remote.py."""
from __future__ import annotations

import base64
import io
import json
import logging
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from flowsteer.rewards import ChatJudge, ChatPairwiseJudge, RemoteRewardError, ReplyParser, RewardError, WinRateReward


class FakeOpenAI:
    """POST /v1/chat/completions; answer(request_json, headers) gives the reply: a str (the content
    of a normal completion) or (status, body bytes or JSON object[, headers])."""

    def __init__(self, answer, delay: float = 0.0):
        self.answer, self.delay = answer, delay
        self.requests, self.lock = [], threading.Lock()
        self.inflight = self.max_inflight = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append((self.path, dict(self.headers), body))
                    fake.inflight += 1
                    fake.max_inflight = max(fake.max_inflight, fake.inflight)
                try:
                    time.sleep(fake.delay)
                    out = fake.answer(body, self.headers)
                finally:
                    with fake.lock:
                        fake.inflight -= 1
                status, payload, headers = (200, completion(out), {}) if isinstance(out, str) else (tuple(out) + ({},))[:3]
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (a deadline test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.thread.join()
        self.httpd.server_close()


def completion(content):
    return {"id": "x", "object": "chat.completion", "model": "judge",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}]}


@pytest.fixture
def fake():
    servers = []

    def start(answer, **kw):
        servers.append(FakeOpenAI(answer, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def user_parts(body):
    return body["messages"][-1]["content"]


def decoded_images(body):
    """The request's images as uint8 [H, W, 3] arrays."""
    from PIL import Image

    out = []
    for part in user_parts(body):
        if part["type"] == "image_url":
            head, _, data = part["image_url"]["url"].partition(",")
            assert head == "data:image/png;base64"
            out.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")))
    return out


def text_of(body):
    return " ".join(p["text"] for p in user_parts(body) if p["type"] == "text")


def flat(values, h=6, w=5):
    """Images [N, 3, h, w] of constant brightness values[i] (exact in uint8: multiples of 1/255)."""
    v = torch.tensor([round(x * 255) / 255 for x in values])
    return v[:, None, None, None].expand(len(values), 3, h, w).contiguous()


# ----------------------------------------------------------------------------------- ChatJudge


def test_request_and_score(fake):
    server = fake(lambda body, headers: " 7 " if "cat" in text_of(body) else "3")
    judge = ChatJudge(server.url, "unified-reward", 'Rate "{prompt}" from 1 to 10. Reply as {"score": n}.',
                      api_key="sk-test", system="You are a strict judge.", max_tokens=16, extra_body={"top_p": 1.0})
    x = torch.rand(2, 3, 6, 5)
    out = judge(x, ["a cat", "a dog"])
    assert out.tolist() == [7.0, 3.0] and out.dtype == torch.float32
    (path, headers, body), _ = sorted(server.requests, key=lambda r: text_of(r[2]))
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
    assert (body["model"], body["temperature"], body["max_tokens"], body["top_p"]) == ("unified-reward", 0.0, 16, 1.0)
    assert body["messages"][0] == {"role": "system", "content": "You are a strict judge."}
    assert [p["type"] for p in user_parts(body)] == ["image_url", "text"]
    assert text_of(body) == 'Rate "a cat" from 1 to 10. Reply as {"score": n}.'  # other braces are left alone
    expected = (x[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(decoded_images(body)[0], expected)
    assert judge.last_replies and judge.requests == 2 and judge.parse_failures == 0
    assert judge.last_log["judge/chat_judge/parse_failures"] == 0


@pytest.mark.parametrize("kwargs,reply,value", [
    ({"parse": "number"}, " 7.5\n", 7.5),
    ({"parse": "number"}, "-1e-1", -0.1),
    ({"parse": "last_number"}, "<think>3 objects, 2 colours</think> Final score: 8", 8.0),
    ({"parse": "json"}, '{"score": 4, "why": "ok"}', 4.0),
    ({"parse": "json"}, 'Sure.\n```json\n{"score": "6.5"}\n```', 6.5),
    ({"parse": "json", "field": "rating"}, 'My answer: {"rating": 2} (done)', 2.0),
    ({"parse": "regex", "pattern": r"Final Score:\s*([\d.]+)"}, "blah\nFinal Score: 3.5\n", 3.5),
    ({"parse": "regex", "pattern": r"<answer>(.*?)</answer>", "choices": {"yes": 1, "no": 0}},
     "<think>...</think><answer> Yes </answer>", 1.0),
    ({"parse": "choice", "choices": {"yes": 1, "no": 0}}, ' "No." ', 0.0),
    ({"parse": "json", "field": "v", "choices": {"good": 1, "bad": -1}}, '{"v": "BAD"}', -1.0),
    ({"parse": lambda r: len(r)}, "abcd", 4.0),
])
def test_parse_rules(kwargs, reply, value):
    assert ReplyParser(**kwargs)(reply) == (value, None)


@pytest.mark.parametrize("kwargs,reply,why", [
    ({"parse": "number"}, "Score: 7", "the reply is not just a number"),
    ({"parse": "number"}, "", "the reply is not just a number"),
    ({"parse": "last_number"}, "no digits here", "no number in the reply"),
    ({"parse": "json"}, "{not json}", "no JSON object in the reply"),
    ({"parse": "json"}, '{"other": 1}', "the JSON object has no 'score'"),
    ({"parse": "json"}, '{"score": "high"}', "'high' is not a number"),
    ({"parse": "json"}, '{"score": true}', "True is not a number"),
    ({"parse": "json"}, '{"score": 1e999}', "inf is not a finite number"),
    ({"parse": "regex", "pattern": r"Score: (\d+)"}, "Score: none", "the pattern does not match"),
    ({"parse": "choice", "choices": {"yes": 1, "no": 0}}, "maybe", "'maybe' is none of the choices"),
    ({"parse": "number", "score_range": (1, 10)}, "11", r"11 is outside score_range=\(1, 10\)"),
    ({"parse": lambda r: None}, "x", "the parse function returned None"),
    ({"parse": lambda r: float(r)}, "x", "ValueError: could not convert"),
    ({"parse": "last_number"}, "1" + "0" * 400, "inf is not a finite number"),
])
def test_parse_failures_say_why(kwargs, reply, why):
    value, reason = ReplyParser(**kwargs)(reply)
    assert value is None and __import__("re").search(why, reason), reason


def test_parser_argument_errors():
    with pytest.raises(ValueError, match="parse must be one of"):
        ReplyParser("float")
    with pytest.raises(ValueError, match="parse='regex' needs pattern="):
        ReplyParser("regex")
    with pytest.raises(ValueError, match="is not a regular expression"):
        ReplyParser("regex", pattern="(")
    with pytest.raises(ValueError, match="parse='choice' needs choices="):
        ReplyParser("choice")
    with pytest.raises(ValueError, match="pattern= is only read with parse='regex'"):
        ReplyParser("number", pattern="x")
    with pytest.raises(ValueError, match="choices must map non-empty strings to finite numbers"):
        ReplyParser("choice", choices={"yes": float("nan")})


def test_parse_failure_raises_by_default(fake, caplog):
    server = fake(lambda body, headers: "I cannot judge this image.")
    judge = ChatJudge(server.url, "m", "Score it.", name="vlm")
    with caplog.at_level(logging.WARNING, logger="flowsteer.rewards.chat"):
        with pytest.raises(RewardError, match=r"reward 'vlm': could not read a score from 2 of 2 replies \(parse='number'\); "
                                              r"sample 0 of the batch: the reply is not just a number; it replied "
                                              r"'I cannot judge this image.'.*on_parse_error="):
            judge(torch.rand(2, 3, 4, 4))
    assert judge.parse_failures == 2 and judge.last_log["judge/vlm/parse_failure_frac"] == 1.0
    assert sum("could not read a score" in r.message for r in caplog.records) == 2


def test_parse_failure_value_is_counted_and_logged(fake, caplog):
    server = fake(lambda body, headers: "9" if "good" in text_of(body) else "Sorry, I can't.")
    judge = ChatJudge(server.url, "m", "{prompt}", on_parse_error=-1.0, name="vlm")
    with caplog.at_level(logging.WARNING, logger="flowsteer.rewards.chat"):
        out = judge(torch.rand(3, 3, 4, 4), ["good", "bad", "good"])
    assert out.tolist() == [9.0, -1.0, 9.0]
    assert judge.parse_failures == 1 and judge.last_log["judge/vlm/parse_failures"] == 1
    assert any("sample 1" in r.message and "Sorry, I can't." in r.message for r in caplog.records)
    for bad in (float("nan"), "zero", None):
        with pytest.raises(ValueError, match="on_parse_error must be 'raise' or a finite number"):
            ChatJudge(server.url, "m", "x", on_parse_error=bad)


@pytest.mark.parametrize("reply,match", [
    ((200, b"<html>gateway</html>"), r"returned a response that is not JSON: b'<html>gateway</html>'"),
    ((200, {"choices": []}), r"returned JSON without choices\[0\]\.message"),
    ((200, {"object": "error"}), r"returned JSON without choices\[0\]\.message"),
    ((200, completion(5)), "returned message content of type int"),
    ((400, {"error": {"message": "model 'm' does not exist", "type": "NotFoundError"}}),
     "answered HTTP 400: model 'm' does not exist"),
    ((401, {"error": {"message": "invalid api key"}}), r"answered HTTP 401 \(check the token or API key\): invalid api key"),
    ((200, b"[" * 100000), "nested too deeply|not JSON"),
], ids=["html", "no-choices", "error-object", "int-content", "400", "401", "deep"])
def test_malformed_and_error_replies(fake, reply, match):
    server = fake(lambda body, headers: reply)
    judge = ChatJudge(server.url, "m", "x", name="vlm", retries=1, backoff=0.0)
    with pytest.raises(RemoteRewardError, match=rf"chat judge 'vlm' at {server.url}/chat/completions .*({match})"):
        judge(torch.rand(1, 3, 4, 4))


def test_empty_content_is_a_parse_failure(fake):
    server = fake(lambda body, headers: (200, completion(None)))
    judge = ChatJudge(server.url, "m", "x", on_parse_error=0.0)
    assert judge(torch.rand(2, 3, 4, 4)).tolist() == [0.0, 0.0] and judge.parse_failures == 2


def test_retries_on_429_and_5xx(fake):
    calls = []

    def flaky(body, headers):
        calls.append(1)
        if len(calls) == 1:
            return 429, {"error": {"message": "rate limited"}}, {"Retry-After": "0"}
        if len(calls) == 2:
            return 500, {"error": {"message": "engine restarting"}}
        return "5"

    judge = ChatJudge(fake(flaky).url, "m", "x", retries=2, backoff=0.01)
    assert judge(torch.rand(1, 3, 4, 4)).tolist() == [5.0]
    assert judge.retries_used == 2 and judge.last_log["judge/chat_judge/retries"] == 2
    down = fake(lambda body, headers: (503, {"error": {"message": "overloaded"}}))
    with pytest.raises(RemoteRewardError, match=r"is unavailable: still HTTP 503: overloaded after 3 attempts"):
        ChatJudge(down.url, "m", "x", retries=2, backoff=0.0)(torch.rand(1, 3, 4, 4))


def test_concurrency_is_bounded(fake):
    server = fake(lambda body, headers: "1", delay=0.1)
    judge = ChatJudge(server.url, "m", "x", concurrency=3)
    t0 = time.perf_counter()
    assert judge(torch.rand(9, 3, 4, 4)).tolist() == [1.0] * 9
    assert server.max_inflight == 3 and len(server.requests) == 9
    assert time.perf_counter() - t0 < 0.9 * 0.9  # 3 rounds of 0.1 s, not 9


def test_videos_go_as_evenly_spaced_frames(fake):
    server = fake(lambda body, headers: "1")
    f = 10
    video = torch.stack([flat([k / 255 * 20] * 2, 4, 4) for k in range(f)], dim=2)  # [2, 3, F, 4, 4], frame k = 20k/255
    ChatJudge(server.url, "m", "x", max_frames=4)(video)
    for _, _, body in server.requests:
        frames = [int(img[0, 0, 0]) // 20 for img in decoded_images(body)]
        assert frames == [0, 3, 6, 9]
    server.requests.clear()
    ChatJudge(server.url, "m", "x", max_frames=16)(video[:1])
    assert len(decoded_images(server.requests[0][2])) == f


def test_template_and_argument_errors(fake):
    server = fake(lambda body, headers: "1")
    with pytest.raises(ValueError, match=r"prompt_template uses \{prompt\} but no prompts were given"):
        ChatJudge(server.url, "m", "Does it show {prompt}?")(torch.rand(1, 3, 4, 4))
    assert ChatJudge(server.url, "m", "Is it beautiful?")(torch.rand(1, 3, 4, 4)).tolist() == [1.0]
    with pytest.raises(ValueError, match="base_url must be an http"):
        ChatJudge("localhost:8000", "m", "x")
    with pytest.raises(ValueError, match="model must be the served model's name"):
        ChatJudge(server.url, "", "x")
    with pytest.raises(ValueError, match="concurrency must be a positive int"):
        ChatJudge(server.url, "m", "x", concurrency=0)
    with pytest.raises(ValueError, match="image_format must be one of"):
        ChatJudge(server.url, "m", "x", image_format="webp")
    with pytest.raises(ValueError, match="give api_key or api_key_env, not both"):
        ChatJudge(server.url, "m", "x", api_key="a", api_key_env="B")


def test_api_key_from_the_environment(fake, monkeypatch):
    server = fake(lambda body, headers: "1" if headers["Authorization"] == "Bearer from-env" else (401, {}))
    monkeypatch.setenv("JUDGE_KEY", "from-env")
    assert ChatJudge(server.url, "m", "x", api_key_env="JUDGE_KEY")(torch.rand(1, 3, 4, 4)).tolist() == [1.0]


# ------------------------------------------------------------------------- transport limits


def test_deadline_and_response_cap(fake):
    slow = fake(lambda body, headers: "1", delay=1.0)
    t0 = time.perf_counter()
    with pytest.raises(RemoteRewardError, match=r"timed out: no complete answer within timeout=0\.3 s on any of 1"):
        ChatJudge(slow.url, "m", "x", timeout=0.3, retries=0)(torch.rand(1, 3, 4, 4))
    assert time.perf_counter() - t0 < 0.9
    chatty = fake(lambda body, headers: "1" * 5000)
    with pytest.raises(RemoteRewardError, match=r"sent too large an answer: its Content-Length is [\d,]+ bytes, over "
                                                "max_response_bytes=1,000"):
        ChatJudge(chatty.url, "m", "x", max_response_bytes=1000, retries=0)(torch.rand(1, 3, 4, 4))


def test_redirect_to_another_origin_keeps_the_key(fake):
    elsewhere = fake(lambda body, headers: "10")
    redirect = fake(lambda body, headers: (307, b"", {"Location": elsewhere.url + "/chat/completions"}))
    with pytest.raises(RemoteRewardError, match="with a redirect to .*another origin; it is not followed"):
        ChatJudge(redirect.url, "m", "x", api_key="sk-secret", retries=0)(torch.rand(1, 3, 4, 4))
    assert elsewhere.requests == []


# ---------------------------------------------------------------------------- ChatPairwiseJudge


def brightness_judge(bias=None):
    """A fake VLM that compares the two images' brightness (A is the first image); with bias="A" it
    always answers A, whatever the images."""

    def answer(body, headers):
        if bias:
            return bias
        a, b = (float(img.mean()) for img in decoded_images(body))
        assert [p["text"] for p in user_parts(body) if p["type"] == "text"][:2] == ["Image A:", "Image B:"]
        return "A" if a > b else "B." if a < b else "Tie"

    return answer


def test_pairwise_with_win_rate_reward(fake):
    server = fake(brightness_judge())
    judge = ChatPairwiseJudge(server.url, "m", concurrency=4)
    assert judge(flat([0.8])[0], flat([0.2])[0], "p") == 1.0
    assert judge(flat([0.2])[0], flat([0.8])[0], "p") == 0.0
    assert judge(flat([0.5])[0], flat([0.5])[0], "p") == 0.5
    win = WinRateReward(judge, group_size=3)
    x = flat([0.2, 0.8, 0.5, 0.1, 0.3, 0.3])
    out = win(x, ["one"] * 3 + ["two"] * 3)
    assert out.tolist() == [0.0, 1.0, 0.5, 0.0, 0.75, 0.75]
    assert 'generated for the prompt: "two"' in text_of(server.requests[-1][2])
    assert judge.parse_failures == 0


def test_both_orders_cancel_position_bias(fake):
    biased = fake(brightness_judge(bias="A"))
    x = flat([0.2, 0.8])
    assert ChatPairwiseJudge(biased.url, "m").batch(x[:1], x[1:], ["p"]).tolist() == [1.0]  # fooled
    assert ChatPairwiseJudge(biased.url, "m", both_orders=True).batch(x[:1], x[1:], ["p"]).tolist() == [0.5]
    fair = fake(brightness_judge())
    judge = ChatPairwiseJudge(fair.url, "m", both_orders=True)
    assert judge.batch(x[[0, 1]], x[[1, 0]], ["p", "p"]).tolist() == [0.0, 1.0]
    assert len(fair.requests) == 4


def test_pairwise_parse_failures_are_nan_counted_and_logged(fake, caplog):
    replies = iter(["Both are lovely!", "0.7", "A"])
    server = fake(lambda body, headers: next(replies))
    judge = ChatPairwiseJudge(server.url, "m", "{prompt}", parse="number", concurrency=1, name="pj")
    x = flat([0.2, 0.8, 0.5])
    with caplog.at_level(logging.WARNING, logger="flowsteer.rewards.chat"):
        v = judge.batch(x, x.flip(0), ["p"] * 3)
    assert math.isnan(v[0]) and math.isnan(v[1]) and math.isnan(v[2])
    assert judge.parse_failures == 3 and judge.last_log["judge/pj/parse_failures"] == 3
    assert any("0.7 is not a verdict" in r.message for r in caplog.records)
    # In a win rate an unreadable verdict is a tie.
    server2 = fake(lambda body, headers: "no idea")
    win = WinRateReward(ChatPairwiseJudge(server2.url, "m"), group_size=2)
    assert win(flat([0.1, 0.9]), ["p", "p"]).tolist() == [0.5, 0.5]
    assert torch.isnan(win.last_prefs[0, 0, 1])


def test_pairwise_choices_and_labels(fake):
    server = fake(lambda body, headers: "<answer>Image 2 is better</answer>")
    judge = ChatPairwiseJudge(server.url, "m", "Which of the two images fits {prompt}?", parse="regex",
                              pattern=r"<answer>\s*Image ([12]) is better", choices={"1": 1.0, "2": 0.0},
                              image_labels=None)
    assert judge(flat([0.5])[0], flat([0.6])[0], "a cat") == 0.0
    assert [p["type"] for p in user_parts(server.requests[0][2])] == ["image_url", "image_url", "text"]
    with pytest.raises(ValueError, match="image_labels must be two strings"):
        ChatPairwiseJudge(server.url, "m", image_labels=("only one",))
