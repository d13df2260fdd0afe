"""Rewards served by another process (a VLM judge, a GenEval server, a big reward model on another
GPU): an HTTP client with batching, deadlines and retries, and a small standard-library server that
wraps any local reward (`flowsteer serve-reward`, `serve_main`).

Wire format (JSON over HTTP POST, UTF-8; docs/rewards.md has the full description):

request  {"name": str, "n": N, "prompts": [str] * N | null, "meta": JSON | null,
          "images": {"encoding": "png", "data": [base64 PNG] * N}                 # pixels, [N, 3, H, W]
                  | {"encoding": "png", "data": [[base64 PNG] * F] * N}           # pixels, [N, 3, F, H, W]
                  | {"encoding": "uint8", "shape": [N, (F,) H, W, 3], "data": base64}
          "latents": {"encoding": "float32", "shape": [N, C, (F,) H, W], "data": base64}}
response {"rewards": [float] * N} or {"rewards": {key: [float] * N}}; on failure {"error": str} with
         HTTP 400 (bad request), 401 (token), 404, 408 (request too slow), 411, 413 (over a limit),
         500 (the reward raised) or 503 (too many connections).

Pixels travel as uint8 (x * 255 rounded, as DDPO and Flow-GRPO send JPEGs) and arrive as
float [N, 3, (F,) H, W] in [0, 1]; raw arrays are C-order, little-endian.

Why the standard library and not uvicorn/starlette/httpx: the reward protocol stays dependency-free
(a judge node needs only torch, numpy and Pillow), and every property asked of the service is met
with a few small pieces here: `ServerLimits` (body, samples, pixels, connections, backlog, a
per-request read deadline), a JSON reply for every error, an optional bearer token, and on the
client a deadline per attempt that covers connecting, sending and reading, a response-size cap and
no redirects to another origin. tests/test_rewards_remote.py checks each against a real server.
"""
from __future__ import annotations

import argparse
import base64
import hmac
import http.client
import importlib
import inspect
import io
import ipaddress
import json
import math
import os
import socket
import sys
import threading
import time
import traceback
import urllib.parse
import warnings
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .._optional import require
from .base import INPUTS, FunctionReward, Reward, check_meta, check_prompts, check_reward_input, to_uint8_hwc

Tensor = torch.Tensor
ENCODINGS = ("png", "uint8")
# Status codes worth another try: overload and gateway errors. A 500 is the reward itself raising,
# which a retry would repeat.
RETRY_STATUS = (429, 502, 503, 504)
REDIRECT_STATUS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 3
# The largest reply a client reads (16 MiB): rewards for thousands of samples fit many times over.
DEFAULT_MAX_RESPONSE_BYTES = 16 * 2 ** 20
# A longest wait that a server's Retry-After may ask of a client (seconds).
MAX_RETRY_AFTER = 30.0
# After answering before the body was read (401, 413, ...), the server reads and discards at most
# this much of the rest for at most this long, so that the client finishes sending and reads the
# answer instead of a connection reset.
DRAIN_BYTES = 16 * 2 ** 20
DRAIN_SECONDS = 2.0


class RemoteRewardError(RuntimeError):
    """A remote reward failed: unreachable, timed out, or answered with an error or garbage.
    transient: True when another try later may succeed (a timeout, an unavailable, unreachable
    or closing server), False for an answer that will not change (an HTTP error, garbage)."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class ServerLimits:
    """What one request to a reward server may ask for (the `flowsteer serve-reward` options).

    max_body_bytes: the request body (default 128 MiB); more is answered 413 before it is read.
    max_samples: samples per request (default 256); more is answered 413.
    max_pixels: H * W of one image or video frame (default 4096 * 4096 = 16,777,216); checked from
        the PNG header or the uint8 shape before anything is decoded; more is answered 413.
    max_total_pixels: of all images and frames of a request (default 2**28 = 268,435,456, i.e.
        805 MB as uint8 and 3.2 GB as float32 once decoded); more is answered 413.
    read_timeout: seconds for a connection to deliver one whole request, headers and body (default
        60); a slower one is answered 408 (or closed, when it has not sent a request line). Also the
        time allowed to send the reply.
    max_connections: connections handled at once (default 64); more are answered 503.
    backlog: the listen queue of connections not yet accepted (default 128).
    """

    max_body_bytes: int = 128 * 2 ** 20
    max_samples: int = 256
    max_pixels: int = 4096 * 4096
    max_total_pixels: int = 2 ** 28
    read_timeout: float = 60.0
    max_connections: int = 64
    backlog: int = 128

    def __post_init__(self):
        for name in ("max_body_bytes", "max_samples", "max_pixels", "max_total_pixels", "max_connections", "backlog"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ServerLimits.{name} must be a positive int (got {value!r})")
        if not (isinstance(self.read_timeout, (int, float)) and self.read_timeout > 0):
            raise ValueError(f"ServerLimits.read_timeout must be a positive number of seconds (got {self.read_timeout!r})")


class RequestTooLarge(ValueError):
    """A request over one of the server's `ServerLimits` (answered 413)."""


# ------------------------------------------------------------------------------------ encoding


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _pil_image(what: str):
    """PIL.Image, or an ImportError that names the extra and the way around it (encoding='uint8')."""
    return require("PIL.Image", "rewards", what,
                   hint="or send raw pixels with RemoteReward(..., encoding='uint8'), which needs no Pillow on either "
                        "side (larger requests than PNG)")


def _png(arr: np.ndarray) -> str:
    Image = _pil_image("RemoteReward(encoding='png') (it encodes images as PNG with Pillow)")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return _b64(buf.getvalue())


def encode_pixels(x: Tensor, encoding: str = "png") -> Dict[str, Any]:
    """x: [N, 3, H, W] or [N, 3, F, H, W] in [0, 1] -> the "images" field."""
    if x.ndim == 5:
        n, _, f, h, w = x.shape
        arr = to_uint8_hwc(x.permute(0, 2, 1, 3, 4).reshape(n * f, 3, h, w)).reshape(n, f, h, w, 3)
    else:
        arr = to_uint8_hwc(x)
    if encoding == "png":
        data = [[_png(fr) for fr in a] if a.ndim == 4 else _png(a) for a in arr]
        return {"encoding": "png", "data": data}
    return {"encoding": "uint8", "shape": list(arr.shape), "data": _b64(np.ascontiguousarray(arr).tobytes())}


