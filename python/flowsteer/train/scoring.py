"""Rewards off the critical path: a rollout sampled in chunks, each chunk scored in a background
thread while the next one is sampled, with retries for rewards that time out.

The chunks' samples are those the whole batch would have had (per-sample noise), so a pipelined
iteration computes what the plain one does; only the wall time changes, from rollout + reward to
about max(rollout, reward) + the last chunk's scoring.
"""
from __future__ import annotations

import collections
import concurrent.futures
import socket
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional

import torch

from .config import ScoringConfig

Tensor = torch.Tensor


def _transient(exc: BaseException) -> bool:
    """A failure worth another attempt: a timeout or a lost connection (a remote reward's server
    restarting, a judge overloaded), never a bug in the reward or bad input."""
    from ..rewards.remote import RemoteRewardError

    if isinstance(exc, (TimeoutError, socket.timeout, ConnectionError)):
        return True
    return isinstance(exc, RemoteRewardError) and exc.transient


class RewardFailed(RuntimeError):
    """A reward kept failing after scoring.retries retries; the iteration was not applied."""


class RewardScorer:
    """Calls score(...) with retries, inline or in one background thread (queue_depth pending
    chunks at most), and keeps the latency of each call and the queue depth it saw."""

    def __init__(self, cfg: ScoringConfig, sleep: Callable[[float], None] = time.sleep):
        self.cfg, self.sleep = cfg, sleep
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._lock = threading.Lock()
        self.latencies: List[float] = []
        self.retried = 0
        self.max_queue = 0

    def reset_stats(self) -> None:
        self.latencies, self.retried, self.max_queue = [], 0, 0

    def call(self, score: Callable[[], Any]) -> Any:
        """score() with retries after a transient failure (backoff_s, 2 backoff_s, ...)."""
        attempts = 1 + self.cfg.retries
        for k in range(attempts):
            t0 = time.perf_counter()
            try:
                out = score()
            except Exception as exc:  # noqa: BLE001 -- re-raised unless transient
                if not _transient(exc):
                    raise
                if k + 1 == attempts:
                    raise RewardFailed(f"the reward failed {attempts} times ({type(exc).__name__}: {exc}); after "
                                       f"scoring.retries = {self.cfg.retries} retries the iteration is abandoned and "
                                       "nothing of it is applied") from exc
                with self._lock:
                    self.retried += 1
                self.sleep(self.cfg.backoff_s * 2**k)
                continue
            with self._lock:
                self.latencies.append(time.perf_counter() - t0)
            return out
        raise AssertionError("unreachable")

    def pipeline(self, chunks: List[Any], produce: Callable[[Any], Any], score: Callable[[Any], Any]):
        """[(produced, scored)] for each chunk: produce(chunk) on this thread, score(produced) on
        the background thread while the next chunk is produced."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="flowsteer-reward")
        pending: collections.deque = collections.deque()
        produced: List[Any] = []
        scored: List[Any] = []
        try:
            for chunk in chunks:
                item = produce(chunk)
                produced.append(item)
                while len(pending) >= self.cfg.queue_depth:  # back-pressure: never more than queue_depth waiting
                    scored.append(pending.popleft().result())
                pending.append(self._pool.submit(self.call, lambda item=item: score(item)))
                self.max_queue = max(self.max_queue, len(pending))
            while pending:
                scored.append(pending.popleft().result())
        finally:
            for f in pending:  # an error: wait for what was started, keep nothing
                f.cancel()
            for f in pending:
                try:
                    f.result()
                except Exception:  # noqa: BLE001 -- the first error is the one raised
                    pass
        return list(zip(produced, scored))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def cat_rollouts(parts: List[Any]):
    """One Rollout of the chunks' rollouts (prompts in order; group ids and prompt indices offset)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    offsets, n = [], 0
    for p in parts:
        offsets.append(n)
        n += int(p.prompt_index.max()) + 1 if p.prompt_index.numel() else 0
    steps = list(first.steps)
    consecutive = bool(steps) and steps == list(range(steps[0], steps[0] + len(steps)))
    if consecutive:  # one [N, S + 1, ...] trajectory, as sample keeps it
        traj = torch.cat([torch.cat([p.latents, p.next_latents[:, -1:]], dim=1) for p in parts])
        latents, next_latents = traj[:, :-1], traj[:, 1:]
    else:
        latents = torch.cat([p.latents for p in parts])
        next_latents = torch.cat([p.next_latents for p in parts])

    def cat_opt(name):
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values)

    cond: Dict[str, Any] = {}
    for k, v in first.cond.items():
        cond[k] = torch.cat([p.cond[k] for p in parts]) if torch.is_tensor(v) else v
    prompt_index = torch.cat([p.prompt_index + o for p, o in zip(parts, offsets)])
    return replace(first, latents=latents, next_latents=next_latents, log_probs=torch.cat([p.log_probs for p in parts]),
                   final_latents=torch.cat([p.final_latents for p in parts]), images=cat_opt("images"),
                   prompts=[q for p in parts for q in p.prompts], prompt_index=prompt_index,
                   group_ids=torch.cat([p.group_ids + o for p, o in zip(parts, offsets)]), cond=cond,
                   guidance=cat_opt("guidance"), guidance_coef=cat_opt("guidance_coef"))
