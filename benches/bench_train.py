"""Training-step time with pytest-benchmark: a GRPOTrainer iteration, and its training phase
against the research-style step (Flow-GRPO's train_sd3.py), on the tiny SD3 pipeline (CPU).

    python -m pytest benches/bench_train.py --benchmark-only --benchmark-group-by=group

Both training steps start every round from the same weights and optimizer state (restored in
pedantic's untimed setup), and the fixture first checks that they compute the same log-probs, KL
and gradient (flowsteer.bench.check_research_step_matches). flowsteer.bench.bench_train prints the
same comparison in one run.
"""
import pytest

from flowsteer.ops import backends as _backend
from flowsteer.bench import (bench_trainer, check_research_step_matches, fixed_batch, research_step_settings,
                             research_train_step, trainer_snapshot)
from flowsteer.testing.pipelines import tiny_sd3_pipeline

# 2 prompts x 4, 4 steps (3 of them trained: the recipe's timestep_fraction 0.99), 16 px, 16 T5 tokens
SETTINGS = dict(prompts=2, group_size=4, num_steps=4, height=16, width=16, lora_rank=4, max_sequence_length=16)
SHAPES = dict(samples=8, num_steps=4, trained_steps=3, latents=[4, 16, 16], max_sequence_length=16, lora_rank=4)


@pytest.fixture(scope="module")
def trainer():
    trainer = bench_trainer(tiny_sd3_pipeline(0), **SETTINGS)
    trainer.step()  # warm-up, and LoRA weights away from their zero init, so that the KL is not 0
    return trainer


@pytest.fixture(scope="module")
def batch(trainer):
    """One fixed batch, a function restoring the trainer's state of its sampling, and the check."""
    rollout, advantages = fixed_batch(trainer)
    restore = trainer_snapshot(trainer)
    check_research_step_matches(trainer, rollout, advantages)
    return rollout, advantages, restore


def test_iteration(benchmark, trainer):
    benchmark.group = "train iteration tiny SD3, 2 prompts x 4, 4 steps (3 trained), 16 px"
    benchmark.extra_info.update(device=str(trainer.device), sde_backend=_backend.resolve(trainer.device), **SHAPES)
    rows = []
    benchmark.pedantic(lambda: rows.append(trainer.step()), rounds=3, iterations=1)
    for key in ("rollout", "reward", "train"):
        benchmark.extra_info[f"best {key} s"] = min(row[f"time/{key}"] for row in rows)


@pytest.mark.parametrize("impl", ["GRPOTrainer._train_on", "research_train_step"])
def test_train_step(benchmark, trainer, batch, impl):
    """The same trained steps, minibatch (the whole batch), advantages, loss and one AdamW step."""
    rollout, advantages, restore = batch
    benchmark.group = "train step tiny SD3, 8 samples, 3 trained steps, 16 px"
    benchmark.extra_info.update(device=str(trainer.device), sde_backend=_backend.resolve(trainer.device), impl=impl,
                                **SHAPES)
    if impl == "GRPOTrainer._train_on":
        fn = lambda: trainer._train_on(rollout, advantages)  # noqa: E731
    else:
        settings = research_step_settings(trainer, rollout)
        fn = lambda: research_train_step(  # noqa: E731
            trainer.model, rollout, advantages, optimizer=trainer.optimizer, params=trainer.params,
            max_grad_norm=trainer.config.train.max_grad_norm, **settings)
    restore()
    fn()
    benchmark.pedantic(fn, setup=restore, rounds=3, iterations=1)
    restore()