def encode_latents(x: Tensor) -> Dict[str, Any]:
    arr = x.detach().float().cpu().numpy().astype("<f4")
    return {"encoding": "float32", "shape": list(arr.shape), "data": _b64(arr.tobytes())}


def _check_samples(n: int, limits: Optional[ServerLimits], what: str) -> None:
    if limits is not None and n > limits.max_samples:
        raise RequestTooLarge(f"{what} holds {n} samples; this server takes at most {limits.max_samples} per request "
                              "(--max-samples); lower the client's batch_size=")


def _check_pixels(h: int, w: int, count: int, limits: Optional[ServerLimits], what: str) -> None:
    """count images (or frames) of h x w pixels each."""
    if limits is None:
        return
    if h * w > limits.max_pixels:
        raise RequestTooLarge(f"{what} is {w}x{h} = {h * w:,} pixels; this server takes at most {limits.max_pixels:,} "
                              "pixels per image or frame (--max-pixels)")
    if count * h * w > limits.max_total_pixels:
        raise RequestTooLarge(f"{what} holds {count} images or frames of {w}x{h}, {count * h * w:,} pixels in all; this "
                              f"server takes at most {limits.max_total_pixels:,} per request (--max-total-pixels); "
                              "lower the client's batch_size=")


def _shape(field: Dict[str, Any], what: str) -> List[int]:
    shape = field.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"{what}.shape must be a list of non-negative ints (got {str(shape)[:100]})")
    return shape


def _raw(field: Dict[str, Any], shape: List[int], dtype: str, what: str) -> np.ndarray:
    data = field.get("data")
    if not isinstance(data, str):
        raise ValueError(f"{what}.data must be a base64 string (got {type(data).__name__})")
    expected = math.prod(shape) * np.dtype(dtype).itemsize
    # Every 3 bytes take 4 base64 characters: a wrong size is found before anything is decoded.
    if len(data) != (expected + 2) // 3 * 4:
        raise ValueError(f"{what}.data has {len(data)} base64 characters; shape {shape} of {dtype} is {expected} "
                         f"bytes, {(expected + 2) // 3 * 4} characters")
    raw = base64.b64decode(data, validate=True)
    if len(raw) != expected:
        raise ValueError(f"{what}.data has {len(raw)} bytes; shape {shape} of {dtype} needs {expected}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _open_png(s, what: str):
    """A lazily opened PNG (its header read, nothing decoded)."""
    Image = _pil_image("this reward server, to decode the PNG images of a request")
    if not isinstance(s, str):
        raise ValueError(f"{what} must be a base64 PNG string (got {type(s).__name__})")
    raw = base64.b64decode(s, validate=True)
    try:
        return Image.open(io.BytesIO(raw), formats=["PNG"])
    except Image.DecompressionBombError as exc:
        raise RequestTooLarge(f"{what}: {exc}") from None
    except Exception as exc:  # UnidentifiedImageError, SyntaxError from a bad header, ...
        raise ValueError(f"{what} is not a PNG ({type(exc).__name__}: {exc})") from None


def _decode(im, what: str) -> np.ndarray:
    try:
        return np.asarray(im.convert("RGB"))
    except Exception as exc:  # truncated or corrupt data
        raise ValueError(f"{what} could not be decoded ({type(exc).__name__}: {exc})") from None


def _decode_png_list(data, limits: Optional[ServerLimits]) -> np.ndarray:
    """images.data of PNGs -> uint8 [N, H, W, 3] or [N, F, H, W, 3], limits checked on the headers."""
    if not isinstance(data, list) or not data:
        raise ValueError("images.data must be a non-empty list of base64 PNGs (or of lists of them, for videos)")
    _check_samples(len(data), limits, "images.data")
    video = isinstance(data[0], list)
    opened: List[List[Any]] = []
    for i, d in enumerate(data):
        if isinstance(d, list) != video:
            raise ValueError(f"images.data[{i}] is {'not ' if video else ''}a list of frames but images.data[0] is"
                             f"{'' if video else ' not'}; send all images or all videos")
        frames = d if video else [d]
        if not frames:
            raise ValueError(f"images.data[{i}] is an empty list of frames")
        if video and len(frames) != len(data[0]):
            raise ValueError(f"images.data[{i}] has {len(frames)} frames but images.data[0] has {len(data[0])}")
        opened.append([_open_png(f, f"images.data[{i}]" + (f"[{k}]" if video else "")) for k, f in enumerate(frames)])
    w, h = opened[0][0].size
    count = sum(len(o) for o in opened)
    for i, frames in enumerate(opened):
        for k, im in enumerate(frames):
            if im.size != (w, h):
                _check_pixels(im.size[1], im.size[0], 1, limits, f"images.data[{i}]")
                raise ValueError(f"images.data[{i}] is {im.size[0]}x{im.size[1]} but images.data[0] is {w}x{h}; all "
                                 "images of a request must have one size")
    _check_pixels(h, w, count, limits, "images.data[0]" if count == 1 else "images.data")
    arr = np.stack([np.stack([_decode(im, f"images.data[{i}]") for im in frames]) for i, frames in enumerate(opened)])
    return arr if video else arr[:, 0]


def decode_pixels(field: Dict[str, Any], limits: Optional[ServerLimits] = None) -> Tensor:
    """The "images" field -> float [N, 3, (F,) H, W] in [0, 1]. With `limits`, the sample count and
    the pixel counts are checked (RequestTooLarge) before anything is decoded."""
    if not isinstance(field, dict):
        raise ValueError(f"images must be a JSON object with 'encoding' and 'data' (got {type(field).__name__})")
    enc = field.get("encoding")
    if enc == "png":
        arr = _decode_png_list(field.get("data"), limits)
    elif enc == "uint8":
        shape = _shape(field, "images")
        if len(shape) not in (4, 5) or shape[-1] != 3:
            raise ValueError(f"images.shape must be [N, H, W, 3] or [N, F, H, W, 3] (got {shape})")
        _check_samples(shape[0], limits, "images")
        _check_pixels(shape[-3], shape[-2], math.prod(shape[:-3]), limits, "images")
        arr = _raw(field, shape, "u1", "images")
    else:
        raise ValueError(f"images.encoding must be one of {ENCODINGS} (got {str(enc)[:100]!r})")
    x = torch.from_numpy(arr.copy()).float() / 255
    return x.permute(0, 3, 1, 2) if x.ndim == 4 else x.permute(0, 4, 1, 2, 3)


def decode_latents(field: Dict[str, Any], limits: Optional[ServerLimits] = None) -> Tensor:
    """The "latents" field -> float32 [N, C, (F,) H, W]."""
    if not isinstance(field, dict):
        raise ValueError(f"latents must be a JSON object with 'encoding', 'shape' and 'data' (got {type(field).__name__})")
    if field.get("encoding") != "float32":
        raise ValueError(f"latents.encoding must be 'float32' (got {str(field.get('encoding'))[:100]!r})")
    shape = _shape(field, "latents")
    if shape:
        _check_samples(shape[0], limits, "latents")
    return torch.from_numpy(_raw(field, shape, "<f4", "latents").astype(np.float32))


def _jsonable(obj):
    if isinstance(obj, Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


# --------------------------------------------------------------------------------- HTTP client
# Shared with chat.py: one attempt is an HTTP exchange under one deadline, `request` adds retries
# and turns every failure into a RemoteRewardError that says what happened.


class _TimedSocket:
    """A socket whose reads and writes all end by `deadline` (time.monotonic() seconds; None: no
    limit), however slowly the other side drips bytes: each recv and send waits only what is left."""

    def __init__(self, sock: socket.socket, deadline: Optional[float] = None):
        self.sock, self.deadline = sock, deadline

    def _arm(self) -> None:
        if self.deadline is None:
            self.sock.settimeout(None)
            return
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("the deadline passed")
        self.sock.settimeout(left)

    def sendall(self, data) -> None:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), 1 << 16):
            self._arm()
            self.sock.sendall(view[start:start + (1 << 16)])

    def makefile(self, mode: str = "rb", *args, **kwargs):
        if mode != "rb":
            raise ValueError(f"_TimedSocket.makefile only reads (mode 'rb', got {mode!r})")
        return io.BufferedReader(_TimedReader(self))

    def __getattr__(self, name):
        return getattr(self.sock, name)


