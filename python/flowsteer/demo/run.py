"""`flowsteer demo`: GRPO post-training of the shipped demo model on the verifiable reward, with
held-out strict success measured before and after."""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from .model import DemoAdapter, load_demo_model
from .reward import GenEvalLikeReward
from .world import prompt_sets

#: the demo's defaults: sampling settings of the base model, and the RL recipe on top of it
DEMO_OVERRIDES = [
    "model.dtype=float32", "model.lora=null", "model.reference=copy",
    "sampling.num_steps=10", "sampling.group_size=8", "sampling.guidance_scale=2.0",
    "sampling.kind=flow", "sampling.noise_level=0.5", "sampling.height=32", "sampling.width=32",
    "sampling.window={type: all}",
    "train.prompts_per_iteration=8", "train.batch_size=32", "train.inner_epochs=1", "train.lr=1e-4",
    "train.clip_range=1e-4", "train.beta=0.0", "train.timestep_fraction=0.5",
    "train.timestep_order=random_per_sample", "train.mixed_precision=fp32",
    "train.ema=false", "train.max_grad_norm=1.0", "train.advantages={std: group, ddof: 0, eps: 1.0e-4, clip: 5.0}",
    "eval.every=0", "checkpoint.every=0", "checkpoint.keep=1", "logging.tensorboard=false",
]
ALGORITHMS = ("flow_grpo", "dance_grpo", "mix_grpo", "fast", "euphonium")


def demo_config(algorithm: str = "flow_grpo", iterations: int = 40, seed: int = 0, extra: Sequence[str] = ()):
    from ..train import load_config

    over = list(DEMO_OVERRIDES) + [f"train.iterations={iterations}", f"seed={seed}"]
    if algorithm == "dance_grpo":
        over += ["sampling.kind=dance", "sampling.noise_level=0.3", "sampling.same_noise=true",
                 "train.timestep_order=random_per_sample", "train.timestep_fraction=0.6",
                 "train.advantages={std: group, ddof: 1, eps: 1.0e-8, clip: 5.0}"]
    elif algorithm == "mix_grpo":
        over += ["sampling.window={type: progressive, size: 4, stride: 1, every: 10}"]
    elif algorithm == "fast":
        over += ["sampling.window={type: random, size: 3, start_min: 0, start_max: 4}"]
    elif algorithm == "euphonium":
        over += ["sampling.kind=dance", "sampling.noise_level=0.3", "prm.fit_steps=30", "prm.hidden=32",
                 "prm.depth=2", "prm.fit_batch_size=128"]
    return load_config(algorithm, over + list(extra))


def _grid(path: str, images: torch.Tensor, prompts: List[str]) -> None:
    from ..train.images import write_grid

    write_grid(path, images, prompts, cols=8)


@torch.no_grad()
def heldout_eval(model, prompts: List[str], meta: List[Dict[str, Any]], seed: int = 1234, num_steps: int = 10,
                 guidance_scale: float = 2.0, batch: int = 128):
    """(strict [n], breakdown {criterion: mean}, images): ODE samples with fixed noise."""
    from .. import sample

    adapter = DemoAdapter(model)
    was = model.training
    model.eval()
    images = torch.cat([sample(adapter, prompts[s:s + batch], num_steps=num_steps, guidance_scale=guidance_scale,
                               kind="ode", noise_level=0.0, seed=seed + s).images for s in range(0, len(prompts), batch)])
    model.train(was)
    scores = GenEvalLikeReward(criteria="all")(images, prompts, meta)
    by_cat = {}
    for cat in sorted({m["category"] for m in meta}):
        rows = torch.tensor([m["category"] == cat for m in meta])
        by_cat[cat] = float(scores["strict"][rows].mean())
    return scores["strict"], {k: float(v.mean()) for k, v in scores.items()}, by_cat, images


def run_demo(output_dir: str, algorithm: str = "flow_grpo", iterations: int = 40, seed: int = 0,
             eval_samples: int = 512, device: str = "cpu", weights: Optional[str] = None,
             extra: Sequence[str] = (), reward=None, log=print) -> Dict[str, Any]:
    """The whole demo; returns the summary it writes to OUTPUT_DIR/summary.json. reward: what GRPO
    trains on (default the checker's strict success); held-out success is always strict."""
    from ..train import GRPOTrainer
    from ..train.plot import read_metrics

    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)} (got {algorithm!r})")
    t_start = time.time()
    os.makedirs(output_dir, exist_ok=True)
    model = load_demo_model(weights, device)
    train_set, heldout = prompt_sets(0)
    ev_prompts = [heldout.prompts[i % len(heldout.prompts)] for i in range(eval_samples)]
    ev_meta = [heldout.meta[i % len(heldout.prompts)] for i in range(eval_samples)]
    log(f"demo: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter flow model, {len(train_set.prompts)} "
        f"training prompts, {eval_samples} held-out samples of {len(heldout.prompts)} unseen compositions")
    before, before_crit, before_cat, before_images = heldout_eval(model, ev_prompts, ev_meta)
    log(f"held-out strict success before: {float(before.mean()):.3f}  ({_fmt(before_cat)})")
    _grid(os.path.join(output_dir, "samples_before.png"), before_images[:32], ev_prompts[:32])

    cfg = demo_config(algorithm, iterations, seed, [f"prompts.train={json.dumps(train_set.prompts)}",
                                                    f"model.device={device}", *extra])
    run_dir = os.path.join(output_dir, "run")
    trainer = GRPOTrainer(DemoAdapter(model), reward if reward is not None else GenEvalLikeReward(), cfg,
                          run_dir=run_dir)
    trainer.train()
    after, after_crit, after_cat, after_images = heldout_eval(model, ev_prompts, ev_meta)
    log(f"held-out strict success after {iterations} iterations of {algorithm}: {float(after.mean()):.3f}  "
        f"({_fmt(after_cat)})")
    _grid(os.path.join(output_dir, "samples_after.png"), after_images[:32], ev_prompts[:32])
    rows = read_metrics(run_dir)
    _curve(os.path.join(output_dir, "reward_curve.png"), rows, float(before.mean()), float(after.mean()), iterations)
    summary = {
        "algorithm": algorithm, "seed": seed, "iterations": iterations, "eval_samples": eval_samples,
        "heldout_strict_before": float(before.mean()), "heldout_strict_after": float(after.mean()),
        "gain": float(after.mean() - before.mean()), "before_by_category": before_cat, "after_by_category": after_cat,
        "before_criteria": before_crit, "after_criteria": after_crit,
        "train_reward_first": rows[0]["reward/mean"], "train_reward_last": rows[-1]["reward/mean"],
        "seconds": round(time.time() - t_start, 1), "config_hash": cfg.hash(),
    }
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log(f"gain {summary['gain']:+.3f} in {summary['seconds']:.0f} s; files in {output_dir}")
    return summary


def _fmt(cat: Dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in cat.items())


def _curve(path: str, rows, before: float, after: float, iterations: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # the curve needs matplotlib; metrics.jsonl holds the same numbers
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["iteration"] for r in rows], [r["reward/mean"] for r in rows], label="rollout strict success (train)")
    ax.plot([0, iterations], [before, after], "o--", label="held-out strict success (ODE)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("strict success")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
