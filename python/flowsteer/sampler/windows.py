"""SDE window policies: which steps of a rollout are stochastic (and trained), and where branch
mode splits one ODE prefix per prompt into its group."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch


@dataclass
class WindowPlan:
    """stochastic[i]: step i draws noise and is stored for training. branch_at: the step at which
    the per-prompt prefix is expanded into the group (None: no branching)."""

    stochastic: List[bool]
    branch_at: Optional[int] = None


class SDEWindow:
    """Base class: plan(num_steps, iteration, generator) -> WindowPlan."""

    def plan(self, num_steps: int, iteration: int, generator: torch.Generator) -> WindowPlan:
        raise NotImplementedError


class AllSteps(SDEWindow):
    """Every step stochastic (Flow-GRPO, DanceGRPO)."""

    def plan(self, num_steps, iteration, generator):
        return WindowPlan([True] * num_steps)


@dataclass
class RandomWindow(SDEWindow):
    """k consecutive stochastic steps starting at a uniformly drawn step (Flow-GRPO-Fast, MixGRPO);
    the rest are ODE steps. `start_range` limits where the window may start (default: anywhere)."""

    size: int
    start_range: Optional[Tuple[int, int]] = None

    def plan(self, num_steps, iteration, generator):
        _check_size(self.size, num_steps)
        lo, hi = self.start_range if self.start_range is not None else (0, num_steps - self.size)
        if not (0 <= lo <= hi <= num_steps - self.size):
            raise ValueError(f"start_range {self.start_range} must lie in [0, num_steps - size] = [0, {num_steps - self.size}]")
        start = int(torch.randint(lo, hi + 1, (1,), generator=generator))
        return WindowPlan([start <= i < start + self.size for i in range(num_steps)])


@dataclass
class ProgressiveWindow(SDEWindow):
    """MixGRPO's sliding window: k stochastic steps starting at (iteration // every) * stride,
    moving towards the data end as training proceeds, then staying at the last position."""

    size: int
    stride: int = 1
    every: int = 25

    def plan(self, num_steps, iteration, generator):
        _check_size(self.size, num_steps)
        if self.stride < 1 or self.every < 1:
            raise ValueError(f"stride and every must be >= 1 (got stride={self.stride}, every={self.every})")
        start = min((iteration // self.every) * self.stride, num_steps - self.size)
        return WindowPlan([start <= i < start + self.size for i in range(num_steps)])


@dataclass
class Branch(SDEWindow):
    """One ODE prefix per prompt for steps < at, branching into the group at step `at`; steps
    at .. at + size - 1 are stochastic (size None: all the remaining steps), the rest ODE."""

    at: int
    size: Optional[int] = None

    def plan(self, num_steps, iteration, generator):
        if not (isinstance(self.at, int) and 0 <= self.at < num_steps):
            raise ValueError(f"branch step must be in [0, num_steps) = [0, {num_steps}) (got {self.at})")
        size = num_steps - self.at if self.size is None else self.size
        if not (isinstance(size, int) and 1 <= size <= num_steps - self.at):
            raise ValueError(f"branch window size must be in [1, {num_steps - self.at}] after step {self.at} (got {size})")
        return WindowPlan([self.at <= i < self.at + size for i in range(num_steps)], branch_at=self.at)


def _check_size(size, num_steps):
    if not (isinstance(size, int) and 1 <= size <= num_steps):
        raise ValueError(f"window size must be in [1, num_steps] = [1, {num_steps}] (got {size!r})")


def as_window(window: Union[str, SDEWindow]) -> SDEWindow:
    if isinstance(window, SDEWindow):
        return window
    if window == "all":
        return AllSteps()
    raise ValueError(f"window must be 'all' or an SDEWindow (RandomWindow, ProgressiveWindow, Branch); got {window!r}")