class _TimedReader(io.RawIOBase):
    """A reader of a _TimedSocket. Like socket.makefile's, it keeps the socket open until it is
    closed itself (http.client closes the connection before the answer is read)."""

    def __init__(self, timed: _TimedSocket):
        self.timed = timed
        self.raw = timed.sock.makefile("rb", buffering=0)

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        self.timed._arm()
        return self.raw.readinto(buf)

    def close(self) -> None:
        if not self.closed:
            self.raw.close()
        super().close()


@dataclass
class _Reply:
    status: int
    headers: Any  # http.client.HTTPMessage
    body: bytes


class _Failure(Exception):
    """An attempt without a usable answer. kind: "connect", "timeout", "closed" (worth another
    try), or "protocol", "too_large", "redirect" (not)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


RETRYABLE = ("connect", "timeout", "closed")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _short(obj, limit: int = 200) -> str:
    """repr(obj) cut to `limit` characters; a huge int is described, not converted."""
    if isinstance(obj, int) and not isinstance(obj, bool) and obj.bit_length() > 64:
        return f"an integer of about {int(obj.bit_length() * 0.30103) + 1} digits"
    try:
        text = repr(obj)
    except Exception as exc:  # e.g. an int of more digits than Python will print
        text = f"<{type(obj).__name__}: {exc}>"
    return text if len(text) <= limit else text[:limit] + "..."


def _origin(url: str) -> Tuple[str, Optional[str], Optional[int]]:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:
        port = None
    return scheme, parts.hostname, port


def check_url(url, what: str = "url") -> str:
    """An http(s) URL with a host and a valid port, or a ValueError that names `what`."""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"{what} must be an http(s) URL (got {url!r})")
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port
    except ValueError as exc:
        raise ValueError(f"{what} has a bad port ({exc}): {url!r}") from None
    if not parts.hostname:
        raise ValueError(f"{what} has no host: {url!r}")
    return url


def _read_body(resp: http.client.HTTPResponse, cap: int) -> bytes:
    if resp.length is not None and resp.length > cap:
        raise _Failure("too_large", f"its Content-Length is {resp.length:,} bytes, over max_response_bytes={cap:,}")
    chunks, total = [], 0
    while True:
        chunk = resp.read(min(1 << 20, cap + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > cap:
            raise _Failure("too_large", f"the answer is over max_response_bytes={cap:,} bytes")


def _exchange(url: str, method: str, body: Optional[bytes], headers: Dict[str, str], deadline: float,
              cap: int) -> _Reply:
    parts = urllib.parse.urlsplit(url)
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Failure("timeout", "no time was left for another request")
    cls = http.client.HTTPSConnection if parts.scheme.lower() == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname, parts.port, timeout=left)
    target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    try:
        try:
            conn.connect()
        except (socket.timeout, TimeoutError):
            raise _Failure("timeout", "connecting timed out") from None
        except OSError as exc:
            raise _Failure("connect", _describe(exc)) from None
        conn.sock = _TimedSocket(conn.sock, deadline)
        broke = None
        try:
            conn.request(method, target, body=body, headers=headers)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as exc:
            broke = exc  # the server may have answered (a 413, a 401) and stopped reading: look for it
        try:
            resp = conn.getresponse()
        except Exception as exc:
            if broke is None:
                raise
            raise _Failure("closed", f"the connection broke while the request was sent ({_describe(broke)}), "
                                     f"with no answer ({_describe(exc)})") from None
        try:
            return _Reply(resp.status, resp.headers, _read_body(resp, cap))
        finally:
            resp.close()
    except _Failure:
        raise
    except (socket.timeout, TimeoutError):
        raise _Failure("timeout", "the deadline passed") from None
    except (http.client.RemoteDisconnected, http.client.IncompleteRead, ConnectionError) as exc:
        raise _Failure("closed", _describe(exc)) from None
    except http.client.HTTPException as exc:
        raise _Failure("protocol", _describe(exc)) from None
    except OSError as exc:
        raise _Failure("closed", _describe(exc)) from None
    except Exception as exc:  # anything else http.client raises on a malformed answer
        raise _Failure("protocol", _describe(exc)) from None
    finally:
        conn.close()


def _attempt(url: str, method: str, body: Optional[bytes], headers: Dict[str, str], timeout: float,
             cap: int) -> _Reply:
    """One attempt: an exchange that ends within `timeout` seconds in all (connecting, sending,
    waiting, reading), following redirects only with 307/308 and only to the same origin."""
    deadline = time.monotonic() + timeout
    for _ in range(MAX_REDIRECTS + 1):
        reply = _exchange(url, method, body, headers, deadline, cap)
        if reply.status not in REDIRECT_STATUS:
            return reply
        location = reply.headers.get("Location")
        if not location:
            raise _Failure("redirect", f"answered HTTP {reply.status} without a Location")
        target = urllib.parse.urljoin(url, location)
        if _origin(target) != _origin(url):
            raise _Failure("redirect", f"answered HTTP {reply.status} with a redirect to {target}, another origin; it "
                                       "is not followed, because it would carry this request's headers (the token "
                                       "among them); set the URL to the server that should answer")
        if reply.status not in (307, 308):
            raise _Failure("redirect", f"answered HTTP {reply.status} with a redirect to {target}; only 307 and 308 "
                                       "keep the request body, so it is not followed; set the URL to that address")
        url = target
    raise _Failure("redirect", f"redirected more than {MAX_REDIRECTS} times")


def _error_detail(body: bytes) -> str:
    """The message of an error answer: {"error": str} (flowsteer), {"error": {"message": str}}
    (OpenAI-compatible servers), {"detail": ...} or {"message": ...}, else the text."""
    text = body.decode("utf-8", "replace")
    try:
        obj = json.loads(text)
        if isinstance(obj, dict):
            err = obj.get("error", obj.get("detail", obj.get("message")))
            if isinstance(err, dict) and "message" in err:
                err = err["message"]
            if err is not None:
                return err if isinstance(err, str) else json.dumps(err)
    except Exception:  # not JSON, too deep, ...: the text it is
        pass
    return text


def _retry_after(headers) -> float:
    try:
        value = float(headers.get("Retry-After", "0"))
    except (TypeError, ValueError):
        return 0.0
    return min(max(value, 0.0), MAX_RETRY_AFTER) if math.isfinite(value) else 0.0


def request(url: str, body: Optional[bytes], headers: Dict[str, str], *, where: str, timeout: float, retries: int,
            backoff: float, max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
            retry_status: Sequence[int] = RETRY_STATUS, hint: str = "") -> Tuple[bytes, int]:
    """POST `body` (GET when None) to `url`: the body of a 2xx answer and the number of attempts used.

    Each attempt must end within `timeout` seconds. Connection failures, timeouts, connections
    closed without an answer and the `retry_status` codes are tried again up to `retries` times,
    after backoff * 2**k seconds (or the server's Retry-After, at most 30 s). Every failure raises
    RemoteRewardError; its message starts with `where` and says what happened.
    """
    method = "GET" if body is None else "POST"
    attempts, last, wait = 1 + retries, _Failure("connect", "no attempt"), 0.0
    for attempt in range(attempts):
        if attempt:
            time.sleep(wait)
        wait = backoff * 2 ** attempt
        try:
            reply = _attempt(url, method, body, headers, timeout, max_response_bytes)
        except _Failure as f:
            last = f
            if f.kind in RETRYABLE:
                continue
            if f.kind == "too_large":
                raise RemoteRewardError(f"{where} sent too large an answer: {f.detail}; raise max_response_bytes= if "
                                        "that is expected") from None
            if f.kind == "redirect":
                raise RemoteRewardError(f"{where} {f.detail}") from None
            raise RemoteRewardError(f"{where} sent a malformed HTTP answer ({f.detail})") from None
        if 200 <= reply.status < 300:
            return reply.body, attempt + 1
        detail = _error_detail(reply.body)
        if reply.status in retry_status:
            last = _Failure("status", f"HTTP {reply.status}: {detail[:300]}")
            wait = max(wait, _retry_after(reply.headers))
            continue
        auth = " (check the token or API key)" if reply.status in (401, 403) else ""
        raise RemoteRewardError(f"{where} answered HTTP {reply.status}{auth}: {detail[:2000]}")
    if last.kind == "timeout":
        raise RemoteRewardError(f"{where} timed out: no complete answer within timeout={timeout:g} s on any of "
                                f"{attempts} attempts; raise timeout= or lower batch_size=", transient=True)
    if last.kind == "status":
        raise RemoteRewardError(f"{where} is unavailable: still {last.detail} after {attempts} attempts",
                                transient=True)
    if last.kind == "closed":
        raise RemoteRewardError(f"{where} closed the connection without a complete answer on {attempts} attempts "
                                f"({last.detail}); the server's log says why (a crash, a restart, a refused request)",
                                transient=True)
    raise RemoteRewardError(f"{where} is unreachable after {attempts} attempts ({last.detail}){hint}", transient=True)


def bearer_headers(token: Optional[str], token_env: Optional[str], what: str) -> Dict[str, str]:
    """{"Authorization": "Bearer ..."} from `token` or the environment variable `token_env`, or {}."""
    if token is not None and token_env is not None:
        raise ValueError(f"give {what} or {what}_env, not both")
    if token_env is not None:
        token = os.environ.get(token_env)
        if not token:
            raise ValueError(f"{what}_env={token_env!r}: the environment variable is not set or empty")
    if token is None:
        return {}
    if not isinstance(token, str) or not token.strip() or any(c in token.strip() for c in "\r\n"):
        raise ValueError(f"{what} must be a non-empty string without line breaks")
    return {"Authorization": f"Bearer {token.strip()}"}


def _check_client_numbers(timeout, retries, backoff, max_response_bytes) -> None:
    if not (isinstance(timeout, (int, float)) and timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"timeout must be a positive number of seconds (got {timeout!r})")
    if not (isinstance(retries, int) and retries >= 0):
        raise ValueError(f"retries must be an int >= 0 (got {retries!r})")
    if not (isinstance(backoff, (int, float)) and backoff >= 0):
        raise ValueError(f"backoff must be a number of seconds >= 0 (got {backoff!r})")
    if not (isinstance(max_response_bytes, int) and max_response_bytes > 0):
        raise ValueError(f"max_response_bytes must be a positive int (got {max_response_bytes!r})")


# -------------------------------------------------------------------------------------- client


class RemoteReward(Reward):
    """A reward computed by a server at `url` (see the module docstring for the wire format).

    Args:
        url: the scoring endpoint, e.g. "http://127.0.0.1:8000" (`flowsteer serve-reward` answers at
            "/" and "/score").
        name: the reward's name in logs and errors.
        input: "pixels" or "latents", what the server scores.
        batch_size: samples per request.
        timeout: seconds for one attempt as a whole: connecting, sending, the server's work and
            reading the answer (a server that drips bytes does not stretch it).
        retries: further attempts after a connection failure, a timeout, a connection closed
            without an answer, or HTTP 429/502/503/504, with waits of backoff * 2**k seconds.
        encoding: "png" (smaller; needs Pillow, `pip install 'flowsteer[rewards]'`) or "uint8" (no
            codec: raw pixels, which need nothing beyond the standard library and numpy).
        token / token_env: a bearer token, or the environment variable that holds it, for a server
            started with --token-file or --token-env.
        max_response_bytes: the largest answer read (default 16 MiB).
        headers: more request headers.
    Redirects are followed only with 307/308 and only to the same scheme, host and port.
    """

    differentiable = False

    def __init__(self, url: str, *, name: str = "remote", input: str = "pixels", batch_size: Optional[int] = 16,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 0.5, encoding: str = "png",
                 headers: Optional[Dict[str, str]] = None, token: Optional[str] = None, token_env: Optional[str] = None,
                 max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES):
        check_url(url)
        if input not in INPUTS:
            raise ValueError(f"input must be one of {INPUTS} (got {input!r})")
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS} (got {encoding!r})")
        if input == "pixels" and encoding == "png":  # fail here, not after the first rollout
            _pil_image("RemoteReward(encoding='png') (it encodes images as PNG with Pillow)")
        _check_client_numbers(timeout, retries, backoff, max_response_bytes)
        self.url, self.name, self.input = url, name, input
        self.batch_size, self.timeout, self.retries, self.backoff = batch_size, float(timeout), retries, float(backoff)
        self.encoding, self.max_response_bytes = encoding, max_response_bytes
        self.headers = {**dict(headers or {}), **bearer_headers(token, token_env, "token")}
        self.device = torch.device("cpu")

    def _where(self) -> str:
        return f"remote reward {self.name!r} at {self.url}"

    def _request(self, url: str, body: Optional[bytes]) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json", **self.headers}
        raw, _ = request(url, body, headers, where=self._where(), timeout=self.timeout, retries=self.retries,
                         backoff=self.backoff, max_response_bytes=self.max_response_bytes,
                         hint="; is the server running? `flowsteer serve-reward --reward SPEC --port PORT` serves a "
                              "local reward")
        return raw

    def health(self) -> Dict[str, Any]:
        """The server's GET /health answer: its reward's name, input and batch size."""
        base = self.url.rstrip("/")
        base = base[: -len("/score")] if base.endswith("/score") else base
        raw = self._request(base + "/health", None)
        try:
            out = json.loads(raw)
        except Exception:
            raise RemoteRewardError(f"{self._where()} answered /health with something that is not JSON: "
                                    f"{raw[:200]!r}") from None
        if not isinstance(out, dict):
            raise RemoteRewardError(f"{self._where()} answered /health with {type(out).__name__}, not a JSON object")
        return out

    def forward(self, x, prompts, meta):
        n = x.shape[0]
        payload: Dict[str, Any] = {"name": self.name, "n": n, "prompts": prompts}
        if self.input == "pixels":
            payload["images"] = encode_pixels(x, self.encoding)
        else:
            payload["latents"] = encode_latents(x)
        try:
            payload["meta"] = json.loads(json.dumps(meta, default=_jsonable))
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise TypeError(f"{self._where()}: meta must be JSON-serialisable ({exc})") from None
        raw = self._request(self.url, json.dumps(payload).encode("utf-8"))
        return self._parse(raw, n)

    def _parse(self, raw: bytes, n: int):
        try:
            body = json.loads(raw)
        except RecursionError:
            raise RemoteRewardError(f"{self._where()} returned JSON nested too deeply to read: {raw[:100]!r}") from None
        except Exception:  # ValueError, UnicodeDecodeError, ...
            raise RemoteRewardError(f"{self._where()} returned a response that is not JSON: {raw[:200]!r}") from None
        if not isinstance(body, dict) or "rewards" not in body:
            raise RemoteRewardError(f"{self._where()} returned JSON without a 'rewards' field: {_short(body)}")
        rewards = body["rewards"]
        if isinstance(rewards, dict):
            return {str(k): self._values(v, n, f"rewards[{k!r}]") for k, v in rewards.items()}
        return self._values(rewards, n, "rewards")

    def _values(self, values, n: int, label: str) -> Tensor:
        if not isinstance(values, list):
            raise RemoteRewardError(f"{self._where()} returned {label} as {type(values).__name__}; expected a list of "
                                    f"{n} numbers")
        if len(values) != n:
            raise RemoteRewardError(f"{self._where()} returned {len(values)} values in {label} for {n} samples")
        out = []
        for i, v in enumerate(values):
            try:
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise TypeError
                f = float(v)  # OverflowError for an int beyond float range
                if not math.isfinite(f):
                    raise ValueError
            except (TypeError, ValueError, OverflowError):
                raise RemoteRewardError(f"{self._where()} returned {_short(v)} at {label}[{i}]; expected finite "
                                        "numbers") from None
            out.append(f)
        return torch.tensor(out, dtype=torch.float32)


# -------------------------------------------------------------------------------------- server


class _HTTPError(Exception):
    """An answer other than 200: status and message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class _Handler(BaseHTTPRequestHandler):
    """One connection. Every request gets a JSON answer; a request (headers and body) must arrive
    within limits.read_timeout seconds of its first byte being awaited."""

    server: "_RewardHTTPServer"

    def setup(self):
        super().setup()
        self.timed = _TimedSocket(self.connection)
        self.rfile.close()
        self.rfile = io.BufferedReader(_TimedReader(self.timed))
        self.unread = 0  # body bytes the client announced and the handler has not read

    def handle_one_request(self):
        self.timed.deadline = time.monotonic() + self.server.limits.read_timeout
        super().handle_one_request()  # a connection that sends no request line in time is closed

    def parse_request(self):
        try:
            return super().parse_request()
        except (socket.timeout, TimeoutError):  # the request line came, its headers did not
            self.command = self.command or ""
            self._send(408, {"error": f"the request headers did not arrive within "
                                      f"{self.server.limits.read_timeout:g} s (--read-timeout)"})
            return False

    def log_message(self, fmt, *args):
        if self.server.verbose:
            super().log_message(fmt, *args)

    # ----------------------------------------------------------------------------- replying

    def _send(self, code: int, obj: Dict[str, Any], headers: Sequence[Tuple[str, str]] = ()) -> None:
        body = json.dumps(obj).encode("utf-8")
        self.timed.deadline = None
        self.connection.settimeout(self.server.limits.read_timeout)  # the time allowed to send the answer
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        """BaseHTTPRequestHandler's own errors (a malformed request line, an unknown method, ...) as JSON."""
        try:
            text = message or self.responses.get(code, ("error",))[0]
            self._send(code, {"error": f"{text}" + (f": {explain}" if explain else "")})
        except OSError:
            self.close_connection = True

    def _linger(self) -> None:
        """After answering before the body was read: stop sending, and read and discard what the
        client still sends (at most DRAIN_BYTES, for at most DRAIN_SECONDS), so that its send ends
        and it reads the answer rather than a connection reset."""
        left = min(self.unread, DRAIN_BYTES)
        if left <= 0:
            return
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.timed.deadline = time.monotonic() + DRAIN_SECONDS
            while left > 0:
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except (OSError, ValueError):
            pass

    def _answer(self, handler) -> None:
        """Runs handler() -> (status, JSON object); every outcome is an HTTP answer."""
        try:
            try:
                code, obj = handler()
                self._send(code, obj)
            except _HTTPError as exc:
                extra = [("WWW-Authenticate", "Bearer")] if exc.status == 401 else []
                self._send(exc.status, {"error": exc.message}, extra)
            except (socket.timeout, TimeoutError):
                self.unread = 0  # no lingering for a client this slow
                self._send(408, {"error": f"the request did not arrive within {self.server.limits.read_timeout:g} s "
                                          "(--read-timeout)"})
            except Exception as exc:  # a bug here must still answer, and the server keeps serving
                if self.server.verbose:
                    traceback.print_exc()
                self._send(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})
        except OSError:  # the client went away; nothing to answer to
            self.close_connection = True
            return
        self._linger()

    # ----------------------------------------------------------------------------- requests

    def _route(self, allowed: Sequence[str]) -> str:
        path = urllib.parse.urlsplit(self.path).path.rstrip("/")
        if path not in allowed:
            raise _HTTPError(404, f"no such endpoint {self.path[:200]!r}; POST / or /score, GET /health")
        return path

    def _authorize(self) -> None:
        token = self.server.token
        if token is None:
            return
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise _HTTPError(401, "this server needs a bearer token (Authorization: Bearer ...); the client passes it "
                                  "with token= or token_env=")
        # compare_digest takes time independent of where the strings differ.
        if not hmac.compare_digest(given.strip().encode("utf-8"), token.encode("utf-8")):
            raise _HTTPError(401, "wrong bearer token")

    def _body(self) -> bytes:
        limits = self.server.limits
        if self.headers.get("Transfer-Encoding"):
            self.unread = DRAIN_BYTES
            raise _HTTPError(411, "send the body with a Content-Length, not a Transfer-Encoding")
        text = self.headers.get("Content-Length")
        if text is None:
            raise _HTTPError(411, "a POST needs a Content-Length header")
        if not text.strip().isdigit() or len(text.strip()) > 20:
            self.unread = DRAIN_BYTES
            raise _HTTPError(400, f"Content-Length must be a non-negative integer (got {text[:30]!r})")
        length = int(text)
        self.unread = length
        if length > limits.max_body_bytes:
            raise _HTTPError(413, f"the body is {length:,} bytes; this server takes at most {limits.max_body_bytes:,} "
                                  "(--max-body-mb); lower the client's batch_size= or send PNGs")
        data = self.rfile.read(length)
        self.unread = 0
        if len(data) != length:
            raise _HTTPError(400, f"the body ended after {len(data):,} of {length:,} bytes")
        self.timed.deadline = None  # the request is in; the reward may take as long as it takes
        return data

    def _decode(self, raw: bytes):
        """The request body -> (x, prompts, meta), checked; 400 or 413 otherwise."""
        r, limits = self.server.reward, self.server.limits
        try:
            body = json.loads(raw)
        except RecursionError:
            raise _HTTPError(400, "bad request: the JSON is nested too deeply") from None
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise _HTTPError(400, f"bad request: the body is not JSON ({exc})") from None
        try:
            if not isinstance(body, dict):
                raise ValueError(f"the request body must be a JSON object (got {type(body).__name__})")
            field = "images" if r.input == "pixels" else "latents"
            if field not in body:
                raise ValueError(f"reward {r.name!r} takes {r.input}: the request needs a {field!r} field")
            x = decode_pixels(body[field], limits) if field == "images" else decode_latents(body[field], limits)
            n = body.get("n", x.shape[0])
            if isinstance(n, bool) or not isinstance(n, int) or n != x.shape[0]:
                raise ValueError(f"n = {_short(n, 50)} but {field} holds {x.shape[0]} samples")
            check_reward_input(r, x)
            prompts = check_prompts(r.name, body.get("prompts"), x.shape[0])
            meta = check_meta(r.name, body.get("meta"), x.shape[0])
        except RequestTooLarge as exc:
            raise _HTTPError(413, f"too large: {exc}") from None
        except (ValueError, TypeError, KeyError, OSError) as exc:  # binascii.Error is a ValueError
            raise _HTTPError(400, f"bad request: {exc}") from None
        return x, prompts, meta

    def _health(self):
        self._route(("/health", ""))
        self._authorize()
        r = self.server.reward
        return 200, {"name": r.name, "input": r.input, "batch_size": r.batch_size, "status": "ok"}

    def _score(self):
        self._route(("", "/score"))
        self._authorize()
        x, prompts, meta = self._decode(self._body())
        r = self.server.reward
        try:
            with self.server.lock:
                out = r(x, prompts, meta)
        except Exception as exc:  # the reward's own error goes back to the client verbatim
            return 500, {"error": f"reward {r.name!r} raised {type(exc).__name__}: {exc}"}
        rewards = {k: v.tolist() for k, v in out.items()} if isinstance(out, dict) else out.tolist()
        return 200, {"rewards": rewards}

    def do_GET(self):
        self._answer(self._health)

    def do_POST(self):
        text = self.headers.get("Content-Length", "").strip()
        self.unread = int(text) if text.isdigit() and len(text) <= 20 else 0
        self._answer(self._score)


