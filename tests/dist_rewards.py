"""Rewards for the multi-process tests (imported by the trainer's processes through PYTHONPATH)."""
import os
import signal
import time

import torch

from flowsteer.rewards import reward

CALLS = {"n": 0}


@reward(name="brightness_or_die", input="pixels")
def brightness_or_die(images, prompts, meta):
    """The brightness; rank KILL_RANK SIGKILLs itself at its KILL_AT-th call (a crashed process)."""
    CALLS["n"] += 1
    if os.environ.get("RANK") == os.environ.get("KILL_RANK") and CALLS["n"] == int(os.environ.get("KILL_AT", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
    return images.float().flatten(1).mean(dim=1)


@reward(name="slow_brightness", input="pixels")
def slow_brightness(images, prompts, meta):
    """The brightness after SLOW_REWARD_S seconds (a judge behind a network)."""
    time.sleep(float(os.environ.get("SLOW_REWARD_S", "0.2")))
    return images.float().flatten(1).mean(dim=1)


def brighter(a: torch.Tensor, b: torch.Tensor, prompt) -> float:
    """A pairwise judge: 1 when a is brighter than b."""
    return float(a.float().mean() > b.float().mean())
