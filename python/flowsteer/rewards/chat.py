"""VLM judges behind the OpenAI-compatible chat API (vLLM, SGLang, LMDeploy, TGI, OpenAI itself):
`ChatJudge`, a pointwise reward, and `ChatPairwiseJudge`, an A/B judge for `WinRateReward`.

One request per sample (per pair), at most `concurrency` at a time. Images go as base64 data URLs
in `image_url` parts, videos as up to `max_frames` evenly spaced frames; the text part is the
template with "{prompt}" replaced by the sample's prompt. The score is read from the reply by a
named parse rule (see `ReplyParser`). A reply that cannot be read is counted (`parse_failures`,
`last_log`) and logged (logger "flowsteer.rewards.chat"), and never passes for a score:
`ChatJudge` raises by default or uses the `on_parse_error` value you chose; `ChatPairwiseJudge`
returns NaN, which the pairwise protocol reads as "unparseable" and ops.win_rate counts as a tie.

Transport (remote.request): each attempt ends within `timeout` seconds in all, 408/429/5xx and
lost connections are retried with exponential backoff (or the server's Retry-After), answers are
capped at `max_response_bytes`, redirects go only to the same origin, and every failure is a
RemoteRewardError that names the judge and its URL.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import math
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .base import Reward, RewardError, to_uint8_hwc
from .remote import (DEFAULT_MAX_RESPONSE_BYTES, RemoteRewardError, _check_client_numbers, _short, bearer_headers,
                     check_url, request)

Tensor = torch.Tensor
logger = logging.getLogger("flowsteer.rewards.chat")

PARSE_RULES = ("number", "last_number", "json", "regex", "choice")
# Chat servers answer 5xx for transient trouble (an engine restart, a full queue), so all of them
# are retried, with 408 and 429.
CHAT_RETRY_STATUS = (408, 429) + tuple(range(500, 600))
IMAGE_FORMATS = ("png", "jpeg")
PAIRWISE_TEMPLATE = ('Image A and Image B were generated for the prompt: "{prompt}". Which image follows the prompt '
                     "better and has higher visual quality? Answer with exactly one word: A, B, or tie.")
PAIRWISE_CHOICES = {"A": 1.0, "B": 0.0, "tie": 0.5}

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


# ------------------------------------------------------------------------------------- parsing


class ReplyParser:
    """Reads a number from a judge's reply. `parser(reply) -> (value, None)` or `(None, reason)`.

    Rules (`parse=`):
        "number": the whole reply, stripped, is a number ("7", "-0.5", "8e-1").
        "last_number": the last number anywhere in the reply ("Score: 7/10" gives 10; use a regex
            for such replies). Reasoning before the answer is fine.
        "json": a JSON object, the whole reply or a ```json fenced block or the span from the first
            "{" to the last "}"; the value at `field` (default "score").
        "regex": re.search(pattern, reply) with DOTALL; group 1 if the pattern has groups, else the
            whole match.
        "choice": the reply, stripped of spaces, quotes, asterisks and a final period, is one of
            `choices` (case-insensitive), e.g. {"yes": 1, "no": 0}.
        a callable reply -> number, or None (or an exception) when it cannot read the reply.
    With `choices`, the text that "json" and "regex" find is looked up in them (case-insensitive);
    otherwise it must be a number. `score_range=(lo, hi)` makes values outside [lo, hi] failures.
    """

    def __init__(self, parse: Union[str, Callable[[str], Optional[float]]] = "number", *, field: str = "score",
                 pattern: Optional[str] = None, choices: Optional[Mapping[str, float]] = None,
                 score_range: Optional[Tuple[float, float]] = None):
        if not callable(parse) and parse not in PARSE_RULES:
            raise ValueError(f"parse must be one of {PARSE_RULES} or a callable reply -> float (got {parse!r})")
        if parse == "regex":
            if not isinstance(pattern, str):
                raise ValueError("parse='regex' needs pattern=, a regular expression whose group 1 is the score")
            try:
                self.regex = re.compile(pattern, re.S)
            except re.error as exc:
                raise ValueError(f"pattern {pattern!r} is not a regular expression ({exc})") from None
        elif pattern is not None:
            raise ValueError(f"pattern= is only read with parse='regex' (parse is {parse!r})")
        if parse == "json" and not (isinstance(field, str) and field):
            raise ValueError(f"parse='json' needs field=, the key that holds the score (got {field!r})")
        if parse == "choice" and not choices:
            raise ValueError("parse='choice' needs choices=, e.g. {'yes': 1.0, 'no': 0.0}")
        self.choices = None
        if choices is not None:
            if not isinstance(choices, Mapping) or not choices:
                raise ValueError(f"choices must be a non-empty dict of str -> number (got {choices!r})")
            self.choices = {}
            for key, value in choices.items():
                if not isinstance(key, str) or not key.strip() or not _finite(value):
                    raise ValueError(f"choices must map non-empty strings to finite numbers (got {key!r}: {value!r})")
                self.choices[key.strip().casefold()] = float(value)
        if score_range is not None:
            lo, hi = score_range
            if not (_finite(lo) and _finite(hi) and lo <= hi):
                raise ValueError(f"score_range must be (lo, hi) with finite lo <= hi (got {score_range!r})")
        self.parse, self.field, self.pattern, self.score_range = parse, field, pattern, score_range

    def describe(self) -> str:
        if callable(self.parse):
            return f"parse={getattr(self.parse, '__name__', 'callable')}"
        extra = {"json": f", field={self.field!r}", "regex": f", pattern={self.pattern!r}"}.get(self.parse, "")
        return f"parse={self.parse!r}{extra}"

    def __call__(self, reply: str) -> Tuple[Optional[float], Optional[str]]:
        try:
            value = self._read(reply)
        except _NoScore as exc:
            return None, str(exc)
        except Exception as exc:  # a user's parse function failing is a failed parse, not a crash
            return None, f"{type(exc).__name__}: {exc}"
        if value is None:
            return None, "the parse function returned None"
        if not _finite(value):
            return None, f"{_short(value, 50)} is not a finite number"
        value = float(value)
        if self.score_range is not None and not (self.score_range[0] <= value <= self.score_range[1]):
            return None, f"{value:g} is outside score_range={tuple(self.score_range)}"
        return value, None

    def _read(self, reply: str):
        if callable(self.parse):
            return self.parse(reply)
        if self.parse == "number":
            text = reply.strip()
            if not re.fullmatch(_NUMBER, text):
                raise _NoScore("the reply is not just a number")
            return float(text)
        if self.parse == "last_number":
            found = re.findall(_NUMBER, reply)
            if not found:
                raise _NoScore("no number in the reply")
            return float(found[-1])
        if self.parse == "json":
            obj = _json_object(reply)
            if self.field not in obj:
                raise _NoScore(f"the JSON object has no {self.field!r} (keys: {list(obj)[:10]})")
            return self._token(obj[self.field])
        if self.parse == "regex":
            m = self.regex.search(reply)
            if m is None:
                raise _NoScore("the pattern does not match")
            return self._token(m.group(1) if self.regex.groups else m.group(0))
        return self._token(reply.strip().strip("\"'`*").rstrip(".").strip())  # "choice"

    def _token(self, token):
        if self.choices is not None:
            key = str(token).strip().casefold()
            if key not in self.choices:
                raise _NoScore(f"{_short(token, 50)} is none of the choices {list(self.choices)}")
            return self.choices[key]
        if isinstance(token, bool):
            raise _NoScore(f"{token} is not a number")
        if isinstance(token, (int, float)):
            return token
        if isinstance(token, str) and re.fullmatch(_NUMBER, token.strip()):
            return float(token)
        raise _NoScore(f"{_short(token, 50)} is not a number")