class _RewardHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most limits.max_connections at once; a listen queue of
    limits.backlog."""

    daemon_threads = True

    def __init__(self, address, reward: Reward, limits: ServerLimits, token: Optional[str], verbose: bool):
        self.reward, self.limits, self.token, self.verbose = reward, limits, token, verbose
        self.lock = threading.Lock()  # one reward call at a time: a model on a GPU is rarely thread-safe
        self.request_queue_size = limits.backlog
        self.open: set = set()
        self.open_lock = threading.Lock()
        if ":" in str(address[0]):
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def process_request(self, request, client_address):
        with self.open_lock:
            full = len(self.open) >= self.limits.max_connections
            if not full:
                self.open.add(request)
        if full:
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:  # no thread could be started
            self.shutdown_request(request)
            raise

    def _refuse(self, request) -> None:
        body = json.dumps({"error": f"the server is handling {self.limits.max_connections} connections "
                                    "(--max-connections); try again"}).encode()
        head = (f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        try:
            request.settimeout(1.0)
            request.sendall(head + body)
        except OSError:
            pass
        super().shutdown_request(request)

    def shutdown_request(self, request):
        with self.open_lock:
            self.open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Wakes every handler blocked on a connection (their reads fail and they end)."""
        with self.open_lock:
            sockets = list(self.open)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address):
        if self.verbose or not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


