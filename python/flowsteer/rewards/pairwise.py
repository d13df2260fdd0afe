"""Pairwise judges and the Pref-GRPO group win-rate reward."""
from __future__ import annotations

import math
from typing import Optional, Protocol, runtime_checkable

import torch

from .. import ops
from .base import Reward, RewardError

Tensor = torch.Tensor


@runtime_checkable
class PairwiseJudge(Protocol):
    """judge(image_a, image_b, prompt) -> 1 (a is better), 0 (b is better) or 0.5 (a tie).

    image_a, image_b: [3, H, W] in [0, 1] (or [3, F, H, W] videos). NaN means the judge's answer
    could not be parsed and counts as a tie (ops.win_rate). A judge that can score many pairs at once
    also has `batch(images_a [P, ...], images_b [P, ...], prompts (P)) -> Tensor [P]`.
    """

    def __call__(self, image_a: Tensor, image_b: Tensor, prompt: str) -> float: ...


class WinRateReward(Reward):
    """Pref-GRPO: each sample's reward is its win rate against the other members of its group.

    Samples arrive in groups of `group_size` consecutive samples (one prompt per group, as the
    sampler lays them out). The judge sees every ordered pair (i, j), i != j, of each group:
    G (G - 1) pairs per group, in calls of at most `pair_batch_size` pairs when it has `batch`.
    prefs[m, i, j] is its verdict on i against j, and the reward is ops.win_rate(prefs), flattened
    to [N]. `last_prefs` keeps the [M, G, G] verdicts of the last call (diagonal NaN).
    """

    input = "pixels"

    def __init__(self, judge, group_size: int, *, pair_batch_size: int = 64, name: str = "win_rate"):
        if not callable(judge) and not hasattr(judge, "batch"):
            raise TypeError(f"judge must be callable as judge(image_a, image_b, prompt) (got {type(judge).__name__})")
        if not (isinstance(group_size, int) and group_size >= 2):
            raise ValueError(f"group_size must be an int >= 2 (got {group_size!r})")
        if not (isinstance(pair_batch_size, int) and pair_batch_size > 0):
            raise ValueError(f"pair_batch_size must be a positive int (got {pair_batch_size!r})")
        self.judge = judge
        self.group_size = group_size
        self.pair_batch_size = pair_batch_size
        self.name = name
        self.batch_size = None  # groups must stay whole; the judge is batched over pairs instead
        self.last_prefs: Optional[Tensor] = None

    def _check_verdicts(self, v: Tensor, pairs: Tensor) -> Tensor:
        known = ~torch.isnan(v)
        bad = known & (v != 0) & (v != 0.5) & (v != 1)
        if bool(bad.any()):
            k = int(bad.nonzero()[0])
            i, j = (int(t) for t in pairs[k])
            raise RewardError(f"reward {self.name!r}: the judge returned {float(v[k]):g} for samples ({i}, {j}); "
                              "a judge returns 1 (first wins), 0 (second wins), 0.5 (tie) or NaN (unparseable)")
        return v

    def _judge(self, x: Tensor, pairs: Tensor, prompts) -> Tensor:
        """Verdicts [P] for the pairs [P, 2] of sample indices."""
        out = []
        has_batch = callable(getattr(self.judge, "batch", None))
        for s in range(0, pairs.shape[0], self.pair_batch_size):
            chunk = pairs[s:s + self.pair_batch_size]
            ps = [prompts[int(i)] if prompts is not None else "" for i in chunk[:, 0]]
            if has_batch:
                v = self.judge.batch(x[chunk[:, 0]], x[chunk[:, 1]], ps)
                v = torch.as_tensor(v, dtype=torch.float32).reshape(-1).cpu()
                if v.numel() != chunk.shape[0]:
                    raise RewardError(f"reward {self.name!r}: judge.batch returned {v.numel()} verdicts for "
                                      f"{chunk.shape[0]} pairs")
            else:
                vals = []
                for (i, j), p in zip(chunk.tolist(), ps):
                    r = self.judge(x[i], x[j], p)
                    try:
                        vals.append(float(r))
                    except (TypeError, ValueError):
                        raise RewardError(f"reward {self.name!r}: the judge returned {r!r} for samples ({i}, {j}); "
                                          "a judge returns a number: 1, 0, 0.5 or NaN") from None
                v = torch.tensor(vals, dtype=torch.float32)
            out.append(self._check_verdicts(v, chunk))
        return torch.cat(out)

    def forward(self, x, prompts, meta):
        n, g = x.shape[0], self.group_size
        if n % g:
            raise ValueError(f"reward {self.name!r}: {n} samples do not split into groups of {g}")
        m = n // g
        if prompts is not None:
            for k in range(m):
                if len(set(prompts[k * g:(k + 1) * g])) != 1:
                    raise ValueError(f"reward {self.name!r}: group {k} (samples {k * g}..{(k + 1) * g - 1}) mixes "
                                     "prompts; a group is G consecutive samples of one prompt")
        i, j = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
        off = i != j
        local = torch.stack([i[off], j[off]], dim=1)  # [G (G - 1), 2]
        base = (torch.arange(m) * g).repeat_interleave(local.shape[0])
        pairs = local.repeat(m, 1) + base[:, None]
        verdicts = self._judge(x, pairs, prompts)
        prefs = torch.full((m, g, g), math.nan)
        grp = pairs[:, 0] // g
        prefs[grp, pairs[:, 0] % g, pairs[:, 1] % g] = verdicts
        self.last_prefs = prefs
        return ops.win_rate(prefs).reshape(n).to(x.device)
