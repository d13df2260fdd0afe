"""Rollout throughput with pytest-benchmark: flowsteer.sample against the research-style loop,
and branch mode against full SDE rollouts, on the tiny SD3 pipeline (CPU).

    python -m pytest benches/bench_rollout.py --benchmark-only --benchmark-group-by=group

`flowsteer bench rollout` prints the same comparison as images per second in one run.
"""
import pytest
import torch

import flowsteer
from flowsteer.bench import reference_rollout
from flowsteer.sampler import Branch, RandomWindow, SD3Adapter
from flowsteer.testing.pipelines import tiny_sd3_pipeline

PROMPTS = ["prompt number 0", "prompt number 1"]
SETTINGS = dict(num_steps=10, guidance_scale=4.5, height=16, width=16)


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd3_pipeline(0)


@pytest.mark.parametrize("impl", ["reference_loop", "flowsteer.sample"])
def test_rollout(benchmark, pipe, impl):
    benchmark.group = "rollout tiny SD3, 2 prompts x 8, 10 steps, 16 px"
    benchmark.extra_info.update(device="cpu", images=16, impl=impl)
    if impl == "reference_loop":
        fn = lambda: reference_rollout(pipe, PROMPTS, 8, 10, 4.5, "flow", 0.7, 0, 16, 16)  # noqa: E731
    else:
        model = SD3Adapter(pipe)
        fn = lambda: flowsteer.sample(model, PROMPTS, group_size=8, decode=False, **SETTINGS)  # noqa: E731
    fn()
    benchmark.pedantic(fn, rounds=3, iterations=1)


@pytest.mark.parametrize("window", ["random5", "branch5"])
def test_branch(benchmark, pipe, window):
    """Equal trained steps per image (5 of 10); branch mode shares the first 5 steps per prompt."""
    benchmark.group = "rollout tiny SD3, 2 prompts x 24, 5 of 10 steps trained"
    benchmark.extra_info.update(device="cpu", images=48, window=window)
    win = RandomWindow(5) if window == "random5" else Branch(5)
    model = SD3Adapter(pipe)
    fn = lambda: flowsteer.sample(model, PROMPTS, group_size=24, decode=False, window=win, **SETTINGS)  # noqa: E731
    fn()
    benchmark.pedantic(fn, rounds=3, iterations=1)