class RewardServer:
    """A running reward server; `url`, `shutdown()`, and a context manager that shuts it down.

    token: when given, every request needs `Authorization: Bearer <token>` (401 otherwise).
    limits: a ServerLimits (its defaults when None). A server bound to an address other than
    loopback without a token warns (UserWarning; `warning` keeps the text).
    """

    def __init__(self, reward: Reward, host: str = "127.0.0.1", port: int = 0, verbose: bool = False, *,
                 token: Optional[str] = None, limits: Optional[ServerLimits] = None):
        if limits is None:
            limits = ServerLimits()
        if not isinstance(limits, ServerLimits):
            raise TypeError(f"limits must be a ServerLimits (got {type(limits).__name__})")
        if token is not None and (not isinstance(token, str) or not token.strip()):
            raise ValueError("token must be a non-empty string or None")
        self.reward, self.limits = reward, limits
        self.httpd = _RewardHTTPServer((host, port), reward, limits, None if token is None else token.strip(), verbose)
        self.host, self.port = self.httpd.server_address[:2]
        self.warning = None
        if token is None and not _is_loopback(self.host):
            self.warning = (f"the reward server at {self.url} answers anyone who can reach {self.host}: it has no token. "
                            "Start it with --token-file or --token-env (or token=), or bind 127.0.0.1")
            warnings.warn(self.warning, UserWarning, stacklevel=2)
        # A short poll interval so that shutdown() returns promptly (serve_forever's default is 0.5 s).
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       name=f"reward-server-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in str(self.host) else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> "RewardServer":
        self.thread.start()
        return self

    def shutdown(self) -> None:
        """Stops accepting, closes open connections and waits for their handlers to end."""
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.thread.join()
        self.httpd.close_connections()
        self.httpd.server_close()

    def __enter__(self) -> "RewardServer":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def serve(reward, host: str = "127.0.0.1", port: int = 0, *, verbose: bool = False, token: Optional[str] = None,
          limits: Optional[ServerLimits] = None) -> RewardServer:
    """Serve `reward` (a Reward, or a callable taken as a pixel reward) over HTTP in a background
    thread; port 0 picks a free port (see `.url`). Reward calls run one at a time."""
    if not isinstance(reward, Reward):
        if not callable(reward):
            raise TypeError(f"reward must be a flowsteer Reward or a callable (got {type(reward).__name__})")
        reward = FunctionReward(reward)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = RewardServer(reward, host, port, verbose=verbose, token=token, limits=limits)
    if server.warning:
        warnings.warn(server.warning, UserWarning, stacklevel=2)
    return server.start()


