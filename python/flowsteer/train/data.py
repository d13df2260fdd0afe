"""Prompts for training and evaluation, and the resumable order in which they are drawn."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .config import ConfigError


def load_prompts(source: Union[Sequence[str], str, None], key: str) -> Tuple[List[str], Optional[List[Dict[str, Any]]]]:
    """(prompts, metadata or None) from a list, a text file (one prompt a line; blank lines skipped)
    or a .jsonl file of objects with a "prompt" key (the other keys are the prompt's metadata)."""
    if source is None:
        raise ConfigError(f"{key} is not set: give a list of prompts, a text file or a JSONL file")
    if isinstance(source, (list, tuple)):
        prompts = list(source)
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise ConfigError(f"{key}[{i}] must be a non-empty string (got {p!r})")
        if not prompts:
            raise ConfigError(f"{key} is an empty list")
        return prompts, None
    if not os.path.isfile(source):
        raise ConfigError(f"{key}: no such prompts file {source!r}")
    with open(source, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    if source.endswith(".jsonl"):
        prompts, meta = [], []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{key}: {source}:{n} is not valid JSON ({exc})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise ConfigError(f"{key}: {source}:{n} must be a JSON object with a string \"prompt\"")
            prompts.append(obj["prompt"])
            meta.append({k: v for k, v in obj.items() if k != "prompt"})
        if not prompts:
            raise ConfigError(f"{key}: {source} holds no prompts")
        return prompts, meta
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"{key}: {source} holds no prompts")
    return prompts, None


class PromptSampler:
    """An endless stream of prompt indices: epoch e is a permutation of the prompts drawn from
    (seed, e), and the stream is cut into batches in order. The only state is the number of indices
    consumed, so a resumed run draws exactly what the uninterrupted one would have."""

    def __init__(self, num_prompts: int, seed: int):
        if num_prompts < 1:
            raise ValueError("PromptSampler needs at least one prompt")
        self.num_prompts, self.seed, self.consumed = num_prompts, seed, 0
        self._cache: Dict[int, List[int]] = {}

    def _epoch(self, e: int) -> List[int]:
        if e not in self._cache:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + e) % (2**63))
            self._cache = {e: torch.randperm(self.num_prompts, generator=g).tolist()}
        return self._cache[e]

    def next(self, k: int) -> List[int]:
        out = []
        for _ in range(k):
            e, pos = divmod(self.consumed, self.num_prompts)
            out.append(self._epoch(e)[pos])
            self.consumed += 1
        return out

    def state_dict(self) -> Dict[str, int]:
        return {"consumed": self.consumed, "num_prompts": self.num_prompts, "seed": self.seed}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if state["num_prompts"] != self.num_prompts:
            raise ValueError(f"the checkpoint's prompt list had {state['num_prompts']} prompts; this run has "
                             f"{self.num_prompts}")
        self.consumed = int(state["consumed"])
