"""`flowsteer demo`: GRPO post-training of the shipped demo model on the verifiable reward, with
held-out strict success measured before and after."""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from .model import DemoAdapter, load_demo_model
from .reward import GenEvalLikeReward
from .world import prompt_sets

#: the demo's defaults: sampling settings of the base model, and the RL recipe on top of it: LoRA
#: on the conditioning path only (FiLM, attention outputs, the text encoder's feed-forward), where
#: a step along the policy gradient costs the base little (docs/demo.md, "Why this recipe")
DEMO_OVERRIDES = [
    "model.dtype=float32", "model.lora={rank: 16, alpha: 32, target_modules: [film, out_proj, linear1, linear2]}",
    "model.reference=auto",
    "sampling.num_steps=10", "sampling.group_size=8", "sampling.guidance_scale=2.0",
    "sampling.kind=flow", "sampling.noise_level=0.5", "sampling.height=32", "sampling.width=32",
    "sampling.window={type: all}",
    "train.prompts_per_iteration=8", "train.batch_size=32", "train.inner_epochs=2", "train.lr=5e-4",
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


def _grid(path: str, images: torch.Tensor, prompts: List[str], strict: Optional[torch.Tensor] = None) -> None:
    """The samples with their prompts (and pass/fail under the strict checker): a labelled figure
    when matplotlib is installed, else a plain PNG grid; the prompts also go to PATH's .json."""
    from ..train.images import write_grid

    write_grid(path, images, prompts, cols=8)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    import textwrap

    n, cols = min(16, len(prompts)), 4
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.0, rows * 2.3), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(images[k].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            verdict = "" if strict is None else ("  [pass]" if bool(strict[k]) else "  [fail]")
            ax.set_title(textwrap.fill(prompts[k] + verdict, 24), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


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
             extra: Sequence[str] = (), reward=None, log=print, eval_every: int = 0,
             curve_samples: int = 128) -> Dict[str, Any]:
    """The whole demo; returns the summary it writes to OUTPUT_DIR/summary.json. reward: what GRPO
    trains on (default the checker's strict success); held-out success is always strict.

    eval_every > 0 also measures held-out strict success on the first `curve_samples` of the
    held-out samples (the same fixed noise) every `eval_every` iterations: the curve of
    `flowsteer demo --compare`. Its points at iteration 0 and at the end come from the full
    evaluations, so they cost nothing."""
    from ..train import GRPOTrainer
    from ..train.plot import read_metrics

    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)} (got {algorithm!r})")
    for name, value, low in (("iterations", iterations, 1), ("eval_samples", eval_samples, 1),
                             ("eval_every", eval_every, 0), ("curve_samples", curve_samples, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low} (got {value!r})")
    curve_samples = min(curve_samples, eval_samples)
    train_set, heldout = prompt_sets(0)
    cfg = demo_config(algorithm, iterations, seed, [f"prompts.train={json.dumps(train_set.prompts)}",
                                                    f"model.device={device}", *extra])
    if cfg.model.lora is not None:
        from .._optional import require

        require("peft", "demo", "flowsteer demo (its default recipe trains LoRA on the model's conditioning path)")
    t_start = time.time()
    os.makedirs(output_dir, exist_ok=True)
    model = load_demo_model(weights, device)
    ev_prompts = [heldout.prompts[i % len(heldout.prompts)] for i in range(eval_samples)]
    ev_meta = [heldout.meta[i % len(heldout.prompts)] for i in range(eval_samples)]
    log(f"demo: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter flow model, {len(train_set.prompts)} "
        f"training prompts, {eval_samples} held-out samples of {len(heldout.prompts)} unseen compositions")
    before, before_crit, before_cat, before_images = heldout_eval(model, ev_prompts, ev_meta)
    log(f"held-out strict success before: {float(before.mean()):.3f}  ({_fmt(before_cat)})")
    _grid(os.path.join(output_dir, "samples_before.png"), before_images[:32], ev_prompts[:32], before[:32])

    run_dir = os.path.join(output_dir, "run")
    trainer = GRPOTrainer(DemoAdapter(model), reward if reward is not None else GenEvalLikeReward(), cfg,
                          run_dir=run_dir)
    curve = [(0, float(before[:curve_samples].mean()))]

    def on_step(row):
        it = row["iteration"]
        if eval_every > 0 and it % eval_every == 0 and it < iterations:
            with _evaluated(trainer):
                point = float(heldout_eval(model, ev_prompts[:curve_samples], ev_meta[:curve_samples])[0].mean())
            curve.append((it, point))
            log(f"  iteration {it}: held-out strict success {point:.3f} ({curve_samples} samples)")

    trainer.train(on_step)
    with _evaluated(trainer):
        after, after_crit, after_cat, after_images = heldout_eval(model, ev_prompts, ev_meta)
    curve.append((iterations, float(after[:curve_samples].mean())))
    log(f"held-out strict success after {iterations} iterations of {algorithm}: {float(after.mean()):.3f}  "
        f"({_fmt(after_cat)})")
    _grid(os.path.join(output_dir, "samples_after.png"), after_images[:32], ev_prompts[:32], after[:32])
    rows = read_metrics(run_dir)
    _curve(os.path.join(output_dir, "reward_curve.png"), rows, curve, float(before.mean()), float(after.mean()),
           iterations, curve_samples, eval_samples)
    summary = {
        "algorithm": algorithm, "seed": seed, "iterations": iterations, "eval_samples": eval_samples,
        "heldout_strict_before": float(before.mean()), "heldout_strict_after": float(after.mean()),
        "gain": float(after.mean() - before.mean()), "before_by_category": before_cat, "after_by_category": after_cat,
        "before_criteria": before_crit, "after_criteria": after_crit,
        "train_reward_first": rows[0]["reward/mean"], "train_reward_last": rows[-1]["reward/mean"],
        "heldout_curve": [list(p) for p in curve], "curve_samples": curve_samples,
        "seconds": round(time.time() - t_start, 1), "config_hash": cfg.hash(),
    }
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log(f"gain {summary['gain']:+.3f} in {summary['seconds']:.0f} s; files in {output_dir}")
    return summary


def _evaluated(trainer):
    """The weights held-out success is measured with: the EMA when train.ema is on, else the trained ones."""
    return trainer.ema.applied() if trainer.ema is not None else contextlib.nullcontext()


def _fmt(cat: Dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in cat.items())


def _curve(path: str, rows, curve, before: float, after: float, iterations: int, curve_samples: int,
           eval_samples: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # the curve needs matplotlib; metrics.jsonl holds the same numbers
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["iteration"] for r in rows], [r["reward/mean"] for r in rows], alpha=0.6,
            label="rollout strict success (training prompts, SDE)")
    if len(curve) > 2:
        ax.plot([c[0] for c in curve], [c[1] for c in curve], "s-", label=f"held-out ({curve_samples} samples, ODE)")
    ax.plot([0, iterations], [before, after], "o--", label=f"held-out before / after ({eval_samples} samples, ODE)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("strict success")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def steps_to_target(curve: Sequence[Sequence[float]], target: float) -> Optional[int]:
    """The first iteration of a held-out curve [(iteration, success), ...] at or above target (None: never)."""
    for it, value in curve:
        if value >= target:
            return int(it)
    return None


def compare(output_dir: str, algorithms: Sequence[str] = ALGORITHMS, seeds: Sequence[int] = (0, 1, 2),
            iterations: int = 40, eval_every: int = 5, curve_samples: int = 128, eval_samples: int = 512,
            target_gain: float = 0.10, device: str = "cpu", weights: Optional[str] = None, extra: Sequence[str] = (),
            log=print) -> Dict[str, Any]:
    """`flowsteer demo --compare`: every algorithm with the same budget (iterations) and seeds.

    Writes OUTPUT_DIR/ALGORITHM-seedS/ (each a full demo run), compare.json (every summary and
    held-out curve), compare.md (a table: gain mean and spread, iterations to reach the base's
    held-out success + target_gain on the curve's samples) and compare.png (held-out success
    against iteration, mean and range over seeds, and the iterations to the target)."""
    if not algorithms or any(a not in ALGORITHMS for a in algorithms):
        raise ValueError(f"algorithms must be a non-empty list of {', '.join(ALGORITHMS)} (got {list(algorithms)!r})")
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    os.makedirs(output_dir, exist_ok=True)
    runs: Dict[str, List[Dict[str, Any]]] = {}
    for algo in algorithms:
        for seed in seeds:
            log(f"== {algo}, seed {seed}")
            runs.setdefault(algo, []).append(run_demo(
                os.path.join(output_dir, f"{algo}-seed{seed}"), algorithm=algo, iterations=iterations, seed=seed,
                eval_samples=eval_samples, device=device, weights=weights, extra=extra, log=log,
                eval_every=eval_every, curve_samples=curve_samples))
    rows = []
    for algo, summaries in runs.items():
        gains = [s["gain"] for s in summaries]
        base = summaries[0]["heldout_curve"][0][1]
        reached = [steps_to_target(s["heldout_curve"], base + target_gain) for s in summaries]
        rows.append({"algorithm": algo, "gain_mean": sum(gains) / len(gains), "gain_min": min(gains),
                     "gain_max": max(gains), "gains": gains, "steps_to_target": reached,
                     "seconds_mean": sum(s["seconds"] for s in summaries) / len(summaries)})
    result = {"algorithms": list(algorithms), "seeds": list(seeds), "iterations": iterations,
              "eval_samples": eval_samples, "curve_samples": curve_samples, "eval_every": eval_every,
              "target_gain": target_gain, "table": rows, "runs": runs}
    with open(os.path.join(output_dir, "compare.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"Held-out strict success gain after {iterations} iterations ({eval_samples} held-out samples, "
             f"seeds {', '.join(map(str, seeds))}); iterations to +{target_gain:.2f} on the curve's "
             f"{curve_samples} samples, evaluated every {eval_every}.", "",
             "| algorithm | gain mean | gain min | gain max | iterations to target (per seed) | seconds per run |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        reached = ", ".join("-" if s is None else str(s) for s in r["steps_to_target"])
        lines.append(f"| {r['algorithm']} | {r['gain_mean']:+.3f} | {r['gain_min']:+.3f} | {r['gain_max']:+.3f} | "
                     f"{reached} | {r['seconds_mean']:.0f} |")
    with open(os.path.join(output_dir, "compare.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _compare_plot(os.path.join(output_dir, "compare.png"), runs, rows, target_gain, iterations)
    log("\n".join(lines))
    return result


def _compare_plot(path: str, runs, rows, target_gain: float, iterations: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    base = None
    for algo, summaries in runs.items():
        its = [it for it, _ in summaries[0]["heldout_curve"]]
        values = [[v for _, v in s["heldout_curve"]] for s in summaries]
        mean = [sum(col) / len(col) for col in zip(*values)]
        line, = ax.plot(its, mean, label=algo)
        ax.fill_between(its, [min(col) for col in zip(*values)], [max(col) for col in zip(*values)],
                        color=line.get_color(), alpha=0.15)
        base = mean[0]
    if base is not None:
        ax.axhline(base + target_gain, color="gray", linestyle="--", label=f"base + {target_gain:.2f}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("held-out strict success")
    ax.legend(fontsize=8)
    names = [r["algorithm"] for r in rows]
    reached = [[s for s in r["steps_to_target"] if s is not None] for r in rows]
    bx.bar(names, [sum(r) / len(r) if r else 0 for r in reached])
    for i, (r, row) in enumerate(zip(reached, rows)):
        bx.text(i, (sum(r) / len(r) if r else 0), f"{len(r)}/{len(row['steps_to_target'])} reached",
                ha="center", va="bottom", fontsize=8)
    bx.set_ylabel(f"iterations to base + {target_gain:.2f} (mean of the seeds that reached it)")
    bx.set_ylim(0, iterations)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