# ------------------------------------------------------------------------------------------ CLI


def _builtins():
    from .clip import AestheticScore, CLIPScore, HPSv2Score, PickScore
    from .jpeg import JpegCompressibility, JpegIncompressibility
    from .ocr import OCRReward

    return {"jpeg": JpegCompressibility, "jpeg_compressibility": JpegCompressibility,
            "jpeg_incompressibility": JpegIncompressibility, "clip_score": CLIPScore, "pickscore": PickScore,
            "aesthetic": AestheticScore, "hpsv2": HPSv2Score, "ocr": OCRReward}


def load_reward(spec: str, kwargs: Optional[Dict[str, Any]] = None, *, input: str = "pixels",
                name: Optional[str] = None, batch_size: Optional[int] = None) -> Reward:
    """A Reward from a built-in name (see `_builtins`) or "module:attr", where attr is a Reward, a
    Reward class or factory (called with kwargs), or a reward function fn(x, prompts, meta)."""
    kwargs = dict(kwargs or {})
    table = _builtins()
    if spec in table:
        obj = table[spec](**kwargs)
    elif ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            obj = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"--reward {spec!r}: cannot import module {module_name!r} ({exc})") from None
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise ValueError(f"--reward {spec!r}: {module_name!r} has no attribute {attr!r}")
            obj = getattr(obj, part)
        if not isinstance(obj, Reward) and callable(obj):
            if inspect.isclass(obj) or _required_positional(obj) < 2:
                obj = obj(**kwargs)
            elif kwargs:
                raise ValueError(f"--reward {spec!r} is a reward function; it takes no --reward-kwargs")
    else:
        raise ValueError(f"--reward must be a built-in ({', '.join(sorted(table))}) or 'module:attr' (got {spec!r})")
    if not isinstance(obj, Reward):
        if not callable(obj):
            raise TypeError(f"--reward {spec!r} gave a {type(obj).__name__}, which is neither a Reward nor callable")
        obj = FunctionReward(obj, name=name or spec.rpartition(":")[2], input=input)
    if name:
        obj.name = name
    if batch_size:
        obj.batch_size = batch_size
    return obj


