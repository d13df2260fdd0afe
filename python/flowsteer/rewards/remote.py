"""Rewards served by another process (a VLM judge, a GenEval server, a big reward model on another
GPU): an HTTP client with batching, timeouts and retries, and a small standard-library server that
wraps any local reward (`flowsteer serve-reward`, `serve_main`).

Wire format (JSON over HTTP POST, UTF-8; docs/rewards.md has the full description):

request  {"name": str, "n": N, "prompts": [str] * N | null, "meta": JSON | null,
          "images": {"encoding": "png", "data": [base64 PNG] * N}                 # pixels, [N, 3, H, W]
                  | {"encoding": "png", "data": [[base64 PNG] * F] * N}           # pixels, [N, 3, F, H, W]
                  | {"encoding": "uint8", "shape": [N, (F,) H, W, 3], "data": base64}
          "latents": {"encoding": "float32", "shape": [N, C, (F,) H, W], "data": base64}}
response {"rewards": [float] * N} or {"rewards": {key: [float] * N}}; on failure
         {"error": str} with HTTP status 400 (bad request) or 500 (the reward raised).

Pixels travel as uint8 (x * 255 rounded, as DDPO and Flow-GRPO send JPEGs) and arrive as
float [N, 3, (F,) H, W] in [0, 1]; raw arrays are C-order, little-endian.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import importlib
import inspect
import io
import json
import math
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from .base import INPUTS, FunctionReward, Reward, to_uint8_hwc

Tensor = torch.Tensor
ENCODINGS = ("png", "uint8")
# Status codes worth another try: overload and gateway errors. A 500 is the reward itself raising,
# which a retry would repeat.
RETRY_STATUS = (429, 502, 503, 504)


class RemoteRewardError(RuntimeError):
    """A remote reward failed: unreachable, timed out, or answered with an error or garbage."""


# ------------------------------------------------------------------------------------ encoding


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _png(arr: np.ndarray) -> str:
    from PIL import Image

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


def _raw(field: Dict[str, Any], dtype: str, what: str) -> np.ndarray:
    shape = field.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ValueError(f"{what}.shape must be a list of ints (got {shape!r})")
    data = base64.b64decode(field.get("data", ""), validate=True)
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(data) != expected:
        raise ValueError(f"{what}.data has {len(data)} bytes; shape {shape} of {dtype} needs {expected}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def decode_pixels(field: Dict[str, Any]) -> Tensor:
    """The "images" field -> float [N, 3, (F,) H, W] in [0, 1]."""
    from PIL import Image

    enc = field.get("encoding")
    if enc == "png":
        def load(s):
            return np.asarray(Image.open(io.BytesIO(base64.b64decode(s, validate=True))).convert("RGB"))

        data = field.get("data")
        if not isinstance(data, list) or not data:
            raise ValueError("images.data must be a non-empty list of base64 PNGs")
        arr = np.stack([np.stack([load(f) for f in d]) if isinstance(d, list) else load(d) for d in data])
    elif enc == "uint8":
        arr = _raw(field, "u1", "images")
        if arr.ndim not in (4, 5) or arr.shape[-1] != 3:
            raise ValueError(f"images.shape must be [N, H, W, 3] or [N, F, H, W, 3] (got {list(arr.shape)})")
    else:
        raise ValueError(f"images.encoding must be one of {ENCODINGS} (got {enc!r})")
    x = torch.from_numpy(arr.copy()).float() / 255
    return x.permute(0, 3, 1, 2) if x.ndim == 4 else x.permute(0, 4, 1, 2, 3)


def decode_latents(field: Dict[str, Any]) -> Tensor:
    if field.get("encoding") != "float32":
        raise ValueError(f"latents.encoding must be 'float32' (got {field.get('encoding')!r})")
    return torch.from_numpy(_raw(field, "<f4", "latents").astype(np.float32))


def _jsonable(obj):
    if isinstance(obj, Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


# -------------------------------------------------------------------------------------- client


class RemoteReward(Reward):
    """A reward computed by a server at `url` (see the module docstring for the wire format).

    Args:
        url: the scoring endpoint, e.g. "http://127.0.0.1:8000" (`flowsteer serve-reward` answers at
            "/" and "/score").
        name: the reward's name in logs and errors.
        input: "pixels" or "latents", what the server scores.
        batch_size: samples per request. timeout: seconds for the connection and for each read.
        retries: further attempts after a connection failure, a timeout or a 429/502/503/504, with
            waits of backoff * 2**k seconds. encoding: "png" (smaller) or "uint8" (no codec).
    """

    differentiable = False

    def __init__(self, url: str, *, name: str = "remote", input: str = "pixels", batch_size: Optional[int] = 16,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 0.5, encoding: str = "png",
                 headers: Optional[Dict[str, str]] = None):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url must be an http(s) URL (got {url!r})")
        if input not in INPUTS:
            raise ValueError(f"input must be one of {INPUTS} (got {input!r})")
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS} (got {encoding!r})")
        if not (timeout > 0 and isinstance(retries, int) and retries >= 0 and backoff >= 0):
            raise ValueError(f"need timeout > 0, retries >= 0, backoff >= 0 (got {timeout}, {retries}, {backoff})")
        self.url, self.name, self.input = url, name, input
        self.batch_size, self.timeout, self.retries, self.backoff = batch_size, float(timeout), retries, float(backoff)
        self.encoding, self.headers = encoding, dict(headers or {})
        self.device = torch.device("cpu")

    def _where(self) -> str:
        return f"remote reward {self.name!r} at {self.url}"

    def _request(self, url: str, body: Optional[bytes]) -> bytes:
        headers = {"Content-Type": "application/json", **self.headers}
        attempts, last, kind = 1 + self.retries, "", "connect"
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return resp.read()
            except urllib.error.HTTPError as exc:
                text = exc.read().decode("utf-8", "replace")
                try:
                    detail = json.loads(text).get("error", text)
                except (ValueError, AttributeError):
                    detail = text
                if exc.code in RETRY_STATUS:
                    kind, last = "status", f"HTTP {exc.code}: {str(detail)[:300]}"
                    continue
                raise RemoteRewardError(f"{self._where()} answered HTTP {exc.code}: {str(detail)[:2000]}") from None
            except (socket.timeout, TimeoutError):
                kind = "timeout"
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, (socket.timeout, TimeoutError)):
                    kind = "timeout"
                else:
                    kind, last = "connect", f"{exc.reason}"
            except (ConnectionError, http.client.HTTPException) as exc:
                kind, last = "connect", f"{type(exc).__name__}: {exc}"
        if kind == "timeout":
            raise RemoteRewardError(f"{self._where()} timed out: no answer within timeout={self.timeout:g} s on any of "
                                    f"{attempts} attempts; raise timeout= or lower batch_size=")
        if kind == "status":
            raise RemoteRewardError(f"{self._where()} is unavailable: still {last} after {attempts} attempts")
        raise RemoteRewardError(f"{self._where()} is unreachable after {attempts} attempts ({last}); is the server "
                                "running? `flowsteer serve-reward --reward SPEC --port PORT` serves a local reward")

    def health(self) -> Dict[str, Any]:
        """The server's GET /health answer: its reward's name, input and batch size."""
        base = self.url.rstrip("/")
        base = base[: -len("/score")] if base.endswith("/score") else base
        return json.loads(self._request(base + "/health", None))

    def forward(self, x, prompts, meta):
        n = x.shape[0]
        payload: Dict[str, Any] = {"name": self.name, "n": n, "prompts": prompts}
        if self.input == "pixels":
            payload["images"] = encode_pixels(x, self.encoding)
        else:
            payload["latents"] = encode_latents(x)
        try:
            payload["meta"] = json.loads(json.dumps(meta, default=_jsonable))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{self._where()}: meta must be JSON-serialisable ({exc})") from None
        raw = self._request(self.url, json.dumps(payload).encode("utf-8"))
        return self._parse(raw, n)

    def _parse(self, raw: bytes, n: int):
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise RemoteRewardError(f"{self._where()} returned a response that is not JSON: {raw[:200]!r}") from None
        if not isinstance(body, dict) or "rewards" not in body:
            raise RemoteRewardError(f"{self._where()} returned JSON without a 'rewards' field: {str(body)[:200]}")
        rewards = body["rewards"]
        if isinstance(rewards, dict):
            return {k: self._values(v, n, f"rewards[{k!r}]") for k, v in rewards.items()}
        return self._values(rewards, n, "rewards")

    def _values(self, values, n: int, label: str) -> Tensor:
        if not isinstance(values, list):
            raise RemoteRewardError(f"{self._where()} returned {label} as {type(values).__name__}; expected a list of {n} numbers")
        if len(values) != n:
            raise RemoteRewardError(f"{self._where()} returned {len(values)} values in {label} for {n} samples")
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise RemoteRewardError(f"{self._where()} returned {v!r} at {label}[{i}]; expected finite numbers")
        return torch.tensor(values, dtype=torch.float32)


# -------------------------------------------------------------------------------------- server


class _Handler(BaseHTTPRequestHandler):
    server: "_RewardHTTPServer"

    def log_message(self, fmt, *args):
        if self.server.verbose:
            super().log_message(fmt, *args)

    def _send(self, code: int, obj: Dict[str, Any]) -> None:
        body = json.dumps(obj).encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.rstrip("/") in ("/health", ""):
            r = self.server.reward
            self._send(200, {"name": r.name, "input": r.input, "batch_size": r.batch_size, "status": "ok"})
        else:
            self._send(404, {"error": f"no such endpoint {self.path!r}; POST / or /score, GET /health"})

    def do_POST(self):
        if self.path.rstrip("/") not in ("", "/score"):
            self._send(404, {"error": f"no such endpoint {self.path!r}; POST / or /score"})
            return
        r = self.server.reward
        try:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length))
            if not isinstance(body, dict):
                raise ValueError("the request body must be a JSON object")
            field = "images" if r.input == "pixels" else "latents"
            if field not in body:
                raise ValueError(f"reward {r.name!r} takes {r.input}: the request needs a {field!r} field")
            x = decode_pixels(body[field]) if field == "images" else decode_latents(body[field])
            if "n" in body and body["n"] != x.shape[0]:
                raise ValueError(f"n = {body['n']} but {field} holds {x.shape[0]} samples")
        except (ValueError, TypeError, KeyError, OSError) as exc:
            self._send(400, {"error": f"bad request: {exc}"})
            return
        try:
            with self.server.lock:
                out = r(x, body.get("prompts"), body.get("meta"))
        except Exception as exc:  # the reward's own error goes back to the client verbatim
            self._send(500, {"error": f"reward {r.name!r} raised {type(exc).__name__}: {exc}"})
            return
        rewards = {k: v.tolist() for k, v in out.items()} if isinstance(out, dict) else out.tolist()
        self._send(200, {"rewards": rewards})


class _RewardHTTPServer(ThreadingHTTPServer):
    daemon_threads = True


class RewardServer:
    """A running reward server; `url`, `shutdown()`, and a context manager that shuts it down."""

    def __init__(self, reward: Reward, host: str = "127.0.0.1", port: int = 0, verbose: bool = False):
        self.reward = reward
        self.httpd = _RewardHTTPServer((host, port), _Handler)
        self.httpd.reward, self.httpd.verbose, self.httpd.lock = reward, verbose, threading.Lock()
        self.host, self.port = self.httpd.server_address[:2]
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
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.thread.join()
        self.httpd.server_close()

    def __enter__(self) -> "RewardServer":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def serve(reward, host: str = "127.0.0.1", port: int = 0, *, verbose: bool = False) -> RewardServer:
    """Serve `reward` (a Reward, or a callable taken as a pixel reward) over HTTP in a background
    thread; port 0 picks a free port (see `.url`). Requests run one at a time."""
    if not isinstance(reward, Reward):
        if not callable(reward):
            raise TypeError(f"reward must be a flowsteer Reward or a callable (got {type(reward).__name__})")
        reward = FunctionReward(reward)
    return RewardServer(reward, host, port, verbose=verbose).start()


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


def serve_main(argv: Optional[Sequence[str]] = None) -> int:
    """`flowsteer serve-reward`: serve a local reward over HTTP until interrupted."""
    p = argparse.ArgumentParser(prog="flowsteer serve-reward", description=serve_main.__doc__)
    p.add_argument("--reward", required=True,
                   help="a built-in (jpeg, jpeg_incompressibility, clip_score, pickscore, aesthetic, hpsv2, ocr) or "
                        "module:attr (a Reward, a Reward class or factory, or a function fn(x, prompts, meta))")
    p.add_argument("--reward-kwargs", default="{}", help='JSON keyword arguments for the reward, e.g. \'{"path": "/models/clip"}\'')
    p.add_argument("--name", default=None, help="the reward's name (default: its own)")
    p.add_argument("--input", choices=INPUTS, default="pixels", help="for plain functions: what they score")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--batch-size", type=int, default=None, help="samples per forward of the reward")
    p.add_argument("--verbose", action="store_true", help="log every request")
    args = p.parse_args(argv)
    try:
        kwargs = json.loads(args.reward_kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        p.error(f"--reward-kwargs must be a JSON object ({exc})")
    try:
        reward = load_reward(args.reward, kwargs, input=args.input, name=args.name, batch_size=args.batch_size)
    except (ValueError, TypeError, ImportError, FileNotFoundError) as exc:
        print(f"flowsteer serve-reward: {exc}", file=sys.stderr)
        return 2
    server = RewardServer(reward, args.host, args.port, verbose=args.verbose)
    print(f"serving reward {reward.name!r} ({reward.input}) at {server.url}", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(serve_main())