class _NoScore(Exception):
    pass


def _finite(value) -> bool:
    try:
        return not isinstance(value, bool) and math.isfinite(float(value))
    except (TypeError, ValueError, OverflowError):
        return False


def _json_object(reply: str) -> Dict[str, Any]:
    candidates = [reply.strip()] + [m.strip() for m in _FENCE.findall(reply)]
    start, stop = reply.find("{"), reply.rfind("}")
    if 0 <= start < stop:
        candidates.append(reply[start:stop + 1])
    for text in candidates:
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            return obj
    raise _NoScore("no JSON object in the reply")


# ------------------------------------------------------------------------------------- request


def image_data_url(image: Tensor, image_format: str = "png") -> str:
    """image: [3, H, W] in [0, 1] -> "data:image/png;base64,..." (uint8, rounded as everywhere here)."""
    from .._optional import require

    Image = require("PIL.Image", "rewards", "ChatJudge / ChatPairwiseJudge (images sent as PNG or JPEG data URLs)")

    arr = to_uint8_hwc(image[None].float())[0]
    buf = io.BytesIO()
    if image_format == "jpeg":
        Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    else:
        Image.fromarray(arr).save(buf, format="PNG")
    return f"data:image/{image_format};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


class _ChatClient:
    """What ChatJudge and ChatPairwiseJudge share: the endpoint, the request and the pool."""

    def _setup(self, base_url, model, prompt_template, parser: ReplyParser, *, name, api_key, api_key_env, system,
               temperature, max_tokens, extra_body, max_frames, image_format, concurrency, timeout, retries, backoff,
               max_response_bytes, headers) -> None:
        check_url(base_url, "base_url")
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be the served model's name, a non-empty str (got {model!r})")
        if not isinstance(prompt_template, str) or not prompt_template.strip():
            raise ValueError("prompt_template must be a non-empty str; '{prompt}' in it is replaced by the prompt")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS} (got {image_format!r})")
        for label, value in (("max_frames", max_frames), ("concurrency", concurrency)):
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise ValueError(f"{label} must be a positive int (got {value!r})")
        if max_tokens is not None and not (isinstance(max_tokens, int) and max_tokens > 0):
            raise ValueError(f"max_tokens must be a positive int or None (got {max_tokens!r})")
        if not _finite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a number >= 0 (got {temperature!r})")
        if extra_body is not None and not isinstance(extra_body, Mapping):
            raise ValueError(f"extra_body must be a dict of more request fields (got {type(extra_body).__name__})")
        _check_client_numbers(timeout, retries, backoff, max_response_bytes)
        base = base_url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model, self.prompt_template, self.parser, self.name = model, prompt_template, parser, name
        self.system, self.temperature, self.max_tokens = system, float(temperature), max_tokens
        self.extra_body = dict(extra_body or {})
        self.max_frames, self.image_format, self.concurrency = max_frames, image_format, concurrency
        self.timeout, self.retries, self.backoff = float(timeout), retries, float(backoff)
        self.max_response_bytes = max_response_bytes
        self.headers = {"Content-Type": "application/json", "Accept": "application/json", **dict(headers or {}),
                        **bearer_headers(api_key, api_key_env, "api_key")}
        self.requests = self.retries_used = self.parse_failures = 0
        self.last_log: Dict[str, float] = {}
        self.last_replies: List[str] = []

    def _where(self) -> str:
        return f"chat judge {self.name!r} at {self.url}"

    def _text(self, prompt: Optional[str]) -> str:
        if "{prompt}" in self.prompt_template:
            if prompt is None:
                raise ValueError(f"judge {self.name!r}: prompt_template uses {{prompt}} but no prompts were given")
            return self.prompt_template.replace("{prompt}", prompt)
        return self.prompt_template

    def _images(self, x: Tensor) -> List[Dict[str, Any]]:
        """x: [3, H, W] or a video [3, F, H, W] -> image_url parts (up to max_frames frames, evenly spaced)."""
        if x.ndim == 3:
            frames = [x]
        else:
            f = x.shape[1]
            idx = range(f) if f <= self.max_frames else torch.linspace(0, f - 1, self.max_frames).round().long().tolist()
            frames = [x[:, i] for i in idx]
        return [{"type": "image_url", "image_url": {"url": image_data_url(fr, self.image_format)}} for fr in frames]

    def _body(self, content: List[Dict[str, Any]]) -> bytes:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + \
            [{"role": "user", "content": content}]
        body = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        body.update(self.extra_body)
        return json.dumps(body).encode("utf-8")

    def _complete(self, content: List[Dict[str, Any]]) -> Tuple[str, int]:
        """One chat completion: (the reply's text, attempts used)."""
        raw, attempts = request(self.url, self._body(content), self.headers, where=self._where(), timeout=self.timeout,
                                retries=self.retries, backoff=self.backoff, max_response_bytes=self.max_response_bytes,
                                retry_status=CHAT_RETRY_STATUS,
                                hint="; is the server running? `vllm serve MODEL --port 8000` answers at "
                                     "http://HOST:8000/v1")
        return self._reply_text(raw), attempts

    def _reply_text(self, raw: bytes) -> str:
        try:
            body = json.loads(raw)
        except RecursionError:
            raise RemoteRewardError(f"{self._where()} returned JSON nested too deeply to read") from None
        except Exception:
            raise RemoteRewardError(f"{self._where()} returned a response that is not JSON: {raw[:200]!r}") from None
        try:
            message = body["choices"][0]["message"]
            content = message.get("content")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise RemoteRewardError(f"{self._where()} returned JSON without choices[0].message: {_short(body)}") from None
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        if content is None:  # no text at all (e.g. cut off by max_tokens while reasoning): a failed parse
            return ""
        if not isinstance(content, str):
            raise RemoteRewardError(f"{self._where()} returned message content of type {type(content).__name__}: "
                                    f"{_short(content)}")
        return content

    def _complete_all(self, contents: List[List[Dict[str, Any]]]) -> List[str]:
        """Replies to all requests, at most `concurrency` in flight; the first failure cancels the
        requests not yet started and is raised."""
        if not contents:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(contents)),
                                thread_name_prefix=f"chat-judge-{self.name}") as pool:
            futures = [pool.submit(self._complete, c) for c in contents]
            try:
                results = [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        self.requests += len(results)
        used = sum(a - 1 for _, a in results)
        self.retries_used += used
        self.last_replies = [r for r, _ in results]
        self.last_log = {f"judge/{self.name}/requests": float(len(results)), f"judge/{self.name}/retries": float(used)}
        return self.last_replies

    def _failed(self, failures: List[Tuple[int, str, str]], total: int, unit: str) -> None:
        """Counts and logs the replies that could not be read: (index, reason, reply)."""
        self.parse_failures += len(failures)
        self.last_log[f"judge/{self.name}/parse_failures"] = float(len(failures))
        self.last_log[f"judge/{self.name}/parse_failure_frac"] = len(failures) / max(total, 1)
        for i, why, reply in failures:
            logger.warning("judge %r: could not read a score from the reply for %s %d (%s; %s): %r", self.name, unit,
                           i, why, self.parser.describe(), reply[:300])


def _check_on_parse_error(value):
    if value == "raise":
        return value
    if isinstance(value, str) or not _finite(value):
        raise ValueError(f"on_parse_error must be 'raise' or a finite number to use instead, counted and logged (got "
                         f"{value!r}); NaN is not allowed, the reward checks reject it")
    return float(value)


# ---------------------------------------------------------------------------------- the judges


class ChatJudge(_ChatClient, Reward):
    """A pointwise reward: a VLM behind an OpenAI-compatible chat API scores each sample.

    Args:
        base_url: the API root, e.g. "http://127.0.0.1:8000/v1" (…/chat/completions is added).
        model: the served model's name (vLLM: the path or --served-model-name).
        prompt_template: the user text; "{prompt}" is replaced by the sample's prompt, and no other
            braces are special (JSON examples need no escaping).
        parse: how the score is read from the reply: "number", "last_number", "json" (with
            field=), "regex" (with pattern=), "choice" (with choices=), or a callable; see
            ReplyParser. choices: text -> score. score_range: (lo, hi); other values are failures.
        on_parse_error: "raise" (default): a reply that cannot be read raises RewardError after the
            batch, naming the sample and quoting the reply. A number: used for such samples instead
            (your choice of value), each one counted in `parse_failures` and `last_log` and logged.
        api_key / api_key_env: a bearer key, or the environment variable that holds it.
        system: an optional system message. temperature (default 0), max_tokens (None: the
            server's default), extra_body: more request fields (e.g. {"top_p": 1.0}).
        max_frames: frames sent per video [3, F, H, W], evenly spaced (default 8).
        image_format: "png" (lossless, default) or "jpeg" (quality 95, smaller).
        concurrency: requests in flight at once (default 8).
        timeout: seconds per attempt in all (default 120); retries (default 3) after 408, 429, 5xx
            or a lost connection, waiting backoff * 2**k s (default 1) or the server's Retry-After;
            max_response_bytes: the largest answer read (default 16 MiB).
    Inputs: pixels [N, 3, H, W] or videos [N, 3, F, H, W] in [0, 1]. Output: fp32 [N].
    `last_replies` keeps the last batch's replies; `requests`, `retries_used` and `parse_failures`
    count over the judge's life.
    """

    input = "pixels"
    differentiable = False

    def __init__(self, base_url: str, model: str, prompt_template: str,
                 parse: Union[str, Callable[[str], Optional[float]]] = "number", *, field: str = "score",
                 pattern: Optional[str] = None, choices: Optional[Mapping[str, float]] = None,
                 score_range: Optional[Tuple[float, float]] = None, on_parse_error: Union[str, float] = "raise",
                 api_key: Optional[str] = None, api_key_env: Optional[str] = None, system: Optional[str] = None,
                 temperature: float = 0.0, max_tokens: Optional[int] = None, extra_body: Optional[Mapping] = None,
                 max_frames: int = 8, image_format: str = "png", concurrency: int = 8, timeout: float = 120.0,
                 retries: int = 3, backoff: float = 1.0, max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
                 headers: Optional[Dict[str, str]] = None, name: str = "chat_judge", batch_size: Optional[int] = None):
        parser = ReplyParser(parse, field=field, pattern=pattern, choices=choices, score_range=score_range)
        self._setup(base_url, model, prompt_template, parser, name=name, api_key=api_key, api_key_env=api_key_env,
                    system=system, temperature=temperature, max_tokens=max_tokens, extra_body=extra_body,
                    max_frames=max_frames, image_format=image_format, concurrency=concurrency, timeout=timeout,
                    retries=retries, backoff=backoff, max_response_bytes=max_response_bytes, headers=headers)
        if batch_size is not None and not (isinstance(batch_size, int) and batch_size > 0):
            raise ValueError(f"batch_size must be a positive int or None (got {batch_size!r})")
        self.on_parse_error = _check_on_parse_error(on_parse_error)
        self.batch_size = batch_size
        self.device = torch.device("cpu")

    def forward(self, x, prompts, meta):
        n = x.shape[0]
        contents = [self._images(x[i]) + [{"type": "text", "text": self._text(None if prompts is None else prompts[i])}]
                    for i in range(n)]
        replies = self._complete_all(contents)
        values, failures = [], []
        for i, reply in enumerate(replies):
            value, why = self.parser(reply)
            if value is None:
                failures.append((i, why, reply))
            values.append(value)
        self._failed(failures, n, "sample")
        if failures and self.on_parse_error == "raise":
            i, why, reply = failures[0]
            raise RewardError(f"reward {self.name!r}: could not read a score from {len(failures)} of {n} replies "
                              f"({self.parser.describe()}); sample {i} of the batch: {why}; it replied {reply[:300]!r}. "
                              "Change parse= (or the template) to match the replies, or set on_parse_error= to a "
                              "value to use instead")
        return torch.tensor([self.on_parse_error if v is None else v for v in values], dtype=torch.float32)


class ChatPairwiseJudge(_ChatClient):
    """An A/B judge behind an OpenAI-compatible chat API, for WinRateReward (Pref-GRPO).

    judge(image_a, image_b, prompt) -> 1 (A is better), 0 (B is better), 0.5 (a tie) or NaN (the
    reply could not be read: counted, logged, and a tie to ops.win_rate); judge.batch(images_a
    [P, ...], images_b [P, ...], prompts) -> fp32 [P], at most `concurrency` requests in flight.

    The request holds image_labels[0] (default "Image A:"), A's image (or video frames),
    image_labels[1], B's, then the template with "{prompt}" filled in (image_labels=None sends the
    images alone). The default template asks for one word, A, B or tie, read by parse="choice" with
    choices {"A": 1, "B": 0, "tie": 0.5}; any parse rule of ReplyParser works, and a value other
    than 0, 0.5 or 1 counts as a failed parse.

    both_orders=True asks each pair twice, A/B and B/A, to cancel position bias: when the two
    verdicts agree (v and 1 - v) that is the verdict, when they disagree it is a tie (0.5), and when
    either reply cannot be read it is NaN. (WinRateReward already judges both (i, j) and (j, i), so
    there position bias cancels in the win rates; both_orders makes each verdict order-free.)
    Other arguments as ChatJudge.
    """

    def __init__(self, base_url: str, model: str, prompt_template: str = PAIRWISE_TEMPLATE,
                 parse: Union[str, Callable[[str], Optional[float]]] = "choice", *,
                 choices: Optional[Mapping[str, float]] = None, field: str = "verdict", pattern: Optional[str] = None,
                 both_orders: bool = False, image_labels: Optional[Tuple[str, str]] = ("Image A:", "Image B:"),
                 api_key: Optional[str] = None, api_key_env: Optional[str] = None, system: Optional[str] = None,
                 temperature: float = 0.0, max_tokens: Optional[int] = None, extra_body: Optional[Mapping] = None,
                 max_frames: int = 8, image_format: str = "png", concurrency: int = 8, timeout: float = 120.0,
                 retries: int = 3, backoff: float = 1.0, max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
                 headers: Optional[Dict[str, str]] = None, name: str = "chat_pairwise_judge"):
        if choices is None and parse == "choice":
            choices = PAIRWISE_CHOICES
        parser = ReplyParser(parse, field=field, pattern=pattern, choices=choices)
        self._setup(base_url, model, prompt_template, parser, name=name, api_key=api_key, api_key_env=api_key_env,
                    system=system, temperature=temperature, max_tokens=max_tokens, extra_body=extra_body,
                    max_frames=max_frames, image_format=image_format, concurrency=concurrency, timeout=timeout,
                    retries=retries, backoff=backoff, max_response_bytes=max_response_bytes, headers=headers)
        if image_labels is not None and not (isinstance(image_labels, (tuple, list)) and len(image_labels) == 2
                                             and all(isinstance(s, str) for s in image_labels)):
            raise ValueError(f"image_labels must be two strings, e.g. ('Image A:', 'Image B:'), or None (got {image_labels!r})")
        self.both_orders, self.image_labels = bool(both_orders), image_labels

    def __repr__(self) -> str:
        return (f"ChatPairwiseJudge(name={self.name!r}, url={self.url!r}, model={self.model!r}, "
                f"both_orders={self.both_orders})")

    def __call__(self, image_a: Tensor, image_b: Tensor, prompt: str) -> float:
        return float(self.batch(image_a[None], image_b[None], [prompt])[0])

    def _content(self, a: Tensor, b: Tensor, prompt: Optional[str]) -> List[Dict[str, Any]]:
        la, lb = self.image_labels or (None, None)
        parts: List[Dict[str, Any]] = []
        for label, img in ((la, a), (lb, b)):
            if label:
                parts.append({"type": "text", "text": label})
            parts += self._images(img)
        return parts + [{"type": "text", "text": self._text(prompt)}]

    def _verdict(self, reply: str) -> Tuple[Optional[float], Optional[str]]:
        value, why = self.parser(reply)
        if value is not None and value not in (0.0, 0.5, 1.0):
            return None, f"{value:g} is not a verdict (1: A is better, 0: B is better, 0.5: a tie)"
        return value, why

    def batch(self, images_a: Tensor, images_b: Tensor, prompts: Sequence[Optional[str]]) -> Tensor:
        """images_a, images_b: [P, 3, H, W] (or [P, 3, F, H, W]) in [0, 1]; prompts: P strings -> fp32 [P]."""
        if not (isinstance(images_a, Tensor) and isinstance(images_b, Tensor)) or images_a.shape != images_b.shape:
            raise ValueError(f"judge {self.name!r}: images_a and images_b must be tensors of one shape [P, 3, (F,) H, W]")
        p = images_a.shape[0]
        if prompts is None:
            prompts = [None] * p
        if len(prompts) != p:
            raise ValueError(f"judge {self.name!r}: {len(prompts)} prompts for {p} pairs")
        contents = [self._content(images_a[k], images_b[k], prompts[k]) for k in range(p)]
        if self.both_orders:
            contents += [self._content(images_b[k], images_a[k], prompts[k]) for k in range(p)]
        replies = self._complete_all(contents)
        verdicts, failures = [], []
        for k, reply in enumerate(replies):
            value, why = self._verdict(reply)
            if value is None:
                failures.append((k, why, reply))
            verdicts.append(math.nan if value is None else value)
        self._failed(failures, len(replies), "request")
        if self.both_orders:
            verdicts = [_combine(verdicts[k], verdicts[p + k]) for k in range(p)]
        return torch.tensor(verdicts, dtype=torch.float32)


def _combine(ab: float, ba: float) -> float:
    """The verdict on A vs B from A-first (ab) and B-first (ba) answers."""
    if math.isnan(ab) or math.isnan(ba):
        return math.nan
    return ab if ab == 1.0 - ba else 0.5