def _required_positional(fn) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 0
    return sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty)


def _read_token(token_file: Optional[str], token_env: Optional[str]) -> Optional[str]:
    """The server's bearer token from --token-file or --token-env (None without either)."""
    if token_file and token_env:
        raise ValueError("give --token-file or --token-env, not both")
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            raise ValueError(f"--token-file {token_file!r}: cannot read it ({exc.strerror or exc})") from None
        if not token:
            raise ValueError(f"--token-file {token_file!r} is empty")
        return token
    if token_env:
        token = os.environ.get(token_env, "").strip()
        if not token:
            raise ValueError(f"--token-env {token_env!r}: the environment variable is not set or empty")
        return token
    return None


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__} (got {text!r})") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__} (got {text!r})")
        return value

    return parse


def serve_main(argv: Optional[Sequence[str]] = None) -> int:
    """`flowsteer serve-reward`: serve a local reward over HTTP until interrupted."""
    d = ServerLimits()
    p = argparse.ArgumentParser(prog="flowsteer serve-reward", description=serve_main.__doc__)
    p.add_argument("--reward", required=True,
                   help="a built-in (jpeg, jpeg_incompressibility, clip_score, pickscore, aesthetic, hpsv2, ocr) or "
                        "module:attr (a Reward, a Reward class or factory, or a function fn(x, prompts, meta))")
    p.add_argument("--reward-kwargs", default="{}", help='JSON keyword arguments for the reward, e.g. \'{"path": "/models/clip"}\'')
    p.add_argument("--name", default=None, help="the reward's name (default: its own)")
    p.add_argument("--input", choices=INPUTS, default="pixels", help="for plain functions: what they score")
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to bind (default 127.0.0.1); another one without a token warns")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (default 8000)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per forward of the reward")
    p.add_argument("--verbose", action="store_true", help="log every request")
    auth = p.add_argument_group("authentication (optional; clients pass RemoteReward(token=...) or token_env=)")
    auth.add_argument("--token-file", default=None, metavar="PATH",
                      help="require 'Authorization: Bearer TOKEN', TOKEN being this file's content")
    auth.add_argument("--token-env", default=None, metavar="VAR",
                      help="require 'Authorization: Bearer TOKEN', TOKEN being this environment variable's value")
    lim = p.add_argument_group("limits (a request over one is answered 413, a slow one 408, one too many 503)")
    lim.add_argument("--max-body-mb", type=_positive(float), default=d.max_body_bytes / 2 ** 20, metavar="MB",
                     help=f"largest request body in MiB (default {d.max_body_bytes / 2 ** 20:g})")
    lim.add_argument("--max-samples", type=_positive(int), default=d.max_samples, metavar="N",
                     help=f"samples per request (default {d.max_samples})")
    lim.add_argument("--max-pixels", type=_positive(int), default=d.max_pixels, metavar="N",
                     help=f"H*W of one image or video frame (default {d.max_pixels}, i.e. 4096x4096)")
    lim.add_argument("--max-total-pixels", type=_positive(int), default=d.max_total_pixels, metavar="N",
                     help=f"pixels of all images and frames of one request (default {d.max_total_pixels}, i.e. 2^28)")
    lim.add_argument("--read-timeout", type=_positive(float), default=d.read_timeout, metavar="S",
                     help=f"seconds for a connection to send one whole request, headers and body (default "
                          f"{d.read_timeout:g})")
    lim.add_argument("--max-connections", type=_positive(int), default=d.max_connections, metavar="N",
                     help=f"connections handled at once (default {d.max_connections})")
    lim.add_argument("--backlog", type=_positive(int), default=d.backlog, metavar="N",
                     help=f"connections waiting to be accepted (default {d.backlog})")
    args = p.parse_args(argv)
    try:
        kwargs = json.loads(args.reward_kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        p.error(f"--reward-kwargs must be a JSON object ({exc})")
    try:
        token = _read_token(args.token_file, args.token_env)
        limits = ServerLimits(max_body_bytes=max(1, int(args.max_body_mb * 2 ** 20)), max_samples=args.max_samples,
                              max_pixels=args.max_pixels, max_total_pixels=args.max_total_pixels,
                              read_timeout=args.read_timeout, max_connections=args.max_connections,
                              backlog=args.backlog)
        reward = load_reward(args.reward, kwargs, input=args.input, name=args.name, batch_size=args.batch_size)
    except (ValueError, TypeError, ImportError, FileNotFoundError) as exc:
        print(f"flowsteer serve-reward: {exc}", file=sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = RewardServer(reward, args.host, args.port, verbose=args.verbose, token=token, limits=limits)
    except OSError as exc:  # the address is taken, or cannot be bound
        print(f"flowsteer serve-reward: cannot listen on {args.host}:{args.port} ({exc.strerror or exc})", file=sys.stderr)
        return 2
    if server.warning:
        print(f"flowsteer serve-reward: warning: {server.warning}", file=sys.stderr, flush=True)
    print(f"serving reward {reward.name!r} ({reward.input}{'; bearer token required' if token else ''}) at "
          f"{server.url}", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.close_connections()
        server.httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(serve_main())
